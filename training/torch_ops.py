"""The batched forward of :mod:`apd.networks` in PyTorch (differentiable, CPU or GPU).

Imported by training (SGLD chains are K networks trained at once) and by the service's torch
backend. Same flat layout and maths as the NumPy version; tests check they agree.

:func:`member_probs` is the one per-network softmax of the training side: the ``(K, N, C)``
member probabilities that every predictive, metric and uncertainty score is computed from.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray

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


def mc_dropout_logits(
    spec: MLPSpec,
    theta: torch.Tensor,
    x: torch.Tensor,
    rate: float,
    passes: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """MC-Dropout logits ``(passes, N, C)`` of one network ``theta (1, P)`` on ``x (N, D)``.

    The masks, drawn in the same order, and (up to rounding) the logits of
    :func:`forward_logits` on the network repeated ``passes`` times with ``dropout = rate``;
    the first layer sees no dropout, so it is computed once and shared by the passes.
    Differentiable in ``x`` (the attacks use this).
    """
    if theta.ndim != 2 or theta.shape[0] != 1:
        raise ValueError(f"MC-Dropout takes one network (1, P), got {tuple(theta.shape)}")
    layers = unflatten(spec, theta)
    w0, b0 = layers[0]
    h = (x @ w0[0] + b0[0]).unsqueeze(0).expand(passes, -1, -1)
    for w, b in layers[1:]:
        h = torch.relu(h)
        keep = torch.rand(h.shape, generator=generator, device=h.device) >= rate
        h = h * keep / (1.0 - rate)
        h = h @ w[0] + b[0]
    return h


def _float32_tensor(a: torch.Tensor | NDArray[np.floating]) -> torch.Tensor:
    """A float32 tensor of ``a`` (a NumPy array, possibly read-only or a memmap, is copied)."""
    if isinstance(a, torch.Tensor):
        return a.to(torch.float32)
    return torch.from_numpy(np.array(a, dtype=np.float32))


@torch.no_grad()
def member_probs(
    spec: MLPSpec,
    theta: torch.Tensor | NDArray[np.floating],
    x: torch.Tensor | NDArray[np.floating],
    *,
    dropout: float = 0.0,
    passes: int = 1,
    generator: torch.Generator | None = None,
    chunk: int = 2000,
) -> torch.Tensor:
    """Member softmax outputs ``p_k(y | x) = softmax(f(x; theta_k))``, ``(M, N, C)`` float32
    on the CPU, for ``x (N, D)``, computed on theta's device ``chunk`` inputs at a time.

    Without dropout the M = K members are the networks ``theta (K, P)``
    (:func:`forward_logits`). With ``dropout > 0`` (MC-Dropout) there is one network
    ``theta (1, P)`` and the M = ``passes`` members are its stochastic passes
    (:func:`mc_dropout_logits`), with masks drawn from ``generator`` chunk by chunk.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout rate must lie in [0, 1), got {dropout}")
    if chunk < 1 or passes < 1 or (passes > 1 and dropout == 0):
        raise ValueError(
            f"need chunk >= 1 and passes >= 1 (> 1 only with dropout), got {chunk}, {passes}"
        )
    th = _float32_tensor(theta)
    members = passes if dropout > 0 else th.shape[0]
    outs = [torch.empty(members, 0, spec.num_classes)]
    for start in range(0, x.shape[0], chunk):
        xb = _float32_tensor(x[start : start + chunk]).to(th.device)
        if dropout > 0:
            logits = mc_dropout_logits(spec, th, xb, dropout, passes, generator)
        else:
            logits = forward_logits(spec, th, xb)
        outs.append(torch.softmax(logits, -1).cpu())
    return torch.cat(outs, dim=1)
