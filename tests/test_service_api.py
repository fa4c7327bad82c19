"""The HTTP API on an in-process cache: answers checked against an independent computation,
reproducibility, every bad-input case, limits, health and metrics."""

from __future__ import annotations

import io
import itertools
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from numpy.typing import NDArray
from safetensors.numpy import load_file

from apd.checkpoint import BASIS, BASIS_SCALE, Checkpoint, load_checkpoint
from apd.networks import MLPSpec, forward_probs, tail_start
from apd.uncertainty import PREDICTIVE_SCORES, ScoreName, summarize
from service.api.app import create_app
from service.config import Settings
from service.core.networks import Stream, block_noise
from tests.service_support import (
    TARGET_SIZES,
    make_checkpoint,
    make_client,
    random_images,
    weight_noise_matching,
)

MAX_BATCH = 8
MAX_BODY = 256 * 1024
MAX_K = 200
GOOD = [0.5] * 784


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("api") / "model.safetensors")


@pytest.fixture(scope="module")
def ckpt(ckpt_path: Path) -> Checkpoint:
    return load_checkpoint(ckpt_path)


def settings_for(path: Path, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "checkpoint": path,
        "redis_url": None,
        "pool_size": 50,
        "max_batch": MAX_BATCH,
        "max_body_bytes": MAX_BODY,
        "max_num_samples": MAX_K,
        "default_num_samples": None,
        "num_threads": 1,
    }
    return Settings(**(base | overrides))


@pytest.fixture(scope="module")
def client(ckpt_path: Path) -> Iterator[Any]:
    with make_client(create_app(settings_for(ckpt_path))) as c:
        yield c


# --- an independent reference: the documented noise scheme, the checkpoint's own
# generator, and a per-network float64 forward written out here --------------------------


def reference_networks(ckpt: Checkpoint, seed: int, k: int) -> NDArray[np.float32]:
    g = ckpt.meta.generator
    blocks = []
    for b in range(math.ceil(k / 10)):
        rng = np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(b,)))
        z = rng.standard_normal((10, g.noise_dim), dtype=np.float32)
        assert not g.has_residual  # residual noise: test_a_residual_generator_is_served_...
        blocks.append(ckpt.generate(z))
    return np.concatenate(blocks)[:k]


def reference_probs(theta: NDArray[np.float32], x: NDArray[np.floating]) -> NDArray[np.float64]:
    out = []
    for t in theta.astype(np.float64):
        h, offset = x.astype(np.float64), 0
        for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(TARGET_SIZES)):
            w = t[offset : offset + fan_in * fan_out].reshape(fan_in, fan_out)
            offset += fan_in * fan_out
            b = t[offset : offset + fan_out]
            offset += fan_out
            h = h @ w + b
            if layer < len(TARGET_SIZES) - 2:
                h = np.maximum(h, 0)
        e = np.exp(h - h.max(axis=1, keepdims=True))
        out.append(e / e.sum(axis=1, keepdims=True))
    return np.stack(out)


def reference_summary(p: NDArray[np.float64]) -> dict[str, NDArray[np.float64]]:
    mean = p.mean(axis=0)
    h_pred = -(mean * np.log(mean)).sum(axis=1)
    h_exp = (-(p * np.log(p)).sum(axis=2)).mean(axis=0)
    return {
        "probabilities": mean,
        "predictive_entropy": h_pred,
        "expected_entropy": h_exp,
        "mutual_information": h_pred - h_exp,
        "model_variance": ((p - mean) ** 2).mean(axis=0).mean(axis=1),
        "max_probability": 1.0 - mean.max(axis=1),
    }


def predict(client: Any, **body: Any) -> dict[str, Any]:
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


# --- answers -------------------------------------------------------------------------------


def test_predict_matches_independent_computation(client: Any, ckpt: Checkpoint) -> None:
    x = random_images(6, seed=4)
    k, seed = 25, 1234
    result = predict(client, inputs=x.tolist(), num_samples=k, seed=seed)
    ref = reference_summary(reference_probs(reference_networks(ckpt, seed, k), x))
    assert result["num_samples"] == k and result["seed"] == seed
    assert result["model"] == {
        "name": ckpt.meta.model_id,  # a repository of one: the checkpoint's id, version 1
        "repository_version": "1",
        "id": ckpt.meta.model_id,
        "version": ckpt.meta.version,
        "checkpoint_sha256": ckpt.sha256,
    }
    preds = result["predictions"]
    assert len(preds) == len(x)
    assert not any("label_name" in p for p in preds)  # the checkpoint names no classes
    probs = np.array([p["probabilities"] for p in preds])
    np.testing.assert_allclose(probs, ref["probabilities"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    assert [p["label"] for p in preds] == ref["probabilities"].argmax(axis=1).tolist()
    for name in ("predictive_entropy", "expected_entropy", "mutual_information"):
        got = [p["uncertainty"][name] for p in preds]
        np.testing.assert_allclose(got, ref[name], rtol=1e-5, atol=2e-6, err_msg=name)
    got = [p["uncertainty"]["model_variance"] for p in preds]
    np.testing.assert_allclose(got, ref["model_variance"], rtol=1e-4, atol=1e-9)
    threshold = ckpt.meta.anomaly.thresholds[ScoreName.MUTUAL_INFORMATION]
    for p in preds:
        anomaly = p["anomaly"]
        assert anomaly["score_name"] == "mutual_information"
        assert anomaly["threshold"] == threshold
        assert anomaly["score"] == p["uncertainty"]["mutual_information"]
        assert anomaly["is_anomaly"] == (anomaly["score"] > threshold)


def test_an_int8_checkpoint_is_served_as_the_basis_it_stores(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "int8.safetensors", basis_dtype="int8")
    raw = load_file(str(path))
    assert raw[BASIS].dtype == np.int8
    ckpt = load_checkpoint(path)
    written_out = raw[BASIS].astype(np.float64) * raw[BASIS_SCALE].astype(np.float64)[:, None]
    np.testing.assert_allclose(ckpt.tensors[BASIS], written_out, rtol=1e-6)
    x = random_images(4, seed=6)
    k, seed = 20, 5
    with make_client(create_app(settings_for(path))) as c:
        result = predict(c, inputs=x.tolist(), num_samples=k, seed=seed)
    ref = reference_summary(reference_probs(reference_networks(ckpt, seed, k), x))
    probs = np.array([p["probabilities"] for p in result["predictions"]])
    np.testing.assert_allclose(probs, ref["probabilities"], rtol=1e-5, atol=1e-7)
    got = [p["uncertainty"]["mutual_information"] for p in result["predictions"]]
    np.testing.assert_allclose(got, ref["mutual_information"], rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("score", PREDICTIVE_SCORES)
def test_anomaly_score_matches_reference_and_threshold(
    client: Any, ckpt: Checkpoint, score: ScoreName
) -> None:
    x = random_images(MAX_BATCH, seed=9)
    k, seed = 40, 77
    response = client.post(
        "/anomaly-score",
        json={"inputs": x.tolist(), "num_samples": k, "seed": seed, "score": score.value},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    ref = reference_summary(reference_probs(reference_networks(ckpt, seed, k), x))
    threshold = ckpt.meta.anomaly.thresholds[score]
    assert body["score_name"] == score.value and body["threshold"] == threshold
    assert body["target_fpr"] == ckpt.meta.anomaly.target_fpr
    np.testing.assert_allclose(body["scores"], ref[score.value], rtol=1e-4, atol=2e-6)
    assert body["is_anomaly"] == [s > threshold for s in body["scores"]]


def test_flags_follow_the_threshold_both_ways(client: Any) -> None:
    """With thresholds calibrated at 50% on such images, a batch has both outcomes."""
    flags: list[bool] = []
    for seed in range(3):
        x = random_images(MAX_BATCH, seed=100 + seed)
        flags += client.post("/anomaly-score", json={"inputs": x.tolist()}).json()["is_anomaly"]
    assert any(flags) and not all(flags)


def test_nested_and_flat_inputs_are_the_same_image(client: Any) -> None:
    x = random_images(1, seed=5)[0]
    flat = predict(client, inputs=[x.tolist()], seed=3)
    nested = predict(client, inputs=[x.reshape(28, 28).tolist()], seed=3)
    assert flat["predictions"] == nested["predictions"]


def test_input_scale_is_applied(tmp_path: Path, ckpt: Checkpoint) -> None:
    """A checkpoint whose input convention says ``scale = 2`` sees twice the pixels."""
    from apd.checkpoint import save_checkpoint

    meta = ckpt.meta.model_copy(update={"input": ckpt.meta.input.model_copy(update={"scale": 2.0})})
    path = tmp_path / "scaled.safetensors"
    save_checkpoint(path, meta, ckpt.tensors)
    x = random_images(2, seed=8) / 2
    with make_client(create_app(settings_for(path))) as scaled:
        got = predict(scaled, inputs=x.tolist(), num_samples=10, seed=2)
    ref = reference_summary(reference_probs(reference_networks(ckpt, 2, 10), 2 * x))
    probs = [p["probabilities"] for p in got["predictions"]]
    np.testing.assert_allclose(probs, ref["probabilities"], rtol=1e-5, atol=1e-7)


# --- reproducibility ---------------------------------------------------------------------


def test_same_seed_same_numbers_and_other_seed_other_numbers(client: Any) -> None:
    x = random_images(2, seed=1).tolist()
    a = predict(client, inputs=x, num_samples=30, seed=42)
    b = predict(client, inputs=x, num_samples=30, seed=42)
    c = predict(client, inputs=x, num_samples=30, seed=43)
    assert a == b
    assert a["predictions"] != c["predictions"]


def test_seed_reproducible_across_instances_and_equal_to_the_reference(
    ckpt_path: Path, ckpt: Checkpoint, client: Any
) -> None:
    """The factored forward over codes answers what the reference path computes: the seed's
    noise through :meth:`Checkpoint.generate` (materialised weights) and :func:`forward_probs`."""
    x = random_images(3, seed=2)
    body = {"inputs": x.tolist(), "num_samples": 35, "seed": 2024}
    first = predict(client, **body)
    with make_client(create_app(settings_for(ckpt_path))) as other:
        assert predict(other, **body) == first
    assert client.get("/v1/model").json()["backend"] == "numpy-factored"
    stream = Stream.for_seed(2024)
    z = np.concatenate([block_noise(stream, b, ckpt.noise_dim, 0)[0] for b in range(4)])
    reference = summarize(forward_probs(ckpt.spec, ckpt.generate(z[:35]), x))
    for i, p in enumerate(first["predictions"]):
        assert p["label"] == int(reference.labels[i])
        np.testing.assert_allclose(
            p["probabilities"], reference.probabilities[i], rtol=1e-5, atol=1e-7
        )
        for name, value in p["uncertainty"].items():
            want = float(getattr(reference, name)[i])
            assert value == pytest.approx(want, rel=1e-5, abs=1e-7), name


def test_requests_without_seed_draw_from_the_pool(client: Any) -> None:
    x = random_images(1, seed=3).tolist()
    answers = {
        json.dumps(predict(client, inputs=x, num_samples=10)["predictions"]) for _ in range(8)
    }
    assert len(answers) > 1  # 5 windows of 10 networks in a pool of 50: all equal has p < 1e-5
    big = predict(client, inputs=x, num_samples=120)  # more than the pool: pool + stream blocks
    assert big["num_samples"] == 120 and big["seed"] is None


def test_default_num_samples_comes_from_the_checkpoint(client: Any, ckpt: Checkpoint) -> None:
    assert predict(client, inputs=[GOOD])["num_samples"] == ckpt.meta.num_samples_default


# --- bad input ---------------------------------------------------------------------------


def raw(text: str) -> dict[str, Any]:
    return {"content": text.encode(), "headers": {"content-type": "application/json"}}


def body(**fields: Any) -> dict[str, Any]:
    return {"json": fields}


NAN_BODY = '{"inputs": [[' + ", ".join(["0.5"] * 783 + ["NaN"]) + "]]}"
INF_BODY = '{"inputs": [[' + ", ".join(["Infinity"] + ["0.5"] * 783) + "]]}"
NEG_INF_NESTED = (
    '{"inputs": [['
    + ", ".join(["[" + ", ".join(["0.1"] * 28) + "]"] * 27)
    + ", ["
    + ", ".join(["0.1"] * 27 + ["-Infinity"])
    + "]]]}"
)
ROWS_27 = [[0.1] * 28] * 27 + [[0.1] * 27]
BAD_INPUTS: list[tuple[str, str, dict[str, Any], int, str]] = [
    ("short image", "/predict", body(inputs=[[0.5] * 783]), 422, "inputs[0] has 783 items"),
    ("long image", "/predict", body(inputs=[[0.5] * 785]), 422, "inputs[0] has 785 items"),
    ("short row", "/predict", body(inputs=[ROWS_27]), 422, "inputs[0][27] has 27 values"),
    ("27 rows", "/predict", body(inputs=[[[0.1] * 28] * 27]), 422, "inputs[0] has 27 items"),
    ("3-d image", "/predict", body(inputs=[[[[0.1]] * 28] * 28]), 422, "inputs[0][0][0]"),
    ("image not a list", "/predict", body(inputs=["abc"]), 422, "inputs[0] must be a list"),
    ("inputs not a list", "/predict", body(inputs=5), 422, "inputs: Input should be a valid list"),
    ("empty batch", "/predict", body(inputs=[]), 422, "inputs: List should have at least 1"),
    ("missing inputs", "/predict", body(num_samples=3), 422, "inputs: Field required"),
    ("NaN literal", "/predict", raw(NAN_BODY), 422, "inputs[0][783] is nan"),
    ("Infinity literal", "/predict", raw(INF_BODY), 422, "inputs[0][0] is inf"),
    ("-Infinity nested", "/anomaly-score", raw(NEG_INF_NESTED), 422, "inputs[0][27][27] is -inf"),
    ("pixel above 1", "/predict", body(inputs=[[*GOOD[:-1], 1.5]]), 422, "inputs[0][783] is 1.5"),
    ("pixel below 0", "/predict", body(inputs=[[-0.01, *GOOD[1:]]]), 422, "must lie in [0, 1]"),
    (
        "string pixel",
        "/predict",
        body(inputs=[["0.5"] * 784]),
        422,
        "Input should be a valid number",
    ),
    ("bool pixel", "/predict", body(inputs=[[True, *GOOD[1:]]]), 422, "inputs[0][0]"),
    ("string NaN", "/predict", body(inputs=[["NaN", *GOOD[1:]]]), 422, "inputs[0][0]: Input"),
    (
        "nested string",
        "/predict",
        body(inputs=[[[0.1] * 28] * 27 + [["x"] * 28]]),
        422,
        "inputs[0][27][0]: Input",
    ),
    ("num_samples 0", "/predict", body(inputs=[GOOD], num_samples=0), 422, "num_samples"),
    ("num_samples 1001", "/predict", body(inputs=[GOOD], num_samples=1001), 422, "num_samples"),
    (
        "num_samples over server max",
        "/predict",
        body(inputs=[GOOD], num_samples=MAX_K + 1),
        422,
        f"less than or equal to {MAX_K}",
    ),
    ("num_samples float", "/predict", body(inputs=[GOOD], num_samples=2.5), 422, "num_samples"),
    ("seed negative", "/predict", body(inputs=[GOOD], seed=-1), 422, "seed"),
    ("seed too big", "/predict", body(inputs=[GOOD], seed=2**63), 422, "seed"),
    ("seed string", "/predict", body(inputs=[GOOD], seed="7"), 422, "seed"),
    ("unknown field", "/predict", body(inputs=[GOOD], samples=3), 422, "samples: Extra inputs"),
    (
        "unknown score",
        "/anomaly-score",
        body(inputs=[GOOD], score="entropy"),
        422,
        "'mutual_information', 'predictive_entropy', 'model_variance', 'max_probability', "
        "'data_support' or 'combined'",
    ),
    ("not JSON", "/predict", raw("inputs=0.5"), 422, "body is not valid JSON"),
    ("truncated JSON", "/predict", raw('{"inputs": [[0.5, 0.5'), 422, "body is not valid JSON"),
    ("JSON array body", "/predict", raw("[1, 2]"), 422, "Input should be a valid dictionary"),
    (
        "text/plain body",
        "/predict",
        {"content": b'{"inputs": []}', "headers": {"content-type": "text/plain"}},
        415,
        "body is text/plain; this endpoint takes application/json",
    ),
    (
        "no content type",
        "/anomaly-score",
        {"content": b'{"inputs": []}'},
        415,
        "body has no Content-Type; this endpoint takes application/json",
    ),
    (
        "curl -d's default form type",
        "/predict",
        {
            "content": b'{"inputs": []}',
            "headers": {"content-type": "application/x-www-form-urlencoded"},
        },
        415,
        "Content-Type: application/json",
    ),
    (
        "multipart to /predict",
        "/predict",
        {"files": {"files": ("digit.png", b"\x89PNG")}},
        415,
        "body is multipart/form-data; this endpoint takes application/json",
    ),
    (
        "JSON to /predict/image",
        "/predict/image",
        body(inputs=[GOOD]),
        415,
        "body is application/json; this endpoint takes multipart/form-data",
    ),
    ("batch over max_batch", "/predict", body(inputs=[GOOD] * (MAX_BATCH + 1)), 413, "max_batch"),
    ("body over max_body_bytes", "/predict", raw(" " * (MAX_BODY + 1)), 413, str(MAX_BODY)),
]


@pytest.mark.parametrize(
    ("path", "request_kwargs", "status", "message"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_input_is_a_4xx_naming_the_problem(
    client: Any, path: str, request_kwargs: dict[str, Any], status: int, message: str
) -> None:
    response = client.post(path, **request_kwargs)
    assert response.status_code == status, response.text
    payload = response.json()
    assert message in payload["message"]
    # Every 4xx has one shape (docs/api.md): a one-line message and FastAPI's detail list.
    assert set(payload) == {"detail", "message"} and "\n" not in payload["message"]
    assert payload["detail"] and all({"loc", "msg", "type"} <= set(d) for d in payload["detail"])
    assert payload["message"].startswith(payload["detail"][0]["msg"]) or status == 422
    # Locations are the client's names: no pydantic union tags.
    assert not any({"flat", "nested"} & set(d["loc"]) for d in payload["detail"])
    assert ".flat" not in response.text and ".nested" not in response.text
    assert len(response.content) < 20_000  # errors are summarised, inputs not echoed
    # The process stays healthy and keeps answering.
    assert client.get("/healthz").status_code == 200
    assert client.post("/predict", json={"inputs": [GOOD], "num_samples": 1}).status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "status", "message"),
    [
        ("GET", "/predict", 405, "GET is not allowed on /predict; use POST"),
        ("GET", "/nowhere", 404, "no endpoint at /nowhere; the API is listed at /docs"),
        ("GET", "/page/x.js", 404, "no page asset 'x.js'"),
    ],
)
def test_every_error_has_the_documented_shape(
    client: Any, method: str, path: str, status: int, message: str
) -> None:
    r = client.request(method, path)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"detail", "message"} and body["message"].startswith(message)
    assert [d["msg"] for d in body["detail"]] == [body["message"]]
    assert client.get("/v2/nowhere").json() == {
        "error": "no endpoint at /v2/nowhere; the API is listed at /docs (or /openapi.json)"
    }


def _png(pixels: NDArray[np.uint8], fmt: str = "PNG") -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def test_image_files_are_answered_as_their_pixels(client: Any) -> None:
    """A 28 x 28 PNG is the image of its pixels / 255; a larger RGB JPEG is converted to
    grayscale and resized to 28 x 28 as the checkpoint's convention says."""
    from apd.checkpoint import InputConvention

    rng = np.random.default_rng(3)
    pixels = (rng.random((2, 28, 28)) * 255).astype(np.uint8)
    photo = (rng.random((60, 40, 3)) * 255).astype(np.uint8)
    files = [("files", ("a.png", _png(pixels[0]))), ("files", ("b.png", _png(pixels[1])))]
    files.append(("files", ("photo.jpg", _png(photo, "JPEG"))))
    r = client.post("/predict/image", files=files, data={"num_samples": "10", "seed": "5"})
    assert r.status_code == 200, r.text
    converted = InputConvention().image_to_raw(_png(photo, "JPEG"))
    x = [*(pixels.astype(np.float32) / np.float32(255)).tolist(), converted.tolist()]
    assert r.json() == predict(client, inputs=x, num_samples=10, seed=5)


BAD_FILES: list[tuple[str, dict[str, Any], int, str]] = [
    (
        "not an image",
        {"files": [("files", ("notes.txt", b"hello"))]},
        422,
        "files[0] ('notes.txt') is not an image file",
    ),
    (
        "truncated",
        {"files": [("files", ("t.png", b"\x89PNG\r\n\x1a\n" + b"0" * 30))]},
        422,
        "files[0] ('t.png') cannot be read",
    ),
    ("no files", {"files": {"seed": (None, "1")}}, 422, "files: Field required"),
    (
        "a form, not multipart",
        {"data": {"seed": "1"}},
        415,
        "body is application/x-www-form-urlencoded; this endpoint takes multipart/form-data",
    ),
    ("too many", {"files": [("files", ("a.png", b"x"))] * (MAX_BATCH + 1)}, 413, "max_batch"),
    (
        "num_samples 0",
        {"files": [("files", ("a.png", b"x"))], "data": {"num_samples": "0"}},
        422,
        "num_samples",
    ),
    (
        "num_samples over server max",
        {"files": [("files", ("a.png", b"x"))], "data": {"num_samples": str(MAX_K + 1)}},
        422,
        f"less than or equal to {MAX_K}",
    ),
    (
        "seed not a number",
        {"files": [("files", ("a.png", b"x"))], "data": {"seed": "seven"}},
        422,
        "seed",
    ),
    (
        "unknown field",
        {"files": [("files", ("a.png", b"x"))], "data": {"samples": "3"}},
        422,
        "samples: Extra inputs",
    ),
    ("a string for a file", {"files": {"files": (None, "abc")}}, 422, "files[0]"),
    (
        "broken multipart",
        {"content": b"garbage", "headers": {"content-type": "multipart/form-data"}},
        422,
        "not a valid multipart form",
    ),
    (
        "JSON body",
        {"json": {"inputs": [GOOD]}},
        415,
        "body is application/json; this endpoint takes multipart/form-data",
    ),
]


@pytest.mark.parametrize(
    ("request_kwargs", "status", "message"),
    [case[1:] for case in BAD_FILES],
    ids=[case[0] for case in BAD_FILES],
)
def test_bad_image_uploads_are_a_4xx_naming_the_problem(
    client: Any, request_kwargs: dict[str, Any], status: int, message: str
) -> None:
    r = client.post("/predict/image", **request_kwargs)
    assert r.status_code == status, r.text
    assert message in r.json()["message"], r.text


def test_an_image_over_the_pixel_limit_is_413_before_it_is_decoded(client: Any) -> None:
    from PIL import Image

    out = io.BytesIO()
    Image.new("L", (5000, 4000)).save(out, format="PNG")  # 20 MP, a 90 kB file
    r = client.post("/predict/image", files=[("files", ("big.png", out.getvalue()))])
    assert r.status_code == 413 and "5000x4000 pixels" in r.text, r.text


def test_score_without_calibrated_threshold_is_422(tmp_path: Path, ckpt: Checkpoint) -> None:
    from apd.checkpoint import save_checkpoint

    anomaly = ckpt.meta.anomaly.model_copy(
        update={"thresholds": {ScoreName.MUTUAL_INFORMATION: 0.1}}
    )
    path = tmp_path / "one-score.safetensors"
    save_checkpoint(path, ckpt.meta.model_copy(update={"anomaly": anomaly}), ckpt.tensors)
    with make_client(create_app(settings_for(path))) as c:
        response = c.post("/anomaly-score", json={"inputs": [GOOD], "score": "model_variance"})
    assert response.status_code == 422
    assert "no calibrated threshold" in response.text and "mutual_information" in response.text


def _asgi_post(app: Any, chunks: int, content_length: int | None, stall: bool = False) -> Any:
    """POST /predict straight into the ASGI app, body fed in 16 KiB chunks; returns
    (status, body, chunks the app asked for)."""
    chunk = b"[" + b"0.5," * 4096
    asked = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal asked
        asked += 1
        if stall and asked > 1:
            await anyio.sleep(30)
        if asked > chunks:
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [(b"content-type", b"application/json")]
    if content_length is not None:
        headers.append((b"content-length", str(content_length).encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/predict",
        "raw_path": b"/predict",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }
    anyio.run(app, scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], payload, asked


def test_oversized_body_is_refused_without_being_read(ckpt_path: Path) -> None:
    app = create_app(settings_for(ckpt_path))
    status, _, asked = _asgi_post(app, chunks=1000, content_length=10**9)
    assert status == 413 and asked == 0  # from Content-Length alone
    status, payload, asked = _asgi_post(app, chunks=1000, content_length=None)
    assert status == 413 and asked <= MAX_BODY // (16 * 1024) + 2  # stops once over the limit
    assert b"max_body_bytes" in payload


def test_slow_body_gets_408(ckpt_path: Path) -> None:
    app = create_app(settings_for(ckpt_path, body_timeout_s=0.2))
    status, payload, _ = _asgi_post(app, chunks=10, content_length=None, stall=True)
    assert status == 408 and b"body_timeout_s" in payload


# --- health, model, metrics, OpenAPI -----------------------------------------------------


def test_health_and_readiness(client: Any, ckpt: Checkpoint) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() | {"checkpoint_sha256": None} == {
        "status": "ready",
        "cache": "memory",
        "redis": "disabled",
        "degraded": False,
        "pool_networks": 50,
        "checkpoint_sha256": None,
    }
    assert ready.json()["checkpoint_sha256"] == ckpt.sha256


def test_not_ready_before_startup(ckpt_path: Path) -> None:
    app = create_app(settings_for(ckpt_path))
    client = make_client(app)  # no `with`: the lifespan has not run
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 503
    assert client.post("/predict", json={"inputs": [GOOD]}).status_code == 503


def test_model_info(client: Any, ckpt: Checkpoint, ckpt_path: Path) -> None:
    info = client.get("/v1/model").json()
    assert info["id"] == ckpt.meta.model_id and info["sha256"] == ckpt.sha256
    assert info["checkpoint_bytes"] == ckpt_path.stat().st_size
    assert info["target"]["layer_sizes"] == list(TARGET_SIZES)
    assert info["parameter_count"] == ckpt.num_params
    assert info["default_num_samples"] == ckpt.meta.num_samples_default
    assert info["anomaly"]["thresholds"] == {
        k.value: v for k, v in ckpt.meta.anomaly.thresholds.items()
    }
    assert info["anomaly"]["target_fpr"] == ckpt.meta.anomaly.target_fpr
    assert info["provenance"]["code_revision"] == ckpt.meta.provenance.code_revision
    assert info["limits"] == {
        "max_batch": MAX_BATCH,
        "max_num_samples": MAX_K,
        "max_body_bytes": MAX_BODY,
        "networks_per_block": 10,
    }


def metric(client: Any, name: str, labels: dict[str, str] | None = None) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(
                sample.labels.get(k) == v for k, v in (labels or {}).items()
            ):
                return float(sample.value)
    raise AssertionError(f"{name}{labels or ''} not exported")


def test_metrics_count_requests_networks_and_flags(ckpt_path: Path) -> None:
    with make_client(create_app(settings_for(ckpt_path))) as c:
        assert metric(c, "apd_cache_misses_total") == 0  # the pool is drawn, not looked up
        assert metric(c, "apd_posterior_networks_generated_total") == 50
        x = random_images(4, seed=11).tolist()
        answers = [
            predict(c, inputs=x, num_samples=20),
            predict(c, inputs=x, num_samples=30, seed=5),
        ]
        flagged = sum(p["anomaly"]["is_anomaly"] for a in answers for p in a["predictions"])
        c.post("/predict", json={"inputs": []})
        c.get("/nowhere")
        ok = {"endpoint": "/predict", "method": "POST", "status": "200"}
        assert metric(c, "apd_requests_total", ok) == 2
        bad = {"endpoint": "/predict", "method": "POST", "status": "422"}
        assert metric(c, "apd_requests_total", bad) == 1
        assert metric(c, "apd_requests_total", {"endpoint": "unmatched", "status": "404"}) == 1
        assert metric(c, "apd_request_duration_seconds_count", {"endpoint": "/predict"}) == 3
        assert metric(c, "apd_posterior_networks_sampled_total") == 50
        assert metric(c, "apd_cache_misses_total") == 3  # the seeded request's 3 blocks
        assert metric(c, "apd_anomaly_flags_total", {"score": "mutual_information"}) == flagged
        assert metric(c, "apd_requests_in_flight") == 1  # this /metrics request
        assert metric(c, "apd_cache_degraded") == 0
        info = {"model_id": "test-fcnn", "backend": "numpy-factored"}
        assert metric(c, "apd_model_info", info) == 1
        predict(c, inputs=x, num_samples=30, seed=5)
        assert metric(c, "apd_cache_hits_total", {"tier": "memory"}) == 3


def test_openapi_is_the_contract(client: Any) -> None:
    doc = client.get("/openapi.json").json()
    paths = doc["paths"]
    for path, method in [
        ("/predict", "post"),
        ("/anomaly-score", "post"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/v1/model", "get"),
        ("/metrics", "get"),
    ]:
        assert method in paths[path], path
    for path in ("/predict", "/anomaly-score"):
        responses = paths[path]["post"]["responses"]
        assert {"200", "413", "422"} <= set(responses)
    schemas = doc["components"]["schemas"]
    example = schemas["PredictRequest"]["examples"][0]
    assert np.shape(example["inputs"][0]) == (28, 28) and example["seed"] == 7
    # The documented example is a real request.
    assert client.post("/predict", json=example).status_code == 200
    # The served model's input shape, level by level, and its value range.
    flat, nested = schemas["PredictRequest"]["properties"]["inputs"]["items"]["oneOf"]
    assert (flat["minItems"], flat["maxItems"]) == (784, 784)
    assert flat["items"] == {"type": "number", "minimum": 0.0, "maximum": 1.0}
    assert (nested["minItems"], nested["maxItems"]) == (28, 28)
    row = nested["items"]
    assert (row["minItems"], row["maxItems"], row["items"]["maximum"]) == (28, 28, 1.0)
    # Answer examples are the shipped model's: not shown for another one.
    assert "examples" not in schemas["PredictResponse"]
    assert "examples" not in schemas["AnomalyScoreResponse"]
    prediction = schemas["Prediction"]["properties"]
    assert prediction["label"]["maximum"] == 9 and prediction["probabilities"]["maxItems"] == 10
    assert "enum" not in prediction["label_name"]  # the checkpoint names no classes
    num_samples = schemas["PredictRequest"]["properties"]["num_samples"]["anyOf"][0]
    assert num_samples["maximum"] == MAX_K  # this server's limit, not only the API's 1000
    assert schemas["PredictRequest"]["properties"]["inputs"]["maxItems"] == MAX_BATCH
    assert {"label", "label_name", "probabilities", "uncertainty", "anomaly"} <= set(prediction)
    uncertainty = schemas["Uncertainty"]["properties"]
    assert set(uncertainty) == {
        "predictive_entropy",
        "expected_entropy",
        "mutual_information",
        "model_variance",
        "data_support",  # absent from answers of checkpoints without a data-support fit
    }


def test_a_residual_generator_is_served_from_codes_exactly_per_input(tmp_path: Path) -> None:
    """With residual noise a network is its code and the noise of its forward (the local
    reparameterisation, :mod:`apd.factored`): each input's answer is what the weight-space
    networks give it for the weight noise :func:`weight_noise_matching` builds, and seeded
    answers repeat."""
    path = make_checkpoint(tmp_path / "residual.safetensors", residual=True)
    ckpt = load_checkpoint(path)
    std = ckpt.residual_std
    assert std is not None and isinstance(ckpt.spec, MLPSpec)
    x = random_images(3, seed=11)
    with make_client(create_app(settings_for(path))) as c:
        got = predict(c, inputs=x.tolist(), num_samples=15, seed=9)
        assert predict(c, inputs=x.tolist(), num_samples=15, seed=9) == got
    residual_dim = ckpt.spec.layer_sizes[1] + ckpt.num_params - tail_start(ckpt.spec)
    stream = Stream.for_seed(9)
    zs, noise = zip(
        *(block_noise(stream, b, ckpt.noise_dim, residual_dim) for b in range(2)), strict=True
    )
    z, residual = np.concatenate(zs)[:15], np.concatenate(noise)[:15]
    for i, p in enumerate(got["predictions"]):
        eps = weight_noise_matching(ckpt.spec, std, residual, x[i])
        reference = summarize(forward_probs(ckpt.spec, ckpt.generate(z, eps), x[i : i + 1]))
        np.testing.assert_allclose(
            p["probabilities"], reference.probabilities[0], rtol=1e-4, atol=1e-6
        )
        assert p["uncertainty"]["mutual_information"] == pytest.approx(
            float(reference.mutual_information[0]), rel=1e-3, abs=1e-6
        )
