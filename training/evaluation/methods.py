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
* ``gaussian``  one Gaussian fitted to the same SGLD samples across all chains, covariance
                rank-R plus diagonal (:class:`GaussianPosterior`). An illustration of what
                one Gaussian over separated modes does, not a fair peer.
* ``mixture``   a mixture of SWAG Gaussians (Maddox et al. 2019) fitted to the same SGLD
                samples, one component per chain or per (chain, cycle): what MultiSWAG
                does (:class:`GaussianMixturePosterior`).
* ``laplace_ll``, ``laplace_kfac``  laplace-torch on the SGD network, last layer or all
                layers, KFAC (:mod:`training.evaluation.laplace_peer`).
* ``apd``       the APD generator checkpoint: ``theta = mean + G(z) basis + residual_std eps``.

Every method says how many bytes it needs to store to serve (:meth:`stored_bytes`) and
where it came from (:meth:`provenance`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np
import torch
from numpy.typing import NDArray

from apd.checkpoint import Checkpoint
from apd.networks import NetworkSpec
from apd.uncertainty import PredictiveSummary, summarize
from training import torch_ops
from training.defaults import DROPOUT_PASSES
from training.distillation.package import sample_networks
from training.errors import UserError
from training.evaluation.results import Provenance
from training.run_layout import CONFIG_FILE, SAMPLES_DIR, WEIGHTS_FILE

F32 = NDArray[np.float32]

# Elements of the largest hidden activation tensor held at once when predicting (~80 MB).
_ACTIVATION_BUDGET: Final = 20_000_000


@dataclass(frozen=True)
class MemberNetworks:
    """K networks to predict with: ``theta (M, P)`` float32 and, for MC-Dropout, its rate(s)
    (:data:`training.torch_ops.DropoutRate`).

    Without dropout the K = M rows are the networks. With ``dropout > 0`` there is one
    network (M = 1) and the members are ``passes`` stochastic forward passes of it, each with
    its own masks, drawn from ``generator`` (fresh masks at every call).
    """

    spec: NetworkSpec
    theta: torch.Tensor
    dropout: torch_ops.DropoutRate = 0.0
    passes: int = 1
    # APD: the checkpoint the networks were drawn from; its data-support fit, anomaly
    # calibration and recalibration map are what the service answers with (:meth:`summary`,
    # :meth:`served_probabilities`).
    checkpoint: Checkpoint | None = None

    def __post_init__(self) -> None:
        if self.theta.ndim != 2 or self.theta.shape[1] != self.spec.num_params:
            raise ValueError(
                f"expected theta (M, {self.spec.num_params}), got {tuple(self.theta.shape)}"
            )
        torch_ops.dropout_rates(self.spec, self.dropout)  # checks the rates
        if self.stochastic and (self.theta.shape[0] != 1 or self.passes < 1):
            raise ValueError("MC-Dropout members need one network and at least one pass")

    @property
    def stochastic(self) -> bool:
        """Whether the members are dropout passes of one network."""
        return torch_ops.has_dropout(self.dropout)

    @property
    def num_members(self) -> int:
        return self.passes if self.stochastic else int(self.theta.shape[0])

    def logits(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``x (N, D) -> (K, N, C)``, differentiable in ``x`` (the attacks use this)."""
        if not self.stochastic:
            return torch_ops.forward_logits(self.spec, self.theta, x)
        return torch_ops.mc_dropout_logits(
            self.spec, self.theta, x, self.dropout, self.passes, generator
        )

    def probs(self, x: NDArray[np.floating] | torch.Tensor, seed: int = 0) -> F32:
        """Softmax outputs ``(K, N, C)`` float32, in chunks of inputs; masks seeded by ``seed``."""
        widest = self.spec.max_activations
        probs = torch_ops.member_probs(
            self.spec,
            self.theta,
            x,
            dropout=self.dropout,
            passes=self.passes if self.stochastic else 1,
            generator=torch.Generator().manual_seed(seed),
            chunk=max(1, _ACTIVATION_BUDGET // (self.num_members * widest)),
        )
        return probs.numpy()

    def summary(self, x: NDArray[np.floating] | torch.Tensor, seed: int = 0) -> PredictiveSummary:
        """The posterior predictive and its uncertainty scores on ``x``, with the checkpoint's
        data-support score where it has one."""
        out = summarize(self.probs(x, seed))
        support = None if self.checkpoint is None else self.checkpoint.data_support
        if support is None:
            return out
        inputs = x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        return replace(out, data_support=support.score(inputs.reshape(len(inputs), -1)))

    def served_probabilities(self, summary: PredictiveSummary) -> NDArray[np.float64]:
        """The probabilities the method answers with: the checkpoint's served probabilities
        (:meth:`apd.checkpoint.Checkpoint.probabilities`, its recalibration map applied), or
        the predictive as it is."""
        if self.checkpoint is None:
            return summary.probabilities
        return self.checkpoint.probabilities(summary)


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
    def spec(self) -> NetworkSpec: ...

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
    spec: NetworkSpec
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

    spec: NetworkSpec
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
    def step(self) -> NDArray[np.int64]: ...

    @property
    def spec(self) -> NetworkSpec: ...

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
    def spec(self) -> NetworkSpec:
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
        out: Provenance = {
            "samples_stored": len(self.store),
            "chains": meta.get("num_chains"),
            "sampler": meta.get("sampler"),
            **self.source,
        }
        if "created_at" in meta:  # when the samples were written: which run this is
            out["samples_created_at"] = str(meta["created_at"])
        return out


@dataclass(frozen=True)
class GaussianPosterior:
    """``N(mean, F^T F + diag(d^2))``: rank-R factor ``F (R, P)`` plus a diagonal ``d (P,)``.

    Fitted to posterior samples by :func:`fit_gaussian`. A draw is
    ``theta = mean + z F + d * e`` with ``z ~ N(0, I_R)`` and ``e ~ N(0, I_P)``.
    """

    spec: NetworkSpec
    mean: F32  # (P,)
    factor: F32  # (R, P)
    diag_std: F32  # (P,)
    source: Provenance = field(default_factory=Provenance)
    key: str = "gaussian"
    label: str = "One Gaussian across chains (illustration)"

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


def sample_moments(
    samples: F32, rows: NDArray[np.int64], block: int = 1024
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per-weight mean and population variance ``mean(x^2) - mean(x)^2`` (clipped at 0) of
    ``samples[rows]``, in float64, reading ``block`` rows at a time (``samples`` may be a
    memmap)."""
    total = np.zeros(samples.shape[1], np.float64)
    total_sq = np.zeros(samples.shape[1], np.float64)
    for start in range(0, len(rows), block):
        b = np.asarray(samples[rows[start : start + block]], dtype=np.float64)
        total += b.sum(axis=0)
        total_sq += (b * b).sum(axis=0)
    mean = total / len(rows)
    return mean, np.clip(total_sq / len(rows) - mean * mean, 0.0, None)


def fit_gaussian(
    spec: NetworkSpec,
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
    mean, var = sample_moments(samples, np.arange(s, dtype=np.int64), block)
    var *= s / (s - 1)
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
class GaussianMixturePosterior:
    """A mixture of SWAG Gaussians (Maddox et al. 2019), one per mode component: MultiSWAG.

    Component ``m`` has weight ``w_m`` (its share of the samples), mean ``mu_m``, per-weight
    variance ``s_m^2`` (SWAG's ``Sigma_diag``) and a deviation matrix ``D_m (k_m, P)``, and
    the covariance of the SWAG paper,

        ``Sigma_m = 1/2 (diag(s_m^2) + D_m^T D_m / (k_m - 1))``.

    A draw picks ``m`` with probability ``w_m``, then
    ``theta = mu_m + s_m * e1 / sqrt(2) + e2 D_m / sqrt(2 (k_m - 1))``, ``e1 ~ N(0, I_P)``,
    ``e2 ~ N(0, I_k)``. Fitted by :func:`fit_mixture`. To serve it one stores, per
    component, ``mu_m``, ``s_m`` and ``D_m``: ``(2 + k_m) P`` floats.
    """

    spec: NetworkSpec
    counts: NDArray[np.int64]  # (M,) samples per component: the weights are their shares
    means: F32  # (M, P)
    diag_std: F32  # (M, P)
    deviations: tuple[F32, ...]  # M arrays (k_m, P)
    source: Provenance = field(default_factory=Provenance)
    key: str = "mixture"
    label: str = "Gaussian mixture (MultiSWAG)"

    def __post_init__(self) -> None:
        m, p = self.means.shape
        if self.diag_std.shape != (m, p) or len(self.counts) != m or len(self.deviations) != m:
            raise ValueError("a mixture needs one weight, mean, std and deviation per component")
        if any(d.ndim != 2 or d.shape[0] < 2 or d.shape[1] != p for d in self.deviations):
            raise ValueError("each component needs a deviation matrix (k >= 2, P)")

    @property
    def num_components(self) -> int:
        return int(self.means.shape[0])

    @property
    def weights(self) -> NDArray[np.float64]:
        return np.asarray(self.counts, np.float64) / float(np.sum(self.counts))

    def component_covariance(self, m: int) -> NDArray[np.float64]:
        """``Sigma_m (P, P)`` in float64 (for checks on small P)."""
        d = self.deviations[m].astype(np.float64)
        diag = np.diag(self.diag_std[m].astype(np.float64) ** 2)
        return 0.5 * (diag + d.T @ d / (d.shape[0] - 1))

    def sample_theta(self, num_samples: int, seed: int) -> F32:
        rng = np.random.default_rng(seed)
        p = self.spec.num_params
        comp = rng.choice(self.num_components, size=num_samples, p=self.weights)
        out = np.empty((num_samples, p), np.float32)
        for m in np.unique(comp):
            rows = np.flatnonzero(comp == m)
            d = self.deviations[m]
            e1 = rng.standard_normal((len(rows), p), dtype=np.float32)
            e2 = rng.standard_normal((len(rows), d.shape[0]), dtype=np.float32)
            low_rank = (e2 @ d) / np.float32(math.sqrt(d.shape[0] - 1))
            out[rows] = self.means[m] + (self.diag_std[m] * e1 + low_rank) / np.float32(
                math.sqrt(2.0)
            )
        return out

    def draw(self, num_samples: int, seed: int) -> MemberNetworks:
        return MemberNetworks(self.spec, _as_tensor(self.sample_theta(num_samples, seed)))

    def stored_bytes(self) -> int:
        p = self.spec.num_params
        floats = sum((2 + d.shape[0]) * p for d in self.deviations) + self.num_components
        return int(4 * floats)

    def provenance(self) -> Provenance:
        return {
            "components": self.num_components,
            "rank": max(d.shape[0] for d in self.deviations),
            "component_samples": [int(c) for c in self.counts],
            **self.source,
        }


def fit_mixture(
    spec: NetworkSpec,
    samples: F32,
    labels: NDArray[np.integer],
    step: NDArray[np.integer],
    rank: int,
    block: int = 1024,
) -> GaussianMixturePosterior:
    """Fit one SWAG Gaussian per label to ``samples (S, P)`` (may be a memmap).

    For the ``n_m`` samples of label ``m``: ``mu_m`` and ``s_m^2`` are their mean and
    population variance (SWAG's running first and second moments over every iterate), and
    ``D_m`` holds the deviations from ``mu_m`` of ``k_m = min(rank, n_m)`` of them, evenly
    spaced in ``step`` and ending at the latest. SWAG keeps the last ``k`` iterates of one
    SGD trajectory, a memory limit of its online fit; spreading them over the component's
    samples covers more of it when they are autocorrelated. Weights ``w_m = n_m / S``.
    """
    s, p = samples.shape
    if p != spec.num_params:
        raise ValueError(f"samples have {p} parameters, spec {spec.name} has {spec.num_params}")
    labels = np.asarray(labels)
    step = np.asarray(step)
    if labels.shape != (s,) or step.shape != (s,):
        raise ValueError(f"need one label and one step per sample ({s})")
    if rank < 2:
        raise ValueError(f"the deviation matrix needs rank >= 2, got {rank}")
    ids, counts = np.unique(labels, return_counts=True)
    if counts.min() < 2:
        raise ValueError(f"component {ids[np.argmin(counts)]} has {counts.min()} sample(s); need 2")
    means = np.empty((len(ids), p), np.float32)
    stds = np.empty((len(ids), p), np.float32)
    deviations = []
    for i, label in enumerate(ids):
        rows = np.flatnonzero(labels == label)
        rows = rows[np.argsort(step[rows], kind="stable")]
        mean, var = sample_moments(samples, rows, block)
        n = len(rows)
        k = min(rank, n)
        picked = np.sort(rows[n - 1 - spread_indices(n, k)])
        dev = np.asarray(samples[picked], dtype=np.float64) - mean
        means[i] = mean
        stds[i] = np.sqrt(var)
        deviations.append(dev.astype(np.float32))
    return GaussianMixturePosterior(
        spec=spec,
        counts=counts.astype(np.int64),
        means=means,
        diag_std=stds,
        deviations=tuple(deviations),
        source={"moment_samples": s},
    )


def fit_mixture_to_sgld(sgld: SGLDSamples, rank: int) -> GaussianMixturePosterior:
    """:func:`fit_mixture` with the distillation's mode components
    (:func:`training.distillation.offline.mode_labels`: a chain, or a chain's cycle when the
    step size is cyclical) as its components."""
    from training.distillation.offline import mode_labels

    store = sgld.store
    chain, step = np.asarray(store.chain), np.asarray(store.step)
    labels = mode_labels(chain, step, store.meta.get("sampler"))
    fit = fit_mixture(sgld.spec, store.theta, labels, step, rank)
    per_cycle = fit.num_components > len(np.unique(chain))
    return replace(
        fit,
        source={
            **fit.source,
            "component_rule": "chain and cycle" if per_cycle else "chain",
            "fitted_to": str(sgld.source.get("run", "sgld")),
        },
    )


@dataclass(frozen=True)
class GeneratorPosterior:
    """The APD generator checkpoint: ``z ~ N(0, I)`` (and ``eps ~ N(0, I_P)``) -> networks."""

    checkpoint: Checkpoint
    file_bytes: int = 0  # size of the file when it was loaded (it may be replaced later)
    key: str = "apd"
    label: str = "APD"

    @property
    def spec(self) -> NetworkSpec:
        return self.checkpoint.spec

    def draw(self, num_samples: int, seed: int) -> MemberNetworks:
        theta = sample_networks(self.checkpoint, num_samples, seed)
        return MemberNetworks(self.spec, _as_tensor(theta), checkpoint=self.checkpoint)

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
            "teacher": meta.provenance.sampler,
            "code_revision": meta.provenance.code_revision,
        }


# --------------------------------------------------------------------------- loading runs


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """``config.json`` of a run directory (empty when there is none)."""
    path = run_dir / CONFIG_FILE
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


def load_point_weights(run_dir: Path, spec: NetworkSpec) -> tuple[F32, dict[str, str]]:
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


def load_sgd(run_dir: Path, spec: NetworkSpec) -> FixedNetworks:
    theta, _ = load_point_weights(run_dir, spec)
    config = read_run_config(run_dir)
    return FixedNetworks("sgd", "SGD", spec, theta[:1], _run_source(run_dir, config))


def load_dropout(
    run_dir: Path, spec: NetworkSpec, passes: int = DROPOUT_PASSES
) -> tuple[MCDropout, int]:
    """The MC-Dropout method of a run and the number of passes it predicts with."""
    theta, meta = load_point_weights(run_dir, spec)
    config = read_run_config(run_dir)
    rate = _find_dropout_rate(meta, config)
    if rate is None:
        raise UserError(f"{run_dir}: no dropout rate in {WEIGHTS_FILE} metadata or config.json")
    return MCDropout(spec, theta[:1], rate, _run_source(run_dir, config)), passes


def load_ensemble(run_dirs: list[Path], spec: NetworkSpec) -> FixedNetworks:
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


def _layout(spec: NetworkSpec) -> dict[str, object]:
    """What makes two specs the same network, whatever their names."""
    return {k: v for k, v in spec.to_dict().items() if k != "name"}


def load_sgld(run_dir: Path, spec: NetworkSpec) -> SGLDSamples:
    from training.sample_store import SampleStore

    store = SampleStore.open(run_dir / SAMPLES_DIR)
    if _layout(store.spec) != _layout(spec):
        raise UserError(
            f"{run_dir}: samples are for {_layout(store.spec)}, not {spec.name} {_layout(spec)}"
        )
    return SGLDSamples(store, _run_source(run_dir, read_run_config(run_dir)))


def load_apd(path: Path, spec: NetworkSpec) -> GeneratorPosterior:
    from apd.checkpoint import load_checkpoint

    size = path.stat().st_size if path.is_file() else 0
    ck = load_checkpoint(path)
    if _layout(ck.spec) != _layout(spec):
        raise UserError(
            f"{path}: generator targets {_layout(ck.spec)}, not {spec.name} {_layout(spec)}"
        )
    if ck.size_bytes != size:
        raise UserError(f"{path} changed while it was being loaded; run again")
    return GeneratorPosterior(ck, file_bytes=size)
