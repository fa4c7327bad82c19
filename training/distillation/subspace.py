"""The default design's fixed affine subspace: PCA of the SGLD samples plus residual noise.

The paper's generator ends in an affine map from its last 100 hidden units to the P weights,
so every network it can produce lies in a 100-dimensional affine subspace of weight space,
learnt jointly with the GAN. The default design fixes that subspace before training: with
the samples ``X (S, P)``, their mean ``m`` and centred ``Xc = X - m``, the thin SVD
``Xc = U diag(sigma) V^T`` gives the top-r principal directions ``B = V_r^T (r, P)``, and

    theta = m + c @ B + residual_std * eps,       c in R^r,  eps ~ N(0, I_P),

where the WGAN-GP learns the distribution of the coefficients ``c = (theta - m) @ B^T`` (a
nonlinear generator, so several modes stay several modes), and what the r directions leave
out is modelled as independent Gaussian noise per weight, with ``residual_std_j`` the standard
deviation over samples of ``(Xc - C B)_{:, j}``.

The SVD is computed with the Gram-matrix trick, which never holds more than a block of
columns: ``K = Xc Xc^T = U diag(sigma^2) U^T`` (S x S, accumulated over column blocks), then
``B = diag(1/sigma_r) U_r^T Xc`` block by block. Cost ``O(S^2 P)``, memory ``O(S^2 + S b)``.

With ``basis_dtype`` float16 or int8 the basis is rounded as the checkpoint stores it
(:func:`apd.checkpoint.round_basis`; int8: 8 bits per entry and one scale per direction, twice
the directions of float16 in the same bytes), and the coefficients and residual are computed
with the rounded basis, so the training data is exactly what the stored generator's map can
reproduce. With ``vector_dtype`` int8 the mean is rounded the same way before anything is
centred on it, and the residual std after (:func:`apd.checkpoint.round_vector`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from apd.checkpoint import MEAN, RESIDUAL_STD, BasisDtype, VectorDtype, round_basis, round_vector


@dataclass(frozen=True)
class Subspace:
    """An affine subspace of weight space fitted to S samples (see the module docstring)."""

    mean: NDArray[np.float32]  # (P,)
    basis: NDArray[np.float32]  # (r, P), orthonormal rows (as basis_dtype stores them)
    coefficients: NDArray[np.float32]  # (S, r) = (X - mean) @ basis.T
    residual_std: NDArray[np.float32]  # (P,)
    singular_values: NDArray[np.float64]  # (r,)
    total_variance: float  # sum over weights of the sample variance of X
    basis_dtype: BasisDtype
    vector_dtype: VectorDtype = "float"  # how the mean and residual std are rounded

    @property
    def rank(self) -> int:
        return int(self.basis.shape[0])

    @property
    def num_params(self) -> int:
        return int(self.basis.shape[1])

    @property
    def explained_variance_ratio(self) -> float:
        """Fraction of the samples' total variance that the r directions hold."""
        s = len(self.coefficients)
        captured = float((self.singular_values**2).sum()) / max(s - 1, 1)
        return captured / self.total_variance if self.total_variance > 0 else 1.0

    def summary(self) -> dict[str, float | int | str]:
        return {
            "rank": self.rank,
            "num_samples": len(self.coefficients),
            "explained_variance_ratio": round(self.explained_variance_ratio, 6),
            "total_variance": self.total_variance,
            "mean_residual_std": float(self.residual_std.mean()),
            "basis_dtype": self.basis_dtype,
            "vector_dtype": self.vector_dtype,
        }


def _blocks(p: int, block: int) -> Iterator[slice]:
    for start in range(0, p, block):
        yield slice(start, min(p, start + block))


def _columns(
    samples: NDArray[np.floating], rows: NDArray[np.integer] | None, cols: slice
) -> torch.Tensor:
    block = samples[:, cols] if rows is None else samples[rows, cols]
    return torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))


def rank_for_variance(variances: NDArray[np.floating], target: float, max_rank: int) -> int:
    """The smallest rank whose leading directions hold at least ``target`` of the total
    variance, ``variances`` being the variance along every principal direction (any order;
    their sum is the total), and at most ``max_rank`` (``max_rank`` if none is enough)."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"the variance target must lie in (0, 1], got {target}")
    v = np.sort(np.clip(np.asarray(variances, dtype=np.float64), 0.0, None))[::-1]
    if max_rank < 1 or v.size == 0 or v.sum() <= 0:
        raise ValueError("need a positive max_rank and a spectrum with some variance")
    held = np.cumsum(v) / v.sum()
    # a small tolerance: the cumulative sum of a spectrum that meets the target exactly
    # must not miss it by a rounding error
    enough = np.flatnonzero(held >= target - 1e-12)
    return int(min(enough[0] + 1 if enough.size else v.size, max_rank))


def fit_subspace(
    samples: NDArray[np.floating],
    rank: int,
    rows: NDArray[np.integer] | None = None,
    basis_dtype: BasisDtype = "float32",
    vector_dtype: VectorDtype = "float",
    block: int = 8192,
    variance_target: float | None = None,
) -> Subspace:
    """Mean, top-``rank`` principal directions and residual std of ``samples[rows]``.

    With ``variance_target``, ``rank`` is the most directions to take and the rank is the
    smallest that holds that share of the samples' variance (:func:`rank_for_variance`).
    ``samples`` may be a read-only memmap ``(S_all, P)``; only ``block`` columns of the
    selected rows are in memory at a time (plus the S x S Gram matrix).
    """
    s = len(samples) if rows is None else len(rows)
    p = int(samples.shape[1])
    if s < 2:
        raise ValueError(f"need at least 2 samples to fit a subspace, got {s}")
    if not 0 < rank < s:
        raise ValueError(f"rank must lie in [1, {s - 1}] for {s} samples, got {rank}")
    if rank > p:
        raise ValueError(f"rank {rank} exceeds the {p} weights")
    blocks = list(_blocks(p, block))

    mean = np.empty(p, dtype=np.float64)
    for cols in blocks:
        mean[cols] = _columns(samples, rows, cols).double().mean(dim=0).numpy()
    mean32 = mean.astype(np.float32)
    if vector_dtype != "float":
        mean32 = round_vector(MEAN, mean32, vector_dtype)

    gram = torch.zeros(s, s, dtype=torch.float64)
    for cols in blocks:
        xc = _columns(samples, rows, cols) - torch.from_numpy(mean32[cols])
        gram += (xc @ xc.T).double()
    total_variance = float(torch.trace(gram)) / (s - 1)
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    if variance_target is not None:
        rank = rank_for_variance(evals.numpy(), variance_target, rank)
    order = torch.argsort(evals, descending=True)[:rank]
    lam = evals[order].clamp_min(0.0)
    if float(lam[-1]) <= 1e-6 * max(float(lam[0]), 1e-300):  # float32 data: noise floor
        raise ValueError(f"the samples span fewer than {rank} directions; lower the rank (--rank)")
    sigma = lam.sqrt()
    u_r = evecs[:, order].float()  # (S, r)

    basis = np.empty((rank, p), dtype=np.float32)
    inv_sigma = (1.0 / sigma).float()[:, None]
    for cols in blocks:
        xc = _columns(samples, rows, cols) - torch.from_numpy(mean32[cols])
        b = (u_r.T @ xc) * inv_sigma
        basis[:, cols] = b.numpy()
    basis = round_basis(basis, basis_dtype)

    coeff = torch.zeros(s, rank, dtype=torch.float64)
    for cols in blocks:
        xc = _columns(samples, rows, cols) - torch.from_numpy(mean32[cols])
        coeff += (xc @ torch.from_numpy(basis[:, cols]).T).double()
    coeff32 = coeff.float()

    residual_std = np.empty(p, dtype=np.float32)
    for cols in blocks:
        xc = _columns(samples, rows, cols) - torch.from_numpy(mean32[cols])
        r = xc - coeff32 @ torch.from_numpy(basis[:, cols])
        residual_std[cols] = (r.double().pow(2).sum(dim=0) / (s - 1)).sqrt().float().numpy()
    if vector_dtype != "float":
        residual_std = round_vector(RESIDUAL_STD, residual_std, vector_dtype)

    return Subspace(
        mean=mean32,
        basis=basis,
        coefficients=coeff32.numpy(),
        residual_std=residual_std,
        singular_values=sigma.numpy(),
        total_variance=total_variance,
        basis_dtype=basis_dtype,
        vector_dtype=vector_dtype,
    )


def load_rows(
    samples: NDArray[np.floating], rows: NDArray[np.integer] | None = None, chunk: int = 512
) -> NDArray[np.float32]:
    """``samples[rows]`` as one float32 array in memory, read in chunks of rows."""
    idx = np.arange(len(samples)) if rows is None else np.asarray(rows)
    out = np.empty((len(idx), samples.shape[1]), dtype=np.float32)
    for start in range(0, len(idx), chunk):
        out[start : start + chunk] = samples[idx[start : start + chunk]]
    return out


def extend_basis(
    basis: torch.Tensor,
    mean: torch.Tensor,
    samples: torch.Tensor,
    extra: int,
    basis_dtype: BasisDtype = "float32",
) -> torch.Tensor:
    """``extra`` new directions ``(extra, P)`` for samples ``(n, P)`` that the orthonormal
    rows of ``basis`` (r, P) about ``mean`` do not reach: the top right singular vectors of
    their residuals ``R = (X - mean) - ((X - mean) B^T) B``, uncentred, so that a new mode's
    offset from ``mean`` is the first direction found and its spread the next ones. The
    residuals are orthogonal to ``basis``, and so are the new rows (up to the rounding of
    ``basis_dtype``, as :func:`fit_subspace` rounds).

    This is how online APD follows a cyclical sampler into modes its first subspace never
    saw (:mod:`training.distillation.online`)."""
    n = samples.shape[0]
    if not 0 < extra <= n:
        raise ValueError(f"extra must lie in [1, {n}] for {n} samples, got {extra}")
    xc = samples.float() - mean
    resid = xc - (xc @ basis.T) @ basis if basis.shape[0] else xc
    gram = (resid @ resid.T).double()
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    order = torch.argsort(evals, descending=True)[:extra]
    lam = evals[order].clamp_min(0.0)
    if float(lam[-1]) <= 1e-6 * max(float(lam[0]), 1e-300):
        raise ValueError(f"the new samples add fewer than {extra} directions to the subspace")
    new = (evecs[:, order].T.float() @ resid) / lam.sqrt().float()[:, None]
    return torch.from_numpy(round_basis(new.cpu().numpy(), basis_dtype)).to(new.device)
