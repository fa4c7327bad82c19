"""Anomaly thresholds for a generator, calibrated on held-out in-distribution data.

For each score ``s`` of :class:`apd.uncertainty.ScoreName` the threshold ``tau_s`` is set on
the held-out inputs (the validation split, never the test set), each scored with K networks
drawn from the generator, at split conformal prediction's rank, so that flagging
``s(x) > tau_s`` flags at most a fraction ``alpha`` (the target false-positive rate) of new
in-distribution inputs like those (:func:`apd.uncertainty.calibrate_threshold`).

The epistemic score is mutual information, ``I[y; theta | x] = H[p] - E_theta H[p_theta]``
(BALD): it grows when the sampled networks disagree, as they do away from the training data,
while predictive entropy also rises on ambiguous but perfectly in-distribution inputs
(aleatoric uncertainty) and so spends part of the false-positive budget on them.

Far from the data the networks can agree again (a ReLU network's logits grow linearly away
from it), so the default flag is ``combined``: mutual information above its threshold *or*
the data-support score (:mod:`apd.support`, fitted here on the training inputs) above its own
(:func:`combined_rule`). The data-support test gets a small fixed share of the budget,
``SUPPORT_SHARE * alpha``: inputs far from the data score orders of magnitude above any
training input (MNIST digits x 20: about 390 against a threshold of 2.5), so a strict
threshold loses none of them, while the epistemic test keeps nearly all of its power on the
inputs that only it sees (Omniglot characters: 86.2 % flagged by the union against 84.9 % by
mutual information alone at ``alpha``; benchmarks/results/far_from_data.md). The epistemic
test's rate is then the largest for which the union flags at most ``alpha`` of the
calibration split.

The probabilities the service returns are recalibrated by a monotone map of the top-label
confidence fitted here on the same validation split (:func:`fit_recalibration`, isotonic
regression, when it holds :data:`MIN_RECALIBRATION_INPUTS` inputs or more;
:mod:`apd.recalibration`); the thresholds above score the networks' own outputs, so
the map leaves every flag as it is.

A threshold set on few inputs is uncertain: each score records how many calibration inputs
it flags and the 95 % Clopper-Pearson interval of the false-positive rate that implies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from scipy.stats import beta as beta_dist

from apd.checkpoint import AnomalyCalibration, CombinedRule, DataSupportRecord, Recalibration
from apd.networks import NetworkSpec
from apd.recalibration import confidence_cap
from apd.support import DEFAULT_VARIANCE_HELD, MAX_FIT_ROWS, DataSupport
from apd.uncertainty import (
    PREDICTIVE_SCORES,
    PredictiveSummary,
    ScoreName,
    calibrate_threshold,
    is_flagged,
    summarize,
)
from training.metrics import accuracy, expected_calibration_error, negative_log_likelihood
from training.own_data import Dataset
from training.torch_ops import member_probs

DEFAULT_SCORE = ScoreName.COMBINED
EPISTEMIC_SCORE = ScoreName.MUTUAL_INFORMATION
DEFAULT_TARGET_FPR = 0.05
# Below this many calibration inputs a threshold's false-positive rate is uncertain by more
# than about +-2 points at alpha = 5 %: `apd distill` warns.
FEW_CALIBRATION_INPUTS = 500
# The data-support test's share of the target false-positive rate in the combined flag.
SUPPORT_SHARE = 0.05
# Below this many validation inputs the probabilities are served unrecalibrated: an isotonic
# map fitted on fewer is mostly noise (benchmarks/results/calibration.md).
MIN_RECALIBRATION_INPUTS = FEW_CALIBRATION_INPUTS


def fpr_interval(flagged: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson interval of a rate from ``flagged`` of ``n`` inputs."""
    tail = (1.0 - level) / 2
    lo = 0.0 if flagged == 0 else float(beta_dist.ppf(tail, flagged, n - flagged + 1))
    hi = 1.0 if flagged == n else float(beta_dist.ppf(1 - tail, flagged + 1, n - flagged))
    return lo, hi


def combined_rule(
    summary: PredictiveSummary,
    target_fpr: float,
    epistemic: ScoreName = EPISTEMIC_SCORE,
    support_share: float = SUPPORT_SHARE,
) -> CombinedRule:
    """The combined flag's two tests on ``summary`` (the calibration split): data support at
    rate ``support_share * target_fpr``, the epistemic score at the largest rate (bisection)
    for which their union flags at most ``floor((n + 1) target_fpr) - 1`` of the ``n``
    inputs, the count that split conformal prediction allows a single score
    (:func:`apd.uncertainty.calibrate_threshold`), so that the combined score keeps the
    target on new inputs too."""
    mi, ds = summary.score(epistemic), summary.score(ScoreName.DATA_SUPPORT)
    allowed = max(0, math.floor((len(mi) + 1) * target_fpr + 1e-9) - 1)
    support_rate = support_share * target_fpr
    # a threshold of 0 would make the ratio undefined; scores are non-negative
    ds_cut = max(calibrate_threshold(ds, support_rate), 1e-12)
    ds_flags = is_flagged(ds, ds_cut)

    def cut(rate: float) -> float:
        return max(calibrate_threshold(mi, rate), 1e-12)

    lo, hi = support_rate / 10, target_fpr
    for _ in range(30):
        mid = (lo + hi) / 2
        union = int((is_flagged(mi, cut(mid)) | ds_flags).sum())
        lo, hi = (mid, hi) if union <= allowed else (lo, mid)
    return CombinedRule(
        epistemic=epistemic,
        rates={epistemic: lo, ScoreName.DATA_SUPPORT: support_rate},
        thresholds={epistemic: cut(lo), ScoreName.DATA_SUPPORT: ds_cut},
    )


def calibrate(
    spec: NetworkSpec,
    theta: torch.Tensor,
    x: NDArray[np.float32],
    target_fpr: float = DEFAULT_TARGET_FPR,
    default_score: ScoreName | None = None,
    calibration_set: str = "mnist-validation",
    data_support: DataSupport | None = None,
) -> tuple[AnomalyCalibration, PredictiveSummary]:
    """Thresholds for networks ``theta (K, P)`` on held-out inputs ``x``, and their summary
    (with ``data_support``'s scores when given: then ``data_support`` and ``combined`` are
    calibrated too, and ``combined`` is the default score unless ``default_score`` says)."""
    summary = summarize(member_probs(spec, theta, x).numpy())
    return calibrate_summary(
        summary, x, int(theta.shape[0]), target_fpr, default_score, calibration_set, data_support
    )


def calibrate_summary(
    summary: PredictiveSummary,
    x: NDArray[np.float32],
    num_samples: int,
    target_fpr: float,
    default_score: ScoreName | None,
    calibration_set: str,
    data_support: DataSupport | None,
) -> tuple[AnomalyCalibration, PredictiveSummary]:
    """:func:`calibrate` from a summary already computed on ``x``. The default score is
    ``combined`` with a data-support fit, else mutual information."""
    if default_score is None:
        default_score = DEFAULT_SCORE if data_support is not None else EPISTEMIC_SCORE
    scores = list(PREDICTIVE_SCORES)
    combined = None
    if data_support is not None:
        summary = replace(summary, data_support=data_support.score(x))
        scores.append(ScoreName.DATA_SUPPORT)
        combined = combined_rule(summary, target_fpr)
    elif default_score in (ScoreName.DATA_SUPPORT, ScoreName.COMBINED):
        raise ValueError(f"default score {default_score.value} needs a data-support fit")
    thresholds = {s: calibrate_threshold(summary.score(s), target_fpr) for s in scores}
    if combined is not None:
        thresholds[ScoreName.COMBINED] = 1.0
    draft = AnomalyCalibration(
        default_score=default_score,
        target_fpr=target_fpr,
        thresholds=thresholds,
        calibration_set=calibration_set,
        calibration_size=len(x),
        num_samples=num_samples,
        combined=combined,
    )
    n = len(x)
    flagged = {s: int(draft.flags(summary, s)[1].sum()) for s in thresholds}
    return draft.model_copy(
        update={
            "flagged": flagged,
            "fpr_interval": {s: fpr_interval(m, n) for s, m in flagged.items()},
        }
    ), summary


def support_record(fit: DataSupport, fitted_on: str, rows: int, held: float) -> DataSupportRecord:
    """The metadata of a data-support fit (:class:`apd.checkpoint.DataSupportRecord`)."""
    return DataSupportRecord(
        rank=fit.rank,
        residual_variance=fit.residual_variance,
        variance_held=held,
        fitted_on=fitted_on,
        fit_rows=rows,
    )


def threshold_warning(anomaly: AnomalyCalibration) -> str | None:
    """A one-line warning when the thresholds were set on fewer than
    :data:`FEW_CALIBRATION_INPUTS` inputs, with the default score's interval; else None."""
    n = anomaly.calibration_size
    if n >= FEW_CALIBRATION_INPUTS:
        return None
    lo, hi = anomaly.fpr_interval.get(anomaly.default_score, (0.0, 1.0))
    return (
        f"warning: thresholds set on only {n} validation inputs: the {anomaly.default_score.value} "
        f"flag's false-positive rate (target {anomaly.target_fpr:g}) lies in "
        f"[{lo:.3f}, {hi:.3f}] (95 %); {FEW_CALIBRATION_INPUTS}+ inputs narrow it"
    )


def flag_rate(anomaly: AnomalyCalibration, summary: PredictiveSummary, score: ScoreName) -> float:
    """Fraction of ``summary``'s inputs flagged by ``score`` (as the service flags them)."""
    return float(anomaly.flags(summary, score)[1].mean())


def fit_recalibration(
    probabilities: NDArray[np.floating],
    labels: NDArray[np.integer],
    num_samples: int,
    fitted_on: str = "mnist-validation",
    min_inputs: int = MIN_RECALIBRATION_INPUTS,
) -> Recalibration | None:
    """The top-label recalibration (:mod:`apd.recalibration`) of a predictive ``(N, C)`` on
    held-out inputs with their ``labels``: isotonic regression (scikit-learn, out-of-bounds
    inputs clipped) of whether the top label is right on its confidence, capped at
    :func:`apd.recalibration.confidence_cap` of N. Records ECE and NLL on these inputs before
    and after. None (the probabilities served as they are) below ``min_inputs`` inputs, too
    few for a map of many steps."""
    from sklearn.isotonic import IsotonicRegression

    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim != 2 or len(p) != len(y):
        raise ValueError(f"need probabilities (N, C) for N labels, got {p.shape}, {y.shape}")
    if len(y) < max(min_inputs, 2):
        return None
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    cap = confidence_cap(len(y))
    iso = IsotonicRegression(y_min=0.0, y_max=cap, out_of_bounds="clip").fit(confidence, correct)
    draft = Recalibration(
        confidence=[float(v) for v in iso.X_thresholds_],
        calibrated=[float(v) for v in iso.y_thresholds_],
        cap=cap,
        fitted_on=fitted_on,
        fit_size=len(y),
        num_samples=num_samples,
    )
    after = draft.apply(p)
    validation = {
        "ece_before": expected_calibration_error(p, y),
        "nll_before": negative_log_likelihood(p, y),
        "ece_after": expected_calibration_error(after, y),
        "nll_after": negative_log_likelihood(after, y),
    }
    return draft.model_copy(update={"validation": validation})


@dataclass(frozen=True)
class CheckpointCalibration:
    """Everything a checkpoint is calibrated with (:func:`calibrate_on_data`): its data-support
    fit and record, thresholds, recalibration map, and the validation summary they came
    from, with the validation figures a checkpoint's metrics record."""

    support: DataSupport
    support_record: DataSupportRecord
    anomaly: AnomalyCalibration
    recalibration: Recalibration | None
    summary: PredictiveSummary
    validation: dict[str, Any]

    @property
    def warning(self) -> str | None:
        return threshold_warning(self.anomaly)


def calibrate_on_data(
    summary: PredictiveSummary,
    data: Dataset,
    num_samples: int,
    target_fpr: float,
    default_score: ScoreName | None,
    seed: int = 0,
) -> CheckpointCalibration:
    """The one calibration of `apd distill` and `apd calibrate`: the data-support score fitted
    on ``data``'s training inputs, every threshold (:func:`calibrate_summary`) and the
    recalibration map (:func:`fit_recalibration`) on its validation split, whose predictive
    under the checkpoint's ``num_samples`` networks is ``summary``."""
    support = DataSupport.fit(data.train_x, seed=seed)
    rows = min(len(data.train_x), MAX_FIT_ROWS)
    record = support_record(support, f"{data.name}-train", rows, DEFAULT_VARIANCE_HELD)
    fitted_on = f"{data.name}-validation"
    anomaly, summary = calibrate_summary(
        summary, data.val_x, num_samples, target_fpr, default_score, fitted_on, support
    )
    recalibration = fit_recalibration(summary.probabilities, data.val_y, num_samples, fitted_on)
    validation = {
        "accuracy": accuracy(summary.probabilities, data.val_y),
        "flag_rate": {s.value: flag_rate(anomaly, summary, s) for s in anomaly.thresholds},
        "recalibration": None if recalibration is None else recalibration.validation,
    }
    return CheckpointCalibration(support, record, anomaly, recalibration, summary, validation)
