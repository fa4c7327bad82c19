"""Open Inference Protocol, gRPC: ``inference.GRPCInferenceService`` as a codec over the core.

Each RPC decodes its message into what the REST codec (:mod:`service.codecs.v2`) decodes a
JSON body into, so every check and message is the same one: an infer request's fields become
an :class:`~service.codecs.v2.InferRequest` (:func:`~service.codecs.v2.validate_request`), its
input tensor is decoded and checked by :func:`~service.codecs.v2.decode_input` (from
``raw_input_contents``, little-endian bytes, or from the typed contents: ``fp32_contents``,
``uint_contents`` for UINT8), and the answer's tensors (:func:`~service.codecs.v2.answer_tensors`)
go back as ``raw_output_contents``, as Triton sends them. The same seed gives the same numbers
as ``/predict`` and V2 REST.

Status codes (:data:`STATUS`): a client mistake is ``INVALID_ARGUMENT``; an unknown model or
version ``NOT_FOUND``; a request over a limit (``max_batch``, the message size) or refused by
admission ``RESOURCE_EXHAUSTED``; a model with no READY version ``UNAVAILABLE``; an answer not
ready by the deadline ``DEADLINE_EXCEEDED``.

An infer request reserves its memory in the worker's budget
(:class:`~service.infra.admission.MemoryBudget`) before it is decoded, and releases it when it
ends, answered, refused or cancelled. A client that cancels, or whose deadline passes, cancels
the RPC's task: the core stops its forward at the next chunk
(:meth:`~service.core.model.ServedModel.predict`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Final, NoReturn

import anyio.to_thread
import grpc
import numpy as np

import apd
from service.codecs.inputs import schema_of
from service.codecs.v2 import (
    OUTPUTS,
    SERVER_NAME,
    WIRE_DTYPES,
    InferRequest,
    ModelInput,
    ProtocolError,
    answer_tensors,
    decode_input,
    model_metadata,
    model_outputs,
    parameters,
    requested_outputs,
    response_header,
    validate_request,
)
from service.core.limits import LimitExceeded
from service.core.model import (
    Answer,
    DeadlineExceeded,
    NonFiniteAnswer,
    Query,
    ServedModel,
    UnknownScore,
)
from service.core.repository import (
    ModelNotFound,
    ModelRepository,
    ModelUnavailable,
    NoDefaultModel,
)
from service.grpc import grpc_service_pb2 as pb
from service.grpc.grpc_service_pb2_grpc import GRPCInferenceServiceServicer
from service.infra.admission import MemoryBudget, Overloaded
from service.infra.telemetry import Metrics

log = logging.getLogger("apd.service.grpc")

SERVICE: Final = "inference.GRPCInferenceService"
INFER_ENDPOINT: Final = f"/{SERVICE}/ModelInfer"
# The typed contents field of each wire datatype (the protocol's; UINT8 is in uint_contents).
CONTENTS: Final[dict[str, str]] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
}
_ALL_CONTENTS: Final = tuple(pb.InferTensorContents.DESCRIPTOR.fields_by_name)
# Memory an infer request may hold besides its forward, per byte of its message: the message,
# the input decoded from it (typed contents to an array, then the float32 copy checked).
DECODE_BYTES_PER_MESSAGE_BYTE: Final = 4

# The core's refusals: their status code (the REST codec's table is service.api.errors).
STATUS: Final[dict[type[Exception], grpc.StatusCode]] = {
    UnknownScore: grpc.StatusCode.INVALID_ARGUMENT,
    NoDefaultModel: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    ModelUnavailable: grpc.StatusCode.UNAVAILABLE,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    NonFiniteAnswer: grpc.StatusCode.INTERNAL,
}
# A ProtocolError's HTTP status as a gRPC code.
_HTTP_STATUS: Final[dict[int, grpc.StatusCode]] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str] | None:
    """The status code and message of a refusal, or None for an unexpected error."""
    if isinstance(exc, ProtocolError):
        return _HTTP_STATUS.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT), exc.message
    if isinstance(exc, LimitExceeded):
        code = grpc.StatusCode.RESOURCE_EXHAUSTED if exc.too_large else None
        return code or grpc.StatusCode.INVALID_ARGUMENT, exc.message
    if isinstance(exc, Overloaded):
        return STATUS[Overloaded], str(exc.detail)
    for kind, code in STATUS.items():
        if isinstance(exc, kind):
            return code, str(exc)
    return None


# ---- Messages to the REST codec's values, and back ------------------------------------------


def parameter_value(p: pb.InferParameter) -> bool | int | str | float | None:
    choice = p.WhichOneof("parameter_choice")
    return None if choice is None else getattr(p, choice)


def parameter_message(value: object) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    return pb.InferParameter(string_param=str(value))


def _parameters(params: Mapping[str, pb.InferParameter]) -> dict[str, Any] | None:
    return {k: parameter_value(v) for k, v in params.items()} if params else None


def _input_data(
    i: int, tensor: pb.ModelInferRequest.InferInputTensor, raw: bool
) -> np.ndarray[Any, Any] | None:
    """The typed contents of input ``i`` as an array (None: none, or a datatype the codec
    refuses by name); :class:`ProtocolError` when they are in the wrong field or beside raw
    contents."""
    where = f"inputs[{i}] ({tensor.name!r})"
    filled = [f for f in _ALL_CONTENTS if len(getattr(tensor.contents, f))]
    if raw and filled:
        raise ProtocolError(
            f"{where}: has contents and raw_input_contents; send one (raw_input_contents is "
            "for every input or for none)"
        )
    if raw:
        return None
    field = CONTENTS.get(tensor.datatype)
    if field is None:
        return None  # decode_input names the datatype
    wrong = [f for f in filled if f != field]
    if wrong:
        raise ProtocolError(
            f"{where}: {tensor.datatype} values go in contents.{field}, not contents.{wrong[0]}"
        )
    if not filled:
        raise ProtocolError(f"{where}: no contents.{field} and no raw_input_contents")
    # FP32 as float32; integers wide (uint32 as sent), so that the codec sees values past 255.
    # fromiter: 29 ms for 256 x 784 values, against 46 ms for asarray (raw contents: 0.1 ms)
    values = getattr(tensor.contents, field)
    dtype = np.float32 if tensor.datatype == "FP32" else np.int64
    return np.fromiter(values, dtype=dtype, count=len(values))


def decode_request(
    request: pb.ModelInferRequest,
) -> tuple[InferRequest, list[memoryview | None]]:
    """The REST codec's request and raw inputs for a ``ModelInferRequest``."""
    raw_contents = request.raw_input_contents
    if raw_contents and len(raw_contents) != len(request.inputs):
        raise ProtocolError(
            f"raw_input_contents holds {len(raw_contents)} entries for {len(request.inputs)} "
            "inputs; send one per input, in order, or use contents"
        )
    inputs = []
    for i, t in enumerate(request.inputs):
        inputs.append(
            {
                "name": t.name,
                "shape": list(t.shape),
                "datatype": t.datatype,
                "parameters": _parameters(t.parameters),
                "data": _input_data(i, t, bool(raw_contents)),
            }
        )
    outputs = [{"name": o.name, "parameters": _parameters(o.parameters)} for o in request.outputs]
    req = validate_request(
        {
            "id": request.id or None,
            "parameters": _parameters(request.parameters),
            "inputs": inputs,
            "outputs": outputs or None,
        }
    )
    raw: list[memoryview | None] = [memoryview(b) for b in raw_contents] or [None] * len(inputs)
    return req, raw


def decode_query(request: pb.ModelInferRequest, model: ServedModel) -> tuple[InferRequest, Query]:
    """A ``ModelInferRequest``'s query for ``model`` (:class:`ProtocolError` if it cannot be
    one); the caller adds its deadline."""
    req, raw = decode_request(request)
    x = decode_input(req, raw, ModelInput.of(schema_of(model.checkpoint)), model.limits)
    params = parameters(req)
    return req, Query(x, params.num_samples, params.seed, params.score, endpoint=INFER_ENDPOINT)


def encode_response(
    model: ServedModel, request_id: str | None, answer: Answer, outputs: Sequence[str]
) -> pb.ModelInferResponse:
    """The answer's ``outputs`` as ``raw_output_contents``, with the REST answer's header."""
    header = response_header(model, request_id, answer)
    response = pb.ModelInferResponse(
        model_name=header["model_name"],
        model_version=header["model_version"],
        id=header.get("id", ""),
    )
    for key, value in header["parameters"].items():
        response.parameters[key].CopyFrom(parameter_message(value))
    tensors = answer_tensors(answer)
    for name in outputs:
        datatype = OUTPUTS[name]
        wire = np.ascontiguousarray(tensors[name], dtype=WIRE_DTYPES[datatype])
        response.outputs.add(name=name, datatype=datatype, shape=list(wire.shape))
        response.raw_output_contents.append(wire.tobytes())
    return response


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> NoReturn:
    """End the RPC with the status of refusal ``exc``; an unexpected error is raised on
    (gRPC answers UNKNOWN and logs it)."""
    refusal = status_of(exc)
    if refusal is None:
        raise exc
    if refusal[0] is grpc.StatusCode.INTERNAL:
        log.error("%s: %s", INFER_ENDPOINT, refusal[1])
    await context.abort(*refusal)
    raise AssertionError("context.abort returned")


def _client(peer: str) -> str:
    """The client's address in a gRPC peer (``ipv4:127.0.0.1:5555``, ``ipv6:[::1]:5555``)."""
    return peer.rsplit(":", 1)[0]


# ---- The service ------------------------------------------------------------------------


class InferenceServicer(GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over one worker's repository and memory budget."""

    def __init__(
        self,
        repository: ModelRepository,
        budget: MemoryBudget,
        metrics: Metrics,
    ) -> None:
        self.repository = repository
        self.budget = budget
        self.metrics = metrics

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.repository.ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        # binary_tensor_data is REST's extension: gRPC tensors are always bytes.
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=apd.__version__)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        try:
            self.repository.resolve(request.name, request.version or None)
        except ModelUnavailable:
            return pb.ModelReadyResponse(ready=False)
        except ModelNotFound as exc:
            await _abort(context, exc)
        return pb.ModelReadyResponse(ready=True)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        try:
            meta = model_metadata(self.repository.resolve(request.name, request.version or None))
        except (ModelNotFound, ModelUnavailable) as exc:
            await _abort(context, exc)
        response = pb.ModelMetadataResponse(
            name=meta.name, versions=meta.versions, platform=meta.platform
        )
        for t in meta.inputs:
            response.inputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        for t in meta.outputs:
            response.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        return response

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        if request.repository_name:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no repository named {request.repository_name!r}: this server has one; leave "
                "repository_name empty",
            )
        response = pb.RepositoryIndexResponse()
        for row in self.repository.index(ready_only=request.ready):
            response.models.add(
                name=row.name, version=str(row.version), state=row.state.value, reason=row.reason
            )
        return response

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        self.metrics.requests_in_flight.inc()
        try:
            return await self._infer(request, context)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except BaseException:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        finally:
            self.metrics.requests_in_flight.dec()
            self.metrics.requests.labels(
                endpoint=INFER_ENDPOINT, method="GRPC", status=code.name
            ).inc()
            self.metrics.request_duration.labels(endpoint=INFER_ENDPOINT).observe(
                time.perf_counter() - start
            )

    async def _infer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        try:
            model = self.repository.resolve(request.model_name, request.model_version or None)
            held = self._cost(request, model)
            await self.budget.acquire(held, "request", _client(context.peer()))
        except Exception as exc:
            await _abort(context, exc)
        try:
            req, query = await anyio.to_thread.run_sync(decode_query, request, model)
            outputs = [n for n, _ in requested_outputs(req, model_outputs(model.checkpoint))]
            answer = await model.predict(replace(query, deadline=deadline))
            return encode_response(model, req.id, answer, outputs)
        except Exception as exc:
            await _abort(context, exc)
        finally:
            self.budget.release(held)

    def _cost(self, request: pb.ModelInferRequest, model: ServedModel) -> int:
        """Memory this request may hold while it is served: its message, its input decoded,
        and the forward's working set for the batch it declares (at most ``max_batch``)."""
        declared = request.inputs[0].shape[:1] if request.inputs else []
        batch = min(model.limits.max_batch, max(1, declared[0] if declared else 1))
        size = request.ByteSize()
        return size * DECODE_BYTES_PER_MESSAGE_BYTE + model.posterior.peak_bytes(batch)
