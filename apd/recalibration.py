"""Recalibration of the posterior predictive: a monotone map of its top-label confidence.

The predictive ``p(y|x) = 1/K sum_k p_k(y|x)`` of a distilled posterior is close to its
teacher's but not perfectly calibrated: among inputs it answers with confidence ``c``, the share
answered correctly is not quite ``c``. Top-label recalibration (Kumar et al. 2019, "Verified
uncertainty calibration"; Gupta & Ramdas 2022, "Top-label calibration") replaces the top
class's probability ``c = max_y p(y|x)`` by ``g(c)``, where ``g`` is a non-decreasing map fitted
on held-out data (isotonic regression of "the top label is right" on ``c``), and rescales the
other classes in proportion so that the row still sums to 1::

    q_top = g(c),    q_j = p_j (1 - g(c)) / (1 - c)   for j != top

``g`` is stored as knots ``(confidence_i, calibrated_i)`` and applied by linear interpolation
between them, clipped to the end knots outside (as scikit-learn's ``IsotonicRegression`` with
``out_of_bounds="clip"`` predicts). Two guards keep the answer sound:

* the argmax is kept: ``g(c)`` is raised, where needed, to ``p_2 / (p_2 + 1 - c)`` (``p_2``
  the runner-up; at most 1/2), the value at which the runner-up, rescaled, reaches the top
  class, plus :data:`ARGMAX_MARGIN`;
* the fit caps ``g`` below 1 (:func:`confidence_cap`), so a wrong answer's probability is never
  rescaled to nothing and the log-likelihood stays bounded.

Only the probabilities change: the uncertainty decomposition and every anomaly score are the
networks' own (:mod:`apd.uncertainty`), so the flags and their AUROCs are those of the
unrecalibrated posterior.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.floating]

# How far a raised top class stays above its rescaled runner-up, so that rounding cannot tie them.
ARGMAX_MARGIN = 1e-9


def confidence_cap(n: int) -> float:
    """The largest confidence ``n`` held-out answers support: ``(n + 1) / (n + 2)``, Laplace's
    rule of succession for an accuracy estimated from ``n`` answers all of which were right."""
    if n < 1:
        raise ValueError(f"a confidence cap needs at least one answer, got {n}")
    return (n + 1) / (n + 2)


def top_label_map(
    confidence: FloatArray, knots_x: FloatArray, knots_y: FloatArray
) -> NDArray[np.float64]:
    """``g(confidence)``: the piecewise-linear map through the knots, constant outside them."""
    return np.interp(
        np.asarray(confidence, np.float64),
        np.asarray(knots_x, np.float64),
        np.asarray(knots_y, np.float64),
    )


def recalibrate_top_label(
    probabilities: FloatArray, knots_x: FloatArray, knots_y: FloatArray
) -> NDArray[np.float64]:
    """Rows ``(N, C)`` of a predictive -> the same rows with the top class's probability mapped
    by ``g`` (:func:`top_label_map`) and the others rescaled in proportion (see the module
    docstring). Each row keeps its argmax (the first of tied classes, as ``argmax`` picks)
    and sums to 1."""
    p = np.array(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"expected probabilities of shape (N, C) with C >= 2, got {p.shape}")
    n = np.arange(len(p))
    top = p.argmax(axis=1)
    c = p[n, top]
    others = p.copy()
    others[n, top] = 0.0
    rest = others.sum(axis=1)  # the other classes' mass, summed (1 - c loses their digits)
    second = np.partition(p, -2, axis=1)[:, -2]
    # Rows whose other classes hold no mass share 1 - g evenly; the rest scale in proportion.
    has_rest = rest > 0
    floor = np.divide(second, second + rest, out=np.full_like(c, 1.0 / p.shape[1]), where=has_rest)
    g = np.maximum(top_label_map(c, knots_x, knots_y), floor + ARGMAX_MARGIN)
    scale = np.divide(1.0 - g, rest, out=np.zeros_like(c), where=has_rest)
    even = np.where(has_rest, 0.0, (1.0 - g) / (p.shape[1] - 1))
    q = others * scale[:, None] + even[:, None]
    q[n, top] = g
    return q
