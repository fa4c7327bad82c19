"""Latency of one request over gRPC against the same request over REST, on one server.

``apd serve --grpc-port`` with the shipped checkpoint (one worker, loopback). For batch 1 and
64 at K = 100, networks from the pool (no seed), the three codecs of the same query are timed
round-robin, so that they share the machine's load: ``POST /predict`` (JSON, httpx),
``POST /v2/models/{name}/infer`` with binary tensors (``tritonclient.http``) and
``ModelInfer`` (``tritonclient.grpc``). Every figure is also a ratio to V2 REST, measured in
the same run. Before timing, the three answers to a seeded request are checked equal.

Results: ``benchmarks/results/grpc_latency.json`` and ``.md`` with the command, revision and
load. Run: ``python benchmarks/grpc_latency.py [--requests 200]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402

from tests.harness import apd_serve, free_port  # noqa: E402
from tests.service_support import random_images  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SHIPPED = ROOT / "models" / "mnist-fcnn1" / "model.safetensors"
MODEL = "mnist-fcnn1"
K = 100


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=200, help="timed rounds per batch size")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.requests < 1:
        p.error("--requests must be positive")
    return args


def revision() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip()

    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "service", "benchmarks/grpc_latency.py")
    return rev + ("+dirty" if dirty else "")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    port = free_port()
    serve_args = ["--grpc-port", str(port), "--log-level", "warning"]
    rows: list[dict[str, Any]] = []
    with apd_serve(SHIPPED, args=serve_args) as server:
        http = httpx.Client(base_url=server.base_url, timeout=60.0)
        rest = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")
        grpc = grpcclient.InferenceServerClient(url=f"127.0.0.1:{port}")

        def calls(x: Any, **params: Any) -> dict[str, Callable[[], Any]]:
            body = {"inputs": x.tolist(), "num_samples": K, **params}
            t_rest = httpclient.InferInput("input", list(x.shape), "FP32")
            t_rest.set_data_from_numpy(x, binary_data=True)
            t_grpc = grpcclient.InferInput("input", list(x.shape), "FP32")
            t_grpc.set_data_from_numpy(x)
            p = {"num_samples": K, **params}
            return {
                "predict_json": lambda: http.post("/predict", json=body).json(),
                "v2_rest_binary": lambda: rest.infer(MODEL, [t_rest], parameters=p),
                "grpc": lambda: grpc.infer(MODEL, [t_grpc], parameters=p),
            }

        for batch in (1, 64):
            x = random_images(batch, seed=batch)
            seeded = {name: call() for name, call in calls(x, seed=7).items()}
            want = np.array(
                [q["probabilities"] for q in seeded["predict_json"]["predictions"]], np.float32
            )
            for name in ("v2_rest_binary", "grpc"):
                np.testing.assert_array_equal(seeded[name].as_numpy("probabilities"), want)
            timed = calls(x)
            for call in timed.values():  # warm
                call()
            times: dict[str, list[float]] = {name: [] for name in timed}
            for _ in range(args.requests):
                for name, call in timed.items():
                    t0 = time.perf_counter()
                    call()
                    times[name].append((time.perf_counter() - t0) * 1000)
            base = statistics.median(times["v2_rest_binary"])
            for name, ms in times.items():
                median = statistics.median(ms)
                rows.append(
                    {
                        "batch": batch,
                        "codec": name,
                        "median_ms": round(median, 3),
                        "p90_ms": round(float(np.percentile(ms, 90)), 3),
                        "vs_v2_rest": round(median / base, 3),
                    }
                )
        grpc.close()
        rest.close()
        http.close()
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    command = "python benchmarks/grpc_latency.py " + " ".join(sys.argv[1:])
    meta = {"command": command.strip(), "revision": revision(), "uptime": load, "K": K}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "grpc_latency.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    lines = [
        "# gRPC against REST, one request at a time",
        "",
        f"`{meta['command']}` at {meta['revision']}; load: `{load}`.",
        f"Shipped fcNN1 checkpoint, one worker, loopback, K = {K}, pool networks (no seed),"
        f" {args.requests} rounds per batch size, the three codecs round-robin. Seeded answers"
        " checked equal first.",
        "",
        "| batch | codec | median ms | p90 ms | median / V2 REST |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['codec']} | {r['median_ms']} | {r['p90_ms']} | "
            f"{r['vs_v2_rest']} |"
        )
    (args.out / "grpc_latency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
