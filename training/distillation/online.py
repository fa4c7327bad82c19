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

from .fidelity import ValidationMonitor
from .gan import WGANGP, Critic, Generator, RealBatch, RealSampler, fit_to_moments
from .offline import (
    PRESETS,
    DistillConfig,
    build_subspace_generator,
    choose_residual_scale,
    torch_threads,
)
from .subspace import fit_subspace


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

    def sgld_settings(self, num_data: int) -> sgld.SGLDSettings:
        return sgld.SGLDSettings(
            num_data=num_data,
            schedule=sgld.StepSchedule(lr=self.sgld_lr),
            prior_std=self.prior_std,
            temperature=self.temperature,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["distill"] = self.distill.to_dict()
        return d


def default_online_config(**overrides: Any) -> OnlineConfig:
    """The default design, run online: 4 chains, a 1,000-sample buffer, one GAN step per
    SGLD step once 200 samples are in (fields of :class:`OnlineConfig` can be overridden)."""
    distill = replace(PRESETS["default"].config, max_train_samples=None)
    return replace(OnlineConfig(distill=distill), **overrides)


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
    selection against the chains' most recent samples (see :class:`ValidationMonitor`).
    ``threads``: torch intra-op threads for the run (default: 1 on CPU, see
    :func:`~training.distillation.offline.torch_threads`). ``init`` ``(C, P)``: the chains'
    starting states (default: a fresh initialisation), e.g. the ``final_chains`` of an earlier
    run, as active learning warm-starts each round from the last."""
    dev = torch.device(device)
    if threads is None and dev.type == "cpu":
        threads = 1
    with torch_threads(threads):
        return _distill_online(spec, x, y, config, val, dev, report, progress, init)


def _distill_online(
    spec: NetworkSpec,
    x: NDArray[np.float32] | torch.Tensor,
    y: NDArray[np.integer] | torch.Tensor,
    config: OnlineConfig,
    val: tuple[NDArray[np.float32], NDArray[np.integer]] | None,
    dev: torch.device,
    report: Callable[[str], None] | None,
    progress: bool,
    init: torch.Tensor | None,
) -> OnlineResult:
    dc = config.distill
    torch.manual_seed(dc.seed)
    rng = torch.Generator(device=dev).manual_seed(dc.seed)
    xt = torch.as_tensor(np.asarray(x, dtype=np.float32)).to(dev)
    yt = torch.as_tensor(np.asarray(y, dtype=np.int64)).to(dev)
    chains = _Chains(spec, xt, yt, config, rng, init)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    seen = 0

    # Burn-in and warm-up: run SGLD until the first buffer is full enough to start the GAN.
    warm = RingBuffer(config.warmup_samples, spec.num_params, dev)
    recent = RingBuffer(dc.num_networks, spec.num_params, dev)
    needed = config.burn_in + math.ceil(config.warmup_samples / config.num_chains) * config.thinning
    bar = tqdm(total=needed, desc="sgld warm-up", disable=not progress, mininterval=1.0)
    while warm.size < config.warmup_samples:
        kept = chains.step()
        bar.update(1)
        if kept is not None:
            take = kept[: config.warmup_samples - warm.size]
            warm.push(take)
            recent.push(kept)
            seen += len(take)
    bar.close()
    seconds["warmup"] = round(time.perf_counter() - t0, 2)

    sub_summary = None
    project: Callable[[torch.Tensor], torch.Tensor]
    c = config.num_chains
    weights = [1.0 / c] * c if dc.condition_on_chains and c > 1 else None
    if dc.design is Design.SUBSPACE:
        rank = min(dc.rank, config.warmup_samples - 1)
        sub = fit_subspace(warm.contents().cpu().numpy(), rank, basis_dtype=dc.basis_dtype)
        generator, coeffs = build_subspace_generator(sub, dc.gan, dev, weights)
        sub_summary = sub.summary()
        buffer = RingBuffer(config.buffer_size, rank, dev)
        buffer.push(coeffs, warm.labels[: warm.size])
        assert generator.basis is not None and generator.mean is not None
        basis, mean = generator.basis, generator.mean
        shift, c_scale = generator.shift, generator.scale
        resid_sq = torch.zeros(spec.num_params, dtype=torch.float64, device=dev)
        resid_n = 0

        def project(theta: torch.Tensor) -> torch.Tensor:
            nonlocal resid_sq, resid_n
            xc = theta - mean
            c = xc @ basis.T
            r = xc - c @ basis
            resid_sq += r.double().pow(2).sum(dim=0)
            resid_n += theta.shape[0]
            return (c - shift) / c_scale

        if report is not None:
            report(
                f"online subspace: rank {rank} of the first {config.warmup_samples} samples "
                f"holds {100 * sub.explained_variance_ratio:.2f}% of their variance"
            )
    else:
        generator = Generator(
            dc.gan.noise_dim, dc.gan.generator_hidden, spec.num_params, component_weights=weights
        ).to(dev)
        buffer = RingBuffer(config.buffer_size, spec.num_params, dev)
        buffer.push(warm.contents(), warm.labels[: warm.size])

        def project(theta: torch.Tensor) -> torch.Tensor:
            return theta

    del warm
    k = generator.components
    if config.moment_init_steps:
        labels = buffer.labels[: buffer.size] if k > 1 else None
        fit_to_moments(generator, buffer.contents(), labels, config.moment_init_steps, rng)
    critic = Critic(buffer.data.shape[1], dc.gan.critic_hidden, k if k > 1 else 0).to(dev)
    gan = WGANGP(generator, critic, dc.gan, dc.steps, rng)
    real = buffer.sampler(rng, k)

    history: list[dict[str, float]] = []
    best_step, best_value, best_state = dc.steps, math.inf, None
    t1 = time.perf_counter()
    bar2 = tqdm(range(1, dc.steps + 1), desc="online apd", disable=not progress, mininterval=1.0)
    for g_step in bar2:
        for _ in range(config.sgld_steps_per_gan_step):
            kept = chains.step()
            if kept is not None:
                buffer.push(project(kept))
                recent.push(kept)
                seen += kept.shape[0]
        stats = gan.step(real)
        if not math.isfinite(stats.critic_loss):
            raise FloatingPointError(f"the GAN diverged at step {g_step}; lower the learning rate")
        if val is None or (g_step % dc.eval_every != 0 and g_step != dc.steps):
            continue
        monitor = ValidationMonitor(
            spec, val[0], val[1], recent.contents(), dc.num_networks, dc.seed
        )
        row = {"step": g_step, "sgld_step": chains.t, "wasserstein": stats.wasserstein}
        row |= monitor.evaluate(gan.output)
        history.append(row)
        if row["val_kl"] < best_value:
            best_value, best_step = row["val_kl"], g_step
            best_state = {k: v.clone() for k, v in gan.output.net.state_dict().items()}
        bar2.set_postfix(val_kl=f"{row['val_kl']:.4f}", refresh=False)
        if report is not None:
            report(
                f"step {g_step} (sgld {chains.t}): val acc {row['val_accuracy']:.4f} "
                f"(chains {monitor.teacher_metrics['accuracy']:.4f}) nll {row['val_nll']:.4f} "
                f"(chains {monitor.teacher_metrics['nll']:.4f}) KL {row['val_kl']:.5f}"
            )
    seconds["train"] = round(time.perf_counter() - t1, 2)
    if best_state is None and gan.average is not None:
        best_state = gan.average.net.state_dict()
    if best_state is not None:
        generator.net.load_state_dict(best_state)
    generator.eval()

    if dc.design is Design.SUBSPACE and resid_n > 0:
        generator = generator.with_residual_std((resid_sq / resid_n).sqrt().float())
    final_monitor = (
        ValidationMonitor(spec, val[0], val[1], recent.contents(), dc.num_networks, dc.seed)
        if val is not None
        else None
    )
    final, scale, search = choose_residual_scale(generator, dc.residual_scales, final_monitor)
    return OnlineResult(
        generator=final,
        config=config,
        history=history,
        best_step=best_step,
        residual_scale=scale,
        residual_search=search,
        subspace=sub_summary,
        sgld_steps=chains.t,
        samples_seen=seen,
        final_chains=chains.state.params.detach(),
        seconds=seconds,
    )
