"""The laplace-torch peers: the SGD network as a torch module computes what the flat-vector
forward computes, and a Laplace fit on two moons draws member networks exactly as
laplace-torch's own sampling predictive does, with a marginal-likelihood prior precision
and the uncertainty one expects of it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apd.networks import CNNSpec, Conv2d, Dense, MaxPool2d, MLPSpec, NetworkSpec
from apd.uncertainty import summarize
from training import torch_ops
from training.evaluation.laplace_peer import (
    LaplaceFlavour,
    LaplacePosterior,
    fit_laplace,
    module_order,
    network_module,
)
from training.evaluation.methods import MemberNetworks

pytest.importorskip("laplace", reason="laplace-torch is in the eval extra")

MOONS = MLPSpec("moons", (2, 16, 2))
CNN = CNNSpec("tiny-cnn", (1, 8, 8), (Conv2d(3, 3, 1), MaxPool2d(2), Dense(5), Dense(4)))


@pytest.mark.parametrize("spec", [MLPSpec("mlp", (6, 5, 4, 3)), CNN], ids=lambda s: s.name)
def test_the_module_is_the_flat_network(spec: NetworkSpec) -> None:
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(spec.num_params, generator=g)
    x = torch.rand(7, spec.input_dim, generator=g)
    module = network_module(spec, theta)
    want = torch_ops.forward_logits(spec, theta[None], x)[0]
    torch.testing.assert_close(module(x), want, rtol=1e-5, atol=1e-5)
    flat = torch.nn.utils.parameters_to_vector(module.parameters())
    torch.testing.assert_close(flat, theta[torch.from_numpy(module_order(spec))])


@pytest.fixture(scope="module")
def moons() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Two moons (400 training points), an MLP fitted to them (MAP with weight decay), test
    points from the same distribution and points far from the data."""
    from sklearn.datasets import make_moons

    x, y = make_moons(400, noise=0.2, random_state=0)
    x = x.astype(np.float32)
    torch.manual_seed(0)
    net = network_module(MOONS, torch.randn(MOONS.num_params) * 0.5)
    opt = torch.optim.Adam(net.parameters(), lr=0.01, weight_decay=1e-4)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(1000):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xt), yt).backward()
        opt.step()
    theta = np.empty(MOONS.num_params, np.float32)
    flat = torch.nn.utils.parameters_to_vector(net.parameters()).detach().numpy()
    theta[module_order(MOONS)] = flat
    test_x, test_y = make_moons(1000, noise=0.2, random_state=1)
    far = (np.random.default_rng(0).normal(size=(500, 2)) + 10.0).astype(np.float32)
    return theta, x, y, test_x.astype(np.float32), test_y, far  # type: ignore[return-value]


def _nll(probs: np.ndarray, y: np.ndarray) -> float:
    mean = probs.mean(axis=0)
    return float(-np.log(mean[np.arange(len(y)), y]).mean())


@pytest.mark.parametrize("flavour", list(LaplaceFlavour))
def test_laplace_on_two_moons(moons: tuple[np.ndarray, ...], flavour: LaplaceFlavour) -> None:
    theta, x, y, test_x, test_y, far = moons
    fit = fit_laplace(MOONS, theta, x, y, flavour)
    assert isinstance(fit, LaplacePosterior) and fit.key == flavour.value
    k = 200
    members = fit.draw(k, seed=0)
    probs = members.probs(test_x)
    assert probs.shape == (k, len(test_x), 2)
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-5)

    # the members are laplace-torch's own sampling predictive (pred_type="nn"), same draws
    gen = torch.Generator().manual_seed(0)
    ref = fit.laplace.predictive_samples(
        torch.from_numpy(test_x), pred_type="nn", n_samples=k, generator=gen
    )
    np.testing.assert_allclose(probs, ref.numpy(), atol=1e-5)

    # which weights the approximation covers: the others stay at the MAP in every draw
    drawn = members.theta.numpy()
    varies = (drawn != drawn[0]).any(axis=0)
    last = MOONS.offsets()[-1]
    covered = np.zeros(MOONS.num_params, bool)
    covered[last[0]] = covered[last[1]] = True
    if flavour is LaplaceFlavour.LAST_LAYER:
        np.testing.assert_array_equal(varies, covered)
        np.testing.assert_array_equal(drawn[:, ~covered], np.tile(theta[~covered], (k, 1)))
    else:
        assert varies.all()

    # the prior precision maximises the marginal likelihood (locally, along its scale)
    la = fit.laplace
    prior = la.prior_precision.detach().clone()
    assert torch.isfinite(prior).all() and (prior > 0).all()
    best = float(la.log_marginal_likelihood(prior_precision=prior))
    for scale in (0.5, 2.0):
        assert float(la.log_marginal_likelihood(prior_precision=prior * scale)) < best

    # stored: the MAP, the Kronecker factors of the covered layers (input x input and
    # output x output for the weight, output x output for the bias) and the precisions
    sizes = [(2, 16), (16, 2)] if flavour is LaplaceFlavour.ALL_LAYERS else [(16, 2)]
    factors = sum(i * i + 2 * o * o for i, o in sizes)
    assert fit.stored_bytes() == 4 * (MOONS.num_params + factors + prior.numel())

    # calibration: more uncertain far from the data than on it, and than the MAP there
    map_net = MemberNetworks(MOONS, torch.from_numpy(theta[None]))
    on, off = summarize(probs), summarize(members.probs(far))
    assert off.mutual_information.mean() > on.mutual_information.mean()
    assert off.predictive_entropy.mean() > summarize(map_net.probs(far)).predictive_entropy.mean()
    map_probs = map_net.probs(test_x)
    accuracy = (probs.mean(axis=0).argmax(axis=1) == test_y).mean()
    assert accuracy >= (map_probs[0].argmax(axis=1) == test_y).mean() - 0.02
    if flavour is LaplaceFlavour.LAST_LAYER:
        assert _nll(probs, test_y) < _nll(map_probs, test_y) + 0.02
