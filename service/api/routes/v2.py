"""Open Inference Protocol (KServe V2), REST: health, metadata and ``infer`` under ``/v2``.

The model's one input is ``input`` (FP32 in the model's raw units, or UINT8 0-255 for
images); its uncertainty comes back as the named output tensors of :data:`OUTPUTS`. Request
parameters ``num_samples``, ``seed`` and ``score`` mean and are limited as in ``/predict`` and
``/anomaly-score``: the same seed gives the same numbers. Every error is
``{"error": message}`` with a 4xx status (503 while the service starts). Wire formats:
:mod:`service.codecs.v2`.
"""

from __future__ import annotations

from typing import Any, Final

import anyio.to_thread
import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from numpy.typing import NDArray
from starlette.exceptions import HTTPException

import apd
from apd.uncertainty import PredictiveSummary, ScoreName
from service.api.deps import MaybeRuntimeDep
from service.api.errors import JSON_MEDIA_TYPE, body_is, is_json_media_type, media_type
from service.codecs.inputs import InputSchema
from service.codecs.v2 import (
    EXTENSIONS,
    HEADER_LENGTH,
    Datatype,
    InferRequest,
    InferResponse,
    ModelInput,
    ModelMetadata,
    ModelReady,
    ProtocolError,
    ServerLive,
    ServerMetadata,
    ServerReady,
    TensorMetadata,
    V2Error,
    decode_input,
    encode_response,
    inline_schema,
    parameters,
    parse_request,
    requested_outputs,
)
from service.core.model import ServiceRuntime

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (V2)"])

SERVER_NAME: Final = "apd"
INFER_PATH: Final = "/v2/models/{name}/infer"

# name -> datatype; probabilities is [N, C], every other output [N].
OUTPUTS: Final[dict[str, Datatype]] = {
    "probabilities": "FP32",
    "label": "INT64",
    "predictive_entropy": "FP32",
    "expected_entropy": "FP32",
    "mutual_information": "FP32",
    "model_variance": "FP32",
    "anomaly_score": "FP32",
    "is_anomaly": "BOOL",
    # the inputs' data-support score (apd.support), for checkpoints that have one
    "data_support": "FP32",
}


def _outputs(runtime: ServiceRuntime) -> list[str]:
    """The output tensors this model serves: ``data_support`` only where it has the score."""
    has_support = runtime.checkpoint.data_support is not None
    return [out for out in OUTPUTS if out != "data_support" or has_support]


_ERROR: Final = {"model": V2Error}
_LIMIT_ERROR: Final = {
    "model": V2Error,
    "description": "Body over max_body_bytes or batch over max_batch",
}
OCTET_STREAM: Final = "application/octet-stream"
_STARTING: Final = {"model": V2Error, "description": "The service is starting"}


def _fail(exc: ProtocolError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)


def _ready(runtime: ServiceRuntime | None) -> bool:
    """The condition of ``/readyz``: checkpoint loaded and pool filled."""
    return runtime is not None and runtime.pool.loaded


def _model(runtime: ServiceRuntime | None, name: str) -> ServiceRuntime:
    """The runtime serving model ``name``: 503 while starting, 404 for another name."""
    if runtime is None:
        raise ProtocolError("the service is starting: checkpoint not loaded yet", 503)
    served = runtime.checkpoint.meta.model_id
    if name != served:
        raise ProtocolError(f"unknown model {name!r}: this server serves {served!r}", 404)
    return runtime


def _model_input(request: Request) -> ModelInput:
    """The served model's input tensor (its input schema is set with the runtime)."""
    schema: InputSchema = request.app.state.input_schema
    return ModelInput.of(schema)


@router.get("", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name=SERVER_NAME, version=apd.__version__, extensions=list(EXTENSIONS))


@router.get("/health/live", response_model=ServerLive, summary="200 while the process lives")
async def server_live() -> ServerLive:
    return ServerLive(live=True)


@router.get(
    "/health/ready",
    response_model=ServerReady,
    responses={503: {"model": ServerReady, "description": "Not ready yet"}},
    summary="200 once the model can be served (as /readyz), else 503",
)
async def server_ready(runtime: MaybeRuntimeDep) -> ServerReady | JSONResponse:
    if not _ready(runtime):
        return JSONResponse({"ready": False}, status_code=503)
    return ServerReady(ready=True)


@router.get(
    "/models/{name}",
    response_model=ModelMetadata,
    response_model_exclude_none=True,
    responses={404: _ERROR, 503: _STARTING},
    summary="Model metadata: its input and output tensors",
)
async def model_metadata(
    name: str, request: Request, runtime: MaybeRuntimeDep
) -> ModelMetadata | JSONResponse:
    try:
        served = _model(runtime, name)
    except ProtocolError as exc:
        return _fail(exc)
    meta = served.checkpoint.meta
    classes = served.checkpoint.spec.num_classes
    names = {"class_names": meta.input.class_names} if meta.input.class_names else None
    outputs = [
        TensorMetadata(
            name=out,
            datatype=dtype,
            shape=[-1, classes] if out == "probabilities" else [-1],
            parameters=names if out in ("probabilities", "label") else None,
        )
        for out in _outputs(served)
        for dtype in [OUTPUTS[out]]
    ]
    return ModelMetadata(
        name=meta.model_id,
        versions=[meta.version],
        platform=meta.format,
        inputs=[_model_input(request).metadata()],
        outputs=outputs,
    )


@router.get(
    "/models/{name}/ready",
    response_model=ModelReady,
    responses={404: _ERROR, 503: _STARTING},
    summary="200 once the model can be served",
)
async def model_ready(name: str, runtime: MaybeRuntimeDep) -> ModelReady | JSONResponse:
    try:
        served = _model(runtime, name)
    except ProtocolError as exc:
        return _fail(exc)
    if not _ready(served):
        return JSONResponse({"error": "the model is loading"}, status_code=503)
    return ModelReady(name=name, ready=True)


_INFER_OPENAPI: Final[dict[str, Any]] = {
    "parameters": [
        {
            "name": HEADER_LENGTH,
            "in": "header",
            "required": False,
            "description": "Binary tensor data extension: bytes of the JSON header at the "
            "start of the body; the inputs' binary data follow it",
            "schema": {"type": "integer", "minimum": 0},
        }
    ],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": inline_schema(InferRequest)},
            "application/octet-stream": {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": "JSON header (as application/json) then binary tensors",
                }
            },
        },
    },
}


@router.post(
    "/models/{name}/infer",
    response_class=Response,
    responses={
        200: {
            "model": InferResponse,
            "description": "application/json, or with binary outputs the JSON header "
            f"({HEADER_LENGTH} bytes) then the outputs' bytes",
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        },
        400: {"model": V2Error, "description": "A tensor or parameter the model cannot take"},
        404: _ERROR,
        408: {"model": V2Error, "description": "The body arrived too slowly"},
        413: _LIMIT_ERROR,
        415: {"model": V2Error, "description": "A body that is neither JSON nor binary tensors"},
        503: _STARTING,
    },
    openapi_extra=_INFER_OPENAPI,
    summary="Posterior predictive, uncertainty and anomaly flag as output tensors",
)
async def infer(name: str, request: Request, runtime: MaybeRuntimeDep) -> Response:
    try:
        _check_media_type(request)
        served = _model(runtime, name)
        try:
            body = await request.body()
        except HTTPException as exc:  # the body limit (413) or deadline (408) middleware
            raise ProtocolError(str(exc.detail), exc.status_code, exc.headers) from None
        # In a thread: health checks are answered meanwhile (its cost is bounded before, by
        # service.infra.admission, which refuses a JSON header of more values than a request holds)
        req, x = await anyio.to_thread.run_sync(
            _read_request, body, request.headers.get(HEADER_LENGTH), _model_input(request),
            served.settings.max_batch,
        )  # fmt: skip
        params = parameters(req)
        k = _num_samples(served, params.num_samples)
        score = _score(served, params.score)
        outputs = requested_outputs(req, _outputs(served))
    except ProtocolError as exc:
        return _fail(exc)
    summary = await served.infer(x, k, params.seed, INFER_PATH)
    tensors = _output_tensors(served, summary, score)
    header: dict[str, Any] = {
        "model_name": served.checkpoint.meta.model_id,
        "model_version": served.checkpoint.meta.version,
    }
    if req.id is not None:
        header["id"] = req.id
    header["parameters"] = {
        "num_samples": k,
        "score": score.value,
        "threshold": served.thresholds[score],
        **({"seed": params.seed} if params.seed is not None else {}),
    }
    content, header_length = encode_response(
        header, [(out, OUTPUTS[out], tensors[out], binary) for out, binary in outputs]
    )
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(
        content,
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(header_length)},
    )


def _check_media_type(request: Request) -> None:
    """415 unless the body is JSON (or has no Content-Type, as the protocol allows) or the
    binary extension's JSON header plus tensors (``application/octet-stream``, or any type
    with ``Inference-Header-Content-Length``)."""
    content_type = request.headers.get("content-type")
    if is_json_media_type(content_type) or HEADER_LENGTH in request.headers:
        return
    if media_type(content_type) in ("", OCTET_STREAM):  # the protocol names no media type
        return
    raise ProtocolError(
        f"{body_is(content_type)}; this endpoint takes {JSON_MEDIA_TYPE} (or "
        f"{OCTET_STREAM} with the {HEADER_LENGTH} header, the binary tensor data extension)",
        415,
    )


def _read_request(
    body: bytes, header_length: str | None, model: ModelInput, max_batch: int
) -> tuple[InferRequest, NDArray[np.float32]]:
    req, raw = parse_request(body, header_length)
    return req, decode_input(req, raw, model, max_batch)


def _num_samples(runtime: ServiceRuntime, requested: int | None) -> int:
    if requested is None:
        return runtime.default_num_samples
    limit = runtime.settings.max_num_samples
    if requested > limit:
        raise ProtocolError(
            f"parameters.num_samples is {requested}; this server's max_num_samples is {limit}"
        )
    return requested


def _score(runtime: ServiceRuntime, requested: ScoreName | None) -> ScoreName:
    if requested is None:
        return runtime.default_score
    if requested not in runtime.thresholds:
        valid = ", ".join(s.value for s in runtime.thresholds)
        raise ProtocolError(
            f"parameters.score {requested.value!r} has no calibrated threshold in this "
            f"checkpoint; choose one of: {valid}"
        )
    return requested


def _output_tensors(
    runtime: ServiceRuntime, summary: PredictiveSummary, score: ScoreName
) -> dict[str, NDArray[Any]]:
    """Every output tensor; flags and their metric as ``/predict`` and ``/anomaly-score``."""
    scores, flags, _ = runtime.flags(summary, score)
    support = {} if summary.data_support is None else {"data_support": summary.data_support}
    return support | {
        "probabilities": runtime.checkpoint.probabilities(summary),
        "label": summary.labels,
        "predictive_entropy": summary.predictive_entropy,
        "expected_entropy": summary.expected_entropy,
        "mutual_information": summary.mutual_information,
        "model_variance": summary.model_variance,
        "anomaly_score": scores,
        "is_anomaly": flags,
    }
