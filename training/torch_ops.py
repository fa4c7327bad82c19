"""The batched forward of :mod:`apd.networks` in PyTorch (differentiable, CPU or GPU).

Imported by training (SGLD chains are K networks trained at once) and by the service's torch
backend. Same flat layout and maths as the NumPy version; tests check they agree.
"""

from __future__ import annotations

import torch

from apd.networks import MLPSpec


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


def unflatten(spec: MLPSpec, theta: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Views of ``theta (K, P)`` as ``[(W (K, in, out), b (K, out)), ...]``."""
    if theta.ndim != 2 or theta.shape[1] != spec.num_params:
        raise ValueError(
            f"expected theta of shape (K, {spec.num_params}), got {tuple(theta.shape)}"
        )
    k = theta.shape[0]
    return [
        (theta[:, ws].reshape(k, fan_in, fan_out), theta[:, bs])
        for ((fan_in, fan_out), _), (ws, bs) in zip(spec.layer_shapes, spec.offsets(), strict=True)
    ]


def forward_logits(
    spec: MLPSpec,
    theta: torch.Tensor,
    x: torch.Tensor,
    dropout: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Logits of K networks: ``theta (K, P)`` and ``x (N, D)`` shared, or ``x (K, N, D)``
    with a batch per network. Returns ``(K, N, C)``.

    ``dropout`` > 0 applies inverted dropout to every hidden layer's output (MC-Dropout).
    """
    layers = unflatten(spec, theta)
    w0, b0 = layers[0]
    # A shared batch is broadcast to the K networks as a stride-0 view (no copy); the bias is
    # fused into the batched GEMM (baddbmm), measurably faster than matmul + add on CPU.
    xs = x.unsqueeze(0).expand(theta.shape[0], -1, -1) if x.ndim == 2 else x
    h = torch.baddbmm(b0.unsqueeze(1), xs, w0)
    for w, b in layers[1:]:
        h = torch.relu(h)
        if dropout > 0:
            keep = torch.rand(h.shape, device=h.device, generator=generator) >= dropout
            h = h * keep / (1.0 - dropout)
        h = torch.baddbmm(b.unsqueeze(1), h, w)
    return h
