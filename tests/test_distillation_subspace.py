"""The default design's PCA subspace and residual, against NumPy's SVD and a planted model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apd.checkpoint import BasisDtype, round_basis
from training.distillation.subspace import extend_basis, fit_subspace, load_rows


def _planted(s: int = 400, p: int = 60, r: int = 3, noise: float = 0.05, seed: int = 0):
    """``X = m + C B + noise * E`` with orthonormal ``B (r, p)`` and well-separated scales."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((p, r)))
    basis = q.T
    coeff = rng.standard_normal((s, r)) * np.array([3.0, 2.0, 1.0])[:r]
    mean = rng.standard_normal(p)
    x = mean + coeff @ basis + noise * rng.standard_normal((s, p))
    return x.astype(np.float32), basis, noise


def test_matches_numpy_svd() -> None:
    x, _, _ = _planted()
    sub = fit_subspace(x, rank=5, block=7)  # odd block size: exercises the column blocking
    xc = x.astype(np.float64) - x.mean(axis=0)
    u, sv, vt = np.linalg.svd(xc, full_matrices=False)
    np.testing.assert_allclose(sub.mean, x.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(sub.singular_values, sv[:5], rtol=1e-4)
    # Directions agree up to sign; coefficients are the projections onto them.
    signs = np.sign((sub.basis * vt[:5]).sum(axis=1))
    np.testing.assert_allclose(sub.basis * signs[:, None], vt[:5], atol=2e-4)
    np.testing.assert_allclose(sub.coefficients * signs, u[:, :5] * sv[:5], atol=2e-3)
    resid = xc - (u[:, :5] * sv[:5]) @ vt[:5]
    np.testing.assert_allclose(sub.residual_std, resid.std(axis=0, ddof=1), rtol=1e-3)
    expected_ratio = (sv[:5] ** 2).sum() / (sv**2).sum()
    assert sub.explained_variance_ratio == pytest.approx(expected_ratio, rel=1e-5)


def test_recovers_planted_subspace_and_noise_level() -> None:
    x, basis, noise = _planted(s=800)
    sub = fit_subspace(x, rank=3)
    # The principal angles between fitted and planted subspaces are ~0: all cosines ~1.
    cosines = np.linalg.svd(sub.basis @ basis.T, compute_uv=False)
    assert cosines.min() > 0.999
    # Isotropic noise minus its projection onto 3 of 60 dims: variance noise^2 (1 - 3/60).
    expected = noise * np.sqrt(1 - 3 / 60)
    assert np.mean(sub.residual_std) == pytest.approx(expected, rel=0.03)
    # Planted variances 9 + 4 + 1 against 60 * noise^2 = 0.15 of noise.
    assert sub.explained_variance_ratio == pytest.approx(14 / 14.15, abs=0.003)


def test_rows_select_the_same_samples_as_indexing() -> None:
    x, _, _ = _planted()
    rows = np.arange(0, 400, 3)
    a = fit_subspace(x, rank=2, rows=rows)
    b = fit_subspace(x[rows], rank=2)
    np.testing.assert_allclose(a.basis, b.basis, atol=1e-6)
    np.testing.assert_allclose(a.residual_std, b.residual_std, rtol=1e-5)
    np.testing.assert_array_equal(load_rows(x, rows, chunk=7), x[rows])


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_a_rounded_basis_is_what_the_coefficients_use(dtype: BasisDtype) -> None:
    x, _, _ = _planted()
    sub = fit_subspace(x, rank=3, basis_dtype=dtype)
    np.testing.assert_array_equal(round_basis(sub.basis, dtype), sub.basis)
    if dtype == "float16":  # independent of round_basis: float16 holds every entry exactly
        np.testing.assert_array_equal(sub.basis.astype(np.float16).astype(np.float32), sub.basis)
    else:  # at most 255 levels per row, evenly spaced by the row's scale
        for row in sub.basis:
            steps = row / (np.abs(row).max() / 127)
            np.testing.assert_allclose(steps, np.rint(steps), atol=1e-4)
    xc = x - sub.mean
    np.testing.assert_allclose(sub.coefficients, xc @ sub.basis.T, atol=1e-3)
    resid = xc - sub.coefficients @ sub.basis
    np.testing.assert_allclose(sub.residual_std, resid.std(axis=0, ddof=1), rtol=1e-3)


def test_rejects_impossible_ranks() -> None:
    x, _, _ = _planted(s=10, p=8)
    with pytest.raises(ValueError, match="rank"):
        fit_subspace(x, rank=10)
    with pytest.raises(ValueError, match="fewer than"):
        rng = np.random.default_rng(0)
        two_dims = rng.standard_normal((20, 2)) @ rng.standard_normal((2, 8))
        fit_subspace(two_dims.astype(np.float32), rank=5)


def test_extend_basis_is_the_svd_of_the_residuals() -> None:
    """Against NumPy: the new rows are the top right singular vectors of the samples'
    uncentred residuals outside the old basis (up to sign), orthogonal to the old rows."""
    rng = np.random.default_rng(0)
    p = 30
    old = np.linalg.qr(rng.standard_normal((p, 3)))[0].T  # (3, p) orthonormal
    mean = rng.standard_normal(p)
    x = mean + 4.0 + rng.standard_normal((12, p))  # an offset mode: not centred on mean
    new = extend_basis(
        torch.from_numpy(old).float(),
        torch.from_numpy(mean).float(),
        torch.from_numpy(x).float(),
        4,
    ).numpy()
    xc = x - mean
    resid = xc - (xc @ old.T) @ old
    _, _, vt = np.linalg.svd(resid, full_matrices=False)
    np.testing.assert_allclose(np.abs(new @ vt[:4].T), np.eye(4), atol=1e-4)
    np.testing.assert_allclose(new @ old.T, 0.0, atol=1e-5)
    with pytest.raises(ValueError, match="extra must lie"):
        extend_basis(torch.from_numpy(old).float(), torch.zeros(p), torch.zeros(2, p), 3)
