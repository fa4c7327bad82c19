"""Serving cost of the posterior: ``/predict`` and V2 over HTTP against in-process references.

Runs, in one go and on loopback only, for one architecture (``--arch fcnn1``: the shipped
checkpoint; ``--arch fcnn2``: a random checkpoint of the fcNN2 distillation's shape, noise 32,
generator hidden 85-85-100-100-100, rank 46, fp16 basis; speed does not depend on the weights):

1. **HTTP vs stored networks**: ``POST /predict`` (JSON, batch 64, K = 100, pool, warm) and V2
   infer with binary tensors, against the in-process forward of 100 stored networks on the
   same batch (``torch.einsum`` per layer + softmax, ``--threads`` torch threads), timed
   round-robin so that they share the machine's load;
2. **K sweep**: ``/predict`` at K = 10, 100, 1000 at batch 1 and 64, and the in-process
   factored forward alone;
3. **Redis hit vs regeneration** of the same networks (in process, a real Redis): a seeded
   request's 100 blocks of codes read (``MGET`` + HMAC check + decode) against drawn again
   (noise + generator MLP), and the full ``get_blocks`` either way (both add the tails);
4. **memory under load**: 16 concurrent requests of 256 images x K 1000 with fresh seeds
   against one worker with the compose settings; peak RSS and every status.

Every figure is a ratio to a baseline measured in the same run. Results go to
``benchmarks/results/serve_latency[-fcnn2].json`` and ``.md`` with the command, revision and
load. Run: ``python benchmarks/serve_latency.py [--arch fcnn2]`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]


def _threads_flag(argv: Sequence[str]) -> str:
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--threads="):
            return arg.split("=", 1)[1]
    return "2"


# Before NumPy is imported: BLAS reads its thread count once, at load.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(_var, _threads_flag(sys.argv))

import numpy as np  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SHIPPED = ROOT / "models" / "mnist-fcnn1" / "model.safetensors"
LOOPBACK = "127.0.0.1"
HMAC_KEY = "benchmark-hmac-key-0123456789"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=["fcnn1", "fcnn2"], default="fcnn1")
    p.add_argument("--threads", type=int, default=2, help="BLAS/torch threads, both sides")
    p.add_argument("--requests", type=int, default=60, help="timed rounds per comparison")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--skip-memory", action="store_true", help="skip the 16 x 256 x 1000 run")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.threads < 1 or args.requests < 1:
        p.error("--threads and --requests must be positive")
    return args


# --- processes and timing ----------------------------------------------------------------


@contextlib.contextmanager
def serve(checkpoint: Path, args: list[str]) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    from tests.harness import apd_serve

    with apd_serve(checkpoint, args=args, timeout=120) as srv:
        yield srv.base_url, srv.proc


def interleaved(
    variants: dict[str, Callable[[], object]], n: int, warmup: int = 3
) -> dict[str, float]:
    """Median seconds of each variant over ``n`` calls timed round-robin
    (:func:`servebench.interleaved`)."""
    from servebench import interleaved as timed

    return {name: float(np.median(t)) for name, t in timed(variants, n, warmup).items()}


def poster(client: Any, url: str, body: bytes, headers: dict[str, str]) -> Callable[[], None]:
    def post() -> None:
        r = client.post(url, content=body, headers=headers)
        if r.status_code != 200:
            raise RuntimeError(f"{url} -> {r.status_code}: {r.text[:300]}")

    return post


def mnist_images(n: int) -> tuple[np.ndarray, str]:
    import gzip

    for base in (Path(os.environ.get("APD_DATA_DIR", ROOT / "data")), ROOT.parent / "shared/data"):
        path = base / "mnist" / "t10k-images-idx3-ubyte.gz"
        if path.is_file():
            with gzip.open(path) as f:
                x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 784)
            return x[:n].astype(np.float32) / 255.0, f"MNIST test digits ({path.name})"
    rng = np.random.default_rng(0)
    return (rng.random((n, 784)) < 0.15).astype(np.float32), "random binary images"


def json_body(x: np.ndarray, **fields: Any) -> bytes:
    return json.dumps({"inputs": np.round(x, 6).tolist(), **fields}).encode()


def v2_binary_body(x: np.ndarray, k: int) -> tuple[bytes, dict[str, str]]:
    header = {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(x.shape),
                "parameters": {"binary_data_size": x.nbytes},
            }
        ],
        "outputs": [
            {"name": n, "parameters": {"binary_data": True}}
            for n in ("probabilities", "mutual_information", "is_anomaly")
        ],
        "parameters": {"num_samples": k},
    }
    head = json.dumps(header).encode()
    return head + np.ascontiguousarray(x, np.float32).tobytes(), {
        "Inference-Header-Content-Length": str(len(head)),
        "content-type": "application/octet-stream",
    }


# --- the checkpoint and the in-process references ----------------------------------------


def checkpoint_for(arch: str, workdir: Path) -> tuple[Path, str]:
    if arch == "fcnn1":
        return SHIPPED, f"the shipped checkpoint ({SHIPPED.relative_to(ROOT)})"
    from tests.service_support import make_checkpoint

    path = make_checkpoint(
        workdir / "random-fcnn2.safetensors",
        sizes=(784, 400, 400, 10),
        arch="fcnn2",
        noise_dim=32,
        hidden=(85, 85, 100, 100, 100),
        rank=46,
        model_id="random-fcnn2",
    )
    return path, "a random checkpoint of the fcNN2 distillation's shape (rank 46)"


def torch_stored_forwards(
    spec: Any, theta: np.ndarray, x: np.ndarray, threads: int
) -> dict[str, Callable[[], object]]:
    """The baselines: 100 stored networks' forward and softmax in torch, with ``torch.einsum``
    per layer and with the project's own fused ``baddbmm`` (:func:`training.torch_ops`)."""
    import torch

    from apd.networks import unflatten
    from training.torch_ops import forward_logits

    torch.set_num_threads(threads)
    layers = [
        (torch.from_numpy(w.copy()), torch.from_numpy(b.copy())) for w, b in unflatten(spec, theta)
    ]
    xt, tt = torch.from_numpy(x), torch.from_numpy(theta.copy())

    def einsum() -> Any:
        with torch.inference_mode():
            w, b = layers[0]
            h = torch.einsum("nd,kdh->knh", xt, w) + b[:, None, :]
            for w, b in layers[1:]:
                h = torch.einsum("knd,kdh->knh", torch.relu(h), w) + b[:, None, :]
            return torch.softmax(h, dim=-1)

    def baddbmm() -> Any:
        with torch.inference_mode():
            return torch.softmax(forward_logits(spec, tt, xt), dim=-1)

    return {"stored_torch_einsum": einsum, "stored_torch_baddbmm": baddbmm}


# --- the parts ---------------------------------------------------------------------------


def http_vs_stored(base: str, ckpt: Any, x64: np.ndarray, threads: int, n: int) -> dict[str, Any]:
    import httpx

    from apd.networks import forward_probs

    theta = np.ascontiguousarray(ckpt.generate(**ckpt.noise(100, 0)))  # 100 stored networks
    body = json_body(x64, num_samples=100)
    v2_body, v2_headers = v2_binary_body(x64, 100)
    v2_url = f"/v2/models/{ckpt.meta.model_id}/infer"
    with httpx.Client(base_url=base, timeout=60) as c:
        med = interleaved(
            {
                **torch_stored_forwards(ckpt.spec, theta, x64, threads),
                "stored_numpy": lambda: forward_probs(ckpt.spec, theta, x64),
                "http_predict_json": poster(
                    c, "/predict", body, {"content-type": "application/json"}
                ),
                "http_v2_binary": poster(c, v2_url, v2_body, v2_headers),
            },
            n,
        )
    base_s = min(med["stored_torch_einsum"], med["stored_torch_baddbmm"])
    return {
        "p50_ms": {k: round(v * 1e3, 3) for k, v in med.items()},
        "ratio_to_stored_torch": {k: round(v / base_s, 3) for k, v in med.items()},
        "json_body_bytes": len(body),
    }


def k_sweep(base: str, ckpt: Any, x1: np.ndarray, x64: np.ndarray, n: int) -> dict[str, Any]:
    import httpx

    from apd.factored import AffinePosterior

    posterior = AffinePosterior(ckpt.spec, *ckpt.affine, residual_std=ckpt.residual_std)
    out: dict[str, Any] = {}
    with httpx.Client(base_url=base, timeout=120) as c:
        for name, x in (("batch1", x1), ("batch64", x64)):
            variants: dict[str, Callable[[], object]] = {}
            for k in (10, 100, 1000):
                body = json_body(x, num_samples=k)
                variants[f"http_K{k}"] = poster(
                    c, "/predict", body, {"content-type": "application/json"}
                )
                rng = np.random.default_rng(k)
                z = rng.standard_normal((k, ckpt.noise_dim), dtype=np.float32)
                eps = rng.standard_normal((k, posterior.residual_dim), dtype=np.float32)
                codes = posterior.codes(ckpt.codes(z), eps)
                variants[f"inproc_K{k}"] = lambda cc=codes, xx=x: posterior.summarize(cc, xx)
            rounds = max(5, n // (4 if name == "batch64" else 1))
            med = interleaved(variants, rounds)
            plans = {k: posterior.plan(k, len(x)).first_layer.value for k in (10, 100, 1000)}
            out[name] = {
                "p50_ms": {k: round(v * 1e3, 3) for k, v in med.items()},
                "first_layer": plans,
                "http_K1000_over_K10": round(med["http_K1000"] / med["http_K10"], 2),
                "inproc_K1000_over_K10": round(med["inproc_K1000"] / med["inproc_K10"], 2),
            }
    return out


def redis_hit_vs_regeneration(ckpt: Any, url: str, n: int) -> dict[str, Any]:
    import anyio

    from apd.factored import AffinePosterior
    from service.core.model import MAX_KEPT_TAIL_PARAMS
    from service.core.networks import NETWORKS_PER_BLOCK, NetworkSource, Stream, draw_codes
    from service.infra.cache import BlockLayout, LocalBlockCache, RedisBlockStore
    from service.infra.telemetry import Metrics

    posterior = AffinePosterior(ckpt.spec, *ckpt.affine, residual_std=ckpt.residual_std)
    keep_tails = posterior.tail_params <= MAX_KEPT_TAIL_PARAMS
    blocks = tuple(range(100))  # K = 1000
    stream = Stream.for_seed(424242)

    def complete() -> Any:
        codes = draw_codes(ckpt, posterior, stream, blocks)
        return codes, posterior.tails(codes) if keep_tails else None

    async def measure() -> dict[str, float]:
        metrics = Metrics()
        store = RedisBlockStore(
            url,
            metrics=metrics,
            socket_timeout_s=2,
            health_interval_s=60,
            retry_min_s=1,
            retry_max_s=1,
        )
        await store.start()
        if not store.available:
            raise RuntimeError(f"no Redis at {url}")
        cache = NetworkSource(
            ckpt,
            posterior,
            namespace="bench/1",
            pool_size=0,
            tailed_size=0,
            keep_tails=keep_tails,
            local=LocalBlockCache(0),  # every read goes to Redis
            redis=store,
            hmac_key=HMAC_KEY.encode(),
            key_prefix=f"apd-bench-{os.getpid()}",
            ttl_s=600,
            metrics=metrics,
            limiter=anyio.CapacityLimiter(1),
        )
        await cache._run(stream, blocks)  # writes them
        times: dict[str, list[float]] = {
            "read_codes": [],
            "draw_codes": [],
            "get_blocks_hit": [],
            "get_blocks_regenerate": [],
        }
        for _ in range(n):
            t0 = time.perf_counter()
            assert len(await cache._read_redis(stream, blocks)) == len(blocks)
            times["read_codes"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            draw_codes(ckpt, posterior, stream, blocks)
            times["draw_codes"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await cache._run(stream, blocks)
            times["get_blocks_hit"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            complete()
            times["get_blocks_regenerate"].append(time.perf_counter() - t0)
        hits = metrics.registry.get_sample_value("apd_cache_hits_total", {"tier": "redis"})
        await store.delete(*(cache._key(stream, b) for b in blocks))
        await store.close()
        med = {k: float(np.median(v)) for k, v in times.items()}
        med["redis_hits"] = float(hits or 0)
        return med

    med = anyio.run(measure)
    return {
        "networks": len(blocks) * NETWORKS_PER_BLOCK,
        "entry_bytes": BlockLayout(ckpt.sha256, posterior.code_dim, HMAC_KEY.encode()).entry_bytes,
        "tails_kept": keep_tails,
        "p50_ms": {k: round(v * 1e3, 3) for k, v in med.items() if k != "redis_hits"},
        "codes_hit_over_regeneration": round(med["read_codes"] / med["draw_codes"], 3),
        "get_blocks_hit_over_regeneration": round(
            med["get_blocks_hit"] / med["get_blocks_regenerate"], 3
        ),
    }


def memory_under_load(checkpoint: Path) -> dict[str, Any]:
    import httpx

    from tests.harness import apd_serve, rss_bytes

    rng = np.random.default_rng(7)
    bodies = [
        json_body(rng.random((256, 784)).astype(np.float32), num_samples=1000, seed=10_000 + i)
        for i in range(16)
    ]
    compose_env = ["--workers", "1", "--memory-budget-mb", "384", "--log-level", "warning"]
    with apd_serve(checkpoint, args=compose_env, timeout=120) as srv:
        pid = srv.worker_pids()[0]
        idle = rss_bytes(pid)
        peak = [idle]
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], rss_bytes(pid))
                stop.wait(0.005)

        watcher = threading.Thread(target=watch)
        watcher.start()

        async def send() -> list[Any]:
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=300) as c:
                hdr = {"content-type": "application/json"}
                return await asyncio.gather(
                    *(c.post("/predict", content=b, headers=hdr) for b in bodies),
                    return_exceptions=True,
                )

        t0 = time.perf_counter()
        try:
            responses = asyncio.run(send())
        finally:
            stop.set()
            watcher.join()
        wall = time.perf_counter() - t0
    statuses = [r.status_code if hasattr(r, "status_code") else f"error: {r!r}" for r in responses]
    retry_after = all(
        "retry-after" in r.headers for r in responses if getattr(r, "status_code", 0) == 503
    )
    return {
        "requests": len(bodies),
        "body_bytes": len(bodies[0]),
        "statuses": statuses,
        "dropped": sum(1 for s in statuses if not isinstance(s, int)),
        "every_503_has_retry_after": retry_after,
        "idle_rss_mb": round(idle / 2**20, 1),
        "peak_rss_mb": round(peak[0] / 2**20, 1),
        "wall_s": round(wall, 2),
    }


# --- the run -----------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    from apd.checkpoint import load_checkpoint

    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="apd-bench-"))
    path, origin = checkpoint_for(args.arch, workdir)
    ckpt = load_checkpoint(path)
    x, images = mnist_images(64)
    record: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "revision": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "dirty": bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--", "apd", "service"],
                cwd=ROOT,
                capture_output=True,
                text=True,
            ).stdout.strip()
        ),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "threads": args.threads,
        "arch": args.arch,
        "checkpoint": origin,
        "code_dim": ckpt.code_dim,
        "images": images,
        "load_before": [round(v, 2) for v in load_before],
    }
    server_args = ["--workers", "1", "--num-threads", str(args.threads), "--log-level", "warning"]
    with serve(path, server_args) as (base, _):
        print("HTTP vs stored networks ...", flush=True)
        record["http_vs_stored"] = http_vs_stored(base, ckpt, x, args.threads, args.requests)
        print("K sweep ...", flush=True)
        record["k_sweep"] = k_sweep(base, ckpt, x[:1], x, args.requests)
    print("Redis hit vs regeneration ...", flush=True)
    record["redis"] = redis_hit_vs_regeneration(ckpt, args.redis_url, args.requests)
    if not args.skip_memory:
        print("16 x 256 images x K 1000, fresh seeds ...", flush=True)
        record["memory"] = memory_under_load(path)
    record["load_after"] = [round(v, 2) for v in os.getloadavg()]
    return record


def markdown(r: dict[str, Any]) -> str:
    h = r["http_vs_stored"]
    lines = [
        f"# Serving cost, {r['arch']}",
        "",
        f"`{r['command']}` at revision {r['revision']}"
        f"{' (uncommitted changes)' if r['dirty'] else ''};",
        f"{r['machine']}, {r['threads']} BLAS/torch threads on both sides; "
        f"checkpoint: {r['checkpoint']}",
        f"(code length r = {r['code_dim']}); inputs: {r['images']}. Load average (1/5/15 min)",
        f"before {r['load_before']}, after {r['load_after']}. Every ratio is to a baseline timed",
        "round-robin with it in the same run.",
        "",
        "## HTTP against 100 stored networks (batch 64, K = 100)",
        "",
        "| path | p50 ms | / the faster stored torch forward |",
        "| --- | ---: | ---: |",
    ]
    for k, v in h["p50_ms"].items():
        lines.append(f"| {k} | {v} | {h['ratio_to_stored_torch'][k]} |")
    lines += ["", f"JSON body: {h['json_body_bytes']} bytes.", "", "## Latency as K grows", ""]
    for name, s in r["k_sweep"].items():
        lines.append(f"**{name}** (first layer: {s['first_layer']}):")
        lines.append("")
        lines.append("| K | HTTP p50 ms | in-process factored p50 ms |")
        lines.append("| ---: | ---: | ---: |")
        for k in (10, 100, 1000):
            lines.append(f"| {k} | {s['p50_ms'][f'http_K{k}']} | {s['p50_ms'][f'inproc_K{k}']} |")
        lines.append("")
        lines.append(
            f"K 1000 / K 10: HTTP {s['http_K1000_over_K10']}, "
            f"in process {s['inproc_K1000_over_K10']}."
        )
        lines.append("")
    d = r["redis"]
    lines += [
        f"## Redis hit against regeneration ({d['networks']} networks, "
        f"{d['entry_bytes']} bytes a block of 10)",
        "",
        "| step | p50 ms |",
        "| --- | ---: |",
        *[f"| {k} | {v} |" for k, v in d["p50_ms"].items()],
        "",
        f"Codes read from Redis / drawn again: **{d['codes_hit_over_regeneration']}**; the whole "
        f"`get_blocks` (tails kept: {d['tails_kept']}) hit / regenerate: "
        f"{d['get_blocks_hit_over_regeneration']}.",
        "",
    ]
    if "memory" in r:
        m = r["memory"]
        lines += [
            "## 16 concurrent requests of 256 images x K 1000, fresh seeds, one worker",
            "",
            f"Statuses: {sorted(m['statuses'], key=str)}; dropped connections: "
            f"{m['dropped']}; every 503 carries Retry-After: "
            f"{m['every_503_has_retry_after']}. Worker RSS idle "
            f"{m['idle_rss_mb']} MB, peak {m['peak_rss_mb']} MB (memory budget 384 MiB, compose "
            f"limit 1 GiB); {m['wall_s']} s for all. Body: {m['body_bytes']} bytes each.",
            "",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    record = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "serve_latency" if args.arch == "fcnn1" else f"serve_latency-{args.arch}"
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(record) + "\n")
    print(markdown(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
