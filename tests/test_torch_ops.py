"""training/torch_ops.py: member probabilities and the MC-Dropout forward, against the NumPy
reference forward (:func:`apd.networks.forward_probs`) and against
:func:`training.torch_ops.forward_logits` with the same dropout masks.

(The batched forward itself is checked against a naive loop in ``test_networks.py``.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apd.networks import MLPSpec, NetworkSpec, build_spec, forward_probs
from training import torch_ops

SPEC = MLPSpec("tiny", (6, 5, 3))  # P = 6*5 + 5 + 5*3 + 3 = 53
SPEC2 = MLPSpec("tiny2", (6, 5, 4, 3))
CNN = build_spec("cnn:conv3x3,pool2,fc5", (2, 6, 7), 3)  # dropout before both dense layers


def _inputs(spec: NetworkSpec, k: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=(k, spec.num_params)).astype(np.float32)
    return theta, rng.random((n, spec.input_dim), dtype=np.float32)


@pytest.mark.parametrize("spec", [SPEC, SPEC2, CNN], ids=lambda s: s.name)
@pytest.mark.parametrize("chunk", [7, 2000])
def test_member_probs_match_the_numpy_reference_forward(spec: NetworkSpec, chunk: int) -> None:
    theta, x = _inputs(spec, 7, 300, seed=0)
    want = forward_probs(spec, theta, x)
    # NumPy or torch inputs, read-only arrays included (they are copied, not refused)
    x.setflags(write=False)
    for th, xs in ((theta, x), (torch.from_numpy(theta), torch.from_numpy(x.copy()))):
        got = torch_ops.member_probs(spec, th, xs, chunk=chunk)
        assert got.dtype == torch.float32 and got.shape == (7, 300, spec.num_classes)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", [SPEC, SPEC2, CNN], ids=lambda s: s.name)
@pytest.mark.parametrize("passes", [1, 4])
def test_mc_dropout_draws_the_masks_of_forward_logits_on_the_repeated_network(
    spec: NetworkSpec, passes: int
) -> None:
    """The shared-first-layer MC-Dropout forward draws the same masks, in the same order,
    as :func:`training.torch_ops.forward_logits` on the network repeated ``passes`` times."""
    theta_np, x_np = _inputs(spec, 1, 20, seed=1)
    theta, x = torch.from_numpy(theta_np), torch.from_numpy(x_np)
    got = torch_ops.mc_dropout_logits(spec, theta, x, 0.5, passes, torch.Generator().manual_seed(5))
    ref = torch_ops.forward_logits(
        spec, theta.expand(passes, -1), x, dropout=0.5, generator=torch.Generator().manual_seed(5)
    )
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # member_probs in one chunk is its softmax, with masks from the same stream
    probs = torch_ops.member_probs(
        spec, theta, x, dropout=0.5, passes=passes, generator=torch.Generator().manual_seed(5)
    )
    torch.testing.assert_close(probs, torch.softmax(ref, -1), rtol=1e-5, atol=1e-6)


def test_dropout_passes_are_stochastic_and_seeded() -> None:
    theta, x = _inputs(SPEC, 1, 25, seed=2)
    mc = torch_ops.member_probs(
        SPEC, theta, x, dropout=0.5, passes=4, generator=torch.Generator().manual_seed(0), chunk=7
    )
    assert mc.shape == (4, 25, 3)
    assert not torch.allclose(mc[0], mc[1])
    torch.testing.assert_close(mc.sum(-1), torch.ones(4, 25))
    again = torch_ops.member_probs(
        SPEC, theta, x, dropout=0.5, passes=4, generator=torch.Generator().manual_seed(0), chunk=7
    )
    torch.testing.assert_close(again, mc, rtol=0, atol=0)


def test_member_probs_refuse_what_they_cannot_compute() -> None:
    theta, x = _inputs(SPEC, 2, 5, seed=3)
    with pytest.raises(ValueError, match="one network"):
        torch_ops.member_probs(SPEC, theta, x, dropout=0.5, passes=3)
    with pytest.raises(ValueError, match="only with dropout"):
        torch_ops.member_probs(SPEC, theta, x, passes=3)
    with pytest.raises(ValueError, match="dropout rate"):
        torch_ops.member_probs(SPEC, theta[:1], x, dropout=1.0)
    assert torch_ops.member_probs(SPEC, theta, x[:0]).shape == (2, 0, 3)


def test_cnn_member_probs_chunk_within_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CNN's default chunk keeps its widest layer for the K members within the budget."""
    theta, x = _inputs(CNN, 3, 50, seed=4)
    want = forward_probs(CNN, theta, x)
    monkeypatch.setattr(torch_ops, "CNN_CHUNK_BYTES", 4 * 3 * CNN.max_activations * 7)
    seen: list[int] = []
    forward = torch_ops.forward_logits

    def spy(spec: NetworkSpec, th: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        seen.append(xb.shape[0])
        return forward(spec, th, xb)

    monkeypatch.setattr(torch_ops, "forward_logits", spy)
    got = torch_ops.member_probs(CNN, theta, x)
    assert max(seen) == 7 and sum(seen) == 50
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("shape", "size"), [((3, 4, 28, 28), 2), ((2, 5, 11, 13), 3), ((2, 3, 7, 9), 2)]
)
def test_gradient_free_max_pool_equals_max_pool2d(shape: tuple[int, ...], size: int) -> None:
    """Without a gradient the pool is a maximum of strided views; with one, max_pool2d. Both
    give max_pool2d's values exactly, odd sizes (dropped trailing rows, columns) included."""
    h = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    h[0, 0, 0, :2] = 5.0  # a tie inside one window
    want = torch.nn.functional.max_pool2d(h, size)
    with torch.no_grad():
        assert torch.equal(torch_ops._max_pool(h, size), want)
    assert torch.equal(torch_ops._max_pool(h.requires_grad_(True), size), want)
