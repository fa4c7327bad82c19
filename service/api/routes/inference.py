"""``POST /predict``, ``POST /predict/image`` and ``POST /anomaly-score``."""

from __future__ import annotations

import io
from typing import Annotated

import anyio.to_thread
import numpy as np
from fastapi import APIRouter, Form, HTTPException
from fastapi.exceptions import RequestValidationError
from numpy.typing import NDArray

from service.api.deps import ModelDep, RepositoryDep
from service.api.errors import ERROR_RESPONSES
from service.api.json_body import InputBatchRoute
from service.codecs.inputs import InputSchema, constant_rows, schema_of
from service.codecs.schemas import (
    AnomalyFlag,
    AnomalyScoreRequest,
    AnomalyScoreResponse,
    ErrorBody,
    ImageForm,
    ModelRef,
    Prediction,
    PredictRequest,
    PredictResponse,
    Uncertainty,
)
from service.core.limits import Limits
from service.core.model import Answer, Query, ServedModel

router = APIRouter(tags=["inference"], route_class=InputBatchRoute)


def model_ref(model: ServedModel) -> ModelRef:
    meta = model.checkpoint.meta
    return ModelRef(
        name=model.name,
        repository_version=str(model.version),
        id=meta.model_id,
        version=meta.version,
        checkpoint_sha256=model.checkpoint.sha256,
    )


def _predict_response(model: ServedModel, answer: Answer) -> PredictResponse:
    """``/predict``'s answer. Built without re-validation (model_construct): every value comes
    from the answer's arrays, already of the declared types; 3 x N validations were ~5% of a
    batch-64 request."""
    summary = answer.summary
    class_names = model.checkpoint.meta.input.class_names
    labels = summary.labels.tolist()
    probabilities = answer.probabilities.tolist()
    support = (
        [None] * len(labels) if summary.data_support is None else summary.data_support.tolist()
    )
    columns = zip(
        summary.predictive_entropy.tolist(),
        summary.expected_entropy.tolist(),
        summary.mutual_information.tolist(),
        summary.model_variance.tolist(),
        answer.scores.tolist(),
        answer.flags.tolist(),
        support,
        strict=True,
    )
    name, threshold = answer.score_name, answer.threshold
    predictions = [
        Prediction.model_construct(
            label=labels[i],
            label_name=class_names[labels[i]] if class_names else None,
            probabilities=probabilities[i],
            uncertainty=Uncertainty.model_construct(
                predictive_entropy=h,
                expected_entropy=e,
                mutual_information=mi,
                model_variance=v,
                data_support=ds,
            ),
            anomaly=AnomalyFlag.model_construct(
                score=score, is_anomaly=flag, threshold=threshold, score_name=name
            ),
        )
        for i, (h, e, mi, v, score, flag, ds) in enumerate(columns)
    ]
    return PredictResponse(
        model=model_ref(model),
        num_samples=answer.num_samples,
        seed=answer.seed,
        predictions=predictions,
    )


@router.post(
    "/predict",
    response_model=PredictResponse,
    responses=ERROR_RESPONSES,
    summary="Posterior predictive, uncertainty and anomaly flag for each input",
)
async def predict(body: PredictRequest, model: ModelDep) -> PredictResponse:
    query = Query(body.raw, body.num_samples, body.seed, endpoint="/predict")
    return _predict_response(model, await model.predict(query))


def decoded_pixels(width: int, height: int, target: tuple[int, ...]) -> int:
    """Pixels that decoding a ``width x height`` image and resizing it to ``target``
    (``(..., H, W)``) hold: the image, and the resize's first (horizontal) pass, ``W x
    height``. A 16,777,216 x 1 PNG of 16 KB decodes to 16 M pixels."""
    return width * height + target[-1] * height


def _images_to_raw(
    schema: InputSchema, files: list[tuple[str, bytes]], limits: Limits
) -> NDArray[np.float32]:
    """Image files -> examples ``(N, D)`` with the checkpoint's convention; a 422 naming the
    file that is not an image, or one that cannot be decoded; a 413, before any is decoded,
    when they hold more than ``max_pixels`` decoded pixels in all (:func:`decoded_pixels`,
    from their headers)."""
    from PIL import Image, UnidentifiedImageError

    total = 0
    for i, (name, data) in enumerate(files):
        where = f"files[{i}] ({name!r})"
        try:
            with Image.open(io.BytesIO(data)) as im:  # reads the header only
                width, height = im.size
        except UnidentifiedImageError:
            raise _file_error(
                i, f"{where} is not an image file this server can read (PNG, JPEG, ...)"
            ) from None
        except (Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
            raise _file_error(i, f"{where} cannot be read as an image: {exc}") from None
        total += decoded_pixels(width, height, schema.shape)
        limits.image_pixels(total, f"{where} is {width}x{height} pixels")
    raw = np.empty((len(files), schema.size), dtype=np.float32)
    for i, (name, data) in enumerate(files):
        try:
            raw[i] = schema.image_to_raw(data)
        except ValueError as exc:
            raise _file_error(i, f"files[{i}] ({name!r}) cannot be decoded: {exc}") from None
    blank = constant_rows(raw)
    if len(blank):
        i = int(blank[0])
        raise _file_error(
            i,
            f"files[{i}] ({files[i][0]!r}) is blank: every pixel is {raw[i, 0]:g} after "
            "conversion, nothing to classify",
        )
    return raw


def _file_error(i: int, message: str) -> RequestValidationError:
    return RequestValidationError(
        [{"type": "image_file", "loc": ("body", "files", i), "msg": message, "input": None}]
    )


@router.post(
    "/predict/image",
    response_model=PredictResponse,
    responses={
        **ERROR_RESPONSES,
        415: {
            "model": ErrorBody,
            "description": "A body that is not multipart/form-data, or a model whose inputs "
            "are not images",
        },
    },
    summary="As /predict, for image files (PNG, JPEG, ...) converted with the model's convention",
)
async def predict_image(
    form: Annotated[ImageForm, Form(media_type="multipart/form-data")],
    repository: RepositoryDep,
) -> PredictResponse:
    model = repository.resolve(form.model, form.version)
    schema = schema_of(model.checkpoint)
    if schema.image_mode is None:
        shape = "x".join(map(str, schema.shape))
        raise HTTPException(
            status_code=415,
            detail=f"this model's inputs are not images (shape {shape}, "
            f"{schema.convention.dtype}); send them as JSON to POST /predict",
        )
    model.limits.batch(len(form.files), "files", "images")
    model.num_samples(form.num_samples)  # the limits first, before any decoding
    files = [(f.filename or "", await f.read()) for f in form.files]
    raw = await anyio.to_thread.run_sync(
        _images_to_raw, schema, files, model.limits, limiter=model.limiter
    )
    query = Query(raw, form.num_samples, form.seed, endpoint="/predict/image")
    return _predict_response(model, await model.predict(query))


@router.post(
    "/anomaly-score",
    response_model=AnomalyScoreResponse,
    responses=ERROR_RESPONSES,
    summary="Anomaly scores and flags at the checkpoint's calibrated threshold",
)
async def anomaly_score(body: AnomalyScoreRequest, model: ModelDep) -> AnomalyScoreResponse:
    query = Query(body.raw, body.num_samples, body.seed, body.score, endpoint="/anomaly-score")
    answer = await model.predict(query)
    return AnomalyScoreResponse(
        score_name=answer.score_name,
        threshold=answer.threshold,
        target_fpr=model.checkpoint.meta.anomaly.target_fpr,
        scores=answer.scores.tolist(),
        is_anomaly=answer.flags.tolist(),
        num_samples=answer.num_samples,
        seed=answer.seed,
        model=model_ref(model),
    )
