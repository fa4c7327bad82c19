"""apd/factored.py: the factored forward over codes agrees with the materialised reference.

The reference is the contract's generator (:meth:`Checkpoint.generate`, networks as P weights)
followed by :func:`apd.networks.forward_probs` and :func:`apd.uncertainty.summarize`, over
fcNN1- and fcNN2-shaped targets, the default (subspace) and the paper's design, both first-layer
paths, one input and many, and chunkings down to one network at a time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from apd.checkpoint import Checkpoint, load_checkpoint
from apd.factored import FORMING_COST, AffinePosterior, FirstLayer, ForwardPlan
from apd.networks import MLPSpec, forward_probs, tail_start
from apd.uncertainty import PredictiveAccumulator, PredictiveSummary, summarize
from tests.service_support import make_checkpoint, random_images, weight_noise_matching

FIELDS = ("probabilities", "predictive_entropy", "expected_entropy", "mutual_information")

SHAPES = {
    "fcnn1": ((784, 100, 10), (24,)),
    "fcnn2": ((784, 400, 400, 10), (24, 32)),
}


@pytest.fixture(scope="module", params=[(a, d) for a in SHAPES for d in ("subspace", "paper")])
def ckpt(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    arch, design = request.param
    sizes, hidden = SHAPES[arch]
    path = tmp_path_factory.mktemp(f"{arch}-{design}") / "model.safetensors"
    return load_checkpoint(
        make_checkpoint(path, design=design, sizes=sizes, hidden=hidden, rank=12, arch=arch)
    )


def reference(
    ckpt: Checkpoint, z: NDArray[np.float32], x: NDArray[np.float32]
) -> PredictiveSummary:
    return summarize(forward_probs(ckpt.spec, ckpt.generate(z), x))


def assert_agree(got: PredictiveSummary, want: PredictiveSummary) -> None:
    """1e-5 relative; entropies (nats) of float32 softmax outputs carry ~1e-7 absolute rounding,
    which is all that a mutual information near 0 (K = 1, or agreeing networks) holds."""
    np.testing.assert_allclose(got.probabilities, want.probabilities, rtol=1e-5, atol=1e-7)
    for name in FIELDS[1:]:
        np.testing.assert_allclose(
            getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-6, err_msg=name
        )
    np.testing.assert_allclose(got.model_variance, want.model_variance, rtol=1e-4, atol=1e-9)
    assert np.array_equal(got.labels, want.labels)


def test_codes_and_the_affine_map_are_the_generator(ckpt: Checkpoint) -> None:
    z = np.random.default_rng(0).standard_normal((7, ckpt.noise_dim), dtype=np.float32)
    offset, directions = ckpt.affine
    theta = ckpt.codes(z) @ directions + offset
    assert ckpt.codes(z).shape == (7, ckpt.code_dim)
    np.testing.assert_allclose(theta, ckpt.generate(z), rtol=1e-6, atol=1e-6)
    # Written out from the tensors, independently of codes(): the MLP and its affine tail.
    h = z
    layers = ckpt.generator_layers()
    for i, (w, b) in enumerate(layers):
        h = h @ w + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0)
    if ckpt.meta.generator.has_basis:
        h = h @ ckpt.tensors["generator.basis"] + ckpt.tensors["generator.mean"]
    np.testing.assert_allclose(ckpt.generate(z), h, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [1, 5, 64])
@pytest.mark.parametrize("k", [1, 10, 57])
def test_factored_forward_agrees_with_the_materialised_reference(
    ckpt: Checkpoint, k: int, n: int
) -> None:
    rng = np.random.default_rng(k * 100 + n)
    z = rng.standard_normal((k, ckpt.noise_dim), dtype=np.float32)
    x = random_images(n, seed=n)
    posterior = AffinePosterior(ckpt.spec, *ckpt.affine)
    codes = ckpt.codes(z)
    want = reference(ckpt, z, x)
    assert_agree(posterior.summarize(codes, x), want)
    assert_agree(posterior.summarize(codes, x, tails=posterior.tails(codes)), want)


@pytest.mark.parametrize("path", list(FirstLayer))
def test_both_first_layer_paths_and_any_chunking_agree(ckpt: Checkpoint, path: FirstLayer) -> None:
    rng = np.random.default_rng(1)
    z = rng.standard_normal((23, ckpt.noise_dim), dtype=np.float32)
    x = random_images(6, seed=3)
    posterior = AffinePosterior(ckpt.spec, *ckpt.affine)
    codes = ckpt.codes(z)
    u = posterior.project(x)
    want = reference(ckpt, z, x)
    for chunk in (1, 4, 23):
        plan = ForwardPlan(path, chunk, 23, 6)
        acc = PredictiveAccumulator()
        for start in range(0, 23, chunk):
            probs = posterior.member_probs(codes[start : start + chunk], x, plan, u)
            acc.add(probs.transpose(0, 2, 1))
        assert_agree(acc.summary(), want)


def test_segments_are_one_posterior(ckpt: Checkpoint) -> None:
    z = np.random.default_rng(2).standard_normal((30, ckpt.noise_dim), dtype=np.float32)
    x = random_images(4, seed=4)
    posterior = AffinePosterior(ckpt.spec, *ckpt.affine)
    codes = ckpt.codes(z)
    parts = [(codes[:10], posterior.tails(codes[:10])), (codes[10:], None)]
    assert_agree(posterior.summarize_segments(parts, x), reference(ckpt, z, x))


def test_plan_picks_the_cheaper_first_layer_and_bounds_the_chunk() -> None:
    from apd.networks import ARCHITECTURES

    spec = ARCHITECTURES["fcnn1"]
    r = 46
    posterior = AffinePosterior(
        spec, np.zeros(spec.num_params, np.float32), np.zeros((r, spec.num_params), np.float32)
    )
    # One input: projecting onto r+1 directions beats forming even two first layers.
    assert posterior.plan(2, 1).first_layer is FirstLayer.FACTORED
    # A batch and few networks: forming them is cheaper. Crossover where the counts meet:
    # (r+1) N D H + K (r+1) N H = K (r D H FORMING_COST + N D H).
    assert posterior.plan(10, 64).first_layer is FirstLayer.MATERIALISED
    assert posterior.plan(100, 64).first_layer is FirstLayer.FACTORED
    crossover = next(k for k in range(1, 200) if posterior.plan(k, 64).first_layer == "factored")
    d, h = 784, 100
    expected = (r + 1) * 64 * d * h / (r * d * h * FORMING_COST + 64 * d * h - (r + 1) * 64 * h)
    assert abs(crossover - expected) <= 1
    plan = posterior.plan(1000, 256)
    per_network = 256 * (100 + 10) + 1010
    assert plan.chunk * per_network * 4 <= posterior.chunk_bytes


def test_accumulated_chunks_equal_one_summary() -> None:
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((40, 7, 5)) * 3
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    acc = PredictiveAccumulator()
    for start in range(0, 40, 9):
        acc.add(p[start : start + 9])
    got, want = acc.summary(), summarize(p)
    for name in (*FIELDS, "model_variance"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-12, atol=1e-15)
    # And the variance is the textbook one, computed independently.
    np.testing.assert_allclose(want.model_variance, p.var(axis=0).mean(axis=1), rtol=1e-12)


def test_the_shipped_checkpoint_is_served_as_it_generates() -> None:
    """The shipped fcNN1 adds residual noise: each input's answer from a network's code is
    what its weights give that input (:func:`weight_noise_matching`)."""
    path = Path(__file__).resolve().parents[1] / "models" / "mnist-fcnn1" / "model.safetensors"
    ckpt = load_checkpoint(path)
    spec, std = ckpt.spec, ckpt.residual_std
    assert isinstance(spec, MLPSpec) and std is not None and ckpt.code_dim == 89
    posterior = AffinePosterior(spec, *ckpt.affine, residual_std=std)
    rng = np.random.default_rng(6)
    z = rng.standard_normal((30, ckpt.noise_dim), dtype=np.float32)
    residual = rng.standard_normal((30, posterior.residual_dim), dtype=np.float32)
    x = random_images(4, seed=6)
    got = posterior.member_probs(posterior.codes(ckpt.codes(z), residual), x, posterior.plan(30, 4))
    for i in range(len(x)):
        eps = weight_noise_matching(spec, std, residual, x[i])
        want = forward_probs(spec, ckpt.generate(z, eps), x[i : i + 1])[:, 0]
        np.testing.assert_allclose(got[:, :, i], want, rtol=1e-4, atol=1e-6)


def test_bad_shapes_are_refused(ckpt: Checkpoint) -> None:
    posterior = AffinePosterior(ckpt.spec, *ckpt.affine)
    x = random_images(2)
    with pytest.raises(ValueError, match="codes"):
        posterior.summarize(np.zeros((3, ckpt.code_dim + 1), np.float32), x)
    with pytest.raises(ValueError, match="inputs"):
        posterior.summarize(np.zeros((3, ckpt.code_dim), np.float32), x[:, :10])
    with pytest.raises(ValueError, match="tails"):
        posterior.summarize(
            np.zeros((3, ckpt.code_dim), np.float32), x, tails=np.zeros((3, 2), np.float32)
        )
    with pytest.raises(ValueError, match="subspace codes"):
        posterior.codes(np.zeros((3, ckpt.code_dim + 1), np.float32))
    with pytest.raises(ValueError, match="no residual noise"):
        posterior.codes(np.zeros((3, ckpt.code_dim), np.float32), np.zeros((3, 4), np.float32))
    plain = np.ones((3, ckpt.code_dim), np.float32)
    assert posterior.codes(plain, np.zeros((3, 0), np.float32)) is plain


@pytest.fixture(scope="module", params=list(SHAPES))
def residual_ckpt(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Checkpoint:
    sizes, hidden = SHAPES[request.param]
    path = tmp_path_factory.mktemp(f"{request.param}-residual") / "model.safetensors"
    return load_checkpoint(
        make_checkpoint(path, sizes=sizes, hidden=hidden, rank=12, residual=True)
    )


@pytest.mark.parametrize("path", list(FirstLayer))
@pytest.mark.parametrize("chunk", [1, 7, 23])
def test_residual_networks_answer_each_input_as_their_weights_would(
    residual_ckpt: Checkpoint, path: FirstLayer, chunk: int
) -> None:
    """With residual noise a network is its code ``(c, xi, eps_tail)``. On each input it gives
    exactly what a weight-space network ``offset + c @ directions + residual_std * eps`` gives,
    for the eps that :func:`weight_noise_matching` builds from the definitions; that is the
    local reparameterisation, exact per input."""
    ckpt = residual_ckpt
    spec, std = ckpt.spec, ckpt.residual_std
    assert isinstance(spec, MLPSpec) and std is not None
    posterior = AffinePosterior(spec, *ckpt.affine, residual_std=std)
    h1 = spec.layer_sizes[1]
    assert posterior.residual_dim == h1 + spec.num_params - tail_start(spec)
    assert posterior.code_dim == ckpt.code_dim + posterior.residual_dim
    with pytest.raises(ValueError, match="residual noise of shape"):
        posterior.codes(np.zeros((3, ckpt.code_dim), np.float32))
    rng = np.random.default_rng(chunk)
    k, n = 23, 5
    z = rng.standard_normal((k, ckpt.noise_dim), dtype=np.float32)
    residual = rng.standard_normal((k, posterior.residual_dim), dtype=np.float32)
    codes = posterior.codes(ckpt.codes(z), residual)
    x = random_images(n, seed=chunk)
    plan = ForwardPlan(path, chunk, k, n)
    u = posterior.project(x) if path is FirstLayer.FACTORED else None
    got = np.concatenate(
        [posterior.member_probs(codes[s : s + chunk], x, plan, u) for s in range(0, k, chunk)]
    )  # (k, C, N)
    for i in range(n):
        eps = weight_noise_matching(spec, std, residual, x[i])
        want = forward_probs(spec, ckpt.generate(z, eps), x[i : i + 1])[:, 0]
        np.testing.assert_allclose(got[:, :, i], want, rtol=1e-4, atol=1e-6)
    tails = posterior.tails(codes)
    assert_agree(posterior.summarize(codes, x, tails=tails), posterior.summarize(codes, x))


def test_residual_networks_have_the_weight_space_predictive(tmp_path: Path) -> None:
    """In distribution as well, against independent weight-space draws: the mean
    probabilities of 4,000 networks of each kind agree within the Monte Carlo error."""
    ckpt = load_checkpoint(make_checkpoint(tmp_path / "m.safetensors", residual=True))
    std = ckpt.residual_std
    assert std is not None
    posterior = AffinePosterior(ckpt.spec, *ckpt.affine, residual_std=std)
    rng = np.random.default_rng(0)
    k = 4000
    x = random_images(4, seed=1)
    z = rng.standard_normal((k, ckpt.noise_dim), dtype=np.float32)
    codes = posterior.codes(
        ckpt.codes(z), rng.standard_normal((k, posterior.residual_dim), dtype=np.float32)
    )
    local = posterior.member_probs(codes, x, posterior.plan(k, 4)).transpose(0, 2, 1)
    z2 = rng.standard_normal((k, ckpt.noise_dim), dtype=np.float32)
    eps = rng.standard_normal((k, ckpt.num_params), dtype=np.float32)
    weights = forward_probs(ckpt.spec, ckpt.generate(z2, eps), x)
    se = np.sqrt(local.var(axis=0) / k + weights.var(axis=0) / k)
    assert (np.abs(local.mean(axis=0) - weights.mean(axis=0)) <= 5 * se + 1e-6).all()


def test_residual_noise_of_a_cnn_is_refused() -> None:
    from apd.networks import get_spec

    spec = get_spec("al-cnn")
    p = spec.num_params
    zeros = np.zeros(p, np.float32)
    with pytest.raises(ValueError, match="MLPs only"):
        AffinePosterior(spec, zeros, np.zeros((4, p), np.float32), residual_std=zeros)


CNNS = {
    "al-cnn-like": "cnn:conv8x3,conv8x3,pool2,fc16",
    "lenet-like": "cnn:conv4x5p2,pool2,conv6x5,pool2,fc12,fc10",
}


@pytest.mark.parametrize("arch", list(CNNS.values()), ids=list(CNNS))
@pytest.mark.parametrize("path", list(FirstLayer))
@pytest.mark.parametrize("n", [1, 5])
def test_cnn_networks_from_codes_agree_with_the_reference(
    arch: str, path: FirstLayer, n: int
) -> None:
    """A conv is linear in its weights too: the factored first conv (the inputs' patches
    through every direction's filters) and the materialised one both give what the
    reference forward of the generated weights gives."""
    from apd.networks import build_spec

    spec = build_spec(arch, (1, 14, 14), 10)
    rng = np.random.default_rng(7)
    p, r, k = spec.num_params, 6, 9
    scale = np.concatenate(
        [
            np.full(w.stop - w.start, 1 / np.sqrt(f)).tolist() + [0.1] * (b.stop - b.start)
            for (w, b), f in zip(spec.offsets(), spec.fan_ins(), strict=True)
        ]
    ).astype(np.float32)
    offset = (rng.standard_normal(p) * scale).astype(np.float32)
    directions = (rng.standard_normal((r, p)) * scale / np.sqrt(r)).astype(np.float32)
    codes = rng.standard_normal((k, r)).astype(np.float32)
    x = rng.random((n, spec.input_dim), dtype=np.float32)
    want = summarize(forward_probs(spec, codes @ directions + offset, x))
    posterior = AffinePosterior(spec, offset, directions)
    plan = ForwardPlan(path, 4, k, n)
    acc = PredictiveAccumulator()
    for start in range(0, k, 4):
        acc.add(posterior.member_probs(codes[start : start + 4], x, plan).transpose(0, 2, 1))
    assert_agree(acc.summary(), want)
    assert_agree(posterior.summarize(codes, x), want)


def test_a_cnn_takes_the_materialised_first_layer() -> None:
    """3x3 filters on one channel take 9 multiply-adds per output; the contraction over r+1
    directions takes r+1: forming the first layer is cheaper for any K."""
    from apd.networks import get_spec

    spec = get_spec("al-cnn")
    p = spec.num_params
    posterior = AffinePosterior(spec, np.zeros(p, np.float32), np.zeros((46, p), np.float32))
    for k, n in ((1, 1), (100, 1), (1000, 64)):
        assert posterior.plan(k, n).first_layer is FirstLayer.MATERIALISED
