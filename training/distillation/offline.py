"""Algorithm 1 of Wang et al. (2018), offline APD: a WGAN-GP fitted to stored SGLD samples.

Given SGLD samples ``theta_1..theta_S`` (here: a spread of them across chains and time),
repeat ``T`` times: ``n_critic`` critic steps, each on a minibatch of samples and a minibatch
of generated networks, then one generator step (:class:`~training.distillation.gan.WGANGP`).

Two designs (:class:`apd.checkpoint.Design`):

* ``paper``: the generator's MLP outputs all P weights; the critic reads P weights. This is
  the reference recipe (``--preset paper``: 100,000 steps, 10,000 samples).
* ``subspace`` (the default): the samples are first reduced to a fixed affine subspace and
  residual (:mod:`training.distillation.subspace`); generator and critic work on the r standardised
  coefficients, and the generator maps them back with ``mean + c @ basis`` plus independent
  residual noise. The GAN is still trained adversarially on the SGLD samples, now seen
  through their coordinates ``(theta_s - mean) @ basis^T``.

Because a WGAN's output wanders while it trains (the issue measured an NLL of 0.29 against
the teacher's 0.09 half-way through a paper run), a :class:`~training.distillation.fidelity.
ValidationMonitor` scores the generator every ``eval_every`` steps on the MNIST validation
split and the generator with the lowest validation KL to the teacher is kept. Finally the
residual noise level is chosen on the same criterion among ``residual_scales`` (multipliers
of the fitted residual std): independent noise ignores correlations that the subspace
dropped, so the full fitted level can blur the predictive more than SGLD's does.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Final, Literal, get_args

import numpy as np
import torch
from numpy.typing import NDArray
from tqdm import tqdm

from apd.checkpoint import Design
from training.threads import torch_threads

from .fidelity import ValidationMonitor
from .gan import (
    WGANGP,
    Critic,
    Generator,
    RealBatch,
    RealSampler,
    WGANGPConfig,
    fit_to_moments,
)
from .subspace import BasisDtype, Subspace, VectorDtype, fit_subspace, load_rows

log = logging.getLogger(__name__)

CodeScaling = Literal["coordinate", "shared"]
"""How the GAN's coordinates are scaled from the subspace coefficients: ``coordinate`` divides
each by its own standard deviation (every direction has unit variance), ``shared`` divides all
by one number, the root mean variance (the directions keep their relative sizes, so the critic
measures distances as weight space does)."""


@dataclass(frozen=True)
class DistillConfig:
    """Everything that defines a distillation run (recorded in the checkpoint's provenance)."""

    design: Design
    gan: WGANGPConfig
    steps: int
    rank: int = 40
    basis_dtype: BasisDtype = "float16"
    vector_dtype: VectorDtype = "float"
    condition_on_chains: bool = False
    residual_scales: tuple[float, ...] = (1.0,)
    max_train_samples: int | None = None
    eval_every: int = 1000
    num_networks: int = 100
    seed: int = 0
    code_scaling: CodeScaling = "coordinate"
    moment_init_steps: int = 0
    variance_target: float | None = None

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.eval_every <= 0 or self.num_networks <= 0:
            raise ValueError("steps, eval_every and num_networks must be positive")
        if self.code_scaling not in get_args(CodeScaling):
            raise ValueError(
                f"code_scaling must be one of {', '.join(get_args(CodeScaling))}, "
                f"got {self.code_scaling!r}"
            )
        if self.moment_init_steps < 0:
            raise ValueError(f"moment_init_steps must be >= 0, got {self.moment_init_steps}")
        if self.variance_target is not None and not 0.0 < self.variance_target <= 1.0:
            raise ValueError(f"variance_target must lie in (0, 1], got {self.variance_target}")
        if self.design is Design.SUBSPACE and self.rank <= 0:
            raise ValueError(f"rank must be positive, got {self.rank}")
        if not self.residual_scales or any(
            not (s >= 0 and math.isfinite(s)) for s in self.residual_scales
        ):
            raise ValueError("residual_scales must be non-negative numbers")
        if self.max_train_samples is not None and self.max_train_samples < 2:
            raise ValueError("max_train_samples must be at least 2")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["design"] = self.design.value
        d["gan"] = self.gan.to_dict()
        d["residual_scales"] = list(self.residual_scales)
        return d


@dataclass(frozen=True)
class Preset:
    """A named distillation recipe: its configuration, and the generator steps for the target
    networks that need more than ``config.steps``."""

    config: DistillConfig
    arch_steps: Mapping[str, int] = field(default_factory=dict)  # arch -> generator steps

    def for_arch(self, arch: str | None) -> DistillConfig:
        """The configuration, with the steps of ``arch`` where it has its own."""
        if arch is None or arch not in self.arch_steps:
            return self.config
        return replace(self.config, steps=self.arch_steps[arch])


AUTO_VARIANCE_HELD: Final = 0.988
"""The share of the samples' variance that ``rank auto`` holds: on the fcNN1 teacher its own
samples projected onto the top directions met every anomaly row (scale 1 and 5) at 98.85 %
(92 directions) and missed 4 at 97.58 % (46); other samples projected onto 89 directions
still miss 6 (docs/distillation.md, "The rank the teacher needs")."""
AUTO_MAX_RANK: Final = 200

_DEFAULT: Final = DistillConfig(
    design=Design.SUBSPACE,
    gan=WGANGPConfig(lr=1e-3, lr_end_fraction=0.1, ema_decay=0.995),
    steps=10_000,
    rank=46,
    basis_dtype="float16",
    condition_on_chains=True,
    residual_scales=(0.0,),
    max_train_samples=2000,
    eval_every=1000,
)

PRESETS: Final[Mapping[str, Preset]] = {
    # Measured on fcNN1 (docs/distillation.md): a 46-dim subspace (the largest whose float16
    # basis keeps the fcNN1 checkpoint under 8 MB), a generator conditional on the SGLD
    # chains' modes, 10,000 generator steps at 1e-3 decayed to 1e-4 with a weight average,
    # and no residual noise (every level above 0 raised the validation KL).
    # fcNN2 needs more steps: its default design on three SGLD runs (docs/distillation.md):
    # with 10,000 steps one run was still improving at the last step and another stopped at a
    # validation KL of 0.0032 and missed 8 of 40 anomaly rows; with 20,000 that run reached
    # 0.00023 and a third 0.00020 (best steps 14,000 and 18,000), in 683-766 s, inside the
    # 20-minute budget.
    "default": Preset(_DEFAULT, arch_steps={"fcnn2": 20_000}),
    # The default design at the rank chosen from the teacher (benchmarks/results/rank_study.md):
    # the fewest directions holding 98.8 % of the samples' variance (fcNN1: 89), an 8-bit
    # basis so that they fit the 8 MB of the fcNN1 checkpoint, and the codes scaled by one
    # shared number instead of each by its own std. Per-coordinate scaling is what failed at
    # rank 92 (val KL 0.0107, MI ratio 2.27); one shared scale reached 0.00091 (MI 1.00),
    # below rank 46's 0.00120.
    "auto": Preset(
        replace(
            _DEFAULT,
            rank=AUTO_MAX_RANK,
            variance_target=AUTO_VARIANCE_HELD,
            basis_dtype="int8",
            code_scaling="shared",
        ),
        arch_steps={"fcnn2": 20_000},
    ),
    # Wang et al. (2018): WGAN-GP, lambda 10, 5 critic steps, z 32, 3x100 ReLU for generator
    # and critic, Adam 1e-4 (0.5, 0.9), batch 100, 100,000 generator steps, 10,000 samples.
    "paper": Preset(
        DistillConfig(
            design=Design.PAPER,
            gan=WGANGPConfig(),
            steps=100_000,
            basis_dtype="float32",
            max_train_samples=10_000,
            eval_every=1000,
        )
    ),
}


def preset(name: str, arch: str | None = None, **overrides: Any) -> DistillConfig:
    """A preset with some fields replaced (``None`` values are ignored). With ``arch``, the
    preset's steps for that target network (:attr:`Preset.arch_steps`) unless ``steps`` is
    given."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    cfg = PRESETS[name].for_arch(arch)
    gan_fields = {k: v for k, v in overrides.items() if k in WGANGPConfig.__dataclass_fields__}
    gan_fields = {k: v for k, v in gan_fields.items() if v is not None}
    rest = {
        k: v
        for k, v in overrides.items()
        if v is not None and k not in WGANGPConfig.__dataclass_fields__
    }
    return replace(cfg, gan=replace(cfg.gan, **gan_fields), **rest)


@dataclass
class DistillResult:
    generator: Generator
    config: DistillConfig
    history: list[dict[str, float]] = field(default_factory=list)
    best_step: int = 0
    residual_scale: float = 1.0
    residual_search: list[dict[str, float]] = field(default_factory=list)
    subspace: dict[str, Any] | None = None
    num_train_samples: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        best = next((h for h in self.history if h["step"] == self.best_step), {})
        return {
            "best_step": self.best_step,
            "best_validation": best,
            "residual_scale": self.residual_scale,
            "residual_search": self.residual_search,
            "subspace": self.subspace,
            "num_train_samples": self.num_train_samples,
            "seconds": self.seconds,
        }


def component_labels(
    chains: NDArray[np.integer] | None,
) -> tuple[torch.Tensor | None, list[float] | None]:
    """Chain ids -> component indices ``0..K-1`` and the components' shares of the samples
    (``None, None`` without chain ids or with a single chain)."""
    if chains is None:
        return None, None
    ids, labels, counts = np.unique(np.asarray(chains), return_inverse=True, return_counts=True)
    if len(ids) < 2:
        return None, None
    return torch.from_numpy(labels.astype(np.int64)), (counts / counts.sum()).tolist()


def mode_labels(
    chain: NDArray[np.integer], step: NDArray[np.integer], sampler: dict[str, Any] | None = None
) -> NDArray[np.int64]:
    """Which samples share a mode, as far as the sampler tells: one label per chain, and
    with a cyclical step size (cSG-MCMC) one per chain and cycle, since each cycle's large
    steps can carry a chain into another mode. ``step`` is the sampler step after which a
    sample was taken (1-based), as :class:`~training.sample_store.SampleStore` records it."""
    ids: NDArray[np.int64] = np.asarray(chain, dtype=np.int64)
    schedule = (sampler or {}).get("schedule") or {}
    if schedule.get("kind") == "cyclical" and int(schedule.get("cycle_steps", 0)) > 0:
        cycle = (np.asarray(step, dtype=np.int64) - 1) // int(schedule["cycle_steps"])
        pairs = np.stack([ids, cycle], axis=1)
        labels: NDArray[np.int64] = np.unique(pairs, axis=0, return_inverse=True)[1]
        return labels.reshape(-1).astype(np.int64)
    return ids


def build_subspace_generator(
    sub: Subspace,
    gan: WGANGPConfig,
    device: torch.device,
    component_weights: list[float] | None = None,
    output_dim: int | None = None,
    scaling: CodeScaling = "coordinate",
) -> tuple[Generator, torch.Tensor]:
    """The subspace generator for ``sub`` and its training data: standardised coefficients
    ``u = (c - shift) / scale`` with the coefficients' per-coordinate mean, and their
    per-coordinate std (``scaling="coordinate"``) or one shared scale, the root mean of their
    variances (``"shared"``).

    ``output_dim`` > rank reserves output coordinates for directions added later (online
    APD, one batch per cycle): their basis rows are 0, so they move no weight until filled,
    and the data is 0 in them."""
    r = sub.rank
    dim = r if output_dim is None else int(output_dim)
    if dim < r:
        raise ValueError(f"output_dim {dim} is below the subspace's rank {r}")
    c = torch.from_numpy(sub.coefficients).double()
    shift = torch.zeros(dim, dtype=torch.float64)
    scale = torch.ones(dim, dtype=torch.float64)
    shift[:r] = c.mean(dim=0)
    std = c.std(dim=0)
    if scaling == "shared":
        std = std.pow(2).mean().sqrt().expand(r)
    scale[:r] = std.clamp_min(1e-12)
    data = torch.zeros(len(c), dim)
    data[:, :r] = ((c - shift[:r]) / scale[:r]).float()
    basis = torch.zeros(dim, sub.num_params)
    basis[:r] = torch.from_numpy(sub.basis)
    gen = Generator(
        gan.noise_dim,
        gan.generator_hidden,
        dim,
        basis=basis,
        mean=torch.from_numpy(sub.mean),
        residual_std=torch.from_numpy(sub.residual_std),
        scale=scale.float(),
        shift=shift.float(),
        component_weights=component_weights,
        vector_dtype=sub.vector_dtype,
    ).to(device)
    return gen, data.to(device)


def uniform_sampler(
    data: torch.Tensor, rng: torch.Generator, labels: torch.Tensor | None = None
) -> RealSampler:
    """Minibatches drawn uniformly with replacement from the rows of ``data``, with the
    one-hot components of the rows when ``labels`` are given."""
    onehots = None
    if labels is not None:
        onehots = torch.nn.functional.one_hot(labels).float().to(data.device)

    def sample(n: int) -> RealBatch:
        idx = torch.randint(0, data.shape[0], (n,), generator=rng, device=data.device)
        return data[idx], None if onehots is None else onehots[idx]

    return sample


def train_gan(
    gan: WGANGP,
    real: RealSampler,
    steps: int,
    monitor: ValidationMonitor | None,
    eval_every: int,
    report: Callable[[str], None] | None = None,
    progress: bool = True,
    desc: str = "apd",
) -> tuple[list[dict[str, float]], int]:
    """Run ``steps`` generator steps; every ``eval_every`` steps (and at the end) score
    ``gan.output`` on validation, and leave the best-scoring weights in ``gan.generator``.

    Returns the history (one dict per evaluation) and the best step (``steps`` if no
    monitor). ``report`` receives one log line per evaluation.
    """
    history: list[dict[str, float]] = []
    best_step, best_value = steps, math.inf
    best_state: dict[str, torch.Tensor] | None = None
    bar = tqdm(range(1, steps + 1), desc=desc, disable=not progress, mininterval=1.0, unit="step")
    t0 = time.perf_counter()
    for t in bar:
        stats = gan.step(real)
        if not math.isfinite(stats.critic_loss) or not math.isfinite(stats.generator_loss):
            raise FloatingPointError(f"the GAN diverged at step {t}; lower the learning rate")
        if monitor is None or (t % eval_every != 0 and t != steps):
            continue
        row: dict[str, float] = {
            "step": t,
            "seconds": round(time.perf_counter() - t0, 2),
            "wasserstein": stats.wasserstein,
            "gradient_penalty": stats.penalty,
            **monitor.evaluate(gan.output),
        }
        history.append(row)
        if row["val_kl"] < best_value:
            best_value, best_step = row["val_kl"], t
            best_state = copy.deepcopy(gan.output.net.state_dict())
        bar.set_postfix(val_kl=f"{row['val_kl']:.4f}", w=f"{stats.wasserstein:.3f}", refresh=False)
        if report is not None:
            report(
                f"step {t}: W1~{stats.wasserstein:.4f} val acc {row['val_accuracy']:.4f} "
                f"(teacher {monitor.teacher_metrics['accuracy']:.4f}) nll {row['val_nll']:.4f} "
                f"(teacher {monitor.teacher_metrics['nll']:.4f}) KL {row['val_kl']:.5f} "
                f"MI ratio {row['val_mi_ratio']:.3f}"
            )
    if best_state is None and gan.average is not None:
        best_state = gan.average.net.state_dict()
    if best_state is not None:
        gan.generator.net.load_state_dict(best_state)
    return history, best_step


def choose_residual_scale(
    generator: Generator, scales: tuple[float, ...], monitor: ValidationMonitor | None
) -> tuple[Generator, float, list[dict[str, float]]]:
    """The generator with ``residual_std * s`` for the ``s`` in ``scales`` of lowest
    validation KL (without a monitor: 1.0 if listed, else the first). At ``s = 0`` the
    residual is dropped altogether, so the checkpoint holds no ``residual_std`` and the
    sampler needs no ``eps``."""

    def scaled(s: float) -> Generator:
        if base is None or s == 1.0:
            return generator
        return generator.with_residual_std(base * s if s > 0 else None)

    base = generator.residual_std
    if base is None or monitor is None or len(scales) == 1:
        s = 1.0 if 1.0 in scales else scales[0]
        return scaled(s), s, []
    rows, best = [], (math.inf, scales[0], generator)
    for s in scales:
        g = scaled(s)
        m = {"residual_scale": s, **monitor.evaluate(g)}
        rows.append(m)
        if m["val_kl"] < best[0]:
            best = (m["val_kl"], s, g)
    return best[2], best[1], rows


def distill_offline(
    samples: NDArray[np.floating],
    config: DistillConfig,
    rows: NDArray[np.integer] | None = None,
    monitor: ValidationMonitor | None = None,
    device: str | torch.device = "cpu",
    report: Callable[[str], None] | None = None,
    progress: bool = True,
    chains: NDArray[np.integer] | None = None,
    threads: int | None = None,
) -> DistillResult:
    """Algorithm 1 on ``samples[rows]`` (``samples`` may be a memmap ``(S, P)``).

    ``chains`` are the chain ids of ``samples[rows]``; with ``config.condition_on_chains``
    the generator is chain-conditional (:mod:`training.distillation.gan`). ``threads`` sets torch's
    intra-op threads while the GAN trains (default: 1 on CPU for the subspace design).
    """
    dev = torch.device(device)
    torch.manual_seed(config.seed)
    rng = torch.Generator(device=dev).manual_seed(config.seed)
    n = len(samples) if rows is None else len(rows)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    sub_summary = None
    labels, weights = component_labels(chains if config.condition_on_chains else None)
    if labels is not None and len(labels) != n:
        raise ValueError(f"got {len(labels)} chain ids for {n} samples")
    if config.design is Design.SUBSPACE:
        rank = min(config.rank, n - 1)
        sub = fit_subspace(
            samples,
            rank,
            rows=rows,
            basis_dtype=config.basis_dtype,
            vector_dtype=config.vector_dtype,
            variance_target=config.variance_target,
        )
        generator, data = build_subspace_generator(
            sub, config.gan, dev, weights, scaling=config.code_scaling
        )
        sub_summary = sub.summary()
        if report is not None:
            report(
                f"subspace: rank {sub.rank} of {n} samples holds "
                f"{100 * sub.explained_variance_ratio:.2f}% of their variance; "
                f"mean residual std {float(sub.residual_std.mean()):.4g}"
            )
    else:
        data = torch.from_numpy(load_rows(samples, rows)).to(dev)
        generator = Generator(
            config.gan.noise_dim,
            config.gan.generator_hidden,
            data.shape[1],
            component_weights=weights,
        ).to(dev)
    k = generator.components
    critic = Critic(data.shape[1], config.gan.critic_hidden, k if k > 1 else 0).to(dev)
    if threads is None and dev.type == "cpu" and config.design is Design.SUBSPACE:
        threads = 1
    if config.moment_init_steps:
        with torch_threads(threads):
            fit_to_moments(generator, data, labels, config.moment_init_steps, rng)
    seconds["prepare"] = round(time.perf_counter() - t0, 2)

    gan = WGANGP(generator, critic, config.gan, config.steps, rng)
    real = uniform_sampler(data, rng, labels)
    t1 = time.perf_counter()
    with torch_threads(threads):
        history, best_step = train_gan(
            gan,
            real,
            config.steps,
            monitor,
            config.eval_every,
            report,
            progress,
            desc=f"apd-{config.design.value}",
        )
    seconds["train"] = round(time.perf_counter() - t1, 2)
    t2 = time.perf_counter()
    generator.eval()
    final, scale, search = choose_residual_scale(generator, config.residual_scales, monitor)
    seconds["residual_search"] = round(time.perf_counter() - t2, 2)
    if report is not None and search:
        report(
            "residual scale: "
            + ", ".join(f"{r['residual_scale']:g} -> KL {r['val_kl']:.5f}" for r in search)
            + f"; chose {scale:g}"
        )
    return DistillResult(
        generator=final,
        config=config,
        history=history,
        best_step=best_step,
        residual_scale=scale,
        residual_search=search,
        subspace=sub_summary,
        num_train_samples=n,
        seconds=seconds,
    )
