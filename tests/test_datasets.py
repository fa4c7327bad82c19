"""training/own_data.py: the user's data read, split, preprocessed and fingerprinted, and every
kind of bad data refused with one line naming the file and the problem, nothing written."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import pytest

from tests.own_data_support import (
    FOLDER_CLASSES,
    digits_images,
    write_digits_npz,
    write_image_folder,
    write_wine_csv,
)
from training.cli import main
from training.mnist import DataError
from training.own_data import (
    DataSpec,
    Preprocess,
    add_data_arguments,
    carve_validation,
    data_spec_from_args,
    load_dataset,
)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_npz_of_images_with_a_test_split(tmp_path: Path) -> None:
    path = write_digits_npz(tmp_path / "digits.npz")
    data = load_dataset(DataSpec(str(path)))
    c = data.convention
    assert (c.shape, c.dtype, c.value_range, c.scale, c.shift) == (
        [8, 8],
        "uint8",
        (0, 255),
        1 / 255,
        0.0,
    )
    assert c.class_names == [str(i) for i in range(10)] and c.image_mode == "L"
    assert data.fingerprint == c.data_sha256 == _sha(path) == data.files["digits.npz"]
    # 1,400 training examples: 20 % of each class held out for validation
    assert len(data.train_y) + len(data.val_y) == 1400 and len(data.val_y) == 280
    assert data.test_x is not None and data.test_x.shape == (397, 64)
    x, y = digits_images()
    order = np.random.default_rng(0).permutation(len(y))
    want = x[order[:397]].reshape(397, 64).astype(np.float32) * np.float32(1 / 255)
    np.testing.assert_array_equal(data.test_x, want)
    assert data.split["validation"]["seed"] == 0 and data.split["test"] == "given"
    assert data.name == "digits" and data.num_classes == 10


def test_npz_validation_split_given_and_float_features_standardised(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 3.0, (60, 4)) * np.array([1, 10, 100, 0])  # one constant feature
    y = np.arange(60) % 3
    path = tmp_path / "f.npz"
    np.savez(path, x_train=x[:40], y_train=y[:40], x_val=x[40:], y_val=y[40:])
    data = load_dataset(DataSpec(str(path)))
    assert data.split["validation"] == "given" and data.test_x is None
    np.testing.assert_allclose(data.train_x[:, :3].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(data.train_x[:, :3].std(0), 1, atol=1e-5)
    assert data.convention.scale[3] == 1.0  # type: ignore[index]
    # validation examples go through the same (training-split) statistics
    want = (x[40:] - x[:40].mean(0)) / np.where(x[:40].std(0) > 0, x[:40].std(0), 1)
    np.testing.assert_allclose(data.val_x, want, rtol=1e-5, atol=1e-5)
    assert data.convention.class_names == ["0", "1", "2"]
    raw = load_dataset(DataSpec(str(path), preprocess=Preprocess.NONE))
    np.testing.assert_array_equal(raw.train_x, x[:40].astype(np.float32))


def test_float_images_get_one_mean_and_std(tmp_path: Path) -> None:
    x = np.random.default_rng(1).random((30, 2, 5, 5)) * 7
    path = tmp_path / "img.npz"
    np.savez(path, x_train=x, y_train=np.arange(30) % 2)
    data = load_dataset(DataSpec(str(path)))
    c = data.convention
    assert c.shape == [2, 5, 5] and isinstance(c.scale, float) and isinstance(c.shift, float)
    assert abs(float(data.train_x.mean())) < 1e-5 and abs(float(data.train_x.std()) - 1) < 1e-4


def test_csv_classes_and_preprocessing(tmp_path: Path) -> None:
    path = write_wine_csv(tmp_path / "wine.csv")
    data = load_dataset(DataSpec(str(path), label_column="cultivar", val_fraction=0.25))
    c = data.convention
    assert c.shape == [13] and c.class_names == ["class_0", "class_1", "class_2"]
    assert len(c.scale) == 13 and c.dtype == "float32"  # type: ignore[arg-type]
    assert len(data.val_y) == 45 and len(data.train_y) == 178 - 45
    np.testing.assert_allclose(data.train_x.mean(0), 0, atol=1e-5)
    assert data.fingerprint == _sha(path) and data.test_x is None
    # integer labels are sorted as numbers
    rows = "a,label\n" + "".join(f"{i},{v}\n" for i, v in enumerate([10, 9, 2, 10, 9, 2]))
    (tmp_path / "n.csv").write_text(rows)
    ints = load_dataset(DataSpec(str(tmp_path / "n.csv"), label_column="label", val_fraction=0.3))
    assert ints.convention.class_names == ["2", "9", "10"]


def test_image_folder(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "shapes", per_class=6)
    data = load_dataset(DataSpec(str(root)))
    c = data.convention
    assert (c.shape, c.dtype, c.image_mode) == ([3, 12, 10], "uint8", "RGB")
    assert c.class_names == list(FOLDER_CLASSES) and data.name == "shapes"
    assert len(data.train_y) + len(data.val_y) == 18
    grey = load_dataset(DataSpec(str(root), image_size=(6, 5), channels=1))
    assert grey.convention.shape == [6, 5] and grey.train_x.shape[1] == 30
    # the fingerprint covers every image
    before = data.fingerprint
    png = next((root / "dot").rglob("*.png"))
    png.write_bytes((root / "bar" / "batch1" / "bar-1.png").read_bytes())
    assert load_dataset(DataSpec(str(root))).fingerprint != before


def test_carve_validation_is_stratified_and_seeded() -> None:
    y = np.array([0] * 50 + [1] * 10 + [2] * 2 + [3])
    keep, held = carve_validation(y, 0.2, seed=3)
    assert set(keep) | set(held) == set(range(len(y))) and not set(keep) & set(held)
    assert [int((y[held] == c).sum()) for c in range(4)] == [10, 2, 1, 0]
    again, _ = carve_validation(y, 0.2, seed=3)
    other, _ = carve_validation(y, 0.2, seed=4)
    np.testing.assert_array_equal(keep, again)
    assert not np.array_equal(keep, other)


def test_data_flags_become_a_checked_spec(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    csv_path = write_wine_csv(tmp_path / "w.csv")
    spec = data_spec_from_args(
        parser.parse_args(["--dataset", str(csv_path), "--label-column", "cultivar"])
    )
    assert spec.kind == "csv" and Path(spec.source).is_absolute()
    assert DataSpec.from_dict(spec.to_dict()) == spec
    root = write_image_folder(tmp_path / "imgs", per_class=2)
    folder = data_spec_from_args(
        parser.parse_args(["--dataset", str(root), "--image-size", "16x8", "--channels", "3"])
    )
    assert folder.image_size == (16, 8) and DataSpec.from_dict(folder.to_dict()) == folder
    for argv, message in (
        (["--dataset", str(csv_path)], "needs --label-column"),
        (["--dataset", str(root), "--label-column", "x"], "--label-column is for CSV"),
        (["--image-size", "8"], "--image-size and --channels are for image-folder"),
        (["--dataset", str(root), "--image-size", "0x4"], "--image-size must be"),
        (["--dataset", str(root), "--channels", "2"], "--channels must be 1 or 3"),
        (["--val-fraction", "1"], "--val-fraction must lie in (0, 1)"),
    ):
        with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
            data_spec_from_args(parser.parse_args(argv))


# --------------------------------------------------------------------------- bad data


def _npz(path: Path, **arrays: object) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def _bad_npz(tmp: Path, case: str) -> Path:
    x = np.random.default_rng(0).random((20, 4))
    y = np.arange(20) % 2
    p = tmp / f"{case}.npz"
    if case == "missing":
        return _npz(p, x=x, y_train=y)
    if case == "out-of-range":
        return _npz(p, x_train=x, y_train=np.where(y == 1, 5, 0), class_names=np.array(["a", "b"]))
    if case == "negative":
        return _npz(p, x_train=x, y_train=y - 1)
    if case == "ragged":
        return _npz(p, x_train=np.array([[1.0, 2.0], [3.0]], dtype=object), y_train=y[:2])
    if case == "nan":
        x[7, 2] = np.nan
        return _npz(p, x_train=x, y_train=y)
    if case == "one-class":
        return _npz(p, x_train=x, y_train=np.zeros(20, np.int64))
    if case == "half-split":
        return _npz(p, x_train=x, y_train=y, x_val=x)
    if case == "float-labels":
        return _npz(p, x_train=x, y_train=y + 0.5)
    raise AssertionError(case)


def _bad_csv(tmp: Path, case: str) -> Path:
    p = tmp / f"{case}.csv"
    body = {
        "ragged": "a,b,label\n1,2,x\n3,y\n",
        "nan": "a,b,label\n1,2,x\n3,nan,y\n",
        "text": "a,b,label\n1,2,x\n3,four,y\n",
        "empty-cell": "a,b,label\n1,2,x\n3,,y\n",
        "one-class": "a,b,label\n1,2,x\n3,4,x\n5,6,x\n",
        "no-column": "a,b,kind\n1,2,x\n3,4,y\n",
    }[case]
    p.write_text(body)
    return p


def _bad_folder(tmp: Path, case: str) -> Path:
    root = write_image_folder(tmp / case, per_class=2)
    if case == "one-class":
        for name in FOLDER_CLASSES[1:]:
            for f in sorted((root / name).rglob("*"), reverse=True):
                f.unlink() if f.is_file() else f.rmdir()
            (root / name).rmdir()
    elif case == "empty-class":
        for f in (root / "dot").rglob("*.*"):
            f.unlink()
    elif case == "corrupt":
        next((root / "cross").rglob("*.png")).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return root


BAD = [
    ("npz", "missing", "no array 'x_train' (it holds: x, y_train)"),
    ("npz", "out-of-range", "y_train holds label 5, outside 0..1 (2 class_names)"),
    ("npz", "negative", "y_train holds label -1, outside"),
    ("npz", "ragged", "'x_train' is an object array (ragged rows?)"),
    ("npz", "nan", "x_train holds NaN or Inf (example 7)"),
    (
        "npz",
        "one-class",
        "the training labels hold 1 class(es) (0); classification needs at least 2",
    ),
    ("npz", "half-split", "x_val and y_val come together"),
    ("npz", "float-labels", "must hold integer labels"),
    ("csv", "ragged", "line 3 has 2 fields, the header has 3 (ragged rows)"),
    ("csv", "nan", "line 3, column 'b': NaN or Inf in the features"),
    ("csv", "text", "line 3, column 'b': 'four' is not a number"),
    ("csv", "empty-cell", "line 3, column 'b': a missing value"),
    ("csv", "one-class", "1 class(es) (x)"),
    ("csv", "no-column", "no column 'label' for --label-column (columns: a, b, kind)"),
    ("folder", "one-class", "1 class subfolder(s)"),
    ("folder", "empty-class", "no PNG or JPEG files in class folder(s) dot"),
    ("folder", "corrupt", "cannot be read as an image"),
]


@pytest.mark.parametrize(("kind", "case", "message"), BAD, ids=[f"{k}-{c}" for k, c, _ in BAD])
def test_bad_data_gives_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, case: str, message: str
) -> None:
    make = {"npz": _bad_npz, "csv": _bad_csv, "folder": _bad_folder}[kind]
    path = make(tmp_path, case)
    out = tmp_path / "run"
    extra = ["--label-column", "label"] if kind == "csv" else []
    argv = ["train", "sgld", "--dataset", str(path), *extra, "--arch", "mlp:8", "--out", str(out)]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert message in err, err
    assert (path.name if kind != "folder" else str(path)) in err  # names the file
    assert not out.exists()


@pytest.mark.parametrize(
    ("dataset", "message"),
    [("nowhere.npz", "no such file or folder"), ("notes.txt", "not 'mnist', a .npz or .csv")],
)
def test_what_is_not_a_dataset_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], dataset: str, message: str
) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    argv = ["train", "sgd", "--dataset", str(tmp_path / dataset), "--arch", "mlp:8"]
    assert main([*argv, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_a_cnn_needs_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_wine_csv(tmp_path / "wine.csv")
    argv = ["train", "sgld", "--dataset", str(path), "--label-column", "cultivar"]
    assert main([*argv, "--arch", "al-cnn", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "al-cnn is a CNN: it needs image inputs" in err and "shape 13" in err
    assert not (tmp_path / "r").exists()
