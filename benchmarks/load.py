"""Load, Redis-fault and cache-corruption benchmark of ``apd serve`` on loopback.

    python benchmarks/load.py                      # the full run (about 3 minutes)
    python benchmarks/load.py --duration 10 --quick  # a smoke run, results not written

What it does, with every process on 127.0.0.1 and stopped in a ``finally``:

1. Starts a private ``redis-server`` on a free port and ``apd serve`` with 2 workers on it
   (``--local-cache-mb`` small, so the workers really read blocks from Redis under load).
2. Warm-up, then closed-loop clients for ``--duration`` seconds (at least 60): mixed
   ``/predict`` and ``/anomaly-score``, batch sizes 1..64, seeded and unseeded requests.
   Resident memory of the workers is read after the warm-up and at the end.
3. During the load, Redis is stopped at ``--redis-stop-at`` and restarted (empty, same port)
   ``--redis-down-for`` seconds later. ``/readyz`` is polled every 0.2 s to time the
   degraded period; Redis's own ``INFO`` counters (keys, keyspace hits) show it is used again.
4. Cache corruption, on a fresh server with no in-process block cache (so every block is read
   from Redis): answers for a set of seeds from a server without Redis are the clean
   reference; then each cached entry is truncated, bit-flipped, forged without the HMAC key,
   or replaced by a foreign checkpoint's entry for the same stream, and each seed is asked
   again. Every answer must
   equal the clean one, the corruption metric must count each, and the entry must be redrawn.

Writes ``benchmarks/results/load.json`` and ``load.md`` (every figure and the command line).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from loadgen import (  # noqa: E402
    build_requests,
    images,
    metric_sum,
    parse_metrics,
    run_clients,
    summarize,
)

from service.infra.cache import HEADER_BYTES, MAC_BYTES  # noqa: E402
from tests.harness import (  # noqa: E402
    RedisServer,
    ServeProcess,
    apd_serve,
    make_tiny_checkpoint,
    rss_bytes,
)

RESULTS = ROOT / "benchmarks" / "results"
SHIPPED = ROOT / "models" / "mnist-fcnn1" / "model.safetensors"


# --------------------------------------------------------------------------- monitors


@dataclass
class ReadyzLog:
    """``/readyz`` polled in a thread every ``interval`` seconds until stopped."""

    base_url: str
    interval: float = 0.2
    entries: list[tuple[float, int, str]] = field(default_factory=list)  # (t, status, redis)
    t0: float = field(default_factory=time.monotonic)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=2.0) as client:
            for _ in range(100_000):  # bounded: about 5.5 h at 0.2 s
                if self._stop.is_set():
                    return
                t = time.monotonic() - self.t0
                try:
                    r = client.get("/readyz")
                    is_json = r.headers.get("content-type", "").startswith("application/json")
                    body = r.json() if is_json else {}
                    self.entries.append((t, r.status_code, str(body.get("redis", "?"))))
                except httpx.HTTPError as exc:
                    self.entries.append((t, 0, type(exc).__name__))
                self._stop.wait(self.interval)

    def degraded_periods(self) -> list[tuple[float, float]]:
        periods: list[tuple[float, float]] = []
        start: float | None = None
        for t, _, redis in self.entries:
            if redis != "ok" and start is None:
                start = t
            elif redis == "ok" and start is not None:
                periods.append((start, t))
                start = None
        if start is not None:
            periods.append((start, self.entries[-1][0]))
        return periods


def redis_info(server: RedisServer) -> dict[str, Any]:
    try:
        c = server.client()
        stats = c.info("stats")
        return {
            "keys": int(c.dbsize()),
            "keyspace_hits": int(stats.get("keyspace_hits", 0)),
            "keyspace_misses": int(stats.get("keyspace_misses", 0)),
        }
    except Exception as exc:  # Redis stopped: that is a state to record, not an error
        return {"error": type(exc).__name__}


def scrape(base_url: str, n: int = 6) -> dict[str, float]:
    """``/metrics`` from as many workers as answer in ``n`` scrapes: the max of each sample.

    Each scrape reaches one worker; with per-process metrics, the max over scrapes is a lower
    bound of the total (exact with multiprocess metrics, where each scrape sees all)."""
    merged: dict[str, float] = {}
    with httpx.Client(base_url=base_url, timeout=5.0) as client:
        for _ in range(n):
            with contextlib.suppress(httpx.HTTPError):
                for k, v in parse_metrics(client.get("/metrics").text).items():
                    merged[k] = max(v, merged.get(k, v))
    return merged


def cache_metrics(m: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in m.items() if k.startswith("apd_cache") or k.startswith("apd_redis")}


# --------------------------------------------------------------------------- phase 1-3: load


def server_env(args: argparse.Namespace) -> dict[str, str]:
    """Extra environment of the server processes, from ``--server-env KEY=VALUE``."""
    return dict(item.split("=", 1) for item in args.server_env)


def run_load(args: argparse.Namespace, checkpoint: Path, record: dict[str, Any]) -> None:
    redis = RedisServer()
    redis.start()
    try:
        serve_args = ["--workers", str(args.workers), "--redis-url", redis.url]
        serve_args += ["--local-cache-mb", str(args.local_cache_mb), "--log-level", "warning"]
        env = server_env(args)
        with apd_serve(checkpoint, args=serve_args, env=env, timeout=180) as server:
            shown = " ".join(f"{k}={v}" for k, v in env.items())
            record["serve_command"] = (
                f"{shown} apd serve --checkpoint {checkpoint} " + " ".join(serve_args)
            ).strip()
            _load_phases(args, server, redis, record)
    finally:
        redis.cleanup()


def _load_phases(
    args: argparse.Namespace, server: ServeProcess, redis: RedisServer, record: dict[str, Any]
) -> None:
    seeds = list(range(1000, 1000 + args.num_seeds))
    ks: list[int | None] = [None, 10, 20, 50, 100]
    reqs = build_requests(args.bodies, seeds=seeds, num_samples=ks, max_batch=64)
    record["request_mix"] = {
        "bodies": len(reqs),
        "endpoints": "alternating /predict and /anomaly-score (half of the latter name a score)",
        "batch_sizes": "uniform 1..64",
        "seeds": f"{len(seeds)} distinct seeds for 75% of requests, none (shared pool) for 25%",
        "num_samples": "one of default, 10, 20, 50, 100",
        "concurrency": args.concurrency,
    }
    workers = server.worker_pids()
    record["worker_pids"] = workers

    print(f"warm-up {args.warmup:.0f} s ...", flush=True)
    # every seed at the largest K and batch first, so each worker's caches and buffers
    # reach their working size before the memory baseline is taken
    heavy = build_requests(
        2 * len(seeds), seeds=seeds, num_samples=[100], min_batch=64, seeded_fraction=1.0
    )
    asyncio.run(
        run_clients(
            server.base_url,
            heavy,
            concurrency=args.concurrency,
            duration_s=args.warmup,
            max_requests=len(heavy),
            rng_seed=5,
        )
    )
    warm = asyncio.run(
        run_clients(
            server.base_url,
            reqs,
            concurrency=args.concurrency,
            duration_s=args.warmup,
            max_requests=args.max_requests,
            rng_seed=7,
        )
    )
    record["warmup"] = summarize(warm.samples, warm.wall_s)
    rss_start = {pid: rss_bytes(pid) for pid in workers}
    info_start = redis_info(redis)

    readyz = ReadyzLog(server.base_url)
    readyz.start()
    t_load = time.monotonic()
    fault: dict[str, Any] = {}
    redis_timeline: list[dict[str, Any]] = []

    def chaos() -> None:
        # bounded: runs once, sleeping to the scheduled times
        time.sleep(max(0.0, args.redis_stop_at))
        fault["info_before_stop"] = redis_info(redis)
        fault["stopped_at_s"] = round(time.monotonic() - t_load, 3)
        redis.stop()
        time.sleep(args.redis_down_for)
        redis.start()
        fault["restarted_at_s"] = round(time.monotonic() - t_load, 3)
        fault["info_right_after_restart"] = redis_info(redis)

    def sample_redis() -> None:
        for _ in range(int(args.duration) + 5):
            t = time.monotonic() - t_load
            if t > args.duration + 2:
                return
            rss = {str(pid): round(rss_bytes(pid) / 2**20, 1) for pid in workers}
            redis_timeline.append({"t": round(t, 1), **redis_info(redis), "rss_mib": rss})
            time.sleep(1.0)

    chaos_thread = threading.Thread(target=chaos, daemon=True)
    sampler = threading.Thread(target=sample_redis, daemon=True)
    if args.redis_stop_at >= 0:
        chaos_thread.start()
    sampler.start()
    print(f"load {args.duration:.0f} s with a Redis stop at {args.redis_stop_at} s ...", flush=True)
    try:
        main = asyncio.run(
            run_clients(
                server.base_url,
                reqs,
                concurrency=args.concurrency,
                duration_s=args.duration,
                max_requests=args.max_requests,
                rng_seed=11,
            )
        )
    finally:
        if chaos_thread.is_alive() or args.redis_stop_at >= 0:
            chaos_thread.join(timeout=args.redis_stop_at + args.redis_down_for + 30)
        sampler.join(timeout=10)
    # let the health loop notice Redis is back even if the load ended early, then stop polling
    time.sleep(min(args.redis_retry_wait, 10.0))
    readyz.stop()
    rss_end = {pid: rss_bytes(pid) for pid in workers}
    # The load's seeds sit in the workers' in-process caches by now and the pool never goes
    # to Redis: ask fresh seeds, each four times over fresh connections (both workers), so
    # that the restarted Redis is written and read again if it is used at all.
    probe_x = images(2, np.random.default_rng(11))
    for i in range(8):
        for _ in range(4):
            with httpx.Client(base_url=server.base_url, timeout=30) as probe:
                _predict(probe, 900_000 + i, probe_x, 20)
    info_end = redis_info(redis)
    metrics_end = scrape(server.base_url)

    summary = summarize(main.samples, main.wall_s)
    record["load"] = summary
    offset = readyz.t0 - t_load  # readyz times are relative to its own start
    stop_t = fault.get("stopped_at_s", 0.0)
    restart_t = fault.get("restarted_at_s", 0.0)

    def phase(lo: float, hi: float) -> dict[str, Any]:
        part = [s for s in main.samples if lo <= s.t < hi]
        return summarize(part, max(hi - lo, 1e-9))

    if args.redis_stop_at >= 0:
        record["load_by_phase"] = {
            "before_redis_stop": phase(0.0, stop_t),
            "redis_down": phase(stop_t, restart_t),
            "after_redis_restart": phase(restart_t, main.wall_s),
        }
    periods = [(a + offset, b + offset) for a, b in readyz.degraded_periods()]
    readyz_statuses = sorted({st for _, st, _ in readyz.entries})
    fault.update(
        {
            "readyz_polls": len(readyz.entries),
            "readyz_http_statuses": readyz_statuses,
            "readyz_never_unready": readyz_statuses == [200],
            "degraded_periods_s": [(round(a, 2), round(b, 2)) for a, b in periods],
            "degraded_total_s": round(sum(b - a for a, b in periods), 2),
            "redis_down_for_s": round(restart_t - stop_t, 2),
            "failed_requests_during_fault": sum(
                1 for s in main.samples if s.status != 200 and stop_t <= s.t < restart_t + 10
            ),
            "info_at_end": info_end,
            "redis_used_again": bool(
                info_end.get("keys", 0) > 0 and info_end.get("keyspace_hits", 0) > 0
            ),
        }
    )
    # the degraded period(s) of the fault itself, and any others (Redis up but a worker
    # marked it unavailable, e.g. after a socket timeout under load)
    of_fault = [(a, b) for a, b in periods if b > stop_t and a < restart_t + 5.0]
    others = [p for p in periods if p not in of_fault]
    fault["degraded_by_the_fault_s"] = round(sum(b - a for a, b in of_fault), 2)
    fault["degraded_while_redis_up"] = [(round(a, 2), round(b, 2)) for a, b in others]
    if of_fault:
        fault["degraded_detected_after_stop_s"] = round(of_fault[0][0] - stop_t, 2)
        fault["ready_again_after_restart_s"] = round(of_fault[-1][1] - restart_t, 2)
    record["redis_fault"] = fault
    record["timeline"] = redis_timeline  # Redis keys/hits and worker RSS, every second
    record["memory"] = {
        "rss_start_bytes": rss_start,
        "rss_end_bytes": rss_end,
        "growth_percent": {
            pid: round(100.0 * (rss_end[pid] - rss_start[pid]) / rss_start[pid], 2)
            for pid in workers
            if rss_start.get(pid)
        },
        "total_start_mib": round(sum(rss_start.values()) / 2**20, 1),
        "total_end_mib": round(sum(rss_end.values()) / 2**20, 1),
    }
    total_start = sum(rss_start.values())
    record["memory"]["rss_timeline_mib"] = [
        round(sum(e["rss_mib"].values()), 1) for e in redis_timeline[::10] if "rss_mib" in e
    ]
    growth = (sum(rss_end.values()) - total_start) / total_start if total_start else None
    record["memory"]["total_growth_percent"] = None if growth is None else round(100 * growth, 2)
    record["redis_info_start"] = info_start
    record["cache_metrics_end"] = cache_metrics(metrics_end)


# --------------------------------------------------------------------------- phase 4: corruption


def _predict(client: httpx.Client, seed: int, x: list[list[float]], k: int) -> dict[str, Any]:
    r = client.post("/predict", json={"inputs": x, "seed": seed, "num_samples": k})
    r.raise_for_status()
    body = r.json()
    return {"predictions": body["predictions"], "num_samples": body["num_samples"]}


def corrupt_value(kind: str, value: bytes, twin: bytes | None, rng: np.random.Generator) -> bytes:
    """``value`` (one cached block) damaged in the way ``kind`` names.

    ``twin`` is another valid entry for the same block: the foreign checkpoint's
    (``foreign``) or this checkpoint's for another seed (``other-stream``)."""
    b = bytearray(value)
    if kind == "truncate":
        return value[: len(value) // 2]
    if kind == "truncate-1":
        return value[:-1]
    if kind == "flip-payload":
        pos = HEADER_BYTES + int(rng.integers(0, len(b) - HEADER_BYTES - MAC_BYTES))  # codes
        b[pos] ^= 1 << int(rng.integers(0, 8))
        return bytes(b)
    if kind == "flip-header":
        pos = int(rng.integers(4, HEADER_BYTES))  # past the magic, inside the header
        b[pos] ^= 1 << int(rng.integers(0, 8))
        return bytes(b)
    if kind == "flip-mac":
        b[-1] ^= 0x01
        return bytes(b)
    if kind == "forged":  # same header, codes of the forger's choosing, MAC with their key
        forged = bytes(b[: len(b) - MAC_BYTES])
        forged = forged[:HEADER_BYTES] + bytes(len(forged) - HEADER_BYTES)
        return forged + hmac.digest(b"not the service's key", forged, "sha256")
    if kind in ("foreign", "other-stream"):
        if twin is None:
            raise RuntimeError(f"no entry to plant for {kind}")
        return twin
    if kind == "empty":
        return b""
    raise ValueError(kind)


CORRUPTIONS = (
    "truncate",
    "truncate-1",
    "flip-payload",
    "flip-header",
    "flip-mac",
    "forged",
    "foreign",
    "other-stream",
    "empty",
)


def code_keys(rc: Any, sha: str) -> dict[str, bytes]:
    """Every cached block of checkpoint ``sha``: ``{prefix}:codes:{sha}:{stream}:{block}``."""
    out: dict[str, bytes] = {}
    for key in rc.scan_iter(match=f"*:codes:{sha}:*", count=1000):
        value = rc.get(key)
        if value is not None:
            out[key.decode()] = value
    return out


def run_corruption(args: argparse.Namespace, tmp: Path, record: dict[str, Any]) -> None:
    ours = make_tiny_checkpoint(tmp / "ours.safetensors", seed=0, model_id="tiny-ours")
    theirs = make_tiny_checkpoint(tmp / "theirs.safetensors", seed=1, model_id="tiny-foreign")
    x = images(8, np.random.default_rng(5))
    k = 20  # two blocks per seed
    seeds = list(range(500, 500 + args.corrupt_seeds))
    plan = [(seed, CORRUPTIONS[i % len(CORRUPTIONS)]) for i, seed in enumerate(seeds)]
    no_lru = ["--local-cache-mb", "0", "--log-level", "warning"]
    env = server_env(args)

    # the clean reference: the same checkpoint, no Redis at all
    with (
        apd_serve(ours, args=no_lru, env=env, timeout=120) as clean,
        httpx.Client(base_url=clean.base_url, timeout=30) as c,
    ):
        reference = {seed: _predict(c, seed, x, k) for seed in seeds}

    redis = RedisServer()
    redis.start()
    out: dict[str, Any] = {"num_samples": k, "inputs": len(x), "cases": []}
    try:
        common = ["--redis-url", redis.url, *no_lru]
        rc = redis.client()
        # the foreign checkpoint (same architecture, other weights) caches the same streams
        args_theirs = [*common, "--workers", "1"]
        with (
            apd_serve(theirs, args=args_theirs, env=env, timeout=120) as other,
            httpx.Client(base_url=other.base_url, timeout=30) as c,
        ):
            theirs_sha = c.get("/v1/model").json()["sha256"]
            for seed in seeds:
                _predict(c, seed, x, k)
        foreign = code_keys(rc, theirs_sha)

        args_ours = [*common, "--workers", str(args.workers)]
        with (
            apd_serve(ours, args=args_ours, env=env, timeout=120) as srv,
            httpx.Client(base_url=srv.base_url, timeout=30) as c,
        ):
            ours_sha = c.get("/v1/model").json()["sha256"]
            first = {seed: _predict(c, seed, x, k) for seed in seeds}
            out["redis_answers_equal_clean"] = all(first[s] == reference[s] for s in seeds)
            good = code_keys(rc, ours_sha)
            out["our_keys"] = len(good)
            out["foreign_keys"] = len(foreign)
            before = scrape(srv.base_url)
            rng = np.random.default_rng(3)
            for seed, kind in plan:
                mine = sorted(key for key in good if f":seed-{seed}:" in key)
                case: dict[str, Any] = {"seed": seed, "corruption": kind, "keys": len(mine)}
                for key in mine:
                    if kind == "foreign":
                        twin = foreign.get(key.replace(ours_sha, theirs_sha))
                    else:  # our own entry for the same block of the next seed's stream
                        twin = good.get(key.replace(f":seed-{seed}:", f":seed-{seed + 1}:"))
                        twin = twin or good.get(key.replace(f":seed-{seed}:", f":seed-{seed - 1}:"))
                    rc.set(key, corrupt_value(kind, good[key], twin, rng))
                answer = _predict(c, seed, x, k)
                case["answer_equals_clean"] = answer == reference[seed]
                case["entries_redrawn"] = all(rc.get(key) == good[key] for key in mine)
                out["cases"].append(case)
            after = scrape(srv.base_url)
            out["metrics_before"] = cache_metrics(before)
            out["metrics_after"] = cache_metrics(after)
            corrupt_name = "apd_cache_corrupt_entries_total"
            counted = metric_sum(after, corrupt_name) - metric_sum(before, corrupt_name)
            out["corrupt_counted"] = counted
            out["keys_corrupted"] = sum(c["keys"] for c in out["cases"])
    finally:
        redis.cleanup()
    cases = out["cases"]
    out["all_detected_and_redrawn"] = bool(
        cases
        and all(c["keys"] > 0 and c["answer_equals_clean"] and c["entries_redrawn"] for c in cases)
        and out.get("corrupt_counted") == out.get("keys_corrupted")
    )
    record["cache_corruption"] = out


# --------------------------------------------------------------------------- report


def write_report(record: dict[str, Any], out_dir: Path, tag: str = "") -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"load{tag}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    (out_dir / f"load{tag}.md").write_text(render_markdown(record))


def render_markdown(r: dict[str, Any]) -> str:
    lines = ["# Load, Redis faults and cache corruption", ""]
    lines += [f"Produced by `{r['command']}` on {r['started_at']} ({r['machine']}).", ""]
    lines += [f"Server: `{r.get('serve_command', '?')}` (private redis-server on loopback).", ""]
    load = r.get("load", {})
    lat = load.get("latency_ms", {})
    lines += ["## Load", ""]
    lines += ["| figure | value |", "| --- | --- |"]
    ok, errors = load.get("ok"), load.get("errors")
    rps, ips = load.get("throughput_rps"), load.get("throughput_images_per_s")
    p50, p95, p99, pmax = (lat.get(q) for q in ("p50", "p95", "p99", "max"))
    lines += [
        f"| duration | {load.get('wall_s')} s |",
        f"| requests (ok / errors) | {load.get('requests')} ({ok} / {errors}) |",
        f"| throughput | {rps} req/s, {ips} images/s |",
        f"| latency p50 / p95 / p99 / max | {p50} / {p95} / {p99} / {pmax} ms |",
    ]
    mem = r.get("memory", {})
    lines += [
        f"| worker RSS start → end | {mem.get('total_start_mib')} → {mem.get('total_end_mib')} MiB "
        f"({mem.get('total_growth_percent')}%; per worker {mem.get('growth_percent')}) |",
    ]
    trend = mem.get("rss_timeline_mib")
    if trend:
        lines += ["", f"Worker RSS (MiB, all workers) every 10 s of the load: {trend}"]
    phases = r.get("load_by_phase", {})
    if phases:
        lines += ["", "By phase (Redis up, down, back):", ""]
        lines += ["| phase | requests | errors | req/s | p50 ms | p99 ms |"]
        lines += ["| --- | --- | --- | --- | --- | --- |"]
    for name, p in phases.items():
        pl = p["latency_ms"]
        cells = [name, p["requests"], p["errors"], p["throughput_rps"], pl["p50"], pl["p99"]]
        lines.append("| " + " | ".join(str(v) for v in cells) + " |")
    f = r.get("redis_fault", {})
    lines += ["", "## Redis stopped during the load", ""]
    if "stopped_at_s" not in f:
        lines += [
            "No Redis fault in this run (`--redis-stop-at -1`). Degraded periods seen by "
            f"`/readyz`: {f.get('degraded_periods_s')}; Redis at the end: {f.get('info_at_end')}."
        ]
    else:
        lines += _fault_lines(f)
    lines += _corruption_lines(r.get("cache_corruption"))
    lines += ["", f"Raw figures: `load{r.get('tag', '')}.json` beside this file.", ""]
    return "\n".join(lines)


def _fault_lines(f: dict[str, Any]) -> list[str]:
    return [
        f"- stopped at {f.get('stopped_at_s')} s, restarted (empty) at {f.get('restarted_at_s')} s "
        f"({f.get('redis_down_for_s')} s down)",
        "- failed requests from the stop to 10 s after the restart: "
        f"{f.get('failed_requests_during_fault')}",
        f"- `/readyz`: {f.get('readyz_polls')} polls, "
        f"HTTP statuses {f.get('readyz_http_statuses')}; "
        f"degraded periods {f.get('degraded_periods_s')} (total {f.get('degraded_total_s')} s)",
        f"- degraded because of the fault: {f.get('degraded_by_the_fault_s')} s, from "
        f"{f.get('degraded_detected_after_stop_s')} s after the stop to "
        f"{f.get('ready_again_after_restart_s')} s after the restart",
        f"- degraded while Redis was up (a worker gave up on it after a socket timeout): "
        f"{f.get('degraded_while_redis_up')}",
        f"- Redis at the end: {f.get('info_at_end')} → used again: {f.get('redis_used_again')}",
    ]


def _corruption_lines(cc: dict[str, Any] | None) -> list[str]:
    lines: list[str] = []
    if cc:
        lines += ["", "## Cache corruption", ""]
        lines += [
            f"K = {cc['num_samples']}, {cc['inputs']} inputs, fresh server with "
            "`--local-cache-mb 0` (every block read from Redis). Clean reference: the same "
            "checkpoint served without Redis.",
            "",
            "- answers through Redis equal the clean run before corruption: "
            f"{cc.get('redis_answers_equal_clean')}",
            "- our keys / the foreign checkpoint's keys in Redis: "
            f"{cc.get('our_keys')} / {cc.get('foreign_keys')}",
            "",
            "| seed | corruption | keys corrupted | answer equals clean | entries redrawn |",
            "| --- | --- | --- | --- | --- |",
        ]
        for c in cc["cases"]:
            cells = [c["seed"], c["corruption"], c["keys"], c["answer_equals_clean"]]
            cells.append(c["entries_redrawn"])
            lines.append("| " + " | ".join(str(v) for v in cells) + " |")
        lines += [
            "",
            f"`apd_cache_corrupt_entries_total` rose by {cc.get('corrupt_counted')} for "
            f"{cc.get('keys_corrupted')} corrupted entries.",
            "",
        ]
        verdict = cc.get("all_detected_and_redrawn")
        lines += [f"All detected, redrawn and none served: **{verdict}**"]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", type=Path, help="default: the shipped one, else a tiny one")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--duration", type=float, default=75.0, help="measured load, seconds (>= 60)")
    p.add_argument("--warmup", type=float, default=15.0)
    p.add_argument("--max-requests", type=int, default=100_000)
    p.add_argument("--bodies", type=int, default=256)
    p.add_argument("--num-seeds", type=int, default=24)
    p.add_argument("--local-cache-mb", type=float, default=32.0)
    p.add_argument("--redis-stop-at", type=float, default=25.0, help="-1: no fault")
    p.add_argument("--redis-down-for", type=float, default=15.0)
    p.add_argument("--redis-retry-wait", type=float, default=6.0)
    p.add_argument("--corrupt-seeds", type=int, default=12)
    p.add_argument("--skip-load", action="store_true")
    p.add_argument("--skip-corruption", action="store_true")
    p.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for apd serve, e.g. OPENBLAS_NUM_THREADS=1 (repeatable)",
    )
    p.add_argument("--tag", default="", help="suffix of the result files: load<tag>.json/.md")
    p.add_argument("--quick", action="store_true", help="smoke run: print, write nothing")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.duration < 60 and not args.quick:
        p.error("--duration must be at least 60 s for a recorded run (or pass --quick)")

    record: dict[str, Any] = {
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "loadavg_start": os.getloadavg(),
        "tag": args.tag,
    }
    with tempfile.TemporaryDirectory(prefix="apd-load-") as tmpdir:
        tmp = Path(tmpdir)
        checkpoint = args.checkpoint
        if checkpoint is None:
            shipped = SHIPPED.is_file()
            checkpoint = SHIPPED if shipped else make_tiny_checkpoint(tmp / "tiny.safetensors")
        record["checkpoint"] = str(checkpoint)
        if not args.skip_load:
            run_load(args, checkpoint, record)
        if not args.skip_corruption:
            print("cache corruption ...", flush=True)
            run_corruption(args, tmp, record)
    record["loadavg_end"] = os.getloadavg()
    text = render_markdown(record)
    print(text)
    if not args.quick:
        write_report(record, args.out, args.tag)
        print(f"wrote {args.out}/load{args.tag}.json and load{args.tag}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
