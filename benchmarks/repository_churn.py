"""The model repository under churn: versions appear, fail and disappear under a steady load.

``apd serve --model-repository DIR --default-model a --grpc-port P --workers 2`` starts with
model ``a`` version 1. Clients keep sending requests the whole time: HTTP ``POST /predict``
without a version (half of them without ``"model"``, half with ``"model": "a"``) and, when
``tritonclient[grpc]`` is importable, gRPC ModelInfer on ``a`` without a version. Meanwhile,
in order:

1. version 2 of ``a`` is copied in the way a careless operator does: the file written into
   ``DIR/a/2/`` slowly, in chunks (``--copy-s``); it must not be read before it is complete
   (never UNAVAILABLE), then become READY and, within ``--within-s``, take every request
   without a version;
2. version 3, whose file is corrupt (a truncated checkpoint, moved in whole), must show
   UNAVAILABLE with a reason in ``POST /v2/repository/index`` and change nothing else;
3. version 1 is deleted: it must leave the index and its routes (404);
4. model ``b`` version 1 is added (moved in whole): READY, and answered by name.

Then, for ``a`` version 2 and ``b`` version 1 with a seed: ``/predict``, V2 REST infer
(``tritonclient.http``) and V2 gRPC infer (``tritonclient.grpc``) must give the same
probabilities and scores (float32 tolerance). Every expectation that fails is listed; the run
fails if any does, or if any request without a version failed (a non-2xx answer or no
answer). Index states are polled on fresh connections (so both workers answer), and a state
counts once seen on 3 polls in a row. Writes ``benchmarks/results/repository_churn.{md,json}``.

    python benchmarks/repository_churn.py [--copy-s 8] [--within-s 15] [--workers 2]

:func:`churn` is also run, shorter, by ``tests/test_repository_churn.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

ROOT: Final = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from servebench import (  # noqa: E402
    RESULTS,
    header,
    header_lines,
    mnist_test_digits,
    require_flags,
    require_route,
    uptime,
)

CHECKPOINT: Final = "model.safetensors"
OUTPUTS: Final = ("probabilities", "mutual_information", "predictive_entropy", "model_variance")
RTOL, ATOL = 1e-5, 1e-6  # float32 numbers through JSON and binary tensors
STABLE_POLLS: Final = 3
FAILURE_PAUSE_S: Final = 0.05  # a client pauses after a failure (each is counted), not spins


@dataclass(frozen=True)
class ChurnConfig:
    http_clients: int = 4
    grpc_clients: int = 2
    copy_s: float = 8.0  # the careless copy of version 2 takes this long (> a poll interval)
    within_s: float = 15.0  # a version appears (READY / UNAVAILABLE) or goes within this
    settle_s: float = 2.0  # load alone before the first step and after the last
    num_samples: int = 20
    seed: int = 1234
    workers: int = 2
    grpc: bool = True  # gRPC clients and checks, when tritonclient.grpc is importable
    server_args: tuple[str, ...] = ()  # more apd serve flags (a shorter poll interval)


@dataclass
class Answer:
    t: float
    client: str  # "http-default", "http-a" or "grpc-a"
    ok: bool
    status: str  # HTTP status, gRPC status name, or the exception's type
    version: str = ""  # the repository_version that answered ("" unless the answer says)
    error: str = ""


@dataclass
class Log:
    started: float = field(default_factory=time.monotonic)
    answers: list[Answer] = field(default_factory=list)
    polls: list[tuple[float, dict[str, tuple[str, str]]]] = field(default_factory=list)
    problems: dict[str, list[str]] = field(default_factory=lambda: {"http": [], "grpc": []})
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def now(self) -> float:
        return time.monotonic() - self.started

    def expect(self, ok: bool, problem: str, about: str = "http") -> bool:
        """Note ``problem`` unless ``ok``; ``about``: "http" (REST and the repository) or
        "grpc" (the gRPC binding)."""
        if not ok:
            self.problems[about].append(problem)
            print(f"  FAILED ({about}): {problem}", flush=True)
        return ok


@functools.cache
def inputs() -> tuple[np.ndarray, str]:
    """The images every client sends: MNIST test digits where ``APD_DATA_DIR`` has them,
    else random images (the answers are compared between protocols, not with labels)."""
    try:
        return mnist_test_digits()[0][:512], "MNIST test digits"
    except SystemExit:
        from tests.service_support import random_images

        return random_images(512), "random images (no MNIST in APD_DATA_DIR)"


def grpc_available() -> bool:
    """Whether ``tritonclient.grpc`` imports (it needs ``tritonclient[grpc]``: grpcio)."""
    try:
        import tritonclient.grpc  # noqa: F401
    except ImportError:
        return False
    return True


# --- the repository, as an operator changes it ----------------------------------------------


def small_checkpoint(path: Path, seed: int) -> Path:
    from tests.service_support import make_checkpoint

    path.parent.mkdir(parents=True, exist_ok=True)
    return make_checkpoint(path, seed=seed, model_id=f"churn-{seed}")


def careless_copy(src: Path, dst: Path, seconds: float, chunk: int = 64 * 1024) -> None:
    """``dst`` written from ``src`` in ``chunk``-byte pieces over about ``seconds``, flushed
    after each, into a version directory created first (what ``cp`` over a slow link does)."""
    data = src.read_bytes()
    pieces = max(1, -(-len(data) // chunk))
    dst.parent.mkdir(parents=True)
    with dst.open("wb") as f:
        for i in range(pieces):
            f.write(data[i * chunk : (i + 1) * chunk])
            f.flush()
            os.fsync(f.fileno())
            time.sleep(seconds / pieces)


def move_in(src: Path, version_dir: Path) -> None:
    """A finished version directory renamed into place at once."""
    staging = src.parent / f"staging-{version_dir.parent.name}-{version_dir.name}"
    staging.mkdir()
    shutil.copyfile(src, staging / CHECKPOINT)
    version_dir.parent.mkdir(parents=True, exist_ok=True)
    os.rename(staging, version_dir)


def corrupt_copy(src: Path, dst: Path) -> None:
    """The first half of a valid checkpoint: a header that promises more than the file holds."""
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])


# --- load -----------------------------------------------------------------------------------


def http_load(base_url: str, log: Log, stop: threading.Event, cfg: ChurnConfig) -> None:
    """``cfg.http_clients`` closed-loop clients until ``stop``: even ones send no
    ``"model"``, odd ones ``"model": "a"``; clients 2 and 3 of every 4 open a connection per
    request (so that every worker takes requests), the others keep theirs."""
    import httpx

    x, _ = inputs()

    async def client(i: int) -> None:
        kind = "http-default" if i % 2 == 0 else "http-a"
        headers = {"content-type": "application/json"}
        if i % 4 >= 2:
            headers["connection"] = "close"
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as c:
            n = 0
            while not stop.is_set():
                payload: dict[str, Any] = {
                    "inputs": np.round(x[(i * 997 + n) % len(x)][None], 4).tolist(),
                    "num_samples": cfg.num_samples,
                }
                if kind == "http-a":
                    payload["model"] = "a"
                n += 1
                t = log.now()
                try:
                    r = await c.post("/predict", content=json.dumps(payload), headers=headers)
                    ok = 200 <= r.status_code < 300
                    version = (
                        str(r.json().get("model", {}).get("repository_version", "")) if ok else ""
                    )
                    a = Answer(t, kind, ok, str(r.status_code), version, "" if ok else r.text[:200])
                except (httpx.HTTPError, ValueError) as exc:
                    a = Answer(t, kind, False, type(exc).__name__, error=str(exc)[:200])
                with log.lock:
                    log.answers.append(a)
                if not a.ok:
                    await asyncio.sleep(FAILURE_PAUSE_S)

    async def all_clients() -> None:
        await asyncio.gather(*(client(i) for i in range(cfg.http_clients)))

    asyncio.run(all_clients())


def grpc_load(grpc_url: str, log: Log, stop: threading.Event, cfg: ChurnConfig, i: int) -> None:
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    x, _ = inputs()
    with tg.InferenceServerClient(grpc_url) as c:
        n = 0
        while not stop.is_set():
            inp = tg.InferInput("input", [1, 784], "FP32")
            inp.set_data_from_numpy(np.ascontiguousarray(x[(i * 991 + n) % len(x)][None]))
            n += 1
            t = log.now()
            try:
                r = c.infer(
                    "a", [inp], parameters={"num_samples": cfg.num_samples}, client_timeout=30
                )
                ok = r.as_numpy("probabilities") is not None
                version = str(r.get_response().model_version)
                a = Answer(t, "grpc-a", ok, "OK" if ok else "no probabilities", version)
            except InferenceServerException as exc:
                a = Answer(t, "grpc-a", False, str(exc.status()), error=str(exc)[:200])
            with log.lock:
                log.answers.append(a)
            if not a.ok:
                time.sleep(FAILURE_PAUSE_S)


# --- the index ------------------------------------------------------------------------------


def index(base_url: str) -> dict[str, tuple[str, str]]:
    """``{"name/version": (state, reason)}`` from ``POST /v2/repository/index``, on a fresh
    connection."""
    import httpx

    r = require_route(
        httpx.post(base_url + "/v2/repository/index", json={}, timeout=10),
        "the model repository's index (issue #23) is not served",
    )
    r.raise_for_status()
    return {f"{e['name']}/{e['version']}": (e["state"], e.get("reason", "")) for e in r.json()}


def watch_index(base_url: str, log: Log, stop: threading.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(Exception):
            entries = index(base_url)
            with log.lock:
                log.polls.append((log.now(), entries))
        stop.wait(0.2)


def wait_for(
    log: Log, what: str, test: Callable[[dict[str, tuple[str, str]]], bool], within_s: float
) -> float | None:
    """Seconds until ``test`` held on :data:`STABLE_POLLS` polls in a row (the first of them),
    or None after ``within_s``."""
    t0 = log.now()
    while log.now() - t0 < within_s + 1.0:
        with log.lock:
            recent = [p for p in log.polls if p[0] >= t0]
        run_start: float | None = None
        streak = 0
        for t, entries in recent:
            if test(entries):
                run_start = t if streak == 0 else run_start
                streak += 1
                if streak >= STABLE_POLLS and run_start is not None:
                    return run_start - t0
            else:
                streak = 0
        time.sleep(0.1)
    log.expect(False, f"{what}: not seen within {within_s} s")
    return None


def states_seen(log: Log, key: str, t_from: float, t_to: float) -> list[str]:
    with log.lock:
        seen = [p[1].get(key, ("absent", ""))[0] for p in log.polls if t_from <= p[0] <= t_to]
    return [s for i, s in enumerate(seen) if i == 0 or seen[i - 1] != s]


# --- answers compared across protocols --------------------------------------------------------


def rest_predict(base_url: str, model: str, version: str, x: np.ndarray, cfg: ChurnConfig) -> Any:
    import httpx

    body = {
        "inputs": x.tolist(),
        "model": model,
        "version": version,
        "seed": cfg.seed,
        "num_samples": cfg.num_samples,
    }
    r = httpx.post(base_url + "/predict", json=body, timeout=30)
    r.raise_for_status()
    preds = r.json()["predictions"]
    out = {"probabilities": np.array([p["probabilities"] for p in preds], np.float32)}
    for name in OUTPUTS[1:]:
        out[name] = np.array([p["uncertainty"][name] for p in preds], np.float32)
    return out


def triton_infer(
    module: Any, url: str, model: str, version: str, x: np.ndarray, cfg: ChurnConfig
) -> Any:
    inp = module.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(np.ascontiguousarray(x, np.float32))
    with module.InferenceServerClient(url) as c:
        r = c.infer(
            model,
            [inp],
            model_version=version,
            parameters={"seed": cfg.seed, "num_samples": cfg.num_samples},
        )
    return {name: r.as_numpy(name) for name in OUTPUTS}


def agreement(
    base_url: str, grpc_url: str | None, model: str, version: str, log: Log, cfg: ChurnConfig
) -> dict[str, Any]:
    import tritonclient.http as th

    x, _ = inputs()
    x = x[:4]
    answers = {
        "rest_predict": rest_predict(base_url, model, version, x, cfg),
        "v2_rest_tritonclient_http": triton_infer(
            th, base_url.removeprefix("http://"), model, version, x, cfg
        ),
    }
    if grpc_url is not None:
        import tritonclient.grpc as tg
        from tritonclient.utils import InferenceServerException

        try:
            answers["v2_grpc_tritonclient_grpc"] = triton_infer(
                tg, grpc_url, model, version, x, cfg
            )
        except InferenceServerException as exc:
            log.expect(False, f"gRPC infer {model}/{version}: {exc}", "grpc")
    ref = answers["rest_predict"]
    worst: dict[str, float] = {}
    for name, ans in answers.items():
        if name == "rest_predict":
            continue
        for out in OUTPUTS:
            got = np.asarray(ans[out], np.float32).reshape(ref[out].shape)
            worst[f"{name}.{out}"] = float(np.max(np.abs(got - ref[out])))
            log.expect(
                np.allclose(got, ref[out], rtol=RTOL, atol=ATOL),
                f"{model}/{version} seed {cfg.seed}: {name} {out} differs from /predict by "
                f"{worst[f'{name}.{out}']:.3g}",
                "grpc" if "grpc" in name else "http",
            )
    return {"protocols": list(answers), "max_abs_difference": worst}


# --- the run ---------------------------------------------------------------------------------


def protocol(client: str) -> str:
    return client.split("-", 1)[0]


def defaults_after(log: Log, t_from: float, expected: str, when: str) -> None:
    """Every request without a version sent after ``t_from`` answered by version ``expected``
    (over HTTP and over gRPC, each judged on its own)."""
    with log.lock:
        window = [a for a in log.answers if a.t >= t_from]
    for proto in sorted({protocol(a.client) for a in window} | {"http"}):
        mine = [a for a in window if protocol(a.client) == proto]
        versions = sorted({a.version for a in mine if a.ok})
        failed = sum(not a.ok for a in mine)
        log.expect(
            bool(mine) and versions == [expected] and not failed,
            f"{when}: {len(mine)} {proto} requests without a version, answered by versions "
            f"{versions} (expected {expected!r}), {failed} failed",
            proto,
        )


def eventually(check: Callable[[], tuple[bool, str]], within_s: float) -> tuple[float | None, str]:
    """Seconds until ``check()`` first holds (it returns ``(ok, what it saw)``), or None with
    what it last saw after ``within_s``: with several workers, each polls the repository on
    its own, so a change reaches them within one poll interval of each other."""
    t0 = time.monotonic()
    while True:
        ok, seen = check()
        if ok:
            return round(time.monotonic() - t0, 2), seen
        if time.monotonic() - t0 > within_s:
            return None, seen
        time.sleep(0.2)


@contextlib.contextmanager
def load(base_url: str, grpc_url: str | None, log: Log, cfg: ChurnConfig) -> Iterator[None]:
    stop = threading.Event()
    threads = [
        threading.Thread(target=http_load, args=(base_url, log, stop, cfg), daemon=True),
        threading.Thread(target=watch_index, args=(base_url, log, stop), daemon=True),
    ]
    if grpc_url is not None:
        threads += [
            threading.Thread(target=grpc_load, args=(grpc_url, log, stop, cfg, i), daemon=True)
            for i in range(cfg.grpc_clients)
        ]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)


@dataclass
class Scenario:
    """The repository, the server and what was seen; one method per step."""

    cfg: ChurnConfig
    repo: Path
    sources: Path
    base: str
    grpc_url: str | None
    log: Log
    record: dict[str, Any]

    def wait(self, what: str, test: Callable[[dict[str, tuple[str, str]]], bool]) -> float | None:
        s = wait_for(self.log, what, test, self.cfg.within_s)
        return None if s is None else round(s, 2)

    def start(self) -> None:
        t0 = self.log.now()
        time.sleep(self.cfg.settle_s)
        defaults_after(self.log, t0 + 0.5, "1", "before any change")

    def copy_version_2(self) -> None:
        t0 = self.log.now()
        careless_copy(
            self.sources / "a2.safetensors", self.repo / "a/2" / CHECKPOINT, self.cfg.copy_s
        )
        t1 = self.log.now()
        ready = self.wait("a/2 READY", lambda e: e.get("a/2", ("",))[0] == "READY")
        seen = states_seen(self.log, "a/2", t0, self.log.now())
        self.log.expect("UNAVAILABLE" not in seen, f"a/2 was read before it was complete: {seen}")

        def only_version_2() -> tuple[bool, str]:
            t = self.log.now()
            time.sleep(1.0)
            with self.log.lock:
                versions = {a.version for a in self.log.answers if a.ok and a.t >= t}
            return versions == {"2"}, f"answered by versions {sorted(versions)} in the last 1 s"

        switched, last = eventually(only_version_2, self.cfg.within_s)
        self.log.expect(
            switched is not None,
            f"requests without a version not all answered by a/2 within {self.cfg.within_s} s "
            f"of it being READY: {last}",
        )
        self.log.steps["copy_version_2"] = {
            "copy_s": round(t1 - t0, 2),
            "ready_after_copy_s": ready,
            "only_v2_answers_after_ready_s": switched,
            "states_seen": seen,
        }

    def corrupt_version_3(self) -> None:
        before = index(self.base)
        staging = self.sources / "corrupt"
        staging.mkdir()
        corrupt_copy(self.sources / "a2.safetensors", staging / CHECKPOINT)
        os.rename(staging, self.repo / "a/3")
        t0 = self.log.now()
        bad = self.wait(
            "a/3 UNAVAILABLE with a reason",
            lambda e: e.get("a/3", ("", ""))[0] == "UNAVAILABLE" and bool(e["a/3"][1]),
        )
        after = index(self.base)
        others = {k: v for k, v in after.items() if k != "a/3"}
        self.log.expect(others == before, f"a corrupt a/3 changed the index: {before} -> {after}")
        time.sleep(self.cfg.settle_s)
        defaults_after(self.log, t0, "2", "with a corrupt a/3")
        self.log.steps["corrupt_version_3"] = {
            "unavailable_after_s": bad,
            "reason": after.get("a/3", ("", ""))[1],
        }

    def remove_version_1(self) -> None:
        import httpx

        shutil.rmtree(self.repo / "a/1")
        gone = self.wait("a/1 gone from the index", lambda e: "a/1" not in e)

        def not_found() -> tuple[bool, str]:  # on a fresh connection: any worker
            r = httpx.get(self.base + "/v2/models/a/versions/1/ready", timeout=10)
            return r.status_code == 404 and "error" in r.text, f"{r.status_code} {r.text[:200]}"

        for _ in range(4):
            after, last = eventually(not_found, self.cfg.within_s)
            self.log.expect(
                after is not None,
                f"GET /v2/models/a/versions/1/ready after its removal: {last}",
            )
        self.log.steps["remove_version_1"] = {"gone_after_s": gone}

    def add_model_b(self) -> None:
        import httpx

        move_in(self.sources / "b1.safetensors", self.repo / "b/1")
        ready = self.wait("b/1 READY", lambda e: e.get("b/1", ("",))[0] == "READY")
        body = {"inputs": inputs()[0][:1].tolist(), "model": "b"}

        def answered_by_b() -> tuple[bool, str]:  # on fresh connections: any worker
            r = httpx.post(self.base + "/predict", json=body, timeout=30)
            name = r.json().get("model", {}).get("name") if r.status_code == 200 else None
            v2 = httpx.get(self.base + "/v2/models/b/versions/1/ready", timeout=10)
            return (
                name == "b" and v2.status_code == 200,
                f"/predict {r.status_code} {r.text[:200]}; V2 ready {v2.status_code}",
            )

        for _ in range(4):
            after, last = eventually(answered_by_b, self.cfg.within_s)
            self.log.expect(after is not None, f"POST /predict with model b: {last}")
        self.log.steps["add_model_b"] = {"ready_after_s": ready}

    def protocols_agree(self) -> None:
        self.record["agreement"] = {
            f"{m}/{v}": agreement(self.base, self.grpc_url, m, v, self.log, self.cfg)
            for m, v in (("a", "2"), ("b", "1"))
        }
        time.sleep(self.cfg.settle_s)


def churn(cfg: ChurnConfig, workdir: Path) -> dict[str, Any]:
    """The whole scenario; returns the record (its ``problems``, by protocol, empty when all
    went well)."""
    from tests.harness import apd_serve, free_port

    require_flags(
        "--model-repository",
        "--grpc-port",
        "--default-model",
        why="the model repository, issue #23",
    )
    use_grpc = cfg.grpc and grpc_available()
    repo, sources = workdir / "repository", workdir / "sources"
    for name, seed in (("a1", 1), ("a2", 2), ("b1", 11)):
        small_checkpoint(sources / f"{name}.safetensors", seed=seed)
    move_in(sources / "a1.safetensors", repo / "a/1")
    grpc_port = free_port()
    # Requests without "model" go to a: once b is there, the default must be named (API.md).
    args = ["--model-repository", str(repo), "--default-model", "a"]
    args += ["--grpc-port", str(grpc_port)]
    args += ["--workers", str(cfg.workers), "--num-threads", "1", "--log-level", "warning"]
    args += cfg.server_args
    log = Log()
    record: dict[str, Any] = {
        "config": asdict(cfg),
        "server_args": args,
        "grpc_clients": use_grpc,
        "inputs": inputs()[1],
    }
    with apd_serve(None, args=args, timeout=60) as srv:
        first = index(srv.base_url)
        if first.get("a/1", ("?",))[0] != "READY":
            raise SystemExit(f"a/1 is not READY at start: index {first}")
        grpc_url = f"127.0.0.1:{grpc_port}" if use_grpc else None
        run = Scenario(cfg, repo, sources, srv.base_url, grpc_url, log, record)
        log.started = time.monotonic()
        with load(srv.base_url, grpc_url, log, cfg):
            for step in (
                run.start,
                run.copy_version_2,
                run.corrupt_version_3,
                run.remove_version_1,
                run.add_model_b,
                run.protocols_agree,
            ):
                print(f"{step.__name__} ...", flush=True)
                try:
                    step()
                except Exception as exc:  # a step that cannot finish is a failed expectation
                    log.expect(False, f"{step.__name__} raised {type(exc).__name__}: {exc}")
        record["final_index"] = {k: list(v) for k, v in index(srv.base_url).items()}
    record["load_s"] = round(log.now(), 1)
    record["answers"] = tally(log)
    record["steps"] = log.steps
    for proto in ("http", "grpc"):
        failed = [a for a in log.answers if not a.ok and protocol(a.client) == proto]
        log.expect(
            not failed,
            f"{len(failed)} {proto} requests without a version failed, first: "
            f"{[asdict(a) for a in failed[:1]]}",
            proto,
        )
    record["problems"] = log.problems
    record["index_polls"] = len(log.polls)
    return record


def tally(log: Log) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in log.answers:
        k = out.setdefault(a.client, {"sent": 0, "failed": 0, "by_version": {}, "failures": {}})
        k["sent"] += 1
        if a.ok:
            k["by_version"][a.version] = k["by_version"].get(a.version, 0) + 1
        else:
            k["failed"] += 1
            k["failures"][a.status] = k["failures"].get(a.status, 0) + 1
    return out


def markdown(r: dict[str, Any]) -> str:
    s = r["steps"]
    lines = [
        "# Model repository under churn",
        "",
        *header_lines(r),
        f"`apd serve {' '.join(r['server_args'])}` (the repository in a temporary directory);",
        f"{r['config']['http_clients']} HTTP clients"
        + (
            f" and {r['config']['grpc_clients']} gRPC clients"
            if r["grpc_clients"]
            else " (no gRPC clients: tritonclient[grpc] is not importable)"
        )
        + f", K = {r['config']['num_samples']}, {r['load_s']} s of load; inputs: {r['inputs']}.",
        "",
        "| step | figure |",
        "| --- | --- |",
    ]
    for step, figs in s.items():
        lines.append(f"| {step} | " + ", ".join(f"{k}: {v}" for k, v in figs.items()) + " |")
    lines += [
        "",
        "| client | sent | failed | answered by version | failures |",
        "| --- | ---: | ---: | --- | --- |",
    ]
    for client, t in r["answers"].items():
        lines.append(
            f"| {client} | {t['sent']} | {t['failed']} | {t['by_version']} | {t['failures']} |"
        )
    lines += ["", "Seeded answers compared with `/predict` (largest absolute difference):", ""]
    for mv, a in r.get("agreement", {}).items():
        lines.append(
            f"- {mv}: " + ", ".join(f"{k} {v:.2g}" for k, v in a["max_abs_difference"].items())
        )
    lines += [
        "",
        "Final index: " + ", ".join(f"{k} {v[0]}" for k, v in r.get("final_index", {}).items()),
        "",
    ]
    problems = [f"{about}: {p}" for about, ps in r["problems"].items() for p in ps]
    if problems:
        lines += ["**Failed expectations:**", "", *[f"- {p}" for p in problems]]
    else:
        lines.append("Every expectation held: no request without a version failed.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--copy-s", type=float, default=8.0)
    p.add_argument(
        "--within-s",
        type=float,
        default=15.0,
        help="a version must appear or go within this (the measured delays are recorded)",
    )
    p.add_argument("--http-clients", type=int, default=4)
    p.add_argument("--grpc-clients", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="the server's --workers")
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="another apd serve argument (repeat; e.g. --server-arg=--repository-poll-s "
        "--server-arg=1)",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv[1:])
    cfg = ChurnConfig(
        http_clients=args.http_clients,
        grpc_clients=args.grpc_clients,
        copy_s=args.copy_s,
        within_s=args.within_s,
        workers=args.workers,
        server_args=tuple(args.server_arg),
    )
    record = header(argv)
    with tempfile.TemporaryDirectory(prefix="apd-churn-") as tmp:
        record |= churn(cfg, Path(tmp))
    record["uptime_after"] = uptime()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "repository_churn.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "repository_churn.md").write_text(markdown(record) + "\n")
    print(markdown(record))
    return 1 if any(record["problems"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
