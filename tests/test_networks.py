"""apd/networks.py and training/torch_ops.py: flat layout, batched forward vs a naive loop
(MLPs) and vs an independent ``torch.nn`` network built per sample (CNNs)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from apd.networks import (
    ARCHITECTURES,
    CNNSpec,
    Conv2d,
    Dense,
    MaxPool2d,
    MLPSpec,
    NetworkSpec,
    build_spec,
    first_layer,
    flatten,
    forward_after_first,
    forward_logits,
    forward_probs,
    get_spec,
    spec_from_dict,
    tail_start,
    unflatten,
    unflatten_tail,
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
    assert set(ARCHITECTURES) == {"fcnn1", "fcnn2", "al-cnn", "lenet5"}
    with pytest.raises(ValueError, match="fcnn1, fcnn2"):
        get_spec("fcnn3")
    # the named MLPs are the mlp: spellings, fitted to the data
    assert build_spec("mlp:100", (28, 28), 10).layer_sizes == get_spec("fcnn1").layer_sizes
    assert build_spec("fcnn2", (30,), 3) == MLPSpec("fcnn2", (30, 400, 400, 3))
    al = get_spec("al-cnn")
    assert isinstance(al, CNNSpec) and al.output_shapes[-3:] == ((32, 12, 12), (128,), (10,))
    # conv 1x32x3x3 + 32, conv 32x32x3x3 + 32, fc 4608x128 + 128, fc 128x10 + 10
    assert al.num_params == 320 + 9248 + 4608 * 128 + 128 + 1290
    lenet = get_spec("lenet5")
    assert isinstance(lenet, CNNSpec)
    assert lenet.output_shapes == (
        (6, 28, 28),
        (6, 14, 14),
        (16, 10, 10),
        (16, 5, 5),
        (120,),
        (84,),
        (10,),
    )


@pytest.mark.parametrize(
    ("arch", "shape", "message"),
    [
        ("mlp:", (4,), "unknown architecture"),
        ("mlp:10,x", (4,), "mlp widths must be positive integers"),
        ("cnn:pool2,conv3x3", (8, 8), "a cnn starts with a conv layer"),
        ("cnn:conv3x3,relu", (8, 8), "bad layer 'relu'"),
        ("cnn:conv0x3", (8, 8), "must be positive"),
        ("al-cnn", (30,), "needs image inputs"),
        ("lenet5", (8, 8), "does not fit 1x8x8 inputs"),
        ("cnn:conv4x3,fc8,conv4x3", (8, 8), "cannot follow a dense layer"),
        ("cnn:conv4x3,pool9", (8, 8), "pool does not fit"),
    ],
)
def test_bad_architectures_are_named(arch: str, shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_spec(arch, shape, 3)


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


# --------------------------------------------------------------------------- CNNs

CNNS = [
    get_spec("al-cnn"),
    get_spec("lenet5"),
    build_spec("cnn:conv4x3p1,pool2,conv5x3,fc7", (3, 9, 11), 4),  # RGB, odd sizes, floor pool
    build_spec("cnn:conv3x2,conv2x3p2", (5, 6), 2),  # a conv right before the output
]


def _torch_reference(spec: CNNSpec, theta_k: np.ndarray) -> torch.nn.Sequential:
    """One network as plain ``torch.nn`` modules, its weights read from the documented layout
    by hand: conv ``(O, C, k, k)`` then bias, dense ``(fan_in, units)`` (``nn.Linear`` stores
    the transpose) then bias, the map flattened in (C, H, W) order."""
    mods: list[torch.nn.Module] = []
    pos, channels, flat = 0, spec.input_shape[0], False

    def take(n: int) -> torch.Tensor:
        nonlocal pos
        out = torch.from_numpy(theta_k[pos : pos + n].astype(np.float64))
        pos += n
        return out

    for i, layer in enumerate(spec.layers):
        if isinstance(layer, Conv2d):
            o, k = layer.out_channels, layer.kernel_size
            conv = torch.nn.Conv2d(channels, o, k, padding=layer.padding).double()
            conv.weight.data = take(o * channels * k * k).reshape(o, channels, k, k)
            conv.bias.data = take(o)
            mods += [conv, torch.nn.ReLU()]
            channels = o
        elif isinstance(layer, MaxPool2d):
            mods.append(torch.nn.MaxPool2d(layer.size))
        else:
            if not flat:
                mods.append(torch.nn.Flatten())
                flat = True
            fan_in = spec.layer_shapes[
                sum(1 for lay in spec.layers[:i] if not isinstance(lay, MaxPool2d))
            ][0][0]
            lin = torch.nn.Linear(fan_in, layer.units).double()
            lin.weight.data = take(fan_in * layer.units).reshape(fan_in, layer.units).T.contiguous()
            lin.bias.data = take(layer.units)
            mods.append(lin)
            if i < len(spec.layers) - 1:
                mods.append(torch.nn.ReLU())
    if not flat:
        mods.append(torch.nn.Flatten())
    assert pos == spec.num_params
    return torch.nn.Sequential(*mods)


def _reference_logits(spec: CNNSpec, theta: np.ndarray, x: np.ndarray) -> np.ndarray:
    xs = torch.from_numpy(x.astype(np.float64)).reshape(len(x), *spec.input_shape)
    with torch.no_grad():
        return np.stack([_torch_reference(spec, t)(xs).numpy() for t in theta])


def _small_theta(spec: NetworkSpec, k: int, seed: int = 0) -> np.ndarray:
    """He-scaled weights, so that logits stay O(1) through deep CNNs."""
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal((k, spec.num_params)).astype(np.float32)
    for fan_in, (ws, bs) in zip(spec.fan_ins(), spec.offsets(), strict=True):
        theta[:, ws] *= np.sqrt(2.0 / fan_in)
        theta[:, bs] *= 0.1
    return theta


@pytest.mark.parametrize("spec", CNNS, ids=lambda s: s.name)
@pytest.mark.parametrize("n", [1, 5])
def test_cnn_numpy_forward_matches_torch_nn(spec: CNNSpec, n: int) -> None:
    theta = _small_theta(spec, 3)
    x = np.random.default_rng(1).random((n, spec.input_dim), dtype=np.float32)
    got = forward_logits(spec, theta, x)
    assert got.shape == (3, n, spec.num_classes) and got.dtype == np.float32
    np.testing.assert_allclose(got, _reference_logits(spec, theta, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", CNNS, ids=lambda s: s.name)
def test_cnn_torch_forward_matches_numpy(spec: CNNSpec) -> None:
    theta = _small_theta(spec, 4)
    x = np.random.default_rng(2).random((6, spec.input_dim), dtype=np.float32)
    want = forward_logits(spec, theta, x)
    got = torch_ops.forward_logits(spec, torch.from_numpy(theta), torch.from_numpy(x))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    # a batch per network (SGLD chains): the grouped convolution
    xk = np.random.default_rng(3).random((4, 3, spec.input_dim), dtype=np.float32)
    got = torch_ops.forward_logits(spec, torch.from_numpy(theta), torch.from_numpy(xk))
    for k in range(4):
        ref = forward_logits(spec, theta[k : k + 1], xk[k])[0]
        np.testing.assert_allclose(got[k].numpy(), ref, rtol=1e-5, atol=1e-5)


def test_cnn_forward_in_network_chunks() -> None:
    """K networks through the reference forward in several chunks: the same numbers."""
    spec = get_spec("al-cnn")
    theta = _small_theta(spec, 5)
    x = np.random.default_rng(4).random((3, spec.input_dim), dtype=np.float32)
    import apd.networks as networks

    whole = forward_logits(spec, theta, x)
    budget = networks.CNN_CHUNK_BYTES
    try:
        networks.CNN_CHUNK_BYTES = 2 * 4 * 3 * spec.max_activations * 2  # type: ignore[misc]
        assert networks.network_chunk(spec, 3, networks.CNN_CHUNK_BYTES) == 2
        chunked = forward_logits(spec, theta, x)
    finally:
        networks.CNN_CHUNK_BYTES = budget  # type: ignore[misc]
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6)


def test_cnn_layout_and_first_layer_slice() -> None:
    """Conv weight (O, C, k, k) row-major, then bias, the first layer first: its weights are
    ``theta[:, :O C k k]``, a contiguous slice, as the factored forward needs."""
    spec = build_spec("cnn:conv2x2,fc3", (1, 3, 3), 2)
    assert isinstance(spec, CNNSpec)
    assert spec.layer_shapes == [((2, 1, 2, 2), (2,)), ((8, 3), (3,)), ((3, 2), (2,))]
    theta = np.arange(spec.num_params, dtype=np.float32)[None]
    (w, b), (w2, _), _ = unflatten(spec, theta)
    np.testing.assert_array_equal(w[0, 1, 0], [[4, 5], [6, 7]])
    np.testing.assert_array_equal(b[0], [8, 9])
    assert w2[0, 0, 0] == 10 and w2[0, 7, 2] == 10 + 7 * 3 + 2
    assert spec.offsets()[0] == (slice(0, 8), slice(8, 10)) and tail_start(spec) == 10
    np.testing.assert_array_equal(flatten(spec, unflatten(spec, theta)), theta)


@pytest.mark.parametrize("spec", [*CNNS, SPECS[2]], ids=lambda s: s.name)
def test_first_layer_then_tail_is_the_forward(spec: NetworkSpec) -> None:
    """The factored forward's pieces: the first layer on shared inputs, then the tail
    layers from the flat tails, give the whole forward."""
    theta = _small_theta(spec, 3)
    x = np.random.default_rng(5).random((4, spec.input_dim), dtype=np.float32)
    (w0, b0), *_ = unflatten(spec, theta)
    tails = np.ascontiguousarray(theta[:, tail_start(spec) :])
    h = first_layer(spec, x, w0, b0)
    got = forward_after_first(spec, unflatten_tail(spec, tails), h.copy())
    np.testing.assert_allclose(got, forward_logits(spec, theta, x), rtol=1e-6, atol=1e-6)
    # the first layer is linear in its weights: a sum of networks' pre-activations is the
    # pre-activation of the summed weights (what the factored forward's projection uses)
    both = first_layer(spec, x, w0[:1] + w0[1:2], b0[:1] + b0[1:2])
    np.testing.assert_allclose(both[0], h[0] + h[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", [*CNNS, *SPECS], ids=lambda s: s.name)
def test_spec_records_round_trip(spec: NetworkSpec) -> None:
    assert spec_from_dict(spec.to_dict()) == spec
    record = {**spec.to_dict(), "num_params": spec.num_params + 1}
    with pytest.raises(ValueError, match="num_params"):
        spec_from_dict(record)


def test_a_cnn_record_with_a_wrong_output_shape_is_refused() -> None:
    record = get_spec("al-cnn").to_dict()
    record["layers"][2]["output_shape"] = [32, 13, 13]  # type: ignore[index]
    with pytest.raises(ValueError, match=r"layer 2 \(pool2\) states output_shape"):
        spec_from_dict(record)


def test_cnn_spec_validation() -> None:
    with pytest.raises(ValueError, match="ends with a dense layer"):
        CNNSpec("x", (1, 8, 8), (Conv2d(2, 3), MaxPool2d(2)))
    with pytest.raises(ValueError, match="input_shape"):
        CNNSpec("x", (8, 8), (Conv2d(2, 3), Dense(2)))  # type: ignore[arg-type]


@settings(max_examples=20, deadline=None)
@given(
    channels=st.integers(1, 3),
    side=st.integers(4, 9),
    out=st.integers(1, 4),
    kernel=st.integers(1, 3),
    pad=st.integers(0, 1),
    pool=st.integers(1, 2),
    fc=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_cnn_forward_property(
    channels: int, side: int, out: int, kernel: int, pad: int, pool: int, fc: int, seed: int
) -> None:
    arch = f"cnn:conv{out}x{kernel}p{pad},pool{pool},conv2x1,fc{fc}"
    spec = build_spec(arch, (channels, side, side + 1), 3)
    assert isinstance(spec, CNNSpec)
    theta = _small_theta(spec, 2, seed)
    x = np.random.default_rng(seed + 1).standard_normal((3, spec.input_dim)).astype(np.float32)
    ref = _reference_logits(spec, theta, x)
    np.testing.assert_allclose(forward_logits(spec, theta, x), ref, rtol=1e-5, atol=1e-5)
    got = torch_ops.forward_logits(spec, torch.from_numpy(theta), torch.from_numpy(x))
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-5)
