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
    DataSupportRecord,
    Design,
    InputConvention,
    Provenance,
    Recalibration,
    TargetNetwork,
    save_checkpoint,
    with_probes,
)
from apd.networks import NetworkSpec
from apd.support import DataSupport
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
    data_support: tuple[DataSupport, DataSupportRecord] | None = None,
    probes: NDArray[np.float32] | None = None,
    recalibration: Recalibration | None = None,
) -> tuple[str, CheckpointMeta]:
    """Validate and write the checkpoint; returns its sha256 and metadata. The input
    convention is the training data's (:attr:`training.own_data.Dataset.convention`);
    with ``probes`` (validation inputs), :func:`probe_set` of them is stored with the written
    generator's answers (:class:`apd.checkpoint.Probes`); ``recalibration`` is the map of the
    served probabilities (:func:`training.distillation.calibrate.fit_recalibration`)."""
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
        data_support=None if data_support is None else data_support[1],
        recalibration=recalibration,
    )
    tensors: dict[str, NDArray[Any]] = dict(generator.checkpoint_tensors(basis_dtype))
    if data_support is not None:
        tensors |= data_support[0].tensors()
    if probes is not None:
        x, kinds = probe_set(probes)
        meta, tensors = with_probes(meta, tensors, x, kinds)
    sha = save_checkpoint(path, meta, tensors)
    return sha, meta


def generator_noise(ckpt: Checkpoint, k: int, seed: int) -> dict[str, NDArray[np.float32]]:
    """The contract's noise for ``k`` networks from NumPy seed ``seed``
    (:meth:`Checkpoint.noise`): ``z`` and, with residual noise, ``eps``."""
    return ckpt.noise(k, seed)


def probe_set(val_x: NDArray[np.float32], rows: int = 4) -> tuple[NDArray[np.float32], list[str]]:
    """Network inputs whose answers a checkpoint stores for loading to check
    (:class:`apd.checkpoint.Probes`): ``rows`` validation inputs, the first of them times 20
    (far from the data), and zeros."""
    x = np.asarray(val_x[:rows], dtype=np.float32).reshape(min(rows, len(val_x)), -1)
    probes = np.concatenate([x, 20 * x[:1], np.zeros_like(x[:1])])
    return probes, [*(["validation"] * len(x)), "validation x20", "zeros"]


def sample_networks(ckpt: Checkpoint, k: int, seed: int) -> NDArray[np.float32]:
    """``k`` networks ``theta (k, P)`` from a saved checkpoint, by the contract's reference
    generator (:meth:`Checkpoint.generate`) on :func:`generator_noise`. Every evaluation of
    a checkpoint file draws its networks here; the trainable :class:`Generator` is only the
    model being trained. No evaluation needs gradients through the generator: the attacks
    differentiate the drawn networks' forward with respect to the inputs."""
    return ckpt.generate(**generator_noise(ckpt, k, seed))
