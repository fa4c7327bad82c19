"""The posterior served at about the cost of one network: the factored forward over codes.

Every network an APD generator draws (without residual noise) lies in one affine subspace::

    theta_k = offset + c_k @ directions,        c_k in R^r  (the network's code)

(:attr:`apd.checkpoint.Checkpoint.affine`; ``r`` = 46 for the shipped fcNN1, the last hidden
width for the paper's design). The first layer is linear in its weights, so for a batch ``x``
the first-layer pre-activations of all K networks are::

    a_k(x) = x @ W1(theta_k) + b1(theta_k) = sum_j c~_kj (x @ W1_j + b1_j),    c~_k = (1, c_k)

with ``W1_0, b1_0`` the offset's first layer and ``W1_j, b1_j`` direction j's. So

1. **projection** (independent of K): ``U = x @ [W1_0 | W1_1 | ... | W1_r] + b``, one GEMM of
   ``(N, D) @ (D, (r+1) H1)``;
2. **contraction**: ``a = c~ @ U``, one GEMM of ``(K, r+1) @ (r+1, N H1)``, never a K x P
   matrix;
3. **tails**: the layers after the first are small next to it (fcNN1: 1,010 of 79,510
   weights); they are materialised per network from the codes (``offset_tail + c @
   directions_tail``) a chunk of networks at a time and run as batched GEMMs
   (:func:`apd.networks.forward_hidden`).

The materialised first layer costs ``K r D H1`` to form (memory-bound: counted
:data:`FORMING_COST` times) and ``K N D H1`` to run; the factored one
``(r+1) N D H1 + K (r+1) N H1``. For few networks on many inputs (fcNN1: K up to 12 at N = 64)
forming the first layers is cheaper, and :meth:`plan` picks the cheaper path per request from
those counts (measured: benchmarks/results/factored_crossover.md). Both give the same numbers
up to float32 rounding (tests check 1e-5 against :meth:`Checkpoint.generate` +
:func:`forward_probs`).

**Residual noise** (``theta_k = offset + c_k @ directions + s * eps_k``, ``eps_k ~ N(0, I_P)``;
MLPs) is served without materialising it, by the local reparameterisation (Kingma, Salimans &
Welling 2015). For one input ``x`` the first layer's noise ``x @ (s_W * E) + s_b * e`` is
Gaussian with independent units of standard deviation ``sigma(x) = sqrt(x^2 @ s_W^2 + s_b^2)``,
so the network's pre-activations on ``x`` have exactly the distribution of::

    a_k(x) = sum_j c~_kj (x @ W1_j + b1_j) + sigma(x) * xi_k,          xi_k ~ N(0, I_H1)

``sigma`` is one more GEMM of ``x^2`` (independent of K) and ``xi_k`` is H1 numbers per network;
the tails take their residual ``s_tail * eps_tail_k`` as they are (P_tail numbers). A network
of such a posterior is therefore its **code** ``(c_k, xi_k, eps_tail_k)`` (:attr:`code_dim`
numbers; fcNN1 at r = 89: 1,199), still never P weights. Each input's answer from a network is
distributed exactly as under the weight-space noise (:meth:`apd.checkpoint.Checkpoint.generate`);
what differs is only how the noise of two inputs *of one request* is correlated, which no
per-input score (predictive, entropy, mutual information, variance) sees. A convolution's
positions share their kernel's noise, so a CNN's residual is not factorised this way.

Networks go through in chunks whose working set is at most ``chunk_bytes``, and their
softmax outputs are folded into a :class:`apd.uncertainty.PredictiveAccumulator`, so memory is
bounded whatever K: the largest array a request creates is ``U`` (``N (r+1) H1`` floats).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray

from apd.networks import (
    Conv2d,
    MLPSpec,
    NetworkSpec,
    first_layer,
    forward_after_first,
    im2col,
    images_nhwc,
    softmax,
    tail_start,
    unflatten_tail,
)
from apd.uncertainty import PredictiveAccumulator, PredictiveSummary

FloatArray = NDArray[np.float32]

DEFAULT_CHUNK_BYTES: Final = 8 << 20
# Forming a network's first-layer weights from its code (r multiply-adds per weight, then a
# write) is bound by memory, not arithmetic: measured at 2-15x the time of a GEMM
# multiply-add (benchmarks/results/factored_crossover.md); the plan counts it as 4.
FORMING_COST: Final = 4


class FirstLayer(enum.StrEnum):
    """How a request's first layer is computed (:meth:`AffinePosterior.plan`)."""

    FACTORED = "factored"
    MATERIALISED = "materialised"


@dataclass(frozen=True)
class ForwardPlan:
    """The path and chunking of one request: ``num_networks`` in chunks of ``chunk``."""

    first_layer: FirstLayer
    chunk: int
    num_networks: int
    num_inputs: int


class AffinePosterior:
    """The networks ``offset + code @ directions`` of an MLP ``spec``, run from their codes.

    Built once per checkpoint (the stacked first layer is ``(r+1) D H1`` floats: 14.7 MB for
    fcNN1 at r = 46); thread-safe, as nothing is mutated after construction.
    """

    def __init__(
        self,
        spec: NetworkSpec,
        offset: FloatArray,
        directions: FloatArray,
        *,
        residual_std: FloatArray | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        p = spec.num_params
        if offset.shape != (p,) or directions.ndim != 2 or directions.shape[1] != p:
            raise ValueError(
                f"expected offset ({p},) and directions (r, {p}), "
                f"got {offset.shape} and {directions.shape}"
            )
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        if residual_std is not None:
            if not isinstance(spec, MLPSpec):
                raise ValueError(
                    "residual noise is factorised for MLPs only (a convolution's positions "
                    "share their kernel's noise): materialise the networks instead"
                )
            if residual_std.shape != (p,):
                raise ValueError(f"expected residual_std ({p},), got {residual_std.shape}")
        self.spec = spec
        self.subspace_dim = r = directions.shape[0]
        self.chunk_bytes = chunk_bytes
        w_shape, (out,) = spec.layer_shapes[0]
        ws, bs = spec.offsets()[0]
        # The first layer as a matrix (F, O) per direction: F = D for a dense layer, the
        # im2col patch length C k k for a conv (weights (O, C, k, k), so transposed).
        fan_in = math.prod(w_shape) // out
        both_w = np.concatenate([offset[None, ws], directions[:, ws]])
        if isinstance(spec, MLPSpec):
            mats = both_w.reshape(r + 1, fan_in, out)
            self._outputs_per_input = out
        else:
            mats = both_w.reshape(r + 1, out, fan_in).transpose(0, 2, 1)
            self._outputs_per_input = math.prod(spec.output_shapes[0])
        # (F, (r+1) O): column block j holds direction j's first layer.
        self._stacked_w1 = np.ascontiguousarray(mats.transpose(1, 0, 2).reshape(fan_in, -1))
        self._stacked_b1 = np.concatenate([offset[None, bs], directions[:, bs]])  # (r+1, O)
        self._first_weights = math.prod(w_shape) + out
        self._macs_per_input = self._outputs_per_input * fan_in
        # The directions' first layers as a view of ``directions`` (rows strided: BLAS takes
        # them as they are), not a third copy of the largest array beside the stacked one.
        self._w1 = (np.ascontiguousarray(offset[ws]), directions[:, ws])
        self._b1 = (np.ascontiguousarray(offset[bs]), np.ascontiguousarray(directions[:, bs]))
        start = tail_start(spec)
        self._tail = (
            np.ascontiguousarray(offset[start:]),
            np.ascontiguousarray(directions[:, start:]),
        )
        # Residual noise: the first layer's weight and bias variances (for sigma(x)) and the
        # tails' standard deviations; a code is (c, xi, eps_tail) (module docstring).
        self._residual: tuple[FloatArray, FloatArray, FloatArray] | None = None
        self.residual_dim = 0
        if residual_std is not None:
            var = np.square(residual_std, dtype=np.float32)
            self._residual = (
                np.ascontiguousarray(var[ws].reshape(fan_in, out)),
                np.ascontiguousarray(var[bs]),
                np.ascontiguousarray(residual_std[start:]),
            )
            self.residual_dim = out + self.tail_params
        self.code_dim = r + self.residual_dim

    def codes(self, subspace: FloatArray, noise: FloatArray | None = None) -> FloatArray:
        """Networks' codes ``(k, code_dim)``: the generator's subspace codes ``(k, r)`` and,
        for a posterior with residual noise, their standard normal noise ``(k,
        residual_dim)`` beside them (the ``(c, xi, eps_tail)`` layout, module docstring);
        without residual noise, ``noise`` is None or ``(k, 0)``."""
        if subspace.ndim != 2 or subspace.shape[1] != self.subspace_dim:
            raise ValueError(
                f"expected subspace codes of shape (k, {self.subspace_dim}), got {subspace.shape}"
            )
        if not self.residual_dim:
            if noise is not None and noise.size:
                raise ValueError("this posterior has no residual noise")
            return subspace
        if noise is None or noise.shape != (len(subspace), self.residual_dim):
            got = None if noise is None else noise.shape
            raise ValueError(
                f"expected residual noise of shape ({len(subspace)}, {self.residual_dim}), "
                f"got {got}"
            )
        return np.concatenate([subspace, noise], axis=1)

    def peak_bytes(self, num_inputs: int) -> int:
        """The most memory one :meth:`summarize` on ``num_inputs`` inputs holds at once,
        whatever K: the inputs and their first-layer rows (im2col patches for a CNN), the
        projection ``U`` and its transposed copy (bounded by :meth:`plan`), one chunk of
        networks, and the running sums."""
        n = num_inputs
        rows = n * self._macs_per_input // max(1, self._stacked_b1.shape[1]) * 4
        projection = min(2 * 4 * (self.subspace_dim + 1) * n * self._outputs_per_input,
                         4 * self.chunk_bytes)  # fmt: skip
        sums = n * self.spec.num_classes * 8 * 4
        noise_scale = 0 if self._residual is None else 4 * n * self._outputs_per_input
        return (
            n * self.spec.input_dim * 4 + rows + projection + noise_scale + self.chunk_bytes + sums
        )

    def plan(self, num_networks: int, num_inputs: int) -> ForwardPlan:
        """The cheaper first-layer path (by multiply-add counts, within the chunk budget for
        the projection) and the chunk size."""
        if num_networks < 1 or num_inputs < 1:
            raise ValueError("need at least one network and one input")
        k, n, r = num_networks, num_inputs, self.subspace_dim
        outputs = n * self._outputs_per_input
        factored = (r + 1) * n * self._macs_per_input + k * (r + 1) * outputs
        materialised = k * r * self._first_weights * FORMING_COST + k * n * self._macs_per_input
        fits = 2 * 4 * (r + 1) * outputs <= 4 * self.chunk_bytes
        path = FirstLayer.FACTORED if factored <= materialised and fits else FirstLayer.MATERIALISED
        per_network = 2 * n * self.spec.max_activations + self.tail_params
        if path is FirstLayer.MATERIALISED:
            per_network += self._first_weights
        chunk = max(1, min(k, self.chunk_bytes // (4 * per_network)))
        return ForwardPlan(path, chunk, k, n)

    def _patches(self, x: FloatArray) -> FloatArray:
        """The first layer's input rows: ``x`` itself (dense), or its im2col patches."""
        if isinstance(self.spec, MLPSpec):
            return x
        conv = self.spec.layers[0]
        assert isinstance(conv, Conv2d)
        patches = im2col(images_nhwc(self.spec, x), conv.kernel_size, conv.padding)
        return patches.reshape(-1, patches.shape[-1])

    def project(self, x: FloatArray) -> FloatArray:
        """``U (r+1, ...)``: the inputs through the offset's and every direction's first
        layer, biases included (step 1 of the module docstring). Laid out so that the
        contraction gives each network's activations as the rest of its forward takes them:
        unit-major ``(H1, N)`` for an MLP, channels-last ``(N, Ho, Wo, O)`` for a CNN."""
        r1, out = self._stacked_b1.shape
        rows = self._patches(x)
        u = (rows @ self._stacked_w1).reshape(len(rows), r1, out)
        u += self._stacked_b1
        order = (1, 2, 0) if isinstance(self.spec, MLPSpec) else (1, 0, 2)
        return np.ascontiguousarray(u.transpose(order)).reshape(r1, -1)

    def noise_scale(self, x: FloatArray) -> FloatArray | None:
        """``sigma(x)``, unit-major ``(H1, N)``: the standard deviation of the first layer's
        residual noise on each input (module docstring); None without residual noise."""
        if self._residual is None:
            return None
        var_w, var_b, _ = self._residual
        var = np.square(x) @ var_w
        var += var_b
        return np.ascontiguousarray(np.sqrt(var, out=var).T)

    def _first_layer_materialised(self, codes: FloatArray, x: FloatArray) -> FloatArray:
        w_shape = self.spec.layer_shapes[0][0]
        w = (codes @ self._w1[1] + self._w1[0]).reshape(-1, *w_shape)
        b = codes @ self._b1[1] + self._b1[0]
        if isinstance(self.spec, MLPSpec):
            return np.matmul(w.transpose(0, 2, 1), x.T) + b[:, :, None]
        return first_layer(self.spec, x, w, b)

    def tails(self, codes: FloatArray) -> FloatArray:
        """The layers after the first of the networks ``codes (k, code_dim)``, as flat ``(k,
        P_tail)`` vectors in the spec's layout, residual noise included (small enough to keep
        beside the codes for fcNN1)."""
        r = self.subspace_dim
        tails = codes[:, :r] @ self._tail[1] + self._tail[0]
        if self._residual is not None:
            tails += self._residual[2] * codes[:, r + self._outputs_per_input :]
        return tails

    @property
    def tail_params(self) -> int:
        return int(self._tail[0].shape[0])

    def member_probs(
        self,
        codes: FloatArray,
        x: FloatArray,
        plan: ForwardPlan,
        u: FloatArray | None = None,
        tails: FloatArray | None = None,
        sigma: FloatArray | None = None,
    ) -> FloatArray:
        """Softmax outputs ``(k, C, N)`` (class-major) of the networks ``codes (k,
        code_dim)`` (one chunk) on ``x (N, D)``.

        ``u`` is :meth:`project`'s output for ``x`` (computed here if absent on the factored
        path); ``tails`` the chunk's :meth:`tails` (computed here if absent); ``sigma``
        :meth:`noise_scale`'s (computed here if absent, with residual noise). An MLP's
        activations are kept unit-major, ``(k, H, N)``, so that the softmax reduces over a
        middle axis; a CNN's layers after the first are the reference ones
        (:func:`apd.networks.forward_after_first`).
        """
        k, n, r = codes.shape[0], x.shape[0], self.subspace_dim
        if plan.first_layer is FirstLayer.FACTORED:
            if u is None:
                u = self.project(x)
            extended = np.empty((k, r + 1), dtype=np.float32)
            extended[:, 0] = 1.0
            extended[:, 1:] = codes[:, :r]
            h = extended @ u
        else:
            h = self._first_layer_materialised(codes[:, :r], x)
        if self._residual is not None:
            if sigma is None:
                sigma = self.noise_scale(x)
            assert sigma is not None
            xi = codes[:, r : r + self._outputs_per_input]
            h = h.reshape(k, -1, n)
            h += xi[:, :, None] * sigma
        layers = unflatten_tail(self.spec, self.tails(codes) if tails is None else tails)
        if not isinstance(self.spec, MLPSpec):
            shape = (k, n, *np.roll(self.spec.output_shapes[0], -1))  # (k, N, Ho, Wo, O)
            logits = forward_after_first(self.spec, layers, h.reshape(shape))
            return softmax(logits).transpose(0, 2, 1)
        h = h.reshape(k, -1, n)
        for w, b in layers:
            np.maximum(h, 0.0, out=h)
            if n == 1:  # batched matrix-vector products: einsum streams W once (see networks)
                h = np.einsum("kio,kin->kon", w, h)
            else:
                h = np.matmul(w.transpose(0, 2, 1), h)
            h += b[:, :, None]
        h -= h.max(axis=1, keepdims=True)
        np.exp(h, out=h)
        h /= h.sum(axis=1, keepdims=True)
        return h

    def summarize(
        self, codes: FloatArray, x: FloatArray, tails: FloatArray | None = None
    ) -> PredictiveSummary:
        """The posterior predictive and its uncertainty for the networks ``codes (K, r)`` on
        ``x (N, D)``, in bounded memory (see the module docstring). ``tails (K, P_tail)``, if
        given, are the networks' :meth:`tails`, kept from an earlier call."""
        return self.summarize_segments([(codes, tails)], x)

    def summarize_segments(
        self,
        segments: Sequence[tuple[FloatArray, FloatArray | None]],
        x: FloatArray,
        interrupt: Callable[[], None] | None = None,
    ) -> PredictiveSummary:
        """:meth:`summarize` for networks held in several arrays ``(codes, tails or None)``.
        ``interrupt``, if given, is called before each chunk: what it raises stops the forward
        there (a cancelled request's)."""
        if x.ndim != 2 or x.shape[1] != self.spec.input_dim:
            raise ValueError(f"expected inputs of shape (N, {self.spec.input_dim}), got {x.shape}")
        for codes, tails in segments:
            if codes.ndim != 2 or codes.shape[1] != self.code_dim:
                raise ValueError(f"expected codes of shape (K, {self.code_dim}), got {codes.shape}")
            if tails is not None and tails.shape != (codes.shape[0], self.tail_params):
                raise ValueError(f"expected tails of shape {(codes.shape[0], self.tail_params)}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        plan = self.plan(sum(len(codes) for codes, _ in segments), x.shape[0])
        u = self.project(x) if plan.first_layer is FirstLayer.FACTORED else None
        sigma = self.noise_scale(x)
        acc = PredictiveAccumulator()
        for codes, tails in segments:
            for start in range(0, len(codes), plan.chunk):
                if interrupt is not None:
                    interrupt()
                rows = slice(start, start + plan.chunk)
                chunk_tails = None if tails is None else tails[rows]
                probs = self.member_probs(codes[rows], x, plan, u, chunk_tails, sigma)
                acc.add(probs.transpose(0, 2, 1))
        return acc.summary()
