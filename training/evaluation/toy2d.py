"""Experiment 5: the toy picture (Wang et al. 2018, Figure 2).

Two-class 2-D data as in the reference code's ``train_toy2d.py``: 10 points from
``N((-2, -2), 0.3 I)`` (class 0) and 10 from ``N((2, 2), 0.3 I)`` (class 1). A small ReLU
MLP (2-50-2, the same flat layout as the MNIST networks) is fitted three ways:

* SGLD (:mod:`training.sgld`, full batch, several chains from independent initialisations);
* APD, distilled offline from those SGLD samples with
  :func:`training.distillation.offline.distill_offline`, in both designs: the paper's (the generator
  outputs all 252 weights, as in the paper's Figure 2) and our default subspace design
  (rank 20 plus residual noise). There is no held-out toy set, so no validation monitor:
  the generator after the last step is used, with the fitted residual noise level;
* MC-Dropout (:func:`training.baselines.train_point_estimate`, p = 0.5).

Each method's predictive entropy and mutual information are drawn over a grid of the plane,
with the training points on top. Away from the data a Bayesian predictive should grow
uncertain, and APD should look like SGLD. The numbers reported with the figure: each
method's mean entropy and mutual information near the data and far from it, and the mean
KL divergence from SGLD's predictive to APD's over the grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from apd.networks import MLPSpec
from apd.uncertainty import PredictiveSummary
from training import metrics, sgld, torch_ops
from training.evaluation.methods import MemberNetworks
from training.evaluation.results import (
    ToyMethodNumbers,
    ToyNumbers,
    ToySection,
    ToySettingsRecord,
    as_record,
)

TOY_SPEC: Final = MLPSpec("toy2d", (2, 50, 2))
APD_PAPER: Final = "APD (paper design)"
APD_SUBSPACE: Final = "APD (subspace design)"
GRID_LIMIT: Final = 6.0


@dataclass(frozen=True)
class ToySettings:
    points_per_class: int = 10
    sgld_chains: int = 4
    sgld_steps: int = 6000
    sgld_burn_in: int = 1000
    sgld_thinning: int = 10
    sgld_lr: float = 0.05
    prior_std: float = 1.0
    apd_steps: int = 2000
    apd_rank: int = 20
    dropout: float = 0.5
    dropout_epochs: int = 3000
    num_samples: int = 100
    dropout_passes: int = 200
    grid_size: int = 121
    seed: int = 0

    def to_dict(self) -> ToySettingsRecord:
        return as_record(self, ToySettingsRecord)


@dataclass(frozen=True)
class ToyData:
    x: NDArray[np.float32]  # (2n, 2)
    y: NDArray[np.int64]  # (2n,)


def make_data(points_per_class: int, seed: int) -> ToyData:
    rng = np.random.default_rng(seed)
    cov = np.eye(2) * 0.3
    x0 = rng.multivariate_normal([-2.0, -2.0], cov, size=points_per_class)
    x1 = rng.multivariate_normal([2.0, 2.0], cov, size=points_per_class)
    x = np.vstack([x0, x1]).astype(np.float32)
    y = np.repeat(np.arange(2), points_per_class).astype(np.int64)
    return ToyData(x, y)


def grid(size: int) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """The axis ``(size,)`` and the points ``(size * size, 2)`` (x varies fastest)."""
    axis = np.linspace(-GRID_LIMIT, GRID_LIMIT, size, dtype=np.float32)
    gx, gy = np.meshgrid(axis, axis)
    return axis, np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.float32)


def _full_batch_loglik(spec: MLPSpec, data: ToyData) -> sgld.LogLikelihood:
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)

    def ll(theta: torch.Tensor, batch: object) -> torch.Tensor:
        del batch
        logp = F.log_softmax(torch_ops.forward_logits(spec, theta, x), dim=-1)
        return logp.gather(-1, y.view(1, -1, 1).expand(theta.shape[0], -1, 1)).squeeze(-1).mean(1)

    return ll


def sample_sgld(data: ToyData, s: ToySettings) -> NDArray[np.float32]:
    """SGLD samples ``(S, P)`` of the toy posterior (chains from independent inits)."""
    from training.baselines import init_theta

    settings = sgld.SGLDSettings(
        num_data=len(data.x), schedule=sgld.StepSchedule(lr=s.sgld_lr), prior_std=s.prior_std
    )
    transform = sgld.build(_full_batch_loglik(TOY_SPEC, data), settings)
    gen = torch.Generator().manual_seed(s.seed)
    state = transform.init(init_theta(TOY_SPEC, s.sgld_chains, gen))
    kept: list[NDArray[np.float32]] = []
    sgld.sample(
        transform,
        state,
        iter(lambda: None, 1),
        s.sgld_steps,
        s.sgld_burn_in,
        s.sgld_thinning,
        settings.schedule,
        lambda st: kept.append(st.params.numpy().copy()),
        gen,
        progress=False,
    )
    return np.concatenate(kept).astype(np.float32)


def distill_apd(samples: NDArray[np.float32], s: ToySettings, design: str) -> NDArray[np.float32]:
    """``num_samples`` networks from a generator distilled offline from ``samples``.

    ``paper``: the generator outputs all P weights (Wang et al.'s design, cheap at P = 252);
    ``subspace``: the default design (rank ``apd_rank`` plus residual noise). Both use the
    default preset's learning-rate schedule, since the paper's 100,000 steps are not needed
    for a 252-weight network.
    """
    from training.distillation.offline import distill_offline, preset

    common: dict[str, Any] = {
        "steps": s.apd_steps,
        "max_train_samples": None,
        "eval_every": s.apd_steps,
        "seed": s.seed,
        "lr": 1e-3,
        "lr_end_fraction": 0.1,
    }
    if design == "paper":
        config = preset("paper", **common)
    else:
        config = preset(
            "default",
            rank=min(s.apd_rank, len(samples) - 1),
            basis_dtype="float32",
            residual_scales=(1.0,),
            **common,
        )
    result = distill_offline(samples, config, progress=False)
    rng = torch.Generator().manual_seed(s.seed + 1)
    return result.generator.sample(s.num_samples, rng).numpy().astype(np.float32)


def train_dropout(data: ToyData, s: ToySettings) -> NDArray[np.float32]:
    from training.baselines import PointTrainSettings, train_point_estimate

    settings = PointTrainSettings(
        lr=0.05,
        momentum=0.9,
        weight_decay=1e-3,
        batch_size=len(data.x),
        epochs=s.dropout_epochs,
        dropout=s.dropout,
    )
    gen = torch.Generator().manual_seed(s.seed + 2)
    theta = train_point_estimate(
        TOY_SPEC, torch.from_numpy(data.x), torch.from_numpy(data.y), settings, gen, False
    )
    return theta.numpy().astype(np.float32)


@dataclass(frozen=True)
class ToyResult:
    settings: ToySettings
    data: ToyData
    axis: NDArray[np.float32]
    summaries: dict[str, PredictiveSummary]  # method label -> summary over the grid
    numbers: ToyNumbers

    def to_dict(self) -> ToySection:
        """The record: the settings, then :class:`ToyNumbers`."""
        return {"settings": self.settings.to_dict(), **self.numbers}


def run_toy(s: ToySettings) -> ToyResult:
    data = make_data(s.points_per_class, s.seed)
    axis, points = grid(s.grid_size)
    samples = sample_sgld(data, s)
    spread = samples[np.linspace(0, len(samples) - 1, s.num_samples).astype(np.int64)]
    apd_paper = distill_apd(samples, s, "paper")
    apd_subspace = distill_apd(samples, s, "subspace")
    members = {
        "SGLD": MemberNetworks(TOY_SPEC, torch.from_numpy(spread)),
        APD_PAPER: MemberNetworks(TOY_SPEC, torch.from_numpy(apd_paper)),
        APD_SUBSPACE: MemberNetworks(TOY_SPEC, torch.from_numpy(apd_subspace)),
        "MC-Dropout": MemberNetworks(
            TOY_SPEC, torch.from_numpy(train_dropout(data, s)), s.dropout, s.dropout_passes
        ),
    }
    summaries = {name: m.summary(points, s.seed) for name, m in members.items()}
    dist = np.sqrt(
        np.minimum(
            ((points - np.array([-2.0, -2.0])) ** 2).sum(1),
            ((points - np.array([2.0, 2.0])) ** 2).sum(1),
        )
    )
    near, far = dist <= 1.5, dist >= 4.0
    per_method: dict[str, ToyMethodNumbers] = {}
    for name, summ in summaries.items():
        train_probs = members[name].summary(data.x, s.seed).probabilities
        per_method[name] = {
            "train_accuracy": metrics.accuracy(train_probs, data.y),
            "entropy_near_data": float(summ.predictive_entropy[near].mean()),
            "entropy_far": float(summ.predictive_entropy[far].mean()),
            "mi_near_data": float(summ.mutual_information[near].mean()),
            "mi_far": float(summ.mutual_information[far].mean()),
        }
    numbers: ToyNumbers = {
        "sgld_samples": len(samples),
        "per_method": per_method,
        "kl_from_sgld_grid": {
            name: float(
                metrics.kl_divergence(
                    summaries["SGLD"].probabilities, summaries[name].probabilities
                ).mean()
            )
            for name in summaries
            if name != "SGLD"
        },
        "regions": "near: within 1.5 of a class centre; far: at least 4 from both",
    }
    return ToyResult(s, data, axis, summaries, numbers)


def plot_toy(result: ToyResult, path: Path, caption: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result.summaries)
    n = result.axis.size
    rows = [
        ("predictive entropy (nats)", "predictive_entropy"),
        ("mutual information (nats)", "mutual_information"),
    ]
    fig, axes = plt.subplots(
        len(rows), len(names), figsize=(4.2 * len(names), 7.6), squeeze=False, layout="constrained"
    )
    extent = (-GRID_LIMIT, GRID_LIMIT, -GRID_LIMIT, GRID_LIMIT)
    for r, (title, attr) in enumerate(rows):
        vmax = max(float(getattr(s, attr).max()) for s in result.summaries.values())
        vmax = vmax if vmax > 0 else math.log(2)
        for c, name in enumerate(names):
            ax = axes[r][c]
            img = getattr(result.summaries[name], attr).reshape(n, n)
            im = ax.imshow(img, origin="lower", extent=extent, cmap="viridis", vmin=0, vmax=vmax)
            for cls, marker in ((0, "o"), (1, "s")):
                pts = result.data.x[result.data.y == cls]
                ax.scatter(pts[:, 0], pts[:, 1], marker=marker, c="white", edgecolors="black", s=28)
            ax.set_title(f"{name}: {title}", fontsize=10)
            ax.set_xticks([-5, 0, 5])
            ax.set_yticks([-5, 0, 5])
        fig.colorbar(im, ax=list(axes[r]), shrink=0.85)
    fig.text(0.0, -0.01, caption, fontsize=7, ha="left", va="top", wrap=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
