"""Gradient-free max pooling: the maximum of strided views against ``F.max_pool2d``.

CNN inference (:func:`training.torch_ops.member_probs`) pools by the elementwise maximum of
the ``s * s`` strided views of each feature map when no gradient flows
(:func:`training.torch_ops._max_pool`). This times, interleaved in one process, both on the
pooled maps of K = 20 LeNet-5 networks over 2,000 images (the active-learning candidate
pass), and the whole K = 20 member-probability pass with each pooling (the baseline by
swapping ``torch_ops._max_pool`` for ``max_pool2d`` in this process only); medians of
``--repeats`` and their ratios. Writes ``benchmarks/results/cnn_pool.{json,md}``.

    python benchmarks/cnn_pool.py [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
import torch.nn.functional as F

from apd.networks import get_spec
from training import torch_ops
from training.baselines import init_theta
from training.revision import code_revision

RESULTS: Final = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _seconds(fn: Callable[..., object], *args: object) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.threads < 1 or args.repeats < 1:
        ap.error("--threads and --repeats must be positive")
    torch.set_num_threads(args.threads)
    load_start = round(os.getloadavg()[0], 2)
    gen = torch.Generator().manual_seed(0)
    spec = get_spec("lenet5")
    theta = init_theta(spec, 20, gen)
    x = torch.rand(2000, spec.input_dim, generator=gen)
    new_pool = torch_ops._max_pool

    def old_pool(h: torch.Tensor, s: int) -> torch.Tensor:
        return F.max_pool2d(h, s)

    rows: list[dict[str, Any]] = []
    with torch.no_grad():
        for shape in ((2000, 120, 28, 28), (2000, 320, 10, 10)):
            h = torch.randn(*shape, generator=gen)
            times: dict[str, list[float]] = {"max_pool2d": [], "strided maximum": []}
            for _ in range(args.repeats):  # interleaved
                times["max_pool2d"].append(_seconds(old_pool, h, 2))
                times["strided maximum"].append(_seconds(new_pool, h, 2))
            rows.append({"what": f"pool 2x2 of {tuple(shape)}", **_medians(times)})
        times = {"max_pool2d": [], "strided maximum": []}
        for _ in range(args.repeats):
            for name, pool in (("max_pool2d", old_pool), ("strided maximum", new_pool)):
                torch_ops._max_pool = pool
                times[name].append(_seconds(torch_ops.member_probs, spec, theta, x))
        torch_ops._max_pool = new_pool
        rows.append({"what": "member_probs, K = 20 LeNet-5, 2,000 images", **_medians(times)})
    record = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "benchmarks/cnn_pool.py", *sys.argv[1:]]),
        "code_revision": code_revision(),
        "threads": args.threads,
        "repeats": args.repeats,
        "load_average_1min": {"start": load_start, "end": round(os.getloadavg()[0], 2)},
        "rows": rows,
    }
    lines = [
        "# Gradient-free max pooling on the CPU",
        "",
        f"Recorded {record['created_at']} by `{record['command']}`, code "
        f"{record['code_revision'][:12]}; {args.threads} torch thread(s), medians of "
        f"{args.repeats} interleaved repeats, 1-minute load average {load_start} -> "
        f"{record['load_average_1min']['end']} (2 cores).",
        "",
        "| what | max_pool2d | strided maximum | speed-up |",
        "|---|---|---|---|",
        *(
            f"| {r['what']} | {1000 * r['max_pool2d']:.0f} ms | "
            f"{1000 * r['strided maximum']:.0f} ms | {r['speedup']:.2f}x |"
            for r in rows
        ),
        "",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cnn_pool.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / "cnn_pool.md").write_text("\n".join(lines))
    print("\n".join(lines))


def _medians(times: dict[str, list[float]]) -> dict[str, float]:
    old, new = (float(np.median(times[k])) for k in ("max_pool2d", "strided maximum"))
    return {"max_pool2d": old, "strided maximum": new, "speedup": old / new}


if __name__ == "__main__":
    main()
