"""The what-if bases of benchmarks/scale5_noise.py: the structured (per-layer row x column)
subspace of ``--kron``, checked against the dense projector onto the outer products of its
factors, and the B-bit rounding of ``--bits``, against Max's optimal Gaussian quantizer."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from apd.networks import MLPSpec, build_spec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from scale5_noise import KroneckerSubspace

_SPEC = build_spec("mlp:6", (5,), 3)
assert isinstance(_SPEC, MLPSpec)
SPEC: MLPSpec = _SPEC


def _samples(s: int = 40) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((s, SPEC.num_params)).astype(np.float32)


def test_full_ranks_keep_every_sample_and_leave_no_residual() -> None:
    theta = _samples()
    full = KroneckerSubspace.fit(theta, SPEC, 100, 100, chunk=7)
    np.testing.assert_allclose(full.project(theta), theta, atol=1e-5)
    assert abs(full.variance_held - 1.0) < 1e-9 and float(full.residual_std.max()) < 1e-6


def test_projection_equals_the_dense_projector_and_its_residual_is_what_is_left() -> None:
    theta = _samples()
    ks = KroneckerSubspace.fit(theta, SPEC, 2, 2, chunk=7)
    x = theta.astype(np.float64)
    out = ks.project(x, np.float64)
    total = kept = 0.0
    for (ws, bs), (lf, rf) in zip(SPEC.offsets(), ks.factors, strict=True):
        # row-major W (in, out): vec(l r^T) is np.outer(l, r).ravel()
        basis = np.stack(
            [np.outer(lf[:, p], rf[:, q]).ravel() for p in range(2) for q in range(rf.shape[1])]
        )
        np.testing.assert_allclose(basis @ basis.T, np.eye(len(basis)), atol=1e-10)
        d = x[:, ws] - x[:, ws].mean(axis=0)
        np.testing.assert_allclose(out[:, ws], x[:, ws].mean(axis=0) + d @ basis.T @ basis)
        np.testing.assert_array_equal(out[:, bs], x[:, bs])  # biases pass whole
        total += float(np.square(d).sum())
        kept += float(np.square(d @ basis.T).sum())
    assert abs(ks.variance_held - kept / total) < 1e-9
    np.testing.assert_allclose(ks.residual_std, (x - out).std(axis=0, ddof=1), atol=1e-6)
    # factors span the leading row / column spaces: 2 x 2 per layer, plus the 9 biases
    assert ks.directions == 4 + 4 + 9 and ks.basis_numbers == (5 + 6 + 6 + 3) * 2


def test_bit_rounding_meets_maxs_gaussian_distortion() -> None:
    """``--bits``: on Gaussian directions, the rounding's mean-square error per unit variance
    is Max's (1960) optimum for a uniform quantizer of 2**B levels (0.3634, 0.1188, 0.03744,
    0.01154 for B = 1-4) within 5 % (the float16 step, the per-group estimate of the scale);
    the levels are 2**B per group and none sits at 0."""
    from scale5_noise import GROUP, round_bits

    basis = np.random.default_rng(1).standard_normal((4, 64 * 500)).astype(np.float32)
    for bits, optimum in ((1, 0.3634), (2, 0.1188), (3, 0.03744), (4, 0.01154)):
        rounded = round_bits(basis, bits)
        mse = float(np.mean(np.square(rounded - basis)))
        assert 0.95 * optimum <= mse <= 1.05 * optimum, (bits, mse)
        group = rounded[0, :GROUP]
        assert len(np.unique(group)) <= 2**bits and not np.any(group == 0)
    odd = np.random.default_rng(2).standard_normal((2, 100)).astype(np.float32)  # a partial group
    assert round_bits(odd, 4).shape == (2, 100)


def test_own_residual_is_the_std_of_what_the_dense_projector_leaves_out() -> None:
    from scale5_noise import residual_std_of

    rng = np.random.default_rng(5)
    theta = rng.standard_normal((30, 12)).astype(np.float32)
    offset = rng.standard_normal(12).astype(np.float32)
    directions = rng.standard_normal((3, 12)).astype(np.float32)  # not orthonormal
    d = directions.astype(np.float64)
    projector = d.T @ np.linalg.solve(d @ d.T, d)  # onto the row space of the directions
    left = (theta - offset) @ (np.eye(12) - projector)
    want = left.std(axis=0, ddof=1)
    got = residual_std_of(offset, directions, theta, chunk=7)  # chunks that do not divide 30
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
