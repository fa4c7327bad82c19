"""Which posterior networks answer a request, and the noise that draws them.

Networks come in blocks of :data:`NETWORKS_PER_BLOCK`. Block ``b`` of stream ``s`` is the
generator applied (10 networks at once, always) to noise drawn with NumPy from::

    rng = np.random.default_rng(np.random.SeedSequence(entropy=s.entropy, spawn_key=(b,)))
    z   = rng.standard_normal((10, noise_dim), dtype=np.float32)
    eps = rng.standard_normal((10, E), dtype=np.float32)   # only if the generator has a residual

(``E``: the residual noise a network needs, :attr:`apd.factored.AffinePosterior.residual_dim`
for an MLP, all P weights' for a CNN; see :func:`draw_codes`)

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

A network is held as its code (:mod:`apd.factored`): its coordinates in the generator's affine
subspace and, with residual noise, the noise its forward adds; never as its P weights. A CNN
with residual noise is the exception (:mod:`service.core.model` materialises its networks).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import anyio
import anyio.to_thread
import numpy as np
from numpy.typing import NDArray

from apd.checkpoint import Checkpoint
from apd.factored import AffinePosterior
from service.core.limits import MAX_SEED, NETWORKS_PER_BLOCK
from service.infra.cache import (
    BlockLayout,
    CorruptEntry,
    LocalBlockCache,
    RedisBlockStore,
    decode_blocks,
    encode_block,
)
from service.infra.telemetry import Metrics

FloatArray = NDArray[np.float32]
log = logging.getLogger("apd.service.cache")

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
    stream: Stream, block: int, noise_dim: int, residual_dim: int
) -> tuple[FloatArray, FloatArray | None]:
    """The generator's input for ``block`` of ``stream`` and, if ``residual_dim``, the
    residual noise of its networks (see the module docstring)."""
    rng = np.random.default_rng(np.random.SeedSequence(entropy=stream.entropy, spawn_key=(block,)))
    z = rng.standard_normal((NETWORKS_PER_BLOCK, noise_dim), dtype=np.float32)
    eps = (
        rng.standard_normal((NETWORKS_PER_BLOCK, residual_dim), dtype=np.float32)
        if residual_dim
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
    """Consecutive networks of one stream: their codes ``(k, code_dim)`` (:mod:`apd.factored`)
    and, where kept, their tails ``(k, P_tail)`` (:meth:`apd.factored.AffinePosterior.tails`;
    see :mod:`service.core.model`)."""

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


def draw_codes(
    ckpt: Checkpoint, posterior: AffinePosterior, stream: Stream, blocks: Sequence[int]
) -> FloatArray:
    """The codes ``(10 * len(blocks), posterior.code_dim)`` of ``blocks`` of ``stream``: their
    noise drawn (:func:`block_noise`), the generator run over all of it in one pass, and the
    residual noise, if any, beside it."""
    noise = [
        block_noise(stream, b, ckpt.meta.generator.noise_dim, posterior.residual_dim)
        for b in blocks
    ]
    codes = ckpt.codes(np.concatenate([z for z, _ in noise]))
    residual = [eps for _, eps in noise if eps is not None]
    return posterior.codes(codes, np.concatenate(residual) if residual else None)


def _read_only(block: NetworkBlock) -> NetworkBlock:
    for array in (block.codes, block.tails):
        if array is not None:
            array.setflags(write=False)
    return block


class NetworkSource:
    """Where one model version's networks come from, in one direction: the pool held in
    memory; any other blocks from the in-process LRU, then Redis, then the generator.

    The pool (the first ``pool_size`` networks of :data:`POOL_STREAM`) is drawn once, by
    :meth:`load`, and kept read-only for the version's life, the first ``tailed_size`` of
    them with their tails. A request's other blocks (a seed's, or the pool stream's beyond the
    pool) are fetched as one *run*: the LRU keeps the run whole (codes and, where
    ``keep_tails``, tails), so a warm seeded request is one lookup and one segment, as flat
    in K as a pool request; Redis keeps blocks (:mod:`service.infra.cache`), keyed by
    ``namespace`` (model and version) and checkpoint, so two versions never share networks.
    Generating codes is cheap (benchmarks/results/serve_latency.md: a Redis hit against
    regeneration), so there is no cross-worker lock: two workers that miss the same block
    both draw it and write the same bytes.
    """

    def __init__(
        self,
        ckpt: Checkpoint,
        posterior: AffinePosterior | None,
        *,
        namespace: str,
        pool_size: int,
        tailed_size: int,
        keep_tails: bool,
        local: LocalBlockCache[NetworkBlock],
        redis: RedisBlockStore | None,
        hmac_key: bytes,
        key_prefix: str,
        ttl_s: int,
        metrics: Metrics,
        limiter: anyio.CapacityLimiter,
    ) -> None:
        for size in (pool_size, tailed_size):
            if size % NETWORKS_PER_BLOCK:
                raise ValueError(f"pool sizes must be multiples of {NETWORKS_PER_BLOCK}")
        if not 0 <= tailed_size <= pool_size:
            raise ValueError(f"tailed_size must lie in 0..{pool_size}, got {tailed_size}")
        self.ckpt = ckpt
        self.posterior = posterior
        self.namespace = namespace
        self.pool_blocks = pool_size // NETWORKS_PER_BLOCK
        self.tailed_blocks = tailed_size // NETWORKS_PER_BLOCK
        self.keep_tails = keep_tails
        self.local = local
        self.redis = redis
        self.layout = (
            None
            if posterior is None
            else BlockLayout(ckpt.sha256, posterior.code_dim, hmac_key, NETWORKS_PER_BLOCK)
        )
        self._prefix = key_prefix
        self._ttl_s = ttl_s
        self._metrics = metrics
        self._limiter = limiter
        self._tailed: NetworkBlock | None = None
        self._bare: NetworkBlock | None = None

    @property
    def size(self) -> int:
        return self.pool_blocks * NETWORKS_PER_BLOCK if self._tailed is not None else 0

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in (self._tailed, self._bare) if p is not None)

    async def load(self) -> None:
        """Draw the pool (nothing for a generator with residual noise: only plans are used)."""
        posterior = self.posterior
        if posterior is None:
            self._tailed = self._bare = NetworkBlock(np.empty((0, 0), np.float32))
            return
        t, per = self.tailed_blocks, NETWORKS_PER_BLOCK

        def draw() -> tuple[NetworkBlock, NetworkBlock]:
            codes = draw_codes(self.ckpt, posterior, POOL_STREAM, range(self.pool_blocks))
            tails = posterior.tails(codes[: t * per]) if t else None
            tailed = NetworkBlock(np.ascontiguousarray(codes[: t * per]), tails)
            return _read_only(tailed), _read_only(NetworkBlock(codes[t * per :].copy()))

        self._tailed, self._bare = await anyio.to_thread.run_sync(draw, limiter=self._limiter)
        self._metrics.networks_generated.inc(self.pool_blocks * per)

    def plan(self, num_networks: int, seed: int | None) -> NetworkPlan:
        return plan_networks(
            num_networks, seed, self.pool_blocks, np.random.default_rng(), self.tailed_blocks
        )

    async def segments(self, plan: NetworkPlan) -> list[NetworkBlock]:
        """The plan's first K networks as blocks of ``k_i`` networks with ``sum k_i = K``:
        pool blocks as views of the pool (at most two: with tails, then without), the rest as
        one run."""
        if self._tailed is None or self._bare is None:
            raise RuntimeError("the pool is not loaded")
        segments: list[NetworkBlock] = []
        rest: Sequence[int] = plan.blocks
        if plan.stream == POOL_STREAM:
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
            segments.append(await self._run(plan.stream, tuple(rest)))
        return truncate(segments, plan.num_networks)

    def _key(self, stream: Stream, block: int) -> str:
        sha = self.ckpt.sha256
        return f"{self._prefix}:codes:{self.namespace}:{sha}:{stream.name}:{block}"

    async def _run(self, stream: Stream, blocks: tuple[int, ...]) -> NetworkBlock:
        """``blocks`` of ``stream`` as one block: from the LRU, else their codes from Redis
        where it has them and from the generator for the rest (written back to Redis)."""
        run_key = f"{self.namespace}:{stream.name}:{','.join(map(str, blocks))}"
        found = self.local.get(run_key)
        if found is not None:
            self._metrics.cache_hits.labels(tier="memory").inc(len(blocks))
            return found
        known = await self._read_redis(stream, blocks)
        todo = [b for b in blocks if b not in known]
        posterior = self.posterior
        assert posterior is not None and self.layout is not None

        def complete() -> tuple[NetworkBlock, FloatArray | None]:
            drawn = draw_codes(self.ckpt, posterior, stream, todo) if todo else None
            parts, i = [], 0
            for b in blocks:
                if b in known:
                    parts.append(known[b])
                else:
                    assert drawn is not None
                    parts.append(drawn[i * NETWORKS_PER_BLOCK : (i + 1) * NETWORKS_PER_BLOCK])
                    i += 1
            codes = np.concatenate(parts)
            tails = posterior.tails(codes) if self.keep_tails else None
            return _read_only(NetworkBlock(codes, tails)), drawn

        # Not under the compute limiter: a batch calls this while it holds a compute slot, and
        # drawing codes is small beside a forward.
        run, drawn = await anyio.to_thread.run_sync(complete)
        self.local.put(run_key, run)
        self._metrics.local_cache_bytes.set(self.local.nbytes)
        if drawn is not None:
            self._metrics.cache_misses.inc(len(todo))
            self._metrics.networks_generated.inc(len(drawn))
            per = NETWORKS_PER_BLOCK
            await self._write_redis(
                stream, {b: drawn[i * per : (i + 1) * per] for i, b in enumerate(todo)}
            )
        return run

    async def _read_redis(self, stream: Stream, blocks: Sequence[int]) -> dict[int, FloatArray]:
        redis, layout = self.redis, self.layout
        if redis is None or layout is None or not redis.available:
            return {}
        raws = await redis.get_many([self._key(stream, b) for b in blocks], layout.entry_bytes)
        if raws is None:
            return {}
        found = dict(zip(blocks, raws, strict=True))
        out, corrupt = decode_blocks(
            layout, stream.name, {b: raw for b, raw in found.items() if isinstance(raw, bytes)}
        )
        corrupt |= {b: CorruptEntry(raw) for b, raw in found.items() if isinstance(raw, str)}
        for b, exc in corrupt.items():
            log.warning("discarding corrupt cache entry %s: %s", self._key(stream, b), exc)
        self._metrics.cache_corrupt.inc(len(corrupt))
        self._metrics.cache_hits.labels(tier="redis").inc(len(out))
        if corrupt:
            await redis.delete(*(self._key(stream, b) for b in corrupt))
        return out

    async def _write_redis(self, stream: Stream, codes: dict[int, FloatArray]) -> None:
        redis, layout = self.redis, self.layout
        if redis is None or layout is None or not redis.available:
            return
        encoded = {
            self._key(stream, b): encode_block(layout, stream.name, b, c) for b, c in codes.items()
        }
        await redis.set_many(encoded, self._ttl_s)
