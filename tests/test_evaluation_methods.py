"""Posterior methods: members predict like the reference forward, and the Gaussian fit
recovers a known low-rank plus diagonal covariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apd.networks import MLPSpec, forward_probs
from training.evaluation.methods import (
    FixedNetworks,
    MCDropout,
    MemberNetworks,
    fit_gaussian,
    spread_indices,
)

SPEC = MLPSpec("tiny", (6, 5, 3))  # P = 6*5 + 5 + 5*3 + 3 = 53
SPEC2 = MLPSpec("tiny2", (6, 5, 4, 3))


@pytest.mark.parametrize("spec", [SPEC, SPEC2])
def test_member_probs_match_the_numpy_reference_forward(spec: MLPSpec) -> None:
    rng = np.random.default_rng(0)
    theta = rng.normal(size=(7, spec.num_params)).astype(np.float32)
    x = rng.random((300, spec.input_dim), dtype=np.float32)
    got = MemberNetworks(spec, torch.from_numpy(theta)).probs(x)
    np.testing.assert_allclose(got, forward_probs(spec, theta, x), rtol=1e-5, atol=1e-6)


def test_dropout_passes_differ_and_average_towards_the_deterministic_net() -> None:
    rng = np.random.default_rng(2)
    theta = rng.normal(size=(1, SPEC.num_params)).astype(np.float32) * 0.3
    x = rng.random((5, SPEC.input_dim), dtype=np.float32)
    method = MCDropout(SPEC, theta, rate=0.3)
    probs = method.draw(400, seed=0).probs(x, seed=0)
    assert probs.shape == (400, 5, 3)
    assert probs.std(axis=0).min() > 1e-3  # the passes really are stochastic
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(probs, method.draw(400, seed=0).probs(x, seed=0))


def test_fixed_networks_draw_and_bytes() -> None:
    theta = np.arange(5 * SPEC.num_params, dtype=np.float32).reshape(5, -1)
    ens = FixedNetworks("ensemble", "Ensemble", SPEC, theta)
    assert ens.draw(100, seed=0).theta.shape == (5, SPEC.num_params)
    np.testing.assert_array_equal(ens.draw(2, seed=0).theta.numpy(), theta[[0, 2]])
    assert ens.stored_bytes() == 5 * SPEC.num_params * 4
    np.testing.assert_array_equal(spread_indices(10, 4), [0, 2, 5, 7])
    np.testing.assert_array_equal(spread_indices(3, 10), [0, 1, 2])


def test_gaussian_fit_recovers_a_low_rank_plus_diagonal_covariance() -> None:
    rng = np.random.default_rng(3)
    p, r, s = SPEC.num_params, 3, 40_000
    mean = rng.normal(size=p)
    factor = rng.normal(size=(r, p)) * np.array([[3.0], [2.0], [1.5]])
    diag = rng.uniform(0.2, 0.5, size=p)
    cov = factor.T @ factor + np.diag(diag**2)
    samples = rng.multivariate_normal(mean, cov, size=s).astype(np.float32)

    fit = fit_gaussian(SPEC, samples, rank=r, fit_rows=np.arange(0, s, 80))
    fitted_cov = fit.factor.T.astype(np.float64) @ fit.factor + np.diag(fit.diag_std**2)
    rel = np.linalg.norm(fitted_cov - cov) / np.linalg.norm(cov)
    assert rel < 0.1
    np.testing.assert_allclose(fit.mean, mean, atol=0.05)
    # every marginal variance matches the samples' (where the factor does not exceed it)
    np.testing.assert_allclose(np.diag(fitted_cov), samples.var(axis=0, ddof=1), rtol=0.05)

    draws = fit.sample_theta(20_000, seed=0).astype(np.float64)
    draw_cov = np.cov(draws, rowvar=False)
    assert np.linalg.norm(draw_cov - fitted_cov) / np.linalg.norm(fitted_cov) < 0.1
    np.testing.assert_array_equal(fit.sample_theta(3, seed=1), fit.sample_theta(3, seed=1))
    assert fit.stored_bytes() == (r + 2) * p * 4


def test_gaussian_fit_rank_zero_is_the_diagonal_gaussian() -> None:
    rng = np.random.default_rng(4)
    samples = rng.normal(size=(500, SPEC.num_params)).astype(np.float32) * 2.0
    fit = fit_gaussian(SPEC, samples, rank=0)
    assert fit.rank == 0
    np.testing.assert_allclose(fit.diag_std**2, samples.var(axis=0, ddof=1), rtol=1e-4)
    with pytest.raises(ValueError):
        fit_gaussian(SPEC, samples, rank=500)
