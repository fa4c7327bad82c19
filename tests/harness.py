"""Test and benchmark harness: a tiny checkpoint, a private redis-server, an ``apd serve`` process.

Shared by the fault, limit and fuzz tests and by the benchmark scripts (imported as
``tests.harness``). Everything binds to 127.0.0.1 only; every process
started here is stopped by the context manager that started it, and every wait is bounded.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from apd.checkpoint import (
    BASIS,
    MEAN,
    RESIDUAL_STD,
    AnomalyCalibration,
    CheckpointMeta,
    GeneratorConfig,
    Provenance,
    TargetNetwork,
    save_checkpoint,
)
from apd.networks import ARCHITECTURES
from apd.uncertainty import ScoreName

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"

TINY_NOISE_DIM = 8
TINY_HIDDEN = (16,)
TINY_RANK = 4


def tiny_meta(
    *,
    model_id: str = "tiny-fcnn1",
    version: str = "test-1",
    num_samples_default: int = 8,
    residual: bool = False,
) -> CheckpointMeta:
    """Metadata of a small fcnn1-shaped generator: z (8) -> [16] -> c (4) -> basis (4, P)."""
    spec = ARCHITECTURES["fcnn1"]
    return CheckpointMeta(
        model_id=model_id,
        version=version,
        target=TargetNetwork(
            arch=spec.name, layer_sizes=list(spec.layer_sizes), num_params=spec.num_params
        ),
        generator=GeneratorConfig(
            noise_dim=TINY_NOISE_DIM,
            hidden_sizes=list(TINY_HIDDEN),
            output_dim=TINY_RANK,
            has_basis=True,
            has_mean=True,
            has_residual=residual,
            design="subspace",
        ),
        num_samples_default=num_samples_default,
        anomaly=AnomalyCalibration(
            default_score=ScoreName.MUTUAL_INFORMATION,
            target_fpr=0.05,
            thresholds={
                ScoreName.MUTUAL_INFORMATION: 0.05,
                ScoreName.PREDICTIVE_ENTROPY: 1.0,
                ScoreName.MODEL_VARIANCE: 0.001,
                ScoreName.MAX_PROBABILITY: 0.5,
            },
            calibration_set="synthetic (test fixture)",
            calibration_size=100,
            num_samples=num_samples_default,
        ),
        provenance=Provenance(created_at="2026-01-01T00:00:00Z", code_revision="test"),
    )


def tiny_tensors(meta: CheckpointMeta, seed: int = 0) -> dict[str, np.ndarray]:
    """Random generator weights matching :func:`tiny_meta` (not a trained model)."""
    rng = np.random.default_rng(seed)
    g = meta.generator
    sizes = [g.noise_dim, *g.hidden_sizes, g.output_dim]
    p = meta.target.num_params
    t: dict[str, np.ndarray] = {}
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        t[f"generator.layers.{i}.weight"] = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(
            np.float32
        )
        t[f"generator.layers.{i}.bias"] = (0.1 * rng.standard_normal(b)).astype(np.float32)
    t[BASIS] = (0.05 * rng.standard_normal((g.output_dim, p))).astype(np.float32)
    t[MEAN] = (0.05 * rng.standard_normal(p)).astype(np.float32)
    if g.has_residual:
        t[RESIDUAL_STD] = np.full(p, 0.01, dtype=np.float16)
    return t


def make_tiny_checkpoint(path: str | Path, *, seed: int = 0, **meta_kwargs: object) -> Path:
    """Write a valid tiny checkpoint (about 1.9 MB) and return its path."""
    meta = tiny_meta(**meta_kwargs)  # type: ignore[arg-type]
    save_checkpoint(path, meta, tiny_tensors(meta, seed))
    return Path(path)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=0.2):
            return True
        time.sleep(0.05)
    return False


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; the process group when it leads one."""
    if proc.poll() is not None:
        return
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    own_group = pgid == proc.pid
    with contextlib.suppress(ProcessLookupError):
        if own_group:
            os.killpg(pgid, signal.SIGTERM)
        else:
            proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            if own_group:
                os.killpg(pgid, signal.SIGKILL)
            else:
                proc.kill()
        proc.wait(timeout=timeout)


@dataclass
class RedisServer:
    """A private ``redis-server`` on a free loopback port that can be stopped and restarted."""

    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="apd-redis-")))

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed")
        cmd = [
            exe,
            "--bind",
            LOOPBACK,
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        cmd += ["--dir", str(self.workdir), "--protected-mode", "yes"]
        log = (self.workdir / "redis.log").open("ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        if not wait_for_port(self.port, timeout, self.proc):
            self.stop()
            raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def client(self) -> Any:
        import redis

        return redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=2.0)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


def apd_command() -> list[str]:
    """``apd`` from this interpreter's environment (works without the venv on PATH)."""
    exe = Path(sys.executable).with_name("apd")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "apd_cli"]


# The key that authenticates cached networks in the tests' Redis (a secret in deployments).
TEST_HMAC_KEY = "apd-tests-hmac-key-0123456789"


def serve_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APD_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(ROOT)
    if extra:
        env.update(extra)
    if "APD_CACHE_HMAC_KEY_FILE" not in env:
        env.setdefault("APD_CACHE_HMAC_KEY", TEST_HMAC_KEY)
    return env


@dataclass
class ServeProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> list[int]:
        """The server's child processes (uvicorn workers), or the server itself with one."""
        children = _children(self.proc.pid)
        py = [pid for pid in children if _is_python(pid)]
        return py or [self.proc.pid]


def _children(pid: int) -> list[int]:
    out: list[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    with contextlib.suppress(OSError):
        for t in task_dir.iterdir():
            with contextlib.suppress(OSError):
                out += [int(c) for c in (t / "children").read_text().split()]
    return sorted(set(out))


def _is_python(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    # uvicorn's multiprocess workers are spawned interpreters; skip its resource tracker
    joined = b" ".join(cmd)
    return b"python" in cmd[0] and b"resource_tracker" not in joined


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` from /proc (VmRSS), 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@contextlib.contextmanager
def apd_serve(
    checkpoint: Path | None,
    *,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    ready_path: str = "/readyz",
    timeout: float = 60.0,
) -> Iterator[ServeProcess]:
    """Run ``apd serve`` on a free loopback port until the block ends; waits for ``ready_path``.

    ``checkpoint`` None: ``args`` say what to serve (``--model-repository DIR``)."""
    import httpx

    port = free_port()
    logdir = Path(tempfile.mkdtemp(prefix="apd-serve-"))
    log_path = logdir / "serve.log"
    cmd = [*apd_command(), "serve"]
    cmd += [] if checkpoint is None else ["--checkpoint", str(checkpoint)]
    cmd += ["--host", LOOPBACK, "--port", str(port), *args]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=serve_env(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop_process reaches the workers
        )
    server = ServeProcess(proc, port, log_path)
    try:
        deadline = time.monotonic() + timeout
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(server.base_url + ready_path, timeout=1.0).status_code == 200:
                    ready = True
                    break
            time.sleep(0.1)
        if not ready:
            raise RuntimeError(f"apd serve did not become ready:\n{server.log()[-4000:]}")
        yield server
    finally:
        stop_process(proc)
        shutil.rmtree(logdir, ignore_errors=True)
