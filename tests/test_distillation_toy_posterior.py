"""Mode coverage on a posterior with four known, separated modes
(:mod:`training.distillation.toy_posterior`).

SGLD chains started in each mode stay there; the default design (a chain-conditional WGAN-GP
in a subspace) must put about a quarter of its draws on each mode's ridge, while a Gaussian
fitted to the same samples puts its mass in the valleys between them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.distillation import toy_posterior


@pytest.fixture(scope="module")
def problem() -> toy_posterior.ToyProblem:
    return toy_posterior.make_problem(seed=0)


@pytest.fixture(scope="module")
def samples(problem: toy_posterior.ToyProblem, one_thread: None) -> toy_posterior.ToySamples:
    return toy_posterior.sample_posterior(
        problem, chains_per_mode=2, steps=2000, burn_in=500, thinning=5, lr=0.05, seed=0
    )


def test_modes_are_separated(
    problem: toy_posterior.ToyProblem, samples: toy_posterior.ToySamples
) -> None:
    assert toy_posterior.separation_nats(problem) > 30
    modes = toy_posterior.mode_of(samples.theta)
    for c in np.unique(samples.chain):
        assert len(np.unique(modes[samples.chain == c])) == 1  # no chain changes mode
    assert sorted(np.unique(modes)) == [0, 1, 2, 3]
    # Each mode's ridge reproduces the data-generating weights w_i = u_i v_i.
    w = samples.theta[:, :2] * samples.theta[:, 2:4]
    np.testing.assert_allclose(np.median(w, axis=0), problem.true_w, atol=0.6)


@pytest.mark.slow
def test_generator_covers_every_mode_and_a_gaussian_cannot(
    problem: toy_posterior.ToyProblem, samples: toy_posterior.ToySamples, one_thread: None
) -> None:
    gen = toy_posterior.distill_toy(samples, steps=1000, seed=0)
    draws = gen.sample(4000, torch.Generator().manual_seed(1)).numpy()
    apd = toy_posterior.mode_coverage(problem, draws, samples.theta)
    assert apd.covered == toy_posterior.NUM_MODES
    assert apd.on_ridge > 0.8
    assert all(0.15 < s < 0.35 for s in apd.shares)  # each mode holds 1/4 of the posterior

    gauss = toy_posterior.mode_coverage(
        problem, toy_posterior.gaussian_draws(samples.theta, 4000), samples.theta
    )
    assert gauss.on_ridge < 0.2
    assert gauss.covered == 0
