"""Network blocks: the posterior-pool plan, the Redis value format, the in-process LRU,
single flight, and the cache shared through a real Redis by two app instances."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio.to_thread
import numpy as np
import pytest
from numpy.typing import NDArray
from service_support import (
    make_checkpoint,
    make_client,
    random_images,
    redis_available,
    redis_prefix,
    redis_url_for_tests,
)

from apd.checkpoint import load_checkpoint
from service.cache import (
    HEADER_BYTES,
    BlockLayout,
    CorruptEntry,
    LocalBlockCache,
    NetworkCache,
    RedisBlockStore,
    decode_block,
    encode_block,
)
from service.config import Settings
from service.main import create_app
from service.metrics import Metrics
from service.posterior_pool import (
    MAX_SEED,
    NETWORKS_PER_BLOCK,
    POOL_STREAM,
    PosteriorPool,
    Stream,
    block_noise,
    plan_networks,
    truncate,
)

P = 50
LAYOUT = BlockLayout(checkpoint_sha256="ab" * 32, num_params=P)
STREAM = Stream.for_seed(5)


def block(seed: int = 0) -> NDArray[np.float32]:
    return np.random.default_rng(seed).standard_normal((NETWORKS_PER_BLOCK, P), dtype=np.float32)


# --- the plan and the noise --------------------------------------------------------------


def test_seeded_plan_is_the_first_blocks_of_the_seed_stream() -> None:
    rng = np.random.default_rng(0)
    plan = plan_networks(25, 7, pool_blocks=20, rng=rng)
    assert plan.stream == Stream("seed-7", 7) and plan.blocks == (0, 1, 2)
    assert plan.num_networks == 25


def test_pool_plan_is_a_window_of_distinct_pool_blocks() -> None:
    rng = np.random.default_rng(0)
    starts: Counter[int] = Counter()
    for _ in range(400):
        plan = plan_networks(35, None, pool_blocks=20, rng=rng)
        assert plan.stream == POOL_STREAM and len(plan.blocks) == 4
        assert list(plan.blocks) == list(range(plan.blocks[0], plan.blocks[0] + 4))
        assert 0 <= plan.blocks[0] and plan.blocks[-1] < 20
        starts[plan.blocks[0]] += 1
    assert set(starts) == set(range(17))  # every window start occurs
    big = plan_networks(250, None, pool_blocks=20, rng=rng)
    assert big.blocks == tuple(range(25))  # all pool blocks, then the stream's next ones


def test_noise_is_reproducible_and_distinct_per_block_and_stream() -> None:
    z, eps = block_noise(STREAM, 3, noise_dim=4, num_params=P, residual=True)
    z2, eps2 = block_noise(Stream.for_seed(5), 3, noise_dim=4, num_params=P, residual=True)
    assert eps is not None and eps2 is not None
    assert np.array_equal(z, z2) and np.array_equal(eps, eps2)
    assert z.shape == (10, 4) and z.dtype == np.float32 and eps.shape == (10, P)
    other_block, _ = block_noise(STREAM, 4, noise_dim=4, num_params=P, residual=True)
    other_seed, _ = block_noise(Stream.for_seed(6), 3, noise_dim=4, num_params=P, residual=True)
    pool, _ = block_noise(POOL_STREAM, 3, noise_dim=4, num_params=P, residual=True)
    for other in (other_block, other_seed, pool):
        assert not np.allclose(z, other)
    # The documented scheme, written out.
    rng = np.random.default_rng(np.random.SeedSequence(entropy=5, spawn_key=(3,)))
    assert np.array_equal(z, rng.standard_normal((10, 4), dtype=np.float32))
    assert block_noise(STREAM, 3, 4, P, residual=False)[1] is None


def test_pool_stream_is_out_of_reach_of_seeds() -> None:
    assert POOL_STREAM.entropy > MAX_SEED
    with pytest.raises(ValueError):
        Stream.for_seed(MAX_SEED + 1)
    with pytest.raises(ValueError):
        Stream.for_seed(-1)


def test_truncate_keeps_the_first_networks_without_copying() -> None:
    a, b = block(1), block(2)
    out = truncate([a, b], 13)
    assert [len(s) for s in out] == [10, 3]
    assert np.shares_memory(out[1], b)
    with pytest.raises(ValueError):
        truncate([a], 11)


def test_pool_segments_are_views_of_one_array() -> None:
    async def source(stream: Stream, blocks: Sequence[int]) -> list[NDArray[np.float32]]:
        return [np.full((10, P), 100 * stream.entropy % 7 + b, np.float32) for b in blocks]

    async def run() -> None:
        pool = PosteriorPool(50, source)
        await pool.load()
        assert pool.loaded and pool.size == 50
        segments = await pool.segments(pool.plan(30, None))
        assert len(segments) == 1 and segments[0].shape == (30, P)
        assert not segments[0].flags.writeable
        big = await pool.segments(pool.plan(65, None))  # pool + 2 further stream blocks
        assert [len(s) for s in big] == [50, 10, 5]
        seeded = await pool.segments(pool.plan(15, 3))
        assert [len(s) for s in seeded] == [10, 5]

    anyio.run(run)


# --- the Redis value format --------------------------------------------------------------


def test_round_trip() -> None:
    theta = block(3)
    raw = encode_block(LAYOUT, STREAM, 4, theta)
    assert raw[:4] == b"APDN" and len(raw) == LAYOUT.entry_bytes
    out = decode_block(LAYOUT, STREAM, 4, raw)
    assert np.array_equal(out, theta) and out.dtype == np.float32


def _flip(raw: bytes, at: int) -> bytes:
    return raw[:at] + bytes([raw[at] ^ 0x01]) + raw[at + 1 :]


def _wider_block() -> bytes:
    wider = BlockLayout(LAYOUT.checkpoint_sha256, P + 1)
    return encode_block(wider, STREAM, 4, np.zeros((10, P + 1), np.float32))


CORRUPTIONS = {
    "truncated": (lambda raw: raw[:-7], "length"),
    "truncated header": (lambda raw: raw[:20], "shorter than"),
    "flipped payload byte": (lambda raw: _flip(raw, HEADER_BYTES + 123), "checksum"),
    "flipped checksum byte": (lambda raw: _flip(raw, len(raw) - 1), "checksum"),
    "flipped magic": (lambda raw: _flip(raw, 0), "magic"),
    "appended byte": (lambda raw: raw + b"\0", "length"),
    "foreign checkpoint": (
        lambda raw: encode_block(BlockLayout("cd" * 32, P), STREAM, 4, block(3)),
        "checkpoint",
    ),
    "other block": (lambda raw: encode_block(LAYOUT, STREAM, 5, block(3)), "block 5"),
    "other stream": (lambda raw: encode_block(LAYOUT, POOL_STREAM, 4, block(3)), "stream"),
    "other shape": (lambda raw: _wider_block(), "shape"),
    "NaN with a valid checksum": (
        lambda raw: encode_block(LAYOUT, STREAM, 4, np.full((10, P), np.nan, np.float32)),
        "NaN",
    ),
    "not ours at all": (lambda raw: b"\x80\x04pickle?" * 100, "magic"),
}


@pytest.mark.parametrize(("corrupt", "reason"), CORRUPTIONS.values(), ids=list(CORRUPTIONS))
def test_every_corruption_is_detected(corrupt: Any, reason: str) -> None:
    raw = corrupt(encode_block(LAYOUT, STREAM, 4, block(3)))
    with pytest.raises(CorruptEntry, match=reason):
        decode_block(LAYOUT, STREAM, 4, raw)


# --- the in-process LRU ------------------------------------------------------------------


def test_local_cache_is_an_lru_bounded_in_bytes() -> None:
    nbytes = block().nbytes
    cache = LocalBlockCache(max_bytes=3 * nbytes)
    for i in range(3):
        cache.put(f"k{i}", block(i))
    assert cache.get("k0") is not None  # k0 is now the most recent
    cache.put("k3", block(3))
    assert cache.get("k1") is None and cache.get("k0") is not None
    assert len(cache) == 3 and cache.nbytes == 3 * nbytes
    tiny = LocalBlockCache(max_bytes=nbytes - 1)
    tiny.put("big", block())
    assert len(tiny) == 0 and tiny.nbytes == 0


# --- single flight -----------------------------------------------------------------------


class CountingGenerator:
    """A stand-in generator that is slow enough for requests to overlap, and counts."""

    def __init__(self, delay_s: float = 0.05) -> None:
        self.calls: Counter[tuple[str, int]] = Counter()
        self.delay_s = delay_s
        self.lock = threading.Lock()

    def __call__(self, stream: Stream, blocks: Sequence[int]) -> list[NDArray[np.float32]]:
        time.sleep(self.delay_s)
        with self.lock:
            self.calls.update((stream.name, b) for b in blocks)
        return [np.full((10, P), b, np.float32) for b in blocks]


async def run_compute(fn: Any) -> Any:
    return await anyio.to_thread.run_sync(fn)


def network_cache(
    generate: Any, redis: RedisBlockStore | None, prefix: str = "t", lock_wait_s: float = 5
) -> NetworkCache:
    return NetworkCache(
        layout=LAYOUT,
        generate=generate,
        run_compute=run_compute,
        local=LocalBlockCache(1 << 30),
        redis=redis,
        metrics=Metrics(),
        key_prefix=prefix,
        ttl_s=60,
        lock_timeout_s=5,
        lock_wait_s=lock_wait_s,
    )


def test_concurrent_requests_for_a_block_generate_it_once() -> None:
    gen = CountingGenerator()
    cache = network_cache(gen, redis=None)

    async def run() -> list[list[NDArray[np.float32]]]:
        return await asyncio.gather(*(cache.get_blocks(STREAM, [0, 1, 2]) for _ in range(8)))

    results = anyio.run(run)
    assert gen.calls == Counter({("seed-5", b): 1 for b in range(3)})
    assert all(r[1] is results[0][1] for r in results)
    metrics = cache._metrics.registry
    assert metrics.get_sample_value("apd_cache_misses_total") == 3
    assert metrics.get_sample_value("apd_cache_hits_total", {"tier": "coalesced"}) == 7 * 3


# --- with a real Redis -------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url() -> str:
    url = redis_url_for_tests()
    if not redis_available(url):
        pytest.skip(f"no Redis answers at {url}: start redis-server or set APD_TEST_REDIS_URL")
    return url


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    with redis_prefix(redis_url) as p:
        yield p


def store(url: str) -> RedisBlockStore:
    return RedisBlockStore(
        url,
        metrics=Metrics(),
        socket_timeout_s=1.0,
        health_interval_s=5,
        retry_min_s=0.1,
        retry_max_s=1.0,
    )


def test_two_workers_generate_each_block_once_between_them(redis_url: str, prefix: str) -> None:
    """Two caches with their own Redis connections (as two processes would have): the one
    that takes a block's lock generates it, the other waits for it in Redis."""
    gen = CountingGenerator(delay_s=0.2)

    async def run() -> tuple[list[Any], list[Any]]:
        a, b = store(redis_url), store(redis_url)
        await a.start()
        await b.start()
        try:
            one, two = network_cache(gen, a, prefix), network_cache(gen, b, prefix)
            return await asyncio.gather(
                one.get_blocks(STREAM, [0, 1, 2, 3]), two.get_blocks(STREAM, [3, 2, 1, 0])
            )
        finally:
            await a.close()
            await b.close()

    first, second = anyio.run(run)
    assert gen.calls == Counter({("seed-5", b): 1 for b in range(4)})
    for x, y in zip(first, reversed(second), strict=True):
        assert np.array_equal(x, y)


@pytest.mark.parametrize(
    ("lock_ttl_ms", "lock_wait_s", "at_least_s", "at_most_s"),
    [(300, 5.0, 0.25, 2.0), (60_000, 0.4, 0.35, 2.0)],
    ids=["lock of a crashed worker expires", "lock held too long: wait is bounded"],
)
def test_a_lock_whose_holder_never_delivers_does_not_block(
    redis_url: str,
    prefix: str,
    lock_ttl_ms: int,
    lock_wait_s: float,
    at_least_s: float,
    at_most_s: float,
) -> None:
    import redis as redis_py

    gen = CountingGenerator(delay_s=0.0)
    cache = network_cache(gen, None, prefix, lock_wait_s=lock_wait_s)
    holder = redis_py.Redis.from_url(redis_url)
    holder.set(cache.lock_key(STREAM, 0), b"someone-else", px=lock_ttl_ms)
    holder.close()

    async def run() -> float:
        s = store(redis_url)
        await s.start()
        cache.redis = s
        try:
            t0 = time.monotonic()
            await cache.get_blocks(STREAM, [0])
            return time.monotonic() - t0
        finally:
            await s.close()

    elapsed = anyio.run(run)
    assert at_least_s <= elapsed <= at_most_s, elapsed
    assert gen.calls == Counter({("seed-5", 0): 1})  # generated here, in the end


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("cache") / "model.safetensors")


def redis_settings(path: Path, url: str, prefix: str, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "checkpoint": path,
        "redis_url": url,
        "redis_key_prefix": prefix,
        "pool_size": 30,
        "default_num_samples": None,
        "num_threads": 1,
    }
    return Settings(**(base | overrides))


def sample(client: Any, name: str, labels: dict[str, str] | None = None) -> float:
    value = client.app.state.metrics.registry.get_sample_value(name, labels or {})
    return float(value or 0.0)


def test_instances_share_blocks_through_redis(ckpt_path: Path, redis_url: str, prefix: str) -> None:
    x = random_images(3, seed=6).tolist()
    request = {"inputs": x, "num_samples": 25, "seed": 99}
    with make_client(create_app(redis_settings(ckpt_path, redis_url, prefix))) as a:
        assert a.get("/readyz").json()["redis"] == "ok"
        assert sample(a, "apd_cache_misses_total") == 3  # the pool: 30 networks
        first = a.post("/predict", json=request).json()
        assert sample(a, "apd_cache_misses_total") == 3 + 3
        assert sample(a, "apd_cache_hits_total", {"tier": "redis"}) == 0
    with make_client(create_app(redis_settings(ckpt_path, redis_url, prefix))) as b:
        assert sample(b, "apd_cache_hits_total", {"tier": "redis"}) == 3  # B's pool, from A
        second = b.post("/predict", json=request).json()
        assert sample(b, "apd_cache_hits_total", {"tier": "redis"}) == 3 + 3
        assert sample(b, "apd_cache_misses_total") == 0
        assert sample(b, "apd_posterior_networks_generated_total") == 0
    assert first == second
    # The keys are the documented ones, with the checkpoint's sha256 and a TTL.
    import redis

    client = redis.Redis.from_url(redis_url)
    sha = load_checkpoint(ckpt_path).sha256
    keys = sorted(k.decode() for k in client.scan_iter(match=f"{prefix}:net:*"))
    assert f"{prefix}:net:{sha}:seed-99:2" in keys and f"{prefix}:net:{sha}:pool:0" in keys
    assert 0 < client.ttl(f"{prefix}:net:{sha}:seed-99:0") <= Settings().cache_ttl_s
    client.close()


def test_corrupt_entries_are_deleted_redrawn_and_never_served(
    ckpt_path: Path, redis_url: str, prefix: str
) -> None:
    import redis

    sha = load_checkpoint(ckpt_path).sha256
    x = random_images(4, seed=7).tolist()
    request = {"inputs": x, "num_samples": 40, "seed": 31}
    with make_client(create_app(redis_settings(ckpt_path, redis_url, prefix))) as a:
        clean = a.post("/predict", json=request).json()

    client = redis.Redis.from_url(redis_url)
    key = f"{prefix}:net:{sha}:seed-31:{{}}".format
    layout = BlockLayout(sha, load_checkpoint(ckpt_path).num_params)
    good: dict[int, bytes] = {}
    for b in range(4):
        raw = client.get(key(b))
        assert isinstance(raw, bytes)
        good[b] = raw
    stream = Stream.for_seed(31)
    foreign = BlockLayout("0" * 64, layout.num_params)
    client.set(key(0), good[0][:-100])  # truncated
    client.set(key(1), _flip(good[1], HEADER_BYTES + 1000))  # a flipped byte
    theta2 = decode_block(layout, stream, 2, good[2])
    client.set(key(2), encode_block(foreign, stream, 2, theta2 + 1))  # another checkpoint's

    with make_client(create_app(redis_settings(ckpt_path, redis_url, prefix))) as b:
        again = b.post("/predict", json=request).json()
        assert sample(b, "apd_cache_corrupt_entries_total") == 3
        assert sample(b, "apd_cache_misses_total") == 3  # the three, redrawn
        assert sample(b, "apd_cache_hits_total", {"tier": "redis"}) == 3 + 1  # pool + block 3
    assert again == clean
    # Rewritten: valid again, and equal to what was there before the damage.
    for blk in range(3):
        raw = client.get(key(blk))
        assert isinstance(raw, bytes)
        assert np.array_equal(
            decode_block(layout, stream, blk, raw), decode_block(layout, stream, blk, good[blk])
        )
    client.close()
