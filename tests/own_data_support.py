"""The user's own data, as the tests make it: a scikit-learn tabular set written to CSV, small
images in an npz, and an image folder; and the ``apd train`` + ``apd distill`` commands that
turn one of them into a checkpoint (tests/test_own_data.py; serving tests can reuse them)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from training.cli import main

FOLDER_CLASSES = ("bar", "cross", "dot")


def write_wine_csv(path: Path) -> Path:
    """scikit-learn's wine data (178 x 13 float features, 3 cultivars) with a header row and
    the class names in the ``cultivar`` column."""
    from sklearn.datasets import load_wine

    wine = load_wine()
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow([*wine.feature_names, "cultivar"])
        for row, target in zip(wine.data, wine.target, strict=True):
            out.writerow([*(f"{v:g}" for v in row), wine.target_names[target]])
    return path


def digits_images() -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    """scikit-learn's 1,797 handwritten digits as 8 x 8 uint8 images (0..16 scaled by 16)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def write_digits_npz(path: Path, num_test: int = 397) -> Path:
    """The digits in an npz: ``x_train`` / ``y_train`` and a held-out ``x_test`` / ``y_test``
    (a seeded shuffle), ``class_names`` "0".."9"; no validation split (it is carved)."""
    x, y = digits_images()
    order = np.random.default_rng(0).permutation(len(y))
    train, test = order[num_test:], order[:num_test]
    np.savez(
        path,
        x_train=x[train],
        y_train=y[train],
        x_test=x[test],
        y_test=y[test],
        class_names=np.array([str(i) for i in range(10)]),
    )
    return path


def write_image_folder(root: Path, per_class: int = 30, size: tuple[int, int] = (12, 10)) -> Path:
    """An ImageFolder of RGB pictures, ``H x W = size``: a vertical bar, a cross and a dot
    (bright on a noisy dark background, a colour per channel), in nested subfolders, half PNG
    and half JPEG."""
    from PIL import Image

    rng = np.random.default_rng(0)
    h, w = size
    for label, name in enumerate(FOLDER_CLASSES):
        folder = root / name / "batch1"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = (rng.random((h, w)) * 60).astype(np.uint8)
            if label == 0:
                a[:, w // 2 - 1 : w // 2 + 1] = 255
            elif label == 1:
                a[h // 2 - 1 : h // 2 + 1, :] = 255
                a[:, w // 2 - 1 : w // 2 + 1] = 255
            else:
                a[h // 2 - 2 : h // 2 + 2, w // 2 - 2 : w // 2 + 2] = 255
            rgb = np.stack([a, a // 2, 255 - a], axis=-1)
            suffix = ".png" if i % 2 else ".jpg"
            Image.fromarray(rgb).save(folder / f"{name}-{i}{suffix}")
    return root


def train_and_distill(
    run: Path,
    checkpoint: Path,
    data_args: list[str],
    arch: str,
    train_args: list[str],
    distill_args: list[str],
) -> Path:
    """``apd train sgld --arch ARCH DATA... --out RUN`` then ``apd distill --samples RUN --out
    CHECKPOINT``; returns the checkpoint (asserting both commands succeed)."""
    code = main(["train", "sgld", *data_args, "--arch", arch, "--out", str(run), *train_args])
    assert code == 0, f"apd train failed for {data_args}"
    code = main(["distill", "--samples", str(run), "--out", str(checkpoint), *distill_args])
    assert code == 0, f"apd distill failed for {run}"
    return checkpoint
