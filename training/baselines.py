"""Point-estimate baselines (SGD, MC-Dropout) and the pieces every MNIST sampler shares.

All networks are flat parameter vectors ``theta (K, P)`` in the layout of
:mod:`apd.networks`, evaluated with :func:`training.torch_ops.forward_logits`; K networks (SGLD
chains, or K = 1 for a baseline) train in one batched pass, each on its own minibatch.

* SGD (maximum a posteriori): minimise the mean negative log-likelihood plus weight decay
  ``lambda/2 ||theta||^2`` with heavy-ball momentum ``mu`` and a cosine-annealed rate,
  ``v' = mu v + g``, ``theta' = theta - eta_t v'``, ``g = -grad lbar_B(theta) + lambda theta``,
  ``eta_t = eta_0 / 2 (1 + cos(pi t / T))``.
* MC-Dropout (Gal & Ghahramani, ICML 2016): the same training with inverted dropout of rate
  ``p`` (0.5 here) on every hidden layer; at test time the predictive is the average of the
  softmax over M stochastic passes, ``p(y|x) ≈ 1/M sum_m softmax(f(x; theta, mask_m))``
  (:func:`training.torch_ops.member_probs` with ``dropout``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from apd.networks import MLPSpec, NetworkSpec
from training import sgld, torch_ops


def init_theta(spec: NetworkSpec, num_networks: int, generator: torch.Generator) -> torch.Tensor:
    """``(K, P)`` float32: PyTorch's default ``nn.Linear`` / ``nn.Conv2d`` init for every
    layer, ``W, b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (``fan_in = C k k`` for a conv),
    independently for each network."""
    theta = torch.empty(num_networks, spec.num_params)
    for fan_in, (ws, bs) in zip(spec.fan_ins(), spec.offsets(), strict=True):
        bound = 1.0 / math.sqrt(fan_in)
        for sl in (ws, bs):
            theta[:, sl] = torch.rand(num_networks, sl.stop - sl.start, generator=generator)
            theta[:, sl].mul_(2 * bound).sub_(bound)
    return theta


class MinibatchStream:
    """Endless ``(K, B)`` index minibatches: each of K networks walks its own random
    permutation of the N training points (sampling without replacement within an epoch)."""

    def __init__(
        self, num_data: int, batch_size: int, num_networks: int, generator: torch.Generator
    ) -> None:
        if not 0 < batch_size <= num_data:
            raise ValueError(f"batch size must be in [1, {num_data}], got {batch_size}")
        self.num_data = num_data
        self.batch_size = batch_size
        self.num_networks = num_networks
        self._gen = generator
        self._perm = torch.empty(0, dtype=torch.int64)
        self._pos = num_data

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        if self._pos + self.batch_size > self.num_data:
            keys = torch.rand(self.num_networks, self.num_data, generator=self._gen)
            self._perm = torch.argsort(keys, dim=1)
            self._pos = 0
        out = self._perm[:, self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        return out


@dataclass(frozen=True)
class ClassificationLikelihood:
    """``log p(y | x, theta)`` of a softmax network; called with index minibatches ``(K, B)``.

    ``__call__(theta (K, P), idx (K, B)) -> (K,)``: each network's mean log-likelihood of
    its own minibatch, ``1/B sum_i log softmax(f(x_i; theta_k))_{y_i}``.
    """

    spec: NetworkSpec
    x: torch.Tensor  # (N, D) float32
    y: torch.Tensor  # (N,) int64
    dropout: torch_ops.DropoutRate = 0.0
    generator: torch.Generator | None = None

    def __call__(self, theta: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        logits = torch_ops.forward_logits(
            self.spec, theta, self.x[idx], dropout=self.dropout, generator=self.generator
        )
        logp = F.log_softmax(logits, dim=-1)
        return logp.gather(-1, self.y[idx].unsqueeze(-1)).squeeze(-1).mean(dim=1)

    @property
    def fast_gradient(self) -> sgld.ValueAndGrad | None:
        """:meth:`value_and_grad` where it applies (an MLP without dropout), else ``None``:
        the sampler then differentiates :meth:`__call__` with autograd (CNNs)."""
        if isinstance(self.spec, MLPSpec) and not torch_ops.has_dropout(self.dropout):
            return self.value_and_grad
        return None

    @torch.no_grad()
    def value_and_grad(
        self, theta: torch.Tensor, idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lbar (K,), grad_theta lbar (K, P))`` by hand-written backpropagation.

        The same numbers as autograd on :meth:`__call__` (tests check it), about twice as
        fast on a small CPU: no graph, and each layer's gradient is written by one batched
        matmul straight into its slice of the flat ``(K, P)`` gradient. With
        ``a_l = h_{l-1} W_l + b_l``, ``h_l = relu(a_l)`` and ``s = softmax(a_L)``:
        ``delta_L = (onehot(y) - s) / B``, ``grad W_l = h_{l-1}^T delta_l``,
        ``grad b_l = sum_i delta_l``, ``delta_{l-1} = (delta_l W_l^T) ⊙ [h_{l-1} > 0]``.
        MLPs only, and no dropout (MC-Dropout training and CNNs use autograd).
        """
        if torch_ops.has_dropout(self.dropout) or not isinstance(self.spec, MLPSpec):
            raise ValueError("value_and_grad is for MLPs without dropout; use autograd")
        layers = torch_ops.unflatten(self.spec, theta)
        grad = torch.empty_like(theta)
        glayers = torch_ops.unflatten(self.spec, grad)
        h = self.x[idx]  # (K, B, D)
        acts = [h]
        for i, (w, b) in enumerate(layers):
            h = torch.baddbmm(b.unsqueeze(1), h, w)
            if i < len(layers) - 1:
                h.clamp_(min=0.0)
            acts.append(h)
        logp = F.log_softmax(h, dim=-1)
        yb = self.y[idx].unsqueeze(-1)
        ll = logp.gather(-1, yb).squeeze(-1).mean(dim=1)
        batch = idx.shape[1]
        delta = logp.exp_().neg_()
        delta.scatter_add_(-1, yb, torch.ones_like(yb, dtype=delta.dtype))
        delta.div_(batch)
        for i in range(len(layers) - 1, -1, -1):
            w, _ = layers[i]
            gw, gb = glayers[i]
            torch.bmm(acts[i].transpose(1, 2), delta, out=gw)
            torch.sum(delta, dim=1, out=gb)
            if i > 0:
                delta = torch.bmm(delta, w.transpose(1, 2)).mul_(acts[i] > 0)
        return ll, grad


@dataclass(frozen=True)
class PointTrainSettings:
    """SGD / MC-Dropout training: see the module docstring for the update."""

    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 100
    epochs: int = 50
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"step size lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight decay must be >= 0, got {self.weight_decay}")
        if self.batch_size <= 0 or self.epochs <= 0:
            raise ValueError("batch size and epochs must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout rate must lie in [0, 1), got {self.dropout}")


def train_point_estimate(
    spec: NetworkSpec,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: PointTrainSettings,
    generator: torch.Generator,
    progress: bool = True,
) -> torch.Tensor:
    """Train one network by SGD (with dropout when ``settings.dropout`` > 0): ``(1, P)``."""
    n = x.shape[0]
    stream = MinibatchStream(n, settings.batch_size, 1, generator)
    loglik = ClassificationLikelihood(spec, x, y, settings.dropout, generator)
    theta = init_theta(spec, 1, generator)
    velocity = torch.zeros_like(theta)
    steps_per_epoch = n // settings.batch_size
    total = settings.epochs * steps_per_epoch
    desc = "mc-dropout" if settings.dropout > 0 else "sgd"
    bar = tqdm(range(total), desc=desc, disable=not progress, mininterval=1.0, unit="step")
    for t in bar:
        idx = next(stream)
        with torch.enable_grad():
            th = theta.requires_grad_(True)
            ll = loglik(th, idx)
            (grad,) = torch.autograd.grad(ll.sum(), th)
        theta = theta.detach()
        g = -grad + settings.weight_decay * theta
        velocity = settings.momentum * velocity + g
        eta = settings.lr / 2.0 * (1.0 + math.cos(math.pi * t / total))
        theta = theta - eta * velocity
        if t % 500 == 0:
            if not torch.isfinite(theta).all():
                raise FloatingPointError(
                    f"{desc} diverged at step {t}; lower the step size (lr={settings.lr})"
                )
            bar.set_postfix(nll=f"{-ll.item():.3f}", refresh=False)
    return theta
