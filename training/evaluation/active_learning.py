"""Experiment 4: active learning on MNIST with SGLD, online APD and MC-Dropout.

The protocol of Wang et al. (2018), after Gal et al. (2017): start from 20 labelled training
digits (2 per class, drawn at random), and in each of 50 rounds fit the posterior to the
labelled set, score a fresh random subset of 2,000 unlabelled training images (Gal et al.'s
size), move ``acquire`` (10) of them, picked by the acquisition function and
``batch_rule``, into the labelled set, and record the test
accuracy of the posterior predictive on the whole MNIST test set (every ``test_every``
rounds and the last: a test pass of K CNNs over 10,000 images costs as much as a round's
fit). Acquisition functions:

* ``bald``     mutual information between the label and the weights (Houlsby et al. 2011);
* ``entropy``  predictive entropy (max-entropy sampling);
* ``random``   a uniformly random batch (the baseline).

BALD and entropy pick their ``acquire`` candidates by ``batch_rule``
(:mod:`training.evaluation.acquisition`): by default ``power`` with ``power_exponent`` 4,
drawn without replacement with probability proportional to ``score ** 4`` (power
acquisition, Kirsch et al. 2023), not Gal et al.'s top ``acquire``. Measured on SGLD
(seeds 0-2, whole test set unless said; benchmarks/results/al_probe-*.md):

* top-10 spends a round on near-duplicates of the one confusion a small-data posterior
  singles out: at 120 labels its BALD trails random (83.8 against 85.5 %, the K = 100
  report's curves), where exponent 1 leads it (89.3 against 85.8 %, 2,000 test images,
  ``python benchmarks/al_probe.py batch``);
* exponent 1 drifts towards random later, when most of the 2,000 candidates keep a small
  score whose summed mass outweighs the few high ones (online APD, seed 0: 94.7 % at 520
  labels against top-10's 96.5 %, benchmarks/results/active_learning-curves-power.jsonl);
* exponent 4 keeps both (``python benchmarks/al_probe.py power-exponent --test 10000``):
  88.2 / 93.1 / 95.4 / 96.2 / 96.7 % at 120 / 220 / 320 / 420 / 520 labels, against
  top-10's 83.8 / 90.6 / 94.1 / 95.7 / 96.4 and random's 85.5 / 90.5 / 92.1 / 92.6 / 93.8;
  exponent 2 leads early as well (88.6 % at 120) but ends lower (96.2 %);
* one exponent serves every learner once online APD's generator spreads as the chains do.
  With a 300-step moment fit its 100 networks kept disagreeing where SGLD's samples came
  to agree (median BALD over the candidates 0.22 nats in the last twenty rounds, SGLD's
  0.05-0.07), so at exponent 4 its draw's perplexity was 1.4x SGLD's in the first ten
  rounds and 2.9-4.9x in the last twenty (seed 0, ``python benchmarks/al_draw.py``,
  benchmarks/results/al_draw.md), and exponent 8 (a separate setting then) lifted its BALD
  by 0.4-0.8 point from 320 labels. With the 1,000-step fit below, exponent 4 serves it as
  it serves SGLD: its BALD mean is 88.86 / 93.14 / 95.09 / 96.07 / 96.76 % at 120 / 220 /
  320 / 420 / 520 labels against SGLD's 88.21 / 93.11 / 95.42 / 96.22 / 96.75, inside
  SGLD's seed spread at every count (exponent 8: 0.30 point above it at 520; seeds 0-2,
  whole test set, the committed report);
* BatchBALD (``joint``: greedy on the batch's joint mutual information, Kirsch et al. 2019)
  lifts top-10's 70-label dip (81.8 against 69.7 %, random 81.1) but only ties random at
  120 labels (86.0 against 86.4 %; 2,000 test images, ``python benchmarks/al_probe.py
  batchbald``), at 1-2 s of scoring a round.

Learners; SGLD and online APD are warm-started every round from the last round's chain states
(as the reference code does; ``warm_start=False`` refits from scratch):

* ``sgld``     C SGLD chains (:mod:`training.sgld`), K networks spread over the retained
               samples;
* ``apd``      online APD (Algorithm 2, :func:`training.distillation.online.distill_online`):
               the GAN trains alongside the same SGLD chains on a buffer of recent samples, and
               ``apd_networks`` (100) networks are drawn from the generator, which draws any
               number (SGLD has its round's samples, MC-Dropout scores with 100 passes); no
               sample outlives the round. With 20 networks, as many as SGLD's, its BALD curve
               ends level with SGLD's too but has less to average over (``python
               benchmarks/al_probe.py apd-networks``, seeds 0-2, 2,000 test images: 47.6 /
               85.6 / 93.7 / 96.6 % at 20 / 120 / 320 / 520 labels against 54.9 / 84.5 /
               94.7 / 97.0 % with 100, and SGLD's 57.1 / 84.5 / 94.4 / 96.7 %);
* ``dropout``  MC-Dropout as the field's reference runs it (Gal, Islam & Ghahramani 2017, their
               Keras code), on its own network (``dropout_arch``: LeNet-5, what the other
               learners run in the reference report), trained from scratch every round
               by Adam (rate 1e-3, 50 epochs) on the mean cross-entropy plus ``c / N ||W||^2``
               on the first dense layer's weights (Keras's ``l2(c / N)``, c = 3.5, N the
               labelled set's size), dropout before every dense layer (``dropout_rates``);
               its K = ``dropout_passes`` (100, as theirs) stochastic passes are the members
               that BALD, entropy and the test predictive average over. Initialised as Keras
               does (Glorot uniform weights, zero biases). Not theirs, measured
               (``python benchmarks/al_fit.py``, benchmarks/results/al_fit.md, one fit on
               the labelled sets of the random curve, 2 seeds): the network is LeNet-5 with
               dropout 0.25 / 0.5 / 0.5, not their conv 32 4x4, conv 32 4x4, pool, dense 128
               (``dropout_arch``; 21 times LeNet-5's multiply-adds, so its 9 curves alone
               would take this CPU longer than a session, and at 520 labels it predicts no
               better: 93.9 % in minibatches of 128); minibatches of 32, not 128 (an epoch of
               a small labelled set is one step at 128: 50 steps leave LeNet-5 at 48.5 % with
               120 labels, against 80.8 % in batches of 32, and 93.7 against 95.2 % at 520),
               an epoch of full minibatches (Keras ends one with a partial minibatch).

SGLD and online APD run the same number of SGLD steps with the same settings. The posterior is
tempered at T = 0.1, a measured choice (``python benchmarks/al_temperature.py``, LeNet-5,
4 chains, K = 20, 2,000 test images, benchmarks/results/al_temperature.md): at T = 1 under
the unit Gaussian prior the posterior predicts at chance with 20 and 120 labels (10.1 % and
10.5 %); at T = 0.1 it predicts 47.1 / 83.7 / 93.3 % with 20 / 120 / 520 labels with mean
mutual information 1.14 / 0.48 / 0.22 nats on test images, so BALD has something to rank;
at T = 0.01 the mutual information falls to 0.39 / 0.25 / 0.09. The prior is N(0, 0.3^2),
measured too: under N(0, 1) the warm-started chains drift while the labelled set is small
(the noise of a step grows as the labelled set shrinks, and a unit prior barely pulls back),
and carry that drift on: 75.5 % at 120 labels on the random curve against 87.5 % when every
round starts afresh (``python benchmarks/al_probe.py continuation``); under N(0, 0.3^2) the
warm start reaches 87.3 %, and over the 50 rounds BALD reaches 97.0 % at 520 labels
against random's 93.7 % (seed 0, ``python benchmarks/al_probe.py prior``). A fresh fit
predicts no better under any prior, temperature, step or preconditioner tried
(benchmarks/results/al_fit.md: 92.3-93.8 % at 520 random labels), and a tighter prior,
N(0, 0.15^2) or N(0, 0.1^2), collapses the network to chance. Online APD's generator
starts every round at the per-chain Gaussian of the round's first samples
(``moment_init_steps``), as a round's 70 GAN steps cannot place the modes from a random
start (``python benchmarks/al_probe.py moment-init``: 11-34 % against 39-58 %), with
1,000 Adam steps of the moment fit: after 300 its networks disagreed more than SGLD's
(mean mutual information on the test images 0.339 / 0.233 nats with 120 / 520 random labels
against 0.241 / 0.101, NLL 0.344 against 0.250 at 520), after 1,000 about as much (0.226 /
0.108, NLL 0.259), in fits of 38-39 s against 31-40 s (seeds 0-1, ``python
benchmarks/al_fit.py --variants apd-moment300 apd-moment1000``). Model
selection in online APD uses no labels (the KL from the chains' recent predictive to the
generator's on unlabelled pool images).
"""

from __future__ import annotations

import enum
import json
import math
import multiprocessing
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, NotRequired

import numpy as np
import torch
from numpy.typing import NDArray
from pydantic import TypeAdapter
from tqdm import tqdm
from typing_extensions import TypedDict

from apd.networks import CNNSpec, Conv2d, NetworkSpec, build_spec
from training import metrics, sgld, torch_ops
from training.baselines import ClassificationLikelihood, MinibatchStream, init_theta
from training.errors import UserError
from training.evaluation.acquisition import Acquisition, BatchRule, select
from training.evaluation.methods import MemberNetworks, spread_indices
from training.evaluation.results import (
    ActiveLearningSection,
    ActiveLearningSettingsRecord,
    CurveRecord,
    CurveRunRecord,
    CurveSummary,
    as_record,
)
from training.revision import code_revision
from training.threads import cpu_model


class Learner(enum.StrEnum):
    SGLD = "sgld"
    APD = "apd"
    DROPOUT = "dropout"


@dataclass(frozen=True)
class ActiveLearningSettings:
    """The paper's protocol by default (see the module docstring); sizes for a 2-core CPU."""

    seeds: tuple[int, ...] = (0, 1, 2)
    rounds: int = 50
    acquire: int = 10
    initial_per_class: int = 2
    pool_size: int | None = None
    candidates: int = 2000
    test_size: int | None = None
    test_every: int = 10
    num_samples: int = 20
    learners: tuple[Learner, ...] = (Learner.SGLD, Learner.APD, Learner.DROPOUT)
    acquisitions: tuple[Acquisition, ...] = (
        Acquisition.BALD,
        Acquisition.ENTROPY,
        Acquisition.RANDOM,
    )
    batch_rule: BatchRule = BatchRule.POWER
    # power acquisition's exponent: candidates drawn with probability ~ score ** power_exponent
    power_exponent: float = 4.0
    chains: int = 4
    sgld_lr: float = 0.05
    preconditioner: sgld.Preconditioner = sgld.Preconditioner.IDENTITY
    temperature: float = 0.1
    prior_std: float = 0.3
    batch_size: int = 50
    first_burn_in: int = 500
    burn_in: int = 30
    thinning: int = 5
    buffer_size: int = 100
    warmup_samples: int = 40
    gan_steps: int = 70
    apd_rank: int = 20
    # networks online APD draws to score and predict with: its generator draws any number
    # (MC-Dropout scores with its 100 passes; SGLD with num_samples of a round's samples)
    apd_networks: int = 100
    moment_init_steps: int = 1000
    selection_inputs: int = 500
    warm_start: bool = True
    dropout_arch: str = "lenet5"
    dropout_rates: tuple[float, ...] = (0.25, 0.5, 0.5)
    dropout_weight_decay: float = 3.5
    dropout_lr: float = 1e-3
    dropout_batch_size: int = 32
    dropout_epochs: int = 50
    dropout_passes: int = 100

    def __post_init__(self) -> None:
        if self.rounds < 0 or self.acquire <= 0 or self.initial_per_class <= 0:
            raise ValueError("rounds must be >= 0, acquire and initial_per_class positive")
        if not self.seeds:
            raise ValueError("at least one seed is needed")
        for name in (
            "candidates",
            "test_every",
            "num_samples",
            "chains",
            "batch_size",
            "dropout_batch_size",
            "dropout_epochs",
            "dropout_passes",
            "apd_networks",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if not self.power_exponent > 0:
            raise ValueError("power_exponent must be positive")
        if not (self.dropout_lr > 0 and self.dropout_weight_decay >= 0):
            raise ValueError("dropout_lr must be positive and dropout_weight_decay >= 0")
        if self.preconditioner is not sgld.Preconditioner.IDENTITY and Learner.APD in self.learners:
            raise ValueError("online APD runs plain SGLD: a preconditioner is for the sgld learner")
        if self.candidates < self.acquire:
            raise ValueError("candidates must be at least acquire")
        if (
            self.pool_size is not None
            and self.pool_size < 10 * self.initial_per_class + self.rounds * self.acquire
        ):
            raise ValueError("the pool is too small for that many rounds")

    def round_burn_in(self, first: bool) -> int:
        """Burn-in of a round: the first starts from a fresh initialisation and burns in for
        ``first_burn_in`` steps; later rounds continue the last round's chains when
        ``warm_start`` is set, and burn in for ``burn_in``."""
        return self.first_burn_in if first or not self.warm_start else self.burn_in

    def sgld_steps(self, first: bool) -> int:
        """SGLD steps of a round: what online APD runs (burn-in, warm-up, one per GAN step)."""
        warm = -(-self.warmup_samples // self.chains) * self.thinning
        return self.round_burn_in(first) + warm + self.gan_steps

    def tested(self, r: int) -> bool:
        """Whether round ``r`` measures test accuracy: every ``test_every`` rounds and the last."""
        return r % self.test_every == 0 or r == self.rounds

    def to_dict(self) -> ActiveLearningSettingsRecord:
        return as_record(
            self,
            ActiveLearningSettingsRecord,
            # recorded where it acts: a curve log reuses top / joint curves logged before it
            exclude=() if self.batch_rule is BatchRule.POWER else ("power_exponent",),
            sgld_steps_first_round=self.sgld_steps(first=True),
            sgld_steps_per_round=self.sgld_steps(first=False),
        )


def active_learning_section(
    s: ActiveLearningSettings, curves: list[CurveRecord], seconds: float
) -> ActiveLearningSection:
    """``results.json``'s active-learning section: the settings, every curve, the wall time
    and the summary over seeds."""
    return {
        "settings": s.to_dict(),
        "curves": curves,
        "seconds": seconds,
        "summary": summarize_curves(curves),
    }


def summarize_curves(curves: list[CurveRecord]) -> list[CurveSummary]:
    """Mean and min/max over seeds of accuracy at each label count, per learner x acquisition."""
    groups: dict[tuple[str, str], list[CurveRecord]] = {}
    for c in curves:
        groups.setdefault((c["learner"], c["acquisition"]), []).append(c)
    out: list[CurveSummary] = []
    for (learner, acq), cs in groups.items():
        acc = np.array([c["accuracy"] for c in cs])
        out.append(
            {
                "learner": learner,
                "acquisition": acq,
                "seeds": len(cs),
                "labels": cs[0]["labels"],
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


def fit_sgld(
    spec: NetworkSpec,
    x: NDArray[np.float32],
    y: NDArray[np.int64],
    s: ActiveLearningSettings,
    seed: int,
    init: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K networks spread over the SGLD samples retained after the burn-in, and the chains'
    final states. ``init`` ``(C, P)``: states to continue from (default: a fresh start)."""
    n = len(x)
    settings = sgld.SGLDSettings(
        num_data=n,
        schedule=sgld.StepSchedule(lr=s.sgld_lr),
        prior_std=s.prior_std,
        temperature=s.temperature,
        preconditioner=s.preconditioner,
    )
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.asarray(y))
    likelihood = ClassificationLikelihood(spec, xt, yt)
    transform = sgld.build(likelihood, settings, likelihood.fast_gradient)
    state = transform.init(init_theta(spec, s.chains, gen) if init is None else init)
    stream = MinibatchStream(n, min(s.batch_size, n), s.chains, gen)
    kept: list[torch.Tensor] = []
    first = init is None
    state = sgld.sample(
        transform,
        state,
        stream,
        s.sgld_steps(first),
        s.round_burn_in(first),
        s.thinning,
        settings.schedule,
        lambda st: kept.append(st.params.clone()),
        gen,
        progress=False,
    )
    samples = torch.cat(kept)
    return samples[torch.from_numpy(spread_indices(len(samples), s.num_samples))], state.params


def fit_online_apd(
    spec: NetworkSpec,
    x: NDArray[np.float32],
    y: NDArray[np.int64],
    s: ActiveLearningSettings,
    seed: int,
    selection_x: NDArray[np.float32],
    init: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K networks drawn from a generator trained online alongside SGLD (Algorithm 2), and
    the chains' final states; ``init`` as in :func:`fit_sgld`. The generator itself starts
    afresh every round (its subspace is refitted to the round's first samples)."""
    from training.distillation.online import default_online_config, distill_online

    config = default_online_config(
        num_chains=s.chains,
        sgld_lr=s.sgld_lr,
        prior_std=s.prior_std,
        temperature=s.temperature,
        batch_size=s.batch_size,
        burn_in=s.round_burn_in(first=init is None),
        thinning=s.thinning,
        buffer_size=s.buffer_size,
        warmup_samples=s.warmup_samples,
        moment_init_steps=s.moment_init_steps,
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
    result = distill_online(spec, x, y, config, val=val, progress=False, init=init)
    theta = result.generator.sample(s.apd_networks, torch.Generator().manual_seed(seed + 7))
    assert result.final_chains is not None
    return theta, result.final_chains


def dropout_spec(
    spec: NetworkSpec, s: ActiveLearningSettings, image_shape: Sequence[int] | None = None
) -> NetworkSpec:
    """The MC-Dropout learner's network (``s.dropout_arch``) for the inputs and classes of
    ``spec``, the other learners' network: on ``image_shape`` (one example's shape) where
    given, else on ``spec``'s input (a CNN's image; an MLP's flat vector)."""
    if image_shape is None:
        image_shape = spec.input_shape if isinstance(spec, CNNSpec) else (spec.layer_sizes[0],)
    dspec = build_spec(s.dropout_arch, image_shape, spec.num_classes)
    torch_ops.dropout_rates(dspec, s.dropout_rates)  # refuses rates that do not fit it
    return dspec


def glorot_theta(spec: NetworkSpec, generator: torch.Generator) -> torch.Tensor:
    """One network ``(1, P)`` initialised as Keras initialises Gal et al.'s: every weight
    ``~ U(-a, a)``, ``a = sqrt(6 / (fan_in + fan_out))`` (Glorot & Bengio 2010; a conv's fans
    are ``C_in k k`` and ``O k k``), biases 0."""
    theta = torch.zeros(1, spec.num_params)
    for (w_shape, _), (ws, _) in zip(spec.layer_shapes, spec.offsets(), strict=True):
        if len(w_shape) == 4:
            o, c, k, _ = w_shape
            fans = c * k * k + o * k * k
        else:
            fans = w_shape[0] + w_shape[1]
        a = math.sqrt(6.0 / fans)
        theta[:, ws] = torch.rand(1, ws.stop - ws.start, generator=generator) * (2 * a) - a
    return theta


def fit_dropout(
    spec: NetworkSpec,
    x: NDArray[np.float32],
    y: NDArray[np.int64],
    s: ActiveLearningSettings,
    seed: int,
) -> torch.Tensor:
    """One network ``(1, P)`` trained from scratch with dropout, as Gal et al. (2017) train
    theirs (module docstring): Adam on ``-1/B sum_i log p(y_i | x_i, theta, masks) +
    c / N ||W_d||^2``, ``W_d`` the weights of the first dense layer (an MLP's first layer),
    from :func:`glorot_theta`, for ``dropout_epochs`` epochs of ``ceil(N / B)`` minibatches
    of ``B = min(dropout_batch_size, N)``."""
    n = len(x)
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.asarray(y))
    likelihood = ClassificationLikelihood(spec, xt, yt, s.dropout_rates, gen)
    convs = sum(isinstance(lay, Conv2d) for lay in spec.layers) if isinstance(spec, CNNSpec) else 0
    decayed = spec.offsets()[convs][0]
    decay = s.dropout_weight_decay / n
    batch = min(s.dropout_batch_size, n)
    stream = MinibatchStream(n, batch, 1, gen)
    theta = glorot_theta(spec, gen).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=s.dropout_lr)
    with torch.enable_grad():
        for _ in range(s.dropout_epochs * math.ceil(n / batch)):
            opt.zero_grad(set_to_none=True)
            loss = -likelihood(theta, next(stream)).sum() + decay * theta[:, decayed].square().sum()
            loss.backward()
            opt.step()
    if not bool(torch.isfinite(theta).all()):
        raise FloatingPointError(f"MC-Dropout training diverged; lower dropout_lr ({s.dropout_lr})")
    return theta.detach()


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
) -> CurveRecord:
    """One learning curve; ``spec`` is the learner's network (for ``dropout``, the one
    :func:`dropout_spec` builds)."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    # streams of their own, so that all learners draw the same random acquisitions from rng
    selection_rng = np.random.default_rng(seed + 1_000_003)
    candidate_rng = np.random.default_rng(seed + 2_000_003)
    labelled = initial_labels(pool_y, s.initial_per_class, rng)
    labels, accs = [], []
    chains: torch.Tensor | None = None
    for r in range(s.rounds + 1):
        x, y = pool_x[labelled], pool_y[labelled]
        fit_seed = seed * 1000 + r
        unlabelled = np.setdiff1d(np.arange(len(pool_x)), labelled)
        if learner is Learner.DROPOUT:
            members = MemberNetworks(
                spec, fit_dropout(spec, x, y, s, fit_seed), s.dropout_rates, s.dropout_passes
            )
        elif learner is Learner.SGLD:
            theta, chains = fit_sgld(spec, x, y, s, fit_seed, chains)
            members = MemberNetworks(spec, theta)
        else:
            sel = selection_rng.choice(
                unlabelled, size=min(s.selection_inputs, len(unlabelled)), replace=False
            )
            theta, chains = fit_online_apd(spec, x, y, s, fit_seed, pool_x[sel], chains)
            members = MemberNetworks(spec, theta)
        if not s.warm_start:
            chains = None
        if s.tested(r):
            labels.append(len(labelled))
            probs = members.summary(test_x, seed=fit_seed).probabilities
            accs.append(metrics.accuracy(probs, test_y))
        if r == s.rounds:
            break
        if acquisition is Acquisition.RANDOM:
            new = select(None, acquisition, unlabelled, s.acquire, rng)
        else:
            size = min(s.candidates, len(unlabelled))
            candidates = np.sort(candidate_rng.choice(unlabelled, size=size, replace=False))
            member_probs = members.probs(pool_x[candidates], seed=fit_seed + 1)
            new = select(
                member_probs,
                acquisition,
                candidates,
                s.acquire,
                rng,
                s.batch_rule,
                s.power_exponent,
            )
        labelled = np.sort(np.concatenate([labelled, new]))
    return {
        "learner": learner.value,
        "acquisition": acquisition.value,
        "seed": seed,
        "labels": labels,
        "accuracy": accs,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def run_active_learning(
    spec: NetworkSpec,
    train_x: NDArray[np.float32],
    train_y: NDArray[np.int64],
    test_x: NDArray[np.float32],
    test_y: NDArray[np.int64],
    s: ActiveLearningSettings,
    progress: bool = True,
    workers: int = 1,
    image_shape: Sequence[int] | None = None,
    log: Path | None = None,
) -> ActiveLearningSection:
    """Every learner x acquisition x seed. The pool is the training split (or a random
    ``pool_size`` subset of it, fixed per seed), the test set likewise with ``test_size``.
    SGLD and online APD fit ``spec``; MC-Dropout its own CNN on ``image_shape`` (one
    example's shape; see :func:`dropout_spec`).

    The curves are independent: ``workers`` > 1 runs them in that many processes, each on
    one torch thread (on a CPU, two single-threaded processes do twice the work of one
    two-threaded one: these networks are too small for intra-op threads to pay).

    ``log``: a :class:`CurveLog` file. Each finished curve is appended to it, and the curves
    it already holds under these settings are not run again: a run of hours that is
    interrupted resumes where it stopped."""
    t0 = time.perf_counter()
    curve_log = CurveLog(log, s) if log is not None else None
    earlier = curve_log.curves() if curve_log is not None else {}
    specs = {
        learner: dropout_spec(spec, s, image_shape) if learner is Learner.DROPOUT else spec
        for learner in s.learners
    }
    jobs: list[_Job] = []
    for seed in s.seeds:
        rng = np.random.default_rng(10_000 + seed)
        pool = _subset(len(train_x), s.pool_size, rng)
        test = _subset(len(test_x), s.test_size, rng)
        for learner in s.learners:
            for acquisition in s.acquisitions:
                jobs.append((specs[learner], pool, test, learner, acquisition, seed))
    order = {_job_key(j): i for i, j in enumerate(jobs)}
    curves = [earlier[key] for key in order if key in earlier]
    jobs = [j for j in jobs if _job_key(j) not in earlier]
    # Run the longest (online APD's) first, so that no long curve starts last on its own.
    jobs.sort(key=lambda j: j[3] is not Learner.APD)
    bar = tqdm(
        total=len(order),
        initial=len(curves),
        desc="active learning",
        disable=not progress,
        unit="curve",
        miniters=1,
    )

    def finished(curve: CurveRecord) -> None:
        curves.append(curve)
        if curve_log is not None:
            curve_log.append(curve, time.perf_counter() - t0)
        bar.update()

    if workers <= 1:
        data = (train_x, train_y, test_x, test_y)
        for job in jobs:
            bar.set_postfix_str(f"{job[3].value}/{job[4].value} seed {job[5]}", refresh=False)
            finished(_job_curve(data, s, *job))
    elif jobs:
        ctx = multiprocessing.get_context("spawn")
        init = ((train_x, train_y, test_x, test_y), s)
        # Leaving the block terminates the workers: the first failed curve stops the run
        # instead of waiting for the curves still running.
        with ctx.Pool(workers, _worker_init, init) as procs:
            for curve in procs.imap_unordered(_worker_curve, jobs):
                finished(curve)
    curves.sort(key=lambda c: order[(c["learner"], c["acquisition"], c["seed"])])
    bar.close()
    if curve_log is None:
        return active_learning_section(s, curves, round(time.perf_counter() - t0, 1))
    seconds = time.perf_counter() - t0 + curve_log.earlier_seconds()
    return active_learning_section(s, curves, round(seconds, 1)) | {"runs": curve_log.runs()}


class CurveLog:
    """The finished curves of a run, one JSON line each: the settings that shape a curve
    (all but which seeds, learners and acquisitions the run covers), the curve, when its run
    started, how long that run had taken when the curve finished, and the CPU it ran on
    (a curve's figures are reproducible bit-for-bit only on the same CPU model: SGLD's
    chains amplify the kernels' rounding, so a seed's first fit can differ by a few points
    between machines).

    :meth:`curves` returns the logged curves whose learner's settings equal ``s``'s (the
    settings of the other learners do not shape them, :data:`_SHAPES`, nor, of a random
    curve, how scored acquisitions pick, :data:`_SCORED`; a line logged before
    a setting that shapes its learner existed does not match; the code that ran them is not
    compared: a change that alters results must change a setting or start a new log);
    :meth:`runs` the runs that finished them, and :meth:`earlier_seconds` those runs' wall
    time before this one (each run's time to its last finished curve: a curve cut off
    mid-way is lost)."""

    def __init__(self, path: Path, s: ActiveLearningSettings) -> None:
        self.path = path
        self.settings = _curve_settings(s)
        self.run = uuid.uuid4().hex  # tells this run's lines from earlier runs'
        self.started = datetime.now(UTC).isoformat(timespec="seconds")
        self.revision = code_revision()  # the code this run imported, whatever lands meanwhile
        self.cpu = cpu_model()
        self.entries: list[_LogLine] = []
        if path.is_file():
            for n, line in enumerate(path.read_text().splitlines(), 1):
                try:
                    entry = _LINE.validate_json(line)
                    learner = Learner(entry["curve"]["learner"])
                    acquisition = Acquisition(entry["curve"]["acquisition"])
                except ValueError as exc:
                    raise UserError(
                        f"{path}:{n}: not a curve-log line ({exc}); move the file away to "
                        "start the run afresh"
                    ) from None
                logged = shaping(entry["settings"], learner, acquisition)
                if logged == shaping(self.settings, learner, acquisition):
                    self.entries.append(entry)

    def _latest(self) -> dict[tuple[str, str, int], _LogLine]:
        return {
            (e["curve"]["learner"], e["curve"]["acquisition"], e["curve"]["seed"]): e
            for e in self.entries
        }

    def curves(self) -> dict[tuple[str, str, int], CurveRecord]:
        return {key: e["curve"] for key, e in self._latest().items()}

    def _run_seconds(self) -> dict[str, float]:
        """Each logged run's wall time: to its last finished curve."""
        seconds: dict[str, float] = {}
        for e in self.entries:
            seconds[e["run"]] = max(seconds.get(e["run"], 0.0), e["elapsed"])
        return seconds

    def runs(self) -> list[CurveRunRecord]:
        """The runs whose curves :meth:`curves` returns, in the order they started."""
        seconds, runs = self._run_seconds(), dict[str, CurveRunRecord]()
        for e in self._latest().values():
            r = runs.setdefault(
                e["run"],
                {
                    "started": e["run_started"],
                    "code_revision": e["code_revision"],
                    "cpu": e.get("cpu"),
                    "curves": 0,
                    "seconds": seconds[e["run"]],
                },
            )
            r["curves"] += 1
        return sorted(runs.values(), key=lambda r: r["started"])

    def earlier_seconds(self) -> float:
        return sum(t for run, t in self._run_seconds().items() if run != self.run)

    def append(self, curve: CurveRecord, elapsed: float) -> None:
        entry: _LogLine = {
            "settings": self.settings,
            "curve": curve,
            "run": self.run,
            "run_started": self.started,
            "elapsed": round(elapsed, 1),
            "code_revision": self.revision,
            "cpu": self.cpu,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        self.entries.append(entry)


class _LogLine(TypedDict):
    settings: dict[str, Any]
    curve: CurveRecord
    run: str
    run_started: str
    elapsed: float
    code_revision: str
    cpu: NotRequired[str]  # absent in lines logged before it was recorded


_LINE: Final = TypeAdapter(_LogLine)

_CHAINS: Final = frozenset({Learner.SGLD, Learner.APD})
# The settings that shape only some learners' curves (every other one shapes them all):
# a logged curve is reused when the settings that shape its learner are unchanged.
_SHAPES: Final[dict[str, frozenset[Learner]]] = {
    **dict.fromkeys(
        (
            "num_samples",
            "chains",
            "sgld_lr",
            "preconditioner",
            "temperature",
            "prior_std",
            "batch_size",
            "first_burn_in",
            "burn_in",
            "thinning",
            "warmup_samples",
            "gan_steps",
            "warm_start",
            "sgld_steps_first_round",
            "sgld_steps_per_round",
        ),
        _CHAINS,
    ),
    **dict.fromkeys(
        (
            "buffer_size",
            "apd_rank",
            "apd_networks",
            "moment_init_steps",
            "selection_inputs",
        ),
        frozenset({Learner.APD}),
    ),
    **dict.fromkeys(
        (
            "dropout_arch",
            "dropout_rates",
            "dropout_weight_decay",
            "dropout_lr",
            "dropout_batch_size",
            "dropout_epochs",
            "dropout_passes",
        ),
        frozenset({Learner.DROPOUT}),
    ),
}


# The settings of scored acquisitions only: a random curve draws no candidates to score.
_SCORED: Final = frozenset({"candidates", "batch_rule", "power_exponent"})


def _curve_settings(s: ActiveLearningSettings) -> dict[str, Any]:
    """What shapes one curve: the settings less the lists of curves a run covers."""
    record = dict(s.to_dict())
    for run_only in ("seeds", "learners", "acquisitions"):
        record.pop(run_only)
    return json.loads(json.dumps(record))


def shaping(settings: dict[str, Any], learner: Learner, acquisition: Acquisition) -> dict[str, Any]:
    """The recorded ``settings`` (:meth:`ActiveLearningSettings.to_dict`, as JSON) that shape
    ``learner``'s curves with ``acquisition`` (``RANDOM``: what shapes its fits alone)."""
    return {
        k: v
        for k, v in settings.items()
        if (k not in _SHAPES or learner in _SHAPES[k])
        and (k not in _SCORED or acquisition is not Acquisition.RANDOM)
    }


def _job_key(job: _Job) -> tuple[str, str, int]:
    return job[3].value, job[4].value, job[5]


_Data = tuple[NDArray[np.float32], NDArray[np.int64], NDArray[np.float32], NDArray[np.int64]]
_Job = tuple[NetworkSpec, NDArray[np.int64], NDArray[np.int64], Learner, Acquisition, int]
_WORKER: dict[str, Any] = {}


def _job_curve(
    data: _Data,
    s: ActiveLearningSettings,
    spec: NetworkSpec,
    pool: NDArray[np.int64],
    test: NDArray[np.int64],
    learner: Learner,
    acquisition: Acquisition,
    seed: int,
) -> CurveRecord:
    """One curve on the ``pool`` / ``test`` rows of ``data`` (train x, y, test x, y)."""
    train_x, train_y, test_x, test_y = data
    px, py = np.ascontiguousarray(train_x[pool]), np.asarray(train_y[pool], np.int64)
    tx, ty = np.ascontiguousarray(test_x[test]), np.asarray(test_y[test], np.int64)
    return run_curve(spec, px, py, tx, ty, learner, acquisition, seed, s)


def _worker_init(data: _Data, s: ActiveLearningSettings) -> None:
    """Each worker process receives the data once and runs single-threaded."""
    torch.set_num_threads(1)
    _WORKER.update(data=data, settings=s)


def _worker_curve(job: _Job) -> CurveRecord:
    w = _WORKER
    return _job_curve(w["data"], w["settings"], *job)


def _subset(n: int, size: int | None, rng: np.random.Generator) -> NDArray[np.int64]:
    """All of ``range(n)`` when ``size`` is None, else a random ``size`` of it (sorted)."""
    if size is None or size >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, size=size, replace=False))
