"""The APD checkpoint: the one contract between ``training/`` (writer) and ``service/`` (reader).

One safetensors file (no pickle) holds everything needed to serve:

Tensors (float32 unless noted; weights are ``(fan_in, fan_out)`` and a layer is ``h @ W + b``)
    ``generator.layers.{i}.weight``, ``generator.layers.{i}.bias``
        The generator MLP ``z -> c``: ReLU after every layer but the last.
    ``generator.basis`` (r, P), float32 or float16 (optional)
        A fixed linear map from the generator's output ``c`` (r dims) to weight space.
    ``generator.mean`` (P,) (optional)
        The offset of the generated weights.
    ``generator.residual_std`` (P,) (optional)
        Per-weight standard deviation of independent Gaussian noise added to the output.

    A network is ``theta = mean + c @ basis + residual_std * eps`` with ``c = G(z)``,
    ``z ~ N(0, I_noise_dim)`` and ``eps ~ N(0, I_P)``. Absent parts are the identity / zero,
    so the paper's generator (the MLP outputs all P weights directly) is the special case with
    no basis, mean or residual.

Metadata (safetensors header, string values)
    ``apd.meta``: JSON of :class:`CheckpointMeta` (target network, input convention,
    generator shape, anomaly thresholds, default ``num_samples``, provenance).
    ``apd.sha256``: digest of the ``apd.meta`` string and of every tensor's name, dtype,
    shape and bytes, so a flipped bit anywhere in the metadata or the data is caught on load.

:func:`load_checkpoint` validates all of it and raises :class:`CheckpointError` with a
one-line reason for a missing, truncated, tampered, mismatched or foreign file.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from apd.networks import Activation, MLPSpec
from apd.uncertainty import ScoreName

FORMAT_NAME: Final = "apd-generator"
FORMAT_VERSION: Final = 1
META_KEY: Final = "apd.meta"
DIGEST_KEY: Final = "apd.sha256"

LAYER_PREFIX: Final = "generator.layers."
BASIS: Final = "generator.basis"
MEAN: Final = "generator.mean"
RESIDUAL_STD: Final = "generator.residual_std"


class CheckpointError(ValueError):
    """A checkpoint that cannot be served, with a one-line reason naming the file."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TargetNetwork(_Strict):
    arch: str
    layer_sizes: list[int] = Field(min_length=2)
    activation: Activation = Activation.RELU
    num_params: int = Field(gt=0)

    @model_validator(mode="after")
    def _params_match_sizes(self) -> TargetNetwork:
        if any(s <= 0 for s in self.layer_sizes):
            raise ValueError("layer_sizes must be positive")
        expected = self.spec().num_params
        if self.num_params != expected:
            raise ValueError(f"num_params {self.num_params} != {expected} implied by layer_sizes")
        return self

    def spec(self) -> MLPSpec:
        return MLPSpec(self.arch, tuple(self.layer_sizes), self.activation)


class InputConvention(_Strict):
    """How a request's pixels become the network's input: ``x = scale * pixels``."""

    shape: list[int] = Field(default=[28, 28])
    value_range: tuple[float, float] = (0.0, 1.0)
    scale: float = Field(default=1.0, gt=0)
    description: str = "28x28 grayscale, float pixels in [0, 1] (pixel / 255), white on black"


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
    basis_dtype: Literal["float32", "float16"] = "float32"
    design: Design


class AnomalyCalibration(_Strict):
    default_score: ScoreName
    target_fpr: float = Field(gt=0, lt=1)
    thresholds: dict[ScoreName, float]
    calibration_set: str
    calibration_size: int = Field(gt=0)
    num_samples: int = Field(gt=0)

    @model_validator(mode="after")
    def _default_is_calibrated(self) -> AnomalyCalibration:
        if self.default_score not in self.thresholds:
            raise ValueError(f"default_score {self.default_score.value} has no threshold")
        if not all(math.isfinite(t) for t in self.thresholds.values()):
            raise ValueError("thresholds must be finite")
        return self


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
    elif g.output_dim != p:
        raise ValueError(f"generator without a basis must output {p} weights, not {g.output_dim}")
    if g.has_mean:
        expected[MEAN] = (p,)
    if g.has_residual:
        expected[RESIDUAL_STD] = (p,)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"tensor set mismatch: missing {missing}, unexpected {extra}")
    for name, shape in expected.items():
        arr = tensors[name]
        if tuple(arr.shape) != shape:
            raise ValueError(f"tensor {name} has shape {tuple(arr.shape)}, expected {shape}")
        want = g.basis_dtype if name == BASIS else "float32"
        if arr.dtype != np.dtype(want):
            raise ValueError(f"tensor {name} has dtype {arr.dtype}, expected {want}")
        if not np.isfinite(arr).all():
            raise ValueError(f"tensor {name} holds NaN or Inf")
    if g.has_residual and (np.asarray(tensors[RESIDUAL_STD]) < 0).any():
        raise ValueError(f"{RESIDUAL_STD} must be non-negative")


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
    tensors: dict[str, NDArray[np.float32]]  # float32, basis upcast

    @property
    def spec(self) -> MLPSpec:
        return self.meta.target.spec()

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
    def is_affine(self) -> bool:
        """Whether every network lies in the affine subspace ``offset + code @ directions``
        (no residual noise), so that it can be served from its code alone."""
        return not self.meta.generator.has_residual

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
    f32 = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    return Checkpoint(path=path, sha256=file_sha256(path), meta=meta, tensors=f32)
