"""Latency and throughput of ``POST /predict`` over HTTP, set against two references.

Runs, in one go and on loopback only:

* ``apd serve`` (1 worker, in-process cache, warm) on the checkpoint: ``/predict`` at batch 1
  and 64 with K = 100, from the shared pool (no seed: one batched forward over a view of the
  pool) and with a seed (blocks from the in-process LRU: one batched forward per block);
* (a) the naive alternative, in this process: the forward of 100 stored SGLD networks
  (``runs/sgld-fcnn1/samples/theta.npy``, the sample store's format, read with
  ``np.load(mmap_mode="r")``; random networks of the same shape if it is absent) and the
  uncertainty summary, no HTTP;
* (b) the HTTP floor: a no-op FastAPI endpoint under the same uvicorn that reads the body and
  answers ``{}``, and a validate-only endpoint that also parses and validates the request
  with the service's own pydantic model;
* latency of ``/predict`` (batch 1 and 64) as K grows from 10 to 1000;
* throughput with several concurrent clients;
* the two backends' generator and forward times, in this process.

Every request count is bounded. Results go to ``benchmarks/results/serve_latency.json`` and
``.md``. Run: ``python benchmarks/serve_latency.py`` (``--help`` for options). Thread counts:
the server and the in-process references get the same ``--threads`` (default 1, which is
what a 2-core box shared with others serves best); BLAS threads follow it through
``OPENBLAS_NUM_THREADS``/``OMP_NUM_THREADS``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import Request

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _threads_flag(argv: Sequence[str]) -> str:
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--threads="):
            return arg.split("=", 1)[1]
    return "1"


# Before NumPy is imported: BLAS reads its thread count once, at load.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(_var, _threads_flag(sys.argv))

from service.schemas import PredictRequest  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_CHECKPOINT = ROOT / "models" / "mnist-fcnn1" / "model.safetensors"
DEFAULT_SAMPLES = ROOT / "runs" / "sgld-fcnn1" / "samples" / "theta.npy"
LOOPBACK = "127.0.0.1"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--samples", type=Path, default=DEFAULT_SAMPLES)
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--requests", type=int, default=300, help="timed requests at batch 1")
    p.add_argument("--requests-64", type=int, default=60, help="timed requests at batch 64")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients, throughput")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--serve-floor", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --- the floor app (run in a subprocess by this script) ----------------------------------


def serve_floor(port: int) -> None:
    import uvicorn
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/noop")
    async def noop(request: Request) -> dict[str, Any]:
        await request.body()
        return {}

    @app.post("/validate")
    async def validate(body: PredictRequest) -> dict[str, Any]:
        return {"n": len(body.pixels)}

    uvicorn.run(app, host=LOOPBACK, port=port, log_level="warning", server_header=False)


# --- processes ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def process(cmd: list[str], ready_url: str, env: dict[str, str]) -> Iterator[None]:
    import httpx

    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"{cmd[:4]} did not start:\n{log.read().decode()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(ready_url, timeout=2).status_code in (200, 405):
                    break
            time.sleep(0.2)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


# --- measuring ---------------------------------------------------------------------------


def summarize_latencies(seconds: Sequence[float], images: int) -> dict[str, float]:
    import numpy as np

    ms = np.asarray(seconds) * 1e3
    return {
        "n": len(ms),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "mean_ms": round(float(ms.mean()), 3),
        "sequential_rps": round(1e3 / float(ms.mean()), 1),
        "sequential_images_per_s": round(images * 1e3 / float(ms.mean()), 1),
    }


def poster(client: Any, url: str, body: bytes) -> Callable[[], None]:
    headers = {"content-type": "application/json"}

    def post() -> None:
        r = client.post(url, content=body, headers=headers)
        if r.status_code != 200:
            raise RuntimeError(f"{url} -> {r.status_code}: {r.text[:300]}")

    return post


def interleaved(
    variants: dict[str, Callable[[], object]], n: int, warmup: int = 3
) -> dict[str, list[float]]:
    """Time each variant ``n`` times, round-robin, so that they share the machine's load
    (this machine is shared: a slow minute would otherwise fall on one variant only)."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    out: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(n):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - t0)
    return out


def throughput(url: str, body: bytes, clients: int, per_client: int, images: int) -> dict[str, Any]:
    import httpx

    errors = 0
    lock = threading.Lock()

    def worker() -> None:
        nonlocal errors
        with httpx.Client(timeout=60) as client:
            for _ in range(per_client):
                r = client.post(url, content=body, headers={"content-type": "application/json"})
                if r.status_code != 200:
                    with lock:
                        errors += 1

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    total = clients * per_client
    return {
        "clients": clients,
        "requests": total,
        "errors": errors,
        "rps": round(total / wall, 1),
        "images_per_s": round(total * images / wall, 1),
    }


def time_call(fn: Callable[[], object], n: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


# --- the run -----------------------------------------------------------------------------


def mnist_images(n: int) -> tuple[Any, str]:
    """``n`` MNIST test digits as floats in [0, 1], or random strokes if none is at hand."""
    import gzip

    import numpy as np

    for base in (
        Path(os.environ.get("APD_DATA_DIR", ROOT / "data")),
        ROOT.parent / "shared" / "data",
    ):
        path = base / "mnist" / "t10k-images-idx3-ubyte.gz"
        if path.is_file():
            with gzip.open(path) as f:
                x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 784)
            return x[:n].astype(np.float32) / 255.0, f"MNIST test digits ({path})"
    rng = np.random.default_rng(0)
    return (rng.random((n, 784)) < 0.15).astype(np.float32), "random binary images"


def build_checkpoint(args: argparse.Namespace, workdir: Path) -> tuple[Path, str]:
    if args.checkpoint.is_file():
        return args.checkpoint, str(args.checkpoint)
    sys.path.insert(0, str(ROOT / "tests"))
    from service_support import make_checkpoint

    path = make_checkpoint(
        workdir / "random-fcnn1.safetensors",
        sizes=(784, 100, 10),
        arch="fcnn1",
        noise_dim=64,
        hidden=(256,),
        rank=64,
        model_id="random-fcnn1",
    )
    return (
        path,
        f"{args.checkpoint} absent: a random fcnn1 checkpoint (noise 64, hidden 256, rank 64)",
    )


def sgld_networks(path: Path, num_params: int, k: int) -> tuple[Any, str]:
    import numpy as np

    if path.is_file():
        theta = np.load(path, mmap_mode="r", allow_pickle=False)
        if theta.ndim == 2 and theta.shape[1] == num_params and len(theta) >= k:
            return np.ascontiguousarray(theta[-k:], dtype=np.float32), f"{path} (last {k})"
        note = f"{path} has shape {theta.shape}, not (>= {k}, {num_params})"
    else:
        note = f"{path} absent"
    rng = np.random.default_rng(0)
    theta = (rng.standard_normal((k, num_params)) * 0.05).astype(np.float32)
    return theta, f"{note}: {k} random networks of the same shape instead"


def backend_microbench(ckpt_path: Path, threads: int, x1: Any, x64: Any) -> dict[str, Any]:
    import numpy as np

    from apd.checkpoint import load_checkpoint
    from service.backends import GeneratorBackend, OnnxRuntimeBackend, TorchBackend
    from service.posterior_pool import POOL_STREAM, block_noise

    ckpt = load_checkpoint(ckpt_path)
    g = ckpt.meta.generator
    noise = [
        block_noise(POOL_STREAM, b, g.noise_dim, ckpt.num_params, g.has_residual) for b in range(10)
    ]
    draw = time_call(
        lambda: block_noise(POOL_STREAM, 0, g.noise_dim, ckpt.num_params, g.has_residual), 10
    )
    out: dict[str, Any] = {"noise_per_block_ms": round(min(draw) * 1e3, 3)}
    backends: list[GeneratorBackend] = [
        OnnxRuntimeBackend(ckpt, threads),
        TorchBackend(ckpt, threads),
    ]
    for backend in backends:
        z, eps = noise[0]
        theta = np.concatenate([backend.generate(z_, e_) for z_, e_ in noise])
        gen = time_call(partial(backend.generate, z, eps), 30)
        f1 = time_call(partial(backend.forward_probs, theta, x1), 50)
        f64 = time_call(partial(backend.forward_probs, theta, x64), 20)
        out[backend.kind.value] = {
            "generate_block_of_10_ms_min": round(min(gen) * 1e3, 3),
            "forward_k100_batch1_ms_p50": round(float(np.median(f1)) * 1e3, 3),
            "forward_k100_batch64_ms_p50": round(float(np.median(f64)) * 1e3, 3),
        }
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from apd.checkpoint import load_checkpoint
    from apd.networks import forward_probs
    from apd.uncertainty import summarize

    workdir = Path(tempfile.mkdtemp(prefix="apd-bench-"))
    ckpt_path, ckpt_note = build_checkpoint(args, workdir)
    ckpt = load_checkpoint(ckpt_path)
    images, images_note = mnist_images(64)
    x1, x64 = images[:1], images[:64]
    bodies = {
        (b, k, seed): json.dumps(
            {"inputs": images[:b].round(4).tolist(), "num_samples": k}
            | ({"seed": seed} if seed is not None else {})
        ).encode()
        for b in (1, 64)
        for k in (10, 100, 1000)
        for seed in (None, 7)
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("APD_")}
    env |= {"OPENBLAS_NUM_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads)}
    env |= {"PYTHONPATH": str(ROOT)}
    port, floor_port = free_port(), free_port()
    serve_cmd = [sys.executable, "-m", "apd_cli", "serve", "--checkpoint", str(ckpt_path),
                 "--host", LOOPBACK, "--port", str(port), "--workers", "1",
                 "--backend", args.backend, "--num-threads", str(args.threads),
                 "--local-cache-mb", "1024", "--log-level", "warning"]  # fmt: skip
    floor_cmd = [sys.executable, __file__, "--serve-floor", str(floor_port)]
    base, floor = f"http://{LOOPBACK}:{port}", f"http://{LOOPBACK}:{floor_port}"
    result: dict[str, Any] = {
        "checkpoint": ckpt_note,
        "checkpoint_sha256": ckpt.sha256,
        "target": ckpt.meta.target.model_dump(mode="json"),
        "generator": ckpt.meta.generator.model_dump(mode="json"),
        "inputs": images_note,
        "backend": args.backend,
        "threads": args.threads,
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_before": os.getloadavg(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "server": "apd serve --workers 1 (in-process cache), uvicorn, loopback, keep-alive",
    }
    n1, n64 = args.requests, args.requests_64
    # (a) the naive alternative: 100 stored SGLD networks, forward + summary in process.
    theta, theta_note = sgld_networks(args.samples, ckpt.num_params, 100)
    spec = ckpt.spec

    def naive(x: Any) -> Callable[[], object]:
        return lambda: summarize(forward_probs(spec, theta, x))

    with (
        process(serve_cmd, f"{base}/readyz", env),
        process(floor_cmd, f"{floor}/noop", env),
        httpx.Client(base_url=base, timeout=60) as api,
        httpx.Client(base_url=floor, timeout=60) as floor_api,
    ):
        # Warm: the pool is drawn at startup; seeded and extra blocks on a first request.
        for body in bodies.values():
            poster(api, "/predict", body)()
        http: dict[str, Any] = {}
        for b, x, n in ((1, x1, n1), (64, x64, n64)):
            times = interleaved(
                {
                    "predict_k100_pool": poster(api, "/predict", bodies[(b, 100, None)]),
                    "predict_k100_seeded": poster(api, "/predict", bodies[(b, 100, 7)]),
                    "noop_floor": poster(floor_api, "/noop", bodies[(b, 100, None)]),
                    "validate_only": poster(floor_api, "/validate", bodies[(b, 100, None)]),
                    "sgld_in_process": naive(x),
                },
                n,
            )
            http[f"batch{b}"] = {name: summarize_latencies(t, b) for name, t in times.items()}
        growth: dict[str, Any] = {}
        for b, n in ((1, max(10, n1 // 3)), (64, max(10, n64 // 3))):
            times = interleaved(
                {f"k{k}": poster(api, "/predict", bodies[(b, k, None)]) for k in (10, 100, 1000)},
                n,
            )
            growth[f"batch{b}"] = {name: summarize_latencies(t, b) for name, t in times.items()}
        load = {}
        for b, n in ((1, n1), (64, n64)):
            per_client = max(3, n // (2 * args.clients))
            body = bodies[(b, 100, None)]
            load[f"batch{b}_k100"] = throughput(
                f"{base}/predict", body, args.clients, per_client, b
            )
    result["naive_networks"] = theta_note
    result["http"] = http
    result["k_growth"] = growth
    result["throughput"] = load
    result["backends_in_process"] = backend_microbench(ckpt_path, args.threads, x1, x64)
    ratios = {}
    for b in (1, 64):
        h = {name: v["p50_ms"] for name, v in http[f"batch{b}"].items()}
        g = growth[f"batch{b}"]
        ratios[f"batch{b}"] = {
            "predict_over_noop_floor": round(h["predict_k100_pool"] / h["noop_floor"], 2),
            "predict_over_validate_only": round(h["predict_k100_pool"] / h["validate_only"], 2),
            "predict_over_sgld_in_process": round(h["predict_k100_pool"] / h["sgld_in_process"], 2),
            "k1000_over_k10": round(g["k1000"]["p50_ms"] / g["k10"]["p50_ms"], 2),
        }
    result["ratios_p50"] = ratios
    result["machine"]["load_avg_after"] = os.getloadavg()
    return result


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        "# /predict latency (benchmarks/serve_latency.py)",
        "",
        f"- checkpoint: {r['checkpoint']} (sha256 {r['checkpoint_sha256'][:12]}…), target "
        f"{r['target']['layer_sizes']} ({r['target']['num_params']} weights)",
        f"- inputs: {r['inputs']}; backend {r['backend']}, {r['threads']} thread(s)",
        f"- server: {r['server']}",
        f"- machine: {m['cpus']} CPUs, load average {m['load_avg_before']} before and "
        f"{m['load_avg_after']} after (a shared machine: figures are noisy)",
        f"- naive alternative (sgld_in_process: forward + summary, no HTTP): {r['naive_networks']}",
        "",
        "## K = 100, one client, warm cache, variants interleaved (ms)",
        "",
    ]
    rows = []
    for b in (1, 64):
        for name, s in r["http"][f"batch{b}"].items():
            rows.append(
                [
                    name,
                    b,
                    s["p50_ms"],
                    s["p99_ms"],
                    s["sequential_rps"],
                    s["sequential_images_per_s"],
                ]
            )
    lines += table(["what", "batch", "p50", "p99", "req/s", "images/s"], rows)
    ratio_names = list(r["ratios_p50"]["batch1"])
    lines += ["", "## Ratios of p50 latencies", ""]
    lines += table(
        ["batch", *ratio_names],
        [[b, *r["ratios_p50"][f"batch{b}"].values()] for b in (1, 64)],
    )
    lines += ["", "## Growth with K (/predict from the pool; p50 / p99 ms)", ""]
    growth_rows = []
    for b in (1, 64):
        g = r["k_growth"][f"batch{b}"]
        growth_rows.append(
            [b, *(f"{g[k]['p50_ms']} / {g[k]['p99_ms']}" for k in ("k10", "k100", "k1000"))]
        )
    lines += table(["batch", "K=10", "K=100", "K=1000"], growth_rows)
    lines += ["", "## Throughput with concurrent clients, K = 100", ""]
    lines += table(
        ["load", "clients", "requests", "errors", "req/s", "images/s"],
        [
            [name, t["clients"], t["requests"], t["errors"], t["rps"], t["images_per_s"]]
            for name, t in r["throughput"].items()
        ],
    )
    be = r["backends_in_process"]
    lines += [
        "",
        f"## Backends in process (noise for a block of 10: {be['noise_per_block_ms']} ms)",
        "",
    ]
    lines += table(
        ["backend", "generate 10 networks (min ms)", "forward K=100 batch 1 (p50 ms)", "batch 64"],
        [
            [
                name,
                be[name]["generate_block_of_10_ms_min"],
                be[name]["forward_k100_batch1_ms_p50"],
                be[name]["forward_k100_batch64_ms_p50"],
            ]
            for name in ("onnxruntime", "torch")
        ],
    )
    lines += ["", "Reproduce: `python benchmarks/serve_latency.py` (see its docstring).", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.serve_floor is not None:
        serve_floor(args.serve_floor)
        return 0
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_latency.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "serve_latency.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
