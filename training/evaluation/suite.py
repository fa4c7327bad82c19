"""The evaluation suite: load every method, run the experiments, collect one results dict.

:func:`run_suite` is what ``apd evaluate`` runs; :mod:`training.evaluation.report` turns its
result into ``report.md``, PNG plots and ``results.json``. Each experiment records its own
wall time, and the whole result records where every number came from (runs, seeds,
configs, the checkpoint's digest, the code revision).
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Final

import numpy as np
import torch

from apd.networks import MNIST_INPUT_SHAPE, NetworkSpec, get_spec
from apd.uncertainty import ScoreName
from training import metrics
from training.distillation.calibrate import MIN_RECALIBRATION_INPUTS
from training.errors import UserError
from training.evaluation import anomaly, methods
from training.evaluation.active_learning import ActiveLearningSettings, run_active_learning
from training.evaluation.adversarial import AttackSettings, run_adversarial
from training.evaluation.cost import measure_cost
from training.evaluation.laplace_peer import LaplaceFlavour, LaplaceSettings, fit_laplace
from training.evaluation.results import (
    EXPERIMENTS,
    VARIANT_PREFIX,
    AccuracyNLL,
    AnomalyRecord,
    CalibrationRecord,
    ClassificationAndAnomaly,
    ClassificationRecord,
    EvaluationResults,
    FlagRateRecord,
    GaussianDiagnostics,
    Meta,
    MethodRecord,
    SuiteConfigRecord,
    as_record,
    spec_record,
)
from training.evaluation.toy2d import ToyResult, ToySettings
from training.revision import code_revision, uncommitted_changes
from training.run_layout import is_finished
from training.threads import cpu_model, torch_threads

# Active learning at the paper's protocol takes hours on a CPU (docs/results/
# lenet5-active-learning): asked for by name, never by default.
DEFAULT_EXPERIMENTS: Final = tuple(e for e in EXPERIMENTS if e != "active_learning")
# The experiments that evaluate the trained runs and the checkpoint; active learning and the
# toy picture train their own models.
USES_METHODS: Final = frozenset({"classification", "anomaly", "adversarial", "cost"})
METHOD_ORDER: Final = (
    "sgd",
    "laplace_ll",
    "laplace_kfac",
    "dropout",
    "ensemble",
    "sgld",
    "gaussian",
    "mixture",
    "apd",
)
DEFAULT_GAUSSIAN_RANK: Final = 20
# SWAG's default number of deviation columns (Maddox et al. 2019, K = 20).
DEFAULT_MIXTURE_RANK: Final = 20
GAUSSIAN_FIT_SAMPLES: Final = 1000


@dataclass(frozen=True)
class SuiteConfig:
    """Everything ``apd evaluate`` was asked to do (recorded in ``results.json``)."""

    arch: str
    runs: Path
    checkpoint: Path | None
    name: str
    data_dir: str | None = None
    sgld_run: Path | None = None
    sgd_run: Path | None = None
    dropout_run: Path | None = None
    ensemble_runs: tuple[Path, ...] | None = None
    active_learning_log: Path | None = None  # resumable curve log (active_learning.CurveLog)
    variants: tuple[tuple[str, Path], ...] = ()  # (name, checkpoint): APD beside APD
    num_samples: int = 100
    dropout_passes: int = 200
    gaussian_rank: int | None = None
    mixture_rank: int = DEFAULT_MIXTURE_RANK
    laplace_fit_inputs: int | None = None  # training images for the Laplace peers (None: all)
    ood_size: int = 10_000
    test_size: int | None = None
    scales: tuple[float, ...] = anomaly.DEFAULT_SCALES
    attacks: AttackSettings = field(default_factory=AttackSettings)
    active_learning: ActiveLearningSettings = field(default_factory=ActiveLearningSettings)
    toy: ToySettings = field(default_factory=ToySettings)
    experiments: tuple[str, ...] = DEFAULT_EXPERIMENTS
    seed: int = 0
    threads: int = 2
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = [e for e in self.experiments if e not in EXPERIMENTS]
        if unknown:
            raise UserError(
                f"unknown experiment(s) {unknown}; choose from {', '.join(EXPERIMENTS)}"
            )
        if self.num_samples < 1 or self.dropout_passes < 1 or self.ood_size < 1:
            raise UserError("num_samples, dropout_passes and ood_size must be positive")
        if self.mixture_rank < 2:
            raise UserError(f"the mixture's rank must be at least 2, got {self.mixture_rank}")
        if self.laplace_fit_inputs is not None and self.laplace_fit_inputs < 1:
            raise UserError("laplace_fit_inputs must be positive")
        if any(s <= 0 for s in self.scales):
            raise UserError(f"input scales must be positive, got {self.scales}")

    def run_dir(self, kind: str) -> Path:
        explicit = {"sgld": self.sgld_run, "sgd": self.sgd_run, "dropout": self.dropout_run}
        return explicit.get(kind) or self.runs / f"{kind}-{self.arch}"

    def ensemble_dirs(self) -> list[Path]:
        if self.ensemble_runs is not None:
            return list(self.ensemble_runs)
        extra = sorted(self.runs.glob(f"sgd-{self.arch}-seed*"))
        return [self.run_dir("sgd"), *extra]

    def to_dict(self) -> SuiteConfigRecord:
        """The record: the settings that shape the results (not the run folders named one
        by one, nor the progress bars)."""
        return as_record(
            self,
            SuiteConfigRecord,
            exclude=(
                *("data_dir", "sgld_run", "sgd_run", "dropout_run", "ensemble_runs"),
                *("active_learning_log", "variants", "progress"),
            ),
            attacks=self.attacks.to_dict(),
            active_learning=self.active_learning.to_dict(),
            toy=self.toy.to_dict(),
        )


def machine_description(threads: int) -> str:
    return f"CPU: {cpu_model()}, {threads} torch threads ({os.cpu_count()} cores, shared)"


def load_methods(
    cfg: SuiteConfig,
    spec: NetworkSpec,
    log: Callable[[str], None],
    train: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[dict[str, methods.PosteriorMethod], dict[str, str]]:
    """Every method whose inputs exist; the second dict says why each missing one is missing.

    ``train``: the training images and labels the SGD network was fitted on, for the Laplace
    peers (without them those two are reported missing)."""
    found: dict[str, methods.PosteriorMethod] = {}
    missing: dict[str, str] = {}

    def attempt(key: str, build: Callable[[], methods.PosteriorMethod]) -> None:
        try:
            found[key] = build()
        except (UserError, ValueError, OSError) as exc:
            missing[key] = str(exc)
            log(f"method {key}: not evaluated ({exc})")

    attempt("sgd", lambda: methods.load_sgd(cfg.run_dir("sgd"), spec))
    sgd_method = found.get("sgd")
    for flavour in LaplaceFlavour:
        if not isinstance(sgd_method, methods.FixedNetworks):
            missing[flavour.value] = "needs the SGD run"
        elif train is None:
            missing[flavour.value] = "needs the training images"
        else:
            attempt(flavour.value, partial(_fit_laplace, cfg, sgd_method, train, flavour, log))

    def dropout() -> methods.PosteriorMethod:
        method, _ = methods.load_dropout(cfg.run_dir("dropout"), spec, cfg.dropout_passes)
        return method

    attempt("dropout", dropout)
    # finished runs only: `apd train` writes READY last
    dirs = [d for d in cfg.ensemble_dirs() if is_finished(d)]
    attempt("ensemble", lambda: methods.load_ensemble(dirs, spec))
    attempt("sgld", lambda: methods.load_sgld(cfg.run_dir("sgld"), spec))
    checkpoint = cfg.checkpoint
    if checkpoint is not None:

        def apd() -> methods.PosteriorMethod:
            assert checkpoint is not None
            return methods.load_apd(checkpoint, spec)

        attempt("apd", apd)
    else:
        missing["apd"] = "no --checkpoint given"
    for name, path in cfg.variants:
        key = variant_key(name)
        attempt(key, partial(_load_variant, path, spec, key, name))
    if "sgld" in found:
        sgld_method = found["sgld"]
        assert isinstance(sgld_method, methods.SGLDSamples)

        def gaussian() -> methods.PosteriorMethod:
            rank = cfg.gaussian_rank
            if rank is None:
                apd_m = found.get("apd")
                sub = apd_m.provenance().get("subspace_rank") if apd_m is not None else None
                rank = int(sub) if sub else DEFAULT_GAUSSIAN_RANK
            store = sgld_method.store
            n_fit = min(GAUSSIAN_FIT_SAMPLES, len(store))
            rank = min(rank, n_fit - 1)
            fit = methods.fit_gaussian(
                spec, store.theta, rank, fit_rows=store.select_spread(n_fit), progress=log
            )
            return replace(fit, source={**fit.source, "fitted_to": str(cfg.run_dir("sgld"))})

        attempt("gaussian", gaussian)

        def mixture() -> methods.PosteriorMethod:
            fit = methods.fit_mixture_to_sgld(sgld_method, cfg.mixture_rank)
            log(
                f"mixture: {fit.num_components} SWAG components "
                f"({fit.source.get('component_rule')}), up to "
                f"{max(d.shape[0] for d in fit.deviations)} deviations each"
            )
            return fit

        attempt("mixture", mixture)
    else:
        missing["gaussian"] = "needs the SGLD samples"
        missing["mixture"] = "needs the SGLD samples"
    ordered: dict[str, methods.PosteriorMethod] = {k: found[k] for k in METHOD_ORDER if k in found}
    ordered |= {k: m for k, m in found.items() if k not in ordered}  # the variants, last
    return ordered, missing


def variant_key(name: str) -> str:
    """The method key of ``--variant NAME=...``: ``apd-`` and the name, lower case, its
    spaces and dots as dashes."""
    return VARIANT_PREFIX + re.sub(r"[ .]+", "-", name.strip().lower())


def _load_variant(path: Path, spec: NetworkSpec, key: str, name: str) -> methods.PosteriorMethod:
    return replace(methods.load_apd(path, spec), key=key, label=f"APD ({name})")


def _fit_laplace(
    cfg: SuiteConfig,
    sgd: methods.FixedNetworks,
    train: tuple[np.ndarray, np.ndarray],
    flavour: LaplaceFlavour,
    log: Callable[[str], None],
) -> methods.PosteriorMethod:
    settings = LaplaceSettings(fit_inputs=cfg.laplace_fit_inputs, seed=cfg.seed)
    return fit_laplace(
        sgd.spec, sgd.theta[0], train[0], train[1], flavour, settings, sgd.source, log
    )


def _num_members(method: methods.PosteriorMethod, cfg: SuiteConfig) -> int:
    return cfg.dropout_passes if method.key == "dropout" else cfg.num_samples


@dataclass
class SuiteResult:
    """The results dict (what ``results.json`` holds) and objects the plots need."""

    results: EvaluationResults
    toy: ToyResult | None = None


def method_records(
    found: Mapping[str, methods.PosteriorMethod], members: Mapping[str, methods.MemberNetworks]
) -> dict[str, MethodRecord]:
    """What results.json says of each method: label, networks drawn, storage, provenance."""
    return {
        k: {
            "label": m.label,
            "num_members": members[k].num_members,
            "stored_bytes": m.stored_bytes(),
            "provenance": m.provenance(),
        }
        for k, m in found.items()
    }


def run_suite(
    cfg: SuiteConfig, log: Callable[[str], None] | None = None, command: str | None = None
) -> SuiteResult:
    """Run the configured experiments (see the module docstring); ``command`` is the command
    line recorded in the report (default: this process's)."""
    say: Callable[[str], None] = log or (lambda msg: print(msg, file=sys.stderr))
    from training.mnist import OOD_SETS, dataset_fingerprint, describe_ood, load_mnist, load_ood

    t_start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    spec = get_spec(cfg.arch)
    mnist = load_mnist(cfg.data_dir)
    test_x, test_y = np.asarray(mnist.test_x), np.asarray(mnist.test_y)
    if cfg.test_size is not None and cfg.test_size < len(test_x):
        pick = np.random.default_rng(cfg.seed).choice(len(test_x), cfg.test_size, replace=False)
        test_x, test_y = test_x[np.sort(pick)], test_y[np.sort(pick)]
    seconds: dict[str, float] = {}
    toy: ToyResult | None = None
    meta: Meta = {
        "name": cfg.name,
        "arch": cfg.arch,
        "spec": spec_record(spec.to_dict()),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "code_revision": code_revision(),
        "uncommitted_changes": uncommitted_changes(),
        "command": command if command is not None else " ".join(["apd", *sys.argv[1:]]),
        "machine": machine_description(cfg.threads),
        "data_sha256": dataset_fingerprint(mnist),
        "test_inputs": len(test_x),
        "config": cfg.to_dict(),
        "seconds": seconds,
    }

    wants = set(cfg.experiments)
    found: dict[str, methods.PosteriorMethod] = {}
    missing: dict[str, str] = {}
    if wants & USES_METHODS:
        t0 = time.perf_counter()
        train = (np.asarray(mnist.train_x), np.asarray(mnist.train_y))
        found, missing = load_methods(cfg, spec, say, train)
        seconds["load_methods"] = round(time.perf_counter() - t0, 1)
        if not found:
            raise UserError(f"no method could be loaded from {cfg.runs}: {missing}")
    members = {k: m.draw(_num_members(m, cfg), cfg.seed) for k, m in found.items()}
    results: EvaluationResults = {
        "meta": meta,
        "methods": method_records(found, members),
        "missing_methods": missing,
    }

    if wants & {"classification", "anomaly"}:
        t0 = time.perf_counter()
        ood = {
            name: load_ood(name, n=cfg.ood_size, data_dir=cfg.data_dir, seed=cfg.seed)
            for name in OOD_SETS
        }
        say("loaded OOD sets: " + ", ".join(f"{k} {len(v)}" for k, v in ood.items()))
        described = {name: describe_ood(name) for name in OOD_SETS}
        results.update(
            classification_and_anomaly(
                members,
                test_x,
                test_y,
                ood,
                described,
                cfg.scales,
                cfg.seed,
                cfg.progress,
                validation=(np.asarray(mnist.val_x), np.asarray(mnist.val_y)),
            )
        )
        gauss, sgld_m = found.get("gaussian"), found.get("sgld")
        if isinstance(gauss, methods.GaussianPosterior) and isinstance(sgld_m, methods.SGLDSamples):
            results["gaussian_diagnostics"] = gaussian_diagnostics(
                gauss, sgld_m, test_x, test_y, cfg.num_samples, cfg.seed
            )
        seconds["classification_and_anomaly"] = round(time.perf_counter() - t0, 1)
    if "adversarial" in wants:
        t0 = time.perf_counter()
        n = min(cfg.attacks.num_inputs, len(test_x))
        pick = np.sort(np.random.default_rng(cfg.seed + 1).choice(len(test_x), n, replace=False))
        rows = run_adversarial(members, test_x[pick], test_y[pick], cfg.attacks, cfg.progress, say)
        results["adversarial"] = {
            "settings": cfg.attacks.to_dict(),
            "inputs": f"{n} MNIST test images (seeded random subset)",
            "rows": rows,
        }
        seconds["adversarial"] = round(time.perf_counter() - t0, 1)
    if "cost" in wants:
        t0 = time.perf_counter()
        batch = test_x[:100]
        sgld_m = found.get("sgld")
        results["cost"] = {
            "batch_size": len(batch),
            "rows": [
                measure_cost(m, batch, _num_members(m, cfg), seed=cfg.seed) for m in found.values()
            ],
            "sgld_store_bytes": (
                sgld_m.store_bytes() if isinstance(sgld_m, methods.SGLDSamples) else None
            ),
        }
        seconds["cost"] = round(time.perf_counter() - t0, 1)
    if "toy" in wants:
        from training.evaluation.toy2d import run_toy

        t0 = time.perf_counter()
        say("toy: SGLD, APD (two designs) and MC-Dropout on the 2-D problem")
        with torch_threads(1):
            toy = run_toy(cfg.toy)
        results["toy"] = toy.to_dict()
        seconds["toy"] = round(time.perf_counter() - t0, 1)
    if "active_learning" in wants:
        t0 = time.perf_counter()
        s = cfg.active_learning
        say(
            f"active learning: {len(s.seeds)} seeds x {len(s.learners)} learners x "
            f"{len(s.acquisitions)} acquisitions x {s.rounds + 1} fits"
        )
        with torch_threads(1):
            al = run_active_learning(
                spec,
                np.asarray(mnist.train_x),
                np.asarray(mnist.train_y),
                np.asarray(mnist.test_x),
                np.asarray(mnist.test_y),
                s,
                cfg.progress,
                workers=cfg.threads,
                image_shape=MNIST_INPUT_SHAPE,
                log=cfg.active_learning_log,
            )
        results["active_learning"] = al
        seconds["active_learning"] = round(time.perf_counter() - t0, 1)
    seconds["total"] = round(time.perf_counter() - t_start, 1)
    return SuiteResult(results, toy)


def gaussian_diagnostics(
    gaussian: methods.GaussianPosterior,
    sgld: methods.SGLDSamples,
    test_x: np.ndarray,
    test_y: np.ndarray,
    num_samples: int,
    seed: int,
) -> GaussianDiagnostics:
    """Why the Gaussian predicts as it does: its mean network alone, its draws without the
    diagonal part, and the same kind of Gaussian fitted to one chain's samples only (one
    mode). Accuracy and NLL on the test set for each."""
    spec = gaussian.spec

    def score(theta: np.ndarray) -> AccuracyNLL:
        mem = methods.MemberNetworks(spec, torch.from_numpy(np.ascontiguousarray(theta)))
        p = mem.summary(test_x, seed).probabilities
        return {
            "accuracy": metrics.accuracy(p, test_y),
            "nll": metrics.negative_log_likelihood(p, test_y),
        }

    store = sgld.store
    first_chain = int(np.asarray(store.chain)[0]) if len(store) else 0
    rows = np.flatnonzero(np.asarray(store.chain) == first_chain)
    one = methods.fit_gaussian(
        spec, np.asarray(store.theta[rows]), min(gaussian.rank, len(rows) - 1)
    )
    low_rank_only = replace(gaussian, diag_std=np.zeros_like(gaussian.diag_std))
    return {
        "mean_network": score(gaussian.mean[None]),
        "without_diagonal": score(low_rank_only.sample_theta(num_samples, seed)),
        "one_chain": {
            "chain": first_chain,
            "samples": len(rows),
            "rank": one.rank,
            **score(one.sample_theta(num_samples, seed)),
        },
    }


def classification_and_anomaly(
    members: dict[str, methods.MemberNetworks],
    test_x: np.ndarray,
    test_y: np.ndarray,
    ood: dict[str, np.ndarray],
    ood_sets: Mapping[str, str],
    scales: tuple[float, ...],
    seed: int = 0,
    progress: bool = False,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    min_recalibration_inputs: int = MIN_RECALIBRATION_INPUTS,
) -> ClassificationAndAnomaly:
    """Experiments 1 and 2 for every method, and the APD / Gaussian fidelity against SGLD.

    ``ood`` holds each OOD set's images, ``ood_sets`` its description for the report. A
    checkpoint's method (APD) reports the probabilities it serves (its recalibration map
    applied) and, beside the networks' scores, its data-support score and combined flag
    with the share each flags. With ``validation`` (images, labels) every method's test
    predictive is also recalibrated (:func:`training.evaluation.anomaly.recalibration_record`:
    the checkpoint's map, else one fitted on the method's validation predictive)."""
    from tqdm import tqdm

    classification: list[ClassificationRecord] = []
    calibration: list[CalibrationRecord] = []
    rows: list[AnomalyRecord] = []
    flags: list[FlagRateRecord] = []
    in_summaries = {}
    bar = tqdm(
        total=len(members) * (1 + (validation is not None) + len(ood) * len(scales)),
        desc="predict",
        disable=not progress,
        unit="set",
    )
    for key, mem in members.items():
        s_in = mem.summary(test_x, seed)
        in_summaries[key] = s_in
        bar.update()
        ck = mem.checkpoint
        classification.append(
            anomaly.classify(key, mem.served_probabilities(s_in), test_y, mem.num_members)
        )
        if validation is not None:
            val_x, val_y = validation
            stored = None if ck is None else ck.meta.recalibration
            val = None if stored is not None else (mem.summary(val_x, seed).probabilities, val_y)
            bar.update()
            calibration.append(
                anomaly.recalibration_record(
                    key,
                    s_in.probabilities,
                    test_y,
                    mem.num_members,
                    stored,
                    val,
                    min_inputs=min_recalibration_inputs,
                )
            )
        cal = None if ck is None else ck.meta.anomaly
        extra = anomaly.served_scores(cal)
        flagging = (ScoreName.MUTUAL_INFORMATION, *extra)
        if cal is not None and extra:
            flags += anomaly.flag_rates(key, cal, s_in, None, None, flagging)
        for name, x_out in ood.items():
            for scale in scales:
                s_out = mem.summary(anomaly.scaled(x_out, scale), seed)
                rows += anomaly.anomaly_rows(
                    key,
                    s_in,
                    s_out,
                    name,
                    scale,
                    mem.num_members,
                    (*anomaly.ANOMALY_SCORES, *extra),
                    cal,
                )
                if cal is not None and extra:
                    flags += anomaly.flag_rates(key, cal, s_out, name, scale, flagging)
                bar.update()
    bar.close()
    out: ClassificationAndAnomaly = {
        "classification": {
            "inputs": f"{len(test_x)} MNIST test images",
            "rows": classification,
        },
        "anomaly": {
            "in_distribution": f"{len(test_x)} MNIST test images (never scaled)",
            "ood_size": {k: len(v) for k, v in ood.items()},
            "scales": list(scales),
            "rows": rows,
            "ood_sets": {name: ood_sets[name] for name in ood},
        },
    }
    if flags:
        out["anomaly"]["flag_rates"] = flags
    if validation is not None:
        out["calibration"] = {
            "inputs": f"{len(test_x)} MNIST test images",
            "validation": f"{len(validation[1]):,} MNIST validation images",
            "rows": calibration,
        }
    if "sgld" in members and "apd" in members:
        cls_fid = anomaly.classification_fidelity(in_summaries["sgld"], in_summaries["apd"], test_y)
        fid = anomaly.fidelity_rows(rows)
        out["fidelity"] = {
            "teacher": "sgld",
            "student": "apd",
            "classification": cls_fid,
            "anomaly": fid,
            "anomaly_rows": len(fid),
            "anomaly_rows_within": sum(f["within_target"] for f in fid),
            "issue_score_rows": sum(f["issue_target"] for f in fid),
            "issue_score_rows_within": sum(f["within_target"] for f in fid if f["issue_target"]),
        }
    variants = [k for k in members if k.startswith(VARIANT_PREFIX)]
    if "sgld" in members and variants:
        out["fidelity_variants"] = {
            k: {
                "anomaly": anomaly.fidelity_rows(rows, student=k),
                "classification": anomaly.classification_fidelity(
                    in_summaries["sgld"], in_summaries[k], test_y
                ),
            }
            for k in variants
        }
    if "sgld" in members and "gaussian" in members:
        fid_g = anomaly.fidelity_rows(rows, student="gaussian")
        cls_g = anomaly.classification_fidelity(
            in_summaries["sgld"], in_summaries["gaussian"], test_y
        )
        out["fidelity_gaussian"] = {
            "anomaly": fid_g,
            "classification": cls_g,
        }
    if "sgld" in members and "mixture" in members:
        fid_m = anomaly.fidelity_rows(rows, student="mixture")
        cls_m = anomaly.classification_fidelity(
            in_summaries["sgld"], in_summaries["mixture"], test_y
        )
        out["fidelity_mixture"] = {
            "anomaly": fid_m,
            "classification": cls_m,
        }
    return out
