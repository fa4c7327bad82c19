"""``apd evaluate``: run the evaluation suite on trained runs and a checkpoint, write a report.

    apd evaluate --arch fcnn1 --runs runs --checkpoint models/mnist-fcnn1/model.safetensors \\
        --name fcnn1 --out reports

writes ``reports/fcnn1/{report.md, *.png, results.json}``. ``--reference`` writes the
committed reference report instead, ``docs/results/<name>/``. Run directories default to
``<runs>/{sgd,dropout,sgld}-<arch>``; the deep ensemble is ``<runs>/sgd-<arch>`` plus every
``<runs>/sgd-<arch>-seed*`` (train them with ``apd train sgd --seed k``). A method whose
inputs are missing is reported as missing, not silently dropped.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Final

from training.errors import UserError
from training.evaluation.acquisition import BatchRule
from training.evaluation.active_learning import ActiveLearningSettings
from training.evaluation.adversarial import AttackKind, AttackSettings
from training.evaluation.suite import (
    DEFAULT_EXPERIMENTS,
    DEFAULT_MIXTURE_RANK,
    EXPERIMENTS,
    SuiteConfig,
    variant_key,
)
from training.evaluation.toy2d import ToySettings

REFERENCE_DIR: Final = Path("docs/results")


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def configure(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("--arch", required=True, help="target network: fcnn1 or fcnn2")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="folder of run directories")
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="APD checkpoint (default: models/mnist-<arch>/model.safetensors if present)",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=CHECKPOINT",
        help="another APD checkpoint of the same network, evaluated beside the main one as "
        "'APD (NAME)' in every table and against SGLD (an ablation: e.g. the rank before); "
        "repeatable",
    )
    p.add_argument("--name", default=None, help="report name (default: the architecture)")
    p.add_argument("--out", type=Path, default=Path("reports"), help="reports folder")
    p.add_argument(
        "--reference",
        action="store_true",
        help=f"write the committed reference report into {REFERENCE_DIR}/<name>/",
    )
    p.add_argument("--data-dir", default=None, help="data folder (default: $APD_DATA_DIR)")
    p.add_argument("--sgld-run", type=Path, default=None, help="default: <runs>/sgld-<arch>")
    p.add_argument("--sgd-run", type=Path, default=None, help="default: <runs>/sgd-<arch>")
    p.add_argument("--dropout-run", type=Path, default=None, help="default: <runs>/dropout-<arch>")
    p.add_argument("--ensemble", type=Path, nargs="+", default=None, help="SGD runs to ensemble")
    p.add_argument("--num-samples", type=int, default=100, help="K networks per predictive")
    p.add_argument("--dropout-passes", type=int, default=200, help="MC-Dropout passes")
    p.add_argument(
        "--gaussian-rank",
        type=int,
        default=None,
        help="rank of the Gaussian's factor (default: the APD subspace rank, else 20)",
    )
    p.add_argument(
        "--mixture-rank",
        type=int,
        default=DEFAULT_MIXTURE_RANK,
        help=f"deviation columns per component of the SWAG mixture (default "
        f"{DEFAULT_MIXTURE_RANK}, SWAG's K)",
    )
    p.add_argument(
        "--laplace-fit-inputs",
        type=int,
        default=None,
        help="training images the Laplace peers' Hessian is computed on (default: all)",
    )
    p.add_argument("--ood-size", type=int, default=10_000, help="images per OOD set")
    p.add_argument("--test-size", type=int, default=None, help="MNIST test subset (default all)")
    p.add_argument("--scales", default="1,5", help="OOD input scales, comma separated")
    p.add_argument(
        "--experiments",
        default=",".join(DEFAULT_EXPERIMENTS),
        help=f"comma-separated subset of: {', '.join(EXPERIMENTS)} (default: all but "
        "active_learning, a run of hours)",
    )
    p.add_argument("--attack-eps", default="0.05,0.1,0.2,0.3", help="L-inf radii, comma separated")
    p.add_argument("--attack-inputs", type=int, default=1000, help="test images attacked")
    p.add_argument("--pgd-steps", type=int, default=20)
    al = ActiveLearningSettings()
    p.add_argument(
        "--al-seeds",
        default=",".join(str(x) for x in al.seeds),
        help="active learning seeds, comma separated",
    )
    p.add_argument("--al-rounds", type=int, default=al.rounds, help="acquisition rounds")
    p.add_argument(
        "--al-pool",
        type=int,
        default=al.pool_size,
        help="pool of unlabelled images (default: the whole training split)",
    )
    p.add_argument(
        "--al-batch-rule",
        choices=[r.value for r in BatchRule],
        default=al.batch_rule.value,
        help="how BALD and entropy pick a round's images: the top scores, drawn in "
        "proportion to the score (power acquisition), or greedily by the batch's joint "
        "score (BatchBALD)",
    )
    p.add_argument(
        "--al-power-exponent",
        type=float,
        default=al.power_exponent,
        help="power acquisition's exponent: candidates drawn in proportion to score ** this",
    )
    p.add_argument(
        "--al-log",
        type=Path,
        default=None,
        help="append each finished curve to this JSON-lines file, and skip the curves it "
        "already holds under the same settings (resumes an interrupted run)",
    )
    p.add_argument(
        "--al-gan-steps", type=int, default=al.gan_steps, help="online APD GAN steps per fit"
    )
    p.add_argument(
        "--al-temperature",
        type=float,
        default=al.temperature,
        help="posterior temperature of both learners' SGLD",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes everywhere: a smoke test of the pipeline, not a result",
    )
    p.add_argument("--seed", type=int, default=0, help="evaluation seed")
    p.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch CPU threads (active learning: processes of one thread each)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    # filled by the dispatcher with the command line as given, also when a benchmark calls
    # it as a function; the report records it
    p.set_defaults(command_line=None)


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in _csv(text))
    except ValueError:
        raise UserError(f"{what} must be comma-separated numbers, got {text!r}") from None


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in _csv(text))
    except ValueError:
        raise UserError(f"{what} must be comma-separated integers, got {text!r}") from None


def build_config(args: argparse.Namespace) -> SuiteConfig:
    """The suite configuration from the parsed flags (raises :class:`UserError`)."""
    from apd.networks import get_spec

    try:
        get_spec(args.arch)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.threads < 1:
        raise UserError(f"--threads must be positive, got {args.threads}")
    checkpoint = args.checkpoint
    if checkpoint is None:
        default = Path("models") / f"mnist-{args.arch}" / "model.safetensors"
        checkpoint = default if default.is_file() else None
    elif not checkpoint.is_file():
        raise UserError(f"checkpoint {checkpoint} does not exist")
    if not args.runs.is_dir():
        raise UserError(f"runs folder {args.runs} does not exist")
    variants = tuple(_variant(v) for v in args.variant)
    if len({variant_key(name) for name, _ in variants}) != len(variants):
        raise UserError(
            f"--variant names must differ (case, spaces and dots aside), got "
            f"{[n for n, _ in variants]}"
        )
    try:
        attacks = AttackSettings(
            eps=_floats(args.attack_eps, "--attack-eps"),
            pgd_steps=args.pgd_steps,
            num_inputs=args.attack_inputs,
            kinds=(AttackKind.FGSM, AttackKind.PGD),
            seed=args.seed,
        )
        al = ActiveLearningSettings(
            seeds=_ints(args.al_seeds, "--al-seeds"),
            rounds=args.al_rounds,
            pool_size=args.al_pool,
            gan_steps=args.al_gan_steps,
            temperature=args.al_temperature,
            batch_rule=BatchRule(args.al_batch_rule),
            power_exponent=args.al_power_exponent,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    toy = ToySettings(seed=args.seed)
    cfg = SuiteConfig(
        arch=args.arch,
        runs=args.runs,
        checkpoint=checkpoint,
        name=args.name or args.arch,
        data_dir=args.data_dir,
        sgld_run=args.sgld_run,
        sgd_run=args.sgd_run,
        dropout_run=args.dropout_run,
        ensemble_runs=tuple(args.ensemble) if args.ensemble else None,
        active_learning_log=args.al_log,
        variants=variants,
        num_samples=args.num_samples,
        dropout_passes=args.dropout_passes,
        gaussian_rank=args.gaussian_rank,
        mixture_rank=args.mixture_rank,
        laplace_fit_inputs=args.laplace_fit_inputs,
        ood_size=args.ood_size,
        test_size=args.test_size,
        scales=_floats(args.scales, "--scales"),
        attacks=attacks,
        active_learning=al,
        toy=toy,
        experiments=tuple(_csv(args.experiments)),
        seed=args.seed,
        threads=args.threads,
        progress=not args.no_progress,
    )
    return quick(cfg) if args.quick else cfg


def quick(cfg: SuiteConfig) -> SuiteConfig:
    """Tiny sizes for a smoke test of the whole pipeline (minutes, not a result)."""
    return replace(
        cfg,
        num_samples=min(cfg.num_samples, 10),
        dropout_passes=min(cfg.dropout_passes, 10),
        ood_size=min(cfg.ood_size, 300),
        laplace_fit_inputs=min(cfg.laplace_fit_inputs or 2000, 2000),
        test_size=min(cfg.test_size or 500, 500),
        attacks=replace(cfg.attacks, eps=(0.1, 0.3), pgd_steps=3, num_inputs=100),
        active_learning=replace(
            cfg.active_learning,
            seeds=(0,),
            rounds=1,
            pool_size=300,
            candidates=50,
            test_size=300,
            test_every=1,
            num_samples=5,
            first_burn_in=20,
            burn_in=10,
            warmup_samples=20,
            buffer_size=40,
            gan_steps=20,
            apd_rank=5,
            selection_inputs=50,
            acquisitions=tuple(cfg.active_learning.acquisitions[:2]),
        ),
        toy=replace(
            cfg.toy,
            sgld_steps=300,
            sgld_burn_in=100,
            apd_steps=30,
            dropout_epochs=100,
            num_samples=20,
            dropout_passes=20,
            grid_size=31,
        ),
    )


def run(args: argparse.Namespace) -> int:
    from training.evaluation.report import write_report
    from training.evaluation.suite import run_suite

    cfg = build_config(args)
    out_dir = (REFERENCE_DIR if args.reference else args.out) / cfg.name
    t0 = time.perf_counter()
    result = run_suite(cfg, command=args.command_line)
    report = write_report(result, out_dir)
    print(
        f"apd evaluate: wrote {report} (+ results.json, plots) in {time.perf_counter() - t0:.0f} s",
        file=sys.stderr,
    )
    return 0


def _variant(text: str) -> tuple[str, Path]:
    """``NAME=CHECKPOINT`` of ``--variant``: a name of letters, digits, spaces, dots and
    dashes, and a checkpoint file that exists."""
    name, sep, path = text.partition("=")
    name = name.strip()
    if not sep or not name or not re.fullmatch(r"[A-Za-z0-9 .\-]+", name):
        raise UserError(
            f"--variant takes NAME=CHECKPOINT with a name of letters, digits, spaces, dots "
            f"and dashes, got {text!r}"
        )
    if not Path(path).is_file():
        raise UserError(f"--variant {name}: checkpoint {path} does not exist")
    return name, Path(path)
