"""Experiment 4: active learning on MNIST with SGLD and with online APD.

The protocol of Wang et al. (2018), after Gal et al. (2017): start from 20 labelled training
digits (2 per class, drawn at random), and in each round fit the posterior to the labelled
set, score the unlabelled pool, move the ``acquire`` best-scoring images (10) into the
labelled set, and record test accuracy of the posterior predictive. Acquisition functions:

* ``bald``     mutual information between the label and the weights (Houlsby et al. 2011);
* ``entropy``  predictive entropy (max-entropy sampling);
* ``random``   a uniformly random batch (the baseline).

Learners, both refitted from scratch every round on the current labelled set:

* ``sgld``  C SGLD chains (:mod:`training.sgld`), K networks spread over the retained samples;
* ``apd``   online APD (Algorithm 2, :func:`training.distillation.online.distill_online`): the GAN
            trains alongside the same SGLD chains on a buffer of recent samples, and the K
            networks are drawn from the generator; no sample outlives the round.

Both learners run the same number of SGLD steps with the same settings. The posterior is
tempered (``temperature`` 1e-3 by default): with 20 to 60 labels the Bayes posterior of a
79,510-weight network under a unit Gaussian prior predicts little better than chance, and the
reference code's active learning ran the same way (its NoisedSGD noise corresponds to
``T = 1/1000``). Model selection in online APD uses no labels (the KL from the chains'
recent predictive to the generator's on unlabelled pool images).

The scale is set for a shared 2-core CPU and recorded in the report: the pool is a random
subset of the training split, test accuracy is measured on a random test subset, and there
are few rounds and seeds. It shows the trend, not the paper's 1,000-label curves.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from numpy.typing import NDArray
from tqdm import tqdm

from apd.networks import NetworkSpec
from apd.uncertainty import PredictiveSummary, ScoreName
from training import metrics, sgld
from training.evaluation.methods import MemberNetworks, spread_indices
from training.evaluation.results import (
    ActiveLearningSection,
    ActiveLearningSettingsRecord,
    CurveRecord,
    CurveSummary,
)


class Acquisition(enum.StrEnum):
    BALD = "bald"
    ENTROPY = "entropy"
    RANDOM = "random"


class Learner(enum.StrEnum):
    SGLD = "sgld"
    APD = "apd"


@dataclass(frozen=True)
class ActiveLearningSettings:
    seeds: tuple[int, ...] = (0, 1)
    rounds: int = 3
    acquire: int = 10
    initial_per_class: int = 2
    pool_size: int = 2000
    test_size: int = 2000
    num_samples: int = 50
    learners: tuple[Learner, ...] = (Learner.SGLD, Learner.APD)
    acquisitions: tuple[Acquisition, ...] = (
        Acquisition.BALD,
        Acquisition.ENTROPY,
        Acquisition.RANDOM,
    )
    chains: int = 4
    sgld_lr: float = 0.05
    temperature: float = 1e-3
    prior_std: float = 1.0
    burn_in: int = 200
    thinning: int = 5
    buffer_size: int = 200
    warmup_samples: int = 100
    gan_steps: int = 200
    apd_rank: int = 20
    selection_inputs: int = 500

    def __post_init__(self) -> None:
        if self.rounds < 0 or self.acquire <= 0 or self.initial_per_class <= 0:
            raise ValueError("rounds must be >= 0, acquire and initial_per_class positive")
        if not self.seeds:
            raise ValueError("at least one seed is needed")
        if self.pool_size < 10 * self.initial_per_class + self.rounds * self.acquire:
            raise ValueError("the pool is too small for that many rounds")

    @property
    def sgld_steps(self) -> int:
        """SGLD steps per round: what online APD runs (burn-in, warm-up, one per GAN step)."""
        warm = -(-self.warmup_samples // self.chains) * self.thinning
        return self.burn_in + warm + self.gan_steps

    def to_dict(self) -> ActiveLearningSettingsRecord:
        return {
            "seeds": list(self.seeds),
            "rounds": self.rounds,
            "acquire": self.acquire,
            "initial_per_class": self.initial_per_class,
            "pool_size": self.pool_size,
            "test_size": self.test_size,
            "num_samples": self.num_samples,
            "learners": [v.value for v in self.learners],
            "acquisitions": [v.value for v in self.acquisitions],
            "chains": self.chains,
            "sgld_lr": self.sgld_lr,
            "temperature": self.temperature,
            "prior_std": self.prior_std,
            "burn_in": self.burn_in,
            "thinning": self.thinning,
            "buffer_size": self.buffer_size,
            "warmup_samples": self.warmup_samples,
            "gan_steps": self.gan_steps,
            "apd_rank": self.apd_rank,
            "selection_inputs": self.selection_inputs,
            "sgld_steps_per_round": self.sgld_steps,
        }


@dataclass(frozen=True)
class Curve:
    learner: str
    acquisition: str
    seed: int
    labels: list[int]
    accuracy: list[float]
    seconds: float

    def to_dict(self) -> CurveRecord:
        return {
            "learner": self.learner,
            "acquisition": self.acquisition,
            "seed": self.seed,
            "labels": list(self.labels),
            "accuracy": list(self.accuracy),
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class ActiveLearningResult:
    settings: ActiveLearningSettings
    curves: list[Curve] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> ActiveLearningSection:
        return {
            "settings": self.settings.to_dict(),
            "curves": [c.to_dict() for c in self.curves],
            "seconds": self.seconds,
            "summary": summarize_curves(self.curves),
        }


def summarize_curves(curves: list[Curve]) -> list[CurveSummary]:
    """Mean and min/max over seeds of accuracy at each label count, per learner x acquisition."""
    groups: dict[tuple[str, str], list[Curve]] = {}
    for c in curves:
        groups.setdefault((c.learner, c.acquisition), []).append(c)
    out: list[CurveSummary] = []
    for (learner, acq), cs in groups.items():
        acc = np.array([c.accuracy for c in cs])
        out.append(
            {
                "learner": learner,
                "acquisition": acq,
                "seeds": len(cs),
                "labels": cs[0].labels,
                "mean": acc.mean(axis=0).tolist(),
                "min": acc.min(axis=0).tolist(),
                "max": acc.max(axis=0).tolist(),
            }
        )
    return out


def initial_labels(
    y: NDArray[np.integer], per_class: int, rng: np.random.Generator
) -> NDArray[np.int64]:
    """``per_class`` random indices of every class (classes 0..max(y))."""
    picks = [
        rng.choice(np.flatnonzero(y == c), size=per_class, replace=False)
        for c in range(int(y.max()) + 1)
    ]
    return np.sort(np.concatenate(picks)).astype(np.int64)


def acquisition_scores(summary: PredictiveSummary, acquisition: Acquisition) -> NDArray[np.float64]:
    if acquisition is Acquisition.BALD:
        return summary.score(ScoreName.MUTUAL_INFORMATION)
    if acquisition is Acquisition.ENTROPY:
        return summary.score(ScoreName.PREDICTIVE_ENTROPY)
    raise ValueError(f"{acquisition.value} acquisition has no score")


def select(
    summary: PredictiveSummary | None,
    acquisition: Acquisition,
    candidates: NDArray[np.int64],
    k: int,
    rng: np.random.Generator,
) -> NDArray[np.int64]:
    """The ``k`` candidates to label next: highest score first (ties broken at random)."""
    if acquisition is Acquisition.RANDOM or summary is None:
        return np.sort(rng.choice(candidates, size=k, replace=False))
    scores = acquisition_scores(summary, acquisition)
    jitter = rng.random(len(scores)) * 1e-12
    order = np.lexsort((jitter, -scores))
    return np.sort(candidates[order[:k]])


def fit_sgld(
    spec: NetworkSpec,
    x: NDArray[np.float32],
    y: NDArray[np.int64],
    s: ActiveLearningSettings,
    seed: int,
) -> torch.Tensor:
    """K networks spread over the SGLD samples retained after the burn-in."""
    from training.baselines import ClassificationLikelihood, MinibatchStream, init_theta

    n = len(x)
    settings = sgld.SGLDSettings(
        num_data=n,
        schedule=sgld.StepSchedule(lr=s.sgld_lr),
        prior_std=s.prior_std,
        temperature=s.temperature,
    )
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.asarray(y))
    transform = sgld.build(ClassificationLikelihood(spec, xt, yt), settings)
    state = transform.init(init_theta(spec, s.chains, gen))
    stream = MinibatchStream(n, min(100, n), s.chains, gen)
    kept: list[torch.Tensor] = []
    sgld.sample(
        transform,
        state,
        stream,
        s.sgld_steps,
        s.burn_in,
        s.thinning,
        settings.schedule,
        lambda st: kept.append(st.params.clone()),
        gen,
        progress=False,
    )
    samples = torch.cat(kept)
    return samples[torch.from_numpy(spread_indices(len(samples), s.num_samples))]


def fit_online_apd(
    spec: NetworkSpec,
    x: NDArray[np.float32],
    y: NDArray[np.int64],
    s: ActiveLearningSettings,
    seed: int,
    selection_x: NDArray[np.float32],
) -> torch.Tensor:
    """K networks drawn from a generator trained online alongside SGLD (Algorithm 2)."""
    from training.distillation.online import default_online_config, distill_online

    config = default_online_config(
        num_chains=s.chains,
        sgld_lr=s.sgld_lr,
        prior_std=s.prior_std,
        temperature=s.temperature,
        batch_size=100,
        burn_in=s.burn_in,
        thinning=s.thinning,
        buffer_size=s.buffer_size,
        warmup_samples=s.warmup_samples,
    )
    config = replace(
        config,
        distill=replace(
            config.distill,
            steps=s.gan_steps,
            rank=s.apd_rank,
            eval_every=max(1, s.gan_steps // 2),
            num_networks=s.num_samples,
            seed=seed,
        ),
    )
    # Model selection compares the generator with the chains on unlabelled pool images; the
    # labels passed along are placeholders that only feed the monitor's log lines.
    val = (selection_x, np.zeros(len(selection_x), dtype=np.int64))
    result = distill_online(spec, x, y, config, val=val, progress=False)
    return result.generator.sample(s.num_samples, torch.Generator().manual_seed(seed + 7))


def run_curve(
    spec: NetworkSpec,
    pool_x: NDArray[np.float32],
    pool_y: NDArray[np.int64],
    test_x: NDArray[np.float32],
    test_y: NDArray[np.int64],
    learner: Learner,
    acquisition: Acquisition,
    seed: int,
    s: ActiveLearningSettings,
    tick: Callable[[], None] | None = None,
) -> Curve:
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    # a stream of its own, so that both learners draw the same random acquisitions from rng
    selection_rng = np.random.default_rng(seed + 1_000_003)
    labelled = initial_labels(pool_y, s.initial_per_class, rng)
    labels, accs = [], []
    for r in range(s.rounds + 1):
        x, y = pool_x[labelled], pool_y[labelled]
        fit_seed = seed * 1000 + r
        if learner is Learner.SGLD:
            theta = fit_sgld(spec, x, y, s, fit_seed)
        else:
            unlabelled = np.setdiff1d(np.arange(len(pool_x)), labelled)
            sel = selection_rng.choice(
                unlabelled, size=min(s.selection_inputs, len(unlabelled)), replace=False
            )
            theta = fit_online_apd(spec, x, y, s, fit_seed, pool_x[sel])
        members = MemberNetworks(spec, theta)
        labels.append(len(labelled))
        accs.append(metrics.accuracy(members.summary(test_x).probabilities, test_y))
        if tick is not None:
            tick()
        if r == s.rounds:
            break
        candidates = np.setdiff1d(np.arange(len(pool_x)), labelled)
        summary = None
        if acquisition is not Acquisition.RANDOM:
            summary = members.summary(pool_x[candidates])
        new = select(summary, acquisition, candidates, s.acquire, rng)
        labelled = np.sort(np.concatenate([labelled, new]))
    return Curve(
        learner.value, acquisition.value, seed, labels, accs, round(time.perf_counter() - t0, 1)
    )


def run_active_learning(
    spec: NetworkSpec,
    train_x: NDArray[np.float32],
    train_y: NDArray[np.int64],
    test_x: NDArray[np.float32],
    test_y: NDArray[np.int64],
    s: ActiveLearningSettings,
    progress: bool = True,
) -> ActiveLearningResult:
    """Every learner x acquisition x seed; the pool and test subsets are fixed per seed."""
    t0 = time.perf_counter()
    total = len(s.seeds) * len(s.learners) * len(s.acquisitions) * (s.rounds + 1)
    bar = tqdm(total=total, desc="active learning", disable=not progress, unit="fit")
    curves = []

    def tick() -> None:
        bar.update()

    for seed in s.seeds:
        rng = np.random.default_rng(10_000 + seed)
        pool = rng.choice(len(train_x), size=min(s.pool_size, len(train_x)), replace=False)
        test = rng.choice(len(test_x), size=min(s.test_size, len(test_x)), replace=False)
        px, py = np.ascontiguousarray(train_x[pool]), np.asarray(train_y[pool], np.int64)
        tx, ty = np.ascontiguousarray(test_x[test]), np.asarray(test_y[test], np.int64)
        for learner in s.learners:
            for acquisition in s.acquisitions:
                bar.set_postfix_str(
                    f"{learner.value}/{acquisition.value} seed {seed}", refresh=False
                )
                curves.append(run_curve(spec, px, py, tx, ty, learner, acquisition, seed, s, tick))
    bar.close()
    return ActiveLearningResult(s, curves, round(time.perf_counter() - t0, 1))
