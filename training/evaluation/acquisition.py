"""Acquisition functions for active learning, and how a round picks its batch.

Scores (larger = label me next):

* ``bald``     mutual information between the label and the weights (Houlsby et al. 2011),
               ``I[y; w | x] = H[E_w p(y | x, w)] - E_w H[p(y | x, w)]``;
* ``entropy``  predictive entropy ``H[E_w p(y | x, w)]`` (max-entropy sampling);
* ``random``   no score: a uniformly random batch (the baseline).

A round labels ``k`` candidates at once (:class:`BatchRule`). ``top`` takes the ``k``
highest scores (Gal et al. 2017); ``power`` draws ``k`` in proportion to a power of the score
(Kirsch et al. 2023); ``joint`` scores the batch as a whole, greedily (BatchBALD, Kirsch,
van Amersfoort & Gal 2019): the ``i``-th pick is the candidate ``x`` that maximises

    BALD:     I[y_1, ..., y_{i-1}, y_x; w] = H[y_1, ..., y_x] - sum_j E_w H[y_j | w]
    entropy:  H[y_1, ..., y_{i-1}, y_x]

given the ``i - 1`` already picked. Top-``k`` spends a batch on near-duplicates whenever the
posterior singles out one confusion (a small-data posterior does); ``joint`` counts what a
near-duplicate would tell about the weights only once, as its pick has told most of it.
With K networks ``p_k``, the joint predictive of labels ``y_A`` is the mixture ``(1/K)
sum_k prod_{j in A} p_k(y_j)``; its entropy sums over ``C^|A|`` label configurations,
enumerated exactly while they number at most ``configurations`` and estimated beyond that
from ``configurations`` configurations drawn from the joint predictive (importance-weighted,
as BatchBALD does).
"""

from __future__ import annotations

import enum
from typing import Final

import numpy as np
from numpy.typing import NDArray

from apd.uncertainty import PredictiveSummary, ScoreName, entropy, summarize

_TINY: Final = 1e-300  # a configuration whose probability underflows to 0 is dropped


class Acquisition(enum.StrEnum):
    BALD = "bald"
    ENTROPY = "entropy"
    RANDOM = "random"


class BatchRule(enum.StrEnum):
    """How a scored acquisition picks its ``k`` candidates (module docstring)."""

    TOP = "top"  # the highest scores (Gal et al. 2017)
    POWER = "power"  # drawn without replacement, with probability ~ a power of the score
    JOINT = "joint"  # greedy on the batch's joint score (BatchBALD, Kirsch et al. 2019)


def acquisition_scores(summary: PredictiveSummary, acquisition: Acquisition) -> NDArray[np.float64]:
    if acquisition is Acquisition.BALD:
        return summary.score(ScoreName.MUTUAL_INFORMATION)
    if acquisition is Acquisition.ENTROPY:
        return summary.score(ScoreName.PREDICTIVE_ENTROPY)
    raise ValueError(f"{acquisition.value} acquisition has no score")


def select(
    member_probs: NDArray[np.floating] | None,
    acquisition: Acquisition,
    candidates: NDArray[np.int64],
    k: int,
    rng: np.random.Generator,
    rule: BatchRule = BatchRule.TOP,
    exponent: float = 1.0,
    configurations: int = 1000,
) -> NDArray[np.int64]:
    """The ``k`` candidates to label next, from the members' predictions ``member_probs (K,
    N, C)`` on the ``N`` candidates (``None`` for a random batch): uniformly at random, by
    :func:`draw` on the per-candidate scores (``TOP``, ``POWER``), or by the batch's joint
    score (``JOINT``: BatchBALD's greedy rule, module docstring; ``configurations`` bounds
    the label configurations its joint entropy sums over, exactly up to it, sampled beyond)."""
    if acquisition is Acquisition.RANDOM:
        return np.sort(rng.choice(candidates, size=k, replace=False))
    if member_probs is None:
        raise ValueError(f"{acquisition.value} acquisition scores the members' predictions")
    shape = np.shape(member_probs)
    if len(shape) != 3 or shape[1] != len(candidates) or not 0 < k <= len(candidates):
        raise ValueError(f"expected member_probs (K, {len(candidates)}, C) and 0 < k <= N")
    if rule is not BatchRule.JOINT:
        scores = acquisition_scores(summarize(member_probs), acquisition)
        return draw(scores, candidates, k, rng, rule, exponent)
    p = np.asarray(member_probs, dtype=np.float64)
    expected = entropy(p, axis=-1).mean(axis=0)  # (N,) E_w H[y_x | w]
    joint = JointPredictive(p.shape[0])
    picked: list[int] = []
    for _ in range(k):
        joint_scores = joint.entropies(p)
        if acquisition is Acquisition.BALD:
            joint_scores = joint_scores - expected - expected[picked].sum()
        joint_scores[picked] = -np.inf
        best = int(_top(joint_scores, 1, rng)[0])
        picked.append(best)
        joint.add(p[:, best], rng, configurations)
    return np.sort(candidates[picked])


def draw(
    scores: NDArray[np.float64],
    candidates: NDArray[np.int64],
    k: int,
    rng: np.random.Generator,
    rule: BatchRule = BatchRule.TOP,
    exponent: float = 1.0,
) -> NDArray[np.int64]:
    """The ``k`` candidates a per-candidate batch rule picks by ``scores``. ``TOP``: the
    highest scores (ties broken at random). ``POWER``: ``k`` drawn without replacement with
    probability proportional to ``score ** exponent``, as the top ``k`` of ``exponent *
    log score + Gumbel noise`` (Kirsch et al. 2023's power acquisition; their ``beta`` is
    the exponent): it favours high scores without spending the whole batch on one cluster
    of near-duplicates, but drifts towards random once most candidates hold small nonzero
    scores, the less the larger the exponent (infinite: ``TOP``)."""
    if rule is BatchRule.JOINT:
        raise ValueError("the joint rule scores the batch, not each candidate: use select")
    if rule is BatchRule.POWER:
        with np.errstate(divide="ignore"):  # a zero score gets log 0 = -inf: drawn last
            keys = exponent * np.log(np.maximum(scores, 0.0)) + rng.gumbel(size=len(scores))
        return np.sort(candidates[np.argsort(-keys, kind="stable")[:k]])
    return np.sort(candidates[_top(scores, k, rng)])


class JointPredictive:
    """The joint predictive of the labels of a set A of inputs under K networks, over label
    configurations ``m`` of A: each configuration's probability under the mixture,
    ``pbar(m) = (1/K) sum_k p_k(m)``, kept as ``log pbar(m)``, and each network's share of
    it, ``q[k, m] = p_k(m) / pbar(m)`` (ratios near 1, so no product of many small
    probabilities underflows). ``weight[m]``: ``pbar(m)`` while the configurations are all
    of A's, enumerated; ``1 / M`` once they are M draws from ``pbar``, which turns the sum
    over configurations into an importance-weighted mean."""

    def __init__(self, networks: int) -> None:
        self.q = np.ones((networks, 1))
        self.log_pbar = np.zeros(1)
        self.weight = np.ones(1)
        self.enumerated = True

    def entropies(self, p: NDArray[np.float64], chunk: int = 256) -> NDArray[np.float64]:
        """``H[y_A, y_x]`` for every input ``x`` of ``p (K, N, C)``, by the chain rule:
        ``sum_m weight[m] (H[y_x | m] - log pbar(m))``, ``H[y_x | m]`` the entropy of
        ``r(m, c) = (1/K) sum_k q[k, m] p_k(c | x)``, the predictive of ``y_x`` given
        configuration ``m``."""
        k, n, c = p.shape
        const = -float(self.weight @ self.log_pbar)
        out = np.empty(n)
        for start in range(0, n, chunk):
            block = p[:, start : start + chunk].reshape(k, -1)
            r = (self.q.T @ block / k).reshape(len(self.weight), -1, c)
            out[start : start + chunk] = self.weight @ entropy(r, axis=-1) + const
        return out

    def add(self, p_x: NDArray[np.float64], rng: np.random.Generator, configurations: int) -> None:
        """Extend A by an input with member predictions ``p_x (K, C)``: every configuration
        times every label while they number at most ``configurations``; else
        ``configurations`` draws ``(m, c)`` of the extended joint predictive (``m`` from
        ``pbar``, or kept as drawn; ``c`` from ``r(m, .)``)."""
        k, c = p_x.shape
        r = self.q.T @ p_x / k  # (M, C): the predictive of y_x given each configuration
        if self.enumerated and len(self.weight) * c <= configurations:
            m, label = np.divmod(np.flatnonzero(r.ravel() > _TINY), c)
            self.weight = self.weight[m] * r[m, label]
        else:
            m = (
                rng.choice(len(self.weight), size=configurations, p=self.weight / self.weight.sum())
                if self.enumerated
                else np.arange(len(self.weight))
            )
            cdf = np.cumsum(r[m], axis=1)
            u = rng.random(len(m))[:, None] * cdf[:, -1:]
            label = np.minimum((u > cdf).sum(axis=1), c - 1)
            self.weight = np.full(len(m), 1.0 / len(m))
            self.enumerated = False
        self.q = self.q[:, m] * p_x[:, label] / r[m, label]
        self.log_pbar = self.log_pbar[m] + np.log(r[m, label])


def _top(scores: NDArray[np.float64], k: int, rng: np.random.Generator) -> NDArray[np.int64]:
    """Indices of the ``k`` highest ``scores``, ties broken at random."""
    jitter = rng.random(len(scores)) * 1e-12
    return np.lexsort((jitter, -scores))[:k]
