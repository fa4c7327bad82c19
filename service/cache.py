"""Caches of generated network blocks: in-process LRU, then Redis, then the generator.

A block (:mod:`service.posterior_pool`) is 10 networks ``(10, P)`` float32. Lookup order:

1. the in-process LRU (:class:`LocalBlockCache`, bounded in bytes);
2. a block another request of this process is already fetching or generating: wait for it
   (single flight per key within the process);
3. Redis (:class:`RedisBlockStore`), key ``{prefix}:net:{checkpoint_sha256}:{stream}:{block}``;
4. the generator. Before generating, a worker takes a short Redis lock
   (``SET NX PX`` through redis-py's :class:`~redis.asyncio.lock.Lock`) on the block; a
   worker that finds the lock taken polls Redis for the other's result for at most
   ``lock_wait_s`` and generates the block itself only if it does not come.

Redis values are :func:`encode_block` bytes, never pickle: a fixed header (magic ``APDN``,
format version, dtype code, checkpoint sha256, stream tag, block index, rows, columns),
the raw little-endian float32 weights, and a SHA-256 over header and weights. On read,
:func:`decode_block` checks all of it and that every weight is finite; an entry that fails
is deleted, counted (``apd_cache_corrupt_entries_total``), regenerated and rewritten, and
never served.

Redis being unreachable never fails a request. Every Redis call has a short socket timeout;
the first connection error or timeout marks the store unavailable (``apd_cache_degraded`` =
1, ``/readyz`` says ``degraded``), after which requests skip Redis entirely and are answered
from the in-process cache and the generator, while a background task pings Redis with
exponential backoff and switches back as soon as it answers.

The service is asynchronous: Redis I/O uses ``redis.asyncio`` on the event loop, and every
CPU-bound step (generation, encoding and checksums, the forward) runs in worker threads, so
the event loop stays free while a block is computed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import struct
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import anyio.to_thread
import numpy as np
from numpy.typing import NDArray

from service.metrics import Metrics
from service.posterior_pool import NETWORKS_PER_BLOCK, Stream

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.lock import Lock

FloatArray = NDArray[np.float32]
log = logging.getLogger("apd.service.cache")

MAGIC: Final = b"APDN"
FORMAT_VERSION: Final = 1
DTYPE_FLOAT32_LE: Final = 1
_HEADER: Final = struct.Struct("<4sHH32s16sQII")
CHECKSUM_BYTES: Final = 32  # SHA-256 (hardware-accelerated here; faster than blake2b)
HEADER_BYTES: Final = _HEADER.size


class CorruptEntry(ValueError):
    """A cached block that must not be served; the message says which check failed."""


@dataclass(frozen=True)
class BlockLayout:
    """What every block of one checkpoint looks like."""

    checkpoint_sha256: str
    num_params: int
    rows: int = NETWORKS_PER_BLOCK

    @property
    def payload_bytes(self) -> int:
        return self.rows * self.num_params * 4

    @property
    def entry_bytes(self) -> int:
        return HEADER_BYTES + self.payload_bytes + CHECKSUM_BYTES


def _stream_tag(stream: Stream) -> bytes:
    return hashlib.sha256(stream.name.encode()).digest()[:16]


def encode_block(layout: BlockLayout, stream: Stream, block: int, theta: FloatArray) -> bytes:
    """The Redis value of ``block`` of ``stream`` (see the module docstring)."""
    if theta.shape != (layout.rows, layout.num_params):
        raise ValueError(f"block shape {theta.shape} != {(layout.rows, layout.num_params)}")
    payload = np.ascontiguousarray(theta, dtype="<f4")
    header = _HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        DTYPE_FLOAT32_LE,
        bytes.fromhex(layout.checkpoint_sha256),
        _stream_tag(stream),
        block,
        layout.rows,
        layout.num_params,
    )
    digest = hashlib.sha256(header)
    digest.update(payload.data.cast("B"))
    return b"".join([header, payload.data.cast("B"), digest.digest()])


def decode_block(layout: BlockLayout, stream: Stream, block: int, raw: bytes) -> FloatArray:
    """The ``(rows, P)`` weights in ``raw``, or :class:`CorruptEntry` saying what is wrong."""
    if len(raw) < HEADER_BYTES:
        raise CorruptEntry(f"{len(raw)} bytes is shorter than the {HEADER_BYTES}-byte header")
    magic, version, dtype, sha, tag, blk, rows, cols = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise CorruptEntry(f"bad magic {magic!r}")
    if version != FORMAT_VERSION:
        raise CorruptEntry(f"format version {version}, expected {FORMAT_VERSION}")
    if dtype != DTYPE_FLOAT32_LE:
        raise CorruptEntry(f"dtype code {dtype}, expected {DTYPE_FLOAT32_LE}")
    if sha.hex() != layout.checkpoint_sha256:
        raise CorruptEntry(f"written for checkpoint {sha.hex()[:12]}…, not this one")
    if tag != _stream_tag(stream) or blk != block:
        raise CorruptEntry(
            f"holds block {blk} of another stream, not block {block} of {stream.name}"
        )
    if (rows, cols) != (layout.rows, layout.num_params):
        raise CorruptEntry(f"shape {(rows, cols)}, expected {(layout.rows, layout.num_params)}")
    if len(raw) != layout.entry_bytes:
        raise CorruptEntry(f"length {len(raw)} bytes, expected {layout.entry_bytes}")
    end = HEADER_BYTES + layout.payload_bytes
    view = memoryview(raw)
    if hashlib.sha256(view[:end]).digest() != raw[end:]:
        raise CorruptEntry("checksum mismatch")
    theta = np.frombuffer(raw, dtype="<f4", count=rows * cols, offset=HEADER_BYTES)
    theta = theta.reshape(rows, cols).astype(np.float32, copy=False)
    if not np.isfinite(theta).all():
        raise CorruptEntry("holds NaN or Inf")
    return theta


class LocalBlockCache:
    """In-process LRU of blocks, bounded by their total bytes. Used from the event loop only."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._items: OrderedDict[str, FloatArray] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> FloatArray | None:
        arr = self._items.get(key)
        if arr is not None:
            self._items.move_to_end(key)
        return arr

    def put(self, key: str, arr: FloatArray) -> None:
        if arr.nbytes > self.max_bytes:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes
        self._items[key] = arr
        self.nbytes += arr.nbytes
        while self.nbytes > self.max_bytes:
            _, evicted = self._items.popitem(last=False)
            self.nbytes -= evicted.nbytes

    def discard(self, key: str) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes


def _error_kind(exc: BaseException) -> str:
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    if isinstance(exc, RedisTimeoutError | asyncio.TimeoutError | TimeoutError):
        return "timeout"
    if isinstance(exc, RedisConnectionError | OSError):
        return "connection"
    return "response"


class RedisBlockStore:
    """Redis through ``redis.asyncio``, with a health state instead of failures.

    Methods return ``None``/``False`` rather than raise when Redis misbehaves; a connection
    error or timeout marks the store unavailable until the background probe succeeds.
    """

    def __init__(
        self,
        url: str,
        *,
        metrics: Metrics,
        socket_timeout_s: float,
        health_interval_s: float,
        retry_min_s: float,
        retry_max_s: float,
        chunk_bytes: int = 16 << 20,
    ) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.url = url
        self._client: Redis = Redis.from_url(
            url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            # One immediate reconnect for a connection the server dropped; no retry on
            # timeouts, so a hung Redis costs a request at most one socket timeout.
            retry=Retry(NoBackoff(), 1),
            retry_on_timeout=False,
            client_name="apd-service",
        )
        self._metrics = metrics
        self._health_interval_s = health_interval_s
        self._retry_min_s = retry_min_s
        self._retry_max_s = retry_max_s
        self._chunk_bytes = chunk_bytes
        self.available = False
        self._seen_up = False
        self._known = False
        self._monitor: asyncio.Task[None] | None = None
        self._metrics.cache_degraded.set(1)

    async def start(self) -> None:
        await self.ping()
        self._monitor = asyncio.create_task(self._watch(), name="apd-redis-monitor")

    async def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            try:
                await self._monitor
            except asyncio.CancelledError:
                pass
        await self._client.aclose()

    def _set_available(self, up: bool, reason: str = "") -> None:
        if up and not self._seen_up:
            log.info("Redis %s connected: using the shared cache", self._safe_url)
        elif up and not self.available:
            log.warning("Redis %s reachable again: using the shared cache", self._safe_url)
        elif not up and (self.available or not self._known):
            log.warning("Redis %s unreachable (%s): serving degraded", self._safe_url, reason)
        self._known = True
        self._seen_up = self._seen_up or up
        self.available = up
        self._metrics.cache_degraded.set(0 if up else 1)

    @property
    def _safe_url(self) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.hostname or ''}:{parts.port or ''}{parts.path}"

    def _failed(self, exc: BaseException, op: str) -> None:
        kind = _error_kind(exc)
        self._metrics.cache_errors.labels(kind=kind).inc()
        if kind in ("timeout", "connection"):
            self._set_available(False, f"{op}: {type(exc).__name__}: {exc}")
        else:
            log.warning("Redis %s failed: %s", op, exc)

    async def ping(self) -> bool:
        from redis.exceptions import RedisError

        try:
            await self._client.ping()
        except (TimeoutError, RedisError, OSError) as exc:
            self._failed(exc, "ping")
            return False
        self._set_available(True)
        return True

    async def _watch(self) -> None:
        delay = self._retry_min_s
        while True:
            if self.available:
                delay = self._retry_min_s
                await asyncio.sleep(self._health_interval_s)
            else:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max_s)
            await self.ping()

    def _chunks(self, keys: Sequence[str], item_bytes: int) -> list[Sequence[str]]:
        per = max(1, self._chunk_bytes // max(item_bytes, 1))
        return [keys[i : i + per] for i in range(0, len(keys), per)]

    async def get_many(self, keys: Sequence[str], item_bytes: int) -> list[bytes | None] | None:
        """Values of ``keys`` (None where absent); None if Redis failed or is unavailable.

        GETs are pipelined in chunks of about ``chunk_bytes`` so that each reply, which
        must arrive within the socket timeout, stays small.
        """
        from redis.exceptions import RedisError

        if not self.available:
            return None
        out: list[bytes | None] = []
        try:
            for chunk in self._chunks(keys, item_bytes):
                async with self._client.pipeline(transaction=False) as pipe:
                    for key in chunk:
                        pipe.get(key)
                    out += await pipe.execute()
        except (TimeoutError, RedisError, OSError) as exc:
            self._failed(exc, "get")
            return None
        return out

    async def set_many(self, items: Mapping[str, bytes], ttl_s: int) -> bool:
        from redis.exceptions import RedisError

        if not self.available or not items:
            return False
        keys = list(items)
        try:
            for chunk in self._chunks(keys, max(len(v) for v in items.values())):
                async with self._client.pipeline(transaction=False) as pipe:
                    for key in chunk:
                        pipe.set(key, items[key], ex=ttl_s)
                    await pipe.execute()
        except (TimeoutError, RedisError, OSError) as exc:
            self._failed(exc, "set")
            return False
        return True

    async def delete(self, *keys: str) -> None:
        from redis.exceptions import RedisError

        if not self.available or not keys:
            return
        try:
            await self._client.delete(*keys)
        except (TimeoutError, RedisError, OSError) as exc:
            self._failed(exc, "delete")

    async def exist(self, keys: Sequence[str]) -> list[bool] | None:
        """Whether each key exists (one pipelined round trip); None if Redis failed."""
        from redis.exceptions import RedisError

        if not self.available:
            return None
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.exists(key)
                return [bool(n) for n in await pipe.execute()]
        except (TimeoutError, RedisError, OSError) as exc:
            self._failed(exc, "exists")
            return None

    async def try_lock(self, name: str, timeout_s: float) -> tuple[bool, Lock | None]:
        """``(True, lock)`` if taken, ``(False, None)`` if another holds it, and
        ``(True, None)`` if Redis failed (go ahead without a lock)."""
        from redis.exceptions import RedisError

        if not self.available:
            return True, None
        lock = self._client.lock(name, timeout=timeout_s, blocking=False)
        try:
            acquired = await lock.acquire()
        except (TimeoutError, RedisError, OSError) as exc:
            self._failed(exc, "lock")
            return True, None
        return (True, lock) if acquired else (False, None)

    async def unlock(self, lock: Lock) -> None:
        from redis.exceptions import LockError, RedisError

        try:
            await lock.release()
        except LockError:
            pass  # expired meanwhile: nothing to release
        except (TimeoutError, RedisError, OSError) as exc:
            self._failed(exc, "unlock")


Generate = Callable[[Stream, Sequence[int]], list[FloatArray]]
RunCompute = Callable[[Callable[[], Any]], Awaitable[Any]]


class NetworkCache:
    """Blocks of networks by (stream, block), through the local LRU, Redis and the generator."""

    def __init__(
        self,
        *,
        layout: BlockLayout,
        generate: Generate,
        run_compute: RunCompute,
        local: LocalBlockCache,
        redis: RedisBlockStore | None,
        metrics: Metrics,
        key_prefix: str,
        ttl_s: int,
        lock_timeout_s: float,
        lock_wait_s: float,
    ) -> None:
        self.layout = layout
        self.local = local
        self.redis = redis
        self._generate = generate
        self._run_compute = run_compute
        self._metrics = metrics
        self._prefix = key_prefix
        self._ttl_s = ttl_s
        self._lock_timeout_s = lock_timeout_s
        self._lock_wait_s = lock_wait_s
        self._inflight: dict[str, asyncio.Future[FloatArray]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def key(self, stream: Stream, block: int) -> str:
        return f"{self._prefix}:net:{self.layout.checkpoint_sha256}:{stream.name}:{block}"

    def lock_key(self, stream: Stream, block: int) -> str:
        return f"{self._prefix}:lock:{self.layout.checkpoint_sha256}:{stream.name}:{block}"

    async def get_blocks(
        self, stream: Stream, blocks: Sequence[int], *, keep_local: bool = True
    ) -> list[FloatArray]:
        """The ``(10, P)`` arrays of ``blocks`` of ``stream``, in order."""
        found: dict[int, FloatArray] = {}
        waiting: dict[int, asyncio.Future[FloatArray]] = {}
        owned: dict[int, asyncio.Future[FloatArray]] = {}
        loop = asyncio.get_running_loop()
        for b in dict.fromkeys(blocks):
            key = self.key(stream, b)
            arr = self.local.get(key)
            if arr is not None:
                found[b] = arr
                self._metrics.cache_hits.labels(tier="memory").inc()
            elif key in self._inflight:
                waiting[b] = self._inflight[key]
                self._metrics.cache_hits.labels(tier="coalesced").inc()
            else:
                owned[b] = self._inflight[key] = loop.create_future()
        if owned:
            # A task of its own, so that a cancelled request does not cancel the work that
            # other requests are waiting for.
            task = asyncio.create_task(self._fill_owned(stream, owned, keep_local))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            waiting |= owned
        for b, fut in waiting.items():
            found[b] = await asyncio.shield(fut)
        self._metrics.local_cache_bytes.set(self.local.nbytes)
        return [found[b] for b in blocks]

    async def _fill_owned(
        self, stream: Stream, owned: dict[int, asyncio.Future[FloatArray]], keep_local: bool
    ) -> None:
        try:
            got = await self._fill(stream, list(owned))
            for b, fut in owned.items():
                if keep_local:
                    self.local.put(self.key(stream, b), got[b])
                fut.set_result(got[b])
        except BaseException as exc:
            log.exception("filling blocks %s of %s failed", list(owned), stream.name)
            error = exc if isinstance(exc, Exception) else RuntimeError("cancelled")
            for fut in owned.values():
                if not fut.done():
                    fut.set_exception(error)
            if not isinstance(exc, Exception):
                raise
        finally:
            for b in owned:
                self._inflight.pop(self.key(stream, b), None)

    async def _fill(self, stream: Stream, owned: list[int]) -> dict[int, FloatArray]:
        out = await self._read_redis(stream, owned)
        missing = [b for b in owned if b not in out]
        if not missing:
            return out
        redis = self.redis
        mine: list[int] = []
        theirs: list[int] = []
        locks: list[Lock] = []
        if redis is not None and redis.available:
            claims = await asyncio.gather(
                *(redis.try_lock(self.lock_key(stream, b), self._lock_timeout_s) for b in missing)
            )
            for b, (go, lock) in zip(missing, claims, strict=True):
                (mine if go else theirs).append(b)
                if lock is not None:
                    locks.append(lock)
        else:
            mine = missing
        try:
            if mine and locks:
                # Double-checked: another worker may have written a block between our read
                # and our lock.
                out |= await self._read_redis(stream, mine)
                mine = [b for b in mine if b not in out]
            if mine:
                out |= await self._generate_and_store(stream, mine)
        finally:
            if redis is not None and locks:
                await asyncio.gather(*(redis.unlock(lock) for lock in locks))
        if theirs:
            out |= await self._await_others(stream, theirs)
            left = [b for b in theirs if b not in out]
            if left:
                out |= await self._generate_and_store(stream, left)
        return out

    async def _read_redis(self, stream: Stream, blocks: list[int]) -> dict[int, FloatArray]:
        if self.redis is None or not self.redis.available or not blocks:
            return {}
        raws = await self.redis.get_many(
            [self.key(stream, b) for b in blocks], self.layout.entry_bytes
        )
        if raws is None:
            return {}
        present = {b: raw for b, raw in zip(blocks, raws, strict=True) if raw is not None}
        return await self._decode(stream, present)

    async def _decode(self, stream: Stream, raws: dict[int, bytes]) -> dict[int, FloatArray]:
        if not raws:
            return {}

        def decode_all() -> dict[int, FloatArray | CorruptEntry]:
            results: dict[int, FloatArray | CorruptEntry] = {}
            for b, raw in raws.items():
                try:
                    results[b] = decode_block(self.layout, stream, b, raw)
                except CorruptEntry as exc:
                    results[b] = exc
            return results

        decoded = await anyio.to_thread.run_sync(decode_all)
        out: dict[int, FloatArray] = {}
        bad: list[str] = []
        for b, result in decoded.items():
            if isinstance(result, CorruptEntry):
                key = self.key(stream, b)
                log.warning("discarding corrupt cache entry %s: %s", key, result)
                self._metrics.cache_corrupt.inc()
                bad.append(key)
            else:
                out[b] = result
                self._metrics.cache_hits.labels(tier="redis").inc()
        if bad and self.redis is not None:
            await self.redis.delete(*bad)
        return out

    async def _generate_and_store(self, stream: Stream, blocks: list[int]) -> dict[int, FloatArray]:
        arrays: list[FloatArray] = await self._run_compute(lambda: self._generate(stream, blocks))
        out = dict(zip(blocks, arrays, strict=True))
        self._metrics.cache_misses.inc(len(blocks))
        self._metrics.networks_generated.inc(len(blocks) * self.layout.rows)
        if self.redis is not None and self.redis.available:

            def encode_all() -> dict[str, bytes]:
                return {
                    self.key(stream, b): encode_block(self.layout, stream, b, a)
                    for b, a in out.items()
                }

            encoded = await anyio.to_thread.run_sync(encode_all)
            await self.redis.set_many(encoded, self._ttl_s)
        return out

    async def _await_others(self, stream: Stream, blocks: list[int]) -> dict[int, FloatArray]:
        """Poll Redis for blocks another worker is generating, for at most ``lock_wait_s``.

        Stops early for a block whose lock is gone without a value (the other worker failed).
        """
        redis = self.redis
        out: dict[int, FloatArray] = {}
        pending = list(blocks)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._lock_wait_s
        delay = 0.005
        while pending and redis is not None and redis.available and loop.time() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
            out |= await self._read_redis(stream, pending)
            pending = [b for b in pending if b not in out]
            if not pending:
                break
            locked = await redis.exist([self.lock_key(stream, b) for b in pending])
            if locked is None:
                break
            still_locked = [b for b, held in zip(pending, locked, strict=True) if held]
            if len(still_locked) < len(pending):
                # A lock vanished: its value may have landed just before; look once more.
                out |= await self._read_redis(stream, pending)
                pending = [b for b in still_locked if b not in out]
        return out
