"""``apd calibrate``: calibrate an existing checkpoint again, its generator untouched.

    apd calibrate --checkpoint models/mnist-fcnn1/model.safetensors --out recalibrated.safetensors
    apd calibrate --checkpoint model.safetensors --out model-1pct.safetensors --target-fpr 0.01

Reads the data the checkpoint records (MNIST, or the file of your own data at the path the
checkpoint names, or ``--dataset`` where it moved), fits the data-support score on its training
split, calibrates every threshold and fits the recalibration map of the served probabilities
on its validation split (:mod:`.calibrate`) with the
checkpoint's own networks (``num_samples`` of them, seed 0 as `apd distill` draws them for
calibration: the noise is the contract's, :meth:`apd.checkpoint.Checkpoint.noise`), stores
probes, and writes a new checkpoint whose generator tensors are the input's, byte for byte.
For a checkpoint made before the data-support score, probes and recalibration existed, this adds
them; for any checkpoint, it moves the thresholds to another ``--target-fpr``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from safetensors.numpy import load_file

from apd.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, with_probes
from apd.networks import forward_probs
from apd.uncertainty import PREDICTIVE_SCORES, ScoreName, summarize
from training.errors import UserError
from training.own_data import DataSpec, load_dataset

from .calibrate import DEFAULT_SCORE, MIN_RECALIBRATION_INPUTS, calibrate_on_data
from .package import default_version, probe_set, utc_now


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 2)[1] if __doc__ else None
    parser.add_argument("--checkpoint", required=True, metavar="PATH", help="checkpoint to read")
    parser.add_argument("--out", required=True, metavar="PATH", help="checkpoint to write")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out")
    parser.add_argument("--target-fpr", type=float, default=None, help="default: the input's")
    parser.add_argument(
        "--default-score",
        choices=[s.value for s in ScoreName],
        default=DEFAULT_SCORE.value,
        help="the flag /predict reports (default: combined)",
    )
    parser.add_argument(
        "--version", default=None, help="the new checkpoint's version (default: UTC date-time)"
    )
    parser.add_argument("--dataset", default=None, help="the data's file if it moved")
    parser.add_argument("--data-dir", default=None, help="MNIST's folder (default: $APD_DATA_DIR)")


def _data_spec(recorded: dict[str, Any], moved: str | None) -> DataSpec:
    spec = DataSpec.from_dict(recorded["spec"]) if "spec" in recorded else DataSpec()
    if moved is not None:
        spec = DataSpec.from_dict({**spec.to_dict(), "source": str(Path(moved).resolve())})
    return spec


def run(args: argparse.Namespace) -> int:
    src, out = Path(args.checkpoint), Path(args.out)
    if out.exists() and not args.force:
        raise UserError(f"--out {out} exists; pass --force to overwrite it")
    try:
        ckpt = load_checkpoint(src)
    except CheckpointError as exc:
        raise UserError(str(exc)) from None
    meta = ckpt.meta
    target_fpr = meta.anomaly.target_fpr if args.target_fpr is None else args.target_fpr
    if not 0.0 < target_fpr < 1.0:
        raise UserError(f"--target-fpr must lie in (0, 1), got {target_fpr}")
    data = load_dataset(_data_spec(meta.provenance.data, args.dataset), args.data_dir)
    recorded = meta.provenance.data.get("data_sha256") or meta.input.data_sha256
    if recorded is not None and recorded != data.fingerprint:
        raise UserError(
            f"{src} was made on data with fingerprint {recorded[:12]}, this data's is "
            f"{data.fingerprint[:12]}; pass --dataset with the same file"
        )
    k = meta.anomaly.num_samples
    theta = ckpt.generate(**ckpt.noise(k, 0))
    summary = summarize(forward_probs(ckpt.spec, theta, data.val_x))
    cal = calibrate_on_data(summary, data, k, target_fpr, ScoreName(args.default_score))
    if cal.warning is not None:
        print(cal.warning, file=sys.stderr)
    anomaly, recalibration, validation = cal.anomaly, cal.recalibration, cal.validation
    rate = validation["flag_rate"]
    metrics = {**meta.metrics, "calibration": {"recalibrated_at": utc_now(), **validation}}
    new_meta = meta.model_copy(
        update={
            "anomaly": anomaly,
            "data_support": cal.support_record,
            "metrics": metrics,
            "probes": None,
            "recalibration": recalibration,
            "version": args.version or default_version(),
        }
    )
    derived = ("support.", "probe.")
    stored = {k: v for k, v in load_file(str(src)).items() if not k.startswith(derived)}
    x, kinds = probe_set(data.val_x)
    new_meta, tensors = with_probes(new_meta, stored | cal.support.tensors(), x, kinds)
    sha = save_checkpoint(out, new_meta, tensors)
    load_checkpoint(out)  # what the service will see
    fit = None if recalibration is None else recalibration.validation
    rates = ", ".join(
        f"{s.value} {anomaly.thresholds[s]:.4g} ({rate[s.value]:.3f})"
        for s in (*PREDICTIVE_SCORES, ScoreName.DATA_SUPPORT, ScoreName.COMBINED)
        if s in anomaly.thresholds
    )
    print(
        f"wrote {out} (sha256 {sha[:12]}, {out.stat().st_size / 1e6:.2f} MB): data support of "
        f"rank {cal.support.rank}; thresholds at FPR {target_fpr:g} on {len(data.val_x)} "
        f"validation inputs (flag rate): {rates}; default flag {anomaly.default_score.value}; "
        + (
            f"probabilities served as they are (fewer than {MIN_RECALIBRATION_INPUTS} "
            "validation inputs to recalibrate them on)"
            if fit is None
            else f"probabilities recalibrated: validation ECE {fit['ece_before']:.4f} -> "
            f"{fit['ece_after']:.4f}, NLL {fit['nll_before']:.4f} -> {fit['nll_after']:.4f}"
        )
    )
    return 0
