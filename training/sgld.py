"""Stochastic gradient Langevin dynamics for C chains at once, as small pure functions.

Welling & Teh, "Bayesian Learning via Stochastic Gradient Langevin Dynamics", ICML 2011;
the RMSprop preconditioner is pSGLD (Li, Chen, Carlson & Carin, AAAI 2016); the cyclical
step size is cSG-MCMC (Zhang, Li, Zhang, Chen & Wilson, ICLR 2020).

The target is the tempered posterior over parameters ``theta`` given N training points,

    p_T(theta | D)  ∝  exp(-U(theta) / T),
    U(theta) = -sum_{i=1}^N log p(y_i | x_i, theta) + ||theta||^2 / (2 sigma^2),

a Gaussian prior ``N(0, sigma^2 I)`` (weight decay) and temperature ``T`` (``T = 1`` is the
Bayes posterior, ``T < 1`` a "cold" one). With a minibatch ``B`` of size ``|B|`` the
likelihood term is estimated by ``N`` times the minibatch mean, so that, writing
``lbar_B(theta) = 1/|B| sum_{i in B} log p(y_i | x_i, theta)`` and ``lambda = 1 / (N sigma^2)``,

    grad U_B(theta) = N * g_t,     g_t = -grad lbar_B(theta) + lambda * theta.

Welling & Teh's update with step ``epsilon_t`` is
``theta' = theta - epsilon_t / 2 * grad U_B + N(0, epsilon_t T I)``. We parametrise it by the
learning rate ``eta_t = epsilon_t N / 2`` that the same update would have on the *mean* loss
(so ``eta`` is comparable with an SGD learning rate and does not change with N):

    theta' = theta - eta_t * g_t + sqrt(2 eta_t T / N) * xi,      xi ~ N(0, I).        (SGLD)

pSGLD preconditions with ``G_t = diag(1 / (delta + sqrt(V_t)))``, where
``V_t = alpha V_{t-1} + (1 - alpha) g_t ⊙ g_t``:

    theta' = theta - eta_t * G_t g_t + sqrt(2 eta_t T G_t / N) ⊙ xi,               (pSGLD)

dropping the small ``Gamma(theta)`` correction term, as Li et al. do in their experiments.

Every array here is a batch of C independent chains: ``params`` is ``(C, P)``, the
log-likelihood returns one value per chain, and the noise is independent per chain.
The verbs follow the ``posteriors`` library: :func:`build` returns a transform whose ``init``
makes a frozen :class:`SGLDState` and whose ``update(state, batch)`` returns the next one.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from tqdm import tqdm

from training.errors import UserError

Batch = Any
LogLikelihood = Callable[[torch.Tensor, Batch], torch.Tensor]
"""``(params (C, P), batch) -> (C,)``: each chain's *mean* log-likelihood over its minibatch."""
ValueAndGrad = Callable[[torch.Tensor, Batch], tuple[torch.Tensor, torch.Tensor]]
"""``(params (C, P), batch) -> (lbar (C,), grad lbar (C, P))``, e.g. hand-written backprop."""


class Preconditioner(enum.StrEnum):
    """Diagonal preconditioner of the Langevin step."""

    IDENTITY = "identity"  # plain SGLD (Welling & Teh 2011)
    RMSPROP = "rmsprop"  # pSGLD (Li et al. 2016)


class ScheduleKind(enum.StrEnum):
    """Shape of the step-size schedule ``eta_t``."""

    CONSTANT = "constant"
    POLYNOMIAL = "polynomial"
    CYCLICAL = "cyclical"


@dataclass(frozen=True)
class StepSchedule:
    """The step size ``eta_t`` at step ``t`` (0-based), and whether step ``t`` adds noise.

    * ``constant``:   ``eta_t = lr``.
    * ``polynomial``: ``eta_t = lr * (1 + t / decay_steps) ** -gamma``, Welling & Teh's
      ``a (b + t) ** -gamma`` with ``a = lr * decay_steps ** gamma`` and ``b = decay_steps``;
      ``sum eta_t = inf`` and ``sum eta_t^2 < inf`` for ``gamma`` in (0.5, 1].
    * ``cyclical``:   ``eta_t = lr / 2 * (cos(pi * r_t) + 1)`` with ``r_t = (t mod L) / L``
      the position inside a cycle of length ``L = cycle_steps`` (Zhang et al. 2020, eq. 1).
      The first ``explore_fraction`` of each cycle is the exploration stage, an SGD step with
      no noise; the rest is the sampling stage (Langevin noise on).
    """

    kind: ScheduleKind = ScheduleKind.CONSTANT
    lr: float = 0.1
    gamma: float = 0.55
    decay_steps: int = 10_000
    cycle_steps: int = 10_000
    explore_fraction: float = 0.0

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"step size lr must be a positive number, got {self.lr}")
        if self.decay_steps <= 0 or self.cycle_steps <= 0:
            raise ValueError("decay_steps and cycle_steps must be positive")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must lie in [0, 1], got {self.gamma}")
        if not 0.0 <= self.explore_fraction < 1.0:
            raise ValueError(f"explore_fraction must lie in [0, 1), got {self.explore_fraction}")

    def __call__(self, t: int) -> float:
        if self.kind is ScheduleKind.POLYNOMIAL:
            return self.lr * (1.0 + t / self.decay_steps) ** (-self.gamma)
        if self.kind is ScheduleKind.CYCLICAL:
            r = (t % self.cycle_steps) / self.cycle_steps
            return self.lr / 2.0 * (math.cos(math.pi * r) + 1.0)
        return self.lr

    def adds_noise(self, t: int) -> bool:
        """False in a cyclical schedule's exploration stage, True otherwise."""
        if self.kind is ScheduleKind.CYCLICAL:
            return (t % self.cycle_steps) / self.cycle_steps >= self.explore_fraction
        return True


@dataclass(frozen=True)
class SGLDSettings:
    """Everything that defines the chain's target and dynamics (see the module docstring)."""

    num_data: int
    schedule: StepSchedule
    prior_std: float = 1.0
    temperature: float = 1.0
    preconditioner: Preconditioner = Preconditioner.IDENTITY
    rmsprop_alpha: float = 0.99
    rmsprop_delta: float = 1e-5

    def __post_init__(self) -> None:
        if self.num_data <= 0:
            raise ValueError(f"num_data must be positive, got {self.num_data}")
        if not (self.prior_std > 0 and math.isfinite(self.prior_std)):
            raise ValueError(f"prior_std must be a positive number, got {self.prior_std}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 <= self.rmsprop_alpha < 1.0 or self.rmsprop_delta <= 0:
            raise ValueError("rmsprop_alpha must lie in [0, 1) and rmsprop_delta be positive")

    @property
    def weight_decay(self) -> float:
        """``lambda = 1 / (N sigma^2)``: the prior's pull on the mean-loss scale."""
        return 1.0 / (self.num_data * self.prior_std**2)

    def to_dict(self) -> dict[str, object]:
        s = self.schedule
        return {
            "num_data": self.num_data,
            "prior_std": self.prior_std,
            "temperature": self.temperature,
            "preconditioner": self.preconditioner.value,
            "rmsprop_alpha": self.rmsprop_alpha,
            "rmsprop_delta": self.rmsprop_delta,
            "schedule": {
                "kind": s.kind.value,
                "lr": s.lr,
                "gamma": s.gamma,
                "decay_steps": s.decay_steps,
                "cycle_steps": s.cycle_steps,
                "explore_fraction": s.explore_fraction,
            },
        }


@dataclass(frozen=True)
class SGLDState:
    """C chains' positions, the pSGLD second-moment estimate, and the step count."""

    params: torch.Tensor  # (C, P)
    step: int = 0
    sq_grad_avg: torch.Tensor | None = None  # (C, P), pSGLD only
    log_likelihood: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # (C,)


class InitFn(Protocol):
    def __call__(self, params: torch.Tensor) -> SGLDState: ...


class UpdateFn(Protocol):
    def __call__(
        self, state: SGLDState, batch: Batch, generator: torch.Generator | None = None
    ) -> SGLDState: ...


@dataclass(frozen=True)
class Transform:
    """``init(params) -> state`` and ``update(state, batch, generator) -> state``."""

    init: InitFn
    update: UpdateFn


def init(params: torch.Tensor, settings: SGLDSettings) -> SGLDState:
    """The state at ``params (C, P)``: a detached copy, and zero second moments for pSGLD."""
    if params.ndim != 2:
        raise ValueError(f"expected params of shape (C, P), got {tuple(params.shape)}")
    p = params.detach().clone()
    sq = torch.zeros_like(p) if settings.preconditioner is Preconditioner.RMSPROP else None
    return SGLDState(params=p, step=0, sq_grad_avg=sq, log_likelihood=torch.zeros(p.shape[0]))


def loss_gradient(
    log_likelihood: LogLikelihood, params: torch.Tensor, batch: Batch
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lbar_B (C,), grad_theta lbar_B (C, P))`` for every chain in one backward pass.

    Chains do not interact, so the gradient of the sum over chains is each chain's gradient.
    """
    with torch.enable_grad():
        theta = params.detach().requires_grad_(True)
        ll = log_likelihood(theta, batch)
        (grad,) = torch.autograd.grad(ll.sum(), theta)
    return ll.detach(), grad


def langevin_step(
    state: SGLDState,
    grad_log_likelihood: torch.Tensor,
    settings: SGLDSettings,
    generator: torch.Generator | None = None,
) -> SGLDState:
    """One (p)SGLD step from the minibatch gradient ``grad lbar_B (C, P)`` (module docstring).

    Uses ``eta_t = settings.schedule(state.step)``; in a cyclical schedule's exploration stage
    the noise term is dropped (an SGD step on the same objective).
    """
    t = state.step
    eta = settings.schedule(t)
    theta = state.params
    wd = settings.weight_decay
    sq = state.sq_grad_avg
    noisy = settings.temperature > 0 and settings.schedule.adds_noise(t)
    scale = math.sqrt(2.0 * eta * settings.temperature / settings.num_data)
    if settings.preconditioner is Preconditioner.RMSPROP:
        if sq is None:
            raise ValueError("pSGLD state has no second-moment estimate; build it with init()")
        a = settings.rmsprop_alpha
        g = torch.add(-grad_log_likelihood, theta, alpha=wd)  # -grad lbar + lambda theta
        sq = torch.addcmul(sq * a, g, g, value=1.0 - a)
        precond = sq.sqrt().add_(settings.rmsprop_delta).reciprocal_()  # G_t
        new = torch.addcmul(theta, precond, g, value=-eta)
        if noisy:
            xi = torch.randn(
                theta.shape, generator=generator, dtype=theta.dtype, device=theta.device
            )
            new.addcmul_(precond.sqrt_(), xi, value=scale)
    else:
        # theta - eta (-grad lbar + lambda theta), fused; never mutates the caller's tensors
        new = theta.mul(1.0 - eta * wd).add_(grad_log_likelihood, alpha=eta)
        if noisy:
            xi = torch.randn(
                theta.shape, generator=generator, dtype=theta.dtype, device=theta.device
            )
            new.add_(xi, alpha=scale)
    return replace(state, params=new, step=t + 1, sq_grad_avg=sq)


def build(
    log_likelihood: LogLikelihood,
    settings: SGLDSettings,
    value_and_grad: ValueAndGrad | None = None,
) -> Transform:
    """An SGLD transform for ``log_likelihood (params (C, P), batch) -> (C,)`` mean log-lik.

    ``update(state, batch, generator)`` computes the minibatch gradient (by autograd, or by
    ``value_and_grad`` when given) and takes one :func:`langevin_step`;
    ``state.log_likelihood`` holds the minibatch ``lbar_B`` at the parameters the step
    started from.
    """

    def _init(params: torch.Tensor) -> SGLDState:
        return init(params, settings)

    def _update(
        state: SGLDState, batch: Batch, generator: torch.Generator | None = None
    ) -> SGLDState:
        if value_and_grad is not None:
            ll, grad = value_and_grad(state.params, batch)
        else:
            ll, grad = loss_gradient(log_likelihood, state.params, batch)
        nxt = langevin_step(state, grad, settings, generator)
        return replace(nxt, log_likelihood=ll)

    return Transform(init=_init, update=_update)


def is_retained(t: int, burn_in: int, thinning: int, schedule: StepSchedule) -> bool:
    """Whether the state *after* step ``t`` (0-based) is kept as a posterior sample.

    Kept: past the burn-in, every ``thinning``-th step, and for a cyclical schedule only in
    the sampling stage of a cycle (Zhang et al. 2020 collect samples there only).
    """
    if thinning <= 0:
        raise ValueError(f"thinning must be positive, got {thinning}")
    done = t + 1
    if done <= burn_in or (done - burn_in) % thinning != 0:
        return False
    return schedule.adds_noise(t) if schedule.kind is ScheduleKind.CYCLICAL else True


class DivergenceError(UserError):
    """The chains left the finite numbers: the step size is too large for this target."""


def sample(
    transform: Transform,
    state: SGLDState,
    batches: Iterator[Batch],
    num_steps: int,
    burn_in: int,
    thinning: int,
    schedule: StepSchedule,
    on_sample: Callable[[SGLDState], None],
    generator: torch.Generator | None = None,
    progress: bool = True,
    check_every: int = 1000,
    monitor: Callable[[SGLDState], str] | None = None,
    monitor_every: int = 0,
) -> SGLDState:
    """Run ``num_steps`` updates of all chains, calling ``on_sample(state)`` for every state
    that :func:`is_retained` keeps. Shows a tqdm bar; raises :class:`DivergenceError` when a
    chain turns non-finite (checked at every kept state and every ``check_every`` steps).
    Every ``monitor_every`` steps (0 = never) the line ``monitor(state)`` is printed."""
    if num_steps <= 0 or burn_in < 0:
        raise ValueError("num_steps must be positive and burn_in non-negative")
    bar = tqdm(range(num_steps), desc="sgld", disable=not progress, mininterval=1.0, unit="step")
    for t in bar:
        state = transform.update(state, next(batches), generator)
        retained = is_retained(t, burn_in, thinning, schedule)
        if retained or (t + 1) % check_every == 0 or t + 1 == num_steps:
            if not bool(torch.isfinite(state.params).all()):
                raise DivergenceError(
                    f"SGLD diverged by step {t + 1} (lr={schedule.lr}); lower the step size"
                )
            nll = -float(state.log_likelihood.mean())
            bar.set_postfix(nll=f"{nll:.3f}", lr=f"{schedule(t):.3g}", refresh=False)
        if retained:
            on_sample(state)
        if monitor is not None and monitor_every > 0 and (t + 1) % monitor_every == 0:
            tqdm.write(f"step {t + 1}: {monitor(state)}")
    return state
