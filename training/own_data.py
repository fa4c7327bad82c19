"""The data ``apd train`` and ``apd distill`` work on: MNIST, an ``.npz``, an image folder or a
CSV file, as network inputs plus the input convention that makes them from raw examples.

``--dataset`` names the source (:class:`DataSpec`):

* ``mnist`` (the default): MNIST with the paper's 50,000 / 10,000 / 10,000 split
  (:func:`training.mnist.load_mnist`); raw examples are 28 x 28 float pixels in [0, 1].
* ``PATH.npz``: arrays ``x_train``, ``y_train`` and optionally ``x_val`` / ``y_val``,
  ``x_test`` / ``y_test`` and ``class_names`` (strings). ``x`` holds one example per row of
  any shape: features ``(N, D)``, images ``(N, H, W)`` or ``(N, C, H, W)``; ``y`` integer
  labels ``0..C-1`` (``C = len(class_names)``, else the largest label + 1).
* ``DIR/``: an image folder laid out as torchvision's ``ImageFolder``: one subfolder per
  class (sorted names are the classes), PNG or JPEG files anywhere below it. Images are
  converted to grey (``L``) or ``RGB`` and resized (bilinear) to one size, given by
  ``--image-size`` / ``--channels`` or taken from the first image. Examples are uint8
  ``(H, W)`` (grey) or ``(3, H, W)``.
* ``PATH.csv`` with ``--label-column NAME``: a header row, then one example per row; every
  other column is a numeric feature. The label column's distinct values are the classes,
  sorted (numerically when they are all integers), their text the class names.

Without a validation split one is carved from the training examples: ``--val-fraction`` of
each class (at least one example of every class with two or more), chosen by
``--split-seed``. The split is recorded; only ``mnist`` and an npz's ``x_test`` give a test
split.

**Preprocessing is part of the model** (:class:`apd.checkpoint.InputConvention`): the network
sees ``x = raw * scale + shift``, computed by :meth:`InputConvention.preprocess`, the same
function the service applies to what clients send. ``--preprocess auto`` (the default) scales
uint8 data by 1/255 and standardises anything else with training-split statistics: per feature
for feature vectors, one mean and standard deviation for images (a constant feature keeps
scale 1). ``standardize`` standardises uint8 data too; ``none`` leaves raw values as they are.

The fingerprint of the data is the sha256 of the file (of a manifest of every image's sha256
for a folder). Anything wrong with the data raises :class:`~training.mnist.DataError` with one
line naming the file and the problem, before anything is written.
"""

from __future__ import annotations

import argparse
import csv
import enum
import hashlib
import math
import os
import re
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
from numpy.typing import NDArray

from apd.checkpoint import InputConvention, decode_image
from training.mnist import DataError, dataset_fingerprint, file_sha256, load_mnist

Kind = Literal["mnist", "npz", "csv", "folder"]
IMAGE_SUFFIXES: Final = (".png", ".jpg", ".jpeg")
NPZ_ARRAYS: Final = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test", "class_names")
DEFAULT_VAL_FRACTION: Final = 0.2
MNIST_CLASSES: Final = [str(i) for i in range(10)]


class Preprocess(enum.StrEnum):
    """How raw examples become network inputs (module docstring)."""

    AUTO = "auto"
    STANDARDIZE = "standardize"
    NONE = "none"


@dataclass(frozen=True)
class DataSpec:
    """Where the data is and how it is read: what ``apd train`` records in a run, so that
    ``apd distill`` reads the same examples back."""

    source: str = "mnist"  # "mnist", or the absolute path of the file or folder
    label_column: str | None = None  # csv
    image_size: tuple[int, int] | None = None  # folder: (H, W)
    channels: int | None = None  # folder: 1 (grey) or 3 (RGB)
    val_fraction: float = DEFAULT_VAL_FRACTION
    split_seed: int = 0
    preprocess: Preprocess = Preprocess.AUTO

    @property
    def kind(self) -> Kind:
        if self.source == "mnist":
            return "mnist"
        path = Path(self.source)
        if not path.exists():
            raise DataError(f"--dataset {self.source}: no such file or folder")
        if path.is_dir():
            return "folder"
        suffix = path.suffix.lower()
        if suffix == ".npz":
            return "npz"
        if suffix == ".csv":
            return "csv"
        raise DataError(
            f"--dataset {self.source}: not 'mnist', a .npz or .csv file, or an image folder"
        )

    @property
    def name(self) -> str:
        """A short name for model ids: ``mnist``, or the file's stem / the folder's name."""
        if self.source == "mnist":
            return "mnist"
        path = Path(self.source)
        return re.sub(r"[^A-Za-z0-9._-]+", "-", path.name if path.is_dir() else path.stem)

    def check(self) -> None:
        """Flags that do not fit the source: :class:`DataError` with the reason."""
        kind = self.kind
        if kind == "csv" and not self.label_column:
            raise DataError(f"{self.source}: a CSV dataset needs --label-column NAME")
        if kind != "csv" and self.label_column:
            raise DataError("--label-column is for CSV datasets")
        if kind != "folder" and (self.image_size or self.channels):
            raise DataError("--image-size and --channels are for image-folder datasets")
        if self.channels not in (None, 1, 3):
            raise DataError(f"--channels must be 1 or 3, got {self.channels}")
        if not 0.0 < self.val_fraction < 1.0:
            raise DataError(f"--val-fraction must lie in (0, 1), got {self.val_fraction}")
        if self.split_seed < 0:
            raise DataError(f"--split-seed must be >= 0, got {self.split_seed}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_size"] = None if self.image_size is None else list(self.image_size)
        d["preprocess"] = self.preprocess.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataSpec:
        size = d.get("image_size")
        return cls(
            source=str(d["source"]),
            label_column=d.get("label_column"),
            image_size=None if size is None else (int(size[0]), int(size[1])),
            channels=d.get("channels"),
            val_fraction=float(d.get("val_fraction", DEFAULT_VAL_FRACTION)),
            split_seed=int(d.get("split_seed", 0)),
            preprocess=Preprocess(d.get("preprocess", Preprocess.AUTO.value)),
        )


@dataclass(frozen=True, eq=False)
class Dataset:
    """Network inputs ``(N, D)`` float32 and labels ``(N,)`` int64 of each split (``test_*``
    ``None`` when the data has no test split), the input convention that made them from raw
    examples, and where they came from."""

    spec: DataSpec
    train_x: NDArray[np.float32]
    train_y: NDArray[np.int64]
    val_x: NDArray[np.float32]
    val_y: NDArray[np.int64]
    test_x: NDArray[np.float32] | None
    test_y: NDArray[np.int64] | None
    convention: InputConvention
    fingerprint: str  # sha256 of the data file(s)
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    split: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One raw example's shape."""
        return tuple(self.convention.shape)

    @property
    def num_classes(self) -> int:
        assert self.convention.class_names is not None
        return len(self.convention.class_names)

    def provenance(self) -> dict[str, Any]:
        """What a checkpoint records about its data."""
        return {
            "dataset": self.name,
            "data_sha256": self.fingerprint,
            "spec": self.spec.to_dict(),
            "files": dict(self.files),
            "split": dict(self.split),
        }


# --------------------------------------------------------------------------- CLI


def add_data_arguments(parser: argparse.ArgumentParser | Any) -> None:
    """``--dataset`` and the flags that say how to read it (shared by train and distill)."""
    parser.add_argument(
        "--dataset",
        default="mnist",
        metavar="mnist|PATH.npz|PATH.csv|DIR/",
        help="training data (default mnist); see docs/training.md, 'Your own data'",
    )
    parser.add_argument("--label-column", default=None, help="CSV: the column of labels")
    parser.add_argument(
        "--image-size", default=None, metavar="H[xW]", help="image folder: resize to this"
    )
    parser.add_argument(
        "--channels", type=int, default=None, help="image folder: 1 (grey) or 3 (RGB)"
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=DEFAULT_VAL_FRACTION,
        help="share of each class held out for validation when the data has no validation "
        f"split (default {DEFAULT_VAL_FRACTION})",
    )
    parser.add_argument("--split-seed", type=int, default=0, help="seed of that split")
    parser.add_argument(
        "--preprocess",
        choices=[p.value for p in Preprocess],
        default=Preprocess.AUTO.value,
        help="auto: uint8 / 255, else standardise (default); standardize; none",
    )


def _image_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    m = re.fullmatch(r"(\d+)(?:x(\d+))?", text)
    if m is None or int(m.group(1)) <= 0 or int(m.group(2) or 1) <= 0:
        raise DataError(f"--image-size must be H or HxW (positive integers), got {text!r}")
    h = int(m.group(1))
    return h, int(m.group(2) or h)


def data_spec_from_args(args: argparse.Namespace) -> DataSpec:
    """The :class:`DataSpec` of parsed :func:`add_data_arguments` flags, checked."""
    source = str(args.dataset)
    if source != "mnist":
        source = str(Path(source).expanduser().resolve())
    spec = DataSpec(
        source=source,
        label_column=args.label_column,
        image_size=_image_size(args.image_size),
        channels=args.channels,
        val_fraction=float(args.val_fraction),
        split_seed=int(args.split_seed),
        preprocess=Preprocess(args.preprocess),
    )
    spec.check()
    return spec


# --------------------------------------------------------------------------- raw data


@dataclass
class _Raw:
    """Raw examples of each split as read from the source, before preprocessing."""

    x_train: NDArray[Any]
    y_train: NDArray[np.int64]
    val: tuple[NDArray[Any], NDArray[np.int64]] | None
    test: tuple[NDArray[Any], NDArray[np.int64]] | None
    class_names: list[str]
    files: dict[str, str]
    fingerprint: str


def _labels(y: NDArray[Any], where: str) -> NDArray[np.int64]:
    """Integer labels ``(N,)`` from an integer array, or a float one holding whole numbers."""
    if y.ndim != 1:
        raise DataError(f"{where} must be 1-D integer labels, got shape {y.shape}")
    if y.dtype.kind in "iu":
        return y.astype(np.int64)
    if y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all():
        return y.astype(np.int64)
    raise DataError(f"{where} must hold integer labels 0..C-1, got dtype {y.dtype}")


def _check_finite(x: NDArray[Any], where: str) -> None:
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))[0])
        raise DataError(f"{where} holds NaN or Inf (example {bad}); remove or impute them")


def _read_npz(path: Path) -> _Raw:
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    arrays: dict[str, NDArray[Any]] = {}
    with npz:
        present = set(npz.files)
        for name in ("x_train", "y_train"):
            if name not in present:
                held = ", ".join(sorted(present)) or "nothing"
                raise DataError(f"{path}: no array {name!r} (it holds: {held})")
        for name in NPZ_ARRAYS:
            if name not in present:
                continue
            try:
                arrays[name] = npz[name]
            except ValueError:
                raise DataError(
                    f"{path}: array {name!r} is an object array (ragged rows?); store a "
                    "numeric array of one shape per example"
                ) from None
            except (OSError, zipfile.BadZipFile, EOFError) as exc:
                raise DataError(f"{path}: array {name!r} cannot be read ({exc})") from None
    for split in ("val", "test"):
        if (f"x_{split}" in arrays) != (f"y_{split}" in arrays):
            raise DataError(f"{path}: x_{split} and y_{split} come together; one is missing")
    x_train = arrays["x_train"]
    if x_train.dtype.kind not in "biuf" or not 2 <= x_train.ndim <= 4:
        raise DataError(
            f"{path}: x_train must be numeric with one example per row, (N, D), (N, H, W) or "
            f"(N, C, H, W); got {x_train.dtype} {x_train.shape}"
        )
    splits: dict[str, tuple[NDArray[Any], NDArray[np.int64]]] = {}
    for split in ("train", "val", "test"):
        if f"x_{split}" not in arrays:
            continue
        x, y = arrays[f"x_{split}"], _labels(arrays[f"y_{split}"], f"{path}: y_{split}")
        if x.dtype.kind not in "biuf" or x.shape[1:] != x_train.shape[1:]:
            raise DataError(
                f"{path}: x_{split} is {x.dtype} {x.shape}; its examples must be numeric of "
                f"the shape of x_train's, {x_train.shape[1:]}"
            )
        if len(x) != len(y):
            raise DataError(f"{path}: {len(x)} examples in x_{split} but {len(y)} labels")
        if len(x) == 0:
            raise DataError(f"{path}: x_{split} holds no examples")
        _check_finite(x, f"{path}: x_{split}")
        splits[split] = (x if x.dtype.kind != "b" else x.astype(np.uint8), y)
    names_arr = arrays.get("class_names")
    if names_arr is not None:
        if names_arr.ndim != 1 or names_arr.dtype.kind not in "U":
            raise DataError(f"{path}: class_names must be a 1-D array of strings")
        names = [str(n) for n in names_arr]
        if len(set(names)) != len(names):
            raise DataError(f"{path}: class_names are not distinct")
        num_classes = len(names)
    else:
        num_classes = max(int(y.max()) for _, y in splits.values()) + 1
        names = [str(i) for i in range(num_classes)]
    for split, (_, y) in splits.items():
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            of = f"{num_classes} class_names" if names_arr is not None else "the labels"
            raise DataError(
                f"{path}: y_{split} holds label {bad}, outside 0..{num_classes - 1} ({of})"
            )
    digest = file_sha256(path)
    return _Raw(
        x_train=splits["train"][0],
        y_train=splits["train"][1],
        val=splits.get("val"),
        test=splits.get("test"),
        class_names=names,
        files={path.name: digest},
        fingerprint=digest,
    )


def _read_csv(path: Path, label_column: str) -> _Raw:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc})") from None
    rows = [r for r in rows if r]  # blank lines
    if not rows:
        raise DataError(f"{path}: empty file (a header row, then one example per row)")
    header = [h.strip() for h in rows[0]]
    if label_column not in header:
        raise DataError(
            f"{path}: no column {label_column!r} for --label-column (columns: {', '.join(header)})"
        )
    if len(header) < 2:
        raise DataError(f"{path}: needs at least one feature column beside the labels")
    li = header.index(label_column)
    features = [i for i in range(len(header)) if i != li]
    body = rows[1:]
    if not body:
        raise DataError(f"{path}: a header but no examples")
    x = np.empty((len(body), len(features)), dtype=np.float64)
    labels: list[str] = []
    for r, row in enumerate(body):
        line = r + 2  # 1-based, after the header
        if len(row) != len(header):
            raise DataError(
                f"{path}: line {line} has {len(row)} fields, the header has {len(header)} "
                "(ragged rows)"
            )
        for j, col in enumerate(features):
            cell = row[col].strip()
            try:
                value = float(cell)
            except ValueError:
                what = "a missing value" if cell == "" else f"{cell!r} is not a number"
                raise DataError(f"{path}: line {line}, column {header[col]!r}: {what}") from None
            if not math.isfinite(value):
                raise DataError(
                    f"{path}: line {line}, column {header[col]!r}: NaN or Inf in the features"
                )
            x[r, j] = value
        label = row[li].strip()
        if label == "":
            raise DataError(f"{path}: line {line}: missing label in {label_column!r}")
        labels.append(label)
    distinct = sorted(set(labels))
    if all(re.fullmatch(r"[+-]?\d+", v) for v in distinct):
        distinct.sort(key=int)
    index = {v: i for i, v in enumerate(distinct)}
    y = np.array([index[v] for v in labels], dtype=np.int64)
    digest = file_sha256(path)
    return _Raw(x, y, None, None, distinct, {path.name: digest}, digest)


def _image_files(folder: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        found += [Path(root) / f for f in sorted(files) if f.lower().endswith(IMAGE_SUFFIXES)]
    return found


def _read_folder(root: Path, spec: DataSpec) -> _Raw:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise DataError(
            f"{root}: {len(classes)} class subfolder(s); an image folder needs one subfolder "
            "per class, at least 2"
        )
    files = {c: _image_files(root / c) for c in classes}
    empty = [c for c, fs in files.items() if not fs]
    if empty:
        raise DataError(f"{root}: no PNG or JPEG files in class folder(s) {', '.join(empty)}")
    first = files[classes[0]][0]
    size, channels = spec.image_size, spec.channels
    if size is None or channels is None:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(first) as im:
                w, h = im.size
                grey = im.mode in ("1", "L", "LA", "I", "I;16", "F")
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{first}: not a readable image ({exc})") from None
        size = size or (h, w)
        channels = channels or (1 if grey else 3)
    mode: Literal["L", "RGB"] = "L" if channels == 1 else "RGB"
    shape = size if channels == 1 else (3, *size)
    total = sum(len(fs) for fs in files.values())
    x = np.empty((total, *shape), dtype=np.uint8)
    y = np.empty(total, dtype=np.int64)
    manifest = []
    i = 0
    for label, c in enumerate(classes):
        for path in files[c]:
            try:
                data = path.read_bytes()
                x[i] = decode_image(data, mode, size)
            except (OSError, ValueError) as exc:
                raise DataError(f"{path}: cannot be read as an image ({exc})") from None
            y[i] = label
            manifest.append(f"{hashlib.sha256(data).hexdigest()}  {path.relative_to(root)}\n")
            i += 1
    fingerprint = hashlib.sha256("".join(sorted(manifest)).encode()).hexdigest()
    return _Raw(x, y, None, None, classes, {}, fingerprint)


# --------------------------------------------------------------------------- preparation


def carve_validation(
    y: NDArray[np.int64], fraction: float, seed: int
) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """Stratified ``(train, validation)`` indices: ``round(fraction * n_c)`` examples of each
    class ``c`` held out (at least 1 when ``n_c >= 2``, never all), in seeded random order;
    each index array sorted."""
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        take = min(max(round(fraction * len(idx)), 1 if len(idx) >= 2 else 0), len(idx) - 1)
        val.append(idx[:take])
    held = np.sort(np.concatenate(val)) if val else np.empty(0, np.intp)
    keep = np.setdiff1d(np.arange(len(y)), held)
    return keep, held


def fit_convention(
    x: NDArray[Any], class_names: list[str], preprocess: Preprocess, fingerprint: str
) -> InputConvention:
    """The input convention for raw training examples ``x (N, *shape)`` (module docstring)."""
    shape = list(x.shape[1:])
    uint8 = x.dtype == np.uint8
    images = len(shape) >= 2
    what = (
        "x".join(map(str, shape))
        + (" uint8" if uint8 else "")
        + (" images" if images else " features")
    )
    scale: float | list[float] = 1.0
    shift: float | list[float] = 0.0
    if preprocess is Preprocess.AUTO and uint8:
        scale = 1.0 / 255.0
        how = "scaled by 1/255"
    elif preprocess is Preprocess.NONE:
        how = "used as they are"
    else:
        flat = x.reshape(len(x), -1).astype(np.float64)
        if images:
            mean, std = float(flat.mean()), float(flat.std())
            s = 1.0 / std if std > 0 else 1.0
            scale, shift = s, -mean * s
            how = "standardised with the training mean and std of all values"
        else:
            means, stds = flat.mean(axis=0), flat.std(axis=0)
            inv = np.where(stds > 0, 1.0 / np.where(stds > 0, stds, 1.0), 1.0)
            scale, shift = inv.tolist(), (-means * inv).tolist()
            how = "standardised per feature with training-split statistics"
    lo, hi = (0.0, 255.0) if uint8 else (float(x.min()), float(x.max()))
    return InputConvention(
        shape=shape,
        dtype="uint8" if uint8 else "float32",
        value_range=(lo, hi),
        scale=scale,
        shift=shift,
        class_names=class_names,
        data_sha256=fingerprint,
        description=f"{what}, {how}: x = raw * scale + shift",
    )


def _load_mnist(spec: DataSpec, data_dir: str | Path | None) -> Dataset:
    m = load_mnist(data_dir)
    fingerprint = dataset_fingerprint(m)
    convention = InputConvention(class_names=MNIST_CLASSES, data_sha256=fingerprint)
    pp = convention.preprocess  # the identity on MNIST's [0, 1] pixels, as a writable copy
    return Dataset(
        spec=spec,
        train_x=pp(m.train_x),
        train_y=np.array(m.train_y),
        val_x=pp(m.val_x),
        val_y=np.array(m.val_y),
        test_x=pp(m.test_x),
        test_y=np.array(m.test_y),
        convention=convention,
        fingerprint=fingerprint,
        files=dict(m.sha256),
        split={"validation": "paper: the last 10,000 training images", "test": "t10k"},
    )


def load_dataset(spec: DataSpec, data_dir: str | Path | None = None) -> Dataset:
    """Read, check, split and preprocess the data ``spec`` names (``data_dir``: where MNIST
    lives, default ``$APD_DATA_DIR``). Raises :class:`DataError` with one line."""
    spec.check()
    kind = spec.kind
    if kind == "mnist":
        return _load_mnist(spec, data_dir)
    path = Path(spec.source)
    if kind == "npz":
        raw = _read_npz(path)
    elif kind == "csv":
        assert spec.label_column is not None
        raw = _read_csv(path, spec.label_column)
    else:
        raw = _read_folder(path, spec)
    present = np.unique(raw.y_train)
    if len(present) < 2:
        raise DataError(
            f"{path}: the training labels hold {len(present)} class(es) "
            f"({', '.join(raw.class_names[int(c)] for c in present)}); classification needs "
            "at least 2"
        )
    split: dict[str, Any] = {}
    x_train, y_train = raw.x_train, raw.y_train
    if raw.val is None:
        keep, held = carve_validation(y_train, spec.val_fraction, spec.split_seed)
        if len(held) == 0:
            raise DataError(
                f"{path}: too few examples ({len(y_train)}) to hold out a validation split"
            )
        (x_val, y_val), x_train, y_train = (
            (x_train[held], y_train[held]),
            x_train[keep],
            y_train[keep],
        )
        split["validation"] = {
            "carved_from": "training examples",
            "fraction": spec.val_fraction,
            "seed": spec.split_seed,
            "size": len(held),
            "stratified": True,
        }
    else:
        x_val, y_val = raw.val
        split["validation"] = "given"
    split["train_size"] = len(y_train)
    split["test"] = "given" if raw.test is not None else None
    convention = fit_convention(x_train, raw.class_names, spec.preprocess, raw.fingerprint)
    pp = convention.preprocess
    return Dataset(
        spec=spec,
        train_x=pp(x_train),
        train_y=y_train,
        val_x=pp(x_val),
        val_y=y_val,
        test_x=None if raw.test is None else pp(raw.test[0]),
        test_y=None if raw.test is None else raw.test[1],
        convention=convention,
        fingerprint=raw.fingerprint,
        files=raw.files,
        split=split,
    )
