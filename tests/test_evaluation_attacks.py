"""FGSM and PGD raise the posterior predictive's loss and stay in the eps-ball and in [0, 1]."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apd.networks import MLPSpec, forward_probs
from training.evaluation.attacks import fgsm, pgd, predictive_nll
from training.evaluation.methods import MemberNetworks

SPEC = MLPSpec("tiny", (16, 12, 4))


def _members(seed: int, k: int = 5, dropout: float = 0.0) -> MemberNetworks:
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(1 if dropout else k, SPEC.num_params, generator=g) * 0.8
    return MemberNetworks(SPEC, theta, dropout=dropout, passes=k if dropout else 1)


def _data(seed: int, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.rand(n, SPEC.input_dim, generator=g)
    y = torch.randint(0, SPEC.num_classes, (n,), generator=g)
    return x, y


def test_predictive_nll_is_minus_log_of_the_mean_softmax() -> None:
    members = _members(0)
    x, y = _data(0)
    got = predictive_nll(members.logits(x), y).numpy()
    probs = forward_probs(SPEC, members.theta.numpy(), x.numpy()).astype(np.float64)
    expected = -np.log(probs.mean(axis=0)[np.arange(len(y)), y.numpy()])
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def _loss(members: MemberNetworks, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return predictive_nll(members.logits(x), y)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("eps", [0.02, 0.1])
def test_fgsm_raises_the_loss_within_the_ball(seed: int, eps: float) -> None:
    members = _members(seed)
    x, y = _data(seed)
    adv = fgsm(members.logits, x, y, eps)
    assert float((adv - x).abs().max()) <= eps + 1e-6
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    clean, attacked = _loss(members, x, y), _loss(members, adv, y)
    assert float(attacked.mean()) > float(clean.mean())
    # a first-order step up a smooth loss raises it for almost every input at small eps
    assert float((attacked > clean).float().mean()) >= 0.9


@pytest.mark.parametrize("seed", [0, 1])
def test_pgd_raises_the_loss_more_than_fgsm(seed: int) -> None:
    members = _members(seed)
    x, y = _data(seed)
    eps = 0.1
    g = torch.Generator().manual_seed(seed)
    adv = pgd(members.logits, x, y, eps, steps=20, generator=g)
    assert float((adv - x).abs().max()) <= eps + 1e-6
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    clean = _loss(members, x, y)
    one_step = _loss(members, fgsm(members.logits, x, y, eps), y)
    many = _loss(members, adv, y)
    assert float(many.mean()) > float(clean.mean())
    assert float(many.mean()) >= float(one_step.mean()) - 1e-6


def test_pgd_against_mc_dropout_raises_the_expected_loss() -> None:
    members = _members(3, k=50, dropout=0.5)
    x, y = _data(3)
    adv = pgd(members.logits, x, y, 0.1, steps=10, generator=torch.Generator().manual_seed(0))
    g_clean, g_adv = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    with torch.no_grad():
        clean = predictive_nll(members.logits(x, g_clean), y)
        attacked = predictive_nll(members.logits(adv, g_adv), y)
    assert float(attacked.mean()) > float(clean.mean())


def test_zero_eps_is_the_identity_and_bad_arguments_raise() -> None:
    members = _members(0)
    x, y = _data(0)
    torch.testing.assert_close(fgsm(members.logits, x, y, 0.0), x)
    torch.testing.assert_close(pgd(members.logits, x, y, 0.0, steps=3), x)
    with pytest.raises(ValueError):
        fgsm(members.logits, x, y, -0.1)
    with pytest.raises(ValueError):
        pgd(members.logits, x, y, 0.1, steps=0)
    with pytest.raises(ValueError):
        fgsm(members.logits, x, y[:-1], 0.1)
