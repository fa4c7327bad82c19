"""What a CNN costs per image on this CPU: al-cnn (the paper's active-learning CNN) against
LeNet-5, in the same process.

Times one network's forward pass (:func:`training.torch_ops.forward_logits`) over 1,000
random 28 x 28 images, ``--repeats`` times per architecture, interleaved, and records the
median of each and their ratio: the figure behind running the CPU's CNN benchmarks on LeNet-5
(docs/evaluation.md, docs/training.md). Writes ``benchmarks/results/cnn_cost.{json,md}``.

    python benchmarks/cnn_cost.py [--threads 2] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import numpy as np
import torch

from apd.networks import get_spec
from training.baselines import init_theta
from training.revision import code_revision
from training.torch_ops import forward_logits

RESULTS: Final = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
ARCHS: Final = ("lenet5", "al-cnn")
IMAGES: Final = 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_start = round(os.getloadavg()[0], 2)
    x = torch.rand(IMAGES, 784, generator=torch.Generator().manual_seed(0))
    nets = {a: init_theta(get_spec(a), 1, torch.Generator().manual_seed(0)) for a in ARCHS}
    times: dict[str, list[float]] = {a: [] for a in ARCHS}
    with torch.no_grad():
        for a in ARCHS:  # warm-up
            forward_logits(get_spec(a), nets[a], x)
        for _ in range(args.repeats):
            for a in ARCHS:
                t0 = time.perf_counter()
                forward_logits(get_spec(a), nets[a], x)
                times[a].append(time.perf_counter() - t0)
    ms = {a: 1000 * float(np.median(t)) for a, t in times.items()}
    record = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "benchmarks/cnn_cost.py", *sys.argv[1:]]),
        "code_revision": code_revision(),
        "load_average_1min": {"start": load_start, "end": round(os.getloadavg()[0], 2)},
        "threads": args.threads,
        "images": IMAGES,
        "median_ms": ms,
        "weights": {a: get_spec(a).num_params for a in ARCHS},
        "ratio_al_cnn_to_lenet5": ms["al-cnn"] / ms["lenet5"],
    }
    lines = [
        "# CNN forward cost per image: al-cnn against LeNet-5",
        "",
        f"Recorded {record['created_at']} by `{record['command']}`, code "
        f"{record['code_revision'][:12]}; {args.threads} torch threads, 1-minute load average "
        f"{load_start} -> {record['load_average_1min']['end']} (2 cores).",
        "",
        "| arch | weights | forward of 1,000 images (median) |",
        "|---|---|---|",
        *(f"| {a} | {record['weights'][a]:,} | {ms[a]:.1f} ms |" for a in ARCHS),
        "",
        f"al-cnn / LeNet-5: **{record['ratio_al_cnn_to_lenet5']:.1f}x**",
        "",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cnn_cost.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / "cnn_cost.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
