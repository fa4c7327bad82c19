"""Test accuracy and NLL of SGD, MC-Dropout and SGLD on MNIST, with wall time and device.

For each architecture and method this reads the run directory ``<runs>/<method>-<arch>``
(written by ``apd train <method> --arch <arch> --out ...``; with ``--train-missing`` it runs
that command first when the directory has no ``READY``), then re-evaluates the stored
artefacts on the MNIST test set with the issue's protocol, independently of the numbers the
run wrote:

* SGD: the single network in ``weights.safetensors``;
* MC-Dropout: the mean softmax of 200 stochastic passes (p from the weights' metadata);
* SGLD: the mean softmax of 100 samples spread across the chains
  (:meth:`SampleStore.select_spread`).

Wall time and device come from the run's ``metrics.json`` (they were measured while it
trained). Targets from issue 2: SGLD fcNN1 >= 98.0 % within 20 min, fcNN2 >= 98.4 % within
40 min. Writes ``benchmarks/results/train.json`` and ``train.md``.

    python benchmarks/train.py [--runs runs] [--archs fcnn1 fcnn2] [--train-missing]
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from safetensors import safe_open

from apd.networks import get_spec
from training.cli import main as apd_main
from training.defaults import DROPOUT_PASSES, SGLD_EVAL_SAMPLES
from training.metrics import accuracy, negative_log_likelihood
from training.own_data import DataSpec, load_dataset
from training.run_layout import METRICS_FILE, READY_FILE, SAMPLES_DIR, WEIGHTS_FILE
from training.sample_store import SampleStore
from training.torch_ops import member_probs

RESULTS: Final = Path(__file__).resolve().parent / "results"
METHODS: Final = ("sgd", "dropout", "sgld")
TARGETS: Final = {"fcnn1": (0.980, 20 * 60.0), "fcnn2": (0.984, 40 * 60.0)}


def evaluate_run(run: Path, method: str, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Test accuracy / NLL of a finished run's artefacts (see the module docstring)."""
    if method == "sgld":
        store = SampleStore.open(run / SAMPLES_DIR)
        idx = store.select_spread(min(SGLD_EVAL_SAMPLES, len(store)))
        probs = member_probs(store.spec, np.asarray(store.theta[idx]), x).mean(0)
        how = f"{len(idx)} samples spread over {store.meta['num_chains']} chains"
        stored = len(store)
    else:
        with safe_open(str(run / WEIGHTS_FILE), "np") as f:
            theta = f.get_tensor("theta")
            meta = f.metadata()
        spec = get_spec(meta["arch"])
        p = float(meta["dropout"])
        if method == "dropout":
            gen = torch.Generator().manual_seed(0)
            probs = member_probs(spec, theta, x, dropout=p, passes=DROPOUT_PASSES, generator=gen)
            probs = probs.mean(0)
            how = f"{DROPOUT_PASSES} dropout passes, p = {p}"
        else:
            probs = member_probs(spec, theta, x).mean(0)
            how = "single network"
        stored = 1
    p_test = probs.numpy()
    return {
        "test_accuracy": accuracy(p_test, y),
        "test_nll": negative_log_likelihood(p_test, y),
        "predictive": how,
        "stored": stored,
    }


def _markdown(result: dict[str, Any]) -> str:
    lines = [
        "# MNIST test accuracy and NLL: SGD, MC-Dropout, SGLD",
        "",
        f"Recorded {result['created_at']} by `python benchmarks/train.py`. Test set: the "
        "10,000 MNIST t10k images; trained on the first 50,000 training images.",
        "",
        "| arch | method | test acc. | test NLL | val acc. | train wall time | predictive "
        "| device |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if r.get("missing"):
            lines.append(f"| {r['arch']} | {r['method']} | not run | | | | | |")
            continue
        lines.append(
            f"| {r['arch']} | {r['method']} | {100 * r['test_accuracy']:.2f} % "
            f"| {r['test_nll']:.4f} | {100 * r['val_accuracy']:.2f} % "
            f"| {r['train_wall_s'] / 60:.1f} min | {r['predictive']} | {r['device']} |"
        )
    lines += ["", "Targets (issue 2):", ""]
    for arch, t in result["targets"].items():
        status = {True: "met", False: "NOT met", None: "not run"}[t["met"]]
        lines.append(
            f"- SGLD {arch}: >= {100 * t['accuracy']:.1f} % within {t['minutes']:.0f} min: "
            f"**{status}**"
        )
    lines += [
        "",
        "Commands: `apd train {sgd,dropout,sgld} --arch ARCH --out runs/METHOD-ARCH` "
        "(tuned defaults per arch; see docs/training.md).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=Path("runs"))
    ap.add_argument("--archs", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--train-missing", action="store_true", help="train runs without READY")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(2)
    data = load_dataset(DataSpec(), args.data_dir)
    rows: list[dict[str, Any]] = []
    targets: dict[str, Any] = {}
    for arch in args.archs:
        for method in METHODS:
            run = args.runs / f"{method}-{arch}"
            if not (run / READY_FILE).is_file() and args.train_missing:
                code = apd_main(["train", method, "--arch", arch, "--out", str(run), "--force"])
                if code != 0:
                    raise SystemExit(f"training {run} failed with exit code {code}")
            if not (run / READY_FILE).is_file():
                print(f"{run}: not finished (no {READY_FILE}); skipped")
                rows.append({"arch": arch, "method": method, "run": str(run), "missing": True})
                continue
            recorded = json.loads((run / METRICS_FILE).read_text())
            assert data.test_x is not None and data.test_y is not None  # MNIST's t10k
            ev = evaluate_run(run, method, data.test_x, data.test_y)
            row = {
                "arch": arch,
                "method": method,
                "run": str(run),
                **ev,
                "val_accuracy": recorded["val_accuracy"],
                "recorded_test_accuracy": recorded["test_accuracy"],
                "train_wall_s": recorded["train_wall_s"],
                "device": recorded["device"],
            }
            rows.append(row)
            print(
                f"{arch} {method}: test acc {ev['test_accuracy']:.4f} NLL {ev['test_nll']:.4f} "
                f"({ev['predictive']}), trained in {row['train_wall_s'] / 60:.1f} min",
                flush=True,
            )
        acc_target, time_target = TARGETS[arch]
        sgld_row = next(r for r in rows if r["arch"] == arch and r["method"] == "sgld")
        met = None
        if not sgld_row.get("missing"):
            met = bool(
                sgld_row["test_accuracy"] >= acc_target and sgld_row["train_wall_s"] <= time_target
            )
        targets[arch] = {"accuracy": acc_target, "minutes": time_target / 60, "met": met}
    result = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "data_sha256": data.fingerprint,
        "rows": rows,
        "targets": targets,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "train.md").write_text(_markdown(result))
    print(f"wrote {args.out / 'train.json'} and train.md")


if __name__ == "__main__":
    main()
