"""apd/networks.py and apd/torch_ops.py: flat layout, batched forward vs a naive loop."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from apd.networks import (
    ARCHITECTURES,
    MLPSpec,
    flatten,
    forward_logits,
    forward_probs,
    get_spec,
    unflatten,
)
from training import torch_ops

SPECS = [MLPSpec("a", (5, 3)), MLPSpec("b", (7, 6, 4)), MLPSpec("c", (9, 8, 5, 3))]


def _theta(spec: MLPSpec, k: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((k, spec.num_params)).astype(np.float32)


def _naive_logits(spec: MLPSpec, theta: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Reference: a Python loop over networks and layers, reading the layout by hand."""
    out = []
    for k in range(theta.shape[0]):
        h = x.astype(np.float64)
        pos = 0
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(spec.layer_sizes)):
            w = theta[k, pos : pos + fan_in * fan_out].reshape(fan_in, fan_out)
            pos += fan_in * fan_out
            b = theta[k, pos : pos + fan_out]
            pos += fan_out
            h = h @ w + b
            if i < spec.num_layers - 1:
                h = np.maximum(h, 0.0)
        assert pos == spec.num_params
        out.append(h)
    return np.stack(out)


def test_architectures() -> None:
    assert get_spec("fcnn1").layer_sizes == (784, 100, 10)
    assert get_spec("fcnn1").num_params == 784 * 100 + 100 + 100 * 10 + 10
    assert get_spec("fcnn2").num_params == 784 * 400 + 400 + 400 * 400 + 400 + 4010
    assert set(ARCHITECTURES) == {"fcnn1", "fcnn2"}
    with pytest.raises(ValueError, match="fcnn1, fcnn2"):
        get_spec("fcnn3")


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_flatten_unflatten_round_trip(spec: MLPSpec) -> None:
    theta = _theta(spec, 3)
    layers = unflatten(spec, theta)
    assert [(w.shape[1:], b.shape[1:]) for w, b in layers] == spec.layer_shapes
    np.testing.assert_array_equal(flatten(spec, layers), theta)
    torch_layers = torch_ops.unflatten(spec, torch.from_numpy(theta))
    for (w, b), (tw, tb) in zip(layers, torch_layers, strict=True):
        np.testing.assert_array_equal(w, tw.numpy())
        np.testing.assert_array_equal(b, tb.numpy())


def test_layout_is_weight_row_major_then_bias() -> None:
    spec = MLPSpec("t", (2, 3))
    theta = np.arange(spec.num_params, dtype=np.float32)[None]
    ((w, b),) = unflatten(spec, theta)
    np.testing.assert_array_equal(w[0], [[0, 1, 2], [3, 4, 5]])
    np.testing.assert_array_equal(b[0], [6, 7, 8])


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("n", [1, 4])
def test_numpy_forward_matches_naive_loop(spec: MLPSpec, n: int) -> None:
    theta = _theta(spec, 4)
    x = np.random.default_rng(1).random((n, spec.input_dim)).astype(np.float32)
    got = forward_logits(spec, theta, x)
    assert got.shape == (4, n, spec.num_classes) and got.dtype == np.float32
    np.testing.assert_allclose(got, _naive_logits(spec, theta, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("n", [1, 6])  # N = 1 takes NumPy's matrix-vector path
def test_torch_forward_matches_numpy(spec: MLPSpec, n: int) -> None:
    theta = _theta(spec, 5)
    x = np.random.default_rng(2).random((n, spec.input_dim)).astype(np.float32)
    got = torch_ops.forward_logits(spec, torch.from_numpy(theta), torch.from_numpy(x))
    np.testing.assert_allclose(got.numpy(), forward_logits(spec, theta, x), rtol=1e-5, atol=1e-5)


def test_torch_per_network_batches() -> None:
    spec = SPECS[2]
    theta = _theta(spec, 3)
    x = np.random.default_rng(3).random((3, 4, spec.input_dim)).astype(np.float32)
    got = torch_ops.forward_logits(spec, torch.from_numpy(theta), torch.from_numpy(x))
    for k in range(3):
        ref = _naive_logits(spec, theta[k : k + 1], x[k])[0]
        np.testing.assert_allclose(got[k].numpy(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", [1, 2])
def test_fcnn1_real_size_agreement(n: int) -> None:
    spec = get_spec("fcnn1")
    theta = (_theta(spec, 3) * 0.05).astype(np.float32)
    x = np.random.default_rng(4).random((n, 784)).astype(np.float32)
    ref = _naive_logits(spec, theta, x)
    np.testing.assert_allclose(forward_logits(spec, theta, x), ref, rtol=1e-4, atol=1e-4)
    got = torch_ops.forward_logits(spec, torch.from_numpy(theta), torch.from_numpy(x))
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-4, atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    k=st.integers(1, 3),
    n=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_forward_property(sizes: list[int], k: int, n: int, seed: int) -> None:
    spec = MLPSpec("h", tuple(sizes))
    theta = _theta(spec, k, seed)
    x = np.random.default_rng(seed + 1).standard_normal((n, spec.input_dim)).astype(np.float32)
    np.testing.assert_allclose(
        forward_logits(spec, theta, x), _naive_logits(spec, theta, x), rtol=1e-4, atol=1e-4
    )
    probs = forward_probs(spec, theta, x)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    assert (probs >= 0).all()


def test_bad_shapes_are_rejected() -> None:
    spec = SPECS[1]
    with pytest.raises(ValueError, match="theta"):
        forward_logits(
            spec, np.zeros((2, spec.num_params + 1), np.float32), np.zeros((1, 7), np.float32)
        )
    with pytest.raises(ValueError, match="inputs"):
        forward_logits(spec, _theta(spec, 1), np.zeros((1, 8), np.float32))
    with pytest.raises(ValueError, match="theta"):
        torch_ops.forward_logits(spec, torch.zeros(spec.num_params), torch.zeros(1, 7))


def test_torch_dropout_is_inverted_and_random() -> None:
    spec = MLPSpec("t", (4, 2000, 1))
    theta = torch.zeros(1, spec.num_params)
    (_, b), (w2, _) = torch_ops.unflatten(spec, theta)
    b.fill_(1.0)  # every hidden unit outputs relu(1) = 1
    w2.fill_(1.0)  # the output sums the hidden units
    x = torch.zeros(1, 4)
    assert torch_ops.forward_logits(spec, theta, x).item() == pytest.approx(2000.0)
    g = torch.Generator().manual_seed(0)
    outs = torch.stack([torch_ops.forward_logits(spec, theta, x, 0.5, g) for _ in range(50)])
    # kept units are scaled by 1/(1-p): the mean is preserved, each pass differs
    assert outs.mean().item() == pytest.approx(2000.0, rel=0.01)
    assert outs.std().item() > 10.0
    assert torch.all(outs.remainder(2.0) == 0)  # each kept unit contributes exactly 2
