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
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from own_data_support import (
    FOLDER_CLASSES,
    train_and_distill,
    write_digits_npz,
    write_image_folder,
    write_wine_csv,
)

from apd.checkpoint import Checkpoint, load_checkpoint
from apd.networks import CNNSpec, forward_probs
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
    assert main([*args, "--dataset", str(moved)]) == 2
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
