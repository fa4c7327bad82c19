"""A trained generator as one :mod:`apd.checkpoint` file, with its provenance, and the
networks drawn from such a file."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from apd.checkpoint import (
    AnomalyCalibration,
    BasisDtype,
    Checkpoint,
    CheckpointMeta,
    Design,
    InputConvention,
    Provenance,
    TargetNetwork,
    save_checkpoint,
)
from apd.networks import NetworkSpec
from training.revision import code_revision

from .gan import Generator


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def default_version() -> str:
    """A date-based version, e.g. ``2025.11.23-0750``."""
    return datetime.now(UTC).strftime("%Y.%m.%d-%H%M")


def write_checkpoint(
    path: str | Path,
    generator: Generator,
    spec: NetworkSpec,
    *,
    input_convention: InputConvention,
    design: Design,
    basis_dtype: BasisDtype,
    anomaly: AnomalyCalibration,
    model_id: str,
    version: str,
    data: dict[str, Any],
    sampler: dict[str, Any],
    distillation: dict[str, Any],
    metrics: dict[str, Any],
    num_samples_default: int = 100,
) -> tuple[str, CheckpointMeta]:
    """Validate and write the checkpoint; returns its sha256 and metadata. The input
    convention is the training data's (:attr:`training.own_data.Dataset.convention`)."""
    if generator.num_params != spec.num_params:
        raise ValueError(
            f"generator makes {generator.num_params} weights, {spec.name} has {spec.num_params}"
        )
    meta = CheckpointMeta(
        model_id=model_id,
        version=version,
        target=TargetNetwork.of(spec),
        input=input_convention,
        generator=generator.checkpoint_config(design, basis_dtype),
        num_samples_default=num_samples_default,
        anomaly=anomaly,
        provenance=Provenance(
            created_at=utc_now(),
            code_revision=code_revision(),
            data=data,
            sampler=sampler,
            distillation=distillation,
        ),
        metrics=metrics,
    )
    sha = save_checkpoint(path, meta, generator.checkpoint_tensors(basis_dtype))
    return sha, meta


def generator_noise(ckpt: Checkpoint, k: int, seed: int) -> dict[str, NDArray[np.float32]]:
    """Standard normal noise for ``k`` networks from NumPy seed ``seed``: ``z (k, noise_dim)``
    and, when the generator adds residual noise, ``eps (k, P)``; named as the arguments of
    :meth:`Checkpoint.generate` and the inputs of the ONNX graph."""
    rng = np.random.default_rng(seed)
    noise = {"z": rng.standard_normal((k, ckpt.noise_dim), dtype=np.float32)}
    if ckpt.meta.generator.has_residual:
        noise["eps"] = rng.standard_normal((k, ckpt.num_params), dtype=np.float32)
    return noise


def sample_networks(ckpt: Checkpoint, k: int, seed: int) -> NDArray[np.float32]:
    """``k`` networks ``theta (k, P)`` from a saved checkpoint, by the contract's reference
    generator (:meth:`Checkpoint.generate`) on :func:`generator_noise`. Every evaluation of
    a checkpoint file draws its networks here; the trainable :class:`Generator` is only the
    model being trained. No evaluation needs gradients through the generator: the attacks
    differentiate the drawn networks' forward with respect to the inputs."""
    return ckpt.generate(**generator_noise(ckpt, k, seed))
