"""Target networks as specs over flat parameter vectors, and the batched forward in NumPy.

A posterior sample is one flat vector ``theta`` of length ``spec.num_params``. The layout is
fixed and is part of the checkpoint contract: for each layer ``l`` in order, the weight
``W_l`` of shape ``(fan_in, fan_out)`` in row-major order, then the bias ``b_l`` of shape
``(fan_out,)``. A layer computes ``h @ W_l + b_l``; every layer but the last is followed by
the activation (ReLU), and the last produces logits.

The batched forward evaluates K networks on N inputs in one pass of batched matrix products
(no Python loop over networks): the input is broadcast to all K networks, which is what makes
serving many posterior samples cheap.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float32]


class Activation(enum.StrEnum):
    """Hidden-layer nonlinearity of a target network."""

    RELU = "relu"


@dataclass(frozen=True)
class MLPSpec:
    """A fully connected network: ``layer_sizes = (in, hidden..., out)``."""

    name: str
    layer_sizes: tuple[int, ...]
    activation: Activation = Activation.RELU

    def __post_init__(self) -> None:
        if len(self.layer_sizes) < 2 or any(int(s) <= 0 for s in self.layer_sizes):
            raise ValueError(f"layer_sizes must be >= 2 positive ints, got {self.layer_sizes}")

    @property
    def input_dim(self) -> int:
        return self.layer_sizes[0]

    @property
    def num_classes(self) -> int:
        return self.layer_sizes[-1]

    @property
    def num_layers(self) -> int:
        return len(self.layer_sizes) - 1

    @property
    def layer_shapes(self) -> list[tuple[tuple[int, int], tuple[int]]]:
        """``[((fan_in, fan_out), (fan_out,)), ...]`` for each layer."""
        pairs = zip(self.layer_sizes[:-1], self.layer_sizes[1:], strict=True)
        return [((i, o), (o,)) for i, o in pairs]

    @property
    def num_params(self) -> int:
        return sum(i * o + o for (i, o), _ in self.layer_shapes)

    def offsets(self) -> list[tuple[slice, slice]]:
        """Slices of the flat vector holding each layer's ``(W, b)``."""
        out: list[tuple[slice, slice]] = []
        start = 0
        for (i, o), _ in self.layer_shapes:
            w = slice(start, start + i * o)
            b = slice(w.stop, w.stop + o)
            out.append((w, b))
            start = b.stop
        return out

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "layer_sizes": list(self.layer_sizes),
            "activation": self.activation.value,
            "num_params": self.num_params,
        }


ARCHITECTURES: Final[dict[str, MLPSpec]] = {
    "fcnn1": MLPSpec("fcnn1", (784, 100, 10)),
    "fcnn2": MLPSpec("fcnn2", (784, 400, 400, 10)),
}


def get_spec(arch: str) -> MLPSpec:
    """The spec for an architecture name, or a ``ValueError`` naming the valid ones."""
    try:
        return ARCHITECTURES[arch]
    except KeyError:
        valid = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"unknown architecture {arch!r}; choose one of: {valid}") from None


def unflatten(spec: MLPSpec, theta: FloatArray) -> list[tuple[FloatArray, FloatArray]]:
    """Views of ``theta (K, P)`` as ``[(W (K, in, out), b (K, out)), ...]``. No copy."""
    if theta.ndim != 2 or theta.shape[1] != spec.num_params:
        raise ValueError(f"expected theta of shape (K, {spec.num_params}), got {theta.shape}")
    k = theta.shape[0]
    layers = []
    for ((fan_in, fan_out), _), (ws, bs) in zip(spec.layer_shapes, spec.offsets(), strict=True):
        layers.append((theta[:, ws].reshape(k, fan_in, fan_out), theta[:, bs]))
    return layers


def flatten(spec: MLPSpec, layers: list[tuple[FloatArray, FloatArray]]) -> FloatArray:
    """Inverse of :func:`unflatten`: ``[(W (K,in,out), b (K,out))] -> theta (K, P)``."""
    k = layers[0][0].shape[0]
    parts = []
    for (w, b), ((fan_in, fan_out), _) in zip(layers, spec.layer_shapes, strict=True):
        if w.shape != (k, fan_in, fan_out) or b.shape != (k, fan_out):
            raise ValueError(f"layer shapes {w.shape}, {b.shape} do not match the spec")
        parts += [w.reshape(k, -1), b]
    return np.concatenate(parts, axis=1)


def _first_layer(x: FloatArray, w: FloatArray, b: FloatArray) -> FloatArray:
    """``x (N, D)``, ``w (K, D, H)`` -> ``(K, N, H)``: the input broadcast over K networks.

    The weights are read once, in place (no transposed copy): at small N the pass is bound
    by reading K*D*H weights from memory, at large N it is K GEMMs of ``(N, D) @ (D, H)``.
    """
    return np.matmul(x[None], w) + b[:, None, :]


def _forward_one(layers: list[tuple[FloatArray, FloatArray]], x: FloatArray) -> FloatArray:
    """One input ``x (D,)`` through K networks -> ``(K, C)``: batched matrix-vector products.

    :func:`numpy.einsum` streams each ``(K, in, out)`` weight block once, where
    :func:`numpy.matmul` makes one BLAS call per network, each a poorly blocked 1-row GEMM:
    1.3-1.5x (fcNN1) and 1.9x (fcNN2) faster at N = 1, slower from N = 2 on (K = 100, one thread,
    warm or flushed caches; see docs/training.md).
    """
    w0, b0 = layers[0]
    return forward_hidden(layers[1:], np.einsum("d,kdh->kh", x, w0) + b0)


def forward_hidden(layers: list[tuple[FloatArray, FloatArray]], h: FloatArray) -> FloatArray:
    """The layers after the first: ``h`` holds K networks' first-layer pre-activations,
    ``(K, N, H)`` or ``(K, H)`` for one input; each layer is ReLU then ``h @ W_k + b_k``.
    Returns the logits. ``h`` is overwritten (the ReLU runs in place)."""
    for w, b in layers:
        np.maximum(h, 0.0, out=h)
        if h.ndim == 2:
            h = np.einsum("kd,kdh->kh", h, w) + b
        else:
            h = np.matmul(h, w) + b[:, None, :]
    return h


def forward_logits(spec: MLPSpec, theta: FloatArray, x: FloatArray) -> FloatArray:
    """Logits of K networks on N inputs: ``theta (K, P)``, ``x (N, D)`` -> ``(K, N, C)``."""
    if x.ndim != 2 or x.shape[1] != spec.input_dim:
        raise ValueError(f"expected inputs of shape (N, {spec.input_dim}), got {x.shape}")
    layers = unflatten(spec, theta)
    if x.shape[0] == 1:
        return _forward_one(layers, x[0].astype(theta.dtype, copy=False))[:, None, :]
    w0, b0 = layers[0]
    return forward_hidden(layers[1:], _first_layer(x.astype(theta.dtype, copy=False), w0, b0))


def softmax(logits: FloatArray, axis: int = -1) -> FloatArray:
    z = logits - logits.max(axis=axis, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=axis, keepdims=True)
    return z


def forward_probs(spec: MLPSpec, theta: FloatArray, x: FloatArray) -> FloatArray:
    """Softmax outputs of K networks on N inputs: ``(K, N, C)``."""
    return softmax(forward_logits(spec, theta, x))
