"""Metrics of a predictive distribution, as pure functions of NumPy arrays.

The one home of these formulas on the training side: evaluation, distillation fidelity,
training runs and the benchmarks all call them. The predictive they score is the mean of
the K networks' softmax outputs, :func:`training.torch_ops.member_probs` (``(K, N, C)``),
summarised by :func:`apd.uncertainty.summarize`.

Classification, for a predictive ``p (N, C)`` (rows sum to 1) and labels ``y (N,)``:

* accuracy          ``1/N sum_i 1[argmax_c p_ic = y_i]``
* NLL               ``-1/N sum_i log p_{i, y_i}`` (nats; ``p`` clipped at 1e-12)
* Brier score       ``1/N sum_i sum_c (p_ic - 1[c = y_i])^2`` (the multi-class form of
  Brier 1950, in ``[0, 2]``; scikit-learn's binary ``brier_score_loss`` is half of it
  for C = 2)
* ECE               ``sum_b n_b/N |acc_b - conf_b|`` over B equal-width confidence bins
  (Guo et al., ICML 2017), where ``conf_i = max_c p_ic``; bin b holds the confidences in
  ``(b/B, (b+1)/B]`` (the first bin also holds 0), the same edges as scikit-learn's
  ``calibration_curve(strategy="uniform")``.

Between two predictives ``p`` (the reference, e.g. the SGLD teacher) and ``q``:

* KL                ``KL(p || q) = sum_c p_c (log p_c - log q_c)`` per input (nats; ``0 log 0
  = 0``, both clipped at 1e-12).

Anomaly detection, from scores where larger means "more likely out of distribution" (the
convention of :class:`apd.uncertainty.ScoreName`):

* AUROC     out-of-distribution is the positive class, ranked by the score;
* AUPR-out  average precision with out-of-distribution positive, ranked by the score;
* AUPR-in   average precision with in-distribution positive, ranked by minus the score
  (Hendrycks & Gimpel, ICLR 2017, report both).

The rank metrics are computed by scikit-learn; the tests check them against independent
formulas (the Mann-Whitney U statistic, and precision averaged over the positives' ranks).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Final

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.metrics import average_precision_score, roc_auc_score

# The fidelity bars a distilled predictive must meet against its SGLD teacher (and the ties
# of the report's peer comparison): the most accuracy, NLL and OOD AUROC may move.
ACCURACY_TOLERANCE: Final = 0.001  # 0.1 percentage points
NLL_TOLERANCE: Final = 0.01
AUROC_TOLERANCE: Final = 0.005

DEFAULT_ECE_BINS: Final = 15
_EPS: Final = 1e-12

F64 = NDArray[np.float64]


def _check_predictions(probs: ArrayLike, labels: ArrayLike) -> tuple[F64, NDArray[np.int64]]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] < 2:
        raise ValueError(
            f"expected probabilities of shape (N, C) with N >= 1, C >= 2; got {p.shape}"
        )
    if y.shape != (p.shape[0],):
        raise ValueError(f"expected {p.shape[0]} labels, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"labels must lie in [0, {p.shape[1] - 1}]")
    if not np.isfinite(p).all() or (p < 0).any():
        raise ValueError("probabilities must be finite and non-negative")
    if not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError("probability rows must sum to 1")
    return p, y.astype(np.int64)


def accuracy(probs: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of inputs whose most probable class is the label."""
    p, y = _check_predictions(probs, labels)
    return float((p.argmax(axis=1) == y).mean())


def negative_log_likelihood(probs: ArrayLike, labels: ArrayLike) -> float:
    """Mean ``-log p(y_i | x_i)`` in nats."""
    p, y = _check_predictions(probs, labels)
    return float(-np.log(np.clip(p[np.arange(len(y)), y], _EPS, None)).mean())


def brier_score(probs: ArrayLike, labels: ArrayLike) -> float:
    """Mean over inputs of the squared distance between ``p`` and the one-hot label."""
    p, y = _check_predictions(probs, labels)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return float(((p - onehot) ** 2).sum(axis=1).mean())


def _nan_to_none(a: F64) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in a]


@dataclass(frozen=True)
class ReliabilityDiagram:
    """Per-bin confidence and accuracy over equal-width confidence bins.

    ``edges (B+1,)``; ``count (B,)``; ``confidence`` and ``accuracy (B,)`` are the mean
    confidence and the accuracy of the inputs in each bin (NaN for an empty bin).
    """

    edges: F64
    count: NDArray[np.int64]
    confidence: F64
    accuracy: F64

    @property
    def expected_calibration_error(self) -> float:
        n = self.count.sum()
        full = self.count > 0
        gaps = np.abs(self.accuracy[full] - self.confidence[full])
        return float((self.count[full] / n * gaps).sum())

    @property
    def max_calibration_error(self) -> float:
        full = self.count > 0
        return float(np.abs(self.accuracy[full] - self.confidence[full]).max())

    def to_dict(self) -> dict[str, object]:
        return {
            "edges": self.edges.tolist(),
            "count": self.count.tolist(),
            "confidence": _nan_to_none(self.confidence),
            "accuracy": _nan_to_none(self.accuracy),
            "ece": self.expected_calibration_error,
        }


def reliability_diagram(
    probs: ArrayLike, labels: ArrayLike, n_bins: int = DEFAULT_ECE_BINS
) -> ReliabilityDiagram:
    """Bin the top-class confidence into ``n_bins`` equal-width bins (see the module docstring)."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be positive, got {n_bins}")
    p, y = _check_predictions(probs, labels)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bin b holds (edges[b], edges[b+1]]; searchsorted on the inner edges, side="left".
    which = np.searchsorted(edges[1:-1], conf, side="left")
    count = np.bincount(which, minlength=n_bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, weights=conf, minlength=n_bins) / count
        mean_acc = np.bincount(which, weights=correct, minlength=n_bins) / count
    return ReliabilityDiagram(edges=edges, count=count, confidence=mean_conf, accuracy=mean_acc)


def expected_calibration_error(
    probs: ArrayLike, labels: ArrayLike, n_bins: int = DEFAULT_ECE_BINS
) -> float:
    """ECE over ``n_bins`` equal-width bins of the top-class confidence."""
    return reliability_diagram(probs, labels, n_bins).expected_calibration_error


@dataclass(frozen=True)
class ClassificationMetrics:
    accuracy: float
    nll: float
    brier: float
    ece: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def classification_metrics(
    probs: ArrayLike, labels: ArrayLike, n_bins: int = DEFAULT_ECE_BINS
) -> ClassificationMetrics:
    """Accuracy, NLL, Brier score and ECE of one predictive."""
    return ClassificationMetrics(
        accuracy=accuracy(probs, labels),
        nll=negative_log_likelihood(probs, labels),
        brier=brier_score(probs, labels),
        ece=expected_calibration_error(probs, labels, n_bins),
    )


def kl_divergence(p_ref: ArrayLike, q: ArrayLike) -> F64:
    """``KL(p_ref || q) = sum_c p_c (log p_c - log q_c)`` per row of two ``(N, C)``
    predictives, in nats (``0 log 0 = 0``); its mean over inputs is the usual summary."""
    p = np.asarray(p_ref, dtype=np.float64)
    r = np.asarray(q, dtype=np.float64)
    if p.shape != r.shape or p.ndim != 2:
        raise ValueError(f"expected two (N, C) arrays of the same shape, got {p.shape}, {r.shape}")
    terms = p * (np.log(np.clip(p, _EPS, None)) - np.log(np.clip(r, _EPS, None)))
    out: F64 = np.where(p > 0, terms, 0.0).sum(axis=1)
    return out


@dataclass(frozen=True)
class DetectionMetrics:
    """How well a score separates out-of-distribution (positive) from in-distribution inputs."""

    auroc: float
    aupr_in: float
    aupr_out: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _check_scores(scores: ArrayLike, what: str) -> F64:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"{what} scores must be a non-empty 1-D array, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError(f"{what} scores hold NaN or Inf")
    return s


def _detection_labels(in_scores: ArrayLike, out_scores: ArrayLike) -> tuple[NDArray[np.int64], F64]:
    """Labels (1 = out of distribution) and scores of the pooled inputs."""
    s_in = _check_scores(in_scores, "in-distribution")
    s_out = _check_scores(out_scores, "out-of-distribution")
    is_out = np.concatenate([np.zeros(s_in.size, np.int64), np.ones(s_out.size, np.int64)])
    return is_out, np.concatenate([s_in, s_out])


def auroc(in_scores: ArrayLike, out_scores: ArrayLike) -> float:
    """AUROC of flagging out-of-distribution inputs (positives) by a score where larger means
    stranger: the probability that an OOD input outscores an in-distribution one (ties 1/2)."""
    is_out, scores = _detection_labels(in_scores, out_scores)
    return float(roc_auc_score(is_out, scores))


def detection_metrics(in_scores: ArrayLike, out_scores: ArrayLike) -> DetectionMetrics:
    """AUROC, AUPR-in and AUPR-out for scores where larger means "out of distribution"."""
    is_out, scores = _detection_labels(in_scores, out_scores)
    return DetectionMetrics(
        auroc=auroc(in_scores, out_scores),
        aupr_in=float(average_precision_score(1 - is_out, -scores)),
        aupr_out=float(average_precision_score(is_out, scores)),
    )
