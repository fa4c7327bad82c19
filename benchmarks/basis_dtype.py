"""How the checkpoint stores its basis: float16 at rank 46 against int8 at ranks 46 and 92.

Distils one SGLD run (``--run``) with ``apd distill`` three times, the default design
otherwise unchanged: ``--basis-dtype float16 --rank 46`` (the default), ``--basis-dtype int8
--rank 46`` (half the bytes) and ``--basis-dtype int8 --rank 92`` (twice the directions in
about the bytes of the default). For each it records the checkpoint's size and the
distiller's own validation record (``<name>.fidelity.json``): the kept step's KL to the
teacher, accuracy and mutual-information ratio, and the last step's KL. Two distillations run
at a time, each single-threaded (the distiller's default). Writes
``benchmarks/results/basis_dtype.{json,md}``; the anomaly rows of these checkpoints are
``benchmarks/scale5_noise.py``'s to measure.

    python benchmarks/basis_dtype.py [--run runs/sgld-fcnn1]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from training.cli import main as apd_main
from training.revision import code_revision
from training.run_layout import is_finished

ROOT: Final = Path(__file__).resolve().parents[1]
RESULTS: Final = ROOT / "benchmarks" / "results"
VARIANTS: Final = (("float16", 46), ("int8", 46), ("int8", 92))


def distil(run: Path, out_dir: Path, dtype: str, rank: int) -> dict[str, Any]:
    """One ``apd distill`` of ``run``; its size, wall time and validation record."""
    out = out_dir / f"basis-{dtype}-r{rank}.safetensors"
    t0 = time.perf_counter()
    argv = ["distill", "--samples", str(run), "--out", str(out), "--no-progress"]
    code = apd_main([*argv, "--basis-dtype", dtype, "--rank", str(rank)])
    seconds = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"apd distill --basis-dtype {dtype} --rank {rank} failed (exit {code})")
    fidelity = json.loads(out.with_suffix(".fidelity.json").read_text())
    best = fidelity["best_validation"]
    return {
        "basis_dtype": dtype,
        "rank": rank,
        "checkpoint": str(out),
        "checkpoint_bytes": out.stat().st_size,
        "seconds": round(seconds, 1),
        "best_step": fidelity["best_step"],
        "val_kl": best["val_kl"],
        "val_accuracy": best["val_accuracy"],
        "val_mi_ratio": best["val_mi_ratio"],
        "last_val_kl": fidelity["history"][-1]["val_kl"],
        "explained_variance_ratio": fidelity["subspace"]["explained_variance_ratio"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "sgld-fcnn1")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "bench")
    args = ap.parse_args()
    if not is_finished(args.run):
        ap.error(f"--run {args.run}: not a finished SGLD run (no READY file)")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    load_start = round(os.getloadavg()[0], 2)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, ctx) as pool:
        futures = [pool.submit(distil, args.run, args.out_dir, d, r) for d, r in VARIANTS]
        rows = [f.result() for f in futures]
    record: dict[str, Any] = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "benchmarks/basis_dtype.py", *sys.argv[1:]]),
        "code_revision": code_revision(),
        "load_average_1min": {"start": load_start, "end": round(os.getloadavg()[0], 2)},
        "run": str(args.run),
        "rows": rows,
    }
    lines = [
        "# Checkpoint basis: float16 against int8",
        "",
        f"Recorded {record['created_at']} by `{record['command']}`, code "
        f"{record['code_revision'][:12]}; run {record['run']}. 1-minute load average "
        f"{load_start} -> {record['load_average_1min']['end']} (2 cores, two distillations "
        "at a time, one thread each). Validation figures are the distiller's own "
        "(`<checkpoint>.fidelity.json`) at the step it kept.",
        "",
        "| basis | rank | variance held | checkpoint | kept step | val KL | val KL, last step "
        "| val accuracy | MI ratio | wall time |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {r['basis_dtype']} | {r['rank']} | {100 * r['explained_variance_ratio']:.2f} % "
            f"| {r['checkpoint_bytes'] / 1e6:.2f} MB | {r['best_step']:,} | {r['val_kl']:.5f} "
            f"| {r['last_val_kl']:.5f} | {100 * r['val_accuracy']:.2f} % "
            f"| {r['val_mi_ratio']:.2f} | {r['seconds']:.0f} s |"
            for r in rows
        ),
        "",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "basis_dtype.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / "basis_dtype.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
