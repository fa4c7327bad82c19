"""Data support: how far an input lies from the inputs the networks were trained on.

The posterior's scores (:mod:`apd.uncertainty`) measure how much the sampled networks
disagree. Far from the data they can all agree: a ReLU network's logits grow linearly along
any ray away from the training inputs, so every sampled network becomes confident in the same
class and the mutual information falls to zero (Hein et al., CVPR 2019). The data-support
score looks at the input alone and so sees what the networks cannot.

It is the Mahalanobis distance under probabilistic PCA (Tipping & Bishop, 1999) fitted to the
network inputs ``x`` (the checkpoint's preprocessing applied) of the training split: the mean
``mu``, the top ``r`` principal directions ``u_i`` with their variances ``lambda_i``, and one
variance ``sigma^2`` (the mean of the other eigenvalues) for the remaining ``D - r`` directions:

    d(x) = 1/D [ sum_i (u_i . (x - mu))^2 / lambda_i
                 + ( ||x - mu||^2 - sum_i (u_i . (x - mu))^2 ) / sigma^2 ]

``d`` is the score: about 1 for inputs like the training inputs (its expectation under the
fitted Gaussian is exactly 1), larger farther from them; its threshold is calibrated on
held-out inputs like every other score. With ``r = D`` (small feature counts) it is the
full-covariance Mahalanobis distance. Eigenvalues are floored at ``1e-6`` of the largest so
that a direction in which the training inputs never varied (MNIST's border pixels) is very
sensitive but finite.

It is one-sided on purpose. In many dimensions a Gaussian's mass lies in a shell, so an input
much *closer* to the mean than the training inputs (a blank image) is atypical too (Nalisnick
et al., 2019); but so is a smooth digit resampled from a photograph, which loses the
high-frequency detail of MNIST's strokes (median distance 0.36 against 0.93 for MNIST's own
test digits and 0.03 for a blank image: benchmarks/results/far_from_data.md), and flagging
those would flag the inputs the page exists for. So a blank image sent as numbers is answered
unflagged; ``/predict/image`` refuses a blank file (nothing to classify).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

MEAN: Final = "support.mean"
COMPONENTS: Final = "support.components"
VARIANCES: Final = "support.variances"

DEFAULT_VARIANCE_HELD: Final = 0.95
MAX_RANK: Final = 64
EIGEN_FLOOR: Final = 1e-6
# Rows of training inputs the fit reads: enough for a stable covariance of a few hundred
# dimensions, in bounded time and memory whatever the data set.
MAX_FIT_ROWS: Final = 20_000


@dataclass(frozen=True)
class DataSupport:
    """A fitted data-support score (module docstring). ``components (r, D)`` are orthonormal
    rows (stored as float16 in a checkpoint), ``variances (r,)`` their eigenvalues."""

    mean: NDArray[np.float32]
    components: NDArray[np.float32]
    variances: NDArray[np.float32]
    residual_variance: float

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def rank(self) -> int:
        return int(self.components.shape[0])

    @classmethod
    def fit(
        cls,
        x: NDArray[np.floating],
        variance_held: float = DEFAULT_VARIANCE_HELD,
        max_rank: int = MAX_RANK,
        seed: int = 0,
    ) -> DataSupport:
        """Fit to training inputs ``x (N, D)``: the smallest rank holding ``variance_held`` of
        the variance (at most ``max_rank``; every direction when D is at most ``max_rank``)."""
        a = np.asarray(x, dtype=np.float64)
        if a.ndim != 2 or a.shape[0] < 2 or not np.isfinite(a).all():
            raise ValueError("data support needs a finite (N >= 2, D) array of inputs")
        if not 0.0 < variance_held <= 1.0:
            raise ValueError(f"variance_held must lie in (0, 1], got {variance_held}")
        if a.shape[0] > MAX_FIT_ROWS:
            rows = np.random.default_rng(seed).choice(a.shape[0], MAX_FIT_ROWS, replace=False)
            a = a[np.sort(rows)]
        d = a.shape[1]
        mu = a.mean(axis=0)
        cov = np.cov(a - mu, rowvar=False, bias=False).reshape(d, d)
        eigval, eigvec = np.linalg.eigh(cov)
        order = np.argsort(eigval)[::-1]
        eigval, eigvec = np.clip(eigval[order], 0.0, None), eigvec[:, order]
        floor = max(float(eigval[0]), 1e-12) * EIGEN_FLOOR
        eigval = np.maximum(eigval, floor)
        if d <= max_rank:
            r = d
        else:
            held = np.cumsum(eigval) / eigval.sum()
            r = min(int(np.searchsorted(held, variance_held) + 1), max_rank, d)
        rest = eigval[r:]
        sigma2 = float(rest.mean()) if rest.size else float(eigval[-1])
        fitted = cls(
            mean=mu.astype(np.float32),
            components=np.ascontiguousarray(eigvec[:, :r].T, dtype=np.float32),
            variances=eigval[:r].astype(np.float32),
            residual_variance=max(sigma2, floor),
        )
        # as a checkpoint stores it (directions rounded to float16)
        return cls.from_tensors(fitted.tensors(), fitted.residual_variance)

    def score(self, x: NDArray[np.floating]) -> NDArray[np.float64]:
        """``d(x)`` for network inputs ``x (N, D)``: the squared Mahalanobis distance per
        dimension (module docstring); about 1 in distribution, larger farther."""
        dx = np.asarray(x, dtype=np.float64) - self.mean
        proj = dx @ self.components.T.astype(np.float64)
        inside = (proj * proj / self.variances).sum(axis=1)
        outside = np.clip((dx * dx).sum(axis=1) - (proj * proj).sum(axis=1), 0.0, None)
        out: NDArray[np.float64] = (inside + outside / self.residual_variance) / self.dim
        return out

    def tensors(self) -> dict[str, NDArray[np.generic]]:
        """What a checkpoint stores: the mean and variances float32, the directions float16."""
        return {
            MEAN: self.mean.astype(np.float32),
            COMPONENTS: self.components.astype(np.float16),
            VARIANCES: self.variances.astype(np.float32),
        }

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, NDArray[Any]], residual_variance: float
    ) -> DataSupport:
        """The score a checkpoint stores (:meth:`tensors`, and the residual variance its
        metadata records)."""
        return cls(
            mean=np.ascontiguousarray(tensors[MEAN], dtype=np.float32),
            components=np.ascontiguousarray(tensors[COMPONENTS], dtype=np.float32),
            variances=np.ascontiguousarray(tensors[VARIANCES], dtype=np.float32),
            residual_variance=float(residual_variance),
        )
