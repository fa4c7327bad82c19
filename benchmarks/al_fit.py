"""What holds a learner back at small data: one fit on a fixed labelled set, per setting.

Active learning's accuracy at N labels is bounded by what the learner makes of N labels. This
study takes the labelled sets the random-acquisition curve would hold (2 random digits per
class, then random training digits up to N), fits each variant once from a fresh start, and
records the posterior predictive's test accuracy and NLL, the mean mutual information on the
test images (BALD's score: something to rank), and the fit's wall time on one thread (what a
round of the protocol would pay). Variants are the protocol's settings
before this study (:class:`training.evaluation.active_learning.ActiveLearningSettings` with a
prior N(0, 1) and MC-Dropout on Gal et al.'s CNN in minibatches of 128: ``PROTOCOL`` below)
with a few changed.

Writes ``benchmarks/results/al_fit.{json,md}`` after every fit: a run that stops loses
nothing, and a later run keeps the rows whose variant's settings are unchanged and fits only
the rest (``--fresh`` refits everything).

    python benchmarks/al_fit.py [--labels 120 520] [--seeds 0 1] [--test 2000] [--workers 2]
        [--variants NAME ...] [--fresh]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shlex
import sys
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch

from apd.networks import MNIST_INPUT_SHAPE, get_spec
from apd.uncertainty import ScoreName
from training import metrics, sgld
from training.evaluation.acquisition import Acquisition
from training.evaluation.active_learning import (
    ActiveLearningSettings,
    Learner,
    dropout_spec,
    fit_dropout,
    fit_online_apd,
    fit_sgld,
    initial_labels,
    shaping,
)
from training.evaluation.methods import MemberNetworks
from training.evaluation.report.sections import GAL_CNN
from training.mnist import load_mnist
from training.revision import code_revision

RESULTS: Final = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
# The study's base: the protocol as it stood when the study began (prior N(0, 1), MC-Dropout on
# Gal et al.'s CNN with their minibatches of 128), so that every variant keeps its meaning.
PROTOCOL: Final = replace(
    ActiveLearningSettings(),
    prior_std=1.0,
    dropout_arch=GAL_CNN,
    dropout_rates=(0.25, 0.5),
    dropout_batch_size=128,
)
RMSPROP: Final = sgld.Preconditioner.RMSPROP


@dataclass(frozen=True)
class Variant:
    name: str
    learner: Learner
    arch: str
    settings: ActiveLearningSettings


def _v(name: str, arch: str = "lenet5", learner: Learner = Learner.SGLD, **kw: Any) -> Variant:
    return Variant(name, learner, arch, replace(PROTOCOL, learners=(learner,), **kw))


# MC-Dropout on LeNet-5: dropout before each of its three dense layers.
LENET5_DROPOUT: Final[dict[str, Any]] = {
    "learner": Learner.DROPOUT,
    "dropout_arch": "lenet5",
    "dropout_rates": (0.25, 0.5, 0.5),
}

# Settings that shape the active-learning loop, not one fit: not part of a variant's identity.
LOOP_ONLY: Final = ("seeds", "learners", "acquisitions")


VARIANTS: Final = {
    v.name: v
    for v in (
        _v("sgld"),  # the protocol's first round: 620 steps of 4 chains, step 0.05, T 0.1
        _v("sgld-2000", first_burn_in=1880),
        _v("sgld-T0.03", temperature=0.03),
        _v("sgld-prior0.3", prior_std=0.3),
        _v("sgld-prior0.1", prior_std=0.1),
        _v("sgld-T1-prior0.1", temperature=1.0, prior_std=0.1),
        _v("sgld-T1-prior0.05", temperature=1.0, prior_std=0.05),
        _v("sgld-lr0.2", sgld_lr=0.2),
        _v("psgld-1e-3", preconditioner=RMSPROP, sgld_lr=1e-3),
        _v("psgld-3e-4", preconditioner=RMSPROP, sgld_lr=3e-4),
        _v("psgld-1e-3-2000", preconditioner=RMSPROP, sgld_lr=1e-3, first_burn_in=1880),
        _v("sgld-galcnn", arch=GAL_CNN),
        _v("dropout-galcnn", learner=Learner.DROPOUT),
        _v("dropout-lenet5", **LENET5_DROPOUT),
        _v("dropout-lenet5-batch32", **LENET5_DROPOUT, dropout_batch_size=32),
        _v(
            "dropout-lenet5-batch32-200epochs",
            **LENET5_DROPOUT,
            dropout_batch_size=32,
            dropout_epochs=200,
        ),
        # online APD at the protocol's prior, its generator's moment-matched start fitted
        # for 300 or 1,000 steps (compare its MI with sgld-prior0.3's chains)
        _v("apd-moment300", learner=Learner.APD, prior_std=0.3, moment_init_steps=300),
        _v("apd-moment1000", learner=Learner.APD, prior_std=0.3, moment_init_steps=1000),
    )
}


def fit_one(
    v: Variant,
    n: int,
    seed: int,
    pool_x: np.ndarray,
    pool_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
) -> dict[str, Any]:
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    first = initial_labels(pool_y, PROTOCOL.initial_per_class, rng)
    rest = rng.choice(np.setdiff1d(np.arange(len(pool_y)), first), n - len(first), replace=False)
    labelled = np.sort(np.concatenate([first, rest]))
    x, y = np.ascontiguousarray(pool_x[labelled]), np.asarray(pool_y[labelled], np.int64)
    s = v.settings
    spec = get_spec(v.arch)
    t0 = time.perf_counter()
    if v.learner is Learner.DROPOUT:
        dspec = dropout_spec(spec, s, MNIST_INPUT_SHAPE)
        members = MemberNetworks(
            dspec, fit_dropout(dspec, x, y, s, seed), s.dropout_rates, s.dropout_passes
        )
    elif v.learner is Learner.APD:
        # model selection on unlabelled pool images, as a round of the protocol does
        unlabelled = np.setdiff1d(np.arange(len(pool_y)), labelled)
        sel = rng.choice(unlabelled, size=s.selection_inputs, replace=False)
        theta, _ = fit_online_apd(spec, x, y, s, seed, np.ascontiguousarray(pool_x[sel]))
        members = MemberNetworks(spec, theta)
    else:
        theta, _ = fit_sgld(spec, x, y, s, seed)
        members = MemberNetworks(spec, theta)
    fit_s = time.perf_counter() - t0
    summary = members.summary(test_x, seed=seed)
    probs = summary.probabilities
    return {
        "variant": v.name,
        "labels": n,
        "seed": seed,
        "accuracy": metrics.accuracy(probs, test_y),
        "nll": metrics.negative_log_likelihood(probs, test_y),
        "mutual_information": float(summary.score(ScoreName.MUTUAL_INFORMATION).mean()),
        "fit_seconds": round(fit_s, 1),
    }


_DATA: dict[str, Any] = {}


def _init(data: tuple[np.ndarray, ...]) -> None:
    torch.set_num_threads(1)
    _DATA["data"] = data


def _job(job: tuple[str, int, int]) -> dict[str, Any]:
    name, n, seed = job
    return fit_one(VARIANTS[name], n, seed, *_DATA["data"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", type=int, nargs="+", default=[120, 520])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--test", type=int, default=2000, help="random test images scored")
    ap.add_argument("--workers", type=int, default=2, help="processes of one thread each")
    ap.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--out", default="al_fit", help="results file stem")
    ap.add_argument("--fresh", action="store_true", help="refit rows already recorded")
    args = ap.parse_args()
    if min(args.labels) < 20 or args.test <= 0 or args.workers < 1:
        ap.error("--labels must be >= 20, --test and --workers positive")
    load_start = round(os.getloadavg()[0], 2)
    revision = code_revision()
    out = RESULTS / args.out
    described = {name: describe(v) for name, v in VARIANTS.items()}
    rows = [] if args.fresh else kept_rows(out.with_suffix(".json"), described, args.test)
    mnist = load_mnist()
    test = np.sort(np.random.default_rng(10_000).choice(len(mnist.test_y), args.test, False))
    data = (
        np.asarray(mnist.train_x),
        np.asarray(mnist.train_y, np.int64),
        np.ascontiguousarray(np.asarray(mnist.test_x)[test]),
        np.asarray(mnist.test_y, np.int64)[test],
    )
    done = {(r["variant"], r["labels"], r["seed"]) for r in rows}
    jobs = [
        (v, n, s)
        for v in args.variants
        for n in args.labels
        for s in args.seeds
        if (v, n, s) not in done
    ]
    print(f"{len(done)} fits recorded, {len(jobs)} to run", flush=True)
    command = shlex.join(["python", "benchmarks/al_fit.py", *sys.argv[1:]])
    RESULTS.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(args.workers, _init, (data,)) as pool:
        for row in pool.imap_unordered(_job, jobs):
            row.update(
                code_revision=revision,
                command=command,
                load_average_1min={"start": load_start, "end": round(os.getloadavg()[0], 2)},
                workers=args.workers,
                recorded_at=datetime.now(UTC).isoformat(timespec="seconds"),
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
            write(out, rows, described, args.test)
    if not jobs:
        write(out, rows, described, args.test)
    print(out.with_suffix(".md").read_text())


def describe(v: Variant) -> dict[str, Any]:
    return _identity(
        {"learner": v.learner.value, "arch": v.arch, "settings": dict(v.settings.to_dict())}
    )


def _identity(described: dict[str, Any]) -> dict[str, Any]:
    """What shapes a variant's fit: its learner's settings, not the loop's nor the other
    learners' (a setting added later for another learner keeps the rows recorded before)."""
    fit = shaping(described["settings"], Learner(described["learner"]), Acquisition.RANDOM)
    settings = {k: v for k, v in fit.items() if k not in LOOP_ONLY}
    return {**described, "settings": json.loads(json.dumps(settings))}


def kept_rows(
    path: Path, described: dict[str, dict[str, Any]], test_images: int
) -> list[dict[str, Any]]:
    """The rows of an earlier run whose variant still has the same settings (and the same
    number of test images)."""
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    if old.get("test_images") != test_images:
        return []
    return [
        r
        for r in old["rows"]
        if r["variant"] in old["variants"]
        and _identity(old["variants"][r["variant"]]) == described.get(r["variant"])
    ]


def write(
    out: Path, rows: list[dict[str, Any]], described: dict[str, dict[str, Any]], test: int
) -> None:
    names = list(described)
    rows.sort(key=lambda r: (names.index(r["variant"]), r["labels"], r["seed"]))
    record = {
        "test_images": test,
        "variants": {n: described[n] for n in names if any(r["variant"] == n for r in rows)},
        "rows": rows,
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(record))


def markdown(r: dict[str, Any]) -> str:
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in r["rows"]:
        groups.setdefault((row["variant"], row["labels"]), []).append(row)

    def cell(rows: list[dict[str, Any]], key: str, pct: bool = False, fmt: str = ".3f") -> str:
        vals = np.array([row[key] for row in rows]) * (100 if pct else 1)
        m = f"{vals.mean():{fmt}}"
        return m + (f" ({vals.min():{fmt}}-{vals.max():{fmt}})" if len(vals) > 1 else "")

    runs = sorted(
        {(row["command"], row["code_revision"][:12], row["workers"]) for row in r["rows"]}
    )
    loads = [row["load_average_1min"][k] for row in r["rows"] for k in ("start", "end")]
    lines = [
        "# What a learner makes of N labels (one fit per labelled set)",
        "",
        "Recorded by "
        + "; ".join(f"`{c}` at code {rev} ({w} process(es) of one thread)" for c, rev, w in runs)
        + f"; 1-minute load average {min(loads)}-{max(loads)} (2 cores); last fit "
        + max(row["recorded_at"] for row in r["rows"])
        + ".",
        "",
        "Labelled sets as the random-acquisition curve holds them (2 random digits per class, "
        "the rest random training digits), one per seed; a fresh fit on each; "
        f"{r['test_images']:,} random MNIST test images. Mean over seeds, min-max beside it. "
        "MI: mean mutual information on the test images (nats). Settings: the protocol's "
        "as they stood before this study (prior N(0, 1); MC-Dropout on Gal et al.'s CNN, "
        "minibatches of 128) with the changes the variant names; `benchmarks/al_fit.py` "
        "lists them.",
        "",
        "| variant | arch | labels | accuracy % | NLL | MI | fit s |",
        "|---|---|---|---|---|---|---|",
    ]
    for (name, n), rows in groups.items():
        v = r["variants"][name]
        arch = v["settings"]["dropout_arch"] if v["learner"] == "dropout" else v["arch"]
        lines.append(
            f"| {name} | {arch} | {n} | "
            f"{cell(rows, 'accuracy', True, '.1f')} | {cell(rows, 'nll')} | "
            f"{cell(rows, 'mutual_information')} | {cell(rows, 'fit_seconds', fmt='.0f')} |"
        )
    return "\n".join([*lines, ""])


if __name__ == "__main__":
    main()
