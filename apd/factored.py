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

The materialised first layer costs ``K r D H1`` to form and ``K N D H1`` to run; the factored one
``(r+1) N D H1 + K (r+1) N H1``. For small K at large N (K below about ``(r+1) N / (r + N)``,
e.g. K < 27 at N = 64 for r = 46) forming the first layers is cheaper, and :meth:`plan` picks
the cheaper path per request from those counts. Both give the same numbers up to float32
rounding (tests check 1e-5 against :meth:`Checkpoint.generate` + :func:`forward_probs`).

Networks go through in chunks whose working set is at most ``chunk_bytes``, and their
softmax outputs are folded into a :class:`apd.uncertainty.PredictiveAccumulator`, so memory is
bounded whatever K: the largest array a request creates is ``U`` (``N (r+1) H1`` floats).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray

from apd.networks import MLPSpec, unflatten
from apd.uncertainty import PredictiveAccumulator, PredictiveSummary

FloatArray = NDArray[np.float32]

DEFAULT_CHUNK_BYTES: Final = 8 << 20


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
        spec: MLPSpec,
        offset: FloatArray,
        directions: FloatArray,
        *,
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
        self.spec = spec
        self.code_dim = r = directions.shape[0]
        self.chunk_bytes = chunk_bytes
        d, h1 = spec.layer_sizes[0], spec.layer_sizes[1]
        ws, bs = spec.offsets()[0]
        both_w = np.concatenate([offset[None, ws], directions[:, ws]]).reshape(r + 1, d, h1)
        # (D, (r+1) H1): row d holds input d's weights into every direction's hidden units.
        self._stacked_w1 = np.ascontiguousarray(both_w.transpose(1, 0, 2).reshape(d, -1))
        self._stacked_b1 = np.concatenate([offset[None, bs], directions[:, bs]])  # (r+1, H1)
        self._w1 = (np.ascontiguousarray(offset[ws]), np.ascontiguousarray(directions[:, ws]))
        self._b1 = (np.ascontiguousarray(offset[bs]), np.ascontiguousarray(directions[:, bs]))
        self._tail_spec = MLPSpec(f"{spec.name}-tail", spec.layer_sizes[1:], spec.activation)
        self._tail = (
            np.ascontiguousarray(offset[bs.stop :]),
            np.ascontiguousarray(directions[:, bs.stop :]),
        )

    @property
    def stacked_bytes(self) -> int:
        """Memory held for the factored first layer and the tails' affine maps."""
        arrays = (self._stacked_w1, self._stacked_b1, *self._w1, *self._b1, *self._tail)
        return sum(a.nbytes for a in arrays)

    def plan(self, num_networks: int, num_inputs: int) -> ForwardPlan:
        """The cheaper first-layer path (by multiply-add counts) and the chunk size."""
        if num_networks < 1 or num_inputs < 1:
            raise ValueError("need at least one network and one input")
        k, n, r = num_networks, num_inputs, self.code_dim
        d, h1 = self.spec.layer_sizes[0], self.spec.layer_sizes[1]
        factored = (r + 1) * n * d * h1 + k * (r + 1) * n * h1
        materialised = k * r * d * h1 + k * n * d * h1
        path = FirstLayer.FACTORED if factored <= materialised else FirstLayer.MATERIALISED
        per_network = n * sum(self.spec.layer_sizes[1:]) + self._tail_spec.num_params
        if path is FirstLayer.MATERIALISED:
            per_network += d * h1
        chunk = max(1, min(k, self.chunk_bytes // (4 * per_network)))
        return ForwardPlan(path, chunk, k, n)

    def project(self, x: FloatArray) -> FloatArray:
        """``U (r+1, H1 N)``: the inputs through the offset's and every direction's first
        layer, biases included (step 1 of the module docstring), laid out unit-major so that
        each network's activations come out as ``(H1, N)``."""
        n = x.shape[0]
        r1, h1 = self._stacked_b1.shape
        u = (x @ self._stacked_w1).reshape(n, r1, h1)
        u += self._stacked_b1
        return np.ascontiguousarray(u.transpose(1, 2, 0)).reshape(r1, h1 * n)

    def _first_layer_materialised(self, codes: FloatArray, x: FloatArray) -> FloatArray:
        d, h1 = self.spec.layer_sizes[0], self.spec.layer_sizes[1]
        w = (codes @ self._w1[1] + self._w1[0]).reshape(-1, d, h1)
        b = codes @ self._b1[1] + self._b1[0]
        return np.matmul(w.transpose(0, 2, 1), x.T) + b[:, :, None]

    def tails(self, codes: FloatArray) -> FloatArray:
        """The layers after the first of the networks ``codes (k, r)``, as flat ``(k, P_tail)``
        vectors in the spec's layout (small enough to keep beside the codes for fcNN1)."""
        return codes @ self._tail[1] + self._tail[0]

    @property
    def tail_params(self) -> int:
        return self._tail_spec.num_params

    def member_probs(
        self,
        codes: FloatArray,
        x: FloatArray,
        plan: ForwardPlan,
        u: FloatArray | None = None,
        tails: FloatArray | None = None,
    ) -> FloatArray:
        """Softmax outputs ``(k, C, N)`` (class-major) of the networks ``codes (k, r)`` (one
        chunk) on ``x (N, D)``.

        ``u`` is :meth:`project`'s output for ``x`` (computed here if absent on the factored
        path); ``tails`` the chunk's :meth:`tails` (computed here if absent). Activations are
        kept unit-major, ``(k, H, N)``, so that the softmax reduces over a middle axis.
        """
        k, n = codes.shape[0], x.shape[0]
        if plan.first_layer is FirstLayer.FACTORED:
            if u is None:
                u = self.project(x)
            extended = np.empty((k, self.code_dim + 1), dtype=np.float32)
            extended[:, 0] = 1.0
            extended[:, 1:] = codes
            h = (extended @ u).reshape(k, -1, n)
        else:
            h = self._first_layer_materialised(codes, x)
        for w, b in unflatten(self._tail_spec, self.tails(codes) if tails is None else tails):
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
        self, segments: Sequence[tuple[FloatArray, FloatArray | None]], x: FloatArray
    ) -> PredictiveSummary:
        """:meth:`summarize` for networks held in several arrays ``(codes, tails or None)``."""
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
        acc = PredictiveAccumulator()
        for codes, tails in segments:
            for start in range(0, len(codes), plan.chunk):
                rows = slice(start, start + plan.chunk)
                chunk_tails = None if tails is None else tails[rows]
                probs = self.member_probs(codes[rows], x, plan, u, chunk_tails)
                acc.add(probs.transpose(0, 2, 1))
        return acc.summary()
