"""Property tests of :func:`apd.uncertainty.summarize` on random member probabilities.

The uncertainty decomposition must hold for every posterior sample, not just the ones a
trained model happens to produce: the predictive is a distribution, ``0 <= MI <= H[p]``,
``E_k H[p_k] <= H[p]`` (Jensen), nothing depends on the order of the K networks, and the
model variance matches an independent computation (``E||p||^2 - ||E p||^2) / C``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from apd.uncertainty import PREDICTIVE_SCORES, ScoreName, summarize

# Rounding slack: entropies are sums of C ~ 10 float64 terms of magnitude <= log C.
ATOL = 1e-9

PROFILE = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same cases every CI run: a failure is reproducible
    suppress_health_check=[HealthCheck.too_slow],
)


@st.composite
def member_probs(draw: st.DrawFn) -> np.ndarray:
    """``(K, N, C)`` softmax outputs: random logits, some sharp (near one-hot), some ties."""
    k = draw(st.integers(1, 12))
    n = draw(st.integers(1, 6))
    c = draw(st.integers(2, 12))
    logits = draw(
        arrays(
            np.float64,
            (k, n, c),
            elements=st.floats(-40.0, 40.0, allow_nan=False, allow_infinity=False),
        )
    )
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _reference_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in nats with 0 log 0 = 0, computed by masking (not by clipping as the code does)."""
    safe = np.where(p > 0, p, 1.0)
    return -np.where(p > 0, p * np.log(safe), 0.0).sum(axis=-1)


@PROFILE
@given(member_probs())
def test_predictive_is_a_distribution(p: np.ndarray) -> None:
    s = summarize(p)
    _k, n, c = p.shape
    assert s.probabilities.shape == (n, c)
    assert np.all(s.probabilities >= 0)
    np.testing.assert_allclose(s.probabilities.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    # and it is the mean of the members, not some other average
    np.testing.assert_allclose(s.probabilities, p.mean(axis=0), rtol=0, atol=1e-12)
    assert s.labels.shape == (n,)


@PROFILE
@given(member_probs())
def test_entropy_decomposition_bounds(p: np.ndarray) -> None:
    s = summarize(p)
    c = p.shape[2]
    for arr in (s.predictive_entropy, s.expected_entropy, s.mutual_information, s.model_variance):
        assert np.all(np.isfinite(arr))
    assert np.all(s.predictive_entropy >= -ATOL)
    assert np.all(s.predictive_entropy <= np.log(c) + ATOL)
    assert np.all(s.expected_entropy >= -ATOL)
    assert np.all(s.expected_entropy <= s.predictive_entropy + ATOL)
    assert np.all(s.mutual_information >= 0.0)
    assert np.all(s.mutual_information <= s.predictive_entropy + ATOL)
    # MI is exactly the gap (up to the clip at 0, which only removes rounding error)
    gap = s.predictive_entropy - s.expected_entropy
    np.testing.assert_allclose(s.mutual_information, np.clip(gap, 0.0, None), atol=ATOL)


@PROFILE
@given(member_probs())
def test_entropies_match_independent_reference(p: np.ndarray) -> None:
    s = summarize(p)
    mean = p.mean(axis=0)
    np.testing.assert_allclose(s.predictive_entropy, _reference_entropy(mean), atol=1e-9)
    np.testing.assert_allclose(s.expected_entropy, _reference_entropy(p).mean(axis=0), atol=1e-9)


@PROFILE
@given(member_probs())
def test_model_variance_equals_second_moment_form(p: np.ndarray) -> None:
    s = summarize(p)
    c = p.shape[2]
    # (E_k ||p_k||^2 - ||E_k p_k||^2) / C, written without calling var()
    second = np.einsum("knc,knc->n", p, p) / p.shape[0]
    mean = p.sum(axis=0) / p.shape[0]
    expected = (second - np.einsum("nc,nc->n", mean, mean)) / c
    np.testing.assert_allclose(s.model_variance, expected, rtol=1e-9, atol=1e-12)
    assert np.all(s.model_variance >= 0)
    # each class's variance of a probability is at most 1/4
    assert np.all(s.model_variance <= 0.25 + 1e-12)


@PROFILE
@given(member_probs(), st.data())
def test_scores_invariant_under_permuting_networks(p: np.ndarray, data: st.DataObject) -> None:
    perm = np.array(data.draw(st.permutations(range(p.shape[0]))), dtype=np.intp)
    a, b = summarize(p), summarize(p[perm])
    np.testing.assert_allclose(a.probabilities, b.probabilities, rtol=0, atol=1e-12)
    for name in PREDICTIVE_SCORES:
        np.testing.assert_allclose(a.score(name), b.score(name), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(a.expected_entropy, b.expected_entropy, rtol=1e-9, atol=1e-12)


@PROFILE
@given(member_probs())
def test_identical_networks_have_no_epistemic_uncertainty(p: np.ndarray) -> None:
    one = np.repeat(p[:1], 5, axis=0)
    s = summarize(one)
    np.testing.assert_allclose(s.mutual_information, 0.0, atol=1e-9)
    np.testing.assert_allclose(s.model_variance, 0.0, atol=1e-12)
    np.testing.assert_allclose(s.expected_entropy, s.predictive_entropy, atol=1e-9)


def test_disagreeing_one_hot_networks_are_maximally_epistemic() -> None:
    """Two certain networks that disagree: MI = H[p] = log 2, expected entropy 0."""
    p = np.zeros((2, 1, 10))
    p[0, 0, 3] = 1.0
    p[1, 0, 7] = 1.0
    s = summarize(p)
    assert s.expected_entropy[0] == pytest.approx(0.0, abs=1e-9)
    assert s.predictive_entropy[0] == pytest.approx(np.log(2), abs=1e-9)
    assert s.mutual_information[0] == pytest.approx(np.log(2), abs=1e-9)
    assert s.model_variance[0] == pytest.approx(2 * 0.25 / 10)
    assert s.score(ScoreName.MAX_PROBABILITY)[0] == pytest.approx(0.5)


def test_rejects_wrong_rank() -> None:
    with pytest.raises(ValueError, match="K, N, C"):
        summarize(np.ones((3, 10)) / 10)
