"""Which posterior networks answer a request, and the noise that draws them.

Networks come in blocks of :data:`NETWORKS_PER_BLOCK`. Block ``b`` of stream ``s`` is the
generator applied (10 networks at once, always) to noise drawn with NumPy from::

    rng = np.random.default_rng(np.random.SeedSequence(entropy=s.entropy, spawn_key=(b,)))
    z   = rng.standard_normal((10, noise_dim), dtype=np.float32)
    eps = rng.standard_normal((10, P), dtype=np.float32)   # only if the generator has a residual

so a block is a pure function of (checkpoint, stream, block): any worker or replica draws the
same networks, which is what makes ``seed`` reproducible and lets workers share
blocks through Redis. The block size is part of that contract and must not change.

Streams:

* ``seed-<s>`` for a request with ``seed = s`` (``0 <= s < 2**63``): K networks are the first
  K of blocks ``0 .. ceil(K/10) - 1``.
* ``pool``, for requests without a seed, with an entropy of 128 bits that no user seed can
  equal. Its first ``pool_size / 10`` blocks form the shared pool, held in memory as one
  :class:`NetworkBlock` (codes, and tails where kept: 4.2 KB per network for fcNN1). A request
  takes ``ceil(K/10)`` distinct pool blocks chosen at random as a window of consecutive blocks
  (uniform start), or, when K exceeds the pool, every pool block and the stream's next blocks.
  Pool networks are independent draws from the generator, so any K distinct ones are as good
  as any other; a window is a view of the pool, never a copy.

A network is held as its code in the generator's affine subspace (:mod:`apd.factored`), not
as its P weights; checkpoints with residual noise are the exception (:mod:`service.core.model`).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float32]

NETWORKS_PER_BLOCK: Final = 10
MAX_SEED: Final = 2**63 - 1
# Fixed and above MAX_SEED, so the pool's stream never coincides with a seeded one.
POOL_ENTROPY: Final = 0xA9D0_5EED_0000_0000_0000_0000_0000_0001


@dataclass(frozen=True)
class Stream:
    """A reproducible sequence of network blocks. ``name`` appears in cache keys."""

    name: str
    entropy: int

    @classmethod
    def for_seed(cls, seed: int) -> Stream:
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must lie in [0, {MAX_SEED}], got {seed}")
        return cls(f"seed-{seed}", seed)


POOL_STREAM: Final = Stream("pool", POOL_ENTROPY)


def num_blocks(num_networks: int) -> int:
    return math.ceil(num_networks / NETWORKS_PER_BLOCK)


def block_noise(
    stream: Stream, block: int, noise_dim: int, num_params: int, residual: bool
) -> tuple[FloatArray, FloatArray | None]:
    """The generator's input for ``block`` of ``stream`` (see the module docstring)."""
    rng = np.random.default_rng(np.random.SeedSequence(entropy=stream.entropy, spawn_key=(block,)))
    z = rng.standard_normal((NETWORKS_PER_BLOCK, noise_dim), dtype=np.float32)
    eps = (
        rng.standard_normal((NETWORKS_PER_BLOCK, num_params), dtype=np.float32)
        if residual
        else None
    )
    return z, eps


@dataclass(frozen=True)
class NetworkPlan:
    """The blocks of one stream whose first ``num_networks`` networks answer a request."""

    stream: Stream
    blocks: tuple[int, ...]
    num_networks: int


def plan_networks(
    num_networks: int,
    seed: int | None,
    pool_blocks: int,
    rng: np.random.Generator,
    tailed_blocks: int | None = None,
) -> NetworkPlan:
    """Blocks for a request of K = ``num_networks`` (see the module docstring). A window that
    fits in the pool's first ``tailed_blocks`` blocks (those kept with their tails) is drawn
    from them."""
    if num_networks < 1:
        raise ValueError(f"num_networks must be >= 1, got {num_networks}")
    n = num_blocks(num_networks)
    if seed is not None:
        return NetworkPlan(Stream.for_seed(seed), tuple(range(n)), num_networks)
    if tailed_blocks is not None and n <= tailed_blocks:
        pool_blocks = tailed_blocks
    if n <= pool_blocks:
        start = int(rng.integers(0, pool_blocks - n + 1))
        return NetworkPlan(POOL_STREAM, tuple(range(start, start + n)), num_networks)
    return NetworkPlan(POOL_STREAM, tuple(range(n)), num_networks)


@dataclass(frozen=True)
class NetworkBlock:
    """Consecutive networks of one stream: their codes ``(k, r)`` and, where kept, their tails
    ``(k, P_tail)`` (:meth:`apd.factored.AffinePosterior.tails`; see
    :mod:`service.core.model`)."""

    codes: FloatArray
    tails: FloatArray | None = None

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes + (0 if self.tails is None else self.tails.nbytes))

    def __getitem__(self, rows: slice) -> NetworkBlock:
        return NetworkBlock(self.codes[rows], None if self.tails is None else self.tails[rows])

    @classmethod
    def concatenate(cls, blocks: Sequence[NetworkBlock]) -> NetworkBlock:
        codes = np.concatenate([b.codes for b in blocks])
        tails = [b.tails for b in blocks]
        if any(t is None for t in tails):
            return cls(codes)
        return cls(codes, np.concatenate(tails))  # type: ignore[arg-type]


BlockSource = Callable[[Stream, Sequence[int]], Awaitable[list[NetworkBlock]]]
PoolDraw = Callable[[Stream, Sequence[int], bool], Awaitable[list[NetworkBlock]]]


class PosteriorPool:
    """The shared pool held in memory, and the networks of any request's plan.

    ``source`` fetches a seeded request's blocks through the caches
    (:class:`service.infra.cache.NetworkCache`). The pool's own blocks are drawn once, by
    :meth:`load`, with ``draw(stream, blocks, tails)`` (no cache: drawing them is cheaper
    than fetching them), and kept for the process's life, read-only; no request evicts them.
    The first ``tailed_size`` networks are kept with their tails (all of them for fcNN1; for an
    architecture whose tails are large, as many as the tail budget holds), and a request
    whose K fits among them is answered from them, with no tail to compute.
    """

    def __init__(
        self, pool_size: int, source: BlockSource, draw: PoolDraw, tailed_size: int | None = None
    ) -> None:
        tailed_size = pool_size if tailed_size is None else tailed_size
        for size in (pool_size, tailed_size):
            if size % NETWORKS_PER_BLOCK:
                raise ValueError(f"pool sizes must be multiples of {NETWORKS_PER_BLOCK}")
        if not 0 <= tailed_size <= pool_size:
            raise ValueError(f"tailed_size must lie in 0..{pool_size}, got {tailed_size}")
        self.pool_blocks = pool_size // NETWORKS_PER_BLOCK
        self.tailed_blocks = tailed_size // NETWORKS_PER_BLOCK
        self._source = source
        self._draw = draw
        self._tailed: NetworkBlock | None = None
        self._bare: NetworkBlock | None = None

    @property
    def loaded(self) -> bool:
        return self._tailed is not None

    @property
    def size(self) -> int:
        return self.pool_blocks * NETWORKS_PER_BLOCK if self.loaded else 0

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in (self._tailed, self._bare) if p is not None)

    async def load(self) -> None:
        t = self.tailed_blocks
        parts = []
        for blocks, tails in ((range(t), True), (range(t, self.pool_blocks), False)):
            drawn = await self._draw(POOL_STREAM, blocks, tails) if len(blocks) else []
            part = (
                NetworkBlock.concatenate(drawn)
                if drawn
                else NetworkBlock(np.empty((0, 0), np.float32))
            )
            for array in (part.codes, part.tails):
                if array is not None:
                    array.setflags(write=False)
            parts.append(part)
        self._tailed, self._bare = parts

    def plan(self, num_networks: int, seed: int | None) -> NetworkPlan:
        return plan_networks(
            num_networks, seed, self.pool_blocks, np.random.default_rng(), self.tailed_blocks
        )

    async def segments(self, plan: NetworkPlan) -> list[NetworkBlock]:
        """The plan's first K networks as blocks of ``k_i`` networks with ``sum k_i = K``.

        Pool blocks come as views of the pool (at most two: with tails, then without); other
        blocks one each.
        """
        segments: list[NetworkBlock] = []
        rest: Sequence[int] = plan.blocks
        if plan.stream == POOL_STREAM and self._tailed is not None and self._bare is not None:
            held = [b for b in plan.blocks if b < self.pool_blocks]
            rest = [b for b in plan.blocks if b >= self.pool_blocks]
            if held:
                start, stop = held[0], held[-1] + 1
                if held != list(range(start, stop)):
                    raise ValueError("pool blocks of a plan must be consecutive")
                t, per = self.tailed_blocks, NETWORKS_PER_BLOCK
                if start < t:
                    segments.append(self._tailed[start * per : min(stop, t) * per])
                if stop > t:
                    segments.append(self._bare[(max(start, t) - t) * per : (stop - t) * per])
        if rest:
            segments += await self._source(plan.stream, rest)
        return truncate(segments, plan.num_networks)


def truncate(segments: Sequence[NetworkBlock], num_networks: int) -> list[NetworkBlock]:
    """The first ``num_networks`` networks of the concatenated ``segments``, without copying."""
    out: list[NetworkBlock] = []
    left = num_networks
    for seg in segments:
        if left <= 0:
            break
        out.append(seg[:left])
        left -= len(out[-1])
    if left > 0:
        raise ValueError(f"segments hold {num_networks - left} networks, {num_networks} needed")
    return out
