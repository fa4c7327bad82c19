"""``apd distill``: SGLD samples (or, online, SGLD run alongside) -> one generator checkpoint.

    apd distill --samples runs/sgld-fcnn1 --out models/mnist-fcnn1/model.safetensors
    apd distill --samples runs/sgld-0 runs/sgld-1 runs/sgld-2 --out merged.safetensors
    apd distill --samples runs/sgld-fcnn1 --preset paper --device cuda --out paper.safetensors
    apd distill --algorithm online --arch fcnn1 --out online.safetensors

Offline (Algorithm 1) reads a finished sample store; the teacher that validation compares
against is 100 samples spread across its chains (``SampleStore.select_spread``). Online
(Algorithm 2) runs SGLD chains on the training split of ``--dataset`` while the GAN trains,
and compares against the chains' most recent samples. Either way, the generator with the
lowest validation KL is kept, anomaly thresholds and the recalibration map of the served
probabilities are fitted on the validation split with ``--num-samples`` networks from the
generator, and the checkpoint is written together with
``<name>.fidelity.json`` (the validation history, residual-noise search and settings).
The test split is never read.

The data is the run's own: ``apd train`` records how it read it (:class:`~training.own_data.
DataSpec`) beside the samples, and the same examples, split and preprocessing are read back
here (``--dataset`` points at the data if its file moved; runs from before the record are
MNIST's). Its fingerprint must match the one the samples were drawn on. The checkpoint's input
convention (shape, raw range, preprocessing, class names) is the data's.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
from tqdm import tqdm

from apd.checkpoint import BasisDtype, Design, VectorDtype, load_checkpoint
from apd.networks import NetworkSpec, build_spec
from apd.uncertainty import ScoreName, summarize
from training.defaults import check_arch, sgld_defaults
from training.errors import UserError
from training.own_data import (
    Dataset,
    DataSpec,
    add_data_arguments,
    data_spec_from_args,
    load_dataset,
)
from training.sample_store import SampleStore
from training.torch_ops import member_probs

from .calibrate import DEFAULT_SCORE, DEFAULT_TARGET_FPR, calibrate_on_data
from .fidelity import ValidationMonitor
from .gan import Generator
from .offline import (
    AUTO_MAX_RANK,
    AUTO_VARIANCE_HELD,
    PRESETS,
    DistillConfig,
    DistillResult,
    distill_offline,
    mode_labels,
    preset,
)
from .online import (
    OnlineConfig,
    OnlineResult,
    default_online_config,
    distill_online,
    sampler_like_offline,
)
from .package import default_version, write_checkpoint

TEACHER_SAMPLES = 100


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 2)[1] if __doc__ else None
    io = parser.add_argument_group("input and output")
    io.add_argument(
        "--samples",
        metavar="RUN_DIR",
        nargs="+",
        help="SGLD run folder (or its samples/); several runs made independently (same "
        "architecture, data and sampler settings, other seeds) are merged",
    )
    io.add_argument("--out", required=True, metavar="PATH.safetensors", help="checkpoint to write")
    io.add_argument(
        "--force", action="store_true", help="overwrite --out (and its .fidelity.json) if it exists"
    )
    io.add_argument("--data-dir", default=None, help="MNIST's folder (default: $APD_DATA_DIR)")
    io.add_argument("--model-id", default=None, help="model id (default: <data>-<arch>)")
    io.add_argument("--version", default=None, help="model version (default: UTC date-time)")
    alg = parser.add_argument_group("algorithm")
    alg.add_argument("--algorithm", choices=("offline", "online"), default="offline")
    alg.add_argument("--preset", choices=sorted(PRESETS), default="default")
    alg.add_argument("--arch", help="target network (online), as apd train --arch")
    alg.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    alg.add_argument("--seed", type=int, default=None)
    gan = parser.add_argument_group("GAN (defaults from the preset)")
    per_arch = ", ".join(f"{n:,} for {a}" for a, n in PRESETS["default"].arch_steps.items())
    gan.add_argument(
        "--steps", type=int, default=None, help=f"generator steps (default preset: {per_arch})"
    )
    gan.add_argument("--lr", type=float, default=None, help="Adam learning rate")
    gan.add_argument(
        "--rank",
        type=_rank,
        default=None,
        metavar="R|auto",
        help="subspace dimension r, or auto: the fewest directions that hold --variance-held "
        f"of the samples' variance (at most {AUTO_MAX_RANK})",
    )
    gan.add_argument(
        "--variance-held",
        type=float,
        default=None,
        metavar="F",
        help=f"with --rank auto: the share of variance to hold (default {AUTO_VARIANCE_HELD})",
    )
    gan.add_argument(
        "--basis-dtype",
        choices=get_args(BasisDtype),
        default=None,
        help="how the checkpoint stores the basis (int8: 8 bits and one scale per direction)",
    )
    gan.add_argument(
        "--vector-dtype",
        choices=get_args(VectorDtype),
        default=None,
        help="how it stores the mean and residual std (float: float32 and float16; int8: "
        "8 bits and one scale per 128 entries, for a large network in a few MB)",
    )
    gan.add_argument("--max-samples", type=int, default=None, help="SGLD samples to train on")
    gan.add_argument("--eval-every", type=int, default=None, help="steps between validations")
    gan.add_argument(
        "--residual-scales",
        default=None,
        metavar="S[,S...]",
        help="residual noise levels to choose from on validation (0 drops the residual)",
    )
    cal = parser.add_argument_group("calibration")
    cal.add_argument("--target-fpr", type=float, default=DEFAULT_TARGET_FPR)
    cal.add_argument(
        "--default-score",
        choices=[s.value for s in ScoreName],
        default=DEFAULT_SCORE.value,
        help="the flag /predict reports (default: combined, mutual information or the data's "
        "distance, apd.support)",
    )
    cal.add_argument("--num-samples", type=int, default=100, help="networks per prediction")
    onl = parser.add_argument_group("online SGLD (--algorithm online)")
    onl.add_argument(
        "--sampler",
        choices=("constant", "offline"),
        default="constant",
        help="constant: C chains at a constant step; offline: the cyclical sampler apd train "
        "sgld runs for this arch (its chains, cycles and thinning), one subspace extension "
        "per cycle",
    )
    onl.add_argument("--chains", type=int, default=None)
    onl.add_argument("--sgld-lr", type=float, default=None)
    onl.add_argument("--burn-in", type=int, default=None)
    onl.add_argument("--thinning", type=int, default=None)
    onl.add_argument("--buffer-size", type=int, default=None)
    data = parser.add_argument_group(
        "data (online: what to train on; offline: read from the run, --dataset only if its "
        "file moved)"
    )
    add_data_arguments(data)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _say(msg: str) -> None:
    tqdm.write(f"apd distill: {msg}", file=sys.stderr)


TRAIN_SGLD = "apd train sgld --arch ARCH --out RUN_DIR"


def _samples_dir(arg: str) -> Path:
    """The sample store of one ``--samples`` argument: a run folder of ``apd train sgld`` (or
    its ``samples/``). Anything else is refused in one line that says what to pass instead."""
    p = Path(arg)
    if not p.exists():
        raise UserError(
            f"--samples {arg}: no such folder; pass the folder that `{TRAIN_SGLD}` wrote"
        )
    if not p.is_dir():
        raise UserError(
            f"--samples {arg} is a file, not a run folder; pass the folder that `{TRAIN_SGLD}` "
            "wrote (it holds samples/)"
        )
    if (p / "samples").is_dir():
        return p / "samples"
    config = p / "config.json"
    if config.is_file():
        try:
            method = json.loads(config.read_text()).get("method")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            method = None
        if isinstance(method, str) and method != "sgld":
            raise UserError(
                f"--samples {arg} is an {method.upper()} run, not an SGLD run: distillation "
                f"needs SGLD samples; make them with `{TRAIN_SGLD}`"
            )
        if not (p / "READY").exists():
            raise UserError(f"--samples {arg}: the run is not finished (no READY file yet)")
    if not (p / "meta.json").is_file():
        raise UserError(
            f"--samples {arg} is not an SGLD run folder (no samples/ in it); pass the folder "
            f"that `{TRAIN_SGLD}` wrote"
        )
    return p


def open_samples(runs: list[str]) -> SampleStore:
    """The samples of ``--samples RUN [RUN...]``: one run's store, or several runs' merged
    (:meth:`SampleStore.merge`). The one place ``--samples`` is read."""
    return SampleStore.merge([SampleStore.open(_samples_dir(run)) for run in runs])


def recorded_data(store: SampleStore, args: argparse.Namespace) -> Dataset:
    """The data ``store`` was sampled on, read as the run read it: its recorded
    :class:`DataSpec` (MNIST for runs from before the record), with ``--dataset`` as the
    file's new place if given; its fingerprint must be the samples'."""
    record = store.meta.get("data")
    spec = DataSpec() if record is None else DataSpec.from_dict(record)
    if args.dataset != "mnist":  # the file's new place; how to read it is the run's record
        moved = str(Path(args.dataset).expanduser().resolve())
        spec = DataSpec.from_dict({**spec.to_dict(), "source": moved})
    elif spec.source != "mnist" and not Path(spec.source).exists():
        raise UserError(
            f"{store.path} was sampled on {spec.source}, which no longer exists; pass "
            "--dataset with the file's new place"
        )
    data = load_dataset(spec, args.data_dir)
    sampled_on = str(store.meta.get("data_sha256"))
    if data.fingerprint != sampled_on:
        raise UserError(
            f"{store.path} was sampled on other data (data_sha256 {sampled_on[:12]}... != "
            f"{data.fingerprint[:12]}... of {spec.source})"
        )
    return data


def fidelity_path_for(out: Path) -> Path:
    """The validation record written beside checkpoint ``out``."""
    return out.with_name(out.name.removesuffix(".safetensors") + ".fidelity.json")


def _rank(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


def _check_args(args: argparse.Namespace) -> None:
    if not str(args.out).endswith(".safetensors"):
        raise UserError(f"--out must name a .safetensors file, got {args.out}")
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; name the checkpoint file to write in it")
    if out.exists() and not args.force:
        raise UserError(f"--out {out} exists; pass --force to overwrite it, or another --out")
    if not 0.0 < args.target_fpr < 1.0:
        raise UserError(f"--target-fpr must lie in (0, 1), got {args.target_fpr}")
    if not 1 <= args.num_samples <= 1000:
        raise UserError(f"--num-samples must lie in 1..1000, got {args.num_samples}")
    if args.algorithm == "offline" and not args.samples:
        raise UserError("offline distillation needs --samples RUN_DIR (or use --algorithm online)")
    if args.algorithm == "online" and not args.arch:
        raise UserError("online distillation needs --arch (it runs SGLD itself)")
    if args.algorithm == "online" and args.samples:
        raise UserError("--samples is for offline distillation; online runs its own SGLD")
    if args.variance_held is not None and args.rank != "auto":
        raise UserError("--variance-held chooses the rank: use it with --rank auto")
    if args.variance_held is not None and not 0.0 < args.variance_held <= 1.0:
        raise UserError(f"--variance-held must lie in (0, 1], got {args.variance_held}")
    for name in ("steps", "rank", "max_samples", "eval_every", "chains", "thinning"):
        v = getattr(args, name)
        if isinstance(v, int) and v <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {v}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA device is available")


def _scales(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        msg = f"--residual-scales must be numbers separated by commas, got {text}"
        raise UserError(msg) from None


def _config(args: argparse.Namespace, arch: str) -> DistillConfig:
    auto = args.rank == "auto"
    try:
        config = preset(
            args.preset,
            arch=arch,
            steps=args.steps,
            lr=args.lr,
            rank=AUTO_MAX_RANK if auto else args.rank,
            variance_target=(args.variance_held or AUTO_VARIANCE_HELD) if auto else None,
            basis_dtype=args.basis_dtype,
            vector_dtype=args.vector_dtype,
            max_train_samples=args.max_samples,
            eval_every=args.eval_every,
            residual_scales=_scales(args.residual_scales),
            seed=args.seed,
            num_networks=args.num_samples,
        )
        # a given --rank is the rank, even where the preset would choose one
        if isinstance(args.rank, int):
            config = replace(config, variance_target=None)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.algorithm == "online" and (
        config.variance_target is not None or config.code_scaling != "coordinate"
    ):
        raise UserError(
            "online distillation grows its subspace cycle by cycle: --rank auto and "
            f"--preset {args.preset} are for offline distillation (give --rank N)"
            if config.variance_target is not None
            else f"--preset {args.preset} scales the codes for offline distillation only"
        )
    return config


def _offline(
    args: argparse.Namespace, store: SampleStore, config: DistillConfig, data: Dataset
) -> tuple[NetworkSpec, DistillResult, dict[str, Any], dict[str, Any]]:
    spec = store.spec
    if spec.input_dim != data.train_x.shape[1] or spec.num_classes != data.num_classes:
        raise UserError(
            f"{store.path}: {spec.name} reads {spec.input_dim} values into "
            f"{spec.num_classes} classes, the data has {data.train_x.shape[1]} and "
            f"{data.num_classes}"
        )
    n_train = min(config.max_train_samples or len(store), len(store))
    if n_train < 3:
        raise UserError(f"{store.path} holds {len(store)} samples; distillation needs more")
    rows = store.select_spread(n_train)
    teacher_rows = store.select_spread(min(TEACHER_SAMPLES, len(store)))
    teacher = torch.from_numpy(np.asarray(store.theta[teacher_rows])).to(args.device)
    monitor = ValidationMonitor(
        spec, data.val_x, data.val_y, teacher, config.num_networks, config.seed
    )
    _say(
        f"{spec.name} ({spec.num_params} weights): {len(store)} samples in {store.path}, "
        f"training on {n_train}; teacher = {len(teacher_rows)} spread samples, validation "
        f"acc {monitor.teacher_metrics['accuracy']:.4f} nll {monitor.teacher_metrics['nll']:.4f}"
    )
    modes = mode_labels(store.chain[rows], store.step[rows], store.meta.get("sampler"))
    _say(f"{len(np.unique(modes))} components (chains, or chains x cycles for cSG-MCMC)")
    result = distill_offline(
        store.theta,
        config,
        rows=rows,
        chains=modes,
        monitor=monitor,
        device=args.device,
        report=_say,
        progress=not args.no_progress,
    )
    sampler = dict(store.meta.get("sampler", {}))
    sampler |= {
        "run": ", ".join(store.meta.get("runs", [str(store.path)])),
        "num_samples": len(store),
        "num_chains": store.meta.get("num_chains"),
        "created_at": store.meta.get("created_at"),
    }
    teacher_info = {"teacher_samples": len(teacher_rows), **monitor.teacher_metrics}
    return spec, result, sampler, teacher_info


def _online(
    args: argparse.Namespace, config: DistillConfig, data: Dataset
) -> tuple[NetworkSpec, OnlineResult, dict[str, Any], dict[str, Any]]:
    try:
        spec = build_spec(args.arch, data.input_shape, data.num_classes)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    overrides = {
        k: v
        for k, v in {
            "num_chains": args.chains,
            "sgld_lr": args.sgld_lr,
            "burn_in": args.burn_in,
            "thinning": args.thinning,
            "buffer_size": args.buffer_size,
        }.items()
        if v is not None
    }
    try:
        online: OnlineConfig
        if args.sampler == "offline":
            defaults = sgld_defaults(args.arch, check_arch(args.arch), None)
            online = replace(sampler_like_offline(defaults, config), **overrides)
        else:
            online = default_online_config(distill=config, **overrides)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    _say(f"online APD on {spec.name}: {online.num_chains} SGLD chains on the training split")
    result = distill_online(
        spec,
        data.train_x,
        data.train_y,
        online,
        val=(data.val_x, data.val_y),
        device=args.device,
        report=_say,
        progress=not args.no_progress,
    )
    sampler = {"online": True, **online.sgld_settings(len(data.train_x)).to_dict()}
    # the schedule is recorded once, as the SGLD settings describe it
    skip = {"distill", "schedule", "cycle_steps", "explore_fraction"}
    sampler |= {k: v for k, v in online.to_dict().items() if k not in skip}
    return spec, result, sampler, {}


def model_id_for(data: Dataset, spec: NetworkSpec) -> str:
    """The default model id, ``<data>-<arch>`` in ``[A-Za-z0-9._-]`` (``mnist-fcnn1``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{data.name}-{spec.name}").strip("-")


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    store = open_samples(args.samples) if args.algorithm == "offline" else None
    config = _config(args, store.spec.name if store is not None else args.arch)
    t0 = time.perf_counter()
    data = (
        recorded_data(store, args)
        if store is not None
        else load_dataset(data_spec_from_args(args), args.data_dir)
    )
    result: DistillResult | OnlineResult
    if store is not None:
        spec, result, sampler, teacher_info = _offline(args, store, config, data)
    else:
        spec, result, sampler, teacher_info = _online(args, config, data)
    seconds = time.perf_counter() - t0

    generator: Generator = result.generator
    rng = torch.Generator(device=args.device).manual_seed(config.seed + 1)
    theta = generator.sample(args.num_samples, rng)
    try:
        val_summary = summarize(member_probs(spec, theta, data.val_x).numpy())
        cal = calibrate_on_data(
            val_summary,
            data,
            args.num_samples,
            args.target_fpr,
            ScoreName(args.default_score),
            seed=config.seed,
        )
    except ValueError as exc:
        raise UserError(f"calibration: {exc}") from None
    if cal.warning is not None:
        print(cal.warning, file=sys.stderr)
    anomaly = cal.anomaly
    best = result.summary()["best_validation"]
    final = next(
        (r for r in result.residual_search if r["residual_scale"] == result.residual_scale), None
    )
    metrics: dict[str, Any] = {
        "validation": {**cal.validation, "selected": final or best},
        "teacher_validation": teacher_info,
        "distill_seconds": round(seconds, 1),
        "best_step": result.best_step,
        "residual_scale": result.residual_scale,
        "subspace": result.subspace,
    }
    metrics["total_seconds"] = round(time.perf_counter() - t0, 1)
    model_id = args.model_id or model_id_for(data, spec)
    distillation = {
        "algorithm": args.algorithm,
        "preset": args.preset,
        "device": args.device,
        **(result.config.to_dict() if isinstance(result, OnlineResult) else config.to_dict()),
        "residual_scale": result.residual_scale,
        "best_step": result.best_step,
    }
    out = Path(args.out)
    sha, _meta = write_checkpoint(
        out,
        generator,
        spec,
        input_convention=data.convention,
        design=config.design,
        basis_dtype=config.basis_dtype if config.design is Design.SUBSPACE else "float32",
        anomaly=anomaly,
        model_id=model_id,
        version=args.version or default_version(),
        data=data.provenance(),
        sampler=sampler,
        distillation=distillation,
        metrics=metrics,
        num_samples_default=args.num_samples,
        data_support=(cal.support, cal.support_record),
        probes=data.val_x,
        recalibration=cal.recalibration,
    )
    ckpt = load_checkpoint(out)  # re-read: what the service will see
    fidelity_path = fidelity_path_for(out)
    fidelity_path.write_text(
        json.dumps(
            {
                "checkpoint": str(out),
                "checkpoint_sha256": sha,
                "history": result.history,
                **result.summary(),
                "metrics": metrics,
                "settings": distillation,
            },
            indent=2,
        )
        + "\n"
    )
    print(
        f"wrote {out} ({ckpt.size_bytes / 1e6:.2f} MB, sha256 {sha[:12]}) "
        f"and {fidelity_path}\n"
        f"  validation accuracy {metrics['validation']['accuracy']:.4f}, "
        f"best step {result.best_step}, residual scale {result.residual_scale:g}, "
        f"{seconds:.0f} s\n"
        f"  thresholds at FPR {args.target_fpr:g}: "
        + ", ".join(f"{s.value} {t:.4g}" for s, t in anomaly.thresholds.items())
    )
    return 0
