"""Inputs far from the training data: what the default (combined) flag catches that mutual
information alone does not.

Two parts, each a checkpoint's flags at its stored thresholds (K = 100 networks, NumPy seed 0,
the contract's reference path ``Checkpoint.summarize``, which the service's answers are
tested against):

* **MNIST** (``--checkpoint``, default the shipped model): MNIST test digits (in
  distribution), the OOD sets of the evaluation (notMNIST, Omniglot, greyscale CIFAR-10,
  Gaussian and uniform noise), blank, constant and inverted images, and faint digits (x 0.5).
* **Tabular**, made as a user makes one: scikit-learn's wine and breast-cancer data written
  as CSV files with 70 % of the rows (seeded), then ``apd train sgld --dataset X.csv
  --label-column ...`` and ``apd distill --samples RUN`` (their defaults but for the step
  counts, recorded below). The 30 % held out are the in-distribution rows; far rows are those
  rows x 20, all-zero rows, and those rows with one feature (in turn) at its training minimum
  plus 100 times its training range.

For each set: the fraction flagged by the default flag (``combined``), by mutual information
alone at its own threshold (the default before the data-support score) and by
``data_support`` alone, and the median data-support distance (about 1 for training-like
inputs). MNIST digits are also sent as a user uploads them (ink on white, 4x larger, through
``/predict/image``'s preparation), which smooths them: their distance is why the score is
one-sided (apd/support.py). Writes ``benchmarks/results/far_from_data.{json,md}``.

    python benchmarks/far_from_data.py [--checkpoint models/mnist-fcnn1/model.safetensors]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from apd.checkpoint import Checkpoint, load_checkpoint
from apd.uncertainty import PredictiveSummary, ScoreName
from training.cli import main as apd_main
from training.mnist import load_mnist, load_ood
from training.revision import code_revision

ROOT: Final = Path(__file__).resolve().parents[1]
RESULTS: Final = ROOT / "benchmarks" / "results"
K: Final = 100
OOD: Final = ("notmnist", "omniglot", "cifar10_grey", "gaussian", "uniform")
TRAIN_ARGS: Final = ("--steps", "3000", "--no-progress")
DISTILL_ARGS: Final = ("--steps", "1000", "--eval-every", "250", "--no-progress")
SCORES: Final = (ScoreName.COMBINED, ScoreName.MUTUAL_INFORMATION, ScoreName.DATA_SUPPORT)


def summary_of(ckpt: Checkpoint, raw: NDArray[Any], chunk: int = 1000) -> PredictiveSummary:
    """The reference summary of raw inputs, ``chunk`` at a time (same networks throughout)."""
    parts = [
        ckpt.summarize(ckpt.meta.input.preprocess(raw[i : i + chunk]), K, 0)
        for i in range(0, len(raw), chunk)
    ]
    joined = {}
    for f in fields(PredictiveSummary):
        arrays = [getattr(p, f.name) for p in parts]
        joined[f.name] = None if arrays[0] is None else np.concatenate(arrays)
    return PredictiveSummary(**joined)


def flag_rates(ckpt: Checkpoint, raw: NDArray[Any]) -> dict[str, Any]:
    s = summary_of(ckpt, np.asarray(raw, np.float32))
    a = ckpt.meta.anomaly
    rates = {score.value: float(a.flags(s, score)[1].mean()) for score in SCORES}
    support = s.data_support
    median = None if support is None else float(np.median(support))
    return {"n": len(raw), **rates, "median_data_support": median}


def as_uploaded(images: NDArray[np.float32]) -> NDArray[np.float32]:
    """MNIST digits as a user uploads them: dark ink on white paper in a PNG, prepared by
    ``/predict/image`` (service.codecs.images.mnist_input: inverted, cropped, centred,
    resampled)."""
    import io

    from PIL import Image

    from service.codecs.images import mnist_input

    out = []
    for image in images:
        pixels = (255 - np.rint(image.reshape(28, 28) * 255)).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).resize((112, 112), Image.Resampling.BILINEAR).save(buffer, "PNG")
        out.append(mnist_input(buffer.getvalue()))
    return np.stack(out)


def mnist_part(path: Path) -> dict[str, Any]:
    ckpt = load_checkpoint(path)
    m = load_mnist()
    sets: dict[str, NDArray[Any]] = {"MNIST test (in distribution)": m.test_x}
    for name in OOD:
        sets[name] = load_ood(name, n=2000, seed=0)
    sets |= {
        "blank (all 0)": np.zeros((100, 784), np.float32),
        "constant 0.5": np.full((100, 784), 0.5, np.float32),
        "constant 1 (all white)": np.ones((100, 784), np.float32),
        "MNIST inverted (black on white)": 1 - m.test_x[:2000],
        "MNIST faint (x 0.5)": 0.5 * m.test_x[:2000],
        "MNIST uploaded (ink on white PNG, x4, prepared by /predict/image)": as_uploaded(
            m.test_x[:500]
        ),
    }
    rows = {name: flag_rates(ckpt, x) for name, x in sets.items()}
    a = ckpt.meta.anomaly
    return {
        "checkpoint": str(path),
        "checkpoint_sha256": ckpt.sha256,
        "calibration_size": a.calibration_size,
        "combined_rates": None
        if a.combined is None
        else {s.value: r for s, r in a.combined.rates.items()},
        "rows": rows,
    }


def _write_csv(path: Path, x: NDArray[Any], y: NDArray[Any], names: list[str]) -> None:
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow([*names, "label"])
        for row, target in zip(x, y, strict=True):
            out.writerow([*(f"{v:.6g}" for v in row), f"class_{target}"])


def tabular_part(name: str, work: Path) -> dict[str, Any]:
    from sklearn import datasets

    data = {"wine": datasets.load_wine, "breast_cancer": datasets.load_breast_cancer}[name]()
    x, y = np.asarray(data.data, np.float64), np.asarray(data.target)
    order = np.random.default_rng(0).permutation(len(x))
    cut = int(0.7 * len(x))
    train, held = order[:cut], order[cut:]
    csv_path = work / f"{name}.csv"
    _write_csv(csv_path, x[train], y[train], [f"f{i}" for i in range(x.shape[1])])
    run, out = work / f"run-{name}", work / f"{name}.safetensors"
    t0 = time.perf_counter()
    data_args = ["--dataset", str(csv_path), "--label-column", "label"]
    if apd_main(["train", "sgld", *data_args, "--arch", "mlp:32", "--out", str(run), *TRAIN_ARGS]):
        raise SystemExit(f"apd train sgld failed on {csv_path}")
    if apd_main(["distill", "--samples", str(run), "--out", str(out), *DISTILL_ARGS]):
        raise SystemExit(f"apd distill failed on {run}")
    seconds = time.perf_counter() - t0
    ckpt = load_checkpoint(out)
    lo, hi = x[train].min(0), x[train].max(0)
    one = x[held].copy()
    feature = np.arange(len(one)) % x.shape[1]
    one[np.arange(len(one)), feature] = lo[feature] + 100 * (hi - lo)[feature]
    sets = {
        "held-out rows (in distribution)": x[held],
        "held-out rows x 20": 20 * x[held],
        "all-zero rows": np.zeros((100, x.shape[1])),
        "one feature at 100x its range": one,
    }
    a = ckpt.meta.anomaly
    return {
        "data": f"scikit-learn {name}: {len(x)} rows x {x.shape[1]} features, {len(train)} in "
        "the CSV, the rest held out",
        "calibration_size": a.calibration_size,
        "fpr_interval_combined": a.fpr_interval.get(ScoreName.COMBINED),
        "seconds": round(seconds, 1),
        "rows": {n: flag_rates(ckpt, v) for n, v in sets.items()},
    }


def _table(rows: dict[str, dict[str, Any]]) -> list[str]:
    out = [
        "| inputs | n | default flag (combined) | mutual information alone | data_support alone "
        "| median data_support |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        cells = " | ".join(f"{100 * r[s.value]:.1f} %" for s in SCORES)
        median = r["median_data_support"]
        out.append(f"| {name} | {r['n']:,} | {cells} | {median:.3g} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--checkpoint", type=Path, default=ROOT / "models" / "mnist-fcnn1" / "model.safetensors"
    )
    args = ap.parse_args()
    load_start = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory() as tmp:
        tabular = {n: tabular_part(n, Path(tmp)) for n in ("wine", "breast_cancer")}
    record: dict[str, Any] = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "benchmarks/far_from_data.py", *sys.argv[1:]]),
        "code_revision": code_revision(),
        "load_average_1min": {"start": load_start},
        "train_args": list(TRAIN_ARGS),
        "distill_args": list(DISTILL_ARGS),
        "mnist": mnist_part(args.checkpoint),
        "tabular": tabular,
    }
    record["load_average_1min"]["end"] = round(os.getloadavg()[0], 2)
    mnist = record["mnist"]
    lines = [
        "# Inputs far from the training data",
        "",
        f"Recorded {record['created_at']} by `{record['command']}`, code "
        f"{record['code_revision'][:12]}. 1-minute load average {load_start} -> "
        f"{record['load_average_1min']['end']} (2 cores). Flags at each checkpoint's stored "
        f"thresholds (target false-positive rate 5 %), K = {K} networks, seed 0.",
        "",
        f"## MNIST: `{mnist['checkpoint']}` (sha256 {mnist['checkpoint_sha256'][:12]})",
        "",
        f"Calibrated on {mnist['calibration_size']:,} validation digits; the combined flag's "
        "tests' rates there: "
        + ", ".join(f"{s} {r:.4f}" for s, r in mnist["combined_rates"].items())
        + ".",
        "",
        *_table(mnist["rows"]),
    ]
    for name, part in tabular.items():
        lo, hi = part["fpr_interval_combined"]
        lines += [
            "",
            f"## {name}",
            "",
            f"{part['data']}. `apd train sgld --arch mlp:32 {' '.join(TRAIN_ARGS)}`, `apd "
            f"distill {' '.join(DISTILL_ARGS)}` ({part['seconds']:.0f} s). Thresholds set on "
            f"{part['calibration_size']} validation rows: the combined flag's false-positive "
            f"rate lies in [{100 * lo:.1f} %, {100 * hi:.1f} %] (95 %).",
            "",
            *_table(part["rows"]),
        ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "far_from_data.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / "far_from_data.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
