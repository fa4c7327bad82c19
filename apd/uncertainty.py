"""Uncertainty scores of a posterior predictive, from the K sampled networks' softmax outputs.

Let ``p_k(y|x)`` be network k's softmax and ``p(y|x) = 1/K sum_k p_k(y|x)`` the posterior
predictive. Then

* predictive entropy  ``H[p]``                          (total uncertainty)
* expected entropy    ``1/K sum_k H[p_k]``              (aleatoric part)
* mutual information  ``H[p] - 1/K sum_k H[p_k]``        (epistemic part; BALD, Houlsby 2011)
* model variance      ``1/C sum_c Var_k p_k(c|x)``        (spread of the networks' outputs)
* max probability     ``1 - max_c p(c|x)``              (as an anomaly score: higher = stranger)

Two more scores look beyond the networks' outputs: ``data_support``, how far the input lies
from the training inputs (:mod:`apd.support`), and ``combined``, the union of the epistemic
test and the data-support test (:meth:`apd.checkpoint.AnomalyCalibration.scores`).

All entropies are in nats. Every anomaly score is oriented so that a larger value means
"more likely out of distribution", and an input is flagged when its score exceeds the
threshold calibrated on held-out in-distribution data.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.floating]

_EPS = 1e-12


class ScoreName(enum.StrEnum):
    """Anomaly scores a checkpoint can calibrate and the service can report."""

    MUTUAL_INFORMATION = "mutual_information"
    PREDICTIVE_ENTROPY = "predictive_entropy"
    MODEL_VARIANCE = "model_variance"
    MAX_PROBABILITY = "max_probability"
    DATA_SUPPORT = "data_support"
    COMBINED = "combined"


# The scores that follow from the networks' outputs alone (:meth:`PredictiveSummary.score`).
PREDICTIVE_SCORES: tuple[ScoreName, ...] = (
    ScoreName.MUTUAL_INFORMATION,
    ScoreName.PREDICTIVE_ENTROPY,
    ScoreName.MODEL_VARIANCE,
    ScoreName.MAX_PROBABILITY,
)


def entropy(p: FloatArray, axis: int = -1) -> NDArray[np.float64]:
    """Shannon entropy in nats along ``axis``, with ``0 log 0 = 0``."""
    q = np.asarray(p, dtype=np.float64)
    out: NDArray[np.float64] = -(q * np.log(np.clip(q, _EPS, None))).sum(axis=axis)
    return out


@dataclass(frozen=True)
class PredictiveSummary:
    """Posterior predictive and its uncertainty decomposition for N inputs."""

    probabilities: NDArray[np.float64]  # (N, C), rows sum to 1
    predictive_entropy: NDArray[np.float64]  # (N,)
    expected_entropy: NDArray[np.float64]  # (N,)
    mutual_information: NDArray[np.float64]  # (N,)
    model_variance: NDArray[np.float64]  # (N,)
    # (N,) the inputs' data-support score (:mod:`apd.support`), where the checkpoint has one
    data_support: NDArray[np.float64] | None = None

    @property
    def labels(self) -> NDArray[np.int64]:
        return self.probabilities.argmax(axis=1)

    def rows(self, rows: slice) -> PredictiveSummary:
        """The summary of the inputs ``rows`` (views: every field is per input)."""
        support = None if self.data_support is None else self.data_support[rows]
        return PredictiveSummary(
            self.probabilities[rows],
            self.predictive_entropy[rows],
            self.expected_entropy[rows],
            self.mutual_information[rows],
            self.model_variance[rows],
            support,
        )

    def score(self, name: ScoreName | str) -> NDArray[np.float64]:
        """The anomaly score ``name`` for each input (larger = more anomalous). ``combined``
        needs its calibration: :meth:`apd.checkpoint.AnomalyCalibration.scores`."""
        name = ScoreName(name)
        if name is ScoreName.MAX_PROBABILITY:
            return 1.0 - self.probabilities.max(axis=1)
        if name is ScoreName.COMBINED:
            raise ValueError("the combined score needs its calibration (AnomalyCalibration.scores)")
        if name is ScoreName.DATA_SUPPORT and self.data_support is None:
            raise ValueError("no data-support score: the checkpoint has no data-support fit")
        return np.asarray(getattr(self, name.value))


class PredictiveAccumulator:
    """Running sums over networks from which :func:`summarize`'s decomposition follows.

    Networks arrive in chunks of softmax outputs ``(k, N, C)``; only ``O(N C)`` is kept, so a
    posterior of any size K is summarised in bounded memory. All sums are float64.
    """

    def __init__(self) -> None:
        self.count = 0
        self._sum_p: NDArray[np.float64] | None = None  # (N, C)
        self._sum_p2: NDArray[np.float64] | None = None  # (N, C)
        self._sum_h: NDArray[np.float64] | None = None  # (N,)

    def add(self, member_probs: FloatArray) -> None:
        """Add ``member_probs (k, N, C)``: k more networks' softmax on the same N inputs."""
        p = np.asarray(member_probs, dtype=np.float64)
        if p.ndim != 3:
            raise ValueError(f"expected member probabilities of shape (K, N, C), got {p.shape}")
        if self._sum_p is None or self._sum_p2 is None or self._sum_h is None:
            self._sum_p = np.zeros(p.shape[1:])
            self._sum_p2 = np.zeros(p.shape[1:])
            self._sum_h = np.zeros(p.shape[1])
        elif self._sum_p.shape != p.shape[1:]:
            raise ValueError(f"chunk of shape {p.shape} after chunks of {self._sum_p.shape}")
        self._sum_p += p.sum(axis=0)
        self._sum_p2 += np.einsum("knc,knc->nc", p, p)
        self._sum_h += entropy(p).sum(axis=0)
        self.count += p.shape[0]

    def summary(self) -> PredictiveSummary:
        """The decomposition of every network added so far (see :func:`summarize`)."""
        if self._sum_p is None or self._sum_p2 is None or self._sum_h is None:
            raise ValueError("no networks added")
        mean = self._sum_p / self.count
        variance = np.clip(self._sum_p2 / self.count - mean * mean, 0.0, None).mean(axis=1)
        probabilities = mean / mean.sum(axis=1, keepdims=True)
        h_pred = entropy(probabilities)
        h_exp = self._sum_h / self.count
        mi = np.minimum(np.clip(h_pred - h_exp, 0.0, None), h_pred)
        return PredictiveSummary(probabilities, h_pred, h_exp, mi, variance)


def summarize(member_probs: FloatArray) -> PredictiveSummary:
    """Uncertainty decomposition from ``member_probs (K, N, C)``: K networks, N inputs.

    Computed in float64 (:class:`PredictiveAccumulator` with one chunk). Mutual information is
    clipped at 0 from below, which only removes rounding error: by Jensen's inequality it is
    non-negative and at most ``H[p]``.
    """
    acc = PredictiveAccumulator()
    acc.add(member_probs)
    return acc.summary()


def is_flagged(scores: FloatArray, threshold: float) -> NDArray[np.bool_]:
    """``score > threshold``, failing closed: a NaN or infinite score is always flagged (a
    network or input that produces one is not something to trust)."""
    s = np.asarray(scores, dtype=np.float64)
    out: NDArray[np.bool_] = ~(s <= threshold) | ~np.isfinite(s)
    return out


def calibrate_threshold(in_distribution_scores: FloatArray, target_fpr: float) -> float:
    """The threshold whose false-positive rate on new in-distribution inputs is at most
    ``target_fpr``, from ``n`` held-out in-distribution scores.

    An input is flagged when ``score > threshold``. The threshold is the ``k``-th smallest
    score with ``k = ceil((n + 1)(1 - target_fpr))``, split conformal prediction's rank
    (Vovk et al. 2005; Angelopoulos & Bates 2021): when the held-out inputs and a new one are
    exchangeable, the new one's score exceeds it with probability at most ``target_fpr``. The
    empirical quantile (rank ``ceil((n - 1)(1 - target_fpr)) + 1``) only bounds the rate on
    the held-out inputs themselves, and on a few dozen of them it flags new ones more often
    (a 24-row validation split: about 8 % for a 5 % target). For 10,000 inputs the two ranks
    agree. With fewer than ``1 / target_fpr - 1`` inputs no rank can promise the target; the
    largest score is used (``apd distill`` warns when the inputs are few).
    """
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr must lie in (0, 1), got {target_fpr}")
    s = np.asarray(in_distribution_scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0 or not np.isfinite(s).all():
        raise ValueError("in-distribution scores must be a non-empty finite 1-D array")
    n = s.size
    k = min(n, math.ceil((n + 1) * (1.0 - target_fpr) - 1e-9))
    return float(np.partition(s, k - 1)[k - 1])
