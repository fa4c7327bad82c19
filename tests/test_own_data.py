"""The user's own data end to end: ``apd train sgld --dataset ...`` then ``apd distill``, on a
scikit-learn tabular set written to CSV, an npz of small images, and an image folder made
here; the checkpoint carries the data's input convention, and its networks, fed raw examples
through that convention, predict held-out examples about as well as the SGLD run.

The module-scoped fixtures ``digits_checkpoint``, ``wine_checkpoint`` and
``folder_checkpoint`` are the checkpoints a serving test can load (``apd serve --checkpoint``)
and query with raw examples of each data's shape.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from apd.checkpoint import Checkpoint, load_checkpoint
from apd.networks import CNNSpec, forward_probs
from apd.uncertainty import summarize
from service.api.app import create_app
from service.config import Settings
from service.core.networks import Stream, block_noise
from tests.harness import apd_serve
from tests.own_data_support import (
    FOLDER_CLASSES,
    train_and_distill,
    write_digits_npz,
    write_image_folder,
    write_wine_csv,
)
from tests.service_support import make_client
from training.cli import main
from training.sample_store import SampleStore

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _predict(ckpt: Checkpoint, raw: np.ndarray, k: int = 100) -> np.ndarray:
    """The checkpoint's posterior predictive on raw examples, as the service computes it:
    ``k`` networks from :meth:`Checkpoint.generate`, inputs through the input convention."""
    z = np.random.default_rng(0).standard_normal((k, ckpt.noise_dim)).astype(np.float32)
    x = ckpt.meta.input.preprocess(raw)
    return forward_probs(ckpt.spec, ckpt.generate(z), x).mean(0)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """The issue's exact spelling on an npz of 8 x 8 digit images:
    ``apd train sgld --dataset data.npz --arch mlp:50 --out RUN --chains 4 --steps 3000``, then
    ``apd distill --samples RUN --out model.safetensors --model-id NAME --steps 2000``."""
    where = tmp_path_factory.mktemp("digits")
    data = write_digits_npz(where / "data.npz")
    run, model = where / "RUN", where / "model.safetensors"
    train_and_distill(
        run,
        model,
        ["--dataset", str(data)],
        "mlp:50",
        ["--chains", "4", "--steps", "3000", "--no-progress"],
        ["--model-id", "digits-mlp", "--steps", "2000", "--no-progress"],
    )
    return data, run, model


@pytest.fixture(scope="module")
def digits_checkpoint(digits: tuple[Path, Path, Path]) -> Path:
    return digits[2]


def test_npz_images_to_a_checkpoint_in_raw_units(digits: tuple[Path, Path, Path]) -> None:
    data, run, model = digits
    ckpt = load_checkpoint(model)
    meta = ckpt.meta
    assert meta.model_id == "digits-mlp" and ckpt.spec.name == "mlp:50"
    assert meta.target.layer_sizes == [64, 50, 10]
    c = meta.input
    assert (c.shape, c.dtype, c.value_range, c.scale) == ([8, 8], "uint8", (0, 255), 1 / 255)
    assert c.class_names == [str(i) for i in range(10)] and c.image_mode == "L"
    assert c.data_sha256 == hashlib.sha256(data.read_bytes()).hexdigest()
    prov = meta.provenance.data
    assert prov["dataset"] == "data" and prov["spec"]["source"] == str(data)
    assert prov["split"]["validation"]["size"] == 280  # 20 % of 1,400, carved, seeded
    assert meta.anomaly.calibration_set == "data-validation"
    assert meta.anomaly.calibration_size == 280
    # the held-out test images, in raw uint8 units: the generator's networks predict them
    # about as well as the SGLD run's samples did
    with np.load(data) as npz:
        x_test, y_test = npz["x_test"], npz["y_test"]
    accuracy = float((_predict(ckpt, x_test).argmax(1) == y_test).mean())
    sgld = json.loads((run / "metrics.json").read_text())["test_accuracy"]
    assert sgld > 0.9 and accuracy >= sgld - 0.03, (accuracy, sgld)


def test_distill_reads_the_data_back_from_the_run(
    digits: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A moved data file is found with --dataset; changed data is refused (fingerprint)."""
    data, run, _ = digits
    moved = tmp_path / "elsewhere.npz"
    shutil.copy(data, moved)
    out = tmp_path / "m.safetensors"
    args = ["distill", "--samples", str(run), "--out", str(out), "--steps", "4"]
    args += ["--eval-every", "2", "--no-progress"]
    assert main([*args, "--dataset", str(moved)]) == 0
    assert load_checkpoint(out).meta.provenance.data["spec"]["source"] == str(moved)
    with np.load(data) as npz:
        arrays = dict(npz)
    arrays["y_train"] = arrays["y_train"][::-1].copy()
    np.savez(moved, **arrays)
    assert main([*args, "--dataset", str(moved), "--force"]) == 2
    assert "was sampled on other data" in capsys.readouterr().err


@pytest.fixture(scope="module")
def wine_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn's wine data as a CSV with the cultivar's name in the label column."""
    where = tmp_path_factory.mktemp("wine")
    data = write_wine_csv(where / "wine.csv")
    return train_and_distill(
        where / "run",
        where / "wine.safetensors",
        ["--dataset", str(data), "--label-column", "cultivar"],
        "mlp:16",
        ["--steps", "1500", "--no-progress"],
        ["--steps", "400", "--eval-every", "200", "--no-progress"],
    )


def test_online_apd_on_the_offline_sampler_from_the_command_line(tmp_path: Path) -> None:
    """``apd distill --algorithm online --sampler offline`` runs the cyclical sampler that
    ``apd train sgld`` would (the generic MLP defaults: 4 chains, 4 cycles) with the GAN
    alongside, and writes a checkpoint whose generator has one component per chain and cycle
    and every subspace direction filled."""
    data = write_wine_csv(tmp_path / "wine.csv")
    out = tmp_path / "online.safetensors"
    args = ["distill", "--algorithm", "online", "--sampler", "offline", "--arch", "mlp:16"]
    args += ["--dataset", str(data), "--label-column", "cultivar", "--out", str(out)]
    assert main([*args, "--steps", "40", "--eval-every", "20", "--no-progress"]) == 0
    ckpt = load_checkpoint(out)
    sampler = ckpt.meta.provenance.sampler
    assert sampler["online"] and sampler["schedule"]["kind"] == "cyclical"
    assert sampler["schedule"]["cycle_steps"] == 2500
    assert (sampler["num_chains"], sampler["cycles"]) == (4, 4)
    gen = ckpt.meta.generator
    assert gen.design == "subspace" and gen.output_dim == 46
    z = np.random.default_rng(0).standard_normal((200, ckpt.noise_dim)).astype(np.float32)
    theta = ckpt.generate(z)
    assert np.unique(np.round(theta[:, 0], 4)).size > 8  # not one network: a distribution
    history = json.loads(out.with_suffix(".fidelity.json").read_text())
    assert history["history"], "model selection ran once every cycle was in"


def test_csv_to_a_checkpoint_with_class_names(wine_checkpoint: Path) -> None:
    from sklearn.datasets import load_wine

    ckpt = load_checkpoint(wine_checkpoint)
    meta = ckpt.meta
    assert meta.model_id == "wine-mlp-16"
    c = meta.input
    assert c.shape == [13] and c.class_names == ["class_0", "class_1", "class_2"]
    assert isinstance(c.scale, list) and len(c.scale) == 13  # standardised per feature
    assert c.image_mode is None
    wine = load_wine()
    accuracy = float((_predict(ckpt, wine.data).argmax(1) == wine.target).mean())
    assert accuracy > 0.9  # raw features in their own units
    assert meta.metrics["validation"]["accuracy"] > 0.85


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An RGB image folder and a small CNN on it."""
    where = tmp_path_factory.mktemp("folder")
    root = write_image_folder(where / "shapes")
    model = train_and_distill(
        where / "run",
        where / "shapes.safetensors",
        ["--dataset", str(root)],
        "cnn:conv4x3,pool2,fc16",
        ["--steps", "600", "--no-progress"],
        ["--steps", "200", "--eval-every", "100", "--no-progress"],
    )
    return root, model


@pytest.fixture(scope="module")
def folder_checkpoint(folder: tuple[Path, Path]) -> Path:
    return folder[1]


def test_image_folder_to_a_cnn_checkpoint(folder: tuple[Path, Path]) -> None:
    root, model = folder
    ckpt = load_checkpoint(model)
    assert isinstance(ckpt.spec, CNNSpec) and ckpt.spec.input_shape == (3, 12, 10)
    c = ckpt.meta.input
    assert (c.shape, c.image_mode, c.class_names) == ([3, 12, 10], "RGB", list(FOLDER_CLASSES))
    # image files, converted with the checkpoint's convention (as an upload would be)
    files = sorted(root.rglob("*.*"))
    raw = np.stack([c.image_to_raw(f.read_bytes()) for f in files])
    labels = np.array([FOLDER_CLASSES.index(f.relative_to(root).parts[0]) for f in files])
    accuracy = float((_predict(ckpt, raw).argmax(1) == labels).mean())
    assert accuracy > 0.9


def test_a_cnn_distils_with_the_paper_design_and_exports(
    folder: tuple[Path, Path], tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime")
    run = folder[1].parent / "run"
    out = tmp_path / "paper.safetensors"
    args = ["distill", "--samples", str(run), "--out", str(out), "--preset", "paper"]
    assert main([*args, "--steps", "20", "--eval-every", "10", "--no-progress"]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt.meta.generator.design == "paper"
    assert ckpt.meta.generator.output_dim == ckpt.spec.num_params
    assert SampleStore.open(run / "samples").spec == ckpt.spec
    assert main(["export", str(out), "--out", str(tmp_path / "g.onnx")]) == 0


# --------------------------------------------------------------------------------------
# Serving: the service takes its input schema from the checkpoint

K, SEED = 40, 7


@contextmanager
def served(checkpoint: Path) -> Iterator[Any]:
    """The app in process on ``checkpoint`` (``apd serve``'s app; one test runs the command)."""
    settings = Settings(checkpoint=checkpoint, redis_url=None, pool_size=50, num_threads=1)
    with make_client(create_app(settings)) as client:
        yield client


def seeded_reference(ckpt: Checkpoint, raw: np.ndarray, seed: int = SEED, k: int = K) -> Any:
    """The service's answer computed independently: the seed's K networks materialised by
    :meth:`Checkpoint.generate`, the raw inputs through the checkpoint's preprocessing, the
    reference forward (:func:`apd.networks.forward_probs`)."""
    stream = Stream.for_seed(seed)
    blocks = range(-(-k // 10))
    z = np.concatenate([block_noise(stream, b, ckpt.noise_dim, 0)[0] for b in blocks])
    x = ckpt.meta.input.preprocess(np.asarray(raw, dtype=np.float32))
    return summarize(forward_probs(ckpt.spec, ckpt.generate(z[:k]), x))


def post(client: Any, path: str, **body: Any) -> dict[str, Any]:
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


def probabilities(answer: dict[str, Any]) -> np.ndarray:
    return np.array([p["probabilities"] for p in answer["predictions"]])


def png(image: np.ndarray, suffix: str = ".png") -> bytes:
    """``image`` (``(H, W)`` or ``(3, H, W)`` uint8) as an image file."""
    from PIL import Image

    pixels = image if image.ndim == 2 else image.transpose(1, 2, 0)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG" if suffix == ".png" else "JPEG")
    return out.getvalue()


def test_apd_serve_answers_the_npz_examples_in_raw_units(digits: tuple[Path, Path, Path]) -> None:
    """The issue's spelling, served: ``apd serve --checkpoint model.safetensors`` answers
    ``/predict`` for held-out 8 x 8 uint8 images sent as they are in the npz, with accuracy
    close to the SGLD run's, class names beside the labels, flat or nested alike."""
    data, run, model = digits
    with np.load(data) as npz:
        x_test, y_test = npz["x_test"], npz["y_test"]
    sgld = json.loads((run / "metrics.json").read_text())["test_accuracy"]
    with apd_serve(model, args=["--pool-size", "100"]) as server:
        with httpx.Client(base_url=server.base_url, timeout=60) as http:
            max_batch = http.get("/v1/model").json()["limits"]["max_batch"]
            labels, names = [], []
            for start in range(0, len(x_test), max_batch):
                batch = x_test[start : start + max_batch]
                r = http.post("/predict", json={"inputs": batch.tolist(), "seed": SEED})
                assert r.status_code == 200, r.text
                for p in r.json()["predictions"]:
                    labels.append(p["label"])
                    names.append(p["label_name"])
            flat = http.post(
                "/predict", json={"inputs": x_test[:4].reshape(4, 64).tolist(), "seed": SEED}
            )
            nested = http.post("/predict", json={"inputs": x_test[:4].tolist(), "seed": SEED})
            assert flat.json()["predictions"] == nested.json()["predictions"]
    accuracy = float((np.array(labels) == y_test).mean())
    assert accuracy >= sgld - 0.03, (accuracy, sgld)
    assert names == [str(label) for label in labels]


def test_digits_answers_are_the_reference_and_the_contract_is_the_models(
    digits_checkpoint: Path,
) -> None:
    ckpt = load_checkpoint(digits_checkpoint)
    with np.load(digits_checkpoint.parent / "data.npz") as npz:
        raw = npz["x_test"][:6]
    with served(digits_checkpoint) as client:
        answer = post(client, "/predict", inputs=raw.tolist(), num_samples=K, seed=SEED)
        reference = seeded_reference(ckpt, raw)
        np.testing.assert_allclose(probabilities(answer), ckpt.probabilities(reference), atol=1e-6)
        assert [p["label_name"] for p in answer["predictions"]] == [
            str(v) for v in reference.labels
        ]
        info = client.get("/v1/model").json()
        assert info["input"] | {"description": None, "data_sha256": None} == {
            "shape": [8, 8],
            "size": 64,
            "dtype": "uint8",
            "value_range": [0.0, 255.0],
            "range_checked": True,
            "scale": 1 / 255,
            "shift": 0.0,
            "image_mode": "L",
            "data_sha256": None,
            "description": None,
        }
        assert info["num_classes"] == 10 and info["class_names"] == [str(i) for i in range(10)]
        doc = client.get("/openapi.json").json()
        schemas = doc["components"]["schemas"]
        flat, nested = schemas["PredictRequest"]["properties"]["inputs"]["items"]["oneOf"]
        assert (flat["minItems"], flat["maxItems"]) == (64, 64)
        assert flat["items"] == {"type": "number", "minimum": 0.0, "maximum": 255.0}
        assert (nested["minItems"], nested["maxItems"]) == (8, 8)
        assert (nested["items"]["minItems"], nested["items"]["maxItems"]) == (8, 8)
        example = schemas["PredictRequest"]["examples"][0]
        assert np.shape(example["inputs"][0]) == (8, 8)
        assert post(client, "/predict", **example)["num_samples"] == 100
        label_name = schemas["Prediction"]["properties"]["label_name"]
        assert label_name["enum"] == [str(i) for i in range(10)]
        assert "digits-mlp" in doc["info"]["description"]
        assert "examples" not in schemas["PredictResponse"]  # the shipped model's answers


BAD_DIGITS: list[tuple[str, Any, str]] = [
    ("short", [[0] * 63], "inputs[0] has 63 items; an image is 64 numbers or 8 rows of 8 numbers"),
    (
        "short row",
        [[[0] * 8] * 7 + [[0] * 7]],
        "inputs[0][7] has 7 values; each of the 8 rows needs 8",
    ),
    ("row not a list", [[[0] * 8] * 7 + [3]], "inputs[0][7] must be a row of 8 numbers, not int"),
    ("3-d", [[[[0]] * 8] * 8], "inputs[0][0][0]"),
    ("string", [[0] * 63 + ["9"]], "inputs[0][63]"),
    (
        "above 255",
        [[0] * 5 + [300] + [0] * 58],
        "inputs[0][5] is 300.0: pixels must lie in [0, 255]",
    ),
    (
        "negative nested",
        [[[0] * 8] * 2 + [[0, -1] + [0] * 6] + [[0] * 8] * 5],
        "inputs[0][2][1] is -1.0",
    ),
    (
        "pixel / 255 sent to integer grey levels",
        [[0.5] * 64],
        "inputs[0][0] is 0.5: this model's pixels are whole numbers in [0, 255]",
    ),
]


@pytest.mark.parametrize(
    ("inputs", "message"), [c[1:] for c in BAD_DIGITS], ids=[c[0] for c in BAD_DIGITS]
)
def test_digits_wrong_inputs_get_precise_errors(
    digits_checkpoint: Path, inputs: Any, message: str
) -> None:
    with served(digits_checkpoint) as client:
        r = client.post("/predict", json={"inputs": [[0] * 64, *inputs]})
    assert r.status_code == 422, r.text
    assert message.replace("inputs[0]", "inputs[1]") in r.json()["message"], r.json()


def test_digits_v2_and_image_files(digits_checkpoint: Path) -> None:
    """V2: FP32 raw values and UINT8 (the same raw values) give /predict's numbers; PNG files
    of the images give the same answers as their pixels."""
    with np.load(digits_checkpoint.parent / "data.npz") as npz:
        raw = npz["x_test"][:5]
    with served(digits_checkpoint) as client:
        answer = post(client, "/predict", inputs=raw.tolist(), num_samples=K, seed=SEED)
        name = client.get("/v1/model").json()["id"]
        meta = client.get(f"/v2/models/{name}").json()
        (tensor,) = meta["inputs"]
        assert tensor["shape"] == [-1, 8, 8]
        assert tensor["parameters"]["accepted_datatypes"] == ["FP32", "UINT8"]
        assert meta["outputs"][0]["parameters"]["class_names"] == [str(i) for i in range(10)]
        for datatype, shape in (("FP32", [5, 8, 8]), ("UINT8", [5, 64])):
            body = {
                "inputs": [
                    {
                        "name": "input",
                        "shape": shape,
                        "datatype": datatype,
                        "data": raw.reshape(shape).tolist(),
                    }
                ],
                "parameters": {"num_samples": K, "seed": SEED},
                "outputs": [{"name": "probabilities"}],
            }
            r = client.post(f"/v2/models/{name}/infer", json=body)
            assert r.status_code == 200, r.text
            got = np.array(r.json()["outputs"][0]["data"]).reshape(5, 10)
            np.testing.assert_allclose(got, probabilities(answer), rtol=1e-6, atol=1e-7)
        files = [("files", (f"{i}.png", png(image), "image/png")) for i, image in enumerate(raw)]
        r = client.post(
            "/predict/image", files=files, data={"num_samples": str(K), "seed": str(SEED)}
        )
        assert r.status_code == 200, r.text
        assert r.json()["predictions"] == answer["predictions"]
        bad = client.post("/predict/image", files=[("files", ("notes.txt", b"not an image"))])
        assert bad.status_code == 422
        assert "files[0] ('notes.txt') is not an image file" in bad.json()["message"]
        truncated = client.post("/predict/image", files=[("files", ("t.png", png(raw[0])[:40]))])
        assert truncated.status_code == 422 and "files[0] ('t.png')" in truncated.json()["message"]
        # the same whole numbers, as FP32 in V2, must be whole too
        halves = {
            "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]
        }
        r = client.post(f"/v2/models/{name}/infer", json=halves)
        assert r.status_code == 400 and "whole" in r.json()["error"], r.text
        blank = client.post(
            "/predict/image", files=[("files", ("blank.png", png(np.zeros((8, 8), np.uint8))))]
        )
        assert blank.status_code == 422 and "files[0] ('blank.png') is blank" in blank.text


def test_wine_features_in_their_own_units(wine_checkpoint: Path) -> None:
    """13 tabular features in their own units (standardised by the server): answers are the
    reference's, accuracy as in training, class names in the answers, values beyond the
    training range accepted (finite ones), images refused."""
    from sklearn.datasets import load_wine

    wine = load_wine()
    ckpt = load_checkpoint(wine_checkpoint)
    with served(wine_checkpoint) as client:
        answer = post(client, "/predict", inputs=wine.data[:8].tolist(), num_samples=K, seed=SEED)
        reference = seeded_reference(ckpt, wine.data[:8])
        np.testing.assert_allclose(probabilities(answer), ckpt.probabilities(reference), atol=1e-6)
        labels = []
        for start in range(0, len(wine.data), 64):
            batch = wine.data[start : start + 64].tolist()
            labels += [
                p["label"] for p in post(client, "/predict", inputs=batch, seed=SEED)["predictions"]
            ]
        assert float((np.array(labels) == wine.target).mean()) > 0.9
        names = [p["label_name"] for p in answer["predictions"]]
        assert names == [f"class_{v}" for v in reference.labels]
        info = client.get("/v1/model").json()
        assert info["input"]["shape"] == [13] and info["input"]["range_checked"] is False
        assert info["input"]["image_mode"] is None and info["class_names"] == [
            "class_0",
            "class_1",
            "class_2",
        ]
        doc = client.get("/openapi.json").json()
        items = doc["components"]["schemas"]["PredictRequest"]["properties"]["inputs"]["items"]
        assert (items["type"], items["minItems"], items["maxItems"]) == ("array", 13, 13)
        assert items["items"] == {"type": "number"}  # the training range is not a limit
        (example,) = doc["components"]["schemas"]["PredictRequest"]["examples"][0]["inputs"]
        assert (wine.data.min(0) <= example).all() and (example <= wine.data.max(0)).all()
        assert "training data's mean" in doc["info"]["description"]
        far = wine.data[0] * 100  # far outside the training data: an input, and an anomaly
        assert post(client, "/predict", inputs=[far.tolist()])["predictions"][0]["label_name"]
        for bad, message in [
            ([1.0] * 12, "inputs[0] has 12 items; an example is 13 floats"),
            ([1.0] * 12 + [1e39], "inputs[0][12] is 1e+39: values must be finite float32 numbers"),
            ([[1.0]] * 13, "inputs[0][0]: Input should be a valid number"),
        ]:
            r = client.post("/predict", json={"inputs": [bad]})
            assert r.status_code == 422 and message in r.json()["message"], r.text
        nan = client.post(
            "/predict",
            content=b'{"inputs": [[' + b"1.0, " * 12 + b"NaN]]}",
            headers={"content-type": "application/json"},
        )
        assert nan.status_code == 422 and "inputs[0][12] is nan" in nan.json()["message"]
        r = client.post(
            "/predict/image", files=[("files", ("a.png", png(np.zeros((4, 4), np.uint8))))]
        )
        assert r.status_code == 415 and "not images" in r.json()["message"]
        name = info["id"]
        body: dict[str, Any] = {
            "inputs": [
                {
                    "name": "input",
                    "shape": [2, 13],
                    "datatype": "FP32",
                    "data": wine.data[:2].tolist(),
                }
            ],
            "parameters": {"num_samples": K, "seed": SEED},
        }
        r = client.post(f"/v2/models/{name}/infer", json=body)
        assert r.status_code == 200, r.text
        body["inputs"][0]["datatype"] = "UINT8"
        r = client.post(f"/v2/models/{name}/infer", json=body)
        assert r.status_code == 400 and "UINT8" in r.json()["error"]


def test_wine_far_from_the_data_is_flagged_by_the_default_flag(wine_checkpoint: Path) -> None:
    """The tabular model made by the documented commands flags, by its default (combined)
    flag, rows far from its data: every row x20, all-zero rows, and rows with one feature at
    100x its training range; its own rows at about the calibrated rate; the combined score
    and the data-support score are also answered by /anomaly-score and V2, and /v1/model
    says how few inputs set the thresholds."""
    from sklearn.datasets import load_wine

    x = load_wine().data
    ckpt = load_checkpoint(wine_checkpoint)
    anomaly = ckpt.meta.anomaly
    assert anomaly.default_score.value == "combined" and ckpt.data_support is not None
    span = x.max(0) - x.min(0)
    one_feature = np.repeat(x[:13], 1, axis=0).copy()
    one_feature[np.arange(13), np.arange(13)] = x.min(0) + 100 * span
    cases = {"x20": 20 * x[:64], "zeros": np.zeros((8, 13)), "one feature 100x": one_feature}
    with served(wine_checkpoint) as client:
        for what, rows in cases.items():
            answer = post(client, "/predict", inputs=rows.tolist(), seed=SEED)
            flags = [p["anomaly"]["is_anomaly"] for p in answer["predictions"]]
            assert np.mean(flags) >= 0.95, what
            assert all(p["uncertainty"]["data_support"] > 0 for p in answer["predictions"])
        own = post(client, "/anomaly-score", inputs=x[:128].tolist(), seed=SEED)
        assert own["score_name"] == "combined" and own["threshold"] == 1.0
        assert np.mean(own["is_anomaly"]) <= 0.12
        reference = seeded_reference(ckpt, x[:128])
        _, flags, _ = anomaly.flags(
            replace(
                reference, data_support=ckpt.data_support.score(ckpt.meta.input.preprocess(x[:128]))
            ),
            anomaly.default_score,
        )
        assert own["is_anomaly"] == flags.tolist()
        body = {
            "inputs": [
                {"name": "input", "shape": [2, 13], "datatype": "FP32", "data": x[:2].tolist()}
            ],
            "outputs": [{"name": "data_support"}, {"name": "is_anomaly"}],
        }
        r = client.post(f"/v2/models/{ckpt.meta.model_id}/infer", json=body)
        assert r.status_code == 200, r.text
        assert [o["name"] for o in r.json()["outputs"]] == ["data_support", "is_anomaly"]
        info = client.get("/v1/model").json()["anomaly"]
        n = info["calibration_size"]
        assert n < 500  # wine's validation split is a few dozen rows
        lo, hi = info["fpr_interval"]["combined"]
        # a few dozen rows: the interval is wide (10,000 inputs give about 0.01)
        assert lo <= info["flagged_on_calibration"]["combined"] / n <= hi and hi - lo > 0.05


def test_image_folder_cnn_served_from_json_and_files(folder: tuple[Path, Path]) -> None:
    """The RGB CNN: image files of the folder (PNG and JPEG) answered as their converted
    pixels are, and as the reference computes; [3][12][10] nested inputs; precise errors."""
    root, model = folder
    ckpt = load_checkpoint(model)
    c = ckpt.meta.input
    paths = sorted(root.rglob("*.*"))
    labels = np.array([FOLDER_CLASSES.index(p.relative_to(root).parts[0]) for p in paths])
    raw = np.stack([c.image_to_raw(p.read_bytes()) for p in paths])
    with served(model) as client:
        answer = post(client, "/predict", inputs=raw[:6].tolist(), num_samples=K, seed=SEED)
        reference = seeded_reference(ckpt, raw[:6])
        np.testing.assert_allclose(probabilities(answer), ckpt.probabilities(reference), atol=1e-5)
        files = [("files", (p.name, p.read_bytes())) for p in paths[:6]]
        r = client.post(
            "/predict/image", files=files, data={"num_samples": str(K), "seed": str(SEED)}
        )
        assert r.status_code == 200, r.text
        assert r.json()["predictions"] == answer["predictions"]
        predicted, names = [], []
        for start in range(0, len(paths), 32):
            chunk = [("files", (p.name, p.read_bytes())) for p in paths[start : start + 32]]
            r = client.post("/predict/image", files=chunk, data={"seed": str(SEED)})
            assert r.status_code == 200, r.text
            predicted += [p["label"] for p in r.json()["predictions"]]
            names += [p["label_name"] for p in r.json()["predictions"]]
        assert float((np.array(predicted) == labels).mean()) > 0.9
        assert names == [FOLDER_CLASSES[i] for i in predicted]
        info = client.get("/v1/model").json()
        assert info["input"]["shape"] == [3, 12, 10] and info["input"]["image_mode"] == "RGB"
        doc = client.get("/openapi.json").json()
        flat, nested = doc["components"]["schemas"]["PredictRequest"]["properties"]["inputs"][
            "items"
        ]["oneOf"]
        assert flat["maxItems"] == 360 and nested["maxItems"] == 3
        assert nested["items"]["maxItems"] == 12 and nested["items"]["items"]["maxItems"] == 10
        wrong = raw[0].tolist()
        wrong[0][11] = wrong[0][11][:9]
        r = client.post("/predict", json={"inputs": [wrong]})
        assert r.status_code == 422
        assert "inputs[0][0][11] has 9 values; each of the 12 rows needs 10" in r.json()["message"]
        r = client.post("/predict", json={"inputs": [[raw[0][0].tolist(), 1, raw[0][2].tolist()]]})
        assert "inputs[0][1] must be a channel of 12 rows of 10 numbers, not int" in r.text
        name = info["id"]
        body = {
            "inputs": [
                {
                    "name": "input",
                    "shape": [2, 3, 12, 10],
                    "datatype": "UINT8",
                    "data": raw[:2].astype(int).tolist(),
                }
            ],
            "parameters": {"num_samples": K, "seed": SEED},
            "outputs": [{"name": "probabilities"}],
        }
        r = client.post(f"/v2/models/{name}/infer", json=body)
        assert r.status_code == 200, r.text
        got = np.array(r.json()["outputs"][0]["data"]).reshape(2, 3)
        np.testing.assert_allclose(got, probabilities(answer)[:2], rtol=1e-6, atol=1e-7)
