"""``POST /predict``, ``POST /predict/image`` and ``POST /anomaly-score``."""

from __future__ import annotations

import io
from typing import Annotated

import anyio.to_thread
import numpy as np
from fastapi import APIRouter, Form, HTTPException
from fastapi.exceptions import RequestValidationError
from numpy.typing import NDArray

from apd.uncertainty import PredictiveSummary, ScoreName
from service.api.deps import InputSchemaDep, RuntimeDep
from service.api.errors import ERROR_RESPONSES, validation_error
from service.api.json_body import InputBatchRoute
from service.codecs.inputs import InputSchema, constant_rows
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
from service.core.model import ServiceRuntime

router = APIRouter(tags=["inference"], route_class=InputBatchRoute)


def _model_ref(runtime: ServiceRuntime) -> ModelRef:
    meta = runtime.checkpoint.meta
    return ModelRef(
        id=meta.model_id, version=meta.version, checkpoint_sha256=runtime.checkpoint.sha256
    )


def _num_samples(runtime: ServiceRuntime, requested: int | None) -> int:
    if requested is None:
        return runtime.default_num_samples
    limit = runtime.settings.max_num_samples
    if requested > limit:
        raise validation_error(
            "num_samples",
            f"Input should be less than or equal to {limit} (this server's max_num_samples)",
            "less_than_equal",
            requested,
        )
    return requested


def _check_batch(runtime: ServiceRuntime, n: int, what: str = "inputs", unit: str = "") -> None:
    limit = runtime.settings.max_batch
    if n > limit:
        raise HTTPException(
            status_code=413,
            detail=f"{what} holds {n} {unit or 'examples'}; the limit is max_batch={limit} "
            "per request",
        )


def _score_name(runtime: ServiceRuntime, requested: ScoreName | None) -> ScoreName:
    if requested is None:
        return runtime.default_score
    if requested not in runtime.thresholds:
        valid = ", ".join(s.value for s in runtime.thresholds)
        raise validation_error(
            "score",
            f"score {requested.value!r} has no calibrated threshold in this checkpoint; "
            f"choose one of: {valid}",
            "enum",
            requested.value,
        )
    return requested


async def _summarize(
    runtime: ServiceRuntime,
    raw: NDArray[np.float32],
    num_samples: int | None,
    seed: int | None,
    endpoint: str,
) -> tuple[PredictiveSummary, int]:
    _check_batch(runtime, len(raw))
    k = _num_samples(runtime, num_samples)
    summary = await runtime.infer(raw, k, seed, endpoint)
    return summary, k


async def _predict(
    runtime: ServiceRuntime,
    raw: NDArray[np.float32],
    num_samples: int | None,
    seed: int | None,
    endpoint: str,
) -> PredictResponse:
    summary, k = await _summarize(runtime, raw, num_samples, seed, endpoint)
    name = runtime.default_score
    scores, flags, threshold = runtime.flags(summary, name)
    class_names = runtime.checkpoint.meta.input.class_names
    # Built without re-validation (model_construct): every value comes from the summary's
    # arrays, already of the declared types; 3 x N validations were ~5% of a batch-64 request.
    labels = summary.labels.tolist()
    probabilities = runtime.checkpoint.probabilities(summary).tolist()
    support = (
        [None] * len(labels) if summary.data_support is None else summary.data_support.tolist()
    )
    columns = zip(
        summary.predictive_entropy.tolist(),
        summary.expected_entropy.tolist(),
        summary.mutual_information.tolist(),
        summary.model_variance.tolist(),
        scores.tolist(),
        flags.tolist(),
        support,
        strict=True,
    )
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
        model=_model_ref(runtime), num_samples=k, seed=seed, predictions=predictions
    )


@router.post(
    "/predict",
    response_model=PredictResponse,
    responses=ERROR_RESPONSES,
    summary="Posterior predictive, uncertainty and anomaly flag for each input",
)
async def predict(body: PredictRequest, runtime: RuntimeDep) -> PredictResponse:
    return await _predict(runtime, body.raw, body.num_samples, body.seed, "/predict")


def decoded_pixels(width: int, height: int, target: tuple[int, ...]) -> int:
    """Pixels that decoding a ``width x height`` image and resizing it to ``target``
    (``(..., H, W)``) hold: the image, and the resize's first (horizontal) pass, ``W x
    height``. A 16,777,216 x 1 PNG of 16 KB decodes to 16 M pixels."""
    return width * height + target[-1] * height


def _images_to_raw(
    schema: InputSchema, files: list[tuple[str, bytes]], max_pixels: int
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
        if total > max_pixels:
            raise HTTPException(
                status_code=413,
                detail=f"{where} is {width}x{height} pixels: with the files before it, "
                f"{total} decoded pixels; the limit is max_image_pixels={max_pixels} per "
                "request (refused before decoding)",
            )
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
    runtime: RuntimeDep,
    schema: InputSchemaDep,
) -> PredictResponse:
    if schema.image_mode is None:
        shape = "x".join(map(str, schema.shape))
        raise HTTPException(
            status_code=415,
            detail=f"this model's inputs are not images (shape {shape}, "
            f"{schema.convention.dtype}); send them as JSON to POST /predict",
        )
    _check_batch(runtime, len(form.files), "files", "images")
    _num_samples(runtime, form.num_samples)  # the limits first, before any decoding
    files = [(f.filename or "", await f.read()) for f in form.files]
    raw = await anyio.to_thread.run_sync(
        _images_to_raw, schema, files, runtime.settings.max_image_pixels, limiter=runtime.limiter
    )
    return await _predict(runtime, raw, form.num_samples, form.seed, "/predict/image")


@router.post(
    "/anomaly-score",
    response_model=AnomalyScoreResponse,
    responses=ERROR_RESPONSES,
    summary="Anomaly scores and flags at the checkpoint's calibrated threshold",
)
async def anomaly_score(body: AnomalyScoreRequest, runtime: RuntimeDep) -> AnomalyScoreResponse:
    name = _score_name(runtime, body.score)
    summary, k = await _summarize(runtime, body.raw, body.num_samples, body.seed, "/anomaly-score")
    scores, flags, threshold = runtime.flags(summary, name)
    return AnomalyScoreResponse(
        score_name=name,
        threshold=threshold,
        target_fpr=runtime.checkpoint.meta.anomaly.target_fpr,
        scores=scores.tolist(),
        is_anomaly=flags.tolist(),
        num_samples=k,
        seed=body.seed,
        model=_model_ref(runtime),
    )
