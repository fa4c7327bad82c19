"""One interface over every posterior method the report compares.

A :class:`PosteriorMethod` draws a :class:`MemberNetworks`: K networks of one spec whose
softmax outputs ``(K, N, C)`` make the posterior predictive and its uncertainty
(:func:`apd.uncertainty.summarize`). The methods:

* ``sgd``       SGD point estimate: K = 1 (mutual information and model variance are 0).
* ``dropout``   MC-Dropout (Gal & Ghahramani 2016): one network, K stochastic passes with
                inverted dropout of rate p after every hidden layer (200 passes by default).
* ``ensemble``  deep ensemble (Lakshminarayanan et al. 2017): 5 SGD networks from 5 seeds.
* ``sgld``      SGLD samples kept on disk: K spread across chains and time
                (:meth:`training.sample_store.SampleStore.select_spread`).
* ``gaussian``  a Gaussian fitted to the same SGLD samples, covariance rank-R plus diagonal
                (SWAG-style, Maddox et al. 2019; see :class:`GaussianPosterior`).
* ``apd``       the APD generator checkpoint: ``theta = mean + G(z) basis + residual_std eps``.

Every method says how many bytes it needs to store to serve (:meth:`stored_bytes`) and
where it came from (:meth:`provenance`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np
import torch
from numpy.typing import NDArray

from apd.checkpoint import Checkpoint
from apd.networks import MLPSpec
from apd.uncertainty import PredictiveSummary, summarize
from training import torch_ops
from training.distillation.package import sample_networks
from training.errors import UserError
from training.evaluation.results import Provenance

F32 = NDArray[np.float32]

WEIGHTS_FILE: Final = "weights.safetensors"
SAMPLES_DIR: Final = "samples"
DEFAULT_DROPOUT_PASSES: Final = 200
# Elements of the largest hidden activation tensor held at once when predicting (~80 MB).
_ACTIVATION_BUDGET: Final = 20_000_000


@dataclass(frozen=True)
class MemberNetworks:
    """K networks to predict with: ``theta (M, P)`` float32 and, for MC-Dropout, a rate.

    Without dropout the K = M rows are the networks. With ``dropout > 0`` there is one
    network (M = 1) and the members are ``passes`` stochastic forward passes of it, each with
    its own masks, drawn from ``generator`` (fresh masks at every call).
    """

    spec: MLPSpec
    theta: torch.Tensor
    dropout: float = 0.0
    passes: int = 1

    def __post_init__(self) -> None:
        if self.theta.ndim != 2 or self.theta.shape[1] != self.spec.num_params:
            raise ValueError(
                f"expected theta (M, {self.spec.num_params}), got {tuple(self.theta.shape)}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout rate must lie in [0, 1), got {self.dropout}")
        if self.dropout > 0 and (self.theta.shape[0] != 1 or self.passes < 1):
            raise ValueError("MC-Dropout members need one network and at least one pass")

    @property
    def num_members(self) -> int:
        return self.passes if self.dropout > 0 else int(self.theta.shape[0])

    def logits(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``x (N, D) -> (K, N, C)``, differentiable in ``x`` (the attacks use this)."""
        if self.dropout == 0:
            return torch_ops.forward_logits(self.spec, self.theta, x)
        return torch_ops.mc_dropout_logits(
            self.spec, self.theta, x, self.dropout, self.passes, generator
        )

    def probs(self, x: NDArray[np.floating] | torch.Tensor, seed: int = 0) -> F32:
        """Softmax outputs ``(K, N, C)`` float32, in chunks of inputs; masks seeded by ``seed``."""
        widest = max(self.spec.layer_sizes[1:])
        probs = torch_ops.member_probs(
            self.spec,
            self.theta,
            x,
            dropout=self.dropout,
            passes=self.passes if self.dropout > 0 else 1,
            generator=torch.Generator().manual_seed(seed),
            chunk=max(1, _ACTIVATION_BUDGET // (self.num_members * widest)),
        )
        return probs.numpy()

    def summary(self, x: NDArray[np.floating] | torch.Tensor, seed: int = 0) -> PredictiveSummary:
        """The posterior predictive and its uncertainty scores on ``x``."""
        return summarize(self.probs(x, seed))


class PosteriorMethod(Protocol):
    """What the experiments need from a posterior method."""

    @property
    def key(self) -> str:
        """Short identifier used in tables and ``results.json`` (``sgld``, ``apd``, ...)."""
        ...

    @property
    def label(self) -> str:
        """Human name for the report."""
        ...

    @property
    def spec(self) -> MLPSpec: ...

    def draw(self, num_samples: int, seed: int) -> MemberNetworks:
        """K networks (K = ``num_samples`` where the method can vary it)."""
        ...

    def stored_bytes(self) -> int:
        """Bytes that must be stored to serve this method's predictive."""
        ...

    def provenance(self) -> Provenance:
        """Where the method came from: run directory, seed, config, file digests."""
        ...


def _as_tensor(theta: NDArray[np.floating]) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(theta, dtype=np.float32))


def spread_indices(total: int, k: int) -> NDArray[np.int64]:
    """``k`` indices evenly spaced over ``range(total)`` (all of them when ``k >= total``)."""
    if k >= total:
        return np.arange(total, dtype=np.int64)
    return np.floor(np.arange(k) * total / k).astype(np.int64)


@dataclass(frozen=True)
class FixedNetworks:
    """A fixed set of networks (SGD: one; a deep ensemble: one per seed)."""

    key: str
    label: str
    spec: MLPSpec
    theta: F32  # (M, P)
    source: Provenance = field(default_factory=Provenance)

    def draw(self, num_samples: int, seed: int) -> MemberNetworks:
        """All M networks when ``num_samples >= M``, else ``num_samples`` evenly spaced ones."""
        del seed  # nothing random
        rows = spread_indices(self.theta.shape[0], num_samples)
        return MemberNetworks(self.spec, _as_tensor(self.theta[rows]))

    def stored_bytes(self) -> int:
        return int(self.theta.shape[0] * self.spec.num_params * 4)

    def provenance(self) -> Provenance:
        return {"networks": int(self.theta.shape[0]), **self.source}


@dataclass(frozen=True)
class MCDropout:
    """One network trained with dropout, predicting with ``passes`` stochastic passes."""

    spec: MLPSpec
    theta: F32  # (1, P)
    rate: float
    source: Provenance = field(default_factory=Provenance)
    key: str = "dropout"
    label: str = "MC-Dropout"

    def draw(self, num_samples: int, seed: int) -> MemberNetworks:
        del seed  # masks are drawn at prediction time
        return MemberNetworks(self.spec, _as_tensor(self.theta), self.rate, num_samples)

    def stored_bytes(self) -> int:
        return int(self.spec.num_params * 4)

    def provenance(self) -> Provenance:
        return {"dropout": self.rate, **self.source}


class SampleSource(Protocol):
    """The part of :class:`training.sample_store.SampleStore` the SGLD method reads."""

    @property
    def theta(self) -> F32: ...

    @property
    def chain(self) -> NDArray[np.int32]: ...

    @property
    def spec(self) -> MLPSpec: ...

    @property
    def meta(self) -> dict[str, Any]: ...

    def select_spread(self, k: int) -> NDArray[np.int64]: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class SGLDSamples:
    """Stored SGLD samples; a draw reads K of them, spread across chains and time.

    SGLD's draw is deterministic (``seed`` is unused): it is the same K samples every time,
    the teacher the APD generator is measured against.
    """

    store: SampleSource
    source: Provenance = field(default_factory=Provenance)
    key: str = "sgld"
    label: str = "SGLD"

    @property
    def spec(self) -> MLPSpec:
        return self.store.spec

    def draw(self, num_samples: int, seed: int) -> MemberNetworks:
        del seed
        k = min(num_samples, len(self.store))
        rows = self.store.select_spread(k)
        return MemberNetworks(self.spec, _as_tensor(np.asarray(self.store.theta[rows])))

    def stored_bytes(self) -> int:
        """Bytes of the K = 100 samples a service would keep (the whole store is larger)."""
        return int(min(100, len(self.store)) * self.spec.num_params * 4)

    def store_bytes(self) -> int:
        return int(len(self.store) * self.spec.num_params * 4)

    def provenance(self) -> Provenance:
        meta = self.store.meta
        return {
            "samples_stored": len(self.store),
            "chains": meta.get("num_chains"),
            "sampler": meta.get("sampler"),
            **self.source,
        }


@dataclass(frozen=True)
class GaussianPosterior:
    """``N(mean, F^T F + diag(d^2))``: rank-R factor ``F (R, P)`` plus a diagonal ``d (P,)``.

    Fitted to posterior samples by :func:`fit_gaussian`. A draw is
    ``theta = mean + z F + d * e`` with ``z ~ N(0, I_R)`` and ``e ~ N(0, I_P)``.
    """

    spec: MLPSpec
    mean: F32  # (P,)
    factor: F32  # (R, P)
    diag_std: F32  # (P,)
    source: Provenance = field(default_factory=Provenance)
    key: str = "gaussian"
    label: str = "Gaussian (SWAG-style)"

    @property
    def rank(self) -> int:
        return int(self.factor.shape[0])

    def sample_theta(self, num_samples: int, seed: int) -> F32:
        rng = np.random.default_rng(seed)
        z = rng.standard_normal((num_samples, self.rank), dtype=np.float32)
        e = rng.standard_normal((num_samples, self.spec.num_params), dtype=np.float32)
        return (self.mean + z @ self.factor + self.diag_std * e).astype(np.float32)

    def draw(self, num_samples: int, seed: int) -> MemberNetworks:
        return MemberNetworks(self.spec, _as_tensor(self.sample_theta(num_samples, seed)))

    def stored_bytes(self) -> int:
        return int((self.rank + 2) * self.spec.num_params * 4)

    def provenance(self) -> Provenance:
        return {"rank": self.rank, **self.source}


def fit_gaussian(
    spec: MLPSpec,
    samples: F32,
    rank: int,
    fit_rows: NDArray[np.int64] | None = None,
    block: int = 1024,
    progress: Callable[[str], None] | None = None,
) -> GaussianPosterior:
    """Fit a rank-R plus diagonal Gaussian to ``samples (S, P)`` (may be a memmap).

    * mean and per-weight variance ``v`` over all S samples (streamed in row blocks);
    * the factor from the top-R principal directions of the samples in ``fit_rows`` (default
      all), centred at the mean: with ``X = U S V^T`` (via the Gram matrix ``X X^T``),
      ``F = diag(s_R / sqrt(n - 1)) V_R^T``;
    * the diagonal takes what the factor leaves of each weight's variance,
      ``d^2 = max(v - sum_r F_r^2, 0)``, so every marginal variance matches the samples.

    SWAG (Maddox et al. 2019) uses the last R deviations of one SGD trajectory instead of
    principal directions and splits the covariance half-and-half; with samples from several
    chains the principal directions are the better low-rank summary.
    """
    s, p = samples.shape
    if p != spec.num_params:
        raise ValueError(f"samples have {p} parameters, spec {spec.name} has {spec.num_params}")
    if s < 2:
        raise ValueError("need at least 2 samples to fit a Gaussian")
    rows = np.arange(s, dtype=np.int64) if fit_rows is None else np.asarray(fit_rows, np.int64)
    n = len(rows)
    if not 0 <= rank < n:
        raise ValueError(f"rank must lie in [0, {n - 1}] for {n} samples, got {rank}")
    total = np.zeros(p, np.float64)
    total_sq = np.zeros(p, np.float64)
    for start in range(0, s, block):
        b = np.asarray(samples[start : start + block], dtype=np.float64)
        total += b.sum(axis=0)
        total_sq += (b * b).sum(axis=0)
    mean = total / s
    var = np.clip(total_sq / s - mean * mean, 0.0, None) * s / (s - 1)
    if progress is not None:
        progress(f"gaussian: mean/variance over {s} samples; rank-{rank} factor from {n}")
    factor = np.zeros((rank, p), np.float64)
    if rank > 0:
        col_block = max(1, (1 << 24) // n)
        sub = np.asarray(samples[np.sort(rows)], dtype=np.float32)
        gram = np.zeros((n, n), np.float64)
        for c in range(0, p, col_block):
            xc = sub[:, c : c + col_block].astype(np.float64) - mean[c : c + col_block]
            gram += xc @ xc.T
        evals, evecs = np.linalg.eigh(gram)
        order = np.argsort(evals)[::-1][:rank]
        sv = np.sqrt(np.clip(evals[order], 0.0, None))
        u = evecs[:, order]  # (n, R)
        keep = sv > 1e-12 * max(1.0, float(sv.max(initial=0.0)))
        for c in range(0, p, col_block):
            xc = sub[:, c : c + col_block].astype(np.float64) - mean[c : c + col_block]
            # V_R^T = diag(1/s) U_R^T X; F = diag(s / sqrt(n-1)) V_R^T = U_R^T X / sqrt(n-1)
            factor[:, c : c + col_block] = (u.T @ xc) / math.sqrt(n - 1)
        factor[~keep] = 0.0
    diag_var = np.clip(var - (factor * factor).sum(axis=0), 0.0, None)
    return GaussianPosterior(
        spec=spec,
        mean=mean.astype(np.float32),
        factor=factor.astype(np.float32),
        diag_std=np.sqrt(diag_var).astype(np.float32),
        source={"fit_samples": n, "moment_samples": s},
    )


@dataclass(frozen=True)
class GeneratorPosterior:
    """The APD generator checkpoint: ``z ~ N(0, I)`` (and ``eps ~ N(0, I_P)``) -> networks."""

    checkpoint: Checkpoint
    file_bytes: int = 0  # size of the file when it was loaded (it may be replaced later)
    key: str = "apd"
    label: str = "APD"

    @property
    def spec(self) -> MLPSpec:
        return self.checkpoint.spec

    def draw(self, num_samples: int, seed: int) -> MemberNetworks:
        theta = sample_networks(self.checkpoint, num_samples, seed)
        return MemberNetworks(self.spec, _as_tensor(theta))

    def stored_bytes(self) -> int:
        return int(self.file_bytes or self.checkpoint.size_bytes)

    def provenance(self) -> Provenance:
        meta = self.checkpoint.meta
        return {
            "checkpoint": str(self.checkpoint.path),
            "sha256": self.checkpoint.sha256,
            "model_id": meta.model_id,
            "version": meta.version,
            "design": meta.generator.design,
            "noise_dim": meta.generator.noise_dim,
            "subspace_rank": meta.generator.output_dim if meta.generator.has_basis else None,
            "distillation": meta.provenance.distillation,
            "code_revision": meta.provenance.code_revision,
        }


# --------------------------------------------------------------------------- loading runs


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """``config.json`` of a run directory (empty when there is none)."""
    path = run_dir / "config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None
    return data if isinstance(data, dict) else {}


def _run_source(run_dir: Path, config: dict[str, Any]) -> Provenance:
    """The run directory and what its ``config.json`` says about the run."""
    out: Provenance = {"run": str(run_dir)}
    if "seed" in config:
        out["seed"] = config["seed"]
    if "method" in config:
        out["method"] = config["method"]
    if "arch" in config:
        out["arch"] = config["arch"]
    if "settings" in config:
        out["settings"] = config["settings"]
    if "code_revision" in config:
        out["code_revision"] = config["code_revision"]
    if "created_at" in config:
        out["created_at"] = config["created_at"]
    return out


def load_point_weights(run_dir: Path, spec: MLPSpec) -> tuple[F32, dict[str, str]]:
    """``theta (1, P)`` and the safetensors metadata of an SGD / MC-Dropout run."""
    from safetensors import SafetensorError, safe_open

    path = run_dir / WEIGHTS_FILE
    if not path.is_file():
        raise UserError(f"{path} does not exist; train it with: apd train ... --out {run_dir}")
    try:
        with safe_open(str(path), framework="np") as f:
            meta = dict(f.metadata() or {})
            theta = np.asarray(f.get_tensor("theta"), dtype=np.float32)
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise UserError(f"{path}: cannot read tensor 'theta' ({exc})") from None
    if theta.ndim == 1:
        theta = theta[None]
    if theta.shape[1:] != (spec.num_params,):
        raise UserError(
            f"{path}: theta has shape {theta.shape}, expected (1, {spec.num_params}) for "
            f"{spec.name}"
        )
    return theta, meta


def _find_dropout_rate(meta: dict[str, str], config: dict[str, Any]) -> float | None:
    """The dropout rate recorded by the run, from the weights' metadata or config.json."""
    candidates: list[Any] = [meta.get("dropout"), meta.get("p"), config.get("dropout")]
    settings = config.get("settings")
    if isinstance(settings, dict):
        candidates.append(settings.get("dropout"))
    for raw in meta.values():  # JSON blobs in the metadata, e.g. {"settings": {...}}
        if isinstance(raw, str) and raw.startswith("{"):
            try:
                blob = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if isinstance(blob, dict):
                candidates += [blob.get("dropout"), (blob.get("settings") or {}).get("dropout")]
    for c in candidates:
        if c is None:
            continue
        try:
            rate = float(c)
        except (TypeError, ValueError):
            continue
        if 0.0 < rate < 1.0:
            return rate
    return None


def load_sgd(run_dir: Path, spec: MLPSpec) -> FixedNetworks:
    theta, _ = load_point_weights(run_dir, spec)
    config = read_run_config(run_dir)
    return FixedNetworks("sgd", "SGD", spec, theta[:1], _run_source(run_dir, config))


def load_dropout(
    run_dir: Path, spec: MLPSpec, passes: int = DEFAULT_DROPOUT_PASSES
) -> tuple[MCDropout, int]:
    """The MC-Dropout method of a run and the number of passes it predicts with."""
    theta, meta = load_point_weights(run_dir, spec)
    config = read_run_config(run_dir)
    rate = _find_dropout_rate(meta, config)
    if rate is None:
        raise UserError(f"{run_dir}: no dropout rate in {WEIGHTS_FILE} metadata or config.json")
    return MCDropout(spec, theta[:1], rate, _run_source(run_dir, config)), passes


def load_ensemble(run_dirs: list[Path], spec: MLPSpec) -> FixedNetworks:
    if len(run_dirs) < 2:
        raise UserError(f"a deep ensemble needs at least 2 SGD runs, got {len(run_dirs)}")
    thetas, members = [], []
    for d in run_dirs:
        theta, _ = load_point_weights(d, spec)
        thetas.append(theta[:1])
        members.append(_run_source(d, read_run_config(d)))
    return FixedNetworks(
        "ensemble",
        f"Deep ensemble ({len(run_dirs)})",
        spec,
        np.concatenate(thetas),
        {"members": members},
    )


def load_sgld(run_dir: Path, spec: MLPSpec) -> SGLDSamples:
    from training.sample_store import SampleStore

    store = SampleStore.open(run_dir / SAMPLES_DIR)
    if store.spec.layer_sizes != spec.layer_sizes:
        raise UserError(
            f"{run_dir}: samples are for {list(store.spec.layer_sizes)}, not {spec.name} "
            f"{list(spec.layer_sizes)}"
        )
    return SGLDSamples(store, _run_source(run_dir, read_run_config(run_dir)))


def load_apd(path: Path, spec: MLPSpec) -> GeneratorPosterior:
    from apd.checkpoint import load_checkpoint

    size = path.stat().st_size if path.is_file() else 0
    ck = load_checkpoint(path)
    if ck.spec.layer_sizes != spec.layer_sizes:
        raise UserError(
            f"{path}: generator targets {list(ck.spec.layer_sizes)}, not {spec.name} "
            f"{list(spec.layer_sizes)}"
        )
    if ck.size_bytes != size:
        raise UserError(f"{path} changed while it was being loaded; run again")
    return GeneratorPosterior(ck, file_bytes=size)
