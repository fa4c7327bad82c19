"""Algorithm 2 of Wang et al. (2018), online APD: the GAN trains alongside SGLD.

C SGLD chains (:mod:`training.sgld`) sample the posterior of a target network on the given
data; after a burn-in, every ``thinning`` SGLD steps the chains' current parameters enter a
FIFO buffer of the ``buffer_size`` most recent samples, and the WGAN-GP takes one generator
step (with its ``n_critic`` critic steps) every ``sgld_steps_per_gan_step`` SGLD steps, its
real minibatches drawn from the buffer. No sample is stored beyond the buffer: the generator
is the only lasting summary of the chain, which is the point of the online variant (and what
active learning uses: one short run per acquisition round, no sample store on disk).

With the subspace design (:mod:`training.distillation.subspace`) the subspace is fitted once, on the
first ``warmup_samples`` buffered samples, and the buffer then holds each later sample's
standardised coefficients; the residual std is the root mean square, over every sample that
entered the buffer after the fit, of its component outside the subspace, accumulated as the
chains run (``O(P)`` memory). With the ``paper`` design the buffer holds whole weight vectors.

The SGLD update itself is :func:`training.sgld.build`'s; minibatches are per-chain index
batches of :class:`training.baselines.MinibatchStream`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from tqdm import tqdm

from apd.checkpoint import Design
from apd.networks import NetworkSpec
from training import sgld
from training.baselines import ClassificationLikelihood, MinibatchStream, init_theta
from training.defaults import SGLDDefaults
from training.threads import torch_threads

from .fidelity import ValidationMonitor
from .gan import (
    WGANGP,
    Critic,
    Generator,
    RealBatch,
    RealSampler,
    fit_to_moments,
    restandardise,
)
from .offline import (
    PRESETS,
    DistillConfig,
    build_subspace_generator,
    choose_residual_scale,
)
from .subspace import extend_basis, fit_subspace


@dataclass(frozen=True)
class OnlineConfig:
    """SGLD settings, buffer and interleaving; ``distill`` holds the GAN side."""

    distill: DistillConfig
    num_chains: int = 4
    sgld_lr: float = 0.05
    prior_std: float = 1.0
    temperature: float = 1.0
    batch_size: int = 100
    # The subspace is fitted once, on the first samples after burn-in, so the chains must have
    # settled by then: at constant step 0.05, fcNN1's chains are at 94.8% validation accuracy
    # after 2,000 steps (the generator then stalled at 93.8%) and 97.0% after 10,000 (96.97%).
    burn_in: int = 10000
    thinning: int = 10
    buffer_size: int = 1000
    warmup_samples: int = 200
    sgld_steps_per_gan_step: int = 1
    # The step-size schedule: constant ``sgld_lr``, or the cyclical schedule of ``apd train
    # sgld`` (peak ``sgld_lr``, ``cycles`` cycles of ``cycle_steps``, the first
    # ``explore_fraction`` of each noise-free). A constant-step run goes on as long as the GAN
    # trains; a cyclical one runs its cycles, one component and ``rank / cycles`` new subspace
    # directions per chain and cycle, and the GAN finishes on the buffer.
    schedule: sgld.ScheduleKind = sgld.ScheduleKind.CONSTANT
    cycles: int = 1
    cycle_steps: int = 10_000
    explore_fraction: float = 0.0
    # Adam steps that start the generator at the per-chain Gaussian of the warm-up samples
    # (:func:`~training.distillation.gan.fit_to_moments`) before the GAN trains; 0: a random
    # start. Short runs need it (active learning: a hundred GAN steps per round).
    moment_init_steps: int = 0

    def __post_init__(self) -> None:
        for name in ("num_chains", "batch_size", "thinning", "buffer_size", "warmup_samples"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.burn_in < 0 or self.sgld_steps_per_gan_step <= 0 or self.moment_init_steps < 0:
            raise ValueError(
                "burn_in and moment_init_steps must be >= 0, sgld_steps_per_gan_step positive"
            )
        if self.warmup_samples > self.buffer_size:
            raise ValueError("warmup_samples cannot exceed buffer_size")
        if not (self.sgld_lr > 0 and math.isfinite(self.sgld_lr)):
            raise ValueError(f"sgld_lr must be a positive number, got {self.sgld_lr}")
        cyclical = self.schedule is sgld.ScheduleKind.CYCLICAL
        if self.schedule is sgld.ScheduleKind.POLYNOMIAL:
            raise ValueError("online APD runs a constant or a cyclical step size")
        if self.cycles < 1 or (self.cycles > 1 and not cyclical) or self.cycle_steps <= 0:
            raise ValueError("cycles (cyclical schedule only) and cycle_steps must be positive")
        self.sgld_settings(1)  # the schedule's own checks
        if cyclical:
            sampling = self.cycle_steps - int(self.explore_fraction * self.cycle_steps)
            if -(-self.warmup_samples // self.num_chains) * self.thinning > sampling:
                raise ValueError(
                    f"a cycle's sampling stage ({sampling} steps) keeps fewer than the "
                    f"{self.warmup_samples} warm-up samples each cycle needs"
                )

    def sgld_settings(self, num_data: int) -> sgld.SGLDSettings:
        return sgld.SGLDSettings(
            num_data=num_data,
            schedule=sgld.StepSchedule(
                kind=self.schedule,
                lr=self.sgld_lr,
                cycle_steps=self.cycle_steps,
                explore_fraction=self.explore_fraction,
            ),
            prior_std=self.prior_std,
            temperature=self.temperature,
        )

    def total_sgld_steps(self) -> int | None:
        """SGLD steps of a cyclical run; None: a constant step runs as long as the GAN."""
        if self.schedule is sgld.ScheduleKind.CYCLICAL:
            return self.cycles * self.cycle_steps
        return None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["distill"] = self.distill.to_dict()
        return d


def default_online_config(**overrides: Any) -> OnlineConfig:
    """The default design, run online: 4 chains, a 1,000-sample buffer, one GAN step per
    SGLD step once 200 samples are in (fields of :class:`OnlineConfig` can be overridden)."""
    distill = replace(PRESETS["default"].config, max_train_samples=None)
    return replace(OnlineConfig(distill=distill), **overrides)


def sampler_like_offline(
    defaults: SGLDDefaults,
    distill: DistillConfig,
    warmup_per_chain: int = 10,
    after_steps: int | None = None,
) -> OnlineConfig:
    """Online APD on the sampler ``apd train sgld`` runs for the offline teacher
    (``defaults``: chains, batch, peak step, cyclical schedule, cycles, thinning, temperature,
    prior). The buffer holds every sample's coefficients, so no cycle is forgotten; each cycle
    collects ``warmup_per_chain`` samples per chain before its directions are added. The GAN
    takes one step every few SGLD steps, chosen so that about ``distill.steps / 2`` fall
    while the chains run, and then ``distill.steps`` more on the complete buffer after they
    stop, as offline APD would train on the finished run (``after_steps`` of them where given;
    the returned ``distill.steps`` is the total)."""
    if defaults.schedule is not sgld.ScheduleKind.CYCLICAL:
        raise ValueError("sampler_like_offline needs a cyclical schedule")
    if defaults.preconditioner is not sgld.Preconditioner.IDENTITY:
        raise ValueError("online APD runs plain SGLD (no preconditioner)")
    if after_steps is not None and after_steps <= 0:
        raise ValueError(f"after_steps must be positive, got {after_steps}")
    cycles = max(1, defaults.steps // defaults.cycle_steps)
    sampling = defaults.cycle_steps - int(defaults.explore_fraction * defaults.cycle_steps)
    per_cycle = sampling // defaults.thinning
    if per_cycle < warmup_per_chain:
        raise ValueError(
            f"a cycle keeps {per_cycle} samples per chain, fewer than the {warmup_per_chain} "
            "its warm-up needs"
        )
    first_fit = defaults.cycle_steps - sampling + warmup_per_chain * defaults.thinning
    total = cycles * defaults.cycle_steps
    per = max(1, math.ceil((total - first_fit) / max(1, distill.steps // 2)))
    during = math.ceil((total - first_fit) / per)
    return OnlineConfig(
        distill=replace(distill, steps=(after_steps or distill.steps) + during),
        num_chains=defaults.chains,
        sgld_lr=defaults.lr,
        prior_std=defaults.prior_std,
        temperature=defaults.temperature,
        batch_size=defaults.batch_size,
        burn_in=defaults.burn_in,
        thinning=defaults.thinning,
        buffer_size=defaults.chains * cycles * per_cycle,
        warmup_samples=defaults.chains * warmup_per_chain,
        sgld_steps_per_gan_step=per,
        schedule=sgld.ScheduleKind.CYCLICAL,
        cycles=cycles,
        cycle_steps=defaults.cycle_steps,
        explore_fraction=defaults.explore_fraction,
    )


class RingBuffer:
    """The ``capacity`` most recent rows (FIFO) and their chain ids, on a device."""

    def __init__(self, capacity: int, dim: int, device: torch.device) -> None:
        self.data = torch.empty(capacity, dim, device=device)
        self.labels = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.capacity = capacity
        self.size = 0
        self._next = 0

    def push(self, rows: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Append ``rows (n, dim)`` from chains ``labels (n,)`` (default ``0..n-1``)."""
        ids = torch.arange(len(rows)) if labels is None else labels
        for row, label in zip(rows, ids.tolist(), strict=True):
            self.data[self._next] = row
            self.labels[self._next] = label
            self._next = (self._next + 1) % self.capacity
            self.size = min(self.size + 1, self.capacity)

    def contents(self) -> torch.Tensor:
        return self.data[: self.size]

    def recent(self, k: int) -> torch.Tensor:
        """The ``min(k, size)`` most recently pushed rows."""
        k = min(k, self.size)
        idx = (self._next - 1 - torch.arange(k, device=self.data.device)) % self.capacity
        return self.data[idx]

    def sampler(self, rng: torch.Generator, components: int = 1) -> RealSampler:
        """Uniform minibatches of the buffer, with one-hot chain ids if ``components`` > 1."""

        def sample(n: int) -> RealBatch:
            idx = torch.randint(0, self.size, (n,), generator=rng, device=self.data.device)
            if components == 1:
                return self.data[idx], None
            onehot = torch.nn.functional.one_hot(self.labels[idx], components).float()
            return self.data[idx], onehot

        return sample


@dataclass
class OnlineResult:
    generator: Generator
    config: OnlineConfig
    history: list[dict[str, float]] = field(default_factory=list)
    best_step: int = 0
    residual_scale: float = 1.0
    residual_search: list[dict[str, float]] = field(default_factory=list)
    subspace: dict[str, Any] | None = None
    sgld_steps: int = 0
    samples_seen: int = 0
    final_chains: torch.Tensor | None = None
    teacher: torch.Tensor | None = None  # (S, P): the samples the monitor compared with
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        best = next((h for h in self.history if h["step"] == self.best_step), {})
        return {
            "best_step": self.best_step,
            "best_validation": best,
            "residual_scale": self.residual_scale,
            "residual_search": self.residual_search,
            "subspace": self.subspace,
            "sgld_steps": self.sgld_steps,
            "samples_seen": self.samples_seen,
            "seconds": self.seconds,
        }


class _Chains:
    """C SGLD chains stepping on their own minibatches; ``step()`` returns samples to keep."""

    def __init__(
        self,
        spec: NetworkSpec,
        x: torch.Tensor,
        y: torch.Tensor,
        config: OnlineConfig,
        rng: torch.Generator,
        init: torch.Tensor | None = None,
    ) -> None:
        n = x.shape[0]
        self.settings = config.sgld_settings(n)
        likelihood = ClassificationLikelihood(spec, x, y)
        self.transform = sgld.build(likelihood, self.settings, likelihood.fast_gradient)
        if init is None:
            init = init_theta(spec, config.num_chains, rng)
        elif tuple(init.shape) != (config.num_chains, spec.num_params):
            raise ValueError(
                f"initial chain states must be ({config.num_chains}, {spec.num_params}), "
                f"got {tuple(init.shape)}"
            )
        self.state = self.transform.init(init.to(x.device))
        self.stream = MinibatchStream(n, min(config.batch_size, n), config.num_chains, rng)
        self.rng = rng
        self.config = config
        self.t = 0

    def cycle(self) -> int:
        """The cycle of the step just taken (0 for a constant step size)."""
        return (self.t - 1) // self.config.cycle_steps if self.config.cycles > 1 else 0

    def step(self) -> torch.Tensor | None:
        idx = next(self.stream).to(self.state.params.device)
        self.state = self.transform.update(self.state, idx, self.rng)
        self.t += 1
        if self.t % 500 == 0 and not bool(torch.isfinite(self.state.params).all()):
            raise sgld.DivergenceError(
                f"SGLD diverged by step {self.t} (lr={self.config.sgld_lr}); lower the step size"
            )
        if sgld.is_retained(
            self.t - 1, self.config.burn_in, self.config.thinning, self.settings.schedule
        ):
            return self.state.params
        return None


def distill_online(
    spec: NetworkSpec,
    x: NDArray[np.float32] | torch.Tensor,
    y: NDArray[np.integer] | torch.Tensor,
    config: OnlineConfig,
    val: tuple[NDArray[np.float32], NDArray[np.integer]] | None = None,
    device: str | torch.device = "cpu",
    report: Callable[[str], None] | None = None,
    progress: bool = True,
    threads: int | None = None,
    init: torch.Tensor | None = None,
) -> OnlineResult:
    """Algorithm 2 on training data ``(x, y)``; ``val`` (inputs, labels) enables model
    selection against the chains' samples (see :class:`ValidationMonitor`).
    ``threads``: torch intra-op threads for the run (default: 1 on CPU, see
    :func:`~training.threads.torch_threads`). ``init`` ``(C, P)``: the chains'
    starting states (default: a fresh initialisation), e.g. the ``final_chains`` of an earlier
    run, as active learning warm-starts each round from the last."""
    dev = torch.device(device)
    if threads is None and dev.type == "cpu":
        threads = 1
    with torch_threads(threads):
        return _OnlineRun(spec, x, y, config, val, dev, report, init).run(progress)


class _OnlineRun:
    """The state of one online run: chains, the growing subspace, buffer, GAN, monitor."""

    def __init__(
        self,
        spec: NetworkSpec,
        x: NDArray[np.float32] | torch.Tensor,
        y: NDArray[np.integer] | torch.Tensor,
        config: OnlineConfig,
        val: tuple[NDArray[np.float32], NDArray[np.integer]] | None,
        dev: torch.device,
        report: Callable[[str], None] | None,
        init: torch.Tensor | None,
    ) -> None:
        dc = config.distill
        torch.manual_seed(dc.seed)
        self.spec, self.config, self.val, self.dev, self.report = spec, config, val, dev, report
        self.rng = torch.Generator(device=dev).manual_seed(dc.seed)
        xt = torch.as_tensor(np.asarray(x, dtype=np.float32)).to(dev)
        yt = torch.as_tensor(np.asarray(y, dtype=np.int64)).to(dev)
        self.chains = _Chains(spec, xt, yt, config, self.rng, init)
        p, c = spec.num_params, config.num_chains
        self.cycles = config.cycles
        k = c * self.cycles if dc.condition_on_chains else 1
        self.weights = [1.0 / k] * k if k > 1 else None
        # The samples of the stage being collected raw (the first ``warmup_samples`` of each
        # cycle), and the teacher the monitor compares with: the most recent samples under a
        # constant step (the generator follows the chains), a uniform reservoir over the
        # whole run under a cyclical one (the generator keeps every cycle's modes).
        self.warm = RingBuffer(config.warmup_samples, p, dev)
        self.teacher = RingBuffer(dc.num_networks, p, dev)
        self.teacher_seen = 0
        self.grown = 0  # cycles whose samples the subspace covers
        self.used = 0  # subspace directions in use
        self.seen = 0
        self.resid_sq = torch.zeros(p, dtype=torch.float64, device=dev)
        self.resid_n = 0
        self.sub_summary: dict[str, Any] | None = None
        self.generator: Generator | None = None
        self.gan: WGANGP | None = None
        self.buffer: RingBuffer | None = None

    # -- samples ---------------------------------------------------------------------------

    def _component(self, cycle: int, n: int) -> torch.Tensor:
        """The component of each of ``n`` chains' samples in ``cycle``."""
        if self.weights is None:
            return torch.zeros(n, dtype=torch.int64)
        return torch.arange(n) + self.config.num_chains * cycle

    def _remember(self, theta: torch.Tensor) -> None:
        """Offer samples to the monitor's teacher set (recent, or a uniform reservoir)."""
        if self.cycles == 1:
            self.teacher.push(theta)
            return
        for row in theta:
            self.teacher_seen += 1
            if self.teacher.size < self.teacher.capacity:
                self.teacher.push(row[None])
            else:
                j = int(torch.randint(0, self.teacher_seen, (1,), generator=self.rng))
                if j < self.teacher.capacity:
                    self.teacher.data[j] = row

    def _take(self, theta: torch.Tensor) -> None:
        """A retained sample of every chain: collected raw until its cycle's subspace
        directions are fitted, then projected into the buffer."""
        self._remember(theta)
        cycle = self.chains.cycle() if self.cycles > 1 else 0
        labels = self._component(cycle, theta.shape[0])
        if cycle < self.grown:
            assert self.buffer is not None
            self.buffer.push(self._project(theta), labels)
            self.seen += theta.shape[0]
            return
        n = self.config.warmup_samples - self.warm.size
        self.warm.push(theta[:n], labels[:n])
        self.seen += len(theta[:n])
        if self.warm.size == self.config.warmup_samples:
            self._grow(cycle)
            if len(theta) > n:  # the rest of this step's samples, now that they can be
                assert self.buffer is not None
                self.buffer.push(self._project(theta[n:]), labels[n:])
                self.seen += len(theta) - n

    def _project(self, theta: torch.Tensor) -> torch.Tensor:
        """Standardised coefficients of ``theta`` (the paper design: ``theta`` itself), and
        the residual outside the subspace accumulated for the residual std."""
        g = self.generator
        assert g is not None
        if g.basis is None or g.mean is None:
            return theta
        xc = theta - g.mean
        c = xc @ g.basis.T
        self.resid_sq += (xc - c @ g.basis).double().pow(2).sum(dim=0)
        self.resid_n += theta.shape[0]
        return (c - g.shift) / g.scale

    # -- the subspace, grown one cycle at a time ---------------------------------------------

    def _grow(self, cycle: int) -> None:
        raw, labels = self.warm.contents(), self.warm.labels[: self.warm.size].clone()
        if self.generator is None:
            self._start(raw, labels)
        else:
            self._extend(raw, labels, cycle)
        self.grown = cycle + 1
        self.warm = RingBuffer(self.config.warmup_samples, self.spec.num_params, self.dev)

    def _ranks(self) -> list[int]:
        """Subspace directions per cycle: ``rank`` (at most warmup_samples - 1 for the first
        cycle, at most warmup_samples for the later) split evenly, the first cycle taking
        the remainder."""
        dc, w = self.config.distill, self.config.warmup_samples
        base, extra = divmod(dc.rank, self.cycles)
        ranks = [min(base + extra, w - 1)] + [min(base, w)] * (self.cycles - 1)
        return [r for r in ranks if r > 0]

    def _start(self, raw: torch.Tensor, labels: torch.Tensor) -> None:
        """The first cycle's samples: the subspace, generator, buffer, critic and GAN."""
        cfg, dc, dev = self.config, self.config.distill, self.dev
        if dc.design is Design.SUBSPACE:
            ranks = self._ranks()
            total = sum(ranks) if self.cycles > 1 else ranks[0]
            sub = fit_subspace(
                raw.cpu().numpy(),
                ranks[0],
                basis_dtype=dc.basis_dtype,
                vector_dtype=dc.vector_dtype,
            )
            generator, coeffs = build_subspace_generator(sub, dc.gan, dev, self.weights, total)
            self.sub_summary = sub.summary()
            self.used = ranks[0]
            if self.report is not None:
                self.report(
                    f"online subspace: rank {ranks[0]} of the first {cfg.warmup_samples} "
                    f"samples holds {100 * sub.explained_variance_ratio:.2f}% of their variance"
                    + (
                        f"; {total - ranks[0]} more directions as new cycles start"
                        if total > ranks[0]
                        else ""
                    )
                )
        else:
            generator = Generator(
                dc.gan.noise_dim,
                dc.gan.generator_hidden,
                self.spec.num_params,
                component_weights=self.weights,
            ).to(dev)
            coeffs = raw
        self.generator = generator
        self.buffer = RingBuffer(cfg.buffer_size, generator.output_dim, dev)
        self.buffer.push(coeffs, labels)
        k = generator.components
        if cfg.moment_init_steps:
            fit_to_moments(
                generator,
                self.buffer.contents(),
                self.buffer.labels[: self.buffer.size] if k > 1 else None,
                cfg.moment_init_steps,
                self.rng,
            )
        critic = Critic(generator.output_dim, dc.gan.critic_hidden, k if k > 1 else 0).to(dev)
        self.gan = WGANGP(generator, critic, dc.gan, dc.steps, self.rng)

    def _extend(self, raw: torch.Tensor, labels: torch.Tensor, cycle: int) -> None:
        """A later cycle's first samples: append the directions they add (their residuals'
        top singular vectors, :func:`extend_basis`) in the generator's unused output
        coordinates, then re-standardise every coordinate over the buffer. Samples already
        buffered keep coefficient 0 along the new directions: they were projected before
        those existed, and their residual along them is small next to the new modes' offsets
        from the mean."""
        assert self.gan is not None and self.buffer is not None and self.generator is not None
        g = self.generator
        ranks = self._ranks()
        if g.basis is None or g.mean is None or cycle >= len(ranks):
            self.buffer.push(self._project(raw), labels)
            return
        q = ranks[cycle]
        new = extend_basis(g.basis[: self.used], g.mean, raw, q, self.config.distill.basis_dtype)
        rows = slice(self.used, self.used + q)
        for gen in self._generators():
            assert gen.basis is not None
            gen.basis[rows] = new
        self.used += q
        self.buffer.push(self._project(raw), labels)
        self._restandardise()
        if self.report is not None:
            self.report(f"cycle {cycle + 1}: {q} more subspace directions ({self.used} in all)")

    def _generators(self) -> list[Generator]:
        """The trained generator and its weight average (one object when there is none)."""
        assert self.gan is not None
        gens = [self.gan.generator, self.gan.output]
        return gens[:1] if gens[0] is gens[1] else gens

    @torch.no_grad()
    def _restandardise(self) -> None:
        """Shift and scale every used coordinate to its mean and std over the buffer: the
        new cycle's modes can lie far out along the old directions. Exact for the GAN: see
        :func:`~training.distillation.gan.restandardise`."""
        assert self.gan is not None and self.buffer is not None
        g, data = self.generator, self.buffer.contents()
        assert g is not None
        used = slice(0, self.used)
        raw = data[:, used] * g.scale[used] + g.shift[used]
        new_scale, new_shift = g.scale.clone(), g.shift.clone()
        new_shift[used] = raw.mean(dim=0)
        new_scale[used] = raw.std(dim=0).clamp_min(1e-12)
        data[:, used] = (raw - new_shift[used]) / new_scale[used]
        restandardise(self._generators(), self.gan.critic, new_scale, new_shift)

    # -- the run ---------------------------------------------------------------------------

    def _monitor(self) -> ValidationMonitor | None:
        if self.val is None:
            return None
        dc = self.config.distill
        return ValidationMonitor(
            self.spec, self.val[0], self.val[1], self.teacher.contents(), dc.num_networks, dc.seed
        )

    def run(self, progress: bool) -> OnlineResult:
        cfg, dc = self.config, self.config.distill
        chains = self.chains
        total = cfg.total_sgld_steps()
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        # SGLD steps until the first warm-up is full: the burn-in (and a cyclical schedule's
        # first exploration stage), then a keep every ``thinning`` steps
        explore = int(cfg.explore_fraction * cfg.cycle_steps) if total is not None else 0
        keeps = -(-cfg.warmup_samples // cfg.num_chains) * cfg.thinning
        bar = tqdm(
            total=max(cfg.burn_in, explore) + keeps,
            desc="sgld warm-up",
            disable=not progress,
            mininterval=1.0,
        )
        while self.gan is None:
            if total is not None and chains.t >= total:
                raise ValueError(
                    f"the run ended before {cfg.warmup_samples} samples were kept; "
                    "shorten the burn-in or the warm-up"
                )
            kept = chains.step()
            bar.update(1)
            if kept is not None:
                self._take(kept)
        bar.close()
        seconds["warmup"] = round(time.perf_counter() - t0, 2)
        gan, real = self.gan, None
        assert self.buffer is not None
        real = self.buffer.sampler(self.rng, gan.generator.components)

        history: list[dict[str, float]] = []
        best_step, best_value, best_state = dc.steps, math.inf, None
        t1 = time.perf_counter()
        g_step = 0
        bar2 = tqdm(total=dc.steps, desc="online apd", disable=not progress, mininterval=1.0)
        while True:
            sgld_running = total is None or chains.t < total
            if g_step >= dc.steps and (total is None or not sgld_running):
                break
            if sgld_running:
                for _ in range(cfg.sgld_steps_per_gan_step):
                    if total is not None and chains.t >= total:
                        break
                    kept = chains.step()
                    if kept is not None:
                        self._take(kept)
            g_step += 1
            bar2.update(1)
            stats = gan.step(real)
            if not math.isfinite(stats.critic_loss):
                raise FloatingPointError(
                    f"the GAN diverged at step {g_step}; lower the learning rate"
                )
            last = g_step >= dc.steps and (total is None or chains.t >= total)
            complete = self.grown >= self.cycles
            if self.val is None or not complete or (g_step % dc.eval_every != 0 and not last):
                continue
            monitor = self._monitor()
            assert monitor is not None
            row = {"step": g_step, "sgld_step": chains.t, "wasserstein": stats.wasserstein}
            row |= monitor.evaluate(gan.output)
            history.append(row)
            if row["val_kl"] < best_value:
                best_value, best_step = row["val_kl"], g_step
                best_state = {k: v.clone() for k, v in gan.output.net.state_dict().items()}
            bar2.set_postfix(val_kl=f"{row['val_kl']:.4f}", refresh=False)
            if self.report is not None:
                self.report(
                    f"step {g_step} (sgld {chains.t}): val acc {row['val_accuracy']:.4f} "
                    f"(chains {monitor.teacher_metrics['accuracy']:.4f}) nll "
                    f"{row['val_nll']:.4f} (chains {monitor.teacher_metrics['nll']:.4f}) "
                    f"KL {row['val_kl']:.5f}"
                )
        bar2.close()
        seconds["train"] = round(time.perf_counter() - t1, 2)
        generator = gan.output if best_state is None else gan.generator
        if best_state is not None:
            generator.net.load_state_dict(best_state)
        generator.eval()
        if dc.design is Design.SUBSPACE and self.resid_n > 0:
            generator = generator.with_residual_std((self.resid_sq / self.resid_n).sqrt().float())
        final, scale, search = choose_residual_scale(generator, dc.residual_scales, self._monitor())
        return OnlineResult(
            generator=final,
            config=cfg,
            history=history,
            best_step=best_step,
            residual_scale=scale,
            residual_search=search,
            subspace=self.sub_summary,
            sgld_steps=chains.t,
            samples_seen=self.seen,
            final_chains=chains.state.params.detach(),
            teacher=self.teacher.contents().detach().clone(),
            seconds=seconds,
        )
