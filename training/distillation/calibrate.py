"""Anomaly thresholds for a generator, calibrated on held-out in-distribution data.

For each score ``s`` of :class:`apd.uncertainty.ScoreName` the threshold ``tau_s`` is the
empirical ``(1 - alpha)`` quantile of ``s`` over the held-out inputs (the MNIST validation
split, never the test set), each scored with K networks drawn from the generator, so that
flagging ``s(x) > tau_s`` flags at most a fraction ``alpha`` (the target false-positive rate)
of in-distribution inputs like those (:func:`apd.uncertainty.calibrate_threshold`).

The default score is mutual information, ``I[y; theta | x] = H[p] - E_theta H[p_theta]``
(BALD): it is the epistemic part of the uncertainty, which grows when the sampled networks
disagree, as they do away from the training data, while predictive entropy also rises on
ambiguous but perfectly in-distribution digits (aleatoric uncertainty) and so spends part of
the false-positive budget on them. This reasoning needs no validation data.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray

from apd.checkpoint import AnomalyCalibration
from apd.networks import NetworkSpec
from apd.uncertainty import PredictiveSummary, ScoreName, calibrate_threshold, summarize
from training.torch_ops import member_probs

DEFAULT_SCORE = ScoreName.MUTUAL_INFORMATION
DEFAULT_TARGET_FPR = 0.05


def thresholds_for(summary: PredictiveSummary, target_fpr: float) -> dict[ScoreName, float]:
    """``tau_s`` for every score from an in-distribution summary (module docstring)."""
    return {s: calibrate_threshold(summary.score(s), target_fpr) for s in ScoreName}


def calibrate(
    spec: NetworkSpec,
    theta: torch.Tensor,
    x: NDArray[np.float32],
    target_fpr: float = DEFAULT_TARGET_FPR,
    default_score: ScoreName = DEFAULT_SCORE,
    calibration_set: str = "mnist-validation",
) -> tuple[AnomalyCalibration, PredictiveSummary]:
    """Thresholds for networks ``theta (K, P)`` on held-out inputs ``x``, and their summary."""
    summary = summarize(member_probs(spec, theta, x).numpy())
    anomaly = AnomalyCalibration(
        default_score=default_score,
        target_fpr=target_fpr,
        thresholds=thresholds_for(summary, target_fpr),
        calibration_set=calibration_set,
        calibration_size=len(x),
        num_samples=int(theta.shape[0]),
    )
    return anomaly, summary


def flag_rate(summary: PredictiveSummary, score: ScoreName, threshold: float) -> float:
    """Fraction of inputs whose score exceeds ``threshold`` (flagged as anomalous)."""
    return float((summary.score(score) > threshold).mean())
