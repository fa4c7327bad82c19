"""The compose topology as real processes on loopback, checked through Prometheus.

What ``docker compose up --scale api=2`` would run, without a Docker engine:

* ``redis-server`` with the ``redis`` service's own command line from docker-compose.yml
  (maxmemory, allkeys-lru, no persistence) on a free port;
* two ``apd serve`` replicas with the ``api`` service's environment (secrets as files),
  pointed at that Redis: replica A with one worker, as in compose, and replica B with
  ``--workers 2`` (Prometheus multi-process mode); both serve one model repository folder,
  made as the image makes its ``/models`` (the shipped model as version 1), as the compose
  replicas share the ``models`` volume, each with its own gRPC port;
* Debian's ``prometheus`` on the repo's deploy/prometheus/prometheus.yml, with its Docker
  DNS discovery swapped for the two loopback targets (same job, metrics path and alert
  rules), scraping every second.

Then it sends requests and asks Prometheus's HTTP API until it has scraped ``apd_*`` series,
``apd_model_info`` and ``up == 1`` from both replicas, and checks that B took its networks
from the Redis that A filled (redis-tier hits, no misses), that both answer a seeded request
identically, that every alert rule evaluates cleanly, and that every dashboard query runs.
Then it changes the shared repository as an operator would (a version renamed in, a broken
one): both replicas serve the new version without a restart, agree on every version's state
(the broken one UNAVAILABLE with its reason, nothing else changed), answer it identically,
and keep its networks in Redis apart from version 1's.
Every process is started on 127.0.0.1 and stopped in a ``finally``; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import pytest
import redis
import yaml

from apd.checkpoint import file_sha256
from tests import harness
from tests.deploy_support import (
    API_JOB,
    COMPOSE,
    GRAFANA_DASHBOARDS,
    PROMETHEUS_CONFIG,
    ROOT,
    dashboard_queries,
    find_tool,
    load_json,
    load_yaml,
    loopback_prometheus_config,
)

pytestmark = pytest.mark.topology

SHIPPED_CHECKPOINT = ROOT / "models" / "mnist-fcnn1" / "model.safetensors"
DEADLINE_S = 60.0  # the whole test, from the first process started
POOL_SIZE = 50  # networks per replica's pool: small, so start-up is quick
POLL_S = 0.5  # the repository poll (compose: 5 s), so a new version shows within the deadline
T = TypeVar("T")


@dataclass
class Prometheus:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{harness.LOOPBACK}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def api(self, path: str, **params: str) -> Any:
        r = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=5.0)
        body = r.json()
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"] if data["resultType"] == "vector" else []
        return result

    def by_instance(self, expr: str) -> dict[str, float]:
        return {s["metric"]["instance"]: float(s["value"][1]) for s in self.query(expr)}


def _wait_until(
    what: str, fn: Callable[[], T | None], deadline: float, diagnose: Callable[[], str]
) -> T:
    """Poll ``fn`` until it returns something truthy, or fail at ``deadline``."""
    last: T | None = None
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            last = fn()
            if last:
                return last
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what} (last: {last!r})\n{diagnose()}")


@contextlib.contextmanager
def compose_redis(command: list[str], workdir: Path, password: str) -> Iterator[str]:
    """``redis-server`` with the compose file's flags, on a free loopback port, requiring
    ``password`` where compose reads it from the secret."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed")
    assert command[:2] == ["sh", "-c"], command
    words = shlex.split(command[2].replace("$$", "$"))
    assert words[:2] == ["exec", "redis-server"], words
    flags = words[2:]
    at = flags.index("--requirepass")
    assert flags[at + 1] == "$(cat /run/secrets/redis_password)"
    flags[at + 1] = password
    port = harness.free_port()
    cmd = [exe, *flags, "--bind", harness.LOOPBACK, "--port", str(port)]
    cmd += ["--dir", str(workdir), "--protected-mode", "yes"]
    log = (workdir / "redis.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    try:
        if not harness.wait_for_port(port, 10.0, proc):
            pytest.fail(f"redis-server did not start:\n{(workdir / 'redis.log').read_text()}")
        yield f"redis://{harness.LOOPBACK}:{port}/0"
    finally:
        harness.stop_process(proc)


@contextlib.contextmanager
def loopback_prometheus(
    exe: str, promtool: str, targets: list[str], workdir: Path, deadline: float
) -> Iterator[Prometheus]:
    port = harness.free_port()
    address = f"{harness.LOOPBACK}:{port}"
    config = loopback_prometheus_config(load_yaml(PROMETHEUS_CONFIG), targets, self_target=address)
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    check = subprocess.run(
        [promtool, "check", "config", str(config_path)], capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stdout + check.stderr
    log_path = workdir / "prometheus.log"
    cmd = [
        exe,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address={address}",
        "--storage.tsdb.retention.time=1h",
        "--log.level=warn",
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    prom = Prometheus(proc, port, log_path)
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited with {proc.returncode}:\n{prom.log()}")
            return httpx.get(f"{prom.url}/-/ready", timeout=1.0).status_code == 200

        _wait_until("prometheus /-/ready", ready, min(deadline, time.monotonic() + 20), prom.log)
        yield prom
    finally:
        harness.stop_process(proc)


def _images(n: int, seed: int) -> list[list[float]]:
    rng = np.random.default_rng(seed)
    x = rng.random((n, 784)) * (rng.random((n, 784)) < 0.2)
    return [[float(v) for v in row] for row in x]


def test_prometheus_scrapes_both_replicas_sharing_one_redis(tmp_path: Path) -> None:
    prometheus_exe = find_tool("prometheus", "apt-get install prometheus; .ci/run does")
    promtool = find_tool("promtool", "apt-get install prometheus; .ci/run does")
    t0 = time.monotonic()
    deadline = t0 + DEADLINE_S

    services = load_yaml(COMPOSE)["services"]
    api_env = {k: str(v) for k, v in services["api"]["environment"].items()}
    if SHIPPED_CHECKPOINT.is_file():
        checkpoint = SHIPPED_CHECKPOINT
    else:
        checkpoint = harness.make_tiny_checkpoint(tmp_path / "tiny.safetensors")
    prefix = f"apd-topology-{uuid.uuid4().hex[:10]}"

    # The compose secrets, as files where the containers would find them mounted.
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    password = uuid.uuid4().hex
    (secrets / "redis_password").write_text(password + "\n")
    (secrets / "cache_hmac_key").write_text(uuid.uuid4().hex + "\n")
    for name in ("APD_REDIS_PASSWORD_FILE", "APD_CACHE_HMAC_KEY_FILE"):
        api_env[name] = str(secrets / Path(api_env[name]).name)

    # The `models` volume, as a new one starts: a copy of the image's /models, the shipped
    # model as version 1 of the default model (tests/test_deploy_static.py checks the image).
    repository = tmp_path / "models"
    model = api_env["APD_DEFAULT_MODEL"]
    (repository / model / "1").mkdir(parents=True)
    shutil.copyfile(checkpoint, repository / model / "1" / "model.safetensors")

    with contextlib.ExitStack() as stack:
        (tmp_path / "redis").mkdir()
        redis_url = stack.enter_context(
            compose_redis(services["redis"]["command"], tmp_path / "redis", password)
        )
        env = {
            **api_env,
            "APD_MODEL_REPOSITORY": str(repository),
            "APD_REPOSITORY_POLL_S": str(POLL_S),
            "APD_REDIS_URL": redis_url,
            "APD_REDIS_KEY_PREFIX": prefix,
            "APD_POOL_SIZE": str(POOL_SIZE),
        }
        # A first: it draws the pool and fills Redis; B's two workers then read it from there.
        # Each has its own gRPC port (compose: 8001 in each container).
        a = stack.enter_context(
            harness.apd_serve(
                checkpoint, env={**env, "APD_GRPC_PORT": str(harness.free_port())}, timeout=40
            )
        )
        b = stack.enter_context(
            harness.apd_serve(
                checkpoint,
                args=["--workers", "2"],
                env={**env, "APD_GRPC_PORT": str(harness.free_port())},
                timeout=40,
            )
        )
        target = {"a": f"{harness.LOOPBACK}:{a.port}", "b": f"{harness.LOOPBACK}:{b.port}"}
        (tmp_path / "prometheus").mkdir()
        prom = stack.enter_context(
            loopback_prometheus(
                prometheus_exe, promtool, list(target.values()), tmp_path / "prometheus", deadline
            )
        )

        def diagnose() -> str:
            return (
                f"prometheus:\n{prom.log()}\nreplica A:\n{a.log()[-2000:]}\n"
                f"replica B:\n{b.log()[-2000:]}"
            )

        # Both replicas ready, on the shared Redis, serving the repository's one version.
        for server in (a, b):
            ready = httpx.get(server.base_url + "/readyz", timeout=5).json()
            assert ready["status"] == "ready" and ready["cache"] == "redis", ready
            assert ready["redis"] == "ok", ready
            index = httpx.post(server.base_url + "/v2/repository/index", json={}, timeout=5)
            assert index.json() == [
                {"name": model, "version": "1", "state": "READY", "reason": ""}
            ], index.text

        # Traffic: the same seeded request to both replicas answers the same.
        body = {"inputs": _images(4, seed=3), "num_samples": 20, "seed": 7}
        answers = []
        for server in (a, b, b):
            r = httpx.post(server.base_url + "/predict", json=body, timeout=30)
            assert r.status_code == 200, r.text
            answers.append(r.json()["predictions"])
            r = httpx.post(server.base_url + "/anomaly-score", json=body, timeout=30)
            assert r.status_code == 200, r.text
        for other in answers[1:]:
            for p, q in zip(answers[0], other, strict=True):
                assert p["label"] == q["label"]
                assert np.allclose(p["probabilities"], q["probabilities"], rtol=1e-5, atol=1e-7)

        # Redis holds the networks, keyed by model, version and the checkpoint's sha256, with
        # the compose limits.
        sha256 = file_sha256(checkpoint)
        client = redis.Redis.from_url(redis_url, socket_timeout=2, password=password)
        try:
            keys = [k.decode() for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
            maxmemory = int(str(client.config_get("maxmemory")["maxmemory"]))
            policy = client.config_get("maxmemory-policy")["maxmemory-policy"]
        finally:
            client.close()
        code_keys = [k for k in keys if k.startswith(f"{prefix}:codes:{model}/1:{sha256}:seed-7:")]
        assert len(code_keys) == 2, keys[:5]  # K = 20: the seed's two blocks of codes
        assert maxmemory > 0 and policy == "allkeys-lru"

        # Prometheus scraped apd_* series from both replicas.
        expected = set(target.values())

        def scraped_both() -> dict[str, dict[str, float]] | None:
            seen = {
                "up": prom.by_instance(f'up{{job="{API_JOB}"}} == 1'),
                "requests": prom.by_instance(
                    f'sum by (instance) (apd_requests_total{{job="{API_JOB}",endpoint="/predict"}})'
                ),
                "model_info": prom.by_instance(f'apd_model_info{{job="{API_JOB}"}}'),
                "redis_hits": prom.by_instance(
                    f'sum by (instance) (apd_cache_hits_total{{job="{API_JOB}",tier="redis"}})'
                ),
                "misses": prom.by_instance(
                    f'sum by (instance) (apd_cache_misses_total{{job="{API_JOB}"}})'
                ),
            }
            complete = all(set(v) == expected for v in seen.values())
            b_requests = seen["requests"].get(target["b"], 0.0)
            return seen if complete and b_requests >= 2 else None

        seen = _wait_until("apd_* series from both replicas", scraped_both, deadline, diagnose)
        assert seen["up"] == {t: 1.0 for t in expected}
        assert seen["requests"][target["a"]] >= 1 and seen["requests"][target["b"]] >= 2
        assert seen["model_info"] == {t: 1.0 for t in expected}
        info = prom.query(f'apd_model_info{{job="{API_JOB}"}}')
        assert {s["metric"]["backend"] for s in info} == {"numpy-factored"}
        assert len({s["metric"]["sha256"] for s in info}) == 1
        # A drew the networks; B (both of its workers) found every one of them in Redis.
        assert seen["misses"][target["a"]] > 0
        assert seen["misses"][target["b"]] == 0, seen
        assert seen["redis_hits"][target["b"]] > 0, seen

        targets = prom.api("targets")["activeTargets"]
        api_targets = [t for t in targets if t["labels"]["job"] == API_JOB]
        assert {t["scrapeUrl"] for t in api_targets} == {f"http://{t}/metrics" for t in expected}

        # Every alert rule from deploy/prometheus/rules evaluates without error.
        def rules_evaluated() -> list[dict[str, Any]] | None:
            groups = prom.api("rules")["groups"]
            rules = [r for g in groups for r in g["rules"]]
            return rules if rules and all(r["health"] != "unknown" for r in rules) else None

        rules = _wait_until("alert rules evaluated", rules_evaluated, deadline, diagnose)
        bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
        assert not bad, bad
        firing = [r["name"] for r in rules if r.get("state") == "firing"]
        assert not firing, f"alerts firing on a healthy topology: {firing}"

        # Every dashboard query runs against the scraped data; the headline ones have values.
        for path in sorted(GRAFANA_DASHBOARDS.glob("*.json")):
            for panel, ref, expr in dashboard_queries(load_json(path)):
                try:
                    prom.api("query", query=expr)
                except AssertionError as exc:
                    pytest.fail(f"{path.name} panel {panel['title']!r} {ref}: {exc}")
        assert prom.query(f'count(up{{job="{API_JOB}"}} == 1)')[0]["value"][1] == "2"
        ratio = prom.query(
            f'sum(apd_cache_hits_total{{job="{API_JOB}"}}) / (sum(apd_cache_hits_total'
            f'{{job="{API_JOB}"}}) + sum(apd_cache_misses_total{{job="{API_JOB}"}}))'
        )
        assert ratio and 0.0 < float(ratio[0]["value"][1]) <= 1.0
        degraded = prom.query(f'max(apd_cache_degraded{{job="{API_JOB}"}})')
        assert degraded and float(degraded[0]["value"][1]) == 0.0

        # The operator adds version 2 (written beside, then renamed in: complete when it
        # appears) and a version 3 that is not a checkpoint, into the shared folder.
        staged = repository / ".incoming-2"
        staged.mkdir()
        shutil.copyfile(checkpoint, staged / "model.safetensors")
        staged.rename(repository / model / "2")
        (repository / model / "3").mkdir()
        (repository / model / "3" / "model.safetensors").write_bytes(b"not a checkpoint")

        def states(server: harness.ServeProcess) -> dict[str, tuple[str, str]] | None:
            rows = httpx.post(server.base_url + "/v2/repository/index", json={}, timeout=5)
            got = {r["version"]: (r["state"], r["reason"]) for r in rows.json()}
            settled = set(got) == {"1", "2", "3"} and got["3"][0] != "LOADING"
            return got if settled and got["2"][0] == "READY" else None

        def settled(server: harness.ServeProcess) -> dict[str, tuple[str, str]] | None:
            """The states, once every answer for 2 s agrees: each worker polls on its own,
            and every request (a new connection) may reach either of B's workers."""
            first, until = states(server), time.monotonic() + 2.0
            while first is not None and time.monotonic() < until:
                if states(server) != first:
                    return None
                time.sleep(0.05)
            return first

        indexes = [
            _wait_until(f"the new versions on {name}", lambda s=s: settled(s), deadline, diagnose)
            for name, s in (("A", a), ("B", b))
        ]
        assert indexes[0] == indexes[1], indexes  # the replicas agree on every version
        assert indexes[0]["1"] == ("READY", "") and indexes[0]["2"] == ("READY", "")
        state, reason = indexes[0]["3"]
        assert state == "UNAVAILABLE" and reason, indexes[0]
        # Still ready (versions 1 and 2 are READY); a request naming no version gets 2, the
        # highest READY one; naming 3 is 503 with its reason; both replicas answer alike.
        body = {"inputs": _images(4, seed=3), "num_samples": 20, "seed": 11}
        answers = []
        for server in (a, b):
            assert httpx.get(server.base_url + "/v2/health/ready", timeout=5).status_code == 200
            r = httpx.post(server.base_url + "/predict", json=body, timeout=30)
            assert r.status_code == 200, r.text
            assert r.json()["model"]["repository_version"] == "2", r.json()["model"]
            answers.append(r.json()["predictions"])
            r = httpx.post(server.base_url + "/predict", json={**body, "version": "3"}, timeout=30)
            assert r.status_code == 503 and reason in r.text, r.text
        for p, q in zip(*answers, strict=True):
            assert p["label"] == q["label"]
            assert np.allclose(p["probabilities"], q["probabilities"], rtol=1e-5, atol=1e-7)
        client = redis.Redis.from_url(redis_url, socket_timeout=2, password=password)
        try:
            seed_11 = {
                k.decode().split(":")[2]
                for k in client.scan_iter(match=f"{prefix}:codes:*:seed-11:*", count=1000)
            }
        finally:
            client.close()
        assert seed_11 == {f"{model}/2"}, seed_11  # version 2's networks, under its own keys

    elapsed = time.monotonic() - t0
    assert elapsed < DEADLINE_S + 15, f"took {elapsed:.1f} s"
