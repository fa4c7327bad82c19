"""The batched forward of :mod:`apd.networks` in PyTorch (differentiable, CPU or GPU).

Imported by training (SGLD chains are K networks trained at once) and evaluation. Same flat
layout and maths as the NumPy version (tests check they agree to 1e-5); K CNNs run as one
grouped convolution (``groups = K``), K MLPs as batched GEMMs.

:func:`member_probs` is the one per-network softmax of the training side: the ``(K, N, C)``
member probabilities that every predictive, metric and uncertainty score is computed from.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from apd.networks import CNNSpec, Conv2d, MaxPool2d, MLPSpec, NetworkSpec


def compose_weights(
    h: torch.Tensor,
    basis: torch.Tensor | None,
    mean: torch.Tensor | None,
    residual_std: torch.Tensor | None,
    eps: torch.Tensor | None,
) -> torch.Tensor:
    """A generator's weights from its MLP output ``h``: ``mean + h @ basis + residual_std *
    eps``, each part skipped when the checkpoint has none (see :mod:`apd.checkpoint`)."""
    if basis is not None:
        h = h @ basis
    if mean is not None:
        h = h + mean
    if residual_std is not None:
        if eps is None:
            raise ValueError("this generator adds residual noise: pass eps of shape (K, P)")
        h = h + residual_std * eps
    return h


def unflatten(spec: NetworkSpec, theta: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Views of ``theta (K, P)`` as ``[(W, b), ...]``, shaped as
    :func:`apd.networks.unflatten` shapes them (``(K, in, out)`` dense, ``(K, O, C, k, k)``
    conv)."""
    if theta.ndim != 2 or theta.shape[1] != spec.num_params:
        raise ValueError(
            f"expected theta of shape (K, {spec.num_params}), got {tuple(theta.shape)}"
        )
    k = theta.shape[0]
    return [
        (theta[:, ws].reshape(k, *w_shape), theta[:, bs])
        for (w_shape, _), (ws, bs) in zip(spec.layer_shapes, spec.offsets(), strict=True)
    ]


DropoutRate = float | tuple[float, ...]
"""MC-Dropout's rate: one for every dense layer's input that takes dropout, or one each (in
order; Gal et al. 2017's CNN drops 0.25 of its pooled features and 0.5 of its hidden units)."""


def dropout_rates(spec: NetworkSpec, dropout: DropoutRate) -> tuple[float, ...]:
    """The rate on the input of each dense layer that takes dropout: every dense layer of a
    CNN, every dense layer but the first of an MLP. ``ValueError`` for a rate outside
    [0, 1) or a tuple of the wrong length."""
    n = len(spec.layer_shapes) - (
        sum(isinstance(lay, Conv2d) for lay in spec.layers) if isinstance(spec, CNNSpec) else 1
    )
    rates = dropout if isinstance(dropout, tuple) else (float(dropout),) * n
    if len(rates) != n:
        raise ValueError(f"{spec.name} takes {n} dropout rates (one per dense layer's input)")
    if not all(0.0 <= r < 1.0 for r in rates):
        raise ValueError(f"dropout rates must lie in [0, 1), got {dropout}")
    return rates


def has_dropout(dropout: DropoutRate) -> bool:
    """Whether ``dropout`` drops anything (a network's passes then differ)."""
    return any(r > 0 for r in dropout) if isinstance(dropout, tuple) else dropout > 0


def _dropout(h: torch.Tensor, rate: float, generator: torch.Generator | None) -> torch.Tensor:
    """Inverted dropout: each value kept with probability ``1 - rate``, scaled by its inverse."""
    if rate == 0:
        return h
    keep = torch.rand(h.shape, device=h.device, generator=generator) >= rate
    return h * keep / (1.0 - rate)


def forward_logits(
    spec: NetworkSpec,
    theta: torch.Tensor,
    x: torch.Tensor,
    dropout: DropoutRate = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Logits of K networks: ``theta (K, P)`` and ``x (N, D)`` shared, or ``x (K, N, D)``
    with a batch per network. Returns ``(K, N, C)``.

    ``dropout`` > 0 applies inverted dropout to the input of every dense layer but the
    network's first (MC-Dropout): for an MLP, to every hidden layer's output; for a CNN, to
    every dense layer's input (:func:`dropout_rates`).
    """
    rates = dropout_rates(spec, dropout)
    if isinstance(spec, CNNSpec):
        return _cnn_logits(spec, theta, x, rates, generator)
    layers = unflatten(spec, theta)
    w0, b0 = layers[0]
    # A shared batch is broadcast to the K networks as a stride-0 view (no copy); the bias is
    # fused into the batched GEMM (baddbmm), measurably faster than matmul + add on CPU.
    xs = x.unsqueeze(0).expand(theta.shape[0], -1, -1) if x.ndim == 2 else x
    h = torch.baddbmm(b0.unsqueeze(1), xs, w0)
    for (w, b), rate in zip(layers[1:], rates, strict=True):
        h = torch.relu(h)
        h = _dropout(h, rate, generator)
        h = torch.baddbmm(b.unsqueeze(1), h, w)
    return h


def _max_pool(h: torch.Tensor, s: int) -> torch.Tensor:
    """Max over ``s x s`` windows of ``(N, C, H, W)`` maps (trailing rows and columns that
    fill no window dropped, as ``max_pool2d`` does). Without a gradient to carry, the
    elementwise maximum of the ``s * s`` strided views: the same values, 2.5x faster than
    ``F.max_pool2d`` on one CPU thread and K = 20 LeNet-5 inference 1.4x faster
    (benchmarks/results/cnn_pool.md); with a gradient, ``F.max_pool2d`` (its backward is
    the faster one)."""
    if h.requires_grad:
        return F.max_pool2d(h, s)
    ho, wo = h.shape[2] // s, h.shape[3] // s
    out = h[:, :, 0 : ho * s : s, 0 : wo * s : s]
    for i in range(s):
        for j in range(s):
            if i or j:
                out = torch.maximum(out, h[:, :, i : ho * s : s, j : wo * s : s])
    return out


def _cnn_features(spec: CNNSpec, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The convolutional part of K CNNs: ``(K, N, F)``, each network's last feature map
    flattened in ``(C, H, W)`` order (the input of its first dense layer).

    The K networks run as one grouped convolution: maps are ``(N, K C, H, W)``, network k's
    channels at ``k C .. (k+1) C - 1``. A shared batch ``x (N, D)`` goes through the first
    layer as one ordinary convolution with the K networks' ``K O`` filters."""
    k = theta.shape[0]
    c, hgt, wid = spec.input_shape
    layers = iter(unflatten(spec, theta))
    shared = x.ndim == 2
    if shared:
        h = x.reshape(x.shape[0], c, hgt, wid)
    else:
        h = (
            x.reshape(k, x.shape[1], c, hgt, wid)
            .transpose(0, 1)
            .reshape(x.shape[1], k * c, hgt, wid)
        )
    for layer in spec.layers:
        if isinstance(layer, MaxPool2d):
            h = _max_pool(h, layer.size)
        elif isinstance(layer, Conv2d):
            w, b = next(layers)
            groups = 1 if shared else k
            h = F.conv2d(
                h, w.reshape(-1, *w.shape[2:]), b.reshape(-1), padding=layer.padding, groups=groups
            )
            h = torch.relu(h)
            shared = False
        else:
            break
    return h.reshape(h.shape[0], k, -1).transpose(0, 1)


def _cnn_logits(
    spec: CNNSpec,
    theta: torch.Tensor,
    x: torch.Tensor,
    rates: tuple[float, ...],
    generator: torch.Generator | None,
) -> torch.Tensor:
    h = _cnn_features(spec, theta, x)
    dense = unflatten(spec, theta)[sum(isinstance(lay, Conv2d) for lay in spec.layers) :]
    for i, ((w, b), rate) in enumerate(zip(dense, rates, strict=True)):
        if i > 0:
            h = torch.relu(h)
        h = _dropout(h, rate, generator)
        h = torch.baddbmm(b.unsqueeze(1), h, w)
    return h


def mc_dropout_logits(
    spec: NetworkSpec,
    theta: torch.Tensor,
    x: torch.Tensor,
    rate: DropoutRate,
    passes: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """MC-Dropout logits ``(passes, N, C)`` of one network ``theta (1, P)`` on ``x (N, D)``.

    The masks, drawn in the same order, and (up to rounding) the logits of
    :func:`forward_logits` on the network repeated ``passes`` times with ``dropout = rate``;
    what comes before the first dropout (an MLP's first layer, a CNN's convolutions) is
    computed once and shared by the passes. Differentiable in ``x`` (the attacks use this).
    """
    if theta.ndim != 2 or theta.shape[0] != 1:
        raise ValueError(f"MC-Dropout takes one network (1, P), got {tuple(theta.shape)}")
    rates = dropout_rates(spec, rate)
    layers = unflatten(spec, theta)
    if isinstance(spec, CNNSpec):
        first_dense = sum(isinstance(lay, Conv2d) for lay in spec.layers)
        h = _cnn_features(spec, theta, x).expand(passes, -1, -1)
        dense = layers[first_dense:]
    else:
        w0, b0 = layers[0]
        h = (x @ w0[0] + b0[0]).unsqueeze(0).expand(passes, -1, -1)
        dense = layers[1:]
    for i, ((w, b), r) in enumerate(zip(dense, rates, strict=True)):
        if i > 0 or isinstance(spec, MLPSpec):
            h = torch.relu(h)
        h = _dropout(h, r, generator)
        h = h @ w[0] + b[0]
    return h


# The working set that :func:`member_probs` keeps a CNN chunk's activations within.
CNN_CHUNK_BYTES = 512 << 20


def _float32_tensor(a: torch.Tensor | NDArray[np.floating]) -> torch.Tensor:
    """A float32 tensor of ``a`` (a NumPy array, possibly read-only or a memmap, is copied)."""
    if isinstance(a, torch.Tensor):
        return a.to(torch.float32)
    return torch.from_numpy(np.array(a, dtype=np.float32))


@torch.no_grad()
def member_probs(
    spec: NetworkSpec,
    theta: torch.Tensor | NDArray[np.floating],
    x: torch.Tensor | NDArray[np.floating],
    *,
    dropout: DropoutRate = 0.0,
    passes: int = 1,
    generator: torch.Generator | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Member softmax outputs ``p_k(y | x) = softmax(f(x; theta_k))``, ``(M, N, C)`` float32
    on the CPU, for ``x (N, D)``, computed on theta's device ``chunk`` inputs at a time
    (default: 2,000 for an MLP; for a CNN as many as keep its largest layer's activations
    for the M members within :data:`CNN_CHUNK_BYTES`).

    Without dropout the M = K members are the networks ``theta (K, P)``
    (:func:`forward_logits`). With ``dropout > 0`` (MC-Dropout) there is one network
    ``theta (1, P)`` and the M = ``passes`` members are its stochastic passes
    (:func:`mc_dropout_logits`), with masks drawn from ``generator`` chunk by chunk.
    """
    dropout_rates(spec, dropout)  # checks the rates
    stochastic = has_dropout(dropout)
    th = _float32_tensor(theta)
    members = passes if stochastic else th.shape[0]
    if chunk is None:
        per_input = 4 * members * spec.max_activations
        chunk = 2000 if isinstance(spec, MLPSpec) else max(1, CNN_CHUNK_BYTES // per_input)
    if chunk < 1 or passes < 1 or (passes > 1 and not stochastic):
        raise ValueError(
            f"need chunk >= 1 and passes >= 1 (> 1 only with dropout), got {chunk}, {passes}"
        )
    outs = [torch.empty(members, 0, spec.num_classes)]
    for start in range(0, x.shape[0], chunk):
        xb = _float32_tensor(x[start : start + chunk]).to(th.device)
        if stochastic:
            logits = mc_dropout_logits(spec, th, xb, dropout, passes, generator)
        else:
            logits = forward_logits(spec, th, xb)
        outs.append(torch.softmax(logits, -1).cpu())
    return torch.cat(outs, dim=1)
