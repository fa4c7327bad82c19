"""Which posterior temperature gives active learning a mutual information worth measuring.

For each temperature T and each labelled-set size n, fits the active-learning SGLD learner
(:func:`training.evaluation.active_learning.fit_sgld`: 4 chains from a fresh start, the
protocol's first-round burn-in, K = 20 networks) to n MNIST training digits (2 per class, the
rest drawn at random, seed 0) and records, on ``--test`` random test images, the posterior
predictive's accuracy and the mean mutual information between label and weights, the score
BALD ranks by. A posterior that predicts at chance (too hot) or whose networks agree
everywhere (too cold: mutual information near 0) gives BALD nothing to rank. The figures
behind the protocol's T = 0.1 (training/evaluation/active_learning.py).
Writes ``benchmarks/results/al_temperature.{json,md}``.

    python benchmarks/al_temperature.py [--arch lenet5] [--temperatures 1,0.1,0.01]
        [--labels 20,120,520] [--test 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from tqdm import tqdm

from apd.networks import get_spec
from apd.uncertainty import ScoreName
from training.evaluation.active_learning import ActiveLearningSettings, fit_sgld, initial_labels
from training.evaluation.methods import MemberNetworks
from training.metrics import accuracy
from training.mnist import load_mnist
from training.revision import code_revision

RESULTS: Final = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="lenet5")
    ap.add_argument("--temperatures", type=_floats, default=[1.0, 0.1, 0.01])
    ap.add_argument("--labels", type=_ints, default=[20, 120, 520])
    ap.add_argument("--test", type=int, default=2000, help="random test images scored")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if min(args.labels) < 20 or any(t <= 0 for t in args.temperatures) or args.test <= 0:
        ap.error("--labels must be >= 20 (2 per class), temperatures and --test positive")
    torch.set_num_threads(args.threads)
    load_start = round(os.getloadavg()[0], 2)
    spec = get_spec(args.arch)
    data = load_mnist()
    rng = np.random.default_rng(0)
    first = initial_labels(data.train_y, 2, rng)
    rest = rng.permutation(np.setdiff1d(np.arange(len(data.train_y)), first))
    test = np.sort(rng.choice(len(data.test_y), size=args.test, replace=False))
    tx, ty = data.test_x[test], np.asarray(data.test_y[test], np.int64)
    base = ActiveLearningSettings()
    rows: list[dict[str, Any]] = []
    jobs = [(t, n) for t in args.temperatures for n in args.labels]
    for t, n in tqdm(jobs, desc="temperature probe", unit="fit"):
        idx = np.concatenate([first, rest[: n - len(first)]])
        settings = replace(base, temperature=t)
        t0 = time.perf_counter()
        theta, _ = fit_sgld(
            spec, data.train_x[idx], np.asarray(data.train_y[idx], np.int64), settings, 0
        )
        summary = MemberNetworks(spec, theta).summary(tx)
        rows.append(
            {
                "temperature": t,
                "labels": n,
                "accuracy": accuracy(summary.probabilities, ty),
                "mutual_information": float(summary.score(ScoreName.MUTUAL_INFORMATION).mean()),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
    record = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "benchmarks/al_temperature.py", *sys.argv[1:]]),
        "code_revision": code_revision(),
        "load_average_1min": {"start": load_start, "end": round(os.getloadavg()[0], 2)},
        "arch": args.arch,
        "threads": args.threads,
        "test_images": args.test,
        "settings": {
            "chains": base.chains,
            "networks": base.num_samples,
            "sgld_lr": base.sgld_lr,
            "prior_std": base.prior_std,
            "batch_size": base.batch_size,
            "sgld_steps": base.sgld_steps(first=True),
            "burn_in": base.first_burn_in,
        },
        "rows": rows,
    }
    lines = [
        f"# Active learning's posterior temperature ({args.arch})",
        "",
        f"Recorded {record['created_at']} by `{record['command']}`, code "
        f"{record['code_revision'][:12]}; {args.threads} torch thread(s), 1-minute load "
        f"average {load_start} -> {record['load_average_1min']['end']} (2 cores).",
        "",
        f"SGLD as in an active-learning round from a fresh start ({base.chains} chains, "
        f"{base.sgld_steps(first=True)} steps, burn-in {base.first_burn_in}, step "
        f"{base.sgld_lr}, prior N(0, {base.prior_std}^2), batch {base.batch_size}), "
        f"K = {base.num_samples} networks; {args.test:,} random MNIST test images. Mutual "
        "information is the mean over those images, in nats (BALD's score).",
        "",
        "| T | labels | test accuracy | mean mutual information | fit + test |",
        "|---|---|---|---|---|",
        *(
            f"| {r['temperature']:g} | {r['labels']} | {100 * r['accuracy']:.1f} % | "
            f"{r['mutual_information']:.3f} | {r['seconds']:.0f} s |"
            for r in rows
        ),
        "",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "al_temperature.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / "al_temperature.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
