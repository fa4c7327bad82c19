"""Where forming the first layers beats the factored first layer, measured in one process.

For the shipped fcNN1 (r = 46) and a random fcNN2-shaped checkpoint, at N = 1, 16, 64 inputs
and K = 2 .. 200 networks, times :meth:`apd.factored.AffinePosterior.summarize`'s two
first-layer paths (forced) on the same codes and inputs, taking turns, and records which is
faster against the path :meth:`AffinePosterior.plan` picks from multiply-add counts.

    python benchmarks/factored_crossover.py [--threads 2] [--repeats 15]

Writes ``benchmarks/results/factored_crossover.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    if args.threads < 1 or args.repeats < 1:
        p.error("--threads and --repeats must be positive")
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))

    import numpy as np

    from apd.checkpoint import load_checkpoint
    from apd.factored import AffinePosterior, FirstLayer, ForwardPlan
    from apd.uncertainty import PredictiveAccumulator
    from tests.service_support import make_checkpoint

    fcnn2 = make_checkpoint(
        Path(tempfile.mkdtemp()) / "fcnn2.safetensors",
        sizes=(784, 400, 400, 10),
        arch="fcnn2",
        noise_dim=32,
        hidden=(85, 85, 100, 100, 100),
        rank=46,
    )
    checkpoints = {
        "fcnn1": ROOT / "models" / "mnist-fcnn1" / "model.safetensors",
        "fcnn2": fcnn2,
    }
    rows: list[dict[str, Any]] = []
    chunk_of: dict[tuple[int, int], int] = {}
    rng = np.random.default_rng(0)
    for name, path in checkpoints.items():
        ckpt = load_checkpoint(path)
        posterior = AffinePosterior(ckpt.spec, *ckpt.affine)
        for n in (1, 16, 64):
            x = rng.random((n, ckpt.spec.input_dim), dtype=np.float32)
            for k in (2, 5, 10, 20, 30, 50, 100, 200):
                codes = ckpt.codes(rng.standard_normal((k, ckpt.noise_dim), dtype=np.float32))
                tails = posterior.tails(codes)
                chunk_of[(k, n)] = posterior.plan(k, n).chunk

                def run(
                    path: FirstLayer,
                    post: AffinePosterior = posterior,
                    c: Any = codes,
                    t: Any = tails,
                    xx: Any = x,
                ) -> None:
                    k_, n_ = len(c), len(xx)
                    plan = ForwardPlan(path, chunk_of[(k_, n_)], k_, n_)
                    u = post.project(xx) if path is FirstLayer.FACTORED else None
                    acc = PredictiveAccumulator()
                    for s in range(0, k_, plan.chunk):
                        rows_ = slice(s, s + plan.chunk)
                        acc.add(
                            post.member_probs(c[rows_], xx, plan, u, t[rows_]).transpose(0, 2, 1)
                        )
                    acc.summary()

                times: dict[str, list[float]] = {p.value: [] for p in FirstLayer}
                for path in FirstLayer:
                    run(path)
                for _ in range(args.repeats):
                    for path in FirstLayer:
                        t0 = time.perf_counter()
                        run(path)
                        times[path.value].append(time.perf_counter() - t0)
                med = {p: float(np.median(t)) * 1e3 for p, t in times.items()}
                faster = min(med, key=med.__getitem__)
                rows.append(
                    {
                        "arch": name,
                        "inputs": n,
                        "networks": k,
                        "factored_ms": round(med["factored"], 3),
                        "materialised_ms": round(med["materialised"], 3),
                        "faster": faster,
                        "planned": posterior.plan(k, n).first_layer.value,
                    }
                )
                print(rows[-1], flush=True)
    revision = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    record = {
        "command": " ".join(["python", *sys.argv]),
        "revision": revision,
        "threads": args.threads,
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "rows": rows,
    }
    agree = sum(r["faster"] == r["planned"] for r in rows)
    lines = [
        "# Factored against materialised first layer",
        "",
        f"`{record['command']}` at revision {revision}, {args.threads} BLAS threads, load "
        f"average after the run {record['load_average']}. Median of {args.repeats}, taking "
        "turns; tails given (as the pool keeps them), so only the first layer differs.",
        "",
        "| arch | N | K | factored ms | materialised ms | faster | planned |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- |",
        *[
            f"| {r['arch']} | {r['inputs']} | {r['networks']} | {r['factored_ms']} | "
            f"{r['materialised_ms']} | {r['faster']} | {r['planned']} |"
            for r in rows
        ],
        "",
        f"The plan (multiply-add counts) picked the faster path in {agree} of {len(rows)} cases.",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "factored_crossover.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "factored_crossover.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
