"""Request and response bodies of the HTTP API (``docs/api.md``): the OpenAPI contract.

Field names named there are fixed. The models are the same for every checkpoint; ``inputs``
is validated with the served model's input schema (:mod:`service.codecs.inputs`), once, with errors
whose ``loc`` and message name the example and the value at fault, and the OpenAPI document
states that model's shape, range and classes (``service.api.app``). Limits that depend on the
settings (batch size, ``num_samples`` above the configured maximum) are checked by the routes.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import numpy as np
from fastapi import UploadFile
from numpy.typing import NDArray
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    StrictInt,
    ValidatorFunctionWrapHandler,
    field_validator,
)

from apd.uncertainty import ScoreName
from service.codecs.examples import MNIST_TEST_0_LABEL
from service.codecs.inputs import CheckedInputs, served_input
from service.core.limits import MAX_NUM_SAMPLES, MAX_SEED


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


class _Forbid(BaseModel):
    model_config = ConfigDict(extra="forbid")


ModelName = Annotated[
    str | None,
    Field(
        default=None,
        min_length=1,
        max_length=128,
        description="The model to ask (GET /v1/models). Default: the server's default model.",
        examples=["mnist-fcnn1"],
    ),
]
ModelVersion = Annotated[
    str | None,
    Field(
        default=None,
        min_length=1,
        max_length=20,
        description="The model's repository version (a positive integer, as a string). "
        "Default: its highest READY version.",
        examples=["1"],
    ),
]


class _InputBatch(_Forbid):
    """Shared ``inputs``, ``model`` and ``version`` fields and their validation."""

    model: ModelName = None
    version: ModelVersion = None

    inputs: Annotated[list[Any], Field(min_length=1)] = Field(
        description="Examples of the served model's input shape (GET /v1/model, input), each "
        "a flat list of its values or a list nested to its shape, in the model's raw units. "
        "At most the server's max_batch examples (413 above it).",
        json_schema_extra={"items": {"description": "One example (see GET /v1/model)"}},
    )

    @field_validator("inputs", mode="wrap")
    @classmethod
    def _check_examples(cls, value: Any, check_list: ValidatorFunctionWrapHandler) -> Any:
        """Each example checked against the served model's input schema, unless
        :func:`~service.codecs.inputs.parse_json_body` checked the batch whole."""
        if isinstance(value, CheckedInputs):
            return value
        if not isinstance(value, list) or not value:
            return check_list(value)  # pydantic's own errors: not a list, empty
        return served_input().validate(value)

    @property
    def raw(self) -> NDArray[np.float32]:
        """The validated examples, float32 ``(N, D)`` in the model's raw units."""
        inputs = self.inputs
        assert isinstance(inputs, CheckedInputs)
        return inputs.raw


class PredictRequest(_InputBatch):
    num_samples: NumSamples = None
    seed: Seed = None


class AnomalyScoreRequest(_InputBatch):
    num_samples: NumSamples = None
    seed: Seed = None
    score: ScoreName | None = Field(
        default=None,
        description="Anomaly score to report. Default: the checkpoint's calibrated default.",
        examples=["mutual_information"],
    )


class ImageForm(_Forbid):
    """``POST /predict/image``: image files and the fields of ``/predict`` (form fields)."""

    files: list[UploadFile] = Field(
        min_length=1,
        description="Image files (PNG, JPEG, ... as Pillow reads them), each converted with the "
        "checkpoint's convention: to its image mode, resized to its shape (bilinear), in its "
        "raw units. At most the server's max_batch files (413 above it).",
    )
    num_samples: Annotated[int, Field(ge=1, le=MAX_NUM_SAMPLES)] | None = Field(
        default=None, description="As for /predict"
    )
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = Field(
        default=None, description="As for /predict"
    )
    model: ModelName = None
    version: ModelVersion = None


def request_examples(example: JsonValue) -> dict[str, list[JsonValue]]:
    """The request models' OpenAPI examples for one example input of the served model."""
    return {
        "PredictRequest": [
            {"inputs": [example], "num_samples": 100, "seed": 7},
            {"inputs": [example]},
        ],
        "AnomalyScoreRequest": [
            {"inputs": [example], "num_samples": 100, "seed": 7, "score": "mutual_information"}
        ],
    }


# The answer examples are the shipped model's real answers (models/mnist-fcnn1) to the request
# examples (the first MNIST test image, num_samples 100, seed 7), numbers to 4 significant
# digits; tests/test_api_doc.py answers the request with that checkpoint and compares. The
# OpenAPI document shows them when that checkpoint is served (service/api/app.py).
SHIPPED_SHA256: Final = "85cfae5cc72fba9a63e6d5f9903054af8592f0b98b25c9889c6f7a0ab06f3567"
_SHIPPED_THRESHOLD: Final = 0.2661091959046892  # mutual_information, 5% FPR


class ModelRef(BaseModel):
    name: str = Field(examples=["mnist-fcnn1"], description="The model's name in the repository")
    repository_version: str = Field(examples=["1"], description="Its version in the repository")
    id: str = Field(examples=["mnist-fcnn1"])
    version: str = Field(examples=["2026.12.06-2308"])
    checkpoint_sha256: str = Field(examples=[SHIPPED_SHA256])


class Uncertainty(BaseModel):
    predictive_entropy: float = Field(description="H[mean p] in nats (total uncertainty)")
    expected_entropy: float = Field(description="mean over networks of H[p_k] (aleatoric)")
    mutual_information: float = Field(description="their difference (epistemic; BALD)")
    model_variance: float = Field(
        description="mean over classes of the variance of p_k(c|x) across the K networks"
    )
    data_support: float | None = Field(
        default=None,
        exclude_if=lambda v: v is None,
        description="How far the input lies from the training inputs (a squared Mahalanobis "
        "distance per dimension: about 1 for inputs like them, larger farther); absent when "
        "the checkpoint has no data-support fit",
    )


class AnomalyFlag(BaseModel):
    score: float
    is_anomaly: bool = Field(description="score > threshold")
    threshold: float
    score_name: ScoreName


class Prediction(BaseModel):
    label: int = Field(ge=0, examples=[MNIST_TEST_0_LABEL])
    label_name: str | None = Field(
        default=None,
        exclude_if=lambda name: name is None,
        description="The class name of label, from the checkpoint; absent when it names none",
    )
    probabilities: list[float] = Field(
        description="Posterior predictive: the mean of the K networks' softmax, recalibrated "
        "by the checkpoint's map when it has one (the top class's probability mapped, the "
        "others rescaled in proportion; argmax kept, sums to 1)"
    )
    uncertainty: Uncertainty
    anomaly: AnomalyFlag


_EXAMPLE_MODEL: dict[str, JsonValue] = {
    "name": "mnist-fcnn1",
    "repository_version": "1",
    "id": "mnist-fcnn1",
    "version": "2026.12.06-2308",
    "checkpoint_sha256": SHIPPED_SHA256,
}
_EXAMPLE_PREDICTION: dict[str, JsonValue] = {
    "label": MNIST_TEST_0_LABEL,
    "label_name": str(MNIST_TEST_0_LABEL),
    "probabilities": [
        9.273e-08,
        3.03e-08,
        1.775e-05,
        7.881e-05,
        2.17e-11,
        1.747e-07,
        1.255e-10,
        0.9999,
        1.081e-07,
        3.012e-06,
    ],
    "uncertainty": {
        "predictive_entropy": 0.001379,
        "expected_entropy": 0.001075,
        "mutual_information": 0.0003042,
        "model_variance": 3.649e-08,
        "data_support": 0.7305,
    },
    "anomaly": {
        "score": 0.2968,
        "is_anomaly": False,
        "threshold": 1.0,
        "score_name": "combined",
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
                    "scores": [0.0003042],
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


class ErrorBody(BaseModel):
    """Every error of the service's own routes: FastAPI's ``detail`` list (a 422's first 20
    problems, offending inputs not echoed; one item for any other status) and one line that
    says what is wrong and what to do."""

    detail: list[ValidationIssue]
    message: str = Field(
        examples=[
            "inputs[0][5] is 1.5: pixels must lie in [0, 1] (pixel / 255) (1 bad value(s) "
            "in this request)"
        ]
    )


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
    calibration_size: int = Field(description="Held-out inputs the thresholds were set on")
    calibration_num_samples: int
    flagged_on_calibration: dict[ScoreName, int] = Field(
        description="Calibration inputs above each threshold (empty for older checkpoints)"
    )
    fpr_interval: dict[ScoreName, tuple[float, float]] = Field(
        description="95 % Clopper-Pearson interval of each threshold's false-positive rate, "
        "from calibration_size inputs: wide when they were few"
    )
    combined: dict[str, Any] | None = Field(
        description="The combined flag's rule: the epistemic score and data_support, each "
        "above its threshold here at the per-test rate (null without a data-support fit)"
    )
    data_support: dict[str, Any] | None = Field(
        description="The data-support fit: rank, residual variance, centre, training rows"
    )


class InputInfo(BaseModel):
    """One example of the model's input (the checkpoint's input convention)."""

    shape: list[int] = Field(
        description="Its shape: [D] features, [H, W] or [C, H, W] images", examples=[[28, 28]]
    )
    size: int = Field(description="Values in it: the length of its flat form", examples=[784])
    dtype: Literal["uint8", "float32"] = Field(description="The raw data's type")
    value_range: tuple[float, float] = Field(
        description="uint8 data: [0, 255]; float pixels: [0, 1]; float features: the training "
        "data's min and max"
    )
    range_checked: bool = Field(
        description="true: values outside value_range are refused (pixels, uint8 data); "
        "false: any finite float32 is an input (value_range describes the training data)"
    )
    scale: float | list[float] = Field(
        description="Preprocessing, applied by the server: the network sees "
        "raw * scale + shift (one number, or one per value of the flat form)"
    )
    shift: float | list[float]
    image_mode: Literal["L", "RGB"] | None = Field(
        description="'L' (grayscale) or 'RGB' when image files can stand for examples "
        "(POST /predict/image); null for other inputs"
    )
    data_sha256: str | None = Field(description="Fingerprint of the training data")
    description: str


class ModelInfo(BaseModel):
    name: str = Field(description="The model's name in the repository")
    repository_version: str = Field(description="Its version in the repository")
    id: str
    version: str
    sha256: str
    checkpoint_bytes: int
    target: dict[str, Any] = Field(description="Target architecture: arch, layer sizes, ...")
    parameter_count: int = Field(description="Weights in one posterior network")
    generator: dict[str, Any] = Field(description="Generator shape and design")
    generator_parameter_count: int
    input: InputInfo
    num_classes: int = Field(description="Classes the model tells apart (C)")
    class_names: list[str] | None = Field(
        description="Their names, in label order; null when the checkpoint names none"
    )
    default_num_samples: int
    anomaly: AnomalyInfo
    provenance: dict[str, Any] = Field(
        description="Data, sampler settings, distillation settings, code revision"
    )
    metrics: dict[str, Any] = Field(description="Evaluation figures stored in the checkpoint")
    backend: str
    pool_size: int
    limits: Limits


class ModelVersions(BaseModel):
    name: str = Field(examples=["mnist-fcnn1"])
    versions: list[str] = Field(description="Its READY versions, ascending", examples=[["1"]])
    default_version: str = Field(description="The version of requests that name none")


class ModelList(BaseModel):
    """``GET /v1/models``: every model with a READY version."""

    models: list[ModelVersions]
    default_model: str | None = Field(
        description="The model of requests that name none (null: they must name one)"
    )
