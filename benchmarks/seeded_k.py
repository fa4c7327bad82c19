"""Is a seeded request as flat in K as a pool request? ``POST /predict`` at K = 10 and 1000.

On the shipped model (``models/mnist-fcnn1/model.safetensors``), one ``apd serve`` worker,
warm: p50 latency of ``POST /predict`` with K = 10 and K = 1000, at batch 1 and batch 64 (real
MNIST test digits), seeded (the same seed every time, so its networks are cached after the
first call) and unseeded (the shared pool). The eight variants are timed round-robin in
blocks in one process (:func:`servebench.interleaved`), so they share the machine's load. The
figures are the ratios K 1000 / K 10 of each; issue #23's targets for seeded requests:
<= 2 at batch 1 and <= 3 at batch 64 (it measured 3.2 and 3.4, against 1.1 and 2.0 for pool
requests). Writes ``benchmarks/results/seeded_k.{md,json}``.

    python benchmarks/seeded_k.py [--requests 40] [--seed 7]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

ROOT: Final = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from servebench import (  # noqa: E402
    RESULTS,
    SHIPPED,
    header,
    header_lines,
    interleaved,
    mnist_test_digits,
    uptime,
)

KS: Final = (10, 1000)
BATCHES: Final = (1, 64)
TARGETS: Final = {1: 2.0, 64: 3.0}  # seeded K 1000 / K 10, by batch (issue #23)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=40, help="timed calls per variant")
    p.add_argument("--seed", type=int, default=7, help="the seed every seeded request sends")
    p.add_argument("--checkpoint", type=Path, default=SHIPPED)
    p.add_argument("--threads", type=int, default=1, help="the server's --num-threads")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.requests < 4:
        p.error("--requests must be at least 4 (one per block)")
    return args


def variant(batch: int, k: int, seeded: bool) -> str:
    return f"batch{batch}_K{k}_{'seeded' if seeded else 'pool'}"


def measure(base_url: str, args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    x, _ = mnist_test_digits()
    calls: dict[str, Callable[[], object]] = {}
    headers = {"content-type": "application/json"}
    client = httpx.Client(base_url=base_url, timeout=120)

    def poster(body: bytes) -> Callable[[], None]:
        def post() -> None:
            r = client.post("/predict", content=body, headers=headers)
            if r.status_code != 200:
                raise SystemExit(f"POST /predict -> {r.status_code}: {r.text[:300]}")

        return post

    for batch in BATCHES:
        inputs = np.round(x[:batch], 6).tolist()
        for k in KS:
            for seeded in (True, False):
                payload: dict[str, Any] = {"inputs": inputs, "num_samples": k}
                if seeded:
                    payload["seed"] = args.seed
                calls[variant(batch, k, seeded)] = poster(json.dumps(payload).encode())
    with client:
        times = interleaved(calls, args.requests)
    p50 = {name: float(np.median(t)) for name, t in times.items()}
    ratios: dict[str, dict[str, float]] = {}
    for batch in BATCHES:
        ratios[f"batch{batch}"] = {
            mode: round(
                p50[variant(batch, KS[-1], mode == "seeded")]
                / p50[variant(batch, KS[0], mode == "seeded")],
                2,
            )
            for mode in ("seeded", "pool")
        }
    return {
        "p50_ms": {name: round(v * 1e3, 3) for name, v in p50.items()},
        "p90_ms": {name: round(float(np.percentile(t, 90)) * 1e3, 3) for name, t in times.items()},
        "calls_per_variant": {name: len(t) for name, t in times.items()},
        "K1000_over_K10": ratios,
        "meets_target": {f"batch{b}": ratios[f"batch{b}"]["seeded"] <= TARGETS[b] for b in BATCHES},
    }


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    from tests.harness import apd_serve

    record = header(argv)
    record |= {
        "checkpoint": str(args.checkpoint.resolve().relative_to(ROOT))
        if args.checkpoint.resolve().is_relative_to(ROOT)
        else str(args.checkpoint),
        "seed": args.seed,
        "server_args": ["--workers", "1", "--num-threads", str(args.threads)],
        "targets_seeded_K1000_over_K10": {f"batch{b}": t for b, t in TARGETS.items()},
    }
    with apd_serve(
        args.checkpoint, args=[*record["server_args"], "--log-level", "warning"], timeout=120
    ) as srv:
        record |= measure(srv.base_url, args)
    record["uptime_after"] = uptime()
    return record


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Seeded and pool requests as K grows",
        "",
        *header_lines(r),
        f"Checkpoint `{r['checkpoint']}`; `apd serve {' '.join(r['server_args'])}`; MNIST test",
        f"digits; seeded requests all send seed {r['seed']} (warm: cached after the first call).",
        "The variants are timed round-robin in blocks in one process; "
        f"{min(r['calls_per_variant'].values())} calls each.",
        "",
        "| batch | K | seeded p50 ms | pool p50 ms |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for b in BATCHES:
        for k in KS:
            s, p = r["p50_ms"][variant(b, k, True)], r["p50_ms"][variant(b, k, False)]
            lines.append(f"| {b} | {k} | {s} | {p} |")
    lines += [
        "",
        "| batch | seeded K1000/K10 | target | met | pool K1000/K10 |",
        "| ---: | ---: | ---: | --- | ---: |",
    ]
    for b in BATCHES:
        ratio = r["K1000_over_K10"][f"batch{b}"]
        met = "yes" if r["meets_target"][f"batch{b}"] else "**no**"
        lines.append(f"| {b} | {ratio['seeded']} | <= {TARGETS[b]} | {met} | {ratio['pool']} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    args = parse_args(argv[1:])
    record = run(args, argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "seeded_k.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "seeded_k.md").write_text(markdown(record) + "\n")
    print(markdown(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
