"""Open Inference Protocol (KServe V2), REST: message bodies and the binary tensor data extension.

A request body is either one JSON object, or (binary extension) a JSON object of
``Inference-Header-Content-Length`` bytes followed by the raw bytes of every input tensor whose
``parameters.binary_data_size`` is set, in the order of ``inputs``. Answers take the same two
forms: an output whose ``binary_data`` parameter (default: the request's
``binary_data_output``) is true carries ``parameters.binary_data_size`` instead of ``data``,
and its bytes follow the JSON header. Binary tensors are little-endian, row-major; ``BOOL`` is
one byte per element. Decoding is ``np.frombuffer`` and vectorised checks: no per-element
Python on the binary path.

Everything here is pure (no FastAPI, no runtime): :class:`ProtocolError` carries the HTTP
status and the one-line message that the routes send as ``{"error": message}``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, JsonValue, StrictBool, StrictInt, ValidationError

from apd.checkpoint import Checkpoint
from apd.uncertainty import ScoreName
from service.codecs.inputs import InputSchema, schema_of
from service.codecs.schemas import NumSamples, Seed
from service.core.limits import Limits
from service.core.model import Answer, Query, ServedModel

HEADER_LENGTH: Final = "Inference-Header-Content-Length"
# A byte count in a header: ASCII digits only. ``str.isdigit`` also accepts superscripts and
# other scripts' digits ("²", "٣"), which ``int`` then refuses or reads as a number.
_BYTE_COUNT: Final = re.compile(r"[0-9]{1,18}")
INPUT_NAME: Final = "input"
SERVER_NAME: Final = "apd"
EXTENSIONS: Final = ("binary_tensor_data",)
PIXEL_MAX: Final = 255

# Wire datatypes: the V2 name -> little-endian NumPy dtype.
WIRE_DTYPES: Final[dict[str, np.dtype[Any]]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "INT64": np.dtype("<i8"),
    "FP32": np.dtype("<f4"),
}
Datatype = Literal["BOOL", "UINT8", "INT64", "FP32"]


class ProtocolError(Exception):
    """A request the protocol refuses: ``status`` (4xx, or 503 while starting) and a message
    naming the tensor or parameter at fault."""

    def __init__(
        self, message: str, status: int = 400, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.headers = dict(headers or {})


# ---- Message bodies (also the OpenAPI document of the V2 routes) --------------------------


class _Forbid(BaseModel):
    model_config = ConfigDict(extra="forbid")


class V2Error(BaseModel):
    error: str = Field(examples=["inputs[0].name is 'x': this model has one input, 'input'"])


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1: any size (the batch dimension)")
    parameters: dict[str, Any] | None = Field(
        default=None,
        description="The input: every datatype and shape accepted, the value range and whether "
        "it is checked; probabilities and label: the class names, when the checkpoint has them",
    )


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class InputParameters(_Forbid):
    binary_data_size: Annotated[StrictInt, Field(ge=0)] | None = Field(
        default=None, description="Bytes of this tensor in the binary part of the body"
    )


class InferInputTensor(_Forbid):
    name: str
    shape: list[Annotated[StrictInt, Field(ge=0)]]
    datatype: str
    parameters: InputParameters | None = None
    data: Any = Field(
        default=None, description="Row-major values, flat or nested; absent for binary data"
    )


class OutputParameters(_Forbid):
    binary_data: StrictBool | None = Field(
        default=None,
        description="Return this output as binary data (default: the request's binary_data_output)",
    )


class RequestedOutput(_Forbid):
    name: str
    parameters: OutputParameters | None = None


class InferParameters(_Forbid):
    num_samples: NumSamples = None
    seed: Seed = None
    score: ScoreName | None = Field(
        default=None,
        description="Anomaly score returned as anomaly_score (default: the checkpoint's)",
    )
    binary_data_output: StrictBool = Field(
        default=False, description="Outputs without their own binary_data parameter: binary"
    )


class InferRequest(_Forbid):
    id: str | None = None
    parameters: InferParameters | None = None
    inputs: list[InferInputTensor] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = Field(
        default=None, description="The outputs to return, in order (default: all)"
    )


class OutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, JsonValue] | None = None
    data: list[JsonValue] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, JsonValue] | None = None
    outputs: list[OutputTensor]


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its ``$defs`` inlined, for an OpenAPI request body."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


# ---- Requests --------------------------------------------------------------------------


def _describe(exc: ValidationError) -> str:
    """The first error of ``exc`` as ``where: problem`` (plus how many more there are)."""
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    where = ""
    for part in first["loc"]:
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
    message = f"{where or 'body'}: {first['msg']}"
    if first["type"] == "json_invalid":
        message = f"request header is not valid JSON: {first['msg']}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error(s))"
    return message


def validate_request(fields: Mapping[str, Any]) -> InferRequest:
    """An infer request from its fields already decoded (the gRPC codec's), checked as a JSON
    body is: :class:`ProtocolError` naming the first problem."""
    try:
        return InferRequest.model_validate(fields)
    except ValidationError as exc:
        raise ProtocolError(_describe(exc)) from None


def parse_request(
    body: bytes, header_length: str | None
) -> tuple[InferRequest, list[memoryview | None]]:
    """The JSON header of ``body`` and, for each input, its binary bytes (``None``: JSON data).

    ``header_length`` is the ``Inference-Header-Content-Length`` header, if any.
    """
    view = memoryview(body)
    if header_length is None:
        size = len(body)
    else:
        if not _BYTE_COUNT.fullmatch(header_length) or int(header_length) > len(body):
            raise ProtocolError(
                f"{HEADER_LENGTH} is {header_length!r}: it must be the byte length of the JSON "
                f"header, at most the body's {len(body)} bytes"
            )
        size = int(header_length)
    try:
        request = InferRequest.model_validate_json(body[:size])
    except ValidationError as exc:
        raise ProtocolError(_describe(exc)) from None
    raw: list[memoryview | None] = []
    offset = size
    for i, tensor in enumerate(request.inputs):
        n = tensor.parameters.binary_data_size if tensor.parameters else None
        if n is None:
            raw.append(None)
            continue
        if tensor.data is not None:
            raise ProtocolError(
                f"inputs[{i}] ({tensor.name!r}) has both data and binary_data_size; send one"
            )
        if offset + n > len(body):
            raise ProtocolError(
                f"inputs[{i}] ({tensor.name!r}): binary_data_size is {n} but only "
                f"{len(body) - offset} bytes of binary data remain in the body"
            )
        raw.append(view[offset : offset + n])
        offset += n
    if offset != len(body):
        raise ProtocolError(
            f"the body holds {len(body) - offset} bytes after the JSON header and the inputs' "
            f"binary_data_size; {HEADER_LENGTH} or a binary_data_size is wrong"
        )
    return request, raw


@dataclass(frozen=True)
class ModelInput:
    """What the model's one input tensor accepts: ``[N, *shape]`` or ``[N, dim]``.

    FP32 values are the model's raw units, as ``/predict`` takes them
    (:mod:`service.codecs.inputs`):
    within ``value_range`` when ``checks_range`` (pixels, ``uint8`` data), else any finite
    float32. UINT8 is accepted for ``uint8`` data (the raw values) and for float pixels in
    [0, 1] (read as ``pixel / 255``); ``uint8`` is how it is read, None when refused."""

    shape: tuple[int, ...]
    dim: int
    value_range: tuple[float, float]
    checks_range: bool
    uint8: Literal["raw", "pixel"] | None

    @property
    def integral(self) -> bool:
        """Whether FP32 values must be whole numbers (``uint8`` data: integer grey levels)."""
        return self.uint8 == "raw"

    @classmethod
    def of(cls, schema: InputSchema) -> ModelInput:
        """The input tensor of a model whose inputs are ``schema``'s."""
        if schema.convention.dtype == "uint8":
            uint8: Literal["raw", "pixel"] | None = "raw"
        else:
            uint8 = "pixel" if schema.image_mode is not None else None
        return cls(schema.shape, schema.size, schema.value_range, schema.checks_range, uint8)

    @property
    def datatypes(self) -> tuple[str, ...]:
        return ("FP32", "UINT8") if self.uint8 else ("FP32",)

    @property
    def shapes(self) -> list[list[int]]:
        """The accepted shapes, -1 for the batch dimension."""
        shapes = [[-1, *self.shape]]
        if list(self.shape) != [self.dim]:
            shapes.append([-1, self.dim])
        return shapes

    def metadata(self) -> TensorMetadata:
        return TensorMetadata(
            name=INPUT_NAME,
            datatype="FP32",
            shape=self.shapes[0],
            parameters={
                "accepted_datatypes": list(self.datatypes),
                "accepted_shapes": list(self.shapes),
                "value_range": list(self.value_range),
                "range_checked": self.checks_range,
            },
        )


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join("N" if s == -1 else str(s) for s in shape) + "]"


def decode_input(
    request: InferRequest, raw: Sequence[memoryview | None], model: ModelInput, limits: Limits
) -> NDArray[np.float32]:
    """The request's one input tensor as float32 ``(N, dim)`` in the model's raw units,
    checked: name, datatype, shape, N at most ``max_batch`` (:class:`LimitExceeded`), element
    count, finite values within the range."""
    if len(request.inputs) != 1:
        names = ", ".join(repr(t.name) for t in request.inputs)
        raise ProtocolError(
            f"inputs holds {len(request.inputs)} tensors ({names}); this model has one input, "
            f"{INPUT_NAME!r}"
        )
    tensor, data = request.inputs[0], raw[0]
    where = f"inputs[0] ({tensor.name!r})"
    if tensor.name != INPUT_NAME:
        raise ProtocolError(
            f"inputs[0].name is {tensor.name!r}: this model has one input, {INPUT_NAME!r}"
        )
    if tensor.datatype not in model.datatypes:
        accepted = " or ".join(model.datatypes)
        extra = " (UINT8 is for images and uint8 data)" if tensor.datatype == "UINT8" else ""
        raise ProtocolError(
            f"{where}: datatype is {tensor.datatype!r}; this model takes {accepted}{extra}"
        )
    shape = list(tensor.shape)
    sample = tuple(shape[1:])
    if len(shape) < 2 or sample not in (model.shape, (model.dim,)):
        accepted = " or ".join(_shape_text(s) for s in model.shapes)
        raise ProtocolError(f"{where}: shape is {shape}; this model takes {accepted}")
    n = shape[0]
    if n == 0:
        raise ProtocolError(f"{where}: shape is {shape}; send at least one example")
    limits.batch(n, where)
    count = math.prod(shape)
    dtype = WIRE_DTYPES[tensor.datatype]
    if data is not None:
        if len(data) != count * dtype.itemsize:
            raise ProtocolError(
                f"{where}: binary_data_size is {len(data)} bytes; shape {shape} of "
                f"{tensor.datatype} needs {count * dtype.itemsize}"
            )
        values = np.frombuffer(data, dtype=dtype).reshape(shape)
    else:
        values = _json_values(tensor, where, shape, count)
    if tensor.datatype == "UINT8":
        x = values.reshape(n, model.dim).astype(np.float32)
        return x / np.float32(PIXEL_MAX) if model.uint8 == "pixel" else x
    x = values.reshape(n, model.dim).astype(np.float32)  # a copy: aligned and writable
    lo, hi = model.value_range
    if model.checks_range:
        bad = ~((x >= lo) & (x <= hi))  # NaN fails both comparisons
        rule = f"finite and lie in [{lo:g}, {hi:g}]"
    else:
        bad = ~np.isfinite(x)  # float32: JSON numbers past its range are inf here
        rule = "finite float32 numbers"
    if model.integral:
        bad |= x != np.round(x)
        rule += " and whole (this model's data is uint8: grey levels 0-255, not pixel / 255)"
    if bad.any():
        first = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), shape))
        value = float(values.reshape(-1)[int(np.argmax(bad))])
        raise ProtocolError(
            f"{where}: element {list(first)} is {value}: FP32 values must be {rule} "
            f"({int(bad.sum())} bad value(s) in this request)"
        )
    return x


def _json_values(
    tensor: InferInputTensor, where: str, shape: list[int], count: int
) -> NDArray[Any]:
    if tensor.data is None:
        raise ProtocolError(f"{where}: no data and no parameters.binary_data_size")
    try:
        values = np.asarray(tensor.data)
    except (ValueError, TypeError):
        raise ProtocolError(
            f"{where}: data is not a regular array of numbers (ragged nesting?)"
        ) from None
    integers = values.dtype.kind in "iu"
    if tensor.datatype == "UINT8":
        if values.size and (not integers or int(values.min()) < 0 or int(values.max()) > PIXEL_MAX):
            raise ProtocolError(f"{where}: UINT8 data must be integers in [0, {PIXEL_MAX}]")
    elif values.size and not (integers or values.dtype.kind == "f"):
        raise ProtocolError(f"{where}: FP32 data must be numbers")
    if values.size != count or (values.ndim != 1 and list(values.shape) != shape):
        raise ProtocolError(
            f"{where}: data has shape {list(values.shape)}; shape {shape} needs {count} values, "
            "flat or nested to that shape"
        )
    return values.reshape(shape)


def parameters(request: InferRequest) -> InferParameters:
    return request.parameters if request.parameters is not None else InferParameters()


def requested_outputs(request: InferRequest, available: Sequence[str]) -> list[tuple[str, bool]]:
    """``(name, binary)`` of each output to return, in order."""
    default = parameters(request).binary_data_output
    if request.outputs is None:
        return [(name, default) for name in available]
    out: list[tuple[str, bool]] = []
    for i, output in enumerate(request.outputs):
        if output.name not in available:
            raise ProtocolError(
                f"outputs[{i}].name is {output.name!r}; this model's outputs are "
                + ", ".join(available)
            )
        if any(name == output.name for name, _ in out):
            raise ProtocolError(f"outputs[{i}]: {output.name!r} is requested twice")
        binary = output.parameters.binary_data if output.parameters else None
        out.append((output.name, default if binary is None else binary))
    return out


# ---- Answers -----------------------------------------------------------------------------


def encode_response(
    header: dict[str, Any], outputs: Sequence[tuple[str, Datatype, NDArray[Any], bool]]
) -> tuple[bytes, int | None]:
    """The body of an answer and, when some output is binary, its JSON header's length.

    ``outputs``: ``(name, datatype, array, binary)``; ``header`` gets the ``outputs`` list.
    """
    tensors: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, datatype, array, binary in outputs:
        wire = np.ascontiguousarray(array, dtype=WIRE_DTYPES[datatype])
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(wire.shape)}
        if binary:
            chunks.append(wire.tobytes())
            tensor["parameters"] = {"binary_data_size": wire.nbytes}
        else:
            tensor["data"] = wire.reshape(-1).tolist()
        tensors.append(tensor)
    # allow_nan=False: a bare NaN is not JSON (the runtime refuses non-finite answers first)
    answer = {**header, "outputs": tensors}
    text = json.dumps(answer, separators=(",", ":"), allow_nan=False).encode()
    if not chunks:
        return text, None
    return b"".join([text, *chunks]), len(text)


# ---- The model's tensors, shared by REST and gRPC ------------------------------------------

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


def model_outputs(ckpt: Checkpoint) -> list[str]:
    """The output tensors a model serves: ``data_support`` only where it has the score."""
    has_support = ckpt.data_support is not None
    return [out for out in OUTPUTS if out != "data_support" or has_support]


def model_metadata(model: ServedModel) -> ModelMetadata:
    """A model version's metadata: its input and output tensors."""
    ckpt = model.checkpoint
    meta = ckpt.meta
    classes = ckpt.spec.num_classes
    names = {"class_names": meta.input.class_names} if meta.input.class_names else None
    outputs = [
        TensorMetadata(
            name=out,
            datatype=OUTPUTS[out],
            shape=[-1, classes] if out == "probabilities" else [-1],
            parameters=names if out in ("probabilities", "label") else None,
        )
        for out in model_outputs(ckpt)
    ]
    return ModelMetadata(
        name=model.name,
        versions=[str(model.version)],
        platform=meta.format,
        inputs=[ModelInput.of(schema_of(ckpt)).metadata()],
        outputs=outputs,
    )


def decode_query(
    body: bytes, header_length: str | None, model: ServedModel, endpoint: str
) -> tuple[InferRequest, Query]:
    """An infer request's query for ``model`` (:class:`ProtocolError` if it cannot be one)."""
    request, raw = parse_request(body, header_length)
    x = decode_input(request, raw, ModelInput.of(schema_of(model.checkpoint)), model.limits)
    params = parameters(request)
    return request, Query(x, params.num_samples, params.seed, params.score, endpoint=endpoint)


def answer_tensors(answer: Answer) -> dict[str, NDArray[Any]]:
    """Every output tensor of an answer (flags as ``/predict`` and ``/anomaly-score``)."""
    summary = answer.summary
    support = {} if summary.data_support is None else {"data_support": summary.data_support}
    return support | {
        "probabilities": answer.probabilities,
        "label": summary.labels,
        "predictive_entropy": summary.predictive_entropy,
        "expected_entropy": summary.expected_entropy,
        "mutual_information": summary.mutual_information,
        "model_variance": summary.model_variance,
        "anomaly_score": answer.scores,
        "is_anomaly": answer.flags,
    }


def response_header(model: ServedModel, request_id: str | None, answer: Answer) -> dict[str, Any]:
    """An infer response's header: model, version, id and the answer's parameters."""
    header: dict[str, Any] = {"model_name": model.name, "model_version": str(model.version)}
    if request_id is not None:
        header["id"] = request_id
    header["parameters"] = {
        "num_samples": answer.num_samples,
        "score": answer.score_name.value,
        "threshold": answer.threshold,
        **({"seed": answer.seed} if answer.seed is not None else {}),
    }
    return header
