"""Attacks on a real ``apd serve``, as a hostile client and a hostile cache writer would make
them, with what each costs the worker and the other clients.

    python benchmarks/attacks.py            # every attack, about 3 minutes; writes the record
    python benchmarks/attacks.py --quick    # a smoke run, results not written

The server is ``apd serve`` on loopback with the shipped checkpoint and the settings compose
gives it (one worker, ``APD_MEMORY_BUDGET_MB=384``, ``APD_CACHE_TTL_S=86400``,
``APD_SHUTDOWN_GRACE_S=20``, a Redis and an HMAC key; every other setting its default).
While each attack runs, three probes sample the worker: its resident memory every 10 ms, the
latency of ``GET /v2/health/live`` every 50 ms, and a bystander that sends a small ``/predict``
(one image, K 10) every 100 ms and records its status and latency. The attacks:

1. four concurrent 8 MB JSON bodies of each costly shape (``tests/attack_support.py``): an
   object of 700,000 keys, ``{"inputs":[[],[],...]}``, nesting 4 M deep, one 8 MB string,
   4 M numbers in one example; on ``/predict``, and the first two on V2 ``infer``;
2. 100 connections that send a request's headers and no body, then 30 small ``/predict``;
3. 200 clients sending a body at 1 KB/s each (for at most 12 s);
4. huge-pixel PNGs on ``/predict/image``: one of 16,777,216 x 1 pixels (16 KB), and 256
   solid 4096 x 4096 ones (6.5 MB);
5. values of 80 MiB planted in Redis under the keys of three seeds' first blocks, then two
   requests for each seed;
6. SIGTERM while a large request computes and three clients are stalled mid-body: time to
   exit, and the large request's status.

Beside them, in this process, what parsing and checking a body of 256 examples of 784 values
of each shape costs (Python's allocations, ``tracemalloc`` peak), against the bound that
admission reserves for it (:meth:`service.infra.admission.ParseLimits.parse_bytes`).

Writes ``benchmarks/results/attacks.json`` and ``attacks.md`` (command, code revision, date,
load averages).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import platform
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from service.config import SHIPPED_CHECKPOINT  # noqa: E402
from tests.attack_support import (  # noqa: E402
    MB,
    connect,
    hostile_bodies,
    idle_connections,
    multipart,
    png,
    read_status,
    request_head,
    small_predict_body,
)
from tests.harness import (  # noqa: E402
    TEST_HMAC_KEY,
    ServeProcess,
    apd_serve,
    redis_server,
    rss_bytes,
)
from training.revision import code_revision  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
COMPOSE_ENV = {
    "APD_WORKERS": "1",
    "APD_CACHE_TTL_S": "86400",
    "APD_MEMORY_BUDGET_MB": "384",
    "APD_SHUTDOWN_GRACE_S": "20",
}
JSON = {"content-type": "application/json"}


class Probes:
    """Samples a worker while an attack runs: RSS, liveness latency, a bystander's requests."""

    def __init__(self, srv: ServeProcess, pid: int) -> None:
        self.srv, self.pid = srv, pid
        self.stop = threading.Event()
        self.rss: list[int] = []
        self.live: list[float] = []
        self.live_failed = 0
        self.bystander: list[tuple[int, float]] = []
        self.threads = [threading.Thread(target=f) for f in (self._rss, self._live, self._by)]

    def _rss(self) -> None:
        while not self.stop.is_set():
            self.rss.append(rss_bytes(self.pid))
            self.stop.wait(0.01)

    def _live(self) -> None:
        with httpx.Client(timeout=10) as http:
            while not self.stop.is_set():
                t0 = time.perf_counter()
                try:
                    http.get(self.srv.base_url + "/v2/health/live").raise_for_status()
                    self.live.append(time.perf_counter() - t0)
                except httpx.HTTPError:
                    self.live_failed += 1
                self.stop.wait(0.05)

    def _by(self) -> None:
        body = small_predict_body()
        with httpx.Client(timeout=30) as http:
            while not self.stop.is_set():
                t0 = time.perf_counter()
                try:
                    status = http.post(
                        self.srv.base_url + "/predict", content=body, headers=JSON
                    ).status_code
                except httpx.HTTPError:
                    status = 0
                self.bystander.append((status, time.perf_counter() - t0))
                self.stop.wait(0.1)

    def __enter__(self) -> Probes:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def figures(self, base_rss: int) -> dict[str, Any]:
        by_ms = [t * 1e3 for _, t in self.bystander]
        return {
            "rss_peak_mib": round(max(self.rss, default=0) / MB, 1),
            "rss_over_idle_mib": round((max(self.rss, default=0) - base_rss) / MB, 1),
            "live_max_ms": round(max(self.live, default=0) * 1e3, 1),
            "live_p50_ms": round(statistics.median(self.live) * 1e3, 1) if self.live else None,
            "live_failed": self.live_failed,
            "bystander_statuses": dict(Counter(str(s) for s, _ in self.bystander)),
            "bystander_p50_ms": round(statistics.median(by_ms), 1) if by_ms else None,
            "bystander_max_ms": round(max(by_ms), 1) if by_ms else None,
        }


def parse_costs() -> list[dict[str, Any]]:
    """Peak Python allocations of parsing and validating a ``/predict`` body of each shape
    (as the route does: :func:`service.codecs.inputs.parse_json_body`, then the request model),
    beside :meth:`ParseLimits.parse_bytes` for it."""
    import tracemalloc

    from pydantic import ValidationError

    from service.codecs.inputs import DEFAULT_INPUT, parse_json_body, serving
    from service.codecs.schemas import PredictRequest
    from service.infra.admission import JsonShape, ParseLimits

    rng = np.random.default_rng(0)
    x = rng.random((256, 784))
    shapes: dict[str, Any] = {
        "floats, 4 digits": x.round(4).tolist(),
        "floats, 17 digits": x.tolist(),
        "floats, nested 28 x 28": x.reshape(256, 28, 28).round(3).tolist(),
        "nulls": [[None] * 784] * 256,
        "true": [[True] * 784] * 256,
        "1-character strings": [["a"] * 784] * 256,
        "36-character strings": [["a" * 36] * 784] * 256,
        "one flat list of 200,694 floats": [[0.5] * (256 * 784 - 10)],
    }
    rows = []
    for name, inputs in shapes.items():
        body = json.dumps({"inputs": inputs}).encode()
        found = JsonShape.scan(body)
        tracemalloc.start()
        t0 = time.perf_counter()
        with serving(DEFAULT_INPUT), contextlib.suppress(ValidationError):
            PredictRequest.model_validate(parse_json_body(body))
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        rows.append({
            "shape": name, "body_mb": round(len(body) / 1e6, 2), "values": found.values,
            "peak_mb": round(peak / 1e6, 1),
            "bound_mb": round(ParseLimits.parse_bytes(found, len(body)) / 1e6, 1),
            "seconds": round(seconds, 3),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def post_many(url: str, bodies: list[bytes], headers: dict[str, str]) -> list[int]:
    def one(body: bytes) -> int:
        try:
            return httpx.post(url, content=body, headers=headers, timeout=120).status_code
        except httpx.HTTPError:
            return 0

    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(one, bodies))


def attack_json(srv: ServeProcess, model: str, quick: bool) -> list[dict[str, Any]]:
    rows = []
    bodies = hostile_bodies()
    cases = [(name, "/predict") for name in bodies]
    cases += [(name, f"/v2/models/{model}/infer") for name in list(bodies)[:2]]
    for name, path in cases[:2] if quick else cases:

        def run(body: bytes = bodies[name], path: str = path) -> dict[str, Any]:
            return {"statuses": post_many(srv.base_url + path, [body] * 4, JSON)}

        rows.append(measure(srv, f"4 x 8 MB: {name}", path, run))
    return rows


def baseline() -> dict[str, Any]:
    time.sleep(3)
    return {}


def attack_idle(srv: ServeProcess) -> dict[str, Any]:
    def run() -> dict[str, Any]:
        body = small_predict_body(seed=5)
        out: list[tuple[int, float]] = []
        with idle_connections(srv.port, 100), httpx.Client(timeout=30) as http:
            for _ in range(30):
                t0 = time.perf_counter()
                r = http.post(srv.base_url + "/predict", content=body, headers=JSON)
                out.append((r.status_code, time.perf_counter() - t0))
        return {
            "small_requests": dict(Counter(str(s) for s, _ in out)),
            "small_max_ms": round(max(t for _, t in out) * 1e3, 1),
        }

    return measure(srv, "100 idle connections (headers, no body), then 30 small", "/predict", run)


def attack_slow(srv: ServeProcess, quick: bool) -> dict[str, Any]:
    clients, seconds, rate = (50, 6.0, 1024) if quick else (200, 12.0, 1024)

    def run() -> dict[str, Any]:
        x = np.round(np.random.default_rng(0).random((16, 784)), 3).tolist()
        body = json.dumps({"inputs": x, "num_samples": 10}).encode()  # ~100 KB
        socks = []
        try:
            for _ in range(clients):
                s = connect(srv.port)
                s.sendall(request_head("/predict", len(body)))
                socks.append(s)
            sent = [0] * clients
            step = rate // 10
            alive = set(range(clients))
            until = time.monotonic() + seconds
            while alive and time.monotonic() < until:
                for i in list(alive):
                    try:
                        socks[i].sendall(body[sent[i] : sent[i] + step])
                        sent[i] += step
                    except OSError:
                        alive.discard(i)
                time.sleep(0.1)
            statuses = Counter(str(read_status(s, timeout=5)) for s in socks)
        finally:
            for s in socks:
                with contextlib.suppress(OSError):
                    s.close()
        return {
            "senders": clients,
            "rate_bytes_s": rate,
            "sent_bytes_max": max(sent),
            "sender_statuses": dict(statuses),
            "cut_off_after_s": seconds - (until - time.monotonic()) if not alive else seconds,
        }

    return measure(srv, f"{clients} slow senders at 1 KB/s", "/predict", run)


def attack_pixels(srv: ServeProcess, quick: bool) -> list[dict[str, Any]]:
    rows = []
    cases = [("one 16,777,216 x 1 PNG", [png(16_777_216, 1)])]
    if not quick:
        cases.append(("256 solid 4096 x 4096 PNGs", [png(4096, 4096)] * 256))
    for name, files in cases:
        body, ctype = multipart(files)

        def run(body: bytes = body, ctype: str = ctype) -> dict[str, Any]:
            t0 = time.perf_counter()
            r = httpx.post(srv.base_url + "/predict/image", content=body,
                           headers={"content-type": ctype}, timeout=120)  # fmt: skip
            return {
                "statuses": [r.status_code],
                "answer_ms": round((time.perf_counter() - t0) * 1e3, 1),
                "body_bytes": len(body),
                "detail": r.json().get("message"),
            }

        rows.append(measure(srv, name, "/predict/image", run))
    return rows


def metric(srv: ServeProcess, name: str) -> float:
    text = httpx.get(srv.base_url + "/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


def attack_redis(srv: ServeProcess, redis_client: Any, sha: str, quick: bool) -> dict[str, Any]:
    seeds = [9001, 9002, 9003]
    size = (8 if quick else 80) * MB

    # Planted before the probes start: writing 240 MiB into a Redis on this machine is the
    # attacker's cost, not the server's.
    for seed in seeds:
        redis_client.set(f"apd:codes:{sha}:seed-{seed}:0", b"\0" * size)

    def run() -> dict[str, Any]:
        corrupt0 = metric(srv, "apd_cache_corrupt_entries_total")
        rounds = []
        for _ in range(2):
            times, statuses = [], []
            for seed in seeds:
                t0 = time.perf_counter()
                body = small_predict_body(seed=seed)
                r = httpx.post(srv.base_url + "/predict", content=body, headers=JSON, timeout=30)
                times.append(time.perf_counter() - t0)
                statuses.append(r.status_code)
            rounds.append({"statuses": statuses, "max_ms": round(max(times) * 1e3, 1)})
        lengths = [redis_client.strlen(f"apd:codes:{sha}:seed-{s}:0") for s in seeds]
        return {
            "planted_mib": size / MB,
            "first_round": rounds[0],
            "second_round": rounds[1],
            "corrupt_counted": metric(srv, "apd_cache_corrupt_entries_total") - corrupt0,
            "redis_after": httpx.get(srv.base_url + "/readyz", timeout=5).json()["redis"],
            "entry_bytes_after": lengths,
        }

    return measure(srv, f"3 x {size // MB} MiB planted in Redis", "/predict", run)


def measure(
    srv: ServeProcess, name: str, path: str, run: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    pid = srv.worker_pids()[0]
    time.sleep(0.5)
    base = rss_bytes(pid)
    t0 = time.perf_counter()
    with Probes(srv, pid) as probes:
        time.sleep(0.3)
        result = run()
        time.sleep(0.3)
    row = {"attack": name, "path": path, "seconds": round(time.perf_counter() - t0, 2)}
    row |= result | probes.figures(base) | {"rss_idle_mib": round(base / MB, 1)}
    print(json.dumps(row), flush=True)
    return row


def attack_sigterm(env: dict[str, str], ckpt: Path) -> dict[str, Any]:
    """SIGTERM while a large request computes and three clients are stalled mid-body."""
    x = np.round(np.random.default_rng(1).random((256, 784)), 3).tolist()
    big = json.dumps({"inputs": x, "num_samples": 1000, "seed": 77}).encode()
    with apd_serve(ckpt, env=env, timeout=120) as srv:
        result: dict[str, Any] = {}

        def compute() -> None:
            t0 = time.perf_counter()
            try:
                r = httpx.post(srv.base_url + "/predict", content=big, headers=JSON, timeout=60)
                result["in_flight_status"] = r.status_code
            except httpx.HTTPError as exc:
                result["in_flight_status"] = type(exc).__name__
            result["in_flight_s"] = round(time.perf_counter() - t0, 2)

        with idle_connections(srv.port, 3, length=5000, body=b'{"inputs": [[0.1,'):
            worker = threading.Thread(target=compute)
            worker.start()
            time.sleep(0.3)  # the large request is in (its body sent), computing
            t0 = time.perf_counter()
            srv.proc.send_signal(signal.SIGTERM)
            srv.proc.wait(timeout=60)
            result["exit_s"] = round(time.perf_counter() - t0, 2)
            result["exit_status"] = srv.proc.returncode
            worker.join()
    row = {"attack": "SIGTERM with 3 stalled clients and 1 request computing"} | result
    print(json.dumps(row), flush=True)
    return row


@contextlib.contextmanager
def served(ckpt: Path, redis_url: str) -> Iterator[ServeProcess]:
    env = COMPOSE_ENV | {"APD_REDIS_URL": redis_url, "APD_CACHE_HMAC_KEY": TEST_HMAC_KEY}
    with apd_serve(ckpt, env=env, timeout=120) as srv:
        yield srv


def write(record: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "attacks.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        "# Attacks on `apd serve`",
        "",
        f"Recorded {record['created_at']} by `{record['command']}`, code "
        f"{record['code_revision'][:12]}, on {record['machine']}; 1-minute load average "
        f"{record['loadavg_start'][0]:.2f} at the start, {record['loadavg_end'][0]:.2f} at the "
        "end (a 2-core machine shared with other work). Server: the shipped checkpoint, one "
        "worker, compose's settings (`APD_MEMORY_BUDGET_MB=384`, `APD_SHUTDOWN_GRACE_S=20`, "
        "Redis with an HMAC key), every other setting its default. Probes while each attack "
        "runs: the worker's RSS every 10 ms, `GET /v2/health/live` every 50 ms, a bystander's "
        "small `/predict` (1 image, K 10) every 100 ms. Method: `benchmarks/attacks.py`.",
        "",
        "| attack | path | attack's answers | RSS peak MiB (idle) | liveness max / p50 ms "
        "| bystander statuses | bystander p50 / max ms |",
        "| --- | --- | --- | ---: | ---: | --- | ---: |",
    ]
    for row in record["attacks"]:
        answers = row.get("statuses") or row.get("small_requests") or row.get("sender_statuses")
        answers = answers or "-"
        if "first_round" in row:
            answers = {"first": row["first_round"]["statuses"],
                       "second": row["second_round"]["statuses"]}  # fmt: skip
        if isinstance(answers, list):
            answers = dict(Counter(str(s) for s in answers))
        lines.append(
            f"| {row['attack']} | `{row['path']}` | {json.dumps(answers)} "
            f"| {row['rss_peak_mib']} ({row['rss_idle_mib']}) "
            f"| {row['live_max_ms']} / {row['live_p50_ms']} "
            f"| {json.dumps(row['bystander_statuses'])} "
            f"| {row['bystander_p50_ms']} / {row['bystander_max_ms']} |"
        )
    by_name = {r["attack"]: r for r in record["attacks"]}
    idle = next(r for n, r in by_name.items() if n.startswith("100 idle"))
    slow = next(r for n, r in by_name.items() if "slow senders" in n)
    redis = next(r for n, r in by_name.items() if "planted" in n)
    stop = record["sigterm"]
    lines += [
        "",
        f"* 100 idle connections: the 30 small requests sent meanwhile were answered "
        f"{json.dumps(idle['small_requests'])}, the slowest in {idle['small_max_ms']} ms.",
        f"* {slow['senders']} slow senders (1 KB/s): answered {json.dumps(slow['sender_statuses'])}"
        f" (408: cut off by rate after `body_grace_s`; 0: no answer read in time).",
        f"* Redis: 3 values of {redis['planted_mib']:g} MiB planted; first round "
        f"{redis['first_round']['statuses']} (slowest {redis['first_round']['max_ms']} ms), "
        f"second {redis['second_round']['statuses']} (slowest "
        f"{redis['second_round']['max_ms']} ms); {redis['corrupt_counted']:g} entries counted "
        f"corrupt, rewritten to {redis['entry_bytes_after']} bytes; Redis "
        f"`{redis['redis_after']}` after.",
        f"* SIGTERM with 3 clients stalled mid-body and one request of 256 images x K 1000 "
        f"computing: exited in {stop['exit_s']} s (status {stop['exit_status']}: uvicorn "
        f"re-raises SIGTERM after its shutdown); the computing request got "
        f"{stop['in_flight_status']} after {stop['in_flight_s']} s.",
        "",
    ]
    lines += [
        "Parsing and checking a `/predict` body of 256 examples of 784 values (the most a "
        "body may hold with `max_batch` 256), in process: peak of Python's allocations "
        "(`tracemalloc`) against what admission reserves for it (`ParseLimits.parse_bytes`: "
        "128 bytes a value + 12 x the body).",
        "",
        "| shape | body MB | values | peak MB | reserved MB | seconds |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in record["parse_costs"]:
        lines.append(
            f"| {c['shape']} | {c['body_mb']} | {c['values']} | {c['peak_mb']} "
            f"| {c['bound_mb']} | {c['seconds']} |"
        )
    lines.append("")
    (RESULTS / "attacks.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller attacks, nothing written")
    args = parser.parse_args(argv)
    ckpt = ROOT / SHIPPED_CHECKPOINT
    record: dict[str, Any] = {
        "command": "python benchmarks/attacks.py" + (" --quick" if args.quick else ""),
        "code_revision": code_revision(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "loadavg_start": os.getloadavg(),
        "settings": COMPOSE_ENV,
    }
    import redis

    from apd.checkpoint import load_checkpoint

    sha = load_checkpoint(ckpt).sha256
    with redis_server() as rs, served(ckpt, rs.url) as srv:
        model = httpx.get(srv.base_url + "/v1/model", timeout=10).json()["id"]
        attacks = [measure(srv, "none (baseline)", "-", baseline)]
        attacks += attack_json(srv, model, args.quick)
        attacks.append(attack_idle(srv))
        attacks.append(attack_slow(srv, args.quick))
        attacks += attack_pixels(srv, args.quick)
        client = redis.Redis.from_url(rs.url)
        attacks.append(attack_redis(srv, client, sha, args.quick))
        client.close()
    record["attacks"] = attacks
    record["sigterm"] = attack_sigterm(COMPOSE_ENV | {"APD_REDIS_URL": ""}, ckpt)
    record["parse_costs"] = parse_costs()
    record["loadavg_end"] = os.getloadavg()
    if not args.quick:
        write(record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
