"""Experiments 1 and 2: classification on MNIST test, and anomaly detection against OOD sets.

Anomaly detection follows Wang et al. (2018) and their reference code: the in-distribution
inputs are the MNIST test images, the out-of-distribution (OOD) inputs one of the OOD sets of
:mod:`training.mnist`, and each uncertainty score of the posterior predictive
(:class:`apd.uncertainty.ScoreName`, larger = more anomalous) ranks them; we report AUROC,
AUPR-in and AUPR-out (:func:`training.metrics.detection_metrics`).

Input scale: at scale ``s`` the OOD images are multiplied by ``s`` and the MNIST images are
left as they are. Scale 1 is the honest setting (every input is a valid image in [0, 1]);
scale 5 is the reference code's default (``ood_scale: 5``), kept for comparability with the
paper's tables. Brighter-than-possible inputs are much easier to flag.

APD's fidelity target (the distillation issue): on every OOD set and score, its AUROC may be
at most :data:`training.metrics.AUROC_TOLERANCE` below SGLD's. :func:`fidelity_rows`
checks it on *every* anomaly row (all scales and all four scores, max-probability included).
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
from numpy.typing import NDArray

from apd.checkpoint import AnomalyCalibration, Recalibration
from apd.uncertainty import PredictiveSummary, ScoreName
from training import metrics
from training.distillation.calibrate import MIN_RECALIBRATION_INPUTS, fit_recalibration
from training.distillation.fidelity import FIDELITY_SCORES
from training.evaluation.results import (
    AnomalyRecord,
    CalibrationRecord,
    ClassificationFidelityRecord,
    ClassificationRecord,
    FidelityRecord,
    FlagRateRecord,
)
from training.metrics import ACCURACY_TOLERANCE, AUROC_TOLERANCE, NLL_TOLERANCE

ANOMALY_SCORES: Final = (
    ScoreName.MAX_PROBABILITY,
    ScoreName.PREDICTIVE_ENTROPY,
    ScoreName.MUTUAL_INFORMATION,
    ScoreName.MODEL_VARIANCE,
)
DEFAULT_SCALES: Final = (1.0, 5.0)


def _nan_to_none(values: list[float]) -> list[float | None]:
    return [None if math.isnan(v) else v for v in values]


def _defined(v: float) -> float | None:
    return None if math.isnan(v) else v


def classify(
    method: str,
    probs: NDArray[np.floating],
    labels: NDArray[np.integer],
    num_members: int,
    n_bins: int = metrics.DEFAULT_ECE_BINS,
) -> ClassificationRecord:
    """Accuracy, NLL, Brier, ECE and the reliability diagram of ``method``'s probabilities
    ``(N, C)``."""
    m = metrics.classification_metrics(probs, labels, n_bins)
    rel = metrics.reliability_diagram(probs, labels, n_bins)
    return {
        "method": method,
        "num_members": num_members,
        "accuracy": m.accuracy,
        "nll": m.nll,
        "brier": m.brier,
        "ece": m.ece,
        "reliability": {
            "edges": rel.edges.tolist(),
            "count": rel.count.tolist(),
            "confidence": _nan_to_none(rel.confidence.tolist()),
            "accuracy": _nan_to_none(rel.accuracy.tolist()),
            "ece": rel.expected_calibration_error,
        },
    }


def recalibration_record(
    method: str,
    test_probs: NDArray[np.floating],
    test_labels: NDArray[np.integer],
    num_members: int,
    stored: Recalibration | None = None,
    validation: tuple[NDArray[np.floating], NDArray[np.integer]] | None = None,
    fitted_on: str = "mnist-validation",
    min_inputs: int = MIN_RECALIBRATION_INPUTS,
) -> CalibrationRecord:
    """``method``'s test probabilities before and after the top-label recalibration map
    (:mod:`apd.recalibration`): the ``stored`` map a checkpoint serves with, else the map
    :func:`training.distillation.calibrate.fit_recalibration` fits on ``validation``
    (probabilities, labels) exactly as it does for a checkpoint. Without either, or on fewer
    than ``min_inputs`` validation inputs, there is no map and ``after`` is None."""
    before = classify(method, test_probs, test_labels, num_members)
    kind, recal = "checkpoint", stored
    if recal is None and validation is not None:
        kind = "fitted"
        recal = fit_recalibration(*validation, num_members, fitted_on, min_inputs=min_inputs)
    if recal is None:
        size = 0 if validation is None else len(validation[1])
        return {
            "method": method,
            "map": "none",
            "fitted_on": fitted_on,
            "fit_size": size,
            "knots": 0,
            "before": before,
            "after": None,
        }
    return {
        "method": method,
        "map": kind,
        "fitted_on": recal.fitted_on,
        "fit_size": recal.fit_size,
        "knots": len(recal.confidence),
        "before": before,
        "after": classify(method, recal.apply(test_probs), test_labels, num_members),
    }


def is_constant_score(a: NDArray[np.floating], b: NDArray[np.floating]) -> bool:
    both = np.concatenate([a, b])
    return bool(np.ptp(both) <= 1e-12 * max(1.0, float(np.abs(both).max())))


def score_defined(score: ScoreName, num_members: int) -> bool:
    """Mutual information and model variance need at least two networks (for one network
    they are 0 up to rounding, and ranking rounding noise would be meaningless)."""
    return num_members > 1 or score not in (
        ScoreName.MUTUAL_INFORMATION,
        ScoreName.MODEL_VARIANCE,
    )


def served_scores(calibration: AnomalyCalibration | None) -> tuple[ScoreName, ...]:
    """The scores a checkpoint adds to :data:`ANOMALY_SCORES`: data support and the combined
    flag's score where it is calibrated for them."""
    if calibration is None:
        return ()
    return tuple(
        s for s in (ScoreName.DATA_SUPPORT, ScoreName.COMBINED) if s in calibration.thresholds
    )


def anomaly_rows(
    method: str,
    in_summary: PredictiveSummary,
    out_summary: PredictiveSummary,
    ood_set: str,
    scale: float,
    num_members: int,
    scores: tuple[ScoreName, ...] = ANOMALY_SCORES,
    calibration: AnomalyCalibration | None = None,
) -> list[AnomalyRecord]:
    """One row per score: ``None`` metrics where the score is undefined (mutual information
    or model variance of a single network) or constant (it cannot rank anything). The
    combined score needs the checkpoint's ``calibration``
    (:meth:`apd.checkpoint.AnomalyCalibration.scores`)."""
    rows: list[AnomalyRecord] = []
    for score in scores:
        if calibration is None:
            s_in, s_out = in_summary.score(score), out_summary.score(score)
        else:
            s_in, s_out = (
                calibration.scores(in_summary, score),
                calibration.scores(out_summary, score),
            )
        if not score_defined(score, num_members) or is_constant_score(s_in, s_out):
            d = metrics.DetectionMetrics(math.nan, math.nan, math.nan)
        else:
            d = metrics.detection_metrics(s_in, s_out)
        rows.append(
            {
                "method": method,
                "ood_set": ood_set,
                "scale": scale,
                "score": score.value,
                "auroc": _defined(d.auroc),
                "aupr_in": _defined(d.aupr_in),
                "aupr_out": _defined(d.aupr_out),
            }
        )
    return rows


def flag_rates(
    method: str,
    calibration: AnomalyCalibration,
    summary: PredictiveSummary,
    ood_set: str | None,
    scale: float | None,
    scores: tuple[ScoreName, ...],
) -> list[FlagRateRecord]:
    """The share of ``summary``'s inputs each of ``scores`` flags at the checkpoint's
    threshold (:meth:`apd.checkpoint.AnomalyCalibration.flags`, as the service flags them);
    ``ood_set`` None: the in-distribution test inputs."""
    return [
        {
            "method": method,
            "score": score.value,
            "ood_set": ood_set,
            "scale": scale,
            "threshold": calibration.thresholds[score],
            "flagged": float(calibration.flags(summary, score)[1].mean()),
        }
        for score in scores
    ]


def scaled(x: NDArray[np.float32], scale: float) -> NDArray[np.float32]:
    """OOD inputs at input scale ``scale`` (see the module docstring)."""
    return x if scale == 1.0 else (x * np.float32(scale)).astype(np.float32)


def fidelity_rows(
    rows: list[AnomalyRecord],
    teacher: str = "sgld",
    student: str = "apd",
    tolerance: float = AUROC_TOLERANCE,
) -> list[FidelityRecord]:
    """The student's AUROC against the teacher's on every (set, scale, score) where both are
    defined, in table order: ``drop = teacher - student``, within target when ``drop <=
    tolerance``; ``issue_target`` marks the three scores the distillation issue names."""
    by_key = {(r["method"], r["ood_set"], r["scale"], r["score"]): r for r in rows}
    targeted = {s.value for s in FIDELITY_SCORES}
    out: list[FidelityRecord] = []
    for r in rows:
        if r["method"] != teacher:
            continue
        s = by_key.get((student, r["ood_set"], r["scale"], r["score"]))
        t_auroc, s_auroc = r["auroc"], None if s is None else s["auroc"]
        if t_auroc is None or s_auroc is None:
            continue
        drop = t_auroc - s_auroc
        out.append(
            {
                "ood_set": r["ood_set"],
                "scale": r["scale"],
                "score": r["score"],
                "teacher_auroc": t_auroc,
                "student_auroc": s_auroc,
                "tolerance": tolerance,
                "issue_target": r["score"] in targeted,
                "drop": drop,
                "within_target": drop <= tolerance,
            }
        )
    return out


def classification_fidelity(
    teacher: PredictiveSummary,
    student: PredictiveSummary,
    labels: NDArray[np.integer],
) -> ClassificationFidelityRecord:
    """The student's accuracy and NLL against the teacher's, with the mean KL(teacher ||
    student) over the inputs, each held against the fidelity targets."""
    pt, ps = teacher.probabilities, student.probabilities
    t_acc, s_acc = metrics.accuracy(pt, labels), metrics.accuracy(ps, labels)
    t_nll = metrics.negative_log_likelihood(pt, labels)
    s_nll = metrics.negative_log_likelihood(ps, labels)
    return {
        "teacher_accuracy": t_acc,
        "student_accuracy": s_acc,
        "teacher_nll": t_nll,
        "student_nll": s_nll,
        "mean_kl": float(metrics.kl_divergence(pt, ps).mean()),
        "accuracy_within_target": t_acc - s_acc <= ACCURACY_TOLERANCE + 1e-12,
        "nll_within_target": s_nll - t_nll <= NLL_TOLERANCE,
        "targets": {
            "accuracy_drop_max": ACCURACY_TOLERANCE,
            "nll_increase_max": NLL_TOLERANCE,
            "auroc_drop_max": AUROC_TOLERANCE,
        },
    }
