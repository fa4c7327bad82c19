"""Request and response bodies of the HTTP API (``docs/api.md``): the OpenAPI contract.

Field names named there are fixed. Inputs are validated here, once, with errors whose
``loc`` and message name the image and pixel at fault: the structure first (each image is 784
floats or 28 rows of 28), then the types (JSON numbers only), then the values (finite, in
[0, 1]). JSON ``NaN``/``Infinity`` literals, which Python's JSON parser accepts, are rejected
as non-finite. Limits that depend on the settings (batch size, ``num_samples`` above the
configured maximum) are checked by the routes.

Parsing a batch of 64 images with ``json.loads`` and checking its 50,000 pixels one Python
object at a time takes about 10 ms, more than the forward it feeds. The inference routes read
their bodies with :func:`parse_json_body` instead (about 2 ms,
``benchmarks/results/json_path.md``): orjson parses, and a well-formed batch is checked whole
with NumPy (:class:`CheckedImages`), which the models then accept as it is. Anything that
check refuses goes through the per-pixel validation above, so every error is the one that
validation gives: the same message, ``loc`` and type.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Final, Self

import numpy as np
import orjson
from numpy.typing import NDArray
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    JsonValue,
    PrivateAttr,
    StrictFloat,
    StrictInt,
    Tag,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from apd.uncertainty import ScoreName
from service.examples import MNIST_TEST_0_LABEL, mnist_example
from service.posterior_pool import MAX_SEED

IMAGE_SIDE: Final = 28
IMAGE_PIXELS: Final = IMAGE_SIDE * IMAGE_SIDE
MAX_NUM_SAMPLES: Final = 1000

_EXAMPLE_IMAGE: list[JsonValue] = [*mnist_example()]

Pixel = Annotated[StrictFloat, Field(json_schema_extra={"minimum": 0.0, "maximum": 1.0})]
FlatImage = Annotated[
    list[Pixel],
    Field(min_length=IMAGE_PIXELS, max_length=IMAGE_PIXELS, title="Flat image (784 floats)"),
]
ImageRow = Annotated[list[Pixel], Field(min_length=IMAGE_SIDE, max_length=IMAGE_SIDE)]
NestedImage = Annotated[
    list[ImageRow],
    Field(min_length=IMAGE_SIDE, max_length=IMAGE_SIDE, title="Nested image (28x28 floats)"),
]


def _image_form(value: Any) -> str | None:
    """Which form an image takes, so that errors come from that form alone."""
    if isinstance(value, list):
        if len(value) == IMAGE_PIXELS:
            return "flat"
        if len(value) == IMAGE_SIDE:
            return "nested"
    return None


Image = Annotated[
    Annotated[FlatImage, Tag("flat")] | Annotated[NestedImage, Tag("nested")],
    Discriminator(_image_form),
]


def _integral(value: Any) -> Any:
    """JSON Schema's ``integer`` includes ``7.0``: accept integral floats as ints (strict
    otherwise: no strings, no booleans, no ``7.5``)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


NumSamples = Annotated[
    Annotated[StrictInt, Field(ge=1, le=MAX_NUM_SAMPLES), BeforeValidator(_integral)] | None,
    Field(
        description="Posterior networks to average over (K). Default: the checkpoint's "
        "(see GET /v1/model); the server's maximum may be lower than 1000.",
        examples=[100],
    ),
]
Seed = Annotated[
    Annotated[StrictInt, Field(ge=0, le=MAX_SEED), BeforeValidator(_integral)] | None,
    Field(
        description="Makes the answer reproducible: the same seed, num_samples and inputs "
        "against the same checkpoint give the same numbers on any worker or replica. "
        "Without it the networks are drawn at random from the server's shared pool.",
        examples=[7],
    ),
]


class CheckedImages(list[Any]):
    """A batch of images checked whole by :func:`parse_json_body`: ``pixels``, float32
    ``(N, 784)``, and the images as its rows. The parsed JSON lists are let go (a Python float
    takes 32 bytes in a list, a float32 pixel 4). Only that function builds one; the request
    models accept it without checking each pixel again."""

    def __init__(self, pixels: NDArray[np.float32]) -> None:
        super().__init__(pixels)
        self.pixels = pixels


_BATCH_SHAPES: Final = ((IMAGE_PIXELS,), (IMAGE_SIDE, IMAGE_SIDE))
# JSON number and array syntax. Deleting these bytes from a body leaves its keys, strings and
# literals (and exponents' ``e``): a few bytes to search for ``true``/``false``, not 400 kB.
_NUMERIC_BYTES: Final = b"0123456789.,[]+- \t\r\n"


def _may_hold_bool(raw: bytes) -> bool:
    """Whether a JSON ``true``/``false`` literal may occur in ``raw`` (never a false "no")."""
    rest = raw.translate(None, _NUMERIC_BYTES)
    return b"true" in rest or b"false" in rest


def _check_batch(raw: bytes, inputs: Any) -> CheckedImages | None:
    """``inputs`` as :class:`CheckedImages` if it is a non-empty list of images of one form
    (all flat or all nested) whose pixels are JSON numbers in [0, 1]; else None.

    NumPy reads ``true``/``false`` as 1.0/0.0, so a body holding either literal anywhere is
    left to the per-pixel path (no valid request holds one). ``None`` or a string among the
    pixels gives an object or string array, ragged images a ValueError: all refused here.
    """
    if not isinstance(inputs, list) or not inputs or _may_hold_bool(raw):
        return None
    try:
        batch = np.array(inputs)
    except (ValueError, TypeError, OverflowError, RecursionError):
        return None
    if batch.dtype.kind not in "iuf" or batch.shape[1:] not in _BATCH_SHAPES:
        return None
    pixels = batch.reshape(len(inputs), IMAGE_PIXELS)
    if not (pixels.min() >= 0 and pixels.max() <= 1):  # False for NaN too
        return None
    return CheckedImages(pixels.astype(np.float32))


def parse_json_body(raw: bytes) -> Any:
    """The JSON value of a request body, with its ``inputs`` checked whole when they are valid.

    orjson parses; valid ``inputs`` become :class:`CheckedImages`. Any other body is parsed
    again by Python's parser, whose answer is the contract (orjson reads integers past 2**64
    as floats, refuses ``NaN``/``Infinity`` and byte order marks): its error is FastAPI's 422
    ``json_invalid``, and its value goes to the request model's per-pixel validation, which
    says which image and pixel is wrong, and how.
    """
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)
    if isinstance(value, dict):
        checked = _check_batch(raw, value.get("inputs"))
        if checked is not None:
            value["inputs"] = checked
            return value
    return json.loads(raw)


class _Forbid(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _error(
    kind: str, message: str, loc: tuple[int | str, ...], offending: Any, **ctx: Any
) -> ValidationError:
    return ValidationError.from_exception_data(
        "inputs",
        [
            InitErrorDetails(
                type=PydanticCustomError(kind, message, ctx or None),
                loc=loc,
                input=offending,
            )
        ],
    )


class _ImageBatch(_Forbid):
    """Shared ``inputs`` field and its validation."""

    inputs: list[Image] = Field(
        min_length=1,
        description="Images, each a flat list of 784 floats or a 28x28 nested list, "
        "pixels in [0, 1] (pixel / 255), white strokes on black. At most the server's "
        "max_batch images (see GET /v1/model; 413 above it).",
    )
    _pixels: NDArray[np.float32] = PrivateAttr()

    @field_validator("inputs", mode="wrap")
    @classmethod
    def _check_structure(cls, value: Any, check_items: ValidatorFunctionWrapHandler) -> Any:
        """Name the image whose shape is wrong, before the per-element type checks (none for
        a batch that :func:`parse_json_body` checked whole)."""
        if isinstance(value, CheckedImages):
            return value
        if not isinstance(value, list):
            return check_items(value)  # pydantic's own error: "Input should be a valid list"
        for i, image in enumerate(value):
            if not isinstance(image, list):
                raise _error(
                    "image_type",
                    "inputs[{index}] must be a list of 784 floats or 28 lists of 28 floats, "
                    "not {got}",
                    (i,),
                    image,
                    index=i,
                    got=type(image).__name__,
                )
            if len(image) == IMAGE_PIXELS:
                continue
            if len(image) == IMAGE_SIDE and any(isinstance(r, list) for r in image):
                for j, row in enumerate(image):
                    if not isinstance(row, list):
                        raise _error(
                            "image_shape",
                            "inputs[{index}][{row}] must be a row of 28 floats, not {got}",
                            (i, j),
                            row,
                            index=i,
                            row=j,
                            got=type(row).__name__,
                        )
                    if len(row) != IMAGE_SIDE:
                        raise _error(
                            "image_shape",
                            "inputs[{index}][{row}] has {n} values; each of the 28 rows needs 28",
                            (i, j),
                            row,
                            index=i,
                            row=j,
                            n=len(row),
                        )
                continue
            raise _error(
                "image_shape",
                "inputs[{index}] has {n} items; an image is 784 floats or 28 rows of 28 floats",
                (i,),
                image,
                index=i,
                n=len(image),
            )
        return check_items(value)

    @model_validator(mode="after")
    def _check_pixels(self) -> Self:
        """Finite and in [0, 1]; keeps the batch as a float32 array ``(N, 784)``."""
        if isinstance(self.inputs, CheckedImages):
            self._pixels = self.inputs.pixels
            return self
        pixels = np.empty((len(self.inputs), IMAGE_PIXELS), dtype=np.float64)
        for i, image in enumerate(self.inputs):
            pixels[i] = np.asarray(image, dtype=np.float64).reshape(IMAGE_PIXELS)
        finite = np.isfinite(pixels)
        bad = ~finite | (pixels < 0.0) | (pixels > 1.0)
        if bad.any():
            i, p = (int(v) for v in np.argwhere(bad)[0])
            nested = len(self.inputs[i]) == IMAGE_SIDE
            loc: tuple[int | str, ...] = (
                ("inputs", i, p // IMAGE_SIDE, p % IMAGE_SIDE) if nested else ("inputs", i, p)
            )
            where = "".join(f"[{part}]" for part in loc[1:])
            value = float(pixels[i, p])
            total = int(bad.sum())
            if not finite[i, p]:
                raise _error(
                    "finite_number",
                    "inputs{where} is {value}: pixels must be finite numbers "
                    "({total} bad value(s) in this request)",
                    loc,
                    value,
                    where=where,
                    value=str(value),
                    total=total,
                )
            raise _error(
                "pixel_range",
                "inputs{where} is {value}: pixels must lie in [0, 1] (pixel / 255) "
                "({total} bad value(s) in this request)",
                loc,
                value,
                where=where,
                value=value,
                total=total,
            )
        self._pixels = pixels.astype(np.float32)
        return self

    @property
    def pixels(self) -> NDArray[np.float32]:
        """The validated images as float32 ``(N, 784)``."""
        return self._pixels


class PredictRequest(_ImageBatch):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"inputs": [_EXAMPLE_IMAGE], "num_samples": 100, "seed": 7},
                {"inputs": [_EXAMPLE_IMAGE]},
            ]
        }
    )

    num_samples: NumSamples = None
    seed: Seed = None


class AnomalyScoreRequest(_ImageBatch):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "inputs": [_EXAMPLE_IMAGE],
                    "num_samples": 100,
                    "seed": 7,
                    "score": "mutual_information",
                }
            ]
        }
    )

    num_samples: NumSamples = None
    seed: Seed = None
    score: ScoreName | None = Field(
        default=None,
        description="Anomaly score to report. Default: the checkpoint's calibrated default.",
        examples=["mutual_information"],
    )


# The examples are the shipped model's real answers (models/mnist-fcnn1) to the request
# examples (the first MNIST test image, num_samples 100, seed 7), numbers to 4 significant
# digits; tests/test_api_doc.py answers the request with that checkpoint and compares.
_SHIPPED_SHA256: Final = "4b578f2ea54126d05d92be65567d8d296817677c103b9536795aae8ba900ba35"
_SHIPPED_THRESHOLD: Final = 0.23540170376774533  # mutual_information, 5% FPR


class ModelRef(BaseModel):
    id: str = Field(examples=["mnist-fcnn1"])
    version: str = Field(examples=["2026.11.23-fcnn1"])
    checkpoint_sha256: str = Field(examples=[_SHIPPED_SHA256])


class Uncertainty(BaseModel):
    predictive_entropy: float = Field(description="H[mean p] in nats (total uncertainty)")
    expected_entropy: float = Field(description="mean over networks of H[p_k] (aleatoric)")
    mutual_information: float = Field(description="their difference (epistemic; BALD)")
    model_variance: float = Field(
        description="mean over classes of the variance of p_k(c|x) across the K networks"
    )


class AnomalyFlag(BaseModel):
    score: float
    is_anomaly: bool = Field(description="score > threshold")
    threshold: float
    score_name: ScoreName


class Prediction(BaseModel):
    label: int = Field(ge=0, examples=[MNIST_TEST_0_LABEL])
    probabilities: list[float] = Field(
        description="Posterior predictive: the mean of the K networks' softmax (sums to 1)"
    )
    uncertainty: Uncertainty
    anomaly: AnomalyFlag


_EXAMPLE_MODEL: dict[str, JsonValue] = {
    "id": "mnist-fcnn1",
    "version": "2026.11.23-fcnn1",
    "checkpoint_sha256": _SHIPPED_SHA256,
}
_EXAMPLE_PREDICTION: dict[str, JsonValue] = {
    "label": MNIST_TEST_0_LABEL,
    "probabilities": [
        1.808e-07,
        7.256e-08,
        1.365e-05,
        0.0001174,
        2.315e-10,
        5.497e-07,
        4.592e-10,
        0.9999,
        3.882e-07,
        5.933e-06,
    ],
    "uncertainty": {
        "predictive_entropy": 0.001442,
        "expected_entropy": 0.001014,
        "mutual_information": 0.000428,
        "model_variance": 1.443e-07,
    },
    "anomaly": {
        "score": 0.000428,
        "is_anomaly": False,
        "threshold": _SHIPPED_THRESHOLD,
        "score_name": "mutual_information",
    },
}


class PredictResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": _EXAMPLE_MODEL,
                    "num_samples": 100,
                    "seed": 7,
                    "predictions": [_EXAMPLE_PREDICTION],
                }
            ]
        }
    )

    model: ModelRef
    num_samples: int = Field(description="K, the posterior networks averaged over")
    seed: int | None = Field(description="The request's seed; null when drawn from the pool")
    predictions: list[Prediction] = Field(description="One per input, in order")


class AnomalyScoreResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "score_name": "mutual_information",
                    "threshold": _SHIPPED_THRESHOLD,
                    "target_fpr": 0.05,
                    "scores": [0.000428],
                    "is_anomaly": [False],
                    "num_samples": 100,
                    "seed": 7,
                    "model": _EXAMPLE_MODEL,
                }
            ]
        }
    )

    score_name: ScoreName
    threshold: float
    target_fpr: float = Field(description="False-positive rate the threshold was set for")
    scores: list[float]
    is_anomaly: list[bool]
    num_samples: int
    seed: int | None
    model: ModelRef


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class Readiness(BaseModel):
    status: str = Field(description="'ready' or 'starting'", examples=["ready"])
    cache: str = Field(description="'redis' or 'memory'", examples=["redis"])
    redis: str = Field(
        description="'ok', 'degraded' (unreachable; answering from the in-process cache) "
        "or 'disabled' (no Redis URL configured)",
        examples=["ok"],
    )
    degraded: bool
    pool_networks: int = Field(description="Networks in the shared pool held in memory")
    checkpoint_sha256: str | None = None


class ValidationIssue(BaseModel):
    type: str = Field(examples=["pixel_range"])
    loc: list[str | int] = Field(examples=[["body", "inputs", 0, 5]])
    msg: str
    ctx: dict[str, Any] | None = None


class ValidationErrorBody(BaseModel):
    """A 422: FastAPI's ``detail`` list (offending inputs not echoed, at most 20) and one line
    that says what is wrong."""

    detail: list[ValidationIssue]
    message: str = Field(
        examples=[
            "inputs[0][5] is 1.5: pixels must lie in [0, 1] (pixel / 255) (1 bad value(s) "
            "in this request)"
        ]
    )


class ErrorMessage(BaseModel):
    detail: str = Field(examples=["request body is larger than the limit of 8388608 bytes"])


class Limits(BaseModel):
    max_batch: int
    max_num_samples: int
    max_body_bytes: int
    networks_per_block: int


class AnomalyInfo(BaseModel):
    default_score: ScoreName
    target_fpr: float
    thresholds: dict[ScoreName, float]
    calibration_set: str
    calibration_size: int
    calibration_num_samples: int


class ModelInfo(BaseModel):
    id: str
    version: str
    sha256: str
    checkpoint_bytes: int
    target: dict[str, Any] = Field(description="Target architecture: arch, layer sizes, ...")
    parameter_count: int = Field(description="Weights in one posterior network")
    generator: dict[str, Any] = Field(description="Generator shape and design")
    generator_parameter_count: int
    input: dict[str, Any] = Field(description="Input convention: shape, range, scale")
    default_num_samples: int
    anomaly: AnomalyInfo
    provenance: dict[str, Any] = Field(
        description="Data, sampler settings, distillation settings, code revision"
    )
    metrics: dict[str, Any] = Field(description="Evaluation figures stored in the checkpoint")
    backend: str
    pool_size: int
    limits: Limits
