"""Which posterior networks answer a request, and the noise that draws them.

Networks come in blocks of :data:`NETWORKS_PER_BLOCK`. Block ``b`` of stream ``s`` is the
generator applied (10 networks at once, always) to noise drawn with NumPy from::

    rng = np.random.default_rng(np.random.SeedSequence(entropy=s.entropy, spawn_key=(b,)))
    z   = rng.standard_normal((10, noise_dim), dtype=np.float32)
    eps = rng.standard_normal((10, P), dtype=np.float32)   # only if the generator has a residual

so a block is a pure function of (checkpoint, stream, block): any worker, replica or backend
draws the same networks, which is what makes ``seed`` reproducible and lets workers share
blocks through Redis. The block size is part of that contract and must not change.

Streams:

* ``seed-<s>`` for a request with ``seed = s`` (``0 <= s < 2**63``): K networks are the first
  K of blocks ``0 .. ceil(K/10) - 1``.
* ``pool``, for requests without a seed, with an entropy of 128 bits that no user seed can
  equal. Its first ``pool_size / 10`` blocks form the shared pool, held in memory as one
  contiguous ``(pool_size, P)`` array. A request takes ``ceil(K/10)`` distinct pool blocks
  chosen at random as a window of consecutive blocks (uniform start), or, when K exceeds the
  pool, every pool block and the stream's next blocks. Pool networks are independent draws
  from the generator, so any K distinct ones are as good as any other; a window is a view of
  the pool array, so the K networks run as one batched forward without first copying
  K x P weights (a 32 MB copy at K = 100 for fcNN1 costs several times the forward itself).

Networks that do not lie in one array (a seeded request's blocks, each its own cache entry)
are evaluated one contiguous segment at a time: one batched pass per block of 10 networks,
never a loop over single networks, and no K x P copy.
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
    num_networks: int, seed: int | None, pool_blocks: int, rng: np.random.Generator
) -> NetworkPlan:
    """Blocks for a request of K = ``num_networks`` (see the module docstring)."""
    if num_networks < 1:
        raise ValueError(f"num_networks must be >= 1, got {num_networks}")
    n = num_blocks(num_networks)
    if seed is not None:
        return NetworkPlan(Stream.for_seed(seed), tuple(range(n)), num_networks)
    if n <= pool_blocks:
        start = int(rng.integers(0, pool_blocks - n + 1))
        return NetworkPlan(POOL_STREAM, tuple(range(start, start + n)), num_networks)
    return NetworkPlan(POOL_STREAM, tuple(range(n)), num_networks)


BlockSource = Callable[[Stream, Sequence[int]], Awaitable[list[FloatArray]]]


class PosteriorPool:
    """The shared pool held in memory, and the networks of any request's plan.

    ``source`` fetches blocks through the caches (:class:`service.cache.NetworkCache`).
    The pool's own blocks are fetched once, by :meth:`load`, through ``pool_source`` (default:
    ``source``; the service passes one that keeps them out of the LRU, since the pool holds
    them), and kept for the process's life as one read-only array.
    """

    def __init__(
        self, pool_size: int, source: BlockSource, pool_source: BlockSource | None = None
    ) -> None:
        if pool_size % NETWORKS_PER_BLOCK:
            raise ValueError(f"pool_size must be a multiple of {NETWORKS_PER_BLOCK}")
        self.pool_blocks = pool_size // NETWORKS_PER_BLOCK
        self._source = source
        self._pool_source = pool_source or source
        self._pool: FloatArray | None = None

    @property
    def loaded(self) -> bool:
        return self._pool is not None

    @property
    def size(self) -> int:
        return 0 if self._pool is None else len(self._pool)

    async def load(self) -> None:
        blocks = await self._pool_source(POOL_STREAM, range(self.pool_blocks))
        pool = np.concatenate(blocks, axis=0)
        pool.setflags(write=False)
        self._pool = pool

    def plan(self, num_networks: int, seed: int | None) -> NetworkPlan:
        return plan_networks(num_networks, seed, self.pool_blocks, np.random.default_rng())

    async def segments(self, plan: NetworkPlan) -> list[FloatArray]:
        """The plan's first K networks as arrays ``(k_i, P)`` with ``sum k_i = K``.

        Pool blocks come as one view of the pool array; other blocks one array each.
        """
        segments: list[FloatArray] = []
        rest: Sequence[int] = plan.blocks
        if plan.stream == POOL_STREAM and self._pool is not None:
            held = [b for b in plan.blocks if b < self.pool_blocks]
            rest = [b for b in plan.blocks if b >= self.pool_blocks]
            if held:
                start, stop = held[0], held[-1] + 1
                if held != list(range(start, stop)):
                    raise ValueError("pool blocks of a plan must be consecutive")
                segments.append(self._pool[start * NETWORKS_PER_BLOCK : stop * NETWORKS_PER_BLOCK])
        if rest:
            segments += await self._source(plan.stream, rest)
        return truncate(segments, plan.num_networks)


def truncate(segments: Sequence[FloatArray], num_networks: int) -> list[FloatArray]:
    """The first ``num_networks`` rows of the concatenated ``segments``, without copying."""
    out: list[FloatArray] = []
    left = num_networks
    for seg in segments:
        if left <= 0:
            break
        out.append(seg[:left])
        left -= len(out[-1])
    if left > 0:
        raise ValueError(f"segments hold {num_networks - left} networks, {num_networks} needed")
    return out
