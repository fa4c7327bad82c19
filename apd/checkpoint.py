"""The APD checkpoint: the one contract between ``training/`` (writer) and ``service/`` (reader).

One safetensors file (no pickle) holds everything needed to serve:

Tensors (float32 unless noted; weights are ``(fan_in, fan_out)`` and a layer is ``h @ W + b``)
    ``generator.layers.{i}.weight``, ``generator.layers.{i}.bias``
        The generator MLP ``z -> c``: ReLU after every layer but the last.
    ``generator.basis`` (r, P), float32, float16 or int8 (optional)
        A fixed linear map from the generator's output ``c`` (r dims) to weight space.
    ``generator.basis_scale`` (r,) (with an int8 basis)
        Each direction's scale: the basis is ``int8 row * scale`` (:func:`decode_basis`).
    ``generator.mean`` (P,) (optional)
        The offset of the generated weights.
    ``generator.residual_std`` (P,) float16 (optional)
        Per-weight standard deviation of independent Gaussian noise added to the output.
    ``generator.mean_scale``, ``generator.residual_std_scale`` (ceil(P / 128),) (int8 vectors)
        With ``vector_dtype`` int8 the mean and residual std are int8, each group of
        :data:`VECTOR_GROUP` entries times its own scale (:func:`decode_vector`).
    ``support.mean`` (D,), ``support.components`` (r, D) float16, ``support.variances`` (r,)
        The data-support score (:mod:`apd.support`), with ``data_support`` in the metadata.
    ``probe.inputs`` (n, D), ``probe.probabilities`` (n, C), ``probe.mutual_information``
    (n,), ``probe.data_support`` (n,, with a data-support score)
        Network inputs and the answers the distiller computed for them (:class:`Probes`):
        loading recomputes them and refuses a checkpoint whose answers differ.

    A network is ``theta = mean + c @ basis + residual_std * eps`` with ``c = G(z)``,
    ``z ~ N(0, I_noise_dim)`` and ``eps ~ N(0, I_P)``. Absent parts are the identity / zero,
    so the paper's generator (the MLP outputs all P weights directly) is the special case with
    no basis, mean or residual.

Metadata (safetensors header, string values)
    ``apd.meta``: JSON of :class:`CheckpointMeta` (target network, input convention,
    generator shape, anomaly thresholds, the recalibration map of the served probabilities,
    default ``num_samples``, provenance).
    ``apd.sha256``: digest of the ``apd.meta`` string and of every tensor's name, dtype,
    shape and bytes, so a flipped bit anywhere in the metadata or the data is caught on load.

:func:`load_checkpoint` validates all of it, recomputes the stored probes, and raises
:class:`CheckpointError` with a one-line reason for a missing, truncated, tampered, mismatched,
foreign or diverged file.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Final, Literal, TypeVar, cast

import numpy as np
from numpy.typing import NDArray
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from apd import support
from apd.networks import Activation, NetworkSpec, forward_probs, spec_from_dict
from apd.recalibration import recalibrate_top_label
from apd.support import DataSupport
from apd.uncertainty import PREDICTIVE_SCORES, PredictiveSummary, ScoreName, is_flagged, summarize

FORMAT_NAME: Final = "apd-generator"
FORMAT_VERSION: Final = 1
META_KEY: Final = "apd.meta"
DIGEST_KEY: Final = "apd.sha256"

LAYER_PREFIX: Final = "generator.layers."
BASIS: Final = "generator.basis"
MEAN: Final = "generator.mean"
RESIDUAL_STD: Final = "generator.residual_std"
BASIS_SCALE: Final = "generator.basis_scale"
MEAN_SCALE: Final = "generator.mean_scale"
RESIDUAL_STD_SCALE: Final = "generator.residual_std_scale"
VECTOR_SCALES: Final = {MEAN: MEAN_SCALE, RESIDUAL_STD: RESIDUAL_STD_SCALE}
VECTOR_GROUP: Final = 128
"""Entries of an int8 mean or residual std that share one scale (128, the group size common in
8- and 4-bit weight quantisation: a scale costs 4 bytes per 128 one-byte entries, 3 %)."""
LEGACY_VECTOR_GROUP: Final = 64
"""The group of the first int8-vector checkpoints (written 2026-12-07), still read: a file's
group is the one whose count of scales its length implies (:func:`vector_group`)."""
PROBE_INPUTS: Final = "probe.inputs"
PROBE_PROBABILITIES: Final = "probe.probabilities"
PROBE_MI: Final = "probe.mutual_information"
PROBE_SUPPORT: Final = "probe.data_support"

BasisDtype = Literal["float32", "float16", "int8"]
VectorDtype = Literal["float", "int8"]
"""How a checkpoint stores the generator's mean and residual std: ``float`` (float32 and
float16) or ``int8`` (a scale per :data:`VECTOR_GROUP` entries; a quarter and a half of the
bytes: what lets a 478,410-weight network's checkpoint hold 14 directions in 8 MB)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be served, with a one-line reason naming the file."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


T = TypeVar("T")


def _memo(model: BaseModel, key: str, build: Callable[[], T]) -> T:
    """``build()``, computed once per model and again when a field was replaced (a
    ``model_copy(update=...)`` copies the cache but not the fields it was built from)."""
    fields = tuple(getattr(model, f) for f in type(model).model_fields)
    hit = model.__dict__.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[0], fields, strict=True)):
        return cast(T, hit[1])
    value = build()
    model.__dict__[key] = (fields, value)
    return value


class Conv2dRecord(_Strict):
    type: Literal["conv2d"]
    out_channels: int = Field(gt=0)
    kernel_size: int = Field(gt=0)
    padding: int = Field(default=0, ge=0)
    output_shape: list[int]


class MaxPool2dRecord(_Strict):
    type: Literal["maxpool2d"]
    size: int = Field(gt=0)
    output_shape: list[int]


class DenseRecord(_Strict):
    type: Literal["dense"]
    units: int = Field(gt=0)
    output_shape: list[int]


LayerRecord = Annotated[Conv2dRecord | MaxPool2dRecord | DenseRecord, Field(discriminator="type")]
_CNN_FIELDS: Final = ("input_shape", "layers")


class TargetNetwork(_Strict):
    """The network every generated ``theta`` parametrises (:mod:`apd.networks` for the flat
    layout): an MLP by its ``layer_sizes``, or a CNN by its ``input_shape`` ``(C, H, W)`` and
    ``layers``, each with its output shape. Fields of the other family are absent (and left
    out of the JSON, so an MLP's record reads as it always has)."""

    arch: str
    layer_sizes: list[int] | None = Field(default=None, min_length=2)
    input_shape: list[int] | None = Field(default=None, min_length=3, max_length=3)
    layers: list[LayerRecord] | None = Field(default=None, min_length=1)
    activation: Activation = Activation.RELU
    num_params: int = Field(gt=0)

    @model_validator(mode="after")
    def _params_match_sizes(self) -> TargetNetwork:
        cnn = [getattr(self, f) is not None for f in _CNN_FIELDS]
        if (self.layer_sizes is not None) == any(cnn) or any(cnn) != all(cnn):
            raise ValueError(
                "a target network has either layer_sizes (an MLP) or input_shape and layers (a CNN)"
            )
        if self.layer_sizes is not None and any(s <= 0 for s in self.layer_sizes):
            raise ValueError("layer_sizes must be positive")
        self.spec()  # num_params and every stated output shape must follow from the layers
        return self

    @model_serializer(mode="wrap")
    def _omit_other_family(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        for name in ("layer_sizes", *_CNN_FIELDS):
            if out.get(name, 0) is None:
                del out[name]
        return out

    @classmethod
    def of(cls, spec: NetworkSpec) -> TargetNetwork:
        """The record of ``spec`` (:meth:`apd.networks.MLPSpec.to_dict` /
        :meth:`apd.networks.CNNSpec.to_dict`)."""
        record = spec.to_dict()
        return cls.model_validate({"arch": record.pop("name"), **record})

    def spec(self) -> NetworkSpec:
        return _memo(self, "_memo_spec", lambda: spec_from_dict(self.model_dump(mode="json")))


class InputConvention(_Strict):
    """What a request's inputs are and how they become the network's input.

    An input is one example of ``shape`` (``[D]`` features, ``[H, W]`` or ``[C, H, W]``
    images) in the raw units of the training data (``dtype``, values seen in training within
    ``value_range``). The network sees ``x = raw * scale + shift`` (:meth:`preprocess`),
    ``scale`` and ``shift`` each one number or one per value of the flattened example
    (row-major). ``class_names`` name the outputs; ``data_sha256`` fingerprints the training
    data. Checkpoints written before these fields existed (MNIST, pixels in [0, 1]) read with
    their defaults.
    """

    shape: list[int] = Field(default=[28, 28], min_length=1)
    dtype: Literal["uint8", "float32"] = "float32"
    value_range: tuple[float, float] = (0.0, 1.0)
    scale: float | list[float] = 1.0
    shift: float | list[float] = 0.0
    class_names: list[str] | None = None
    data_sha256: str | None = None
    description: str = "28x28 grayscale, float pixels in [0, 1] (pixel / 255), white on black"

    @model_validator(mode="after")
    def _consistent(self) -> InputConvention:
        if any(s <= 0 for s in self.shape):
            raise ValueError(f"shape must be positive, got {self.shape}")
        lo, hi = self.value_range
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise ValueError(f"value_range must be finite with low <= high, got {(lo, hi)}")
        dim = math.prod(self.shape)
        for name in ("scale", "shift"):
            v = getattr(self, name)
            values = v if isinstance(v, list) else [v]
            if isinstance(v, list) and len(v) != dim:
                raise ValueError(f"{name} has {len(v)} values for {dim} input values")
            if not all(math.isfinite(x) for x in values):
                raise ValueError(f"{name} must be finite")
            if name == "scale" and not all(x > 0 for x in values):
                raise ValueError("scale must be positive")
        names = self.class_names
        if names is not None and (len(names) < 2 or len(set(names)) != len(names)):
            raise ValueError("class_names must be at least 2 distinct names")
        return self

    @property
    def input_dim(self) -> int:
        """Values in one example."""
        return math.prod(self.shape)

    @property
    def image_mode(self) -> Literal["L", "RGB"] | None:
        """``"L"`` or ``"RGB"`` when examples are 8-bit images (``[H, W]``, ``[1, H, W]`` or
        ``[3, H, W]`` of dtype uint8, or of float pixels in [0, 1] meaning ``pixel / 255``),
        so that an image file can stand for one (:meth:`image_to_raw`); else ``None``."""
        pixels = self.dtype == "uint8" or tuple(self.value_range) == (0.0, 1.0)
        if not pixels or len(self.shape) not in (2, 3):
            return None
        channels = 1 if len(self.shape) == 2 else self.shape[0]
        return {1: "L", 3: "RGB"}.get(channels)  # type: ignore[return-value]

    def _affine(self) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        return _memo(
            self,
            "_memo_affine",
            lambda: (np.asarray(self.scale, np.float32), np.asarray(self.shift, np.float32)),
        )

    def preprocess(self, raw: NDArray[Any]) -> NDArray[np.float32]:
        """Raw examples ``(N, *shape)`` or ``(N, D)`` -> network inputs ``(N, D)`` float32,
        ``raw * scale + shift`` (in float32). The one implementation, used by training and
        serving alike."""
        n = raw.shape[0]
        if raw.shape[1:] != tuple(self.shape) and raw.shape[1:] != (self.input_dim,):
            raise ValueError(
                f"expected inputs of shape (N, {', '.join(map(str, self.shape))}) or "
                f"(N, {self.input_dim}), got {raw.shape}"
            )
        x = np.array(raw, dtype=np.float32).reshape(n, self.input_dim)
        scale, shift = self._affine()
        if scale.ndim or float(scale) != 1.0:
            x *= scale
        if shift.ndim or float(shift) != 0.0:
            x += shift
        return x

    def image_to_raw(self, data: bytes) -> NDArray[Any]:
        """An image file's bytes (any format Pillow reads) -> one raw example: converted to
        :attr:`image_mode`, resized to ``shape`` (bilinear) if it differs, laid out as
        ``shape`` (channels first), as uint8 or, for float pixel conventions, ``pixel / 255``.
        Needs Pillow. Raises ``ValueError`` for what is not an image of a usable kind."""
        mode = self.image_mode
        if mode is None:
            raise ValueError("this model's inputs are not images")
        h, w = self.shape[-2:]
        pixels = decode_image(data, mode, (h, w))
        out = pixels.reshape(self.shape)
        return out if self.dtype == "uint8" else out.astype(np.float32) / np.float32(255)


def decode_image(
    data: bytes, mode: Literal["L", "RGB"], size: tuple[int, int]
) -> NDArray[np.uint8]:
    """Image file bytes -> uint8 pixels ``(H, W)`` (mode ``L``) or ``(3, H, W)`` (``RGB``),
    resized to ``size = (H, W)`` with a bilinear filter when it differs. Needs Pillow; raises
    ``ValueError`` when the bytes are not a readable image."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as opened:
            im = opened.convert(mode)
        if im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        a = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"not a readable image ({exc})") from None
    return np.ascontiguousarray(a.transpose(2, 0, 1)) if a.ndim == 3 else a


class Design(enum.StrEnum):
    """What the generator's MLP outputs: coefficients in a fixed subspace (the default design,
    with a basis, mean and residual noise) or all P weights directly (the paper's design)."""

    SUBSPACE = "subspace"
    PAPER = "paper"


class GeneratorConfig(_Strict):
    noise_dim: int = Field(gt=0)
    hidden_sizes: list[int]
    activation: Activation = Activation.RELU
    output_dim: int = Field(gt=0)  # r with a basis, else P
    has_basis: bool
    has_mean: bool
    has_residual: bool
    basis_dtype: BasisDtype = "float32"
    vector_dtype: VectorDtype = "float"
    design: Design


class CombinedRule(_Strict):
    """The ``combined`` flag: the union of two tests, the epistemic score above its threshold
    or the data-support score above its own. ``rates`` are each test's false-positive rate on
    the calibration split: the data-support test's a fixed share of the target, the epistemic
    test's whatever brings the union to the target (``training.distillation.calibrate``). Its
    score is the larger of the two scores, each divided by its threshold here, so its own
    threshold is 1."""

    epistemic: ScoreName
    rates: dict[ScoreName, float]
    thresholds: dict[ScoreName, float]

    @model_validator(mode="after")
    def _two_tests(self) -> CombinedRule:
        if self.epistemic not in PREDICTIVE_SCORES:
            raise ValueError(f"combined: {self.epistemic.value} is not an epistemic score")
        tests = {self.epistemic, ScoreName.DATA_SUPPORT}
        if set(self.thresholds) != tests or set(self.rates) != tests:
            raise ValueError(
                "combined: rates and thresholds of the epistemic score and data_support"
            )
        if not all(0.0 < r < 1.0 for r in self.rates.values()):
            raise ValueError("combined: rates must lie in (0, 1)")
        if not all(math.isfinite(t) and t > 0 for t in self.thresholds.values()):
            raise ValueError("combined: thresholds must be finite and positive")
        return self


class AnomalyCalibration(_Strict):
    """Thresholds calibrated on ``calibration_size`` held-out inputs for ``target_fpr``.
    ``flagged`` counts the calibration inputs above each threshold and ``fpr_interval`` is the
    95 % Clopper-Pearson interval of the false-positive rate that count implies: how much a
    threshold set on this few inputs can be trusted."""

    default_score: ScoreName
    target_fpr: float = Field(gt=0, lt=1)
    thresholds: dict[ScoreName, float]
    calibration_set: str
    calibration_size: int = Field(gt=0)
    num_samples: int = Field(gt=0)
    combined: CombinedRule | None = None
    flagged: dict[ScoreName, int] = {}
    fpr_interval: dict[ScoreName, tuple[float, float]] = {}

    @model_validator(mode="after")
    def _default_is_calibrated(self) -> AnomalyCalibration:
        if self.default_score not in self.thresholds:
            raise ValueError(f"default_score {self.default_score.value} has no threshold")
        if not all(math.isfinite(t) for t in self.thresholds.values()):
            raise ValueError("thresholds must be finite")
        if (ScoreName.COMBINED in self.thresholds) != (self.combined is not None):
            raise ValueError("a combined threshold needs its rule (combined), and the reverse")
        if self.combined is not None and self.thresholds[ScoreName.COMBINED] != 1.0:
            raise ValueError("the combined score's threshold is 1")
        for name, (lo, hi) in self.fpr_interval.items():
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"fpr_interval of {name.value} must satisfy 0 <= lo <= hi <= 1")
        return self

    def scores(self, summary: PredictiveSummary, name: ScoreName) -> NDArray[np.float64]:
        """Score ``name`` for each input of ``summary``; ``combined`` by :class:`CombinedRule`."""
        if name is not ScoreName.COMBINED:
            return np.asarray(summary.score(name), dtype=np.float64)
        if self.combined is None:
            raise ValueError("this checkpoint has no combined rule")
        parts = [summary.score(s) / t for s, t in self.combined.thresholds.items()]
        out: NDArray[np.float64] = np.maximum(*parts)
        return out

    def flags(
        self, summary: PredictiveSummary, name: ScoreName
    ) -> tuple[NDArray[np.float64], NDArray[np.bool_], float]:
        """``(scores, flags, threshold)`` of score ``name``: the one place an input is
        flagged (:func:`apd.uncertainty.is_flagged`, which fails closed on a NaN score)."""
        threshold = self.thresholds[name]
        scores = self.scores(summary, name)
        return scores, is_flagged(scores, threshold), threshold


class DataSupportRecord(_Strict):
    """The data-support score's scalars (:class:`apd.support.DataSupport`); its arrays are
    the ``support.*`` tensors."""

    rank: int = Field(gt=0)
    residual_variance: float = Field(gt=0)
    variance_held: float = Field(gt=0, le=1)
    fitted_on: str
    fit_rows: int = Field(gt=1)


class Recalibration(_Strict):
    """The map the service applies to the probabilities it returns (:mod:`apd.recalibration`):
    the top-label confidence ``c`` becomes ``g(c)``, piecewise linear through the knots
    ``(confidence[i], calibrated[i])``, fitted on ``fit_size`` inputs of ``fitted_on`` with
    ``num_samples`` networks (``training.distillation.calibrate.fit_recalibration``). ``g``
    never exceeds ``cap`` (:func:`apd.recalibration.confidence_cap` of ``fit_size``).
    ``validation`` records ECE and NLL on the fit split before and after."""

    method: Literal["isotonic-top-label"] = "isotonic-top-label"
    confidence: list[float] = Field(min_length=1)
    calibrated: list[float] = Field(min_length=1)
    cap: float = Field(gt=0, lt=1)
    fitted_on: str
    fit_size: int = Field(gt=0)
    num_samples: int = Field(gt=0)
    validation: dict[str, float] = {}

    @model_validator(mode="after")
    def _monotone_map(self) -> Recalibration:
        x, y = self.confidence, self.calibrated
        if len(x) != len(y):
            raise ValueError(f"{len(x)} confidence knots but {len(y)} calibrated values")
        if not all(math.isfinite(v) for v in (*x, *y)):
            raise ValueError("knots must be finite")
        if not (0.0 <= x[0] and x[-1] <= 1.0) or not all(a < b for a, b in itertools.pairwise(x)):
            raise ValueError("confidence knots must increase strictly within [0, 1]")
        if not all(a <= b for a, b in itertools.pairwise(y)):
            raise ValueError("calibrated values must not decrease (the map is monotone)")
        if y[0] < 0.0 or y[-1] > self.cap:
            raise ValueError(f"calibrated values must lie in [0, cap={self.cap}]")
        return self

    def apply(self, probabilities: NDArray[np.floating]) -> NDArray[np.float64]:
        """Predictive rows ``(N, C)`` recalibrated
        (:func:`apd.recalibration.recalibrate_top_label`)."""
        knots = _memo(
            self,
            "_memo_knots",
            lambda: (np.asarray(self.confidence), np.asarray(self.calibrated)),
        )
        return recalibrate_top_label(probabilities, *knots)


class Probes(_Strict):
    """Inputs with the answers the distiller computed for them: ``num_samples`` networks
    drawn from NumPy seed ``seed`` (:meth:`Checkpoint.noise`); loading recomputes them and
    refuses the checkpoint when any differs by more than ``tolerance`` or is not finite.
    ``kinds`` says what each probe row is (e.g. ``validation``, ``zeros``, ``scaled x20``)."""

    seed: int = Field(ge=0)
    num_samples: int = Field(gt=0, le=64)
    tolerance: float = Field(gt=0)
    kinds: list[str] = Field(min_length=1)


class Provenance(_Strict):
    created_at: str
    code_revision: str
    data: dict[str, Any] = {}
    sampler: dict[str, Any] = {}
    distillation: dict[str, Any] = {}


class CheckpointMeta(_Strict):
    format: Literal["apd-generator"] = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    model_id: str = Field(min_length=1)
    version: str = Field(min_length=1)
    target: TargetNetwork
    input: InputConvention = InputConvention()
    generator: GeneratorConfig
    num_samples_default: int = Field(default=100, ge=1, le=1000)
    anomaly: AnomalyCalibration
    provenance: Provenance
    metrics: dict[str, Any] = {}
    data_support: DataSupportRecord | None = None
    probes: Probes | None = None
    recalibration: Recalibration | None = None

    @model_validator(mode="after")
    def _input_fits_target(self) -> CheckpointMeta:
        has_support = self.data_support is not None
        for name in (ScoreName.DATA_SUPPORT, ScoreName.COMBINED):
            if name in self.anomaly.thresholds and not has_support:
                raise ValueError(f"a threshold for {name.value} needs a data-support fit")
        spec = self.target.spec()
        if self.input.input_dim != spec.input_dim:
            raise ValueError(
                f"input shape {self.input.shape} holds {self.input.input_dim} values, "
                f"the target network reads {spec.input_dim}"
            )
        names = self.input.class_names
        if names is not None and len(names) != spec.num_classes:
            raise ValueError(
                f"{len(names)} class_names for the target network's {spec.num_classes} outputs"
            )
        return self

    @field_validator("format_version")
    @classmethod
    def _supported_version(cls, v: int) -> int:
        if v != FORMAT_VERSION:
            raise ValueError(
                f"format_version {v} is not supported (this build reads {FORMAT_VERSION})"
            )
        return v


Tensors = Mapping[str, NDArray[Any]]


def content_digest(meta_json: str, tensors: Tensors) -> str:
    """SHA-256 over the metadata JSON, then every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    h.update(meta_json.encode())
    h.update(b"\0")
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def encode_basis(basis: NDArray[np.floating], dtype: BasisDtype) -> Tensors:
    """The stored tensors of a basis ``(r, P)``: itself in ``dtype`` (float32, float16), or
    for int8 each row rounded to 8 bits with one symmetric scale ``max |row| / 127``."""
    b = np.asarray(basis, dtype=np.float32)
    if dtype != "int8":
        return {BASIS: b.astype(np.dtype(dtype))}
    scale = np.maximum(np.abs(b).max(axis=1), np.finfo(np.float32).tiny) / np.float32(127)
    q = np.clip(np.rint(b / scale[:, None]), -127, 127).astype(np.int8)
    return {BASIS: q, BASIS_SCALE: scale.astype(np.float32)}


def decode_basis(tensors: Mapping[str, NDArray[Any]]) -> NDArray[np.float32]:
    """The float32 basis that :func:`encode_basis`'s tensors store."""
    basis = np.asarray(tensors[BASIS], dtype=np.float32)
    if BASIS_SCALE in tensors:
        basis = basis * np.asarray(tensors[BASIS_SCALE], dtype=np.float32)[:, None]
    return np.ascontiguousarray(basis)


def round_basis(basis: NDArray[np.floating], dtype: BasisDtype) -> NDArray[np.float32]:
    """``basis`` as a checkpoint of ``dtype`` stores it (float32 after the round trip), so
    that training can fit against exactly the directions that will be served."""
    return decode_basis(encode_basis(basis, dtype))


def encode_vector(
    name: str, vector: NDArray[np.floating], dtype: VectorDtype, group: int = VECTOR_GROUP
) -> Tensors:
    """The stored tensors of the generator's :data:`MEAN` or :data:`RESIDUAL_STD` ``(P,)``:
    float (the mean float32, the residual std float16), or int8: each group of ``group``
    (:data:`VECTOR_GROUP`) entries rounded to the nearest of 255 levels, symmetric, with one
    float32 scale ``max |group| / 127`` (1 for a group of zeros) in ``VECTOR_SCALES[name]``.
    A non-negative vector stays non-negative."""
    v = np.asarray(vector, dtype=np.float32)
    if dtype == "float":
        return {name: v.astype(np.float16 if name == RESIDUAL_STD else np.float32)}
    groups = _vector_groups(v, group)
    peak = np.abs(groups).max(axis=1)
    scale = np.where(peak > 0, peak / np.float32(127), np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(groups / scale[:, None]), -127, 127).astype(np.int8)
    return {name: q.reshape(-1)[: len(v)], VECTOR_SCALES[name]: scale}


def _vector_groups(v: NDArray[np.float32], group: int) -> NDArray[np.float32]:
    """``v (P,)`` zero-padded to ``(ceil(P / group), group)``."""
    return np.pad(v, (0, -len(v) % group)).reshape(-1, group)


def vector_group(num_entries: int, num_scales: int) -> int | None:
    """The group (:data:`VECTOR_GROUP`, else :data:`LEGACY_VECTOR_GROUP`) of an int8 vector of
    ``num_entries`` stored with ``num_scales`` scales; None if neither gives that count."""
    for group in (VECTOR_GROUP, LEGACY_VECTOR_GROUP):
        if -(-num_entries // group) == num_scales:
            return group
    return None


def decode_vector(tensors: Mapping[str, NDArray[Any]], name: str) -> NDArray[np.float32]:
    """The float32 vector that :func:`encode_vector`'s tensors store under ``name``."""
    v = np.asarray(tensors[name], dtype=np.float32)
    scale_name = VECTOR_SCALES[name]
    if scale_name not in tensors:
        return np.ascontiguousarray(v)
    scale = np.asarray(tensors[scale_name], dtype=np.float32)[:, None]
    group = vector_group(len(v), len(scale))
    if group is None:
        raise ValueError(f"{len(scale)} scales fit no group of {len(v)} entries of {name}")
    groups = _vector_groups(v, group)
    return np.ascontiguousarray((groups * scale).reshape(-1)[: len(v)])


def round_vector(
    name: str, vector: NDArray[np.floating], dtype: VectorDtype
) -> NDArray[np.float32]:
    """``vector`` as a checkpoint of ``dtype`` stores it under ``name`` (float32 after the
    round trip), so that training fits against exactly the mean and noise that are served."""
    return decode_vector(encode_vector(name, vector, dtype), name)


def decode_tensors(tensors: Mapping[str, NDArray[Any]]) -> dict[str, NDArray[np.float32]]:
    """Every stored tensor as float32, the basis and int8 vectors decoded and their scales
    dropped: the tensors a :class:`Checkpoint` computes with."""
    stored = {BASIS, BASIS_SCALE, *VECTOR_SCALES, *VECTOR_SCALES.values()}
    out = {
        k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items() if k not in stored
    }
    if BASIS in tensors:
        out[BASIS] = decode_basis(tensors)
    out |= {name: decode_vector(tensors, name) for name in VECTOR_SCALES if name in tensors}
    return out


def _generator_layer_names(n_layers: int) -> list[tuple[str, str]]:
    return [(f"{LAYER_PREFIX}{i}.weight", f"{LAYER_PREFIX}{i}.bias") for i in range(n_layers)]


def _validate_tensors(meta: CheckpointMeta, tensors: Tensors) -> None:
    """Shapes, dtypes and finiteness implied by ``meta``; raises ``ValueError``."""
    g = meta.generator
    p = meta.target.num_params
    sizes = [g.noise_dim, *g.hidden_sizes, g.output_dim]
    expected: dict[str, tuple[int, ...]] = {}
    for (wn, bn), (i, o) in zip(
        _generator_layer_names(len(sizes) - 1), itertools.pairwise(sizes), strict=True
    ):
        expected[wn], expected[bn] = (i, o), (o,)
    if g.has_basis:
        expected[BASIS] = (g.output_dim, p)
        if g.basis_dtype == "int8":
            expected[BASIS_SCALE] = (g.output_dim,)
    elif g.output_dim != p:
        raise ValueError(f"generator without a basis must output {p} weights, not {g.output_dim}")
    if g.has_mean:
        expected[MEAN] = (p,)
    if g.has_residual:
        expected[RESIDUAL_STD] = (p,)
    dtypes = {BASIS: g.basis_dtype, RESIDUAL_STD: "float16", support.COMPONENTS: "float16"}
    if g.vector_dtype == "int8":
        vectors = [name for name in VECTOR_SCALES if name in expected]
        for name in vectors:  # this format's group, or the legacy one where the scales say so
            stored = tensors.get(VECTOR_SCALES[name])
            n = stored.shape[0] if stored is not None and stored.ndim == 1 else 0
            expected[VECTOR_SCALES[name]] = (n if vector_group(p, n) else -(-p // VECTOR_GROUP),)
        dtypes |= dict.fromkeys(vectors, "int8")
    d, c = meta.input.input_dim, meta.target.spec().num_classes
    if meta.data_support is not None:
        r = meta.data_support.rank
        expected |= {support.MEAN: (d,), support.COMPONENTS: (r, d), support.VARIANCES: (r,)}
    if meta.probes is not None:
        n = len(meta.probes.kinds)
        expected |= {PROBE_INPUTS: (n, d), PROBE_PROBABILITIES: (n, c), PROBE_MI: (n,)}
        if meta.data_support is not None:
            expected[PROBE_SUPPORT] = (n,)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"tensor set mismatch: missing {missing}, unexpected {extra}")
    for name, shape in expected.items():
        arr = tensors[name]
        if tuple(arr.shape) != shape:
            raise ValueError(f"tensor {name} has shape {tuple(arr.shape)}, expected {shape}")
        want = dtypes.get(name, "float32")
        if arr.dtype != np.dtype(want):
            raise ValueError(f"tensor {name} has dtype {arr.dtype}, expected {want}")
        if not np.isfinite(arr).all():
            raise ValueError(f"tensor {name} holds NaN or Inf")
    if g.has_residual and (np.asarray(tensors[RESIDUAL_STD]) < 0).any():
        raise ValueError(f"{RESIDUAL_STD} must be non-negative")
    for scale in (BASIS_SCALE, *VECTOR_SCALES.values()):
        if scale in expected and not (np.asarray(tensors[scale]) > 0).all():
            raise ValueError(f"{scale} must be positive")
    if support.VARIANCES in expected and not (np.asarray(tensors[support.VARIANCES]) > 0).all():
        raise ValueError(f"{support.VARIANCES} must be positive")


def with_probes(
    meta: CheckpointMeta,
    tensors: Tensors,
    inputs: NDArray[np.float32],
    kinds: list[str],
    seed: int = 0,
    num_samples: int = 32,
    tolerance: float = 1e-3,
) -> tuple[CheckpointMeta, dict[str, NDArray[Any]]]:
    """``meta`` and ``tensors`` with :class:`Probes`: the answers the checkpoint gives for
    network inputs ``inputs (n, D)`` (``kinds`` saying what each is), for loading to check."""
    meta = meta.model_copy(update={"probes": None})
    base = {k: v for k, v in tensors.items() if not k.startswith("probe.")}
    draft = Checkpoint(path=Path("<unsaved>"), sha256="", meta=meta, tensors=decode_tensors(base))
    x = np.ascontiguousarray(inputs, dtype=np.float32)
    got = draft.summarize(x, num_samples, seed)
    out = dict(base) | {
        PROBE_INPUTS: x,
        PROBE_PROBABILITIES: got.probabilities.astype(np.float32),
        PROBE_MI: got.mutual_information.astype(np.float32),
    }
    if got.data_support is not None:
        out[PROBE_SUPPORT] = got.data_support.astype(np.float32)
    probes = Probes(seed=seed, num_samples=num_samples, tolerance=tolerance, kinds=kinds)
    return meta.model_copy(update={"probes": probes}), out


def save_checkpoint(path: str | Path, meta: CheckpointMeta, tensors: Tensors) -> str:
    """Validate and write a checkpoint; returns the file's sha256."""
    from safetensors.numpy import save_file

    path = Path(path)
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    _validate_tensors(meta, arrays)
    meta_json = meta.model_dump_json()
    header = {META_KEY: meta_json, DIGEST_KEY: content_digest(meta_json, arrays)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(arrays, str(tmp), metadata=header)
    tmp.chmod(0o644)
    tmp.replace(path)
    return file_sha256(path)


@dataclass(frozen=True)
class Checkpoint:
    """A validated checkpoint, ready to generate networks."""

    path: Path
    sha256: str
    meta: CheckpointMeta
    tensors: dict[str, NDArray[np.float32]]  # float32: basis and int8 vectors decoded

    @property
    def spec(self) -> NetworkSpec:
        return self.meta.target.spec()

    @cached_property
    def data_support(self) -> DataSupport | None:
        """The data-support score (:mod:`apd.support`), where the checkpoint has one."""
        record = self.meta.data_support
        if record is None:
            return None
        return DataSupport.from_tensors(self.tensors, record.residual_variance)

    def noise(self, k: int, seed: int) -> dict[str, NDArray[np.float32]]:
        """Standard normal noise for ``k`` networks from NumPy seed ``seed``: ``z (k,
        noise_dim)`` and, when the generator adds residual noise, ``eps (k, P)``; named as the
        arguments of :meth:`generate` (and the inputs of the exported ONNX graph)."""
        rng = np.random.default_rng(seed)
        out = {"z": rng.standard_normal((k, self.noise_dim), dtype=np.float32)}
        if self.meta.generator.has_residual:
            out["eps"] = rng.standard_normal((k, self.num_params), dtype=np.float32)
        return out

    def summarize(self, x: NDArray[np.float32], k: int, seed: int) -> PredictiveSummary:
        """The reference predictive of network inputs ``x (N, D)`` (preprocessed): ``k``
        networks from :meth:`noise` run by :func:`apd.networks.forward_probs`, with the
        data-support score where the checkpoint has one."""
        theta = self.generate(**self.noise(k, seed))
        summary = summarize(forward_probs(self.spec, theta, x))
        ds = self.data_support
        return summary if ds is None else replace(summary, data_support=ds.score(x))

    def probabilities(self, summary: PredictiveSummary) -> NDArray[np.float64]:
        """The probabilities served for ``summary``: its predictive mapped by the checkpoint's
        :class:`Recalibration`, or as it is without one. Labels, the uncertainty decomposition
        and the anomaly scores stay the networks' own (``summary``'s)."""
        r = self.meta.recalibration
        return summary.probabilities if r is None else r.apply(summary.probabilities)

    def verify_probes(self) -> None:
        """Recompute the stored probes (:class:`Probes`); ``ValueError`` naming the first
        answer that differs or is not finite. Without stored probes, the generator's networks
        must still give finite answers on the middle of the input range."""
        probes = self.meta.probes
        if probes is None:
            lo, hi = self.meta.input.value_range
            raw = np.full((1, self.meta.input.input_dim), (lo + hi) / 2, np.float32)
            got = self.summarize(self.meta.input.preprocess(raw), 8, 0)
            if not np.isfinite(got.probabilities).all():
                raise ValueError("its networks give non-finite probabilities (diverged)")
            return
        got = self.summarize(self.tensors[PROBE_INPUTS], probes.num_samples, probes.seed)
        checks = [
            ("probabilities", got.probabilities, self.tensors[PROBE_PROBABILITIES]),
            ("mutual_information", got.mutual_information, self.tensors[PROBE_MI]),
        ]
        if got.data_support is not None:
            checks.append(("data_support", got.data_support, self.tensors[PROBE_SUPPORT]))
        for what, actual, expected in checks:
            if not np.isfinite(actual).all():
                raise ValueError(f"its probe {what} are not finite (a diverged generator?)")
            err = np.abs(actual - expected)
            if err.ndim > 1:
                err = err.max(axis=1)
            worst = int(np.argmax(err))
            if err[worst] > probes.tolerance:
                raise ValueError(
                    f"probe {worst} ({probes.kinds[worst]}) {what} differ from the stored "
                    f"answer by {err[worst]:.3g} > {probes.tolerance:g} (altered or corrupted "
                    "weights)"
                )

    @property
    def noise_dim(self) -> int:
        return self.meta.generator.noise_dim

    @property
    def num_params(self) -> int:
        return self.meta.target.num_params

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size

    def generator_layers(self) -> list[tuple[NDArray[np.float32], NDArray[np.float32]]]:
        n = len(self.meta.generator.hidden_sizes) + 1
        return [(self.tensors[w], self.tensors[b]) for w, b in _generator_layer_names(n)]

    @property
    def residual_std(self) -> NDArray[np.float32] | None:
        """``(P,)``: the standard deviation of the generator's independent residual noise per
        weight; None where it adds none (every network then lies in :attr:`affine`'s
        subspace)."""
        return self.tensors[RESIDUAL_STD] if self.meta.generator.has_residual else None

    @property
    def code_dim(self) -> int:
        """Length of a network's code: ``r`` with a basis, else the last hidden width."""
        g = self.meta.generator
        return g.output_dim if g.has_basis else ([g.noise_dim, *g.hidden_sizes])[-1]

    def codes(self, z: NDArray[np.float32]) -> NDArray[np.float32]:
        """The generator up to its affine tail: noise ``z (K, noise_dim)`` -> codes ``(K, r)``.

        With a basis the code is the MLP's output ``c``; without one (the paper's design) it is
        the MLP's last hidden layer ``h``, and the last layer is the tail's affine map.
        """
        h = np.asarray(z, dtype=np.float32)
        layers = self.generator_layers()
        if not self.meta.generator.has_basis:
            layers = layers[:-1]
        for i, (w, b) in enumerate(layers):
            h = h @ w + b
            if i < len(layers) - 1 or not self.meta.generator.has_basis:
                h = np.maximum(h, 0.0)
        return h

    @cached_property
    def affine(self) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """``(offset (P,), directions (r, P))`` with ``theta = offset + code @ directions``
        (before residual noise)."""
        g = self.meta.generator
        p = self.num_params
        if g.has_basis:
            offset = self.tensors[MEAN] if g.has_mean else np.zeros(p, np.float32)
            directions = self.tensors[BASIS]
        else:
            directions, bias = self.generator_layers()[-1]
            offset = bias + self.tensors[MEAN] if g.has_mean else bias
        return np.ascontiguousarray(offset, np.float32), np.ascontiguousarray(directions)

    def generate(
        self, z: NDArray[np.float32], eps: NDArray[np.float32] | None = None
    ) -> NDArray[np.float32]:
        """Reference NumPy generator: noise ``z (K, noise_dim)``, ``eps (K, P)`` -> ``(K, P)``.

        ``theta = offset + codes(z) @ directions [+ residual_std * eps]``.
        """
        offset, directions = self.affine
        theta = self.codes(z) @ directions + offset
        if self.meta.generator.has_residual:
            if eps is None:
                raise ValueError("this generator adds residual noise: pass eps of shape (K, P)")
            theta = theta + self.tensors[RESIDUAL_STD] * eps
        return theta.astype(np.float32, copy=False)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load and validate a checkpoint, or raise :class:`CheckpointError` with the reason."""
    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import load_file

    path = Path(path)
    where = f"checkpoint {path}"
    if not path.is_file():
        raise CheckpointError(f"{where}: no such file")
    try:
        with safe_open(str(path), framework="np") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{where}: not a readable safetensors file ({exc})") from None
    if META_KEY not in header or DIGEST_KEY not in header:
        raise CheckpointError(f"{where}: not an APD checkpoint (no {META_KEY} metadata)")
    try:
        raw = json.loads(header[META_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{where}: metadata is not valid JSON ({exc})") from None
    if isinstance(raw, dict) and raw.get("format") not in (None, FORMAT_NAME):
        raise CheckpointError(f"{where}: format {raw.get('format')!r} is not {FORMAT_NAME!r}")
    try:
        meta = CheckpointMeta.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "metadata"
        raise CheckpointError(f"{where}: invalid metadata at {loc}: {first['msg']}") from None
    if content_digest(header[META_KEY], tensors) != header[DIGEST_KEY]:
        raise CheckpointError(
            f"{where}: contents do not match their digest (corrupted or tampered)"
        )
    try:
        _validate_tensors(meta, tensors)
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    ckpt = Checkpoint(
        path=path, sha256=file_sha256(path), meta=meta, tensors=decode_tensors(tensors)
    )
    try:
        with np.errstate(all="ignore"):
            ckpt.verify_probes()
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    return ckpt
