"""The metrics against independent computations on random inputs.

Each metric in :mod:`training.metrics` is recomputed here another way: a plain
loop, a different library path (scikit-learn's binary Brier score and calibration curve,
SciPy's Mann-Whitney U and entropy), or the textbook definition of average precision.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import entropy as scipy_entropy
from scipy.stats import mannwhitneyu
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, log_loss

from training import metrics as m


def _random_predictions(
    rng: np.random.Generator, n: int, c: int, sharpness: float = 3.0
) -> tuple[np.ndarray, np.ndarray]:
    logits = rng.normal(scale=sharpness, size=(n, c))
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    y = rng.integers(0, c, size=n)
    # make the labels agree with the argmax most of the time, as a trained model's would
    agree = rng.random(n) < 0.7
    y[agree] = p[agree].argmax(axis=1)
    return p, y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accuracy_and_nll_match_loops_and_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    p, y = _random_predictions(rng, 500, 7)
    hits = sum(int(np.argmax(p[i]) == y[i]) for i in range(len(y)))
    assert m.accuracy(p, y) == pytest.approx(hits / len(y), abs=0)
    assert m.negative_log_likelihood(p, y) == pytest.approx(
        log_loss(y, p, labels=np.arange(7)), rel=1e-9
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_brier_is_twice_sklearn_binary_brier_for_two_classes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    p, y = _random_predictions(rng, 400, 2)
    # sum over both classes of (p_c - 1[y=c])^2 = 2 (p_1 - y)^2
    assert m.brier_score(p, y) == pytest.approx(2 * brier_score_loss(y, p[:, 1]), rel=1e-12)


def test_brier_multiclass_matches_a_plain_loop() -> None:
    rng = np.random.default_rng(3)
    p, y = _random_predictions(rng, 200, 10)
    total = 0.0
    for i in range(len(y)):
        for c in range(10):
            total += (p[i, c] - (1.0 if c == y[i] else 0.0)) ** 2
    assert m.brier_score(p, y) == pytest.approx(total / len(y), rel=1e-12)


@pytest.mark.parametrize(("seed", "n_bins"), [(0, 10), (1, 15), (2, 7)])
def test_reliability_diagram_matches_sklearn_calibration_curve(seed: int, n_bins: int) -> None:
    rng = np.random.default_rng(seed)
    p, y = _random_predictions(rng, 2000, 10, sharpness=2.0)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(int)
    prob_true, prob_pred = calibration_curve(correct, conf, n_bins=n_bins, strategy="uniform")
    diag = m.reliability_diagram(p, y, n_bins)
    full = diag.count > 0
    np.testing.assert_allclose(diag.accuracy[full], prob_true, rtol=1e-12)
    np.testing.assert_allclose(diag.confidence[full], prob_pred, rtol=1e-12)
    assert diag.count.sum() == len(y)
    # ECE from sklearn's per-bin means and counts from a per-example loop
    counts = np.zeros(n_bins)
    for cf in conf:
        counts[min(int(np.ceil(cf * n_bins)) - 1, n_bins - 1) if cf > 0 else 0] += 1
    np.testing.assert_array_equal(diag.count, counts)
    expected = float((counts[full] / len(y) * np.abs(prob_true - prob_pred)).sum())
    assert m.expected_calibration_error(p, y, n_bins) == pytest.approx(expected, rel=1e-12)


def test_ece_is_zero_for_a_perfectly_calibrated_predictor() -> None:
    # confidence 0.8 everywhere, right on exactly 80% of inputs
    p = np.full((1000, 2), 0.2)
    p[:, 0] = 0.8
    y = np.zeros(1000, dtype=int)
    y[800:] = 1
    assert m.expected_calibration_error(p, y) == pytest.approx(0.0, abs=1e-12)


def _average_precision_by_definition(pos: np.ndarray, neg: np.ndarray) -> float:
    """Mean over positives of the precision at their rank (no ties in random floats)."""
    scores = np.concatenate([pos, neg])
    is_pos = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    order = np.argsort(-scores)
    hits = np.cumsum(is_pos[order])
    ranks = np.arange(1, len(scores) + 1)
    return float((hits / ranks)[is_pos[order] == 1].mean())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_detection_metrics_match_mann_whitney_and_ap_definition(seed: int) -> None:
    rng = np.random.default_rng(seed)
    s_in = rng.normal(0.0, 1.0, size=300)
    s_out = rng.normal(rng.uniform(0, 2), 1.0, size=200)
    d = m.detection_metrics(s_in, s_out)
    u = mannwhitneyu(s_out, s_in, alternative="two-sided").statistic
    assert d.auroc == pytest.approx(u / (len(s_in) * len(s_out)), rel=1e-12)
    assert d.aupr_out == pytest.approx(_average_precision_by_definition(s_out, s_in), rel=1e-9)
    assert d.aupr_in == pytest.approx(_average_precision_by_definition(-s_in, -s_out), rel=1e-9)


def test_detection_metrics_perfect_and_reversed() -> None:
    s_in, s_out = np.arange(10.0), np.arange(10.0) + 100
    perfect = m.detection_metrics(s_in, s_out)
    for value in (perfect.auroc, perfect.aupr_in, perfect.aupr_out):
        assert value == pytest.approx(1.0, abs=1e-12)
    assert m.detection_metrics(s_out, s_in).auroc == 0.0


def test_auroc_is_the_mann_whitney_probability_with_ties() -> None:
    rng = np.random.default_rng(5)
    a, b = rng.normal(0, 1, 200), rng.normal(0.7, 1, 150)
    a[:10] = b[:10]  # ties count one half
    pairs = (b[None, :] > a[:, None]).mean() + 0.5 * (b[None, :] == a[:, None]).mean()
    assert m.auroc(a, b) == pytest.approx(pairs, abs=1e-12)
    assert m.detection_metrics(a, b).auroc == m.auroc(a, b)


def test_kl_matches_scipy_entropy_per_input() -> None:
    rng = np.random.default_rng(4)
    p, _ = _random_predictions(rng, 50, 6)
    q, _ = _random_predictions(rng, 50, 6)
    p[0] = np.eye(6)[3]  # zero entries: 0 log 0 = 0
    expected = np.array([scipy_entropy(p[i], q[i]) for i in range(50)])
    np.testing.assert_allclose(m.kl_divergence(p, q), expected, rtol=1e-9)
    np.testing.assert_allclose(m.kl_divergence(p, p), 0.0, atol=1e-12)
    with pytest.raises(ValueError, match="same shape"):
        m.kl_divergence(p, q[:10])


@pytest.mark.parametrize(
    ("probs", "labels"),
    [
        (np.full((3, 2), 0.5), np.array([0, 1])),  # label count
        (np.full((2, 2), 0.7), np.array([0, 1])),  # rows do not sum to 1
        (np.full((2, 2), 0.5), np.array([0, 2])),  # label out of range
        (np.full((2, 2), 0.5), np.array([0.0, 1.0])),  # float labels
        (np.full(4, 0.5), np.array([0, 1, 0, 1])),  # not 2-D
    ],
)
def test_bad_inputs_raise(probs: np.ndarray, labels: np.ndarray) -> None:
    with pytest.raises(ValueError):
        m.classification_metrics(probs, labels)


def test_bad_scores_raise() -> None:
    with pytest.raises(ValueError, match="NaN"):
        m.detection_metrics(np.array([0.0, np.nan]), np.array([1.0]))
    with pytest.raises(ValueError, match="non-empty"):
        m.detection_metrics(np.array([]), np.array([1.0]))
