"""Open Inference Protocol (KServe V2) REST against a live ``apd serve`` on loopback.

``tritonclient[http]`` (the reference client of the protocol) checks health, metadata and
``infer`` with JSON and binary tensors in both directions; every answer is compared with
``/predict`` (or ``/anomaly-score``) for the same seed, which ``test_service_api`` checks
against an independent computation. Plain ``httpx`` checks the wire format itself (JSON
bodies, the binary layout built and read by hand) and that every error is
``{"error": message}`` naming the tensor or parameter at fault.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from apd.checkpoint import load_checkpoint
from tests.harness import ServeProcess, apd_serve
from tests.service_support import make_checkpoint, random_images

tritonclient_http = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

MODEL = "v2-test"
MAX_BATCH = 8
MAX_K = 50
MAX_BODY = 512 * 1024
K = 20
SEED = 7
OUTPUTS = {
    "probabilities": ("FP32", np.float32),
    "label": ("INT64", np.int64),
    "predictive_entropy": ("FP32", np.float32),
    "expected_entropy": ("FP32", np.float32),
    "mutual_information": ("FP32", np.float32),
    "model_variance": ("FP32", np.float32),
    "anomaly_score": ("FP32", np.float32),
    "is_anomaly": ("BOOL", np.bool_),
}
HEADER = "Inference-Header-Content-Length"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    ckpt = make_checkpoint(tmp_path_factory.mktemp("v2") / "model.safetensors", model_id=MODEL)
    args = ["--max-batch", str(MAX_BATCH), "--max-num-samples", str(MAX_K)]
    args += ["--max-body-bytes", str(MAX_BODY), "--pool-size", "20"]
    with apd_serve(ckpt, args=args) as proc:
        yield proc


@pytest.fixture(scope="module")
def http(server: ServeProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=30.0) as client:
        yield client


@pytest.fixture(scope="module")
def triton(server: ServeProcess) -> Iterator[Any]:
    client = tritonclient_http.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    yield client
    client.close()


def predict(http: httpx.Client, x: NDArray[np.float32], **fields: Any) -> dict[str, Any]:
    r = http.post("/predict", json={"inputs": x.tolist(), **fields})
    assert r.status_code == 200, r.text
    return dict(r.json())


def expected_outputs(answer: dict[str, Any]) -> dict[str, NDArray[Any]]:
    """``/predict``'s answer as the V2 output tensors (FP32 outputs rounded to float32)."""
    preds = answer["predictions"]
    unc = {k: [p["uncertainty"][k] for p in preds] for k in preds[0]["uncertainty"]}
    return {
        "probabilities": np.array([p["probabilities"] for p in preds], dtype=np.float32),
        "label": np.array([p["label"] for p in preds], dtype=np.int64),
        **{k: np.array(v, dtype=np.float32) for k, v in unc.items()},
        "anomaly_score": np.array([p["anomaly"]["score"] for p in preds], dtype=np.float32),
        "is_anomaly": np.array([p["anomaly"]["is_anomaly"] for p in preds], dtype=np.bool_),
    }


def triton_infer(
    triton: Any,
    x: NDArray[Any],
    *,
    datatype: str = "FP32",
    binary_in: bool = True,
    binary_out: bool | None = True,
    outputs: list[str] | None = None,
    name: str = "input",
    model: str = MODEL,
    **params: Any,
) -> Any:
    tensor = tritonclient_http.InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x, binary_data=binary_in)
    requested = None
    if binary_out is not None:
        requested = [
            tritonclient_http.InferRequestedOutput(n, binary_data=binary_out)
            for n in (outputs or list(OUTPUTS))
        ]
    return triton.infer(model, [tensor], outputs=requested, parameters=params or None)


def assert_same(got: dict[str, NDArray[Any]], want: dict[str, NDArray[Any]]) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def refused(call: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


# ---- Health and metadata -------------------------------------------------------------------


def test_health_and_model_readiness(triton: Any, http: httpx.Client) -> None:
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready(MODEL)
    assert not triton.is_model_ready("no-such-model")
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").json() == {"ready": True}
    assert http.get(f"/v2/models/{MODEL}/ready").json() == {"name": MODEL, "ready": True}


def test_server_and_model_metadata(triton: Any, server: ServeProcess) -> None:
    server_meta = triton.get_server_metadata()
    assert server_meta["name"] == "apd"
    assert "binary_tensor_data" in server_meta["extensions"]
    meta = triton.get_model_metadata(MODEL)
    ckpt = load_checkpoint(_checkpoint_path(server))
    assert meta["name"] == MODEL
    assert meta["versions"] == ["1"]  # repository versions: one checkpoint is version 1
    assert ckpt.meta.model_id == MODEL
    assert meta["platform"] == "apd-generator"
    (inp,) = meta["inputs"]
    assert (inp["name"], inp["datatype"], inp["shape"]) == ("input", "FP32", [-1, 28, 28])
    assert inp["parameters"]["accepted_datatypes"] == ["FP32", "UINT8"]
    assert inp["parameters"]["accepted_shapes"] == [[-1, 28, 28], [-1, 784]]
    got = {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]}
    classes = ckpt.spec.num_classes
    assert got == {
        n: (dt, [-1, classes] if n == "probabilities" else [-1]) for n, (dt, _) in OUTPUTS.items()
    }
    assert refused(lambda: triton.get_model_metadata("no-such-model")).status() == "404"


def _checkpoint_path(server: ServeProcess) -> Path:
    args = server.proc.args
    assert isinstance(args, list)
    return Path(args[args.index("--checkpoint") + 1])


# ---- Inference: the same numbers as /predict -----------------------------------------------


@pytest.mark.parametrize(
    ("binary_in", "binary_out"), [(True, True), (False, False), (True, False), (False, True)]
)
def test_infer_gives_the_numbers_of_predict(
    triton: Any, http: httpx.Client, binary_in: bool, binary_out: bool
) -> None:
    x = random_images(6, seed=11)
    want = expected_outputs(predict(http, x, num_samples=K, seed=SEED))
    assert want["is_anomaly"].any() and not want["is_anomaly"].all()  # both flags occur
    result = triton_infer(
        triton, x, binary_in=binary_in, binary_out=binary_out, num_samples=K, seed=SEED
    )
    assert_same({n: result.as_numpy(n) for n in OUTPUTS}, want)
    for name in OUTPUTS:  # the answer really took the requested form
        tensor = result.get_output(name)
        assert ("binary_data_size" in (tensor.get("parameters") or {})) is binary_out
        assert ("data" in tensor) is not binary_out
    params = result.get_response()["parameters"]
    assert params == {"num_samples": K, "seed": SEED, "score": "mutual_information"} | {
        "threshold": params["threshold"]
    }


def test_nested_shape_and_uint8_images_are_the_same_inputs(triton: Any, http: httpx.Client) -> None:
    pixels = np.random.default_rng(3).integers(0, 256, size=(4, 784), dtype=np.uint8)
    x = pixels.astype(np.float64) / 255.0  # /predict's convention: pixel / 255
    want = expected_outputs(predict(http, x.astype(np.float32), num_samples=K, seed=SEED))
    forms: list[tuple[NDArray[Any], str]] = [(pixels, "UINT8"), (x.astype(np.float32), "FP32")]
    for sent, datatype in forms:
        for shape in [(4, 784), (4, 28, 28)]:
            result = triton_infer(
                triton, sent.reshape(shape), datatype=datatype, num_samples=K, seed=SEED
            )
            assert_same({n: result.as_numpy(n) for n in OUTPUTS}, want)
    json_uint8 = triton_infer(
        triton, pixels, datatype="UINT8", binary_in=False, num_samples=K, seed=SEED
    )
    assert_same({n: json_uint8.as_numpy(n) for n in OUTPUTS}, want)


def test_score_parameter_matches_anomaly_score(triton: Any, http: httpx.Client) -> None:
    x = random_images(5, seed=4)
    r = http.post(
        "/anomaly-score",
        json={"inputs": x.tolist(), "num_samples": K, "seed": SEED, "score": "max_probability"},
    )
    assert r.status_code == 200, r.text
    want = r.json()
    result = triton_infer(
        triton,
        x,
        outputs=["anomaly_score", "is_anomaly"],
        num_samples=K,
        seed=SEED,
        score="max_probability",
    )
    np.testing.assert_array_equal(
        result.as_numpy("anomaly_score"), np.array(want["scores"], dtype=np.float32)
    )
    np.testing.assert_array_equal(result.as_numpy("is_anomaly"), np.array(want["is_anomaly"]))
    params = result.get_response()["parameters"]
    assert (params["score"], params["threshold"]) == ("max_probability", want["threshold"])


def test_outputs_subset_in_request_order_and_default_all_binary(triton: Any) -> None:
    x = random_images(3, seed=5)
    subset = triton_infer(triton, x, outputs=["is_anomaly", "label"], seed=SEED)
    assert [o["name"] for o in subset.get_response()["outputs"]] == ["is_anomaly", "label"]
    everything = triton_infer(triton, x, binary_out=None, seed=SEED)  # no outputs: all, binary
    answer = everything.get_response()
    assert [o["name"] for o in answer["outputs"]] == list(OUTPUTS)
    assert all("binary_data_size" in o["parameters"] for o in answer["outputs"])
    np.testing.assert_array_equal(subset.as_numpy("label"), everything.as_numpy("label"))
    probs = everything.as_numpy("probabilities")
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(everything.as_numpy("label"), probs.argmax(axis=1))


def test_without_seed_the_networks_come_from_the_pool(triton: Any) -> None:
    result = triton_infer(triton, random_images(2, seed=6), outputs=["probabilities"])
    assert "seed" not in result.get_response()["parameters"]
    np.testing.assert_allclose(result.as_numpy("probabilities").sum(axis=1), 1.0, atol=1e-5)


# ---- Errors: 4xx naming the tensor or parameter --------------------------------------------


@pytest.mark.parametrize(
    ("case", "status", "words"),
    [
        ({"name": "pixels"}, "400", ["inputs[0].name", "'pixels'", "'input'"]),
        ({"datatype": "FP64"}, "400", ["datatype", "'FP64'", "FP32 or UINT8"]),
        ({"datatype": "INT32"}, "400", ["datatype", "'INT32'"]),
        ({"shape": (2, 783)}, "400", ["shape", "[2, 783]", "[N, 28, 28] or [N, 784]"]),
        ({"shape": (784,)}, "400", ["shape", "[784]"]),
        ({"value": 1.5}, "400", ["element [0, 0]", "1.5", "[0, 1]"]),
        ({"value": float("nan")}, "400", ["element [0, 0]", "nan"]),
        ({"params": {"num_samples": MAX_K + 1}}, "400", ["num_samples", "max_num_samples"]),
        ({"params": {"num_samples": 0}}, "400", ["parameters.num_samples", "greater than"]),
        ({"params": {"num_samples": "many"}}, "400", ["parameters.num_samples", "integer"]),
        ({"params": {"seed": -1}}, "400", ["parameters.seed"]),
        ({"params": {"score": "loudness"}}, "400", ["parameters.score", "mutual_information"]),
        ({"params": {"temperature": 1}}, "400", ["parameters.temperature", "not permitted"]),
        ({"outputs": ["logits"]}, "400", ["outputs[0].name", "'logits'", "probabilities"]),
        ({"batch": MAX_BATCH + 1}, "413", ["input", f"max_batch={MAX_BATCH}"]),
        ({"model": "no-such-model"}, "404", ["no-such-model", MODEL]),
    ],
)
@pytest.mark.parametrize("binary_in", [True, False])
def test_bad_requests_are_4xx_naming_the_problem(
    triton: Any, case: dict[str, Any], status: str, words: list[str], binary_in: bool
) -> None:
    x: NDArray[Any] = random_images(case.get("batch", 2), seed=8)
    datatype = case.get("datatype", "FP32")
    if datatype == "FP64":
        x = x.astype(np.float64)
    elif datatype == "INT32":
        x = (x * 255).astype(np.int32)
    if "value" in case:
        x[0, 0] = case["value"]
    if "shape" in case:
        n = int(np.prod(case["shape"]))
        x = np.resize(x.reshape(-1), n).reshape(case["shape"])
    err = refused(
        lambda: triton_infer(
            triton,
            x,
            datatype=datatype,
            binary_in=binary_in,
            name=case.get("name", "input"),
            model=case.get("model", MODEL),
            outputs=case.get("outputs"),
            **case.get("params", {}),
        )
    )
    assert err.status() == status, err.message()
    for word in words:
        assert word in err.message(), (word, err.message())


# ---- The wire format, with plain httpx -----------------------------------------------------


def _json_request(x: NDArray[Any], **extra: Any) -> dict[str, Any]:
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}
    return {"inputs": [tensor], "parameters": {"num_samples": K, "seed": SEED}, **extra}


@pytest.mark.parametrize("content_type", [None, "application/json", "text/plain; charset=utf-8"])
def test_a_body_of_another_media_type_is_415_naming_json(
    http: httpx.Client, content_type: str | None
) -> None:
    """JSON, or a body without Content-Type (the protocol names none), is read; a text body
    is 415 naming what to send. Binary bodies are read (test_binary_*)."""
    body = json.dumps(_json_request(random_images(1, seed=2))).encode()
    headers = {"content-type": content_type} if content_type else {}
    r = http.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers)
    if content_type is None or content_type == "application/json":
        assert r.status_code == 200, r.text
        return
    assert r.status_code == 415, r.text
    assert r.json() == {
        "error": "body is text/plain; this endpoint takes application/json (or "
        "application/octet-stream with the Inference-Header-Content-Length header, the binary "
        "tensor data extension)"
    }


def test_plain_json_request_and_answer(http: httpx.Client) -> None:
    x = random_images(3, seed=9)
    want = expected_outputs(predict(http, x, num_samples=K, seed=SEED))
    r = http.post(f"/v2/models/{MODEL}/infer", json=_json_request(x.reshape(3, 28, 28), id="a1"))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert HEADER not in r.headers
    answer = r.json()
    assert answer["model_name"] == MODEL and answer["id"] == "a1"
    got = {}
    for tensor in answer["outputs"]:
        datatype, dtype = OUTPUTS[tensor["name"]]
        assert tensor["datatype"] == datatype
        assert tensor["shape"] == list(want[tensor["name"]].shape)
        got[tensor["name"]] = np.array(tensor["data"], dtype=dtype).reshape(tensor["shape"])
    assert_same(got, want)


def test_binary_layout_built_and_read_by_hand(http: httpx.Client) -> None:
    x = random_images(4, seed=10)
    want = expected_outputs(predict(http, x, num_samples=K, seed=SEED))
    raw = x.astype("<f4").tobytes()
    header = {
        "inputs": [
            {
                "name": "input",
                "shape": [4, 784],
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "outputs": [
            {"name": "label", "parameters": {"binary_data": False}},
            {"name": "probabilities"},
            {"name": "is_anomaly"},
        ],
        "parameters": {"num_samples": K, "seed": SEED, "binary_data_output": True},
    }
    head = json.dumps(header).encode()
    r = http.post(
        f"/v2/models/{MODEL}/infer",
        content=head + raw,
        headers={HEADER: str(len(head)), "Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    size = int(r.headers[HEADER])
    answer = json.loads(r.content[:size])
    label, probs, flags = answer["outputs"]
    assert label["data"] == want["label"].tolist()
    probs_size = probs["parameters"]["binary_data_size"]
    assert probs_size == want["probabilities"].nbytes
    assert flags["parameters"]["binary_data_size"] == len(want["is_anomaly"])
    body = r.content[size:]
    assert len(body) == probs_size + len(want["is_anomaly"])
    np.testing.assert_array_equal(
        np.frombuffer(body[:probs_size], dtype="<f4").reshape(4, -1), want["probabilities"]
    )
    np.testing.assert_array_equal(np.frombuffer(body[probs_size:], dtype="?"), want["is_anomaly"])


def _post_error(http: httpx.Client, status: int, **kwargs: Any) -> str:
    r = http.post(f"/v2/models/{MODEL}/infer", **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    return str(body["error"])


def test_malformed_bodies_are_400_with_an_error_body(http: httpx.Client) -> None:
    x = random_images(2, seed=12)
    raw = x.tobytes()
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [2, 784],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    assert "not valid JSON" in _post_error(http, 400, content=b"{not json")
    assert "inputs" in _post_error(http, 400, json={"outputs": []})
    assert "binary_data_size" in _post_error(
        http, 400, content=head + raw[:-4], headers={HEADER: str(len(head))}
    )
    assert "after the JSON header" in _post_error(
        http, 400, content=head + raw + b"xx", headers={HEADER: str(len(head))}
    )
    assert HEADER in _post_error(http, 400, content=head + raw, headers={HEADER: "lots"})
    assert HEADER in _post_error(http, 400, content=head, headers={HEADER: str(len(head) + 1)})
    request = _json_request(x)
    request["inputs"][0]["data"] = [[0.5] * 784, [0.5] * 783]
    assert "ragged" in _post_error(http, 400, json=request)
    request["inputs"][0]["data"] = ["0.5"] * (2 * 784)
    assert "numbers" in _post_error(http, 400, json=request)
    request["inputs"][0] |= {"datatype": "UINT8", "data": [256] * (2 * 784)}
    assert "[0, 255]" in _post_error(http, 400, json=request)
    request["inputs"][0] |= {"datatype": "FP32", "data": [0.5] * 100}
    assert "1568" in _post_error(http, 400, json=request)
    assert "not permitted" in _post_error(http, 400, json=_json_request(x, extra=1))
    assert "requested twice" in _post_error(
        http, 400, json=_json_request(x, outputs=[{"name": "label"}, {"name": "label"}])
    )
    assert "2 tensors" in _post_error(
        http, 400, json={"inputs": [_json_request(x)["inputs"][0]] * 2}
    )


def test_body_over_the_limit_is_413(http: httpx.Client) -> None:
    body = b"{" + b" " * MAX_BODY + b"}"
    r = http.post(f"/v2/models/{MODEL}/infer", content=body)
    assert r.status_code == 413  # refused from its Content-Length, before routing
    assert "max_body_bytes" in r.json()["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: cut off while it streams
        for _ in range(MAX_BODY // 4096 + 2):
            yield b" " * 4096

    assert "max_body_bytes" in _post_error(http, 413, content=chunks())


# ---- Robustness: whatever the body, a 2xx or a 4xx in the documented form ------------------

_json_scalars = (
    st.none() | st.booleans() | st.integers(-300, 300) | st.floats() | st.text(max_size=5)
)
_json = st.recursive(
    _json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


FAULTS = (
    "batch",
    "sample_shape",
    "shape_json",
    "name",
    "datatype",
    "count",
    "values",
    "params",
    "outputs",
    "binary_size",
    "header_length",
    "data_json",
)


@st.composite
def v2_bodies(draw: st.DrawFn) -> tuple[bytes, dict[str, str], frozenset[str]]:
    """V2 requests, JSON or binary, valid or with up to two injected faults."""
    faults = draw(st.sets(st.sampled_from(FAULTS), max_size=2))
    n = draw(st.integers(0, MAX_BATCH + 1) if "batch" in faults else st.integers(1, 3))
    sample = draw(
        st.sampled_from(
            [[783], [28, 27], [], [784, 1]] if "sample_shape" in faults else [[784], [28, 28]]
        )
    )
    shape: Any = draw(_json) if "shape_json" in faults else [n, *sample]
    datatype = draw(
        st.sampled_from(
            ["FP64", "BOOL", "INT64", "fp32", ""] if "datatype" in faults else ["FP32", "UINT8"]
        )
    )
    count = n * 784 + (draw(st.sampled_from([-1, 1, -784])) if "count" in faults else 0)
    rng = np.random.default_rng(max(count, 0))  # count is -1 for n = 0 with a count fault
    if datatype == "FP32":
        values: NDArray[Any] = rng.random(max(count, 0)).astype(np.float32)
        if "values" in faults and count > 0:
            values[draw(st.integers(0, count - 1))] = draw(
                st.sampled_from([-0.1, 1.5, np.nan, np.inf])
            )
    else:
        values = rng.integers(0, 256, max(count, 0)).astype(np.uint8)
    tensor: dict[str, Any] = {"name": draw(st.text(max_size=6)) if "name" in faults else "input"}
    tensor |= {"shape": shape, "datatype": datatype}
    params = draw(
        st.dictionaries(
            st.sampled_from(["num_samples", "seed", "score", "binary_data_output", "other"]),
            st.integers(-2, MAX_K + 2) | st.sampled_from(["max_probability", "nope", True]) | _json,
            max_size=3,
        )
        if "params" in faults
        else st.fixed_dictionaries(
            {},
            optional={
                "num_samples": st.integers(1, MAX_K),
                "seed": st.integers(0, 2**63 - 1),
                "score": st.sampled_from(["max_probability", "model_variance"]),
                "binary_data_output": st.booleans(),
            },
        )
    )
    request: dict[str, Any] = {"inputs": [tensor], "parameters": params}
    names = st.sampled_from([*OUTPUTS, "logits"] if "outputs" in faults else list(OUTPUTS))
    binary_flag = _json if "outputs" in faults else st.booleans()
    if draw(st.booleans()):
        request["outputs"] = [
            {"name": name} | ({"parameters": {"binary_data": draw(binary_flag)}} if flag else {})
            for name, flag in draw(
                st.lists(st.tuples(names, st.booleans()), max_size=4, unique_by=lambda t: t[0])
            )
        ]
    if draw(st.booleans()):  # binary input
        raw = values.astype({"FP32": "<f4", "UINT8": "u1"}.get(datatype, "<f8")).tobytes()
        size = len(raw) + (
            draw(st.sampled_from([-1, 2, -len(raw)])) if "binary_size" in faults else 0
        )
        tensor["parameters"] = {"binary_data_size": size}
        head = json.dumps(request).encode()
        declared = len(head)
        if "header_length" in faults:
            declared += draw(st.sampled_from([-1, 1, 10**6]))
        return head + raw, {HEADER: str(declared)}, frozenset(faults)
    tensor["data"] = draw(_json) if "data_json" in faults else values.tolist()
    return json.dumps(request).encode(), {}, frozenset(faults)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(case=v2_bodies())
def test_any_body_gets_an_answer_or_a_4xx_error(http: httpx.Client, case: Any) -> None:
    """A valid request is answered (and the answer decodes); a faulty one gets 200 where the
    fault happened to be harmless, else a 4xx whose body is ``{"error": message}``."""
    body, headers, faults = case
    r = http.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers)
    assert r.status_code in ((200,) if not faults else (200, 400, 413)), (faults, r.text)
    if r.status_code != 200:
        answer = r.json()
        assert set(answer) == {"error"} and answer["error"], answer
        return
    length = r.headers.get(HEADER)
    result = tritonclient_http.InferResult.from_response_body(
        r.content, header_length=int(length) if length else None
    )
    for tensor in result.get_response()["outputs"]:
        value = result.as_numpy(tensor["name"])
        assert value.dtype == OUTPUTS[tensor["name"]][1]
        if tensor["name"] == "probabilities":
            np.testing.assert_allclose(value.sum(axis=1), 1.0, atol=1e-5)
