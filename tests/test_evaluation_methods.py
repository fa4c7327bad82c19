"""Posterior methods: members predict like the reference forward, the Gaussian fit
recovers a known low-rank plus diagonal covariance, and the SWAG mixture has the moments of
an independent computation, one component per chain or (chain, cycle)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from apd.networks import MLPSpec, forward_probs
from training.evaluation.methods import (
    FixedNetworks,
    MCDropout,
    MemberNetworks,
    SGLDSamples,
    fit_gaussian,
    fit_mixture,
    fit_mixture_to_sgld,
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


# --------------------------------------------------------------------------- the mixture


def _two_clusters(
    rng: np.random.Generator, sizes: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Samples of two well-separated low-rank-plus-diagonal Gaussians in SPEC's P, as chains
    0 and 1 (interleaved in the store order), with their steps, true means and covariances."""
    p = SPEC.num_params
    means, covs, parts = [], [], []
    for c, n in enumerate(sizes):
        mean = rng.normal(size=p) + 25.0 * c
        factor = rng.normal(size=(2, p)) * np.array([[2.0], [1.0]])
        cov = factor.T @ factor + np.diag(rng.uniform(0.2, 0.6, size=p) ** 2)
        parts.append(rng.multivariate_normal(mean, cov, size=n))
        means.append(mean)
        covs.append(cov)
    samples = np.concatenate(parts).astype(np.float32)
    chain = np.repeat(np.arange(2), sizes)
    step = np.concatenate([np.arange(1, n + 1) for n in sizes])
    order = rng.permutation(len(samples))  # the store's row order is not the step order
    return samples[order], chain[order], step[order], means, covs


def test_mixture_components_recover_each_cluster_with_the_swag_covariance() -> None:
    rng = np.random.default_rng(5)
    samples, chain, step, means, covs = _two_clusters(rng, (6000, 3000))
    fit = fit_mixture(SPEC, samples, chain, step, rank=6000)
    np.testing.assert_allclose(fit.weights, [6000 / 9000, 3000 / 9000])
    for m in range(2):
        np.testing.assert_allclose(fit.means[m], means[m], atol=0.12)
        # SWAG's covariance of all deviations: 1/2 (diag + sample covariance), so the
        # variances are recovered and the correlations halved
        want = 0.5 * (np.diag(np.diag(covs[m])) + covs[m])
        got = fit.component_covariance(m)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.05


def test_mixture_moments_match_an_independent_computation() -> None:
    rng = np.random.default_rng(6)
    samples, chain, step, _, _ = _two_clusters(rng, (300, 120))
    k = 20
    fit = fit_mixture(SPEC, samples, chain, step, rank=k)
    for m in range(2):
        rows = np.flatnonzero(chain == m)
        mine = samples[rows].astype(np.float64)
        by_step = mine[np.argsort(step[rows])]
        n = len(rows)
        kept = by_step[[n - 1 - (j * n) // k for j in range(k)]]  # spread, ending at the last
        mean = mine.mean(axis=0)
        dev = kept - mean
        want = 0.5 * (np.diag(mine.var(axis=0)) + dev.T @ dev / (k - 1))
        np.testing.assert_allclose(fit.means[m], mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(fit.component_covariance(m), want, rtol=1e-4, atol=1e-5)
    assert fit.stored_bytes() == 4 * (2 * (2 + k) * SPEC.num_params + 2)

    # draws: component frequencies are the weights, and each component's draws have its
    # mean and covariance; the whole has the mixture's moments
    draws = fit.sample_theta(120_000, seed=0).astype(np.float64)
    which = np.argmin(
        [np.linalg.norm(draws - fit.means[m], axis=1) for m in range(2)], axis=0
    )  # 25 apart per weight: nearest mean is the component
    np.testing.assert_allclose(np.bincount(which) / len(draws), fit.weights, atol=0.005)
    for m in range(2):
        got = draws[which == m]
        want = fit.component_covariance(m)
        standard_error = np.sqrt(np.diag(want) / len(got))
        assert np.all(np.abs(got.mean(axis=0) - fit.means[m]) < 5 * standard_error)
        cov = np.cov(got, rowvar=False)
        assert np.linalg.norm(cov - want) / np.linalg.norm(want) < 0.03
    w = fit.weights
    mix_mean = w @ fit.means.astype(np.float64)
    second = sum(
        w[m] * (fit.component_covariance(m) + np.outer(fit.means[m], fit.means[m]))
        for m in range(2)
    )
    mix_cov = second - np.outer(mix_mean, mix_mean)
    np.testing.assert_allclose(draws.mean(axis=0), mix_mean, atol=0.1)
    cov_all = np.cov(draws, rowvar=False)
    assert np.linalg.norm(cov_all - mix_cov) / np.linalg.norm(mix_cov) < 0.02
    np.testing.assert_array_equal(fit.sample_theta(4, seed=3), fit.sample_theta(4, seed=3))
    with pytest.raises(ValueError, match="rank >= 2"):
        fit_mixture(SPEC, samples, chain, step, rank=1)


@pytest.mark.parametrize(
    ("schedule", "components", "rule"),
    [
        ({"kind": "cyclical", "cycle_steps": 10}, 6, "chain and cycle"),
        ({"kind": "constant"}, 2, "chain"),
    ],
)
def test_mixture_components_are_chains_or_chain_cycles(
    tmp_path: Path, schedule: dict[str, object], components: int, rule: str
) -> None:
    from training.sample_store import SampleStore

    rng = np.random.default_rng(7)
    meta = {"sampler": {"method": "sgld", "schedule": schedule}, "data_sha256": "0" * 64}
    store = SampleStore.create(tmp_path / "samples", SPEC, 60, meta)
    for t in range(1, 31):  # steps 1..30, both chains each step: cycles 0, 1, 2
        store.append(rng.normal(size=(2, SPEC.num_params)) + 3.0 * t, [0, 1], t)
    store.close()
    fit = fit_mixture_to_sgld(SGLDSamples(store, {"run": "runs/x"}), rank=4)
    assert fit.num_components == components
    prov = fit.provenance()
    assert prov["component_rule"] == rule and prov["fitted_to"] == "runs/x"
    assert sum(prov["component_samples"]) == 60 and prov["rank"] == 4
    theta, chain, step = np.asarray(store.theta), np.asarray(store.chain), np.asarray(store.step)
    cycle = (step - 1) // 10 if components == 6 else np.zeros_like(step)
    groups = sorted({(int(c), int(k)) for c, k in zip(chain, cycle, strict=True)})
    want = np.stack(
        [theta[(chain == c) & (cycle == k)].mean(axis=0) for c, k in groups]
    )  # each (chain, cycle) group's mean is one component's mean
    got = fit.means[np.argsort(fit.means[:, 0])]
    np.testing.assert_allclose(got, want[np.argsort(want[:, 0])], rtol=1e-5)
