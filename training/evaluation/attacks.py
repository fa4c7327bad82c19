"""FGSM and PGD (L-infinity) against a posterior predictive.

The attacked model is the posterior predictive of K networks,
``p(y|x) = 1/K sum_k softmax(f_k(x))_y``, and the attack's loss is its negative
log-likelihood of the true label,

    L(x, y) = -log( 1/K sum_k softmax(f_k(x))_y )
            = -( logsumexp_k log_softmax(f_k(x))_y - log K ),

so the gradient is that of the *mean* softmax, not the mean of the networks' losses. A
stochastic model (MC-Dropout) draws fresh masks at every call, which makes PGD an
expectation-over-transformation attack on it.

* FGSM (Goodfellow, Shlens & Szegedy, ICLR 2015): ``x' = clip(x + eps sign(grad_x L), 0, 1)``.
* PGD (Madry et al., ICLR 2018): from a uniform random start in the eps-ball, ``steps``
  iterations of ``x <- clip(Proj_eps(x + alpha sign(grad_x L)), 0, 1)``.

Inputs are pixel rows in ``[0, 1]`` and stay there.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

MemberLogits = Callable[[torch.Tensor], torch.Tensor]
"""``x (N, D) -> logits (K, N, C)`` of K networks, differentiable in ``x``."""


def predictive_nll(member_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(N,)``: ``-log`` of the mean over K networks of the softmax probability of the label."""
    if member_logits.ndim != 3:
        raise ValueError(f"expected member logits (K, N, C), got {tuple(member_logits.shape)}")
    k = member_logits.shape[0]
    logp = F.log_softmax(member_logits, dim=-1)
    idx = labels.view(1, -1, 1).expand(k, -1, 1)
    log_py = logp.gather(-1, idx).squeeze(-1)  # (K, N)
    return -(torch.logsumexp(log_py, dim=0) - math.log(k))


def _input_gradient(logits_fn: MemberLogits, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        loss = predictive_nll(logits_fn(xr), y).sum()
        (grad,) = torch.autograd.grad(loss, xr)
    return grad


def _check(x: torch.Tensor, y: torch.Tensor, eps: float) -> None:
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"expected x (N, D) and y (N,), got {tuple(x.shape)}, {tuple(y.shape)}")
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a non-negative number, got {eps}")


def fgsm(logits_fn: MemberLogits, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """One signed-gradient step of size ``eps`` up the predictive's loss, clipped to [0, 1]."""
    _check(x, y, eps)
    grad = _input_gradient(logits_fn, x, y)
    return (x + eps * grad.sign()).clamp(0.0, 1.0).detach()


def pgd(
    logits_fn: MemberLogits,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int = 20,
    step_size: float | None = None,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Projected gradient ascent on the predictive's loss in the L-infinity ``eps``-ball.

    ``step_size`` defaults to ``2.5 eps / steps`` (Madry et al.), enough to reach the
    boundary of the ball from anywhere inside it.
    """
    _check(x, y, eps)
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    alpha = 2.5 * eps / steps if step_size is None else step_size
    x0 = x.detach()
    if random_start and eps > 0:
        noise = torch.rand(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        adv = (x0 + (2.0 * noise - 1.0) * eps).clamp(0.0, 1.0)
    else:
        adv = x0.clone()
    for _ in range(steps):
        grad = _input_gradient(logits_fn, adv, y)
        adv = adv + alpha * grad.sign()
        adv = torch.minimum(torch.maximum(adv, x0 - eps), x0 + eps).clamp(0.0, 1.0)
    return adv.detach()
