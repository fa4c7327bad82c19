"""Fidelity comparison and calibration, each against an independent computation.

The metrics it is made of (accuracy, NLL, KL, AUROC) are tested in ``test_metrics.py``."""

from __future__ import annotations

import numpy as np
import pytest

from apd.uncertainty import PREDICTIVE_SCORES, summarize
from training.distillation.calibrate import calibrate_summary, flag_rate
from training.distillation.fidelity import Predictions, compare


def _probs(rng: np.random.Generator, k: int, n: int, c: int = 10, temp: float = 1.0):
    logits = rng.standard_normal((k, n, c)) * temp
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _predictions(rng: np.random.Generator, spread: float) -> Predictions:
    test = summarize(_probs(rng, 20, 300, temp=3.0))
    ood = summarize(_probs(rng, 20, 300, temp=spread))
    return Predictions(test=test, ood={"noise": ood})


def test_compare_passes_a_copy_and_fails_a_degraded_student() -> None:
    rng = np.random.default_rng(2)
    teacher = _predictions(rng, spread=0.5)
    y = teacher.test.labels.copy()
    y[:30] = (y[:30] + 1) % 10
    same = compare(teacher, teacher, y)
    assert same["pass_all"]
    assert same["mean_kl_teacher_student"] == pytest.approx(0.0, abs=1e-12)
    assert all(r["drop"] == 0 for r in same["auroc"]["noise"].values())
    # A student whose networks all agree has no epistemic uncertainty: MI is 0 everywhere,
    # so its MI AUROC drops to 0.5, and its predictive is a different one.
    agree = np.repeat(_probs(rng, 1, 300, temp=3.0), 20, axis=0)
    student = Predictions(test=summarize(agree), ood={"noise": summarize(agree[:, :300])})
    bad = compare(teacher, student, y)
    assert not bad["pass_all"]
    assert bad["auroc"]["noise"]["mutual_information"]["student"] == pytest.approx(0.5)
    assert bad["mean_kl_teacher_student"] > 0.1


def test_thresholds_flag_at_most_the_target_rate() -> None:
    rng = np.random.default_rng(3)
    s = summarize(_probs(rng, 30, 1000, temp=2.0))
    x = np.zeros((len(s.probabilities), 3), np.float32)
    for fpr in (0.01, 0.05, 0.2):
        a, _ = calibrate_summary(s, x, 30, fpr, None, "synthetic", None)
        assert set(a.thresholds) == set(PREDICTIVE_SCORES)
        for name in a.thresholds:
            rate = flag_rate(a, s, name)
            assert rate <= fpr
            assert rate >= fpr - 0.002  # the quantile is tight on continuous scores
