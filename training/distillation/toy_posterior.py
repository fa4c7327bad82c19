"""A 2-D classification posterior with known, separated modes: does a generator cover them?

The model is a two-layer linear classifier with a diagonal first layer (a factorised logistic
regression). For inputs ``x in R^2`` and parameters ``theta = (u_1, u_2, v_1, v_2, b)``,

    p(y = 1 | x, theta) = sigmoid(sum_i x_i u_i v_i + b),
    prior  theta ~ N(0, sigma^2 I_5).

The likelihood depends on ``u_i`` and ``v_i`` only through ``w_i = u_i v_i``, so flipping the
signs of ``(u_i, v_i)`` leaves it unchanged: with data that pin both ``w_i`` away from 0, the
posterior has exactly ``2^2 = 4`` modes, one per sign pattern of ``(u_1, u_2)``, each a curved
ridge around the hyperbolae ``u_i v_i = w_i``. Between them, where some ``w_i ~ 0``, the
likelihood drops by hundreds of nats (for the default 200 points), so SGLD chains never cross:
started in different orthants, they sample different modes, as chains started apart do in
a network's posterior.

Mode coverage: a draw belongs to mode ``m`` when its sign pattern is ``m`` *and* its log
posterior is at least the ``q``-quantile of the SGLD samples' (it sits on the ridge, not in
the valley between modes). A mode is covered when at least ``min_share`` of the draws
belong to it (the posterior puts 1/4 on each). A Gaussian fitted to the samples cannot do
this: its mean sits between the modes (the sign flips cancel) and most of its mass falls in
the valleys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np
import torch
from numpy.typing import NDArray

from apd.checkpoint import Design
from training import sgld

from .gan import Generator, WGANGPConfig
from .offline import DistillConfig, distill_offline

NUM_PARAMS: Final = 5
NUM_MODES: Final = 4


@dataclass(frozen=True)
class ToyProblem:
    """Data ``x (N, 2)``, labels ``y (N,)`` in {0, 1}, and the prior's std."""

    x: NDArray[np.float32]
    y: NDArray[np.float32]
    prior_std: float
    true_w: tuple[float, float]
    true_b: float


def make_problem(
    n: int = 200,
    true_w: tuple[float, float] = (2.0, -2.0),
    true_b: float = 0.0,
    prior_std: float = 1.0,
    seed: int = 0,
) -> ToyProblem:
    """``x ~ N(0, I_2)``, ``y ~ Bernoulli(sigmoid(x @ true_w + true_b))``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 2)).astype(np.float32)
    logits = x @ np.asarray(true_w, dtype=np.float32) + true_b
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    return ToyProblem(x=x, y=y, prior_std=prior_std, true_w=true_w, true_b=true_b)


def logits(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(K, 5)``, ``(N, 2)`` -> ``(K, N)``: ``sum_i x_i u_i v_i + b``."""
    w = theta[:, 0:2] * theta[:, 2:4]
    return w @ x.T + theta[:, 4:5]


def predict_proba(theta: NDArray[np.float32], x: NDArray[np.float32]) -> NDArray[np.float32]:
    """``p(y = 1 | x, theta_k)`` for K parameter vectors on M points: ``(K, M)``."""
    t, xs = torch.as_tensor(theta, dtype=torch.float32), torch.as_tensor(x, dtype=torch.float32)
    return torch.sigmoid(logits(t, xs)).numpy()


def mean_log_likelihood(problem: ToyProblem) -> sgld.LogLikelihood:
    """Full-batch ``1/N sum_n log p(y_n | x_n, theta)`` per chain, for :mod:`training.sgld`."""
    x, y = torch.from_numpy(problem.x), torch.from_numpy(problem.y)

    def ll(theta: torch.Tensor, batch: object) -> torch.Tensor:
        del batch
        f = logits(theta, x)
        return -torch.nn.functional.binary_cross_entropy_with_logits(
            f, y.expand_as(f), reduction="none"
        ).mean(dim=1)

    return ll


def log_posterior(problem: ToyProblem, theta: NDArray[np.floating]) -> NDArray[np.float64]:
    """Unnormalised ``log p(theta | D)`` of each row of ``theta (K, 5)``."""
    t = torch.as_tensor(np.asarray(theta), dtype=torch.float64)
    x = torch.from_numpy(problem.x).double()
    y = torch.from_numpy(problem.y).double()
    f = logits(t, x)
    ll = -torch.nn.functional.binary_cross_entropy_with_logits(
        f, y.expand_as(f), reduction="none"
    ).sum(dim=1)
    lp = -(t**2).sum(dim=1) / (2.0 * problem.prior_std**2)
    return (ll + lp).numpy()


def mode_of(theta: NDArray[np.floating]) -> NDArray[np.int64]:
    """Mode index ``0..3`` of each row: the sign pattern of ``(u_1, u_2)`` as two bits."""
    t = np.asarray(theta)
    return ((t[:, 0] > 0).astype(np.int64) << 1) | (t[:, 1] > 0).astype(np.int64)


def mode_starts(problem: ToyProblem, chains_per_mode: int) -> torch.Tensor:
    """Starting points ``(4 * chains_per_mode, 5)``: chains ``c`` with ``c // chains_per_mode
    = m`` start on mode m's ridge, ``u_i = s_i sqrt|w_i|``, ``v_i = s_i sign(w_i) sqrt|w_i|``
    with ``(s_1, s_2)`` the mode's sign pattern and ``w`` the data-generating weights."""
    rows = []
    for m in range(NUM_MODES):
        signs = (1.0 if m & 2 else -1.0, 1.0 if m & 1 else -1.0)
        u = [s * math.sqrt(abs(w)) for s, w in zip(signs, problem.true_w, strict=True)]
        v = [math.copysign(abs(ui), ui * w) for ui, w in zip(u, problem.true_w, strict=True)]
        rows += [[*u, *v, problem.true_b]] * chains_per_mode
    return torch.tensor(rows, dtype=torch.float32)


@dataclass(frozen=True)
class ToySamples:
    theta: NDArray[np.float32]  # (S, 5)
    chain: NDArray[np.int64]  # (S,)


def sample_posterior(
    problem: ToyProblem,
    chains_per_mode: int = 4,
    steps: int = 4000,
    burn_in: int = 1000,
    thinning: int = 10,
    lr: float = 0.01,
    seed: int = 0,
) -> ToySamples:
    """Full-batch SGLD (:mod:`training.sgld`, i.e. the unadjusted Langevin algorithm) with
    chains started in every mode; ``lr`` is the step on the mean loss (see that module)."""
    n = len(problem.x)
    settings = sgld.SGLDSettings(
        num_data=n, schedule=sgld.StepSchedule(lr=lr), prior_std=problem.prior_std
    )
    transform = sgld.build(mean_log_likelihood(problem), settings)
    state = transform.init(mode_starts(problem, chains_per_mode))
    rng = torch.Generator().manual_seed(seed)
    kept: list[NDArray[np.float32]] = []

    def keep(s: sgld.SGLDState) -> None:
        kept.append(s.params.numpy().copy())

    sgld.sample(
        transform,
        state,
        iter(lambda: None, 1),
        steps,
        burn_in,
        thinning,
        settings.schedule,
        keep,
        rng,
        progress=False,
    )
    theta = np.concatenate(kept)
    c = state.params.shape[0]
    chain = np.tile(np.arange(c), len(kept))
    return ToySamples(theta=theta, chain=chain)


@dataclass(frozen=True)
class ModeCoverage:
    shares: tuple[float, ...]  # fraction of all draws that belong to each mode
    on_ridge: float  # fraction of draws whose log posterior clears the threshold
    covered: int  # modes with share >= min_share

    def to_dict(self) -> dict[str, object]:
        return {
            "modes_covered": self.covered,
            "of_modes": NUM_MODES,
            "mode_shares": [round(s, 4) for s in self.shares],
            "on_ridge_fraction": round(self.on_ridge, 4),
        }


def mode_coverage(
    problem: ToyProblem,
    draws: NDArray[np.floating],
    reference: NDArray[np.floating],
    quantile: float = 0.01,
    min_share: float = 0.05,
) -> ModeCoverage:
    """Which of the 4 modes ``draws`` cover (module docstring); ``reference`` are the SGLD
    samples that set the log-posterior threshold."""
    threshold = float(np.quantile(log_posterior(problem, reference), quantile))
    ok = log_posterior(problem, draws) >= threshold
    modes = mode_of(draws)
    shares = tuple(float(np.mean(ok & (modes == m))) for m in range(NUM_MODES))
    return ModeCoverage(
        shares=shares, on_ridge=float(ok.mean()), covered=sum(s >= min_share for s in shares)
    )


def gaussian_draws(samples: NDArray[np.floating], k: int, seed: int = 0) -> NDArray[np.float32]:
    """``k`` draws from the Gaussian with the samples' mean and full covariance."""
    s = np.asarray(samples, dtype=np.float64)
    rng = np.random.default_rng(seed)
    cov = np.cov(s, rowvar=False) + 1e-9 * np.eye(s.shape[1])
    return rng.multivariate_normal(s.mean(axis=0), cov, size=k).astype(np.float32)


def expected_share() -> float:
    """The posterior mass of each mode (they are images of each other under sign flips)."""
    return 1.0 / NUM_MODES


def separation_nats(problem: ToyProblem) -> float:
    """How far (in log posterior) the valley ``w_1 = 0`` lies below a mode's ridge: the log
    posterior lost by zeroing ``(u_1, v_1)`` at the data-generating parameters."""
    on = mode_starts(problem, 1)[:1].numpy()
    off = on.copy()
    off[0, 0] = off[0, 2] = 0.0
    return float(log_posterior(problem, on)[0] - log_posterior(problem, off)[0])


def toy_config(steps: int = 1000, conditional: bool = True, seed: int = 0) -> DistillConfig:
    """The default design at toy scale: a 4-dim subspace of the 5 weights plus residual,
    a smaller WGAN-GP, chain-conditional unless ``conditional`` is false."""
    return DistillConfig(
        design=Design.SUBSPACE,
        gan=WGANGPConfig(
            noise_dim=8,
            generator_hidden=(64, 64),
            critic_hidden=(64, 64),
            lr=3e-3,
            lr_end_fraction=0.1,
            ema_decay=0.99,
        ),
        steps=steps,
        rank=4,
        basis_dtype="float32",
        condition_on_chains=conditional,
        residual_scales=(1.0,),
        eval_every=steps,
        seed=seed,
    )


def distill_toy(
    samples: ToySamples, steps: int = 1000, conditional: bool = True, seed: int = 0
) -> Generator:
    """Algorithm 1 (:func:`training.distillation.offline.distill_offline`) on the toy samples."""
    result = distill_offline(
        samples.theta,
        toy_config(steps, conditional, seed),
        chains=samples.chain,
        progress=False,
        threads=1,
    )
    return result.generator
