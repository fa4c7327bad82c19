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
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException

import apd
from service.api.deps import MaybeRepositoryDep, RepositoryDep
from service.api.errors import JSON_MEDIA_TYPE, body_is, is_json_media_type, media_type
from service.codecs.v2 import (
    EXTENSIONS,
    HEADER_LENGTH,
    OUTPUTS,
    SERVER_NAME,
    InferRequest,
    InferResponse,
    ModelMetadata,
    ModelReady,
    ProtocolError,
    ServerLive,
    ServerMetadata,
    ServerReady,
    V2Error,
    answer_tensors,
    decode_query,
    encode_response,
    inline_schema,
    model_metadata,
    model_outputs,
    requested_outputs,
    response_header,
)
from service.core.model import ServedModel
from service.core.repository import ModelRepository, VersionState

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (V2)"])

INFER_PATH: Final = "/v2/models/{name}/infer"

_ERROR: Final = {"model": V2Error}
_LIMIT_ERROR: Final = {
    "model": V2Error,
    "description": "Body over max_body_bytes or batch over max_batch",
}
OCTET_STREAM: Final = "application/octet-stream"
_STARTING: Final = {"model": V2Error, "description": "The service is starting"}


def _fail(exc: ProtocolError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)


def _repository(repository: ModelRepository | None) -> ModelRepository:
    if repository is None:
        raise ProtocolError("the service is starting: no model loaded yet", 503)
    return repository


class RepositoryIndexRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ready: bool = False


class RepositoryIndexEntry(BaseModel):
    name: str
    version: str
    state: VersionState
    reason: str


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
    summary="200 while at least one model version is READY (as /readyz), else 503",
)
async def server_ready(repository: MaybeRepositoryDep) -> ServerReady | JSONResponse:
    if repository is None or not repository.ready:
        return JSONResponse({"ready": False}, status_code=503)
    return ServerReady(ready=True)


@router.post(
    "/repository/index",
    response_model=list[RepositoryIndexEntry],
    responses={503: _STARTING},
    summary="Every model version found in the repository, its state and why it is not ready",
)
async def repository_index(
    repository: MaybeRepositoryDep, body: RepositoryIndexRequest | None = None
) -> list[RepositoryIndexEntry] | JSONResponse:
    try:
        rows = _repository(repository).index(ready_only=body is not None and body.ready)
    except ProtocolError as exc:
        return _fail(exc)
    return [
        RepositoryIndexEntry(name=r.name, version=str(r.version), state=r.state, reason=r.reason)
        for r in rows
    ]


async def _metadata(repository: ModelRepository, name: str, version: str | None) -> ModelMetadata:
    return model_metadata(repository.resolve(name, version))


async def _ready(repository: ModelRepository, name: str, version: str | None) -> ModelReady:
    repository.resolve(name, version)  # 404 unknown; 503 (UNAVAILABLE) not ready
    return ModelReady(name=name, ready=True)


_METADATA: Final[dict[str, Any]] = {
    "response_model": ModelMetadata,
    "response_model_exclude_none": True,
    "responses": {404: _ERROR, 503: _STARTING},
}


@router.get("/models/{name}", summary="Model metadata: its input and output tensors", **_METADATA)
async def model_metadata_route(name: str, repository: RepositoryDep) -> ModelMetadata:
    return await _metadata(repository, name, None)


@router.get(
    "/models/{name}/versions/{version}",
    summary="Metadata of one version of a model",
    **_METADATA,
)
async def version_metadata_route(
    name: str, version: str, repository: RepositoryDep
) -> ModelMetadata:
    return await _metadata(repository, name, version)


_READY: Final[dict[str, Any]] = {
    "response_model": ModelReady,
    "responses": {404: _ERROR, 503: _STARTING},
}


@router.get("/models/{name}/ready", summary="200 once the model can be served", **_READY)
async def model_ready(name: str, repository: RepositoryDep) -> ModelReady:
    return await _ready(repository, name, None)


@router.get(
    "/models/{name}/versions/{version}/ready",
    summary="200 once this version can be served",
    **_READY,
)
async def version_ready(name: str, version: str, repository: RepositoryDep) -> ModelReady:
    return await _ready(repository, name, version)


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
_INFER: Final[dict[str, Any]] = {
    "response_class": Response,
    "responses": {
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
    "openapi_extra": _INFER_OPENAPI,
}


@router.post(
    "/models/{name}/infer",
    summary="Posterior predictive, uncertainty and anomaly flag as output tensors",
    **_INFER,
)
async def infer(name: str, request: Request, repository: MaybeRepositoryDep) -> Response:
    return await _infer(request, repository, name, None)


@router.post(
    "/models/{name}/versions/{version}/infer",
    summary="As /v2/models/{name}/infer, with one version of the model",
    **_INFER,
)
async def version_infer(
    name: str, version: str, request: Request, repository: MaybeRepositoryDep
) -> Response:
    return await _infer(request, repository, name, version)


async def _infer(
    request: Request, repository: ModelRepository | None, name: str, version: str | None
) -> Response:
    try:
        _check_media_type(request)
        model: ServedModel = _repository(repository).resolve(name, version)
        try:
            body = await request.body()
        except HTTPException as exc:  # the body limit (413) or deadline (408) middleware
            raise ProtocolError(str(exc.detail), exc.status_code, exc.headers) from None
        # In a thread: health checks are answered meanwhile (its cost is bounded before, by
        # service.infra.admission, which refuses a JSON header of more values than a request
        # holds)
        req, query = await anyio.to_thread.run_sync(
            decode_query, body, request.headers.get(HEADER_LENGTH), model, INFER_PATH
        )
        outputs = requested_outputs(req, model_outputs(model.checkpoint))
    except ProtocolError as exc:
        return _fail(exc)
    answer = await model.predict(query)
    tensors = answer_tensors(answer)
    content, header_length = encode_response(
        response_header(model, req.id, answer),
        [(out, OUTPUTS[out], tensors[out], binary) for out, binary in outputs],
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
