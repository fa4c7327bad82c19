"""The data-support score, the combined flag and honest thresholds, against independent
references: scikit-learn's probabilistic PCA (its precision matrix), scipy's exact binomial
interval, and the union of two tests counted by hand."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.decomposition import PCA

from apd.support import DataSupport
from apd.uncertainty import (
    PredictiveSummary,
    ScoreName,
    calibrate_threshold,
    is_flagged,
    summarize,
)
from training.distillation.calibrate import (
    SUPPORT_SHARE,
    calibrate_summary,
    combined_rule,
    fpr_interval,
)


def _gaussian(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = np.geomspace(3.0, 0.05, d)
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (rng.standard_normal((n, d)) * scales) @ basis.T + rng.standard_normal(d)


@pytest.mark.parametrize(("d", "rank"), [(12, 12), (80, 20)])
def test_distance_is_ppca_mahalanobis(d: int, rank: int) -> None:
    """d(x) * D is (x - mu)' P (x - mu) with P scikit-learn's PPCA precision for the same
    rank (full rank: the sample covariance's inverse)."""
    x = _gaussian(4000, d, seed=1)
    held = 1.0 if rank == d else None
    fit = DataSupport.fit(x, variance_held=held or 0.999, max_rank=rank if held else 20)
    assert fit.rank == rank
    pca = PCA(n_components=rank, svd_solver="full").fit(x)
    new = _gaussian(50, d, seed=2) * 1.5
    dx = new - pca.mean_
    reference = np.einsum("nd,de,ne->n", dx, pca.get_precision(), dx) / d
    # the directions are stored as float16
    np.testing.assert_allclose(fit.score(new), reference, rtol=2e-2)


def test_score_flags_far_inputs_and_calibrates() -> None:
    """In distribution the score is about 1; far outside (x20, or one feature at 100 times its
    spread) it is large, and near the mean it is small (one-sided: not flagged); its threshold
    flags the target rate of new in-distribution inputs, within their binomial spread."""
    x = _gaussian(6000, 60, seed=3)
    fit = DataSupport.fit(x[:4000])
    val, test = fit.score(x[4000:5000]), fit.score(x[5000:])
    threshold = float(np.quantile(val, 0.95, method="higher"))
    rate = float(is_flagged(test, threshold).mean())
    lo, hi = binomtest(50, 1000).proportion_ci(0.999, method="exact")
    assert lo <= rate <= hi
    assert np.mean(val) == pytest.approx(1.0, abs=0.1)
    far = fit.score(20 * x[5000:5100])
    one = x[5000:5060].copy()
    one[np.arange(60), np.arange(60)] += 100 * x[:4000].std(0)[np.arange(60)]
    at_mean = fit.score(fit.mean[None, :].astype(np.float64))
    assert is_flagged(far, threshold).all() and is_flagged(fit.score(one), threshold).all()
    assert not is_flagged(at_mean, threshold).any()


def test_nan_scores_fail_closed() -> None:
    flags = is_flagged(np.array([0.1, np.nan, np.inf, -np.inf, 2.0]), 1.0)
    assert flags.tolist() == [False, True, True, True, True]


def test_fpr_interval_is_the_exact_binomial_interval() -> None:
    for flagged, n in [(0, 40), (2, 40), (25, 500), (500, 10_000), (40, 40)]:
        ref = binomtest(flagged, n).proportion_ci(0.95, method="exact")
        np.testing.assert_allclose(fpr_interval(flagged, n), (ref.low, ref.high), atol=1e-9)


def _summary_with_support(seed: int, n: int = 4000) -> tuple[PredictiveSummary, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((20, n, 5)) * rng.uniform(0.5, 3.0, size=(1, n, 1))
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return summarize(p), rng.standard_normal((n, 8)).astype(np.float32)


def test_combined_rule_flags_the_target_rate_of_the_union() -> None:
    """Data support gets its fixed share of the target rate, the epistemic test the rest, and
    the union of the two tests, counted input by input, flags at most the target rate of the
    calibration split and nearly all of it (the bisection is tight)."""
    summary, x = _summary_with_support(4)
    fit = DataSupport.fit(x)
    anomaly, s = calibrate_summary(summary, x, 20, 0.05, None, "synthetic", fit)
    rule = anomaly.combined
    assert rule is not None and anomaly.default_score is ScoreName.COMBINED
    assert rule.rates[ScoreName.DATA_SUPPORT] == pytest.approx(0.05 * SUPPORT_SHARE)
    assert 0.05 * (1 - SUPPORT_SHARE) - 0.002 <= rule.rates[ScoreName.MUTUAL_INFORMATION] <= 0.05
    mi = s.mutual_information > rule.thresholds[ScoreName.MUTUAL_INFORMATION]
    ds = s.score(ScoreName.DATA_SUPPORT) > rule.thresholds[ScoreName.DATA_SUPPORT]
    union = float((mi | ds).mean())
    assert 0.05 - 0.002 <= union <= 0.05
    scores, flags, threshold = anomaly.flags(s, ScoreName.COMBINED)
    assert threshold == 1.0 and flags.tolist() == (mi | ds).tolist()
    assert np.all(scores >= 0)
    # the recorded counts and intervals are the calibration split's
    assert anomaly.flagged[ScoreName.COMBINED] == int((mi | ds).sum())
    lo, hi = anomaly.fpr_interval[ScoreName.COMBINED]
    assert lo < union < hi


def test_independent_tests_share_the_rate_as_probability_says() -> None:
    """Two independent scores: the union flags 1 - (1 - a)(1 - b), so with the data-support
    test at b the epistemic test gets a = 1 - 0.95 / (1 - b)."""
    summary, _ = _summary_with_support(5, n=20_000)
    independent = np.random.default_rng(6).random(20_000)
    rule = combined_rule(replace(summary, data_support=independent), 0.05, support_share=0.3)
    b = rule.rates[ScoreName.DATA_SUPPORT]
    a = rule.rates[ScoreName.MUTUAL_INFORMATION]
    assert a == pytest.approx(1 - 0.95 / (1 - b), abs=0.002)


def test_thresholds_keep_the_rate_on_new_inputs_even_from_few() -> None:
    """Split-conformal thresholds: over many calibration splits of 24 inputs, the rate at
    which new in-distribution inputs are flagged is at most the target on average (the
    empirical quantile's is about 8 %); on 10,000 inputs the threshold is the empirical
    quantile itself."""
    rng = np.random.default_rng(7)
    conformal, empirical = [], []
    for _ in range(2000):
        cal, new = rng.standard_normal(24), rng.standard_normal(200)
        conformal.append(float((new > calibrate_threshold(cal, 0.05)).mean()))
        empirical.append(float((new > np.quantile(cal, 0.95, method="higher")).mean()))
    assert np.mean(conformal) <= 0.05 and np.mean(empirical) > 0.07
    big = rng.random(10_000)
    assert calibrate_threshold(big, 0.05) == np.quantile(big, 0.95, method="higher")
