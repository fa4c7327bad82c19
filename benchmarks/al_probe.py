"""Probes of active learning's design: the protocol's first rounds under variant settings.

Each probe runs :func:`training.evaluation.active_learning.run_active_learning` once per
variant (the protocol's settings with a few changed), on the first ``--rounds`` rounds and
a random ``--test`` of the MNIST test images (every ``--test-every`` rounds), and tabulates
each learner x acquisition's test accuracy (mean over seeds, min-max beside it):

``moment-init``
    Online APD whose generator starts every round at the per-chain diagonal Gaussian of the
    round's warm-up samples (``moment_init_steps``, the protocol's default) against the
    generator's random initialisation, SGLD beside them (seed 0, BALD, rounds 0-6). A
    generator that cannot place the chains' modes in a round's few GAN steps predicts far
    below the chains it distils: the figures behind the default.

``mc-dropout``
    The MC-Dropout learner at Gal, Islam & Ghahramani (2017)'s protocol beside SGLD, each
    with BALD and with random acquisition (seed 0, rounds 0-5): a short check that the
    reference learner learns and that its BALD ranks, not the 50-round result.

``continuation``
    How SGLD's chains should carry on from round to round, on the random-acquisition curve
    (seed 0, rounds 0-10, so no acquisition score is involved): the protocol's warm start
    (150 steps a round from the last round's chains) against a fresh start every round (620
    steps), and warm starts under a tighter prior and under pSGLD. ``benchmarks/al_fit.py``
    fits the same label counts once from a fresh start; a warm chain that ends below that
    has been held back by where the earlier, smaller labelled sets left it.

``prior``
    SGLD's warm-started chains under tighter priors over the whole protocol (seed 0, 50
    rounds), with BALD and with random acquisition: does the prior that stops the chains
    drifting at small data also leave BALD something to rank?

``learners``
    The three learners over the whole protocol at its settings (seed 0, 50 rounds), with
    BALD and with random acquisition (recorded first for online APD and MC-Dropout only: the
    ``prior`` probe's SGLD at N(0, 0.3^2) is the same run of the third learner).

``scoring``
    What BALD ranks with, over the first rounds where it trails random (seeds 0 and 1, rounds
    0-10, BALD): the protocol's K = 20 networks against 80 (of the 96 samples a round
    retains), and a pool subset of 500 candidates against Gal et al.'s 2,000.

``batch``
    How BALD picks its 10 from the 2,000 scored candidates, over the first rounds (seeds
    0-2, rounds 0-10, SGLD): the protocol's top 10 against power acquisition (10 drawn
    without replacement in proportion to the score, Kirsch et al. 2023), random beside them.
    Top-k spends a round's labels on one cluster of near-duplicates when the scores of a
    small-data posterior single out one confusion.

``batchbald``
    BALD and entropy scoring the round's 10 as a batch, greedily on their joint mutual
    information and joint entropy (BatchBALD, Kirsch et al. 2019; ``BatchRule.JOINT``),
    against the protocol's top 10 of the per-image scores, random beside them (seeds 0-2,
    rounds 0-10, SGLD): is what holds BALD at or below random at 120 labels the batch?

``power-exponent``
    Power acquisition with a colder draw, probability ~ BALD ** beta for beta 2 and 4, over
    the whole protocol (seeds 0-2, 50 rounds, SGLD, BALD; run with ``--test 10000`` to set
    it beside the report's curves): beta 1 spreads the early batches (the ``batch`` probe)
    but drifts towards random late, where a larger beta still concentrates on the few high
    scores.

``apd-rank``
    Why online APD's BALD trails SGLD's in the first rounds (seeds 0-2, rounds 0-10, BALD,
    SGLD beside it): the protocol's generator spans 20 directions of the round's 40 warm-up
    samples; with 39 it spans all they hold, so its networks keep the within-chain spread
    that BALD's disagreement term measures.

``apd-networks``
    Online APD scoring and predicting with K = 100 networks drawn from its generator (what
    a generator affords; MC-Dropout scores with 100 passes) against the protocol's 20, over
    the whole protocol (seeds 0-2, 50 rounds, BALD), SGLD beside them: online APD's BALD
    trails SGLD's by 0.5-2 points from 220 labels on where its random curve does not.

``--seeds`` runs a probe's variants on other seeds (written to
``al_probe-PROBE-seedsS.{json,md}``).

Writes ``benchmarks/results/al_probe-PROBE.{json,md}``.

    python benchmarks/al_probe.py PROBE [--arch lenet5] [--rounds R] [--test 2000]
        [--test-every E] [--workers 2] [--seeds S ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch

from apd.networks import MNIST_INPUT_SHAPE, get_spec
from training import sgld
from training.evaluation.acquisition import Acquisition, BatchRule
from training.evaluation.active_learning import ActiveLearningSettings, Learner, run_active_learning
from training.mnist import load_mnist
from training.revision import code_revision

RESULTS: Final = Path(__file__).resolve().parents[1] / "benchmarks" / "results"

Variants = list[tuple[str, ActiveLearningSettings]]


def moment_init(base: ActiveLearningSettings) -> Variants:
    s = replace(base, seeds=(0,), acquisitions=(Acquisition.BALD,))
    return [
        (f"the protocol (APD: Gaussian start, {s.moment_init_steps} steps)", s),
        ("APD: random start", replace(s, learners=(Learner.APD,), moment_init_steps=0)),
    ]


def mc_dropout(base: ActiveLearningSettings) -> Variants:
    s = replace(
        base,
        seeds=(0,),
        learners=(Learner.DROPOUT, Learner.SGLD),
        acquisitions=(Acquisition.BALD, Acquisition.RANDOM),
    )
    return [("MC-Dropout and SGLD, BALD and random", s)]


def continuation(base: ActiveLearningSettings) -> Variants:
    s = replace(base, seeds=(0,), learners=(Learner.SGLD,), acquisitions=(Acquisition.RANDOM,))
    rms = sgld.Preconditioner.RMSPROP
    return [
        ("warm start (the protocol)", s),
        ("fresh start every round", replace(s, warm_start=False)),
        ("warm start, prior std 0.3", replace(s, prior_std=0.3)),
        ("warm start, pSGLD step 1e-3", replace(s, preconditioner=rms, sgld_lr=1e-3)),
    ]


def prior(base: ActiveLearningSettings) -> Variants:
    s = replace(
        base,
        seeds=(0,),
        learners=(Learner.SGLD,),
        acquisitions=(Acquisition.BALD, Acquisition.RANDOM),
    )
    return [(f"prior std {std}", replace(s, prior_std=std)) for std in (0.3, 0.15)]


def learners(base: ActiveLearningSettings) -> Variants:
    s = replace(
        base,
        seeds=(0,),
        acquisitions=(Acquisition.BALD, Acquisition.RANDOM),
    )
    return [("the protocol", s)]


def scoring(base: ActiveLearningSettings) -> Variants:
    s = replace(base, seeds=(0, 1), learners=(Learner.SGLD,), acquisitions=(Acquisition.BALD,))
    return [
        ("K = 20, 2,000 candidates (the protocol)", s),
        ("K = 80", replace(s, num_samples=80)),
        ("500 candidates", replace(s, candidates=500)),
    ]


def batch(base: ActiveLearningSettings) -> Variants:
    s = replace(base, seeds=(0, 1, 2), learners=(Learner.SGLD,))
    return [
        (
            "top-10 (the protocol), BALD and random",
            replace(s, acquisitions=(Acquisition.BALD, Acquisition.RANDOM)),
        ),
        (
            "power: 10 drawn in proportion to the score",
            replace(s, acquisitions=(Acquisition.BALD,), batch_rule=BatchRule.POWER),
        ),
    ]


def batchbald(base: ActiveLearningSettings) -> Variants:
    s = replace(base, seeds=(0, 1, 2), learners=(Learner.SGLD,))
    return [
        ("top-10 (the protocol), BALD, entropy and random", s),
        (
            "joint: BatchBALD and greedy joint entropy",
            replace(
                s,
                acquisitions=(Acquisition.BALD, Acquisition.ENTROPY),
                batch_rule=BatchRule.JOINT,
            ),
        ),
    ]


def power_exponent(base: ActiveLearningSettings) -> Variants:
    s = replace(
        base,
        seeds=(0, 1, 2),
        learners=(Learner.SGLD,),
        acquisitions=(Acquisition.BALD,),
        batch_rule=BatchRule.POWER,
    )
    return [(f"power, exponent {b:g}", replace(s, power_exponent=b)) for b in (2.0, 4.0)]


def apd_rank(base: ActiveLearningSettings) -> Variants:
    s = replace(base, seeds=(0, 1, 2), acquisitions=(Acquisition.BALD,))
    apd = replace(s, learners=(Learner.APD,))
    return [
        (
            f"the protocol (APD rank {s.apd_rank}), SGLD beside it",
            replace(s, learners=(Learner.SGLD, Learner.APD)),
        ),
        (f"APD rank {s.warmup_samples - 1}", replace(apd, apd_rank=s.warmup_samples - 1)),
    ]


def apd_networks(base: ActiveLearningSettings) -> Variants:
    s = replace(base, seeds=(0, 1, 2), acquisitions=(Acquisition.BALD,))
    return [
        (
            f"the protocol (K = {s.apd_networks}), SGLD beside it",
            replace(s, learners=(Learner.SGLD, Learner.APD)),
        ),
        ("APD K = 100", replace(s, learners=(Learner.APD,), apd_networks=100)),
    ]


PROBES: Final[dict[str, tuple[Callable[[ActiveLearningSettings], Variants], int, int]]] = {
    # name: (variants, default rounds, default test_every)
    "moment-init": (moment_init, 6, 1),
    "mc-dropout": (mc_dropout, 5, 1),
    "continuation": (continuation, 10, 5),
    "prior": (prior, 50, 10),
    "learners": (learners, 50, 10),
    "scoring": (scoring, 10, 5),
    "batch": (batch, 10, 5),
    "batchbald": (batchbald, 10, 5),
    "power-exponent": (power_exponent, 50, 10),
    "apd-rank": (apd_rank, 10, 5),
    "apd-networks": (apd_networks, 50, 10),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("probe", choices=sorted(PROBES))
    ap.add_argument("--arch", default="lenet5")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default: the probe's)")
    ap.add_argument("--test", type=int, default=2000, help="random test images scored")
    ap.add_argument("--test-every", type=int, default=None, help="default: the probe's")
    ap.add_argument("--workers", type=int, default=2, help="processes of one thread each")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the probe's")
    args = ap.parse_args()
    make, rounds, test_every = PROBES[args.probe]
    rounds = rounds if args.rounds is None else args.rounds
    test_every = test_every if args.test_every is None else args.test_every
    if rounds < 1 or args.test <= 0 or test_every < 1 or args.workers < 1:
        ap.error("--rounds, --test, --test-every and --workers must be positive")
    torch.set_num_threads(1)  # the serial path's one process (workers run one thread each)
    load_start = round(os.getloadavg()[0], 2)
    revision = code_revision()  # the code that runs, whatever is committed meanwhile
    spec = get_spec(args.arch)
    data = load_mnist()
    base = replace(
        ActiveLearningSettings(), rounds=rounds, test_every=test_every, test_size=args.test
    )
    variants: list[dict[str, Any]] = []
    for name, probe_settings in make(base):
        settings = (
            probe_settings
            if args.seeds is None
            else replace(probe_settings, seeds=tuple(args.seeds))
        )
        print(f"{args.probe}: {name}", flush=True)
        result = run_active_learning(
            spec,
            np.asarray(data.train_x),
            np.asarray(data.train_y),
            np.asarray(data.test_x),
            np.asarray(data.test_y),
            settings,
            workers=args.workers,
            image_shape=MNIST_INPUT_SHAPE,
        )
        variants.append(
            {
                "name": name,
                "settings": settings.to_dict(),
                "seconds": result["seconds"],
                "curve_seconds": {
                    f"{c['learner']}/{c['acquisition']}/seed {c['seed']}": c["seconds"]
                    for c in result["curves"]
                },
                "curves": result["summary"],
            }
        )
    record = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "benchmarks/al_probe.py", *sys.argv[1:]]),
        "code_revision": revision,
        "load_average_1min": {"start": load_start, "end": round(os.getloadavg()[0], 2)},
        "arch": args.arch,
        "probe": args.probe,
        "test_images": args.test,
        "variants": variants,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.seeds is None else "-seeds" + "-".join(map(str, args.seeds))
    out = RESULTS / f"al_probe-{args.probe}{suffix}"
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(record, args.workers))
    print(markdown(record, args.workers))


def markdown(r: dict[str, Any], workers: int) -> str:
    rows = [(v["name"], c) for v in r["variants"] for c in v["curves"]]
    labels = rows[0][1]["labels"]
    seeds = max(c["seeds"] for _, c in rows)
    return "\n".join(
        [
            f"# Active-learning probe: {r['probe']} ({r['arch']})",
            "",
            f"Recorded {r['created_at']} by `{r['command']}`, code {r['code_revision'][:12]}; "
            f"{workers} process(es) of one thread, 1-minute load average "
            f"{r['load_average_1min']['start']} -> {r['load_average_1min']['end']} (2 cores).",
            "",
            f"Test accuracy on {r['test_images']:,} random MNIST test images, mean over "
            f"{seeds} seed(s) with the min-max beside it when there are several "
            "(training/evaluation/active_learning.py for the protocol; "
            "benchmarks/al_probe.py for the variants).",
            "",
            "| variant | learner | acquisition | "
            + " | ".join(f"{n} labels" for n in labels)
            + " |",
            "|---|---|---|" + "---|" * len(labels),
            *(
                f"| {name} | {c['learner']} | {c['acquisition']} | "
                + " | ".join(
                    f"{100 * m:.1f} %"
                    + (f" ({100 * lo:.1f}-{100 * hi:.1f})" if c["seeds"] > 1 else "")
                    for m, lo, hi in zip(c["mean"], c["min"], c["max"], strict=True)
                )
                + " |"
                for name, c in rows
            ),
            "",
            "Wall time: "
            + ", ".join(f"{v['name']} {v['seconds'] / 60:.1f} min" for v in r["variants"])
            + ".",
            "",
        ]
    )


if __name__ == "__main__":
    main()
