"""Stores of network codes: the in-process LRU and Redis, and the Redis value format.

A block is 10 networks, each held as its code ``c (r,)`` (:mod:`apd.factored`): 184 bytes per
network for the shipped fcNN1 (r = 46), where the materialised network is 318 KB. The order in
which a request's networks are looked up (LRU, then Redis, then the generator) and the keys
(``{prefix}:codes:{model}/{version}:{checkpoint_sha256}:{stream}:{block}``) are the core's,
:class:`service.core.networks.NetworkSource`; here are the stores it calls:

1. :class:`LocalBlockCache`, an LRU bounded in bytes;
2. :class:`RedisBlockStore`, one pipelined round trip for all of a request's blocks, each read
   only up to one entry's length plus a byte (``GETRANGE``), written with a TTL.

Redis values are :func:`encode_block` bytes, never pickle: a fixed header (magic ``APDC``,
format version, checkpoint sha256, stream tag, block index, rows, code length), the raw
little-endian float32 codes, and an HMAC-SHA256 over header and codes with the secret
``cache_hmac_key``. On read, :func:`decode_block` checks the MAC first (so an entry forged by
anyone who can write to Redis but does not hold the key is refused), then every header field
and that every value is finite; an entry that fails (a value of another length or type
planted under the key included: 80 MiB of it costs a read of one entry's length) is deleted,
counted (``apd_cache_corrupt_entries_total``), regenerated and rewritten, and never served:
it costs once.

A password configured for a Redis that accepts clients without one is a warning at start
(the password protects nothing there), not silently accepted.

Redis being unreachable never fails a request. Every Redis call has a short socket timeout;
the first connection error or timeout marks the store unavailable (``apd_cache_degraded`` =
1, ``/readyz`` says ``degraded``), after which requests skip Redis entirely, while a
background task pings Redis with exponential backoff and switches back when it answers.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import struct
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Final, Generic, Protocol, TypeVar

import numpy as np
from numpy.typing import NDArray

from service.core.limits import NETWORKS_PER_BLOCK
from service.infra.telemetry import Metrics

if TYPE_CHECKING:
    from redis.asyncio import Redis

FloatArray = NDArray[np.float32]
log = logging.getLogger("apd.service.infra.cache")

MAGIC: Final = b"APDC"
FORMAT_VERSION: Final = 2
_HEADER: Final = struct.Struct("<4sH32s16sQII")
MAC_BYTES: Final = 32  # HMAC-SHA256
HEADER_BYTES: Final = _HEADER.size


class CorruptEntry(ValueError):
    """A cached block that must not be served; the message says which check failed."""


@dataclass(frozen=True)
class BlockLayout:
    """What every cached block of one checkpoint looks like, and the key that signs it."""

    checkpoint_sha256: str
    code_dim: int
    hmac_key: bytes
    rows: int = NETWORKS_PER_BLOCK

    def __post_init__(self) -> None:
        if len(self.hmac_key) < 16:
            raise ValueError("the cache HMAC key must be at least 16 bytes")

    @property
    def payload_bytes(self) -> int:
        return self.rows * self.code_dim * 4

    @property
    def entry_bytes(self) -> int:
        return HEADER_BYTES + self.payload_bytes + MAC_BYTES

    @cached_property
    def checkpoint_digest(self) -> bytes:
        return bytes.fromhex(self.checkpoint_sha256)

    def mac(self, signed: bytes | memoryview) -> bytes:
        return hmac.digest(self.hmac_key, signed, "sha256")


def _stream_tag(stream: str) -> bytes:
    return hashlib.sha256(stream.encode()).digest()[:16]


def _header(layout: BlockLayout, tag: bytes, block: int) -> bytes:
    return _HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        layout.checkpoint_digest,
        tag,
        block,
        layout.rows,
        layout.code_dim,
    )


def encode_block(layout: BlockLayout, stream: str, block: int, codes: FloatArray) -> bytes:
    """The Redis value of ``block`` of ``stream`` (see the module docstring)."""
    if codes.shape != (layout.rows, layout.code_dim):
        raise ValueError(f"block shape {codes.shape} != {(layout.rows, layout.code_dim)}")
    signed = _header(layout, _stream_tag(stream), block)
    signed += np.ascontiguousarray(codes, dtype="<f4").tobytes()
    return signed + layout.mac(signed)


def _header_fault(layout: BlockLayout, stream: str, block: int, header: bytes) -> str:
    """Which header field is not what ``block`` of ``stream`` must hold."""
    magic, version, sha, tag, blk, rows, cols = _HEADER.unpack(header)
    if magic != MAGIC or version != FORMAT_VERSION:
        return f"magic {magic!r} version {version}: not an entry of this format"
    if sha.hex() != layout.checkpoint_sha256:
        return f"written for checkpoint {sha.hex()[:12]}…, not this one"
    if tag != _stream_tag(stream) or blk != block:
        return f"holds block {blk} of another stream, not block {block} of {stream}"
    return f"shape {(rows, cols)}, expected {(layout.rows, layout.code_dim)}"


def decode_blocks(
    layout: BlockLayout, stream: str, raws: Mapping[int, bytes]
) -> tuple[dict[int, FloatArray], dict[int, CorruptEntry]]:
    """The codes of each ``block -> raw`` entry that passes every check, and a
    :class:`CorruptEntry` saying what is wrong with each other one.

    Checks, in order: the length; the MAC (before anything else is trusted); the header, as
    one comparison with the header this block must carry; then all codes at once, finite.
    """
    tag = _stream_tag(stream)
    good: dict[int, bytes] = {}
    bad: dict[int, CorruptEntry] = {}
    end = layout.entry_bytes - MAC_BYTES
    for block, raw in raws.items():
        if len(raw) != layout.entry_bytes:
            bad[block] = CorruptEntry(f"length {len(raw)} bytes, expected {layout.entry_bytes}")
            continue
        view = memoryview(raw)
        if not hmac.compare_digest(layout.mac(view[:end]), view[end:]):
            bad[block] = CorruptEntry("HMAC mismatch (forged, or written with another key)")
        elif view[:HEADER_BYTES] != _header(layout, tag, block):
            bad[block] = CorruptEntry(_header_fault(layout, stream, block, raw[:HEADER_BYTES]))
        else:
            good[block] = raw
    if not good:
        return {}, bad
    payload = b"".join(memoryview(raw)[HEADER_BYTES:end] for raw in good.values())
    codes = np.frombuffer(payload, dtype="<f4").reshape(len(good), layout.rows, layout.code_dim)
    finite = np.isfinite(codes).all(axis=(1, 2))
    out: dict[int, FloatArray] = {}
    for i, block in enumerate(good):
        if finite[i]:
            out[block] = codes[i].astype(np.float32, copy=False)
        else:
            bad[block] = CorruptEntry("holds NaN or Inf")
    return out, bad


def decode_block(layout: BlockLayout, stream: str, block: int, raw: bytes) -> FloatArray:
    """The ``(rows, r)`` codes in ``raw``, or :class:`CorruptEntry` saying what is wrong."""
    out, bad = decode_blocks(layout, stream, {block: raw})
    if block in bad:
        raise bad[block]
    return out[block]


class Sized(Protocol):
    @property
    def nbytes(self) -> int: ...


T = TypeVar("T", bound=Sized)


class LocalBlockCache(Generic[T]):
    """In-process LRU of items that know their size (``nbytes``), bounded by their total
    bytes. Used from the event loop only."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._items: OrderedDict[str, T] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> T | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: str, item: T) -> None:
        if item.nbytes > self.max_bytes:
            return
        self.discard(key)
        self._items[key] = item
        self.nbytes += item.nbytes
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
        password: str | None = None,
    ) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.url = url
        extra: dict[str, Any] = {} if password is None else {"password": password}
        self._client: Redis = Redis.from_url(
            url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            # One immediate reconnect for a connection the server dropped; no retry on
            # timeouts, so a hung Redis costs a request at most one socket timeout.
            retry=Retry(NoBackoff(), 1),
            retry_on_timeout=False,
            client_name="apd-service",
            **extra,
        )
        self._metrics = metrics
        self._health_interval_s = health_interval_s
        self._retry_min_s = retry_min_s
        self._retry_max_s = retry_max_s
        self.available = False
        self._seen_up = False
        self._known = False
        self._monitor: asyncio.Task[None] | None = None
        self._metrics.cache_degraded.set(1)

    async def start(self) -> None:
        await self.ping()
        if self.available:
            await self.warn_if_password_unneeded()
        self._monitor = asyncio.create_task(self._watch(), name="apd-redis-monitor")

    async def warn_if_password_unneeded(self) -> bool:
        """Log a warning (and return True) when a password is configured but this Redis
        answers a client that sends none: the password then protects nothing."""
        from redis.asyncio import ConnectionPool, Redis
        from redis.exceptions import RedisError

        pool = self._client.connection_pool
        kwargs = dict(pool.connection_kwargs)
        if not kwargs.get("password"):
            return False
        kwargs.pop("password")
        kwargs.pop("username", None)
        probe: Redis = Redis(connection_pool=ConnectionPool(pool.connection_class, **kwargs))
        try:
            await probe.ping()
        except (TimeoutError, RedisError, OSError):
            return False  # it requires authentication (NOAUTH), as configured
        finally:
            await probe.aclose()
        log.warning(
            "Redis %s accepts clients without a password, but one is configured: the "
            "password protects nothing there (set requirepass on the server, or remove "
            "the password from the settings)",
            self._safe_url,
        )
        return True

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

    async def get_many(
        self, keys: Sequence[str], max_bytes: int
    ) -> list[bytes | str | None] | None:
        """Values of ``keys`` in one round trip, each read up to ``max_bytes + 1`` bytes
        (``GETRANGE``): a value planted larger than an entry costs that much, and its length
        shows it is not one. None where absent, a ``str`` saying what is wrong for a key that
        holds no string; None for all if Redis failed or is unavailable. (``EXISTS`` beside
        each read: an empty value is not an absent one.)"""
        from redis.exceptions import RedisError, ResponseError

        if not self.available or not keys:
            return None
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.exists(key)  # GETRANGE answers "" for an absent key and an empty one
                    pipe.getrange(key, 0, max_bytes)
                values = await pipe.execute(raise_on_error=False)
        except (TimeoutError, RedisError, OSError) as exc:
            self._failed(exc, "get")
            return None
        out: list[bytes | str | None] = []
        for exists, v in zip(values[::2], values[1::2], strict=True):
            for answer in (exists, v):
                if isinstance(answer, Exception) and not isinstance(answer, ResponseError):
                    self._failed(answer, "get")  # a connection error mid-pipeline
                    return None
            if isinstance(v, ResponseError):
                out.append(f"not a string value ({v})")
            elif not exists:
                out.append(None)
            else:
                out.append(v if isinstance(v, bytes) else str(v).encode())
        return out

    async def set_many(self, items: Mapping[str, bytes], ttl_s: int) -> bool:
        from redis.exceptions import RedisError

        if not self.available or not items:
            return False
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key, value in items.items():
                    pipe.set(key, value, ex=ttl_s)
                await pipe.execute()
        except (TimeoutError, RedisError, OSError) as exc:
            self._failed(exc, "set")
            return False
        return True

    async def delete(self, *keys: str) -> None:
        """Remove ``keys`` (``UNLINK``: Redis frees a large value in the background)."""
        from redis.exceptions import RedisError

        if not self.available or not keys:
            return
        try:
            await self._client.unlink(*keys)
        except (TimeoutError, RedisError, OSError) as exc:
            self._failed(exc, "delete")
