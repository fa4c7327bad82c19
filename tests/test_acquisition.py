"""Acquisition: the batch rules against their laws, and BatchBALD's joint entropy against
brute-force enumeration of the joint predictive."""

from __future__ import annotations

import numpy as np
import pytest

from apd.uncertainty import summarize
from training.evaluation.acquisition import (
    Acquisition,
    BatchRule,
    JointPredictive,
    draw,
    select,
)


def _members(k: int, n: int, c: int, seed: int) -> np.ndarray:
    """``(K, N, C)`` softmax outputs of K random networks, some sharp, some flat."""
    logits = np.random.default_rng(seed).normal(size=(k, n, c)) * np.linspace(0.5, 4, n)[:, None]
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _brute_joint_entropy(p: np.ndarray, inputs: list[int]) -> float:
    """``H[y_inputs]`` under the mixture ``(1/K) sum_k prod_j p_k(y_j)``, the probability of
    every configuration computed in full (the definition, written without JointPredictive's
    ratios or weights)."""
    per_net = np.ones((p.shape[0], 1))
    for x in inputs:
        per_net = (per_net[:, :, None] * p[:, x, None, :]).reshape(p.shape[0], -1)
    pbar = per_net.mean(axis=0)
    return float(-(pbar * np.log(pbar)).sum())


def test_power_acquisition_draws_in_proportion_to_the_score() -> None:
    """BatchRule.POWER picks k distinct candidates, each first pick with probability
    score^beta / sum(scores^beta) (beta 1 and 2, checked against that law over many draws),
    never one of score 0; TOP picks the k highest."""
    scores = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    n = len(scores)
    candidates = np.arange(100, 100 + n)
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(draw(scores, candidates, 2, rng, BatchRule.TOP), [103, 104])
    draws = 20_000
    singles = np.array([draw(scores, candidates, 1, rng, BatchRule.POWER)[0] for _ in range(draws)])
    freq = np.bincount(singles - 100, minlength=n) / draws
    np.testing.assert_allclose(freq, scores / scores.sum(), atol=0.014)  # 4 sd of the binomial
    colder = np.array(
        [draw(scores, candidates, 1, rng, BatchRule.POWER, 2.0)[0] for _ in range(draws)]
    )
    freq = np.bincount(colder - 100, minlength=n) / draws
    np.testing.assert_allclose(freq, scores**2 / (scores**2).sum(), atol=0.014)
    for _ in range(200):
        pair = draw(scores, candidates, 4, rng, BatchRule.POWER)
        assert len(set(pair)) == 4 and 100 not in pair
    with pytest.raises(ValueError, match="use select"):
        draw(scores, candidates, 2, rng, BatchRule.JOINT)


def test_select_scores_the_members_predictions() -> None:
    """select draws by BALD or predictive entropy of the members' predictions (the top-k
    of each, checked against the summary's scores); a random batch needs no predictions, a
    scored one does, with one row per candidate."""
    p = _members(k=5, n=30, c=4, seed=5)
    candidates = np.arange(200, 230)
    rng = np.random.default_rng(2)
    summary = summarize(p)
    for acquisition, score in (
        (Acquisition.BALD, summary.mutual_information),
        (Acquisition.ENTROPY, summary.predictive_entropy),
    ):
        picked = select(p, acquisition, candidates, 4, rng)
        np.testing.assert_array_equal(picked, np.sort(candidates[np.argsort(-score)[:4]]))
    random_pick = select(None, Acquisition.RANDOM, candidates, 4, rng)
    assert len(set(random_pick)) == 4 and set(random_pick) <= set(candidates)
    with pytest.raises(ValueError, match="scores the members' predictions"):
        select(None, Acquisition.BALD, candidates, 4, rng)
    with pytest.raises(ValueError, match="expected member_probs"):
        select(p[:, :5], Acquisition.BALD, candidates, 4, rng, BatchRule.POWER)


def test_joint_entropy_equals_enumeration_while_exact() -> None:
    """Enumerated configurations: H[y_A, y_x] for every x equals the brute-force sum, for
    sets A of 0 to 3 inputs (up to 27 configurations of 3 classes)."""
    p = _members(k=4, n=7, c=3, seed=0)
    joint = JointPredictive(4)
    rng = np.random.default_rng(0)
    chosen: list[int] = []
    for a in (2, 5, 0, None):
        want = [_brute_joint_entropy(p, [*chosen, x]) for x in range(7)]
        np.testing.assert_allclose(joint.entropies(p), want, rtol=1e-10, atol=1e-12)
        if a is not None:
            joint.add(p[:, a], rng, configurations=27)
            chosen.append(a)
    assert joint.enumerated and len(joint.weight) == 27


def test_joint_entropy_estimate_is_unbiased_once_sampled() -> None:
    """Beyond ``configurations`` the joint entropy is an importance-weighted mean over
    configurations drawn from the joint predictive: over 20 independent draws of 500
    configurations (of 3^9 = 19,683), the mean estimate of H[y_A, y_x] lies within 4
    standard errors of the sum over all 59,049 configurations, for every x."""
    p = _members(k=5, n=12, c=3, seed=1)
    chosen = list(range(9))
    want = np.array([_brute_joint_entropy(p, [*chosen, x]) for x in range(12)])
    estimates = []
    for seed in range(20):
        joint = JointPredictive(5)
        rng = np.random.default_rng(seed)
        for a in chosen:
            joint.add(p[:, a], rng, configurations=500)
        assert not joint.enumerated and len(joint.weight) == 500
        estimates.append(joint.entropies(p))
    est = np.array(estimates)
    stderr = est.std(axis=0, ddof=1) / np.sqrt(len(est))
    assert (stderr > 0).all()  # an estimate, not the enumeration
    assert (np.abs(est.mean(axis=0) - want) < 4 * stderr + 1e-9).all()


def test_batchbald_picks_one_of_duplicates_where_top_k_picks_both() -> None:
    """Two copies of the most informative candidate: top-2 BALD labels both; the joint rule
    labels BALD's best first, then the candidate whose pair with it has the highest joint
    mutual information by brute force, here not the copy."""
    p = _members(k=6, n=8, c=4, seed=3)
    p = np.concatenate([p, p[:, [int(summarize(p).mutual_information.argmax())]]], axis=1)
    candidates = np.arange(len(p[0]))
    mi = summarize(p).mutual_information
    rng = np.random.default_rng(0)
    top = select(p, Acquisition.BALD, candidates, 2, rng)
    best = int(mi.argmax())
    assert set(top) == {best, 8}
    joint = select(p, Acquisition.BALD, candidates, 2, rng, BatchRule.JOINT)
    assert len({best, 8} & set(joint)) == 1
    # the second pick maximises I[y_best, y_x; w] = H[y_best, y_x] - E H[y_best] - E H[y_x]
    expected = summarize(p).expected_entropy
    pair_mi = [
        _brute_joint_entropy(p, [best, x]) - expected[best] - expected[x] if x != best else -1
        for x in range(len(candidates))
    ]
    second = int(np.argmax(pair_mi))
    assert set(joint) == {best, second}
    # a copy's labels are redundant with the original's: the pair tells less than twice one
    assert pair_mi[8] < 2 * mi[best] - 0.1


def test_joint_entropy_rule_and_random() -> None:
    """The joint entropy rule's first pick is the highest predictive entropy; k of one pick
    each; random ignores the predictions."""
    p = _members(k=3, n=10, c=3, seed=4)
    candidates = np.arange(50, 60)
    rng = np.random.default_rng(1)
    picks = select(p, Acquisition.ENTROPY, candidates, 4, rng, BatchRule.JOINT)
    assert len(set(picks)) == 4
    assert 50 + int(summarize(p).predictive_entropy.argmax()) in picks
    assert len(set(select(p, Acquisition.RANDOM, candidates, 4, rng, BatchRule.JOINT))) == 4
    with pytest.raises(ValueError, match="expected member_probs"):
        select(p[:, :5], Acquisition.BALD, candidates, 4, rng, BatchRule.JOINT)
