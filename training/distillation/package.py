"""A trained generator as one :mod:`apd.checkpoint` file, with its provenance."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from apd.checkpoint import (
    BASIS,
    LAYER_PREFIX,
    MEAN,
    RESIDUAL_STD,
    AnomalyCalibration,
    Checkpoint,
    CheckpointMeta,
    InputConvention,
    Provenance,
    TargetNetwork,
    save_checkpoint,
)
from apd.networks import MLPSpec

from .gan import Generator


def code_revision(repo: Path | None = None) -> str:
    """``git rev-parse HEAD`` of the repository holding this code, else ``"unknown"``."""
    where = repo or Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    rev = out.stdout.strip()
    return rev if len(rev) == 40 else "unknown"


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def default_version() -> str:
    """A date-based version, e.g. ``2025.11.23-0750``."""
    return datetime.now(UTC).strftime("%Y.%m.%d-%H%M")


def target_network(spec: MLPSpec) -> TargetNetwork:
    return TargetNetwork(
        arch=spec.name,
        layer_sizes=list(spec.layer_sizes),
        activation=spec.activation,
        num_params=spec.num_params,
    )


def write_checkpoint(
    path: str | Path,
    generator: Generator,
    spec: MLPSpec,
    *,
    design: str,
    basis_dtype: str,
    anomaly: AnomalyCalibration,
    model_id: str,
    version: str,
    data: dict[str, Any],
    sampler: dict[str, Any],
    distillation: dict[str, Any],
    metrics: dict[str, Any],
    num_samples_default: int = 100,
) -> tuple[str, CheckpointMeta]:
    """Validate and write the checkpoint; returns its sha256 and metadata."""
    if generator.num_params != spec.num_params:
        raise ValueError(
            f"generator makes {generator.num_params} weights, {spec.name} has {spec.num_params}"
        )
    meta = CheckpointMeta(
        model_id=model_id,
        version=version,
        target=target_network(spec),
        input=InputConvention(scale=1.0),
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


def generator_from_checkpoint(ckpt: Checkpoint) -> Generator:
    """The torch :class:`Generator` of a loaded checkpoint (standardisation already folded
    into its last layer, so ``scale = 1`` and ``shift = 0``)."""
    import torch

    g = ckpt.meta.generator
    t = {k: torch.from_numpy(v.copy()) for k, v in ckpt.tensors.items()}
    gen = Generator(
        g.noise_dim,
        g.hidden_sizes,
        g.output_dim,
        basis=t.get(BASIS),
        mean=t.get(MEAN),
        residual_std=t.get(RESIDUAL_STD),
    )
    linears = [m for m in gen.net if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for i, lin in enumerate(linears):
            lin.weight.copy_(t[f"{LAYER_PREFIX}{i}.weight"].T)
            lin.bias.copy_(t[f"{LAYER_PREFIX}{i}.bias"])
    return gen.eval()
