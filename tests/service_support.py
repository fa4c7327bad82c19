"""Shared helpers for the service tests: a small random APD checkpoint and a Redis to talk to.

Not a test module (no ``test_`` prefix) and not a conftest: test files import what they use.
The checkpoint is random but well formed (it passes :func:`apd.checkpoint.load_checkpoint`),
with anomaly thresholds calibrated on random inputs at a 50% target rate so that both
flagged and unflagged inputs occur.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from apd.checkpoint import (
    LAYER_PREFIX,
    MEAN,
    RESIDUAL_STD,
    AnomalyCalibration,
    BasisDtype,
    CheckpointMeta,
    GeneratorConfig,
    Provenance,
    TargetNetwork,
    encode_basis,
    load_checkpoint,
    save_checkpoint,
)
from apd.networks import MLPSpec, NetworkSpec, forward_probs
from apd.uncertainty import PREDICTIVE_SCORES, ScoreName, calibrate_threshold, summarize

TARGET_SIZES = (784, 32, 10)
Design = Literal["subspace", "paper"]


def random_images(n: int, seed: int = 0) -> NDArray[np.float32]:
    """``n`` random 784-pixel images in [0, 1]: half noise, half sparse 'strokes'."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, 784), dtype=np.float32)
    x[: n // 2] *= rng.random((n // 2, 784)) < 0.2
    return x


def make_checkpoint(
    path: Path,
    *,
    design: Design = "subspace",
    seed: int = 0,
    model_id: str = "test-fcnn",
    noise_dim: int = 8,
    rank: int = 12,
    sizes: tuple[int, ...] = TARGET_SIZES,
    hidden: tuple[int, ...] = (16,),
    arch: str = "fcnn-test",
    residual: bool = False,
    basis_dtype: BasisDtype = "float32",
    spec: NetworkSpec | None = None,
) -> Path:
    """Write a random checkpoint of a ``sizes`` (default ``784-32-10``) target network, or of
    ``spec`` (any architecture, a CNN included) when given.

    ``residual`` (subspace design only) adds residual noise (float16 std), so that the
    networks leave the affine subspace and the service adds the noise in its forward."""
    rng = np.random.default_rng(seed)
    spec = spec or MLPSpec(arch, sizes)
    p = spec.num_params
    # Per-weight scale of a He-initialised target network.
    scale = np.empty(p, np.float32)
    for fan_in, (ws, bs) in zip(spec.fan_ins(), spec.offsets(), strict=True):
        scale[ws] = np.sqrt(2.0 / fan_in)
        scale[bs] = 0.1
    out_dim = rank if design == "subspace" else p
    gen_sizes = [noise_dim, *hidden, out_dim]
    tensors: dict[str, NDArray[np.float32]] = {}
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(gen_sizes)):
        w = rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)
        if design == "paper" and i == len(gen_sizes) - 2:
            w = w * scale
        tensors[f"{LAYER_PREFIX}{i}.weight"] = w.astype(np.float32)
        tensors[f"{LAYER_PREFIX}{i}.bias"] = (0.1 * rng.standard_normal(fan_out)).astype(np.float32)
    if design == "subspace":
        basis = rng.standard_normal((rank, p)) * scale / np.sqrt(rank)
        tensors |= encode_basis(basis, basis_dtype)
        tensors[MEAN] = (rng.standard_normal(p) * scale).astype(np.float32)
        if residual:
            tensors[RESIDUAL_STD] = (0.2 * scale * rng.random(p)).astype(np.float16)
    generator = GeneratorConfig(
        noise_dim=noise_dim,
        hidden_sizes=list(hidden),
        output_dim=out_dim,
        has_basis=design == "subspace",
        has_mean=design == "subspace",
        has_residual=design == "subspace" and residual,
        basis_dtype=basis_dtype,
        design=design,
    )
    placeholder = {s: 1.0 for s in PREDICTIVE_SCORES}
    meta = CheckpointMeta(
        model_id=model_id,
        version=f"test-{seed}",
        target=TargetNetwork.of(spec),
        generator=generator,
        num_samples_default=20,
        anomaly=AnomalyCalibration(
            default_score=ScoreName.MUTUAL_INFORMATION,
            target_fpr=0.5,
            thresholds=placeholder,
            calibration_set="random test images",
            calibration_size=64,
            num_samples=50,
        ),
        provenance=Provenance(created_at="2024-01-01T00:00:00Z", code_revision="test"),
    )
    save_checkpoint(path, meta, tensors)
    # Calibrate thresholds on random images with the checkpoint's own networks.
    ckpt = load_checkpoint(path)
    z = rng.standard_normal((50, noise_dim), dtype=np.float32)
    eps = rng.standard_normal((50, p), dtype=np.float32)
    theta = ckpt.generate(z, eps if ckpt.meta.generator.has_residual else None)
    summary = summarize(forward_probs(spec, theta, random_images(64, seed + 1)))
    thresholds = {s: calibrate_threshold(summary.score(s), 0.5) for s in PREDICTIVE_SCORES}
    anomaly = meta.anomaly.model_copy(update={"thresholds": thresholds})
    save_checkpoint(path, meta.model_copy(update={"anomaly": anomaly}), tensors)
    return path


def make_client(app: Any) -> Any:
    """FastAPI's TestClient (imported quietly: Starlette deprecates its httpx transport)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    return TestClient(app)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def redis_url_for_tests() -> str:
    return os.environ.get("APD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def redis_available(url: str) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


@contextmanager
def redis_prefix(url: str) -> Iterator[str]:
    """A fresh key prefix; every key under it is deleted afterwards."""
    import redis

    prefix = f"apd-test-{uuid.uuid4().hex[:12]}"
    try:
        yield prefix
    finally:
        try:
            client = redis.Redis.from_url(url, socket_timeout=2)
            keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()
        except (redis.RedisError, OSError):
            pass


def weight_noise_matching(
    spec: MLPSpec,
    residual_std: NDArray[np.float32],
    residual: NDArray[np.float32],
    x: NDArray[np.float32],
) -> NDArray[np.float32]:
    """The weight-space noise ``eps (K, P)`` under which the networks
    ``offset + c @ directions + residual_std * eps`` give, on the one input ``x (D,)``, exactly
    what the factored forward gives for the networks' residual codes ``residual (K, H1 +
    P_tail)`` (``xi``, then ``eps_tail``): each unit's first-layer noise ``x @ (s_W * E) + s_b
    * e`` is set to ``sigma(x) * xi`` by ``E_ij = xi_j x_i s_ij / sigma_j`` and ``e_j = xi_j s_bj
    / sigma_j``. Written from the definitions, independently of :mod:`apd.factored`."""
    (ws, bs), *_ = spec.offsets()
    h1 = bs.stop - bs.start
    s_w = residual_std[ws].astype(np.float64).reshape(-1, h1)
    s_b = residual_std[bs].astype(np.float64)
    sigma = np.sqrt((x.astype(np.float64) ** 2) @ s_w**2 + s_b**2)
    xi = residual[:, :h1].astype(np.float64)
    eps = np.empty((len(residual), spec.num_params), np.float64)
    eps[:, ws] = (xi[:, None, :] * (x[:, None] * s_w / sigma)[None]).reshape(len(residual), -1)
    eps[:, bs] = xi * (s_b / sigma)
    eps[:, bs.stop :] = residual[:, h1:]
    return eps.astype(np.float32)
