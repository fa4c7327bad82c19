"""The APD generator, its critic, and the WGAN-GP objective.

WGAN-GP (Gulrajani, Ahmed, Arjovsky, Dumoulin & Courville, NeurIPS 2017). With data ``x ~ P_r``
(here: posterior samples, or their subspace coefficients) and generated ``x~ = G(z)``,
``z ~ N(0, I)``, the critic ``D`` minimises

    L_D = E[D(x~)] - E[D(x)] + lambda * E[(||grad_xh D(xh)||_2 - 1)^2],
    xh = x + alpha (x~ - x),  alpha ~ U[0, 1] per pair,

so ``E[D(x)] - E[D(x~)]`` estimates the Wasserstein-1 distance between ``P_r`` and ``P_G``
while the penalty keeps ``D`` near 1-Lipschitz; the generator minimises
``L_G = -E[D(G(z))]``. Each generator step follows ``n_critic`` critic steps, each on a fresh
minibatch. APD (Wang et al., ICML 2018) uses lambda = 10, n_critic = 5, Adam at 1e-4 with
betas (0.5, 0.9), batch 100, ``z`` of 32 dimensions and, for both networks, three ReLU layers
of 100 units (the ``paper`` preset).

The generator here is the checkpoint's (see :mod:`apd.checkpoint`):

    theta = mean + c @ basis + residual_std * eps,   c = scale * net(z) + shift,
    z ~ N(0, I_noise_dim),  eps ~ N(0, I_P),

where ``net`` is the trained MLP, ``basis`` (r, P) a fixed linear map, and ``scale``/``shift``
undo the per-coordinate standardisation the GAN was trained in (they fold into the MLP's last
layer on export). The paper's generator is the special case without basis, mean, residual
or standardisation: ``theta = net(z)``. The critic sees what the MLP produces, i.e. the data
the GAN is trained on (standardised coefficients, or raw weights for the paper design).

Chain-conditional generator (``components`` K > 1). SGLD chains started apart settle in
different modes, so the samples form K separated clusters. A generator that is a continuous
function of Gaussian noise has a connected support and always spends some mass between
clusters, and networks interpolated between two modes are bad networks. With K > 1 the first
noise coordinate picks a component, ``k(z) = #{j : z_0 > q_j}`` with ``q_j = Phi^{-1}(w_1 +
... + w_j)`` (so component k has probability ``w_k``, the share of chain k's samples), and
the trained MLP maps ``u = (onehot(k), z_1..z_{d-1})`` to coefficients; the critic sees the
coefficients together with ``onehot(k)`` (a conditional WGAN-GP, whose penalty interpolates
within a component). The selection is itself two fixed ReLU layers in front of the MLP, so
the checkpoint still holds a plain ReLU MLP of ``z``:

    a_j = ReLU(s (z_0 - q_j)),    n_j = ReLU(1 - a_j) = 1[z_0 <= q_j]  (s = ramp_slope),
    onehot_0 = n_1,  onehot_k = n_{k+1} - n_k,  onehot_{K-1} = 1 - n_{K-1},
    z_i = ReLU(z_i) - ReLU(-z_i)  (passed through both layers),

and the linear map from ``(n, ReLU(z_i), ReLU(-z_i))`` to ``u`` folds into the MLP's first
layer. ``n_j`` is exactly 0 or 1 except within ``1/s`` of a threshold (probability about
``1e-6`` per threshold at ``s = 1e6``), and no large values cancel, so float32 is exact.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from apd.checkpoint import (
    LAYER_PREFIX,
    MEAN,
    RESIDUAL_STD,
    BasisDtype,
    Design,
    GeneratorConfig,
    VectorDtype,
    encode_basis,
    encode_vector,
    round_vector,
)
from training import torch_ops

RealBatch = tuple[torch.Tensor, torch.Tensor | None]
RealSampler = Callable[[int], RealBatch]
"""``batch_size -> (x (batch_size, d), onehot (batch_size, K) or None)``: a fresh minibatch of
the data the GAN is trained on, with the components (chains) of the rows when conditional."""
DEFAULT_RAMP_SLOPE = 1e6


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear layers ``sizes[0] -> ... -> sizes[-1]`` with ReLU after every layer but the last.

    Hidden (ReLU) layers use He-uniform weights as in the reference code; the output layer
    keeps PyTorch's default init.
    """
    if len(sizes) < 2 or any(int(s) <= 0 for s in sizes):
        raise ValueError(f"layer sizes must be >= 2 positive ints, got {list(sizes)}")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        lin = nn.Linear(int(a), int(b))
        if i < len(sizes) - 2:
            nn.init.kaiming_uniform_(lin.weight, nonlinearity="relu")
            layers += [lin, nn.ReLU()]
        else:
            layers.append(lin)
    return nn.Sequential(*layers)


def _linears(net: nn.Sequential) -> list[nn.Linear]:
    return [m for m in net if isinstance(m, nn.Linear)]


class Generator(nn.Module):
    """``z -> theta`` (module docstring). ``forward(z)`` is the MLP output the critic sees."""

    basis: torch.Tensor | None
    mean: torch.Tensor | None
    residual_std: torch.Tensor | None
    scale: torch.Tensor
    shift: torch.Tensor
    thresholds: torch.Tensor

    def __init__(
        self,
        noise_dim: int,
        hidden_sizes: Sequence[int],
        output_dim: int,
        *,
        basis: torch.Tensor | None = None,
        mean: torch.Tensor | None = None,
        residual_std: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
        shift: torch.Tensor | None = None,
        component_weights: Sequence[float] | None = None,
        ramp_slope: float = DEFAULT_RAMP_SLOPE,
        vector_dtype: VectorDtype = "float",
    ) -> None:
        super().__init__()
        self.vector_dtype: VectorDtype = vector_dtype
        self.noise_dim = int(noise_dim)
        self.hidden_sizes = tuple(int(h) for h in hidden_sizes)
        self.output_dim = int(output_dim)
        w = np.asarray([1.0] if component_weights is None else component_weights, np.float64)
        if w.ndim != 1 or w.size == 0 or not (w > 0).all():
            raise ValueError("component_weights must be positive")
        self.component_weights = tuple(float(v) for v in w / w.sum())
        self.components = len(self.component_weights)
        if self.components > 1 and self.noise_dim < 2:
            raise ValueError("a chain-conditional generator needs noise_dim >= 2")
        self.ramp_slope = float(ramp_slope)
        cum = torch.tensor(np.cumsum(self.component_weights)[:-1], dtype=torch.float64)
        self.register_buffer("thresholds", torch.special.ndtri(cum).float())
        self.net = mlp([self.code_dim, *self.hidden_sizes, self.output_dim])
        if basis is not None and basis.shape[0] != self.output_dim:
            raise ValueError(f"basis has {basis.shape[0]} rows, generator outputs {output_dim}")
        p = basis.shape[1] if basis is not None else self.output_dim
        self.num_params = int(p)
        for name, t, shape in (
            ("mean", mean, (p,)),
            ("residual_std", residual_std, (p,)),
        ):
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
        f32 = torch.float32
        self.register_buffer("basis", None if basis is None else basis.to(f32).contiguous())
        # The generator draws with exactly the mean and residual std the checkpoint will store
        # and serve (float32 and float16, or int8 per group of 128 with ``vector_dtype`` int8).

        def stored(name: str, t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            rounded = round_vector(name, t.detach().cpu().numpy(), vector_dtype)
            return torch.from_numpy(rounded).to(t.device)

        self.register_buffer("mean", stored(MEAN, mean))
        self.register_buffer("residual_std", stored(RESIDUAL_STD, residual_std))
        ones, zeros = torch.ones(self.output_dim), torch.zeros(self.output_dim)
        self.register_buffer("scale", ones if scale is None else scale.to(f32).reshape(-1))
        self.register_buffer("shift", zeros if shift is None else shift.to(f32).reshape(-1))

    @property
    def continuous_dim(self) -> int:
        """Noise coordinates that reach the MLP unchanged (all but ``z_0`` when K > 1)."""
        return self.noise_dim - 1 if self.components > 1 else self.noise_dim

    @property
    def code_dim(self) -> int:
        """Input width of the trained MLP: ``K + continuous_dim`` (``noise_dim`` if K = 1)."""
        return self.components + self.continuous_dim if self.components > 1 else self.noise_dim

    def code(self, z: torch.Tensor) -> torch.Tensor:
        """``u = (onehot(k(z)), z_1, ...)`` through the fixed front layers (K > 1), else z."""
        if self.components == 1:
            return z
        s = self.ramp_slope
        a = torch.relu(z[:, :1] * s - self.thresholds * s)
        n = torch.relu(1.0 - a)
        ones = torch.ones_like(z[:, :1])
        onehot = torch.cat([n[:, :1], n[:, 1:] - n[:, :-1], ones - n[:, -1:]], dim=1)
        rest = z[:, 1:]
        return torch.cat([onehot, torch.relu(rest) - torch.relu(-rest)], dim=1)

    def component_of(self, z: torch.Tensor) -> torch.Tensor:
        """The component (chain) index ``k(z)`` of each noise row."""
        return torch.bucketize(z[:, 0].contiguous(), self.thresholds.contiguous())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """The MLP's output for noise ``z``: standardised coefficients (or raw weights)."""
        out: torch.Tensor = self.net(self.code(z))
        return out

    def conditional(self, onehot: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
        """The MLP's output for components ``onehot (B, K)`` and noise ``rest``."""
        out: torch.Tensor = self.net(torch.cat([onehot, rest], dim=1))
        return out

    def coefficients(self, z: torch.Tensor) -> torch.Tensor:
        """``c = scale * net(u(z)) + shift``: subspace coordinates (or the weights themselves)."""
        return self(z) * self.scale + self.shift

    def weights(self, z: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """``theta (K, P) = mean + c @ basis + residual_std * eps``, ``z (K, noise_dim)``."""
        return torch_ops.compose_weights(
            self.coefficients(z), self.basis, self.mean, self.residual_std, eps
        )

    def draw_noise(
        self, k: int, rng: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``z (k, noise_dim)`` and, when the generator has residual noise, ``eps (k, P)``."""
        dev = self.scale.device
        z = torch.randn(k, self.noise_dim, generator=rng, device=dev)
        eps = None
        if self.residual_std is not None:
            eps = torch.randn(k, self.num_params, generator=rng, device=dev)
        return z, eps

    @torch.no_grad()
    def sample(self, k: int, rng: torch.Generator | None = None) -> torch.Tensor:
        """``k`` networks ``theta (k, P)`` from fresh noise."""
        z, eps = self.draw_noise(k, rng)
        return self.weights(z, eps)

    def with_residual_std(self, residual_std: torch.Tensor | None) -> Generator:
        """A copy sharing the MLP's trained weights, with another residual noise level."""
        g = Generator(
            self.noise_dim,
            self.hidden_sizes,
            self.output_dim,
            basis=self.basis,
            mean=self.mean,
            residual_std=residual_std,
            scale=self.scale,
            shift=self.shift,
            component_weights=self.component_weights,
            ramp_slope=self.ramp_slope,
            vector_dtype=self.vector_dtype,
        )
        g.net.load_state_dict(self.net.state_dict())
        return g.to(self.scale.device)

    def _front_layers(
        self,
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]:
        """The two fixed layers ``(W (fan_in, fan_out), b)`` in float64, and ``(P, e)`` with
        ``u = v @ P + e`` mapping the second one's output ``v`` to the MLP's input ``u``."""
        k, d, s = self.components, self.continuous_dim, self.ramp_slope
        q = self.thresholds.double().cpu()
        width = (k - 1) + 2 * d
        w0 = torch.zeros(self.noise_dim, width, dtype=torch.float64)
        b0 = torch.zeros(width, dtype=torch.float64)
        w0[0, : k - 1] = s  # a_j = ReLU(s z_0 - s q_j)
        b0[: k - 1] = -q * s
        for i in range(d):  # ReLU(z_i), ReLU(-z_i)
            w0[1 + i, k - 1 + i] = 1.0
            w0[1 + i, k - 1 + d + i] = -1.0
        w1 = torch.eye(width, dtype=torch.float64)  # n_j = ReLU(1 - a_j); the rest as is
        w1[: k - 1, : k - 1] *= -1.0
        b1 = torch.zeros(width, dtype=torch.float64)
        b1[: k - 1] = 1.0
        p = torch.zeros(width, k + d, dtype=torch.float64)
        e = torch.zeros(k + d, dtype=torch.float64)
        p[0, 0] = 1.0  # onehot_0 = n_1
        for j in range(1, k - 1):  # onehot_j = n_{j+1} - n_j
            p[j, j], p[j - 1, j] = 1.0, -1.0
        p[k - 2, k - 1], e[k - 1] = -1.0, 1.0  # onehot_{K-1} = 1 - n_{K-1}
        for i in range(d):  # z_i = ReLU(z_i) - ReLU(-z_i)
            p[k - 1 + i, k + i], p[k - 1 + d + i, k + i] = 1.0, -1.0
        return [(w0, b0), (w1, b1)], p, e

    def checkpoint_tensors(self, basis_dtype: BasisDtype = "float32") -> dict[str, NDArray[Any]]:
        """The tensors of an :mod:`apd.checkpoint` file: the fixed front layers (K > 1), then
        the trained MLP, with the map into its input folded into its first layer and
        ``scale``/``shift`` folded into its last.

        The checkpoint stores a layer as ``h @ W + b`` with ``W (fan_in, fan_out)``;
        ``nn.Linear`` holds ``W.T``. The last layer becomes ``W' = W diag(scale)`` and
        ``b' = b * scale + shift``, so ``h @ W' + b' = scale * (h @ W + b) + shift``; the
        first, fed ``u = v @ P + e``, becomes ``W' = P W`` and ``b' = e @ W + b``.
        """
        with torch.no_grad():
            lins = [
                (lin.weight.detach().double().T.cpu(), lin.bias.detach().double().cpu())
                for lin in _linears(self.net)
            ]
            layers: list[tuple[torch.Tensor, torch.Tensor]] = []
            if self.components > 1:
                front, p, e = self._front_layers()
                layers += front
                w, b = lins[0]
                lins[0] = (p @ w, e @ w + b)
            w, b = lins[-1]
            sc, sh = self.scale.double().cpu(), self.shift.double().cpu()
            lins[-1] = (w * sc, b * sc + sh)
            layers += lins
            out: dict[str, NDArray[Any]] = {}
            for i, (w, b) in enumerate(layers):
                out[f"{LAYER_PREFIX}{i}.weight"] = w.float().numpy()
                out[f"{LAYER_PREFIX}{i}.bias"] = b.float().numpy()
            if self.basis is not None:
                out |= encode_basis(self.basis.cpu().numpy(), basis_dtype)
            if self.mean is not None:
                out |= encode_vector(MEAN, self.mean.cpu().numpy(), self.vector_dtype)
            if self.residual_std is not None:
                std = self.residual_std.cpu().numpy()
                out |= encode_vector(RESIDUAL_STD, std, self.vector_dtype)
        return out

    def checkpoint_hidden_sizes(self) -> list[int]:
        """Hidden widths of the exported MLP (the two front layers first when K > 1)."""
        if self.components == 1:
            return list(self.hidden_sizes)
        width = self.components - 1 + 2 * self.continuous_dim
        return [width, width, *self.hidden_sizes]

    def checkpoint_config(
        self, design: Design, basis_dtype: BasisDtype = "float32"
    ) -> GeneratorConfig:
        return GeneratorConfig(
            noise_dim=self.noise_dim,
            hidden_sizes=self.checkpoint_hidden_sizes(),
            output_dim=self.output_dim,
            has_basis=self.basis is not None,
            has_mean=self.mean is not None,
            has_residual=self.residual_std is not None,
            basis_dtype=basis_dtype,
            vector_dtype=self.vector_dtype,
            design=design,
        )


def fit_to_moments(
    generator: Generator,
    data: torch.Tensor,
    labels: torch.Tensor | None,
    steps: int,
    rng: torch.Generator,
    lr: float = 1e-3,
    batch_size: int = 256,
) -> float:
    """Start ``generator`` at the per-component diagonal Gaussian of ``data``: regress its
    MLP output on ``mu_k + sigma_k * e`` for ``steps`` Adam steps, where ``mu_k`` and
    ``sigma_k`` are the mean and standard deviation of component k's rows (``labels``; one
    component when None) and ``e`` the first coordinates of the noise the MLP reads (``mu_k``
    alone in coordinates beyond the noise). Returns the last mean squared error.

    A WGAN-GP from a random start needs thousands of steps to place each component; online
    APD in active learning gets a hundred per round. From this start the GAN only has to
    shape the spread: without it, active learning's generator stays between the chains'
    modes and predicts far below them (docs/evaluation.md)."""
    k = generator.components
    ids = torch.zeros(len(data), dtype=torch.int64) if labels is None else labels.cpu()
    if k > 1 and (int(ids.max()) >= k or int(ids.min()) < 0):
        raise ValueError(f"labels must lie in [0, {k}), got {int(ids.min())}..{int(ids.max())}")
    pooled_mu, pooled_sd = data.mean(dim=0), data.std(dim=0, unbiased=len(data) > 1)
    mus, sds = [], []
    for c in range(k):
        rows = data[(ids == c).to(data.device)] if k > 1 else data
        mus.append(rows.mean(dim=0) if len(rows) else pooled_mu)
        sds.append(rows.std(dim=0) if len(rows) > 1 else pooled_sd)
    mu, sd = torch.stack(mus), torch.stack(sds)
    m = min(generator.continuous_dim, data.shape[1])
    opt = torch.optim.Adam(generator.net.parameters(), lr=lr)
    loss = torch.zeros(())
    dev = data.device
    for _ in range(steps):
        weights = torch.tensor(generator.component_weights, device=dev)
        comp = torch.multinomial(weights, batch_size, True, generator=rng)
        rest = torch.randn(batch_size, generator.continuous_dim, generator=rng, device=dev)
        target = mu[comp].clone()
        target[:, :m] += sd[comp, :m] * rest[:, :m]
        if k > 1:
            out = generator.conditional(torch.nn.functional.one_hot(comp, k).float(), rest)
        else:
            out = generator(rest)
        loss = torch.nn.functional.mse_loss(out, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(loss.detach())


class Critic(nn.Module):
    """``D: R^d (x R^K) -> R``, an MLP with ReLU hidden layers and a scalar output (no
    sigmoid); with ``condition_dim`` K > 0 it reads ``x`` next to a one-hot component."""

    def __init__(self, input_dim: int, hidden_sizes: Sequence[int], condition_dim: int = 0) -> None:
        super().__init__()
        self.condition_dim = int(condition_dim)
        self.net = mlp([int(input_dim) + self.condition_dim, *hidden_sizes, 1])

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if self.condition_dim:
            if cond is None:
                raise ValueError("this critic is conditional: pass the one-hot components")
            x = torch.cat([x, cond], dim=1)
        out: torch.Tensor = self.net(x).squeeze(-1)
        return out


@torch.no_grad()
def restandardise(
    generators: Sequence[Generator],
    critic: Critic | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
) -> None:
    """Give the generators the standardisation ``(scale', shift')`` without changing what
    they generate or what the critic says about it: the MLP output changes variables to
    ``u' = (u * scale + shift - shift') / scale'``, which the generators' last layers absorb
    (``W' = diag(scale / scale') W``, ``b' = (b * scale + shift - shift') / scale'``), and the
    critic's first layer takes ``u'`` for ``u`` (``W'_x = W_x diag(scale' / scale)``,
    ``b' = b + W_x (shift' - shift) / scale``; its condition columns are untouched). The
    generators share one standardisation (a generator and its weight average)."""
    old_scale, old_shift = generators[0].scale.clone(), generators[0].shift.clone()
    for gen in generators:
        last = _linears(gen.net)[-1]
        last.weight.mul_((old_scale / scale)[:, None])
        last.bias.copy_((last.bias * old_scale + old_shift - shift) / scale)
        gen.scale.copy_(scale)
        gen.shift.copy_(shift)
    if critic is not None:
        first = _linears(critic.net)[0]
        d = old_scale.shape[0]
        first.bias.add_(first.weight[:, :d] @ ((shift - old_shift) / old_scale))
        first.weight[:, :d].mul_((scale / old_scale)[None, :])


def gradient_penalty(
    critic: nn.Module,
    real: torch.Tensor,
    fake: torch.Tensor,
    rng: torch.Generator | None = None,
    cond: torch.Tensor | None = None,
) -> torch.Tensor:
    """``E[(||grad_xh D(xh)||_2 - 1)^2]`` at ``xh = x + alpha (x~ - x)``, ``alpha ~ U[0,1]``.

    With a conditional critic, pair i of real and fake rows shares the component
    ``cond[i]`` and only ``x`` is interpolated. Differentiable with respect to the critic's
    parameters (``create_graph=True``).
    """
    alpha = torch.rand(real.shape[0], 1, generator=rng, device=real.device, dtype=real.dtype)
    xh = (real + alpha * (fake - real)).requires_grad_(True)
    out = critic(xh) if cond is None else critic(xh, cond)
    (grad,) = torch.autograd.grad(out.sum(), xh, create_graph=True)
    return ((grad.norm(2, dim=1) - 1.0) ** 2).mean()


@dataclass(frozen=True)
class CriticLoss:
    total: torch.Tensor  # L_D, to minimise
    wasserstein: torch.Tensor  # E[D(x)] - E[D(x~)], the W1 estimate (no gradient)
    penalty: torch.Tensor  # the gradient penalty, before lambda (no gradient)


def critic_loss(
    critic: nn.Module,
    real: torch.Tensor,
    fake: torch.Tensor,
    gp_weight: float,
    rng: torch.Generator | None = None,
    cond: torch.Tensor | None = None,
) -> CriticLoss:
    """``L_D = E[D(x~)] - E[D(x)] + lambda * GP``; ``fake`` should be detached."""
    args = () if cond is None else (cond,)
    d_real = critic(real, *args).mean()
    d_fake = critic(fake, *args).mean()
    gp = gradient_penalty(critic, real, fake, rng, cond)
    total = d_fake - d_real + gp_weight * gp
    return CriticLoss(total, (d_real - d_fake).detach(), gp.detach())


def generator_loss(
    critic: nn.Module, fake: torch.Tensor, cond: torch.Tensor | None = None
) -> torch.Tensor:
    """``L_G = -E[D(G(z))]``."""
    out: torch.Tensor = -(critic(fake) if cond is None else critic(fake, cond)).mean()
    return out


@dataclass(frozen=True)
class WGANGPConfig:
    """WGAN-GP hyper-parameters; the defaults are the paper's (see the module docstring).

    ``lr_end_fraction`` < 1 decays both learning rates linearly to ``lr * lr_end_fraction``
    over ``total_steps`` generator steps (1.0: constant, as in the paper). ``ema_decay``
    (``beta``) keeps an exponential moving average of the generator's weights,
    ``phi_avg <- beta phi_avg + (1 - beta) phi`` after every generator step, and makes it the
    generator that is evaluated and kept (Yazici et al., ICLR 2019: averaging damps the
    oscillation of GAN training around its equilibrium); ``None``: the paper's raw weights.
    """

    noise_dim: int = 32
    generator_hidden: tuple[int, ...] = (100, 100, 100)
    critic_hidden: tuple[int, ...] = (100, 100, 100)
    gp_weight: float = 10.0
    critic_steps: int = 5
    batch_size: int = 100
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.9)
    lr_end_fraction: float = 1.0
    ema_decay: float | None = None

    def __post_init__(self) -> None:
        if self.noise_dim <= 0 or self.batch_size <= 0 or self.critic_steps <= 0:
            raise ValueError("noise_dim, batch_size and critic_steps must be positive")
        if not (self.lr > 0 and math.isfinite(self.lr)) or self.gp_weight < 0:
            raise ValueError("lr must be positive and gp_weight non-negative")
        if not 0.0 < self.lr_end_fraction <= 1.0:
            raise ValueError(f"lr_end_fraction must lie in (0, 1], got {self.lr_end_fraction}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "noise_dim": self.noise_dim,
            "generator_hidden": list(self.generator_hidden),
            "critic_hidden": list(self.critic_hidden),
            "gp_weight": self.gp_weight,
            "critic_steps": self.critic_steps,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "betas": list(self.betas),
            "lr_end_fraction": self.lr_end_fraction,
            "ema_decay": self.ema_decay,
        }


@dataclass(frozen=True)
class StepStats:
    """Losses of one generator step (the last of its critic steps for the critic's)."""

    critic_loss: float
    wasserstein: float
    penalty: float
    generator_loss: float


class WGANGP:
    """A generator, a critic and their Adam optimisers; :meth:`step` is one generator step.

    Algorithm 1 calls :meth:`step` with a sampler over a fixed sample set, Algorithm 2 with
    a sampler over a buffer that SGLD keeps refilling; the update itself is the same.
    :attr:`output` is the generator to evaluate and keep: the weight average when
    ``config.ema_decay`` is set, else the trained generator itself.
    """

    def __init__(
        self,
        generator: Generator,
        critic: Critic,
        config: WGANGPConfig,
        total_steps: int,
        rng: torch.Generator,
    ) -> None:
        self.generator = generator
        self.critic = critic
        self.config = config
        self.total_steps = max(1, int(total_steps))
        self.rng = rng
        self.step_count = 0
        self.average: Generator | None = None
        if config.ema_decay is not None:
            self.average = copy.deepcopy(generator)
            self.average.requires_grad_(False)
        # foreach: one fused kernel per step instead of one per tensor (these nets are small)
        self.g_opt = torch.optim.Adam(
            generator.net.parameters(), lr=config.lr, betas=config.betas, foreach=True
        )
        self.c_opt = torch.optim.Adam(
            critic.parameters(), lr=config.lr, betas=config.betas, foreach=True
        )

    @property
    def output(self) -> Generator:
        return self.generator if self.average is None else self.average

    @property
    def device(self) -> torch.device:
        return self.generator.scale.device

    def _set_lr(self) -> None:
        c = self.config
        frac = min(1.0, self.step_count / self.total_steps)
        lr = c.lr * (1.0 - (1.0 - c.lr_end_fraction) * frac)
        for opt in (self.g_opt, self.c_opt):
            for group in opt.param_groups:
                group["lr"] = lr

    def _fake(self, n: int, cond: torch.Tensor | None) -> torch.Tensor:
        """Generated MLP outputs; with ``cond``, for those components."""
        g = self.generator
        if cond is None:
            z = torch.randn(n, g.noise_dim, generator=self.rng, device=self.device)
            return g(z)
        rest = torch.randn(n, g.continuous_dim, generator=self.rng, device=self.device)
        return g.conditional(cond, rest)

    def step(self, real: RealSampler) -> StepStats:
        """``n_critic`` critic updates (fresh real and fake minibatches each), then one
        generator update. Fake rows take the components of the real rows they meet, so the
        critic compares the two distributions component by component."""
        c = self.config
        self._set_lr()
        self.generator.train()
        self.critic.train()
        loss = None
        cond: torch.Tensor | None = None
        for _ in range(c.critic_steps):
            x, cond = real(c.batch_size)
            with torch.no_grad():
                fake = self._fake(c.batch_size, cond)
            loss = critic_loss(self.critic, x, fake, c.gp_weight, self.rng, cond)
            self.c_opt.zero_grad(set_to_none=True)
            loss.total.backward()
            self.c_opt.step()
        assert loss is not None
        for p in self.critic.parameters():
            p.requires_grad_(False)
        g_loss = generator_loss(self.critic, self._fake(c.batch_size, cond), cond)
        self.g_opt.zero_grad(set_to_none=True)
        g_loss.backward()
        self.g_opt.step()
        for p in self.critic.parameters():
            p.requires_grad_(True)
        if self.average is not None and self.config.ema_decay is not None:
            w = 1.0 - self.config.ema_decay
            with torch.no_grad():
                for avg, cur in zip(
                    self.average.net.parameters(), self.generator.net.parameters(), strict=True
                ):
                    avg.lerp_(cur, w)
        self.step_count += 1
        return StepStats(
            critic_loss=float(loss.total.detach()),
            wasserstein=float(loss.wasserstein),
            penalty=float(loss.penalty),
            generator_loss=float(g_loss.detach()),
        )
