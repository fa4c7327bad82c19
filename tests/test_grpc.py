"""Open Inference Protocol, gRPC, against a live ``apd serve --grpc-port`` on loopback.

The client is the protocol's own: ``tritonclient.grpc`` and, for what it cannot send (typed
contents, malformed messages), the stubs of the published proto that tritonclient ships
(``tritonclient.grpc.service_pb2``), never this repository's. Every answer is compared with
the REST answer of the same server for the same seed (``/predict``, which
``test_service_api`` checks against an independent computation, and V2 REST), and every
refusal with its REST twin: the same message, the status code of the API's table.

The server is a model repository: model ``m`` with versions 1 and 2 (different generators)
and a version 3 that fails to load (UNAVAILABLE).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from numpy.typing import NDArray

import apd
from tests.harness import ROOT, ServeProcess, apd_serve, free_port, rss_bytes
from tests.service_support import make_checkpoint, random_images

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
tritonclient_http = pytest.importorskip("tritonclient.http")
from tritonclient.grpc import service_pb2 as tpb  # noqa: E402
from tritonclient.grpc import service_pb2_grpc as tpb_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

MODEL = "m"
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
SHIPPED = ROOT / "models" / "mnist-fcnn1" / "model.safetensors"


class GrpcServer:
    def __init__(self, proc: ServeProcess, grpc_port: int) -> None:
        self.proc = proc
        self.url = f"127.0.0.1:{grpc_port}"
        self.port = grpc_port


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GrpcServer]:
    root = tmp_path_factory.mktemp("grpc-repo")
    for version, seed in [(1, 0), (2, 1)]:
        (root / MODEL / str(version)).mkdir(parents=True)
        make_checkpoint(root / MODEL / str(version) / "model.safetensors", seed=seed, model_id="x")
    (root / MODEL / "3").mkdir()
    (root / MODEL / "3" / "model.safetensors").write_bytes(b"not a checkpoint")
    port = free_port()
    args = ["--model-repository", str(root), "--grpc-port", str(port)]
    args += ["--max-batch", str(MAX_BATCH), "--max-num-samples", str(MAX_K)]
    args += ["--max-body-bytes", str(MAX_BODY), "--pool-size", "20"]
    args += ["--repository-poll-s", "600"]
    ckpt = root / MODEL / "1" / "model.safetensors"  # ignored beside --model-repository
    with apd_serve(ckpt, args=args) as proc:
        yield GrpcServer(proc, port)


@pytest.fixture(scope="module")
def http(server: GrpcServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.proc.base_url, timeout=30.0) as client:
        yield client


@pytest.fixture(scope="module")
def triton(server: GrpcServer) -> Iterator[Any]:
    client = tritonclient_grpc.InferenceServerClient(url=server.url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def triton_rest(server: GrpcServer) -> Iterator[Any]:
    client = tritonclient_http.InferenceServerClient(url=f"127.0.0.1:{server.proc.port}")
    yield client
    client.close()


@pytest.fixture(scope="module")
def stub(server: GrpcServer) -> Iterator[Any]:
    """The published proto's stub (tritonclient's copy), for messages tritonclient won't build."""
    with grpc.insecure_channel(server.url) as channel:
        yield tpb_grpc.GRPCInferenceServiceStub(channel)


def refused(call: Callable[[], Any]) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def grpc_infer(
    triton: Any,
    x: NDArray[Any],
    *,
    datatype: str = "FP32",
    outputs: list[str] | None = None,
    name: str = "input",
    model: str = MODEL,
    version: str = "",
    **params: Any,
) -> Any:
    tensor = tritonclient_grpc.InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    requested = [tritonclient_grpc.InferRequestedOutput(n) for n in outputs] if outputs else None
    return triton.infer(
        model, [tensor], model_version=version, outputs=requested, parameters=params or None
    )


def rest_infer(
    triton_rest: Any,
    x: NDArray[Any],
    *,
    datatype: str = "FP32",
    outputs: list[str] | None = None,
    name: str = "input",
    model: str = MODEL,
    version: str = "",
    **params: Any,
) -> Any:
    tensor = tritonclient_http.InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x, binary_data=True)
    requested = (
        [tritonclient_http.InferRequestedOutput(n, binary_data=True) for n in outputs]
        if outputs
        else None
    )
    return triton_rest.infer(
        model, [tensor], model_version=version, outputs=requested, parameters=params or None
    )


def predicted(http: httpx.Client, x: NDArray[np.float32], **fields: Any) -> dict[str, NDArray[Any]]:
    """``/predict``'s answer as the output tensors (FP32 outputs rounded to float32)."""
    r = http.post("/predict", json={"inputs": x.tolist(), "model": MODEL, **fields})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    unc = {k: [p["uncertainty"][k] for p in preds] for k in preds[0]["uncertainty"]}
    return {
        "probabilities": np.array([p["probabilities"] for p in preds], dtype=np.float32),
        "label": np.array([p["label"] for p in preds], dtype=np.int64),
        **{k: np.array(v, dtype=np.float32) for k, v in unc.items()},
        "anomaly_score": np.array([p["anomaly"]["score"] for p in preds], dtype=np.float32),
        "is_anomaly": np.array([p["anomaly"]["is_anomaly"] for p in preds], dtype=np.bool_),
    }


def tensors(result: Any) -> dict[str, NDArray[Any]]:
    """Every output of a tritonclient result (gRPC or REST), in the answer's order."""
    response = result.get_response()
    names = (
        [o["name"] for o in response["outputs"]]
        if isinstance(response, dict)
        else [o.name for o in response.outputs]
    )
    return {name: result.as_numpy(name) for name in names}


def assert_same(got: dict[str, NDArray[Any]], want: dict[str, NDArray[Any]]) -> None:
    assert list(got) == list(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)


# ---- Health, metadata, repository index ---------------------------------------------------


def test_health_and_model_readiness(triton: Any) -> None:
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready(MODEL)  # its highest READY version, 2
    assert triton.is_model_ready(MODEL, "1")
    assert not triton.is_model_ready(MODEL, "3")  # found, failed to load: not ready
    for model, version in [("no-such-model", ""), (MODEL, "9"), (MODEL, "x")]:
        with pytest.raises(InferenceServerException) as info:
            triton.is_model_ready(model, version)
        err = info.value
        assert err.status() == "StatusCode.NOT_FOUND", err.message()


def test_server_metadata(triton: Any) -> None:
    meta = triton.get_server_metadata()
    assert (meta.name, meta.version) == ("apd", apd.__version__)


@pytest.mark.parametrize("version", ["", "1", "2"])
def test_model_metadata_is_the_rest_metadata(triton: Any, http: httpx.Client, version: str) -> None:
    path = f"/v2/models/{MODEL}" + (f"/versions/{version}" if version else "")
    want = http.get(path).json()
    meta = triton.get_model_metadata(MODEL, version)
    assert meta.name == want["name"] == MODEL
    assert list(meta.versions) == want["versions"] == [version or "2"]
    assert meta.platform == want["platform"]
    for got, expected in [(meta.inputs, want["inputs"]), (meta.outputs, want["outputs"])]:
        assert [(t.name, t.datatype, list(t.shape)) for t in got] == [
            (t["name"], t["datatype"], t["shape"]) for t in expected
        ]
    assert [t.name for t in meta.outputs] == list(OUTPUTS)
    assert [(t.name, t.datatype) for t in meta.inputs] == [("input", "FP32")]


def test_model_metadata_of_unknown_or_unavailable_versions(triton: Any) -> None:
    assert refused(lambda: triton.get_model_metadata("nope")).status() == "StatusCode.NOT_FOUND"
    assert refused(lambda: triton.get_model_metadata(MODEL, "9")).status() == (
        "StatusCode.NOT_FOUND"
    )
    err = refused(lambda: triton.get_model_metadata(MODEL, "3"))
    assert err.status() == "StatusCode.UNAVAILABLE" and "UNAVAILABLE" in err.message()


def test_repository_index_is_the_rest_index(triton: Any, stub: Any, http: httpx.Client) -> None:
    want = http.post("/v2/repository/index", json={}).json()
    got = triton.get_model_repository_index(as_json=True)["models"]
    assert [{"reason": "", **m} for m in got] == want  # proto3 JSON leaves out empty strings
    assert {(m["version"], m["state"]) for m in want} == {
        ("1", "READY"), ("2", "READY"), ("3", "UNAVAILABLE"),
    }  # fmt: skip
    assert all(bool(m["reason"]) == (m["state"] != "READY") for m in want)
    ready = stub.RepositoryIndex(tpb.RepositoryIndexRequest(ready=True)).models
    assert [(m.name, m.version, m.state, m.reason) for m in ready] == [
        (m["name"], m["version"], m["state"], m["reason"])
        for m in http.post("/v2/repository/index", json={"ready": True}).json()
    ]
    assert [m.version for m in ready] == ["1", "2"]


def test_repository_index_of_another_repository_is_not_found(stub: Any) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.RepositoryIndex(tpb.RepositoryIndexRequest(repository_name="other"))
    assert info.value.code() is grpc.StatusCode.NOT_FOUND


# ---- Inference: the numbers of REST -------------------------------------------------------


@pytest.mark.parametrize("version", ["", "1", "2"])
def test_infer_gives_the_numbers_of_predict(triton: Any, http: httpx.Client, version: str) -> None:
    x = random_images(6, seed=11)
    want = predicted(http, x, num_samples=K, seed=SEED, **({"version": version} if version else {}))
    result = grpc_infer(triton, x, version=version, num_samples=K, seed=SEED)
    assert_same(tensors(result), want)
    response = result.get_response(as_json=True)
    assert (response["model_name"], response["model_version"]) == (MODEL, version or "2")
    params = {k: next(iter(v.values())) for k, v in response["parameters"].items()}
    assert params["num_samples"] == str(K) and params["seed"] == str(SEED)  # int64: JSON strings
    assert params["score"] == "mutual_information"


def test_versions_answer_differently(triton: Any) -> None:
    """Version 1 and 2 are different generators: a request goes to the version it names."""
    x = random_images(3, seed=2)
    one = grpc_infer(triton, x, version="1", seed=SEED).as_numpy("probabilities")
    two = grpc_infer(triton, x, version="2", seed=SEED).as_numpy("probabilities")
    latest = grpc_infer(triton, x, seed=SEED).as_numpy("probabilities")
    assert not np.array_equal(one, two)
    np.testing.assert_array_equal(latest, two)


def test_score_parameter_and_outputs_subset(triton: Any, triton_rest: Any) -> None:
    x = random_images(5, seed=4)
    outputs = ["is_anomaly", "anomaly_score", "label"]
    params: dict[str, Any] = {"num_samples": K, "seed": SEED, "score": "max_probability"}
    got = grpc_infer(triton, x, outputs=outputs, **params)
    want = rest_infer(triton_rest, x, outputs=outputs, **params)
    assert [o.name for o in got.get_response().outputs] == outputs
    for name in outputs:
        np.testing.assert_array_equal(got.as_numpy(name), want.as_numpy(name), err_msg=name)
    rest_params = want.get_response()["parameters"]
    threshold = got.get_response().parameters["threshold"].double_param
    assert (got.get_response().parameters["score"].string_param, threshold) == (
        "max_probability",
        rest_params["threshold"],
    )


def test_uint8_images_and_nested_shapes_are_the_same_inputs(triton: Any, triton_rest: Any) -> None:
    pixels = np.random.default_rng(3).integers(0, 256, size=(4, 784), dtype=np.uint8)
    want = tensors(rest_infer(triton_rest, pixels, datatype="UINT8", num_samples=K, seed=SEED))
    for shape in [(4, 784), (4, 28, 28)]:
        sent = pixels.reshape(shape)
        got = tensors(grpc_infer(triton, sent, datatype="UINT8", num_samples=K, seed=SEED))
        assert_same(got, want)


def _typed_request(x: NDArray[Any], datatype: str, **params: Any) -> Any:
    request = tpb.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="input", datatype=datatype, shape=list(x.shape))
    if datatype == "FP32":
        tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
    else:
        tensor.contents.uint_contents.extend(x.reshape(-1).tolist())
    for key, value in params.items():
        if isinstance(value, str):
            request.parameters[key].string_param = value
        else:
            request.parameters[key].int64_param = value
    return request


def _raw_tensors(response: Any) -> dict[str, NDArray[Any]]:
    out = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        dtype = OUTPUTS[tensor.name][1]
        out[tensor.name] = np.frombuffer(raw, dtype=dtype).reshape(list(tensor.shape))
    return out


@pytest.mark.parametrize("datatype", ["FP32", "UINT8"])
def test_typed_contents_are_read_as_raw_contents(stub: Any, triton: Any, datatype: str) -> None:
    pixels = np.random.default_rng(5).integers(0, 256, size=(3, 784), dtype=np.uint8)
    x = pixels if datatype == "UINT8" else (pixels / np.float32(255)).astype(np.float32)
    want = tensors(grpc_infer(triton, x, datatype=datatype, num_samples=K, seed=SEED))
    response = stub.ModelInfer(_typed_request(x, datatype, num_samples=K, seed=SEED))
    assert_same(_raw_tensors(response), want)


def test_without_seed_the_networks_come_from_the_pool(triton: Any) -> None:
    result = grpc_infer(triton, random_images(2, seed=6), outputs=["probabilities", "label"])
    assert "seed" not in result.get_response().parameters
    probs = result.as_numpy("probabilities")
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(result.as_numpy("label"), probs.argmax(axis=1))


# ---- Refusals: REST's message, the API's status code ---------------------------------------


INVALID = "StatusCode.INVALID_ARGUMENT"


@pytest.mark.parametrize(
    ("case", "code", "rest_status"),
    [
        ({"name": "pixels"}, INVALID, "400"),
        ({"datatype": "FP64"}, INVALID, "400"),
        ({"datatype": "INT32"}, INVALID, "400"),
        ({"shape": (2, 783)}, INVALID, "400"),
        ({"value": 1.5}, INVALID, "400"),
        ({"value": float("nan")}, INVALID, "400"),
        ({"params": {"num_samples": MAX_K + 1}}, INVALID, "400"),
        ({"params": {"num_samples": 1001}}, INVALID, "400"),
        ({"params": {"num_samples": 0}}, INVALID, "400"),
        ({"params": {"num_samples": "many"}}, INVALID, "400"),
        ({"params": {"seed": -1}}, INVALID, "400"),
        ({"params": {"score": "loudness"}}, INVALID, "400"),
        ({"params": {"temperature": 1}}, INVALID, "400"),
        ({"outputs": ["logits"]}, INVALID, "400"),
        ({"batch": MAX_BATCH + 1}, "StatusCode.RESOURCE_EXHAUSTED", "413"),
        ({"model": "no-such-model"}, "StatusCode.NOT_FOUND", "404"),
        ({"version": "9"}, "StatusCode.NOT_FOUND", "404"),
        ({"version": "3"}, "StatusCode.UNAVAILABLE", "503"),
    ],
)
def test_refusals_carry_the_rest_message(
    triton: Any, triton_rest: Any, case: dict[str, Any], code: str, rest_status: str
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
        x = np.resize(x.reshape(-1), int(np.prod(case["shape"]))).reshape(case["shape"])
    kwargs: dict[str, Any] = {
        "datatype": datatype,
        "name": case.get("name", "input"),
        "model": case.get("model", MODEL),
        "version": case.get("version", ""),
        "outputs": case.get("outputs"),
        **case.get("params", {}),
    }
    err = refused(lambda: grpc_infer(triton, x, **kwargs))
    rest = refused(lambda: rest_infer(triton_rest, x, **kwargs))
    assert (err.status(), rest.status()) == (code, rest_status), err.message()
    assert err.message() == rest.message()


def test_a_message_over_max_body_bytes_is_resource_exhausted(triton: Any) -> None:
    x = random_images(MAX_BATCH, seed=1)
    big = np.resize(x, (MAX_BODY // (784 * 4) + 1, 784))  # over the limit in bytes
    err = refused(lambda: grpc_infer(triton, big))
    assert err.status() == "StatusCode.RESOURCE_EXHAUSTED", err.message()


def _raw_request(x: NDArray[Any]) -> Any:
    request = tpb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.astype("<f4").tobytes())
    return request


def _code(stub: Any, request: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request)
    return info.value.code(), info.value.details()


def test_malformed_messages_are_invalid_argument(stub: Any) -> None:
    x = random_images(2, seed=3)
    short = _raw_request(x)
    short.raw_input_contents[0] = short.raw_input_contents[0][:-4]
    code, details = _code(stub, short)
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "6268" in details and "6272" in details

    both = _typed_request(x, "FP32")
    both.raw_input_contents.append(x.tobytes())
    code, details = _code(stub, both)
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "raw_input_contents" in details

    wrong_field = tpb.ModelInferRequest(model_name=MODEL)
    tensor = wrong_field.inputs.add(name="input", datatype="FP32", shape=[1, 784])
    tensor.contents.int_contents.extend([0] * 784)
    code, details = _code(stub, wrong_field)
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "fp32_contents" in details

    empty = tpb.ModelInferRequest(model_name=MODEL)
    empty.inputs.add(name="input", datatype="FP32", shape=[1, 784])
    code, details = _code(stub, empty)
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "no contents" in details

    over_255 = _typed_request(np.full((1, 784), 256, dtype=np.uint32), "UINT8")
    code, details = _code(stub, over_255)
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "[0, 255]" in details

    no_inputs = tpb.ModelInferRequest(model_name=MODEL)
    code, details = _code(stub, no_inputs)
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "inputs" in details

    two = _raw_request(x)
    two.inputs.add(name="extra", datatype="FP32", shape=[2, 784])
    two.raw_input_contents.append(x.tobytes())
    code, details = _code(stub, two)
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "'input'" in details


def test_requests_are_counted_by_status_code(triton: Any, http: httpx.Client) -> None:
    def count(status: str) -> float:
        for line in http.get("/metrics").text.splitlines():
            if line.startswith("apd_requests_total{") and f'status="{status}"' in line:
                if "GRPCInferenceService/ModelInfer" in line:
                    return float(line.rsplit(" ", 1)[1])
        return 0.0

    ok, bad = count("OK"), count("INVALID_ARGUMENT")
    grpc_infer(triton, random_images(1, seed=1), seed=SEED)
    refused(lambda: grpc_infer(triton, random_images(1, seed=1), num_samples=0))
    assert (count("OK"), count("INVALID_ARGUMENT")) == (ok + 1, bad + 1)


def test_admission_refusal_is_resource_exhausted(tmp_path: Path) -> None:
    """A request whose memory does not fit the worker's budget is refused, RESOURCE_EXHAUSTED
    with admission's message; one that fits is served, and nothing stays reserved."""
    ckpt = make_checkpoint(tmp_path / "model.safetensors", model_id=MODEL)
    port = free_port()
    args = ["--grpc-port", str(port), "--memory-budget-mb", "10", "--max-batch", "256"]
    with apd_serve(ckpt, args=args) as proc:
        client = tritonclient_grpc.InferenceServerClient(url=f"127.0.0.1:{port}")
        err = refused(lambda: grpc_infer(client, random_images(256, seed=1), seed=SEED))
        assert err.status() == "StatusCode.RESOURCE_EXHAUSTED", err.message()
        assert "memory_budget_mb" in err.message()
        small = grpc_infer(client, random_images(2, seed=1), seed=SEED, outputs=["label"])
        assert small.as_numpy("label").shape == (2,)
        client.close()
        with httpx.Client(base_url=proc.base_url) as http:
            assert _admitted_bytes(http) == 0


# ---- Cancellation and deadlines -------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks


def _admitted_bytes(http: httpx.Client) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("apd_admission_bytes "):
            return float(line.split()[1])
    raise AssertionError("no apd_admission_bytes in /metrics")


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GrpcServer]:
    """A wide model (784-1024-10), one computation at a time: a K = 1000 request of 256
    inputs takes about a second, long enough to stop half-way on any machine."""
    path = tmp_path_factory.mktemp("grpc-slow") / "model.safetensors"
    make_checkpoint(path, sizes=(784, 1024, 10), hidden=(64,), rank=32, model_id="slow")
    port = free_port()
    args = ["--grpc-port", str(port), "--compute-concurrency", "1", "--max-batch", "256"]
    with apd_serve(path, args=args) as proc:
        yield GrpcServer(proc, port)


def test_deadline_and_cancellation_stop_the_computation(slow_server: GrpcServer) -> None:
    """The K = 1000 computation of a request whose deadline passes, or whose client cancels,
    stops: the worker's CPU goes quiet at once, a small request behind it (one computation at
    a time) is not kept waiting, and its memory reservation is released."""
    client = tritonclient_grpc.InferenceServerClient(url=slow_server.url)
    name = "slow"
    x = random_images(256, seed=9)
    big = tritonclient_grpc.InferInput("input", list(x.shape), "FP32")
    big.set_data_from_numpy(x)
    small = tritonclient_grpc.InferInput("input", [1, 784], "FP32")
    small.set_data_from_numpy(x[:1])
    (pid,) = slow_server.proc.worker_pids()
    with httpx.Client(base_url=slow_server.proc.base_url, timeout=30.0) as http:
        # A whole one: its wall time and CPU (new seeds: networks not cached)
        cpu0, t0 = _cpu_seconds(pid), time.perf_counter()
        client.infer(name, [big], parameters={"seed": 101, "num_samples": 1000})
        full_s, full_cpu = time.perf_counter() - t0, _cpu_seconds(pid) - cpu0
        assert full_s > 0.2 and full_cpu > 0.2, (full_s, full_cpu)
        # The small request's own CPU, and the idle server's over full_s, alone.
        cpu0 = _cpu_seconds(pid)
        client.infer(name, [small], parameters={"seed": 5, "num_samples": 1})
        time.sleep(full_s)
        alone_cpu = _cpu_seconds(pid) - cpu0

        def stopped(start: Callable[[], None]) -> None:
            start()
            cpu0 = _cpu_seconds(pid)
            t0 = time.perf_counter()
            client.infer(name, [small], parameters={"seed": 5, "num_samples": 1})
            waited = time.perf_counter() - t0
            time.sleep(full_s)  # what was left of the big one would run now
            spent = _cpu_seconds(pid) - cpu0
            assert waited < full_s / 2, (waited, full_s)
            assert spent - alone_cpu < full_cpu / 2, (spent, alone_cpu, full_cpu)
            assert _admitted_bytes(http) == 0

        def deadline() -> None:
            err = refused(
                lambda: client.infer(
                    name, [big], parameters={"seed": 102, "num_samples": 1000},
                    client_timeout=full_s / 5,
                )
            )  # fmt: skip
            assert err.status() == "StatusCode.DEADLINE_EXCEEDED"

        def cancel() -> None:
            done = threading.Event()
            outcome: list[Any] = []

            def callback(result: Any, error: Any) -> None:
                outcome.append(error)
                done.set()

            call = client.async_infer(
                name, [big], callback, parameters={"seed": 103, "num_samples": 1000}
            )
            time.sleep(full_s / 5)
            call.cancel()
            assert done.wait(10)
            assert outcome[0] is not None and outcome[0].status() == "StatusCode.CANCELLED"

        stopped(deadline)
        stopped(cancel)
        counts = [
            line
            for line in http.get("/metrics").text.splitlines()
            if line.startswith("apd_requests_total{") and "ModelInfer" in line
        ]
        assert any('status="CANCELLED"' in line for line in counts), counts
    client.close()


def test_sigterm_lets_an_rpc_in_flight_finish() -> None:
    """On SIGTERM the gRPC server stops with a grace: an answer being computed is sent."""
    port = free_port()
    with apd_serve(SHIPPED, args=["--grpc-port", str(port), "--max-batch", "256"]) as proc:
        client = tritonclient_grpc.InferenceServerClient(url=f"127.0.0.1:{port}")
        x = random_images(256, seed=4)
        done = threading.Event()
        outcome: list[Any] = []

        def callback(result: Any, error: Any) -> None:
            outcome.append((result, error))
            done.set()

        tensor = tritonclient_grpc.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        client.async_infer(
            "mnist-fcnn1", [tensor], callback, parameters={"seed": 11, "num_samples": 1000}
        )
        time.sleep(0.1)
        proc.proc.send_signal(signal.SIGTERM)
        assert done.wait(30)
        result, error = outcome[0]
        assert error is None, error
        assert result.as_numpy("probabilities").shape == (256, 10)
        proc.proc.wait(30)
        client.close()


# ---- Several workers, the port, the proto ----------------------------------------------------


def _listeners(port: int) -> int:
    """Listening TCP sockets on ``port``, from /proc/net/tcp and tcp6."""
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            n += state == "0A" and int(local.rsplit(":", 1)[1], 16) == port
    return n


def test_several_workers_share_the_grpc_port(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "model.safetensors", model_id=MODEL)
    port = free_port()
    with apd_serve(ckpt, args=["--grpc-port", str(port), "--workers", "2"]) as proc:
        deadline = time.monotonic() + 30
        while _listeners(port) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _listeners(port) == 2, proc.log()[-2000:]
        assert len(proc.worker_pids()) == 2
        want = None
        x = random_images(2, seed=1)
        for _ in range(8):  # new connections: the kernel spreads them over both workers
            client = tritonclient_grpc.InferenceServerClient(url=f"127.0.0.1:{port}")
            got = grpc_infer(client, x, seed=SEED, outputs=["probabilities"])
            client.close()
            probs = got.as_numpy("probabilities")
            want = probs if want is None else want
            np.testing.assert_array_equal(probs, want)  # the same seed, any worker
        assert rss_bytes(proc.worker_pids()[0]) > 0


def test_a_grpc_port_in_use_is_refused_before_starting(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "model.safetensors", model_id=MODEL)
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = [sys.executable, "-m", "apd_cli", "serve", "--checkpoint", str(ckpt)]
        cmd += ["--port", str(free_port()), "--grpc-port", str(port)]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"--grpc-port {port}" in done.stderr and "in use" in done.stderr


def test_generated_modules_are_in_sync_with_the_proto(tmp_path: Path) -> None:
    """``make proto`` would write the committed modules again, byte for byte."""
    pytest.importorskip("grpc_tools")
    proto = "service/grpc/grpc_service.proto"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT}", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", str(ROOT / proto)],
        check=True, timeout=60,
    )  # fmt: skip
    for name in ["grpc_service_pb2.py", "grpc_service_pb2.pyi", "grpc_service_pb2_grpc.py"]:
        generated = (tmp_path / "service" / "grpc" / name).read_bytes()
        committed = (ROOT / "service" / "grpc" / name).read_bytes()
        assert generated == committed, f"{name} is stale: run `make proto`"


def test_the_proto_is_the_published_one_where_it_serves(tmp_path: Path) -> None:
    """Every service method, message and field of ours is the published proto's (tritonclient's
    copy): same names, numbers, types and labels, so its clients interoperate."""
    pytest.importorskip("grpc_tools")
    from google.protobuf import descriptor_pb2

    out = tmp_path / "ours.pb"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT}", f"--descriptor_set_out={out}",
         str(ROOT / "service/grpc/grpc_service.proto")],
        check=True, timeout=60,
    )  # fmt: skip
    ours = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    theirs = descriptor_pb2.FileDescriptorProto.FromString(tpb.DESCRIPTOR.serialized_pb)
    assert ours.package == theirs.package == "inference"

    def messages(f: Any) -> dict[str, Any]:
        found: dict[str, Any] = {}

        def walk(m: Any, prefix: str) -> None:
            found[prefix + m.name] = m
            for n in m.nested_type:
                walk(n, prefix + m.name + ".")

        for m in f.message_type:
            walk(m, "")
        return found

    mine, published = messages(ours), messages(theirs)
    for name, message in mine.items():
        assert name in published, name
        fields = {(f.name, f.number, f.type, f.label, f.type_name) for f in message.field}
        assert fields == {
            (f.name, f.number, f.type, f.label, f.type_name) for f in published[name].field
        }, name
    (service,) = ours.service
    (their_service,) = theirs.service
    assert service.name == their_service.name == "GRPCInferenceService"
    signature = {m.name: (m.input_type, m.output_type) for m in their_service.method}
    assert {m.name: (m.input_type, m.output_type) for m in service.method}.items() <= (
        signature.items()
    )
    served = {m.name for m in service.method}
    assert served == {
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
        "ModelInfer", "RepositoryIndex",
    }  # fmt: skip
