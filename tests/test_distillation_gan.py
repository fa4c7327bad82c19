"""WGAN-GP pieces against closed forms, and the generator's checkpoint folding."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from training.distillation.gan import (
    WGANGP,
    Critic,
    Generator,
    WGANGPConfig,
    critic_loss,
    fit_to_moments,
    generator_loss,
    gradient_penalty,
    restandardise,
)


class _Linear(nn.Module):
    """``D(x) = a . x + b``: its gradient is ``a`` everywhere."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.a + 1.5


class _Quadratic(nn.Module):
    """``D(x) = ||x||^2 / 2``: its gradient at ``x`` is ``x``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (x**2).sum(dim=1)


def test_gradient_penalty_of_a_linear_critic() -> None:
    a = torch.tensor([3.0, 4.0])  # ||a|| = 5, penalty (5 - 1)^2 = 16 wherever we look
    real, fake = torch.randn(10, 2), torch.randn(10, 2)
    gp = gradient_penalty(_Linear(a), real, fake)
    assert float(gp.detach()) == pytest.approx(16.0, rel=1e-6)


def test_gradient_penalty_at_the_interpolates() -> None:
    real, fake = torch.randn(64, 3), torch.randn(64, 3) + 2.0
    gp = gradient_penalty(_Quadratic(), real, fake, torch.Generator().manual_seed(7))
    alpha = torch.rand(64, 1, generator=torch.Generator().manual_seed(7))
    xh = real + alpha * (fake - real)
    expected = ((xh.norm(dim=1) - 1.0) ** 2).mean()
    assert float(gp.detach()) == pytest.approx(float(expected), rel=1e-6)


def test_critic_loss_is_the_negative_wasserstein_estimate_plus_penalty() -> None:
    critic = _Linear(torch.tensor([1.0, 0.0]))  # ||a|| = 1: zero penalty
    real = torch.tensor([[2.0, 0.0], [4.0, 1.0]])
    fake = torch.tensor([[0.0, 0.0], [1.0, 5.0]])
    loss = critic_loss(critic, real, fake, gp_weight=10.0)
    assert float(loss.wasserstein.detach()) == pytest.approx(3.0 - 0.5)
    assert float(loss.penalty.detach()) == pytest.approx(0.0, abs=1e-12)
    assert float(loss.total.detach()) == pytest.approx(-2.5)
    assert float(generator_loss(critic, fake).detach()) == pytest.approx(-(0.5 + 1.5))
    # The penalty is differentiable in the critic's parameters (double backprop).
    loss2 = critic_loss(_Linear(torch.tensor([3.0, 4.0])), real, fake, gp_weight=10.0)
    loss2.total.backward()


def test_generator_folds_standardisation_into_its_last_layer() -> None:
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(20, 4))[0].T  # (4, 20)
    gen = Generator(
        3,
        (8, 8),
        4,
        basis=basis,
        mean=torch.randn(20),
        residual_std=torch.rand(20),
        scale=torch.tensor([5.0, 2.0, 1.0, 0.1]),
        shift=torch.tensor([1.0, -1.0, 0.0, 0.5]),
    )
    t = gen.checkpoint_tensors()
    z, eps = torch.randn(6, 3), torch.randn(6, 20)
    h = z.numpy()
    for i in range(3):
        h = h @ t[f"generator.layers.{i}.weight"] + t[f"generator.layers.{i}.bias"]
        h = np.maximum(h, 0) if i < 2 else h
    theta = (
        h @ t["generator.basis"] + t["generator.mean"] + t["generator.residual_std"] * eps.numpy()
    )
    with torch.no_grad():
        np.testing.assert_allclose(theta, gen.weights(z, eps).numpy(), rtol=1e-5, atol=1e-5)


def _w1(x: torch.Tensor, y: torch.Tensor) -> float:
    """Sum over coordinates of the 1-D Wasserstein-1 distance between equal-size samples."""
    return sum(
        float((x[:, j].sort().values - y[:, j].sort().values).abs().mean())
        for j in range(x.shape[1])
    )


@pytest.mark.slow
def test_wgan_gp_moves_the_generator_towards_the_data(one_thread: None) -> None:
    """A statistical check of the whole update (critic and generator steps, penalty,
    weight average): 500 steps bring the generated distribution from far away to near a
    Gaussian target. With a sign error in either loss it would move away instead."""
    torch.manual_seed(0)
    rng = torch.Generator().manual_seed(0)
    mu, sd = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.5])
    cfg = WGANGPConfig(
        noise_dim=2,
        generator_hidden=(32,),
        critic_hidden=(32, 32),
        lr=2e-3,
        lr_end_fraction=0.1,
        ema_decay=0.98,
    )
    gan = WGANGP(Generator(2, (32,), 2), Critic(2, (32, 32)), cfg, 500, rng)
    target = mu + sd * torch.randn(4000, 2, generator=torch.Generator().manual_seed(9))
    start = _w1(gan.output.sample(4000, torch.Generator().manual_seed(1)), target)
    for _ in range(500):
        gan.step(lambda n: (mu + sd * torch.randn(n, 2, generator=rng), None))
    x = gan.output.sample(4000, torch.Generator().manual_seed(1))
    assert start > 2.5
    assert _w1(x, target) < 0.35 * start
    np.testing.assert_allclose(x.mean(0).numpy(), mu.numpy(), atol=0.5)


def test_component_selection_is_an_exact_one_hot_with_the_right_shares() -> None:
    weights = [0.5, 0.2, 0.2, 0.1]
    gen = Generator(4, (8,), 3, component_weights=weights)
    z = torch.randn(200_000, 4, generator=torch.Generator().manual_seed(0))
    u = gen.code(z)
    onehot, rest = u[:, :4], u[:, 4:]
    assert torch.equal(rest, z[:, 1:])
    assert torch.all((onehot == 0) | (onehot == 1))
    assert torch.all(onehot.sum(dim=1) == 1)
    k = onehot.argmax(dim=1)
    assert torch.equal(k, gen.component_of(z))
    shares = torch.bincount(k, minlength=4).double() / len(k)
    np.testing.assert_allclose(shares.numpy(), weights, atol=0.004)  # ~4 binomial sds
    # The trained MLP sees the one-hot: conditional() on the same inputs agrees with forward.
    with torch.no_grad():
        torch.testing.assert_close(gen(z[:100]), gen.conditional(onehot[:100], rest[:100]))


@pytest.mark.parametrize("weights", [None, [0.25, 0.75]])
def test_fit_to_moments_starts_each_component_at_its_gaussian(
    one_thread: None, weights: list[float] | None
) -> None:
    """After the regression, the generator's draws of component k have the mean and the
    standard deviation of component k's rows (NumPy's, per coordinate): the first two
    coordinates vary with the noise, the third (beyond the noise's two) is the mean alone."""
    data_rng = np.random.default_rng(0)
    mus = np.array([[3.0, -2.0, 1.0], [-4.0, 5.0, 0.5]])
    sds = np.array([[0.5, 2.0, 1.0], [1.5, 0.3, 0.7]])
    k = 1 if weights is None else 2
    labels = np.repeat(np.arange(k), 400)
    data = mus[labels] + sds[labels] * data_rng.standard_normal((len(labels), 3))
    noise_dim = 2 if k == 1 else 3  # two continuous coordinates either way
    gen = Generator(noise_dim, (64, 64), 3, component_weights=weights)
    rng = torch.Generator().manual_seed(0)
    lab = None if k == 1 else torch.from_numpy(labels)
    fit_to_moments(gen, torch.from_numpy(data).float(), lab, 1500, rng, lr=3e-3)
    z = torch.randn(40_000, noise_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = gen(z).numpy()
    comp = gen.component_of(z).numpy()
    for c in range(k):
        rows = data[labels == c]
        got = out[comp == c]
        np.testing.assert_allclose(got.mean(axis=0), rows.mean(axis=0), atol=0.1)
        np.testing.assert_allclose(
            got[:, :2].std(axis=0), rows[:, :2].std(axis=0, ddof=1), rtol=0.1
        )
        assert got[:, 2].std() < 0.1 * rows[:, 2].std()


def test_fit_to_moments_refuses_labels_outside_the_components() -> None:
    gen = Generator(3, (8,), 2, component_weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="labels must lie in"):
        fit_to_moments(gen, torch.zeros(4, 2), torch.tensor([0, 1, 2, 0]), 1, torch.Generator())


def test_restandardise_changes_variables_without_changing_the_gan() -> None:
    """After a new standardisation the generator draws the same networks for the same noise,
    its weight average too, and the critic scores each drawn network as before."""
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(12, 3))[0].T
    gen = Generator(
        4,
        (16,),
        3,
        basis=basis,
        mean=torch.randn(12),
        scale=torch.rand(3) + 0.5,
        shift=torch.randn(3),
        component_weights=[0.5, 0.5],
    )
    avg = copy.deepcopy(gen)
    with torch.no_grad():
        for p in avg.net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    critic = Critic(3, (16,), condition_dim=2)
    z = torch.randn(50, 4)
    onehot = torch.nn.functional.one_hot(gen.component_of(z), 2).float()
    with torch.no_grad():
        before = [g.weights(z) for g in (gen, avg)]
        score = critic(gen(z), onehot)
    restandardise([gen, avg], critic, torch.tensor([2.0, 0.3, 5.0]), torch.tensor([1.0, -4.0, 0.0]))
    with torch.no_grad():
        for g, w in zip((gen, avg), before, strict=True):
            torch.testing.assert_close(g.weights(z), w, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(critic(gen(z), onehot), score, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gen.scale, torch.tensor([2.0, 0.3, 5.0]))
