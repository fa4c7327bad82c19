"""The model repository (issue #23, ../shared/API.md "Model repository"): Triton's layout,
versions served side by side, the highest READY one by default, hot reload by polling, a
broken version UNAVAILABLE with its reason and nothing else changed, removed versions gone,
Redis keys per version."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from apd.checkpoint import load_checkpoint
from apd.networks import forward_probs
from apd.uncertainty import summarize
from service.api.app import create_app
from service.config import Settings
from service.core.networks import Stream, block_noise
from tests.service_support import make_checkpoint, make_client, random_images

POLL_S = 0.1


def put(root: Path, model: str, version: int, seed: int, **kwargs: Any) -> Path:
    folder = root / model / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    return make_checkpoint(folder / "model.safetensors", seed=seed, model_id=model, **kwargs)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    put(root, "alpha", 1, seed=1)
    put(root, "alpha", 2, seed=2)
    put(root, "beta", 7, seed=3)
    (root / "alpha" / "notes").mkdir()  # not a version: skipped
    (root / ".hidden").mkdir()  # not a model: skipped
    return root


@pytest.fixture
def client(repo: Path) -> Iterator[Any]:
    settings = Settings(
        model_repository=repo, repository_poll_s=POLL_S, default_model="alpha", pool_size=20
    )
    with make_client(create_app(settings)) as c:
        yield c


def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(POLL_S / 2)


def index(client: Any) -> dict[tuple[str, str], dict[str, str]]:
    rows = client.post("/v2/repository/index", json={}).json()
    return {(r["name"], r["version"]): r for r in rows}


def seeded_probabilities(path: Path, x: np.ndarray, seed: int, k: int) -> np.ndarray:
    """What ``/predict`` must answer for ``seed`` and K = ``k``, from the checkpoint alone:
    the first ``k`` networks of the seed's blocks, their mean predictive as served."""
    ckpt = load_checkpoint(path)
    g = ckpt.meta.generator
    stream = Stream.for_seed(seed)
    blocks = range(-(-k // 10))
    z = np.concatenate([block_noise(stream, b, g.noise_dim, 0)[0] for b in blocks])
    theta = ckpt.generate(z[:k], None)
    return ckpt.probabilities(summarize(forward_probs(ckpt.spec, theta, x)))


def test_every_version_is_served_and_the_highest_by_default(client: Any, repo: Path) -> None:
    assert client.get("/v1/models").json() == {
        "models": [
            {"name": "alpha", "versions": ["1", "2"], "default_version": "2"},
            {"name": "beta", "versions": ["7"], "default_version": "7"},
        ],
        "default_model": "alpha",
    }
    x = random_images(2, seed=5)
    request = {"inputs": x.tolist(), "num_samples": 20, "seed": 4}
    default = client.post("/predict", json=request).json()
    assert default["model"]["name"] == "alpha" and default["model"]["repository_version"] == "2"
    v1 = client.post("/predict", json={**request, "version": "1"}).json()
    assert v1["model"]["repository_version"] == "1"
    beta = client.post("/predict", json={**request, "model": "beta"}).json()
    assert beta["model"]["name"] == "beta" and beta["model"]["repository_version"] == "7"
    for answer, path in ((default, "alpha/2"), (v1, "alpha/1"), (beta, "beta/7")):
        reference = seeded_probabilities(repo / path / "model.safetensors", x, 4, 20)
        got = np.array([p["probabilities"] for p in answer["predictions"]])
        np.testing.assert_allclose(got, reference, rtol=2e-4, atol=1e-6)
    assert default["predictions"] != v1["predictions"]  # two versions, two posteriors
    # The same routes per version under /v2, and /v1/models/{name}.
    assert client.get("/v2/models/alpha").json()["versions"] == ["2"]
    assert client.get("/v2/models/alpha/versions/1").json()["versions"] == ["1"]
    assert client.get("/v2/models/alpha/versions/1/ready").json() == {
        "name": "alpha",
        "ready": True,
    }
    assert client.get("/v1/models/beta").json()["repository_version"] == "7"
    assert client.get("/v1/model").json()["name"] == "alpha"


def test_unknown_models_and_versions_are_404_naming_what_exists(client: Any) -> None:
    x = random_images(1).tolist()
    r = client.post("/predict", json={"inputs": x, "model": "gamma"})
    assert r.status_code == 404 and "alpha, beta" in r.json()["message"]
    r = client.post("/predict", json={"inputs": x, "version": "3"})
    assert r.status_code == 404 and "versions: 1, 2" in r.json()["message"]
    r = client.post("/anomaly-score", json={"inputs": x, "model": "beta", "version": "x"})
    assert r.status_code == 404
    r = client.get("/v2/models/gamma")
    assert r.status_code == 404 and "gamma" in r.json()["error"]
    r = client.post("/v2/models/alpha/versions/9/infer", json={"inputs": []})
    assert r.status_code == 404 and "error" in r.json()


def test_versions_appear_fail_and_disappear_without_a_restart(client: Any, repo: Path) -> None:
    x = random_images(1).tolist()
    # A new version: loaded and served within a few polls; the default moves to it.
    put(repo, "alpha", 3, seed=9)
    wait_for(lambda: index(client).get(("alpha", "3"), {}).get("state") == "READY")
    assert client.post("/predict", json={"inputs": x}).json()["model"]["repository_version"] == "3"
    # A broken one: UNAVAILABLE with its one-line reason; nothing else changes.
    broken = repo / "alpha" / "4"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"not a checkpoint at all")
    wait_for(lambda: index(client).get(("alpha", "4"), {}).get("state") == "UNAVAILABLE")
    row = index(client)[("alpha", "4")]
    assert "not a readable safetensors file" in row["reason"] and "\n" not in row["reason"]
    assert client.post("/predict", json={"inputs": x}).json()["model"]["repository_version"] == "3"
    r = client.post("/predict", json={"inputs": x, "version": "4"})
    assert r.status_code == 503 and "UNAVAILABLE" in r.json()["message"]
    assert client.get("/readyz").status_code == 200
    # Fixed in place: the same version becomes READY.
    put(repo, "alpha", 4, seed=10)
    wait_for(lambda: index(client)[("alpha", "4")]["state"] == "READY")
    # Removed: out of the index and of the answers; the default falls back.
    shutil.rmtree(repo / "alpha" / "4")
    shutil.rmtree(repo / "alpha" / "3")
    wait_for(lambda: ("alpha", "3") not in index(client) and ("alpha", "4") not in index(client))
    assert client.post("/predict", json={"inputs": x}).json()["model"]["repository_version"] == "2"
    assert client.post("/predict", json={"inputs": x, "version": "3"}).status_code == 404
    ready_only = client.post("/v2/repository/index", json={"ready": True}).json()
    assert {(r["name"], r["version"]) for r in ready_only} == {
        ("alpha", "1"),
        ("alpha", "2"),
        ("beta", "7"),
    }


def test_a_file_still_being_written_is_not_read(client: Any, repo: Path, tmp_path: Path) -> None:
    source = make_checkpoint(tmp_path / "whole.safetensors", seed=11, model_id="alpha")
    data = source.read_bytes()
    target = repo / "alpha" / "5" / "model.safetensors"
    target.parent.mkdir()
    with target.open("wb") as f:  # half of it, then a pause longer than a poll
        f.write(data[: len(data) // 2])
        f.flush()
        time.sleep(POLL_S * 3)
        assert index(client)[("alpha", "5")]["state"] == "LOADING"
        f.write(data[len(data) // 2 :])
    wait_for(lambda: index(client)[("alpha", "5")]["state"] == "READY")


def test_metrics_carry_model_and_version(client: Any) -> None:
    x = random_images(1).tolist()
    client.post("/predict", json={"inputs": x, "model": "beta", "num_samples": 10})
    text = client.get("/metrics").text
    assert 'apd_posterior_networks_sampled_total{model="beta",version="7"} 10.0' in text
    assert "apd_model_info{" in text and 'model="alpha"' in text and 'version="1"' in text


def test_several_models_without_a_default_must_be_named(repo: Path) -> None:
    settings = Settings(model_repository=repo, repository_poll_s=POLL_S, pool_size=20)
    with make_client(create_app(settings)) as c:
        r = c.post("/predict", json={"inputs": random_images(1).tolist()})
        assert r.status_code == 422 and "alpha, beta" in r.json()["message"]
        assert c.get("/v1/models").json()["default_model"] is None
