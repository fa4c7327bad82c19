"""training/baselines.py: gradients, minibatches, SGD / MC-Dropout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from apd.networks import MLPSpec, get_spec
from training import sgld
from training.baselines import (
    ClassificationLikelihood,
    MinibatchStream,
    PointTrainSettings,
    init_theta,
    train_point_estimate,
)
from training.metrics import accuracy
from training.torch_ops import member_probs

pytestmark = pytest.mark.usefixtures("one_thread")


def _blobs(n: int, spec: MLPSpec, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable synthetic data: class c has mean ``2 e_c`` in the first C input dims."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, spec.num_classes, (n,), generator=g)
    x = 0.3 * torch.randn(n, spec.input_dim, generator=g)
    x[torch.arange(n), y] += 2.0
    return x, y


@pytest.mark.parametrize("layer_sizes", [(6, 5, 3), (6, 7, 5, 3)])
def test_hand_written_gradient_matches_autograd(layer_sizes: tuple[int, ...]) -> None:
    spec = MLPSpec("t", layer_sizes)
    x, y = _blobs(40, spec)
    lik = ClassificationLikelihood(spec, x.double(), y)
    theta = init_theta(spec, 3, torch.Generator().manual_seed(1)).double()
    idx = torch.randint(0, 40, (3, 8), generator=torch.Generator().manual_seed(2))
    ll, grad = lik.value_and_grad(theta, idx)
    ll_ref, grad_ref = sgld.loss_gradient(lik, theta, idx)
    torch.testing.assert_close(ll, ll_ref)
    torch.testing.assert_close(grad, grad_ref)


def test_log_likelihood_is_minibatch_mean_of_log_softmax() -> None:
    spec = MLPSpec("t", (6, 5, 3))
    x, y = _blobs(20, spec)
    lik = ClassificationLikelihood(spec, x, y)
    theta = init_theta(spec, 2, torch.Generator().manual_seed(0))
    idx = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    out = lik(theta, idx)
    for k in range(2):
        w1, b1 = theta[k, :30].reshape(6, 5), theta[k, 30:35]
        w2, b2 = theta[k, 35:50].reshape(5, 3), theta[k, 50:53]
        logits = torch.relu(x[idx[k]] @ w1 + b1) @ w2 + b2
        expected = -F.cross_entropy(logits, y[idx[k]])
        torch.testing.assert_close(out[k], expected)


def test_init_theta_bounds_and_independence() -> None:
    spec = get_spec("fcnn1")
    theta = init_theta(spec, 2, torch.Generator().manual_seed(0))
    (ws, _), (ws2, _) = spec.offsets()
    assert theta[:, ws].abs().max() <= 1 / math.sqrt(784)
    assert theta[:, ws2].abs().max() <= 1 / math.sqrt(100)
    assert theta[:, ws].std().item() == pytest.approx(1 / math.sqrt(784) / math.sqrt(3), rel=0.02)
    assert not torch.equal(theta[0], theta[1])


def test_cnn_init_and_likelihood_use_autograd() -> None:
    """A conv layer's init bound is 1/sqrt(C k k) (PyTorch's Conv2d default); a CNN's
    likelihood has no hand-written gradient, so SGLD differentiates it with autograd, and
    its value is the mean log-softmax of the right class."""
    spec = get_spec("al-cnn")
    theta = init_theta(spec, 2, torch.Generator().manual_seed(0))
    (w1, _), (w2, _), (w3, _), _ = spec.offsets()
    assert theta[:, w1].abs().max() <= 1 / 3  # C k k = 1 * 3 * 3
    assert theta[:, w2].abs().max() <= 1 / math.sqrt(32 * 9)
    assert theta[:, w3].abs().max() <= 1 / math.sqrt(4608)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(12, 784, generator=g), torch.randint(0, 10, (12,), generator=g)
    lik = ClassificationLikelihood(spec, x, y)
    assert lik.fast_gradient is None
    with pytest.raises(ValueError, match="MLPs"):
        lik.value_and_grad(theta, torch.zeros(2, 3, dtype=torch.int64))
    idx = torch.tensor([[0, 1, 2], [3, 4, 5]])
    ll, grad = sgld.loss_gradient(lik, theta, idx)
    assert grad.shape == theta.shape and torch.isfinite(grad).all()
    logp = torch.log_softmax(member_probs(spec, theta, x).log(), -1)
    for k in range(2):
        want = logp[k, idx[k], y[idx[k]]].mean()
        torch.testing.assert_close(ll[k], want, rtol=1e-4, atol=1e-5)
    assert ClassificationLikelihood(get_spec("fcnn1"), x, y).fast_gradient is not None


def test_minibatch_stream_walks_a_permutation_per_network() -> None:
    stream = MinibatchStream(50, 10, 3, torch.Generator().manual_seed(0))
    epoch = torch.cat([next(stream) for _ in range(5)], dim=1)
    assert epoch.shape == (3, 50)
    for k in range(3):
        assert sorted(epoch[k].tolist()) == list(range(50))
    assert not torch.equal(epoch[0], epoch[1])
    with pytest.raises(ValueError):
        MinibatchStream(5, 10, 1, torch.Generator())


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_point_estimate_learns_separable_data(dropout: float) -> None:
    spec = MLPSpec("t", (20, 16, 4))
    x, y = _blobs(400, spec)
    xt, yt = _blobs(200, spec, seed=1)
    settings = PointTrainSettings(lr=0.1, batch_size=20, epochs=5, dropout=dropout)
    theta = train_point_estimate(spec, x, y, settings, torch.Generator().manual_seed(0), False)
    assert theta.shape == (1, spec.num_params)
    acc = accuracy(member_probs(spec, theta, xt).mean(0).numpy(), yt)
    assert acc > 0.95
    # an untrained network is at chance
    theta0 = init_theta(spec, 1, torch.Generator().manual_seed(0))
    assert accuracy(member_probs(spec, theta0, xt).mean(0).numpy(), yt) < 0.6


def test_point_settings_validate() -> None:
    with pytest.raises(ValueError, match="step size"):
        PointTrainSettings(lr=-1.0)
    with pytest.raises(ValueError, match="dropout"):
        PointTrainSettings(dropout=1.0)


def test_divergence_is_reported() -> None:
    spec = MLPSpec("t", (20, 16, 4))
    x, y = _blobs(400, spec)
    settings = PointTrainSettings(lr=1e6, batch_size=20, epochs=30, momentum=0.0)
    with pytest.raises(FloatingPointError, match="lower the step size"):
        train_point_estimate(spec, x * 1e3, y, settings, torch.Generator().manual_seed(0), False)
