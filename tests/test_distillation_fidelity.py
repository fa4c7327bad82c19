"""Fidelity metrics and calibration, each against an independent computation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import entropy as scipy_entropy

from apd.uncertainty import ScoreName, summarize
from training.distillation.calibrate import flag_rate, thresholds_for
from training.distillation.fidelity import (
    Predictions,
    accuracy,
    auroc,
    compare,
    kl_divergence,
    nll,
)


def _probs(rng: np.random.Generator, k: int, n: int, c: int = 10, temp: float = 1.0):
    logits = rng.standard_normal((k, n, c)) * temp
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_kl_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    p, q = _probs(rng, 1, 50)[0], _probs(rng, 1, 50)[0]
    p[0] = np.eye(10)[3]  # a zero entry: 0 log 0 = 0
    expected = np.array([scipy_entropy(a, b) for a, b in zip(p, q, strict=True)])
    np.testing.assert_allclose(kl_divergence(p, q), expected, rtol=1e-9)
    assert np.allclose(kl_divergence(p, p), 0.0)


def test_auroc_is_the_mann_whitney_probability() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, 200), rng.normal(0.7, 1, 150)
    a[:10] = b[:10]  # ties count one half
    pairs = (b[None, :] > a[:, None]).mean() + 0.5 * (b[None, :] == a[:, None]).mean()
    assert auroc(a, b) == pytest.approx(pairs, abs=1e-12)


def test_accuracy_and_nll_by_hand() -> None:
    p = np.array([[0.7, 0.3], [0.2, 0.8], [0.6, 0.4]])
    y = np.array([0, 0, 0])
    assert accuracy(p, y) == pytest.approx(2 / 3)
    assert nll(p, y) == pytest.approx(-(np.log(0.7) + np.log(0.2) + np.log(0.6)) / 3)


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
    for fpr in (0.01, 0.05, 0.2):
        th = thresholds_for(s, fpr)
        assert set(th) == set(ScoreName)
        for name, t in th.items():
            rate = flag_rate(s, name, t)
            assert rate <= fpr
            assert rate >= fpr - 0.002  # the quantile is tight on continuous scores
