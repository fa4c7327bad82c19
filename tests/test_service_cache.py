"""Network codes: the posterior-pool plan, the HMAC'd Redis value format, the in-process LRU,
and the cache shared through a real Redis by two app instances, including forged entries."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from numpy.typing import NDArray

from apd.checkpoint import load_checkpoint
from apd.factored import AffinePosterior
from service.api.app import create_app
from service.config import Settings
from service.core.networks import (
    MAX_SEED,
    NETWORKS_PER_BLOCK,
    POOL_STREAM,
    NetworkBlock,
    NetworkSource,
    Stream,
    block_noise,
    draw_codes,
    plan_networks,
    truncate,
)
from service.infra.cache import (
    HEADER_BYTES,
    BlockLayout,
    CorruptEntry,
    LocalBlockCache,
    decode_block,
    encode_block,
)
from service.infra.telemetry import Metrics
from tests.service_support import (
    make_checkpoint,
    make_client,
    random_images,
    redis_available,
    redis_prefix,
    redis_url_for_tests,
)

P = 50
R = 6
KEY = b"k" * 32
LAYOUT = BlockLayout(checkpoint_sha256="ab" * 32, code_dim=R, hmac_key=KEY)
STREAM = Stream.for_seed(5)
NAMESPACE = "test-fcnn/1"  # model and repository version of make_checkpoint's model
HMAC_KEY = "test-hmac-key-0123456789abcdef"


def codes(seed: int = 0) -> NDArray[np.float32]:
    return np.random.default_rng(seed).standard_normal((NETWORKS_PER_BLOCK, R), dtype=np.float32)


def block(seed: int = 0) -> NetworkBlock:
    return NetworkBlock(codes(seed), np.full((NETWORKS_PER_BLOCK, 3), seed, np.float32))


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
    z, eps = block_noise(STREAM, 3, noise_dim=4, residual_dim=P)
    z2, eps2 = block_noise(Stream.for_seed(5), 3, noise_dim=4, residual_dim=P)
    assert eps is not None and eps2 is not None
    assert np.array_equal(z, z2) and np.array_equal(eps, eps2)
    assert z.shape == (10, 4) and z.dtype == np.float32 and eps.shape == (10, P)
    other_block, _ = block_noise(STREAM, 4, noise_dim=4, residual_dim=P)
    other_seed, _ = block_noise(Stream.for_seed(6), 3, noise_dim=4, residual_dim=P)
    pool, _ = block_noise(POOL_STREAM, 3, noise_dim=4, residual_dim=P)
    for other in (other_block, other_seed, pool):
        assert not np.allclose(z, other)
    # The documented scheme, written out.
    rng = np.random.default_rng(np.random.SeedSequence(entropy=5, spawn_key=(3,)))
    assert np.array_equal(z, rng.standard_normal((10, 4), dtype=np.float32))
    assert block_noise(STREAM, 3, 4, 0)[1] is None


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
    assert np.shares_memory(out[1].codes, b.codes) and np.shares_memory(out[1].tails, b.tails)
    with pytest.raises(ValueError):
        truncate([a], 11)


def _source(path: Path, pool_size: int, tailed_size: int) -> NetworkSource:
    ckpt = load_checkpoint(path)
    offset, directions = ckpt.affine
    return NetworkSource(
        ckpt,
        AffinePosterior(ckpt.spec, offset, directions),
        namespace=NAMESPACE,
        pool_size=pool_size,
        tailed_size=tailed_size,
        keep_tails=True,
        local=LocalBlockCache(1 << 24),
        redis=None,
        hmac_key=KEY,
        key_prefix="test",
        ttl_s=60,
        metrics=Metrics(),
        limiter=anyio.CapacityLimiter(1),
    )


def test_pool_segments_are_views_of_one_read_only_pool(ckpt_path: Path) -> None:
    ckpt = load_checkpoint(ckpt_path)
    source = _source(ckpt_path, 50, 50)

    async def run() -> None:
        await source.load()
        assert source.size == 50
        (segment,) = await source.segments(source.plan(30, None))
        assert segment.codes.shape == (30, ckpt.code_dim)
        assert not segment.codes.flags.writeable and segment.tails is not None
        pool = np.concatenate([s.codes for s in await source.segments(source.plan(50, None))])
        assert np.allclose(
            pool, draw_codes(ckpt, source.posterior, POOL_STREAM, range(5)), rtol=1e-5
        )  # in order
        big = await source.segments(source.plan(65, None))  # the pool + 2 further blocks
        assert [len(s) for s in big] == [50, 15]
        assert np.allclose(
            big[1].codes, draw_codes(ckpt, source.posterior, POOL_STREAM, [5, 6])[:15], rtol=1e-5
        )
        (seeded,) = await source.segments(source.plan(15, 3))  # one run, whole
        assert np.array_equal(
            seeded.codes, draw_codes(ckpt, source.posterior, Stream.for_seed(3), [0, 1])[:15]
        )
        again = await source.segments(source.plan(15, 3))
        assert np.shares_memory(again[0].codes, seeded.codes)  # the LRU's run, not a copy

    anyio.run(run)


def test_small_requests_use_the_pool_networks_kept_with_their_tails(ckpt_path: Path) -> None:
    source = _source(ckpt_path, 100, 30)
    ckpt = load_checkpoint(ckpt_path)
    first = draw_codes(ckpt, AffinePosterior(ckpt.spec, *ckpt.affine), POOL_STREAM, range(3))

    async def run() -> None:
        await source.load()
        for _ in range(50):  # K within the 30 tailed networks: always answered from them
            (segment,) = await source.segments(source.plan(25, None))
            assert segment.tails is not None
            assert all(np.isclose(first, row, rtol=1e-5).all(1).any() for row in segment.codes)
        windows = set()
        for _ in range(200):  # K above them: any window; one across the edge comes in two parts
            segments = await source.segments(source.plan(45, None))
            assert sum(len(s) for s in segments) == 45
            windows.add(tuple(s.tails is not None for s in segments))
        assert {(True, False), (False,)} <= windows <= {(True, False), (False,), (True,)}

    anyio.run(run)


# --- the Redis value format --------------------------------------------------------------


def test_round_trip() -> None:
    c = codes(3)
    raw = encode_block(LAYOUT, STREAM.name, 4, c)
    assert raw[:4] == b"APDC" and len(raw) == LAYOUT.entry_bytes == HEADER_BYTES + 10 * R * 4 + 32
    out = decode_block(LAYOUT, STREAM.name, 4, raw)
    assert np.array_equal(out, c) and out.dtype == np.float32


def test_the_mac_is_hmac_sha256_of_header_and_codes_with_the_key() -> None:
    import hashlib
    import hmac

    raw = encode_block(LAYOUT, STREAM.name, 4, codes(3))
    assert raw[-32:] == hmac.new(KEY, raw[:-32], hashlib.sha256).digest()


def _flip(raw: bytes, at: int) -> bytes:
    return raw[:at] + bytes([raw[at] ^ 0x01]) + raw[at + 1 :]


def _forged(raw: bytes) -> bytes:
    """What someone who can write to Redis but lacks the key can do: a well-formed entry for
    this very block, with codes of their choosing and a MAC made with another key."""
    other = BlockLayout(LAYOUT.checkpoint_sha256, R, b"x" * 32)
    return encode_block(other, STREAM.name, 4, codes(3) * 100)


def _forged_checksum(raw: bytes) -> bytes:
    """...or a plain SHA-256 where the MAC belongs (what the old format's checksum was)."""
    import hashlib

    body = raw[:-32][:HEADER_BYTES] + (codes(3) * 100).tobytes()
    return body + hashlib.sha256(body).digest()


CORRUPTIONS = {
    "truncated": (lambda raw: raw[:-7], "length"),
    "truncated header": (lambda raw: raw[:20], "length"),
    "flipped code byte": (lambda raw: _flip(raw, HEADER_BYTES + 13), "HMAC"),
    "flipped MAC byte": (lambda raw: _flip(raw, len(raw) - 1), "HMAC"),
    "flipped magic": (lambda raw: _flip(raw, 0), "HMAC"),
    "appended byte": (lambda raw: raw + b"\0", "length"),
    "forged with another key": (_forged, "HMAC"),
    "forged with a checksum": (_forged_checksum, "HMAC"),
    "foreign checkpoint": (
        lambda raw: encode_block(BlockLayout("cd" * 32, R, KEY), STREAM.name, 4, codes(3)),
        "checkpoint",
    ),
    "other block": (lambda raw: encode_block(LAYOUT, STREAM.name, 5, codes(3)), "block 5"),
    "other stream": (lambda raw: encode_block(LAYOUT, POOL_STREAM.name, 4, codes(3)), "stream"),
    "NaN with a valid MAC": (
        lambda raw: encode_block(LAYOUT, STREAM.name, 4, np.full((10, R), np.nan, np.float32)),
        "NaN",
    ),
    "not ours at all": (lambda raw: b"\x80\x04pickle?" * 100, "length"),
}


@pytest.mark.parametrize(("corrupt", "reason"), CORRUPTIONS.values(), ids=list(CORRUPTIONS))
def test_every_corruption_and_forgery_is_detected(corrupt: Any, reason: str) -> None:
    raw = corrupt(encode_block(LAYOUT, STREAM.name, 4, codes(3)))
    with pytest.raises(CorruptEntry, match=reason):
        decode_block(LAYOUT, STREAM.name, 4, raw)


def test_a_short_key_is_refused() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        BlockLayout("ab" * 32, R, b"short")


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


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("cache") / "model.safetensors")


def redis_settings(path: Path, url: str, prefix: str, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "checkpoint": path,
        "redis_url": url,
        "redis_key_prefix": prefix,
        "cache_hmac_key": HMAC_KEY,
        "pool_size": 30,
        "default_num_samples": None,
        "num_threads": 1,
    }
    return Settings(**(base | overrides))


def sample(client: Any, name: str, labels: dict[str, str] | None = None) -> float:
    value = client.app.state.metrics.registry.get_sample_value(name, labels or {})
    return float(value or 0.0)


def test_redis_needs_an_hmac_key(ckpt_path: Path, redis_url: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="cache_hmac_key"):
        Settings(checkpoint=ckpt_path, redis_url=redis_url)


def test_instances_share_codes_through_redis(ckpt_path: Path, redis_url: str, prefix: str) -> None:
    x = random_images(3, seed=6).tolist()
    request = {"inputs": x, "num_samples": 25, "seed": 99}
    with make_client(create_app(redis_settings(ckpt_path, redis_url, prefix))) as a:
        assert a.get("/readyz").json()["redis"] == "ok"
        assert sample(a, "apd_cache_misses_total") == 0  # the pool is drawn, never cached
        first = a.post("/predict", json=request).json()
        assert sample(a, "apd_cache_misses_total") == 3
        assert sample(a, "apd_cache_hits_total", {"tier": "redis"}) == 0
        a.post("/predict", json=request)
        assert sample(a, "apd_cache_hits_total", {"tier": "memory"}) == 3
    with make_client(create_app(redis_settings(ckpt_path, redis_url, prefix))) as b:
        second = b.post("/predict", json=request).json()
        assert sample(b, "apd_cache_hits_total", {"tier": "redis"}) == 3
        assert sample(b, "apd_cache_misses_total") == 0
        assert sample(b, "apd_posterior_networks_generated_total") == 30  # its pool only
    assert first == second
    # The keys are the documented ones, with the checkpoint's sha256 and a TTL.
    import redis

    client = redis.Redis.from_url(redis_url)
    sha = load_checkpoint(ckpt_path).sha256
    keys = sorted(k.decode() for k in client.scan_iter(match=f"{prefix}:*"))
    assert keys == [f"{prefix}:codes:{NAMESPACE}:{sha}:seed-99:{b}" for b in range(3)]
    assert 0 < client.ttl(keys[0]) <= Settings().cache_ttl_s
    assert (
        client.strlen(keys[0]) == HEADER_BYTES + 10 * load_checkpoint(ckpt_path).code_dim * 4 + 32
    )
    client.close()


def test_corrupt_and_forged_entries_are_deleted_redrawn_and_never_served(
    ckpt_path: Path, redis_url: str, prefix: str
) -> None:
    import redis

    ckpt = load_checkpoint(ckpt_path)
    x = random_images(4, seed=7).tolist()
    request = {"inputs": x, "num_samples": 40, "seed": 31}
    with make_client(create_app(redis_settings(ckpt_path, redis_url, prefix))) as a:
        clean = a.post("/predict", json=request).json()

    client = redis.Redis.from_url(redis_url)
    key = f"{prefix}:codes:{NAMESPACE}:{ckpt.sha256}:seed-31:{{}}".format
    layout = BlockLayout(ckpt.sha256, ckpt.code_dim, HMAC_KEY.encode())
    good: dict[int, bytes] = {}
    for b in range(4):
        raw = client.get(key(b))
        assert isinstance(raw, bytes)
        good[b] = raw
    stream = Stream.for_seed(31)
    poison = decode_block(layout, stream.name, 1, good[1]) + 5.0
    client.set(key(0), good[0][:-100])  # truncated
    forger = BlockLayout(ckpt.sha256, ckpt.code_dim, b"not-the-service-key!")
    client.set(key(1), encode_block(forger, stream.name, 1, poison))  # forged: codes of their own
    foreign = BlockLayout("0" * 64, ckpt.code_dim, HMAC_KEY.encode())
    client.set(key(2), encode_block(foreign, stream.name, 2, poison))  # another checkpoint's

    with make_client(create_app(redis_settings(ckpt_path, redis_url, prefix))) as b:
        again = b.post("/predict", json=request).json()
        assert sample(b, "apd_cache_corrupt_entries_total") == 3
        assert sample(b, "apd_cache_misses_total") == 3  # the three, redrawn
        assert sample(b, "apd_cache_hits_total", {"tier": "redis"}) == 1  # block 3
    # Redrawn, the same networks: equal up to the last bits that a matrix product computed
    # over another batch of blocks may round differently (NumPy's BLAS kernels by shape).
    assert _approx(again, clean)
    # Rewritten: valid again, and equal to what was there before the damage.
    for blk in range(3):
        raw = client.get(key(blk))
        assert isinstance(raw, bytes)
        np.testing.assert_allclose(
            decode_block(layout, stream.name, blk, raw),
            decode_block(layout, stream.name, blk, good[blk]),
            rtol=1e-5,
            atol=1e-6,
        )
    client.close()


def test_a_poisoned_pool_in_redis_is_never_served(
    ckpt_path: Path, redis_url: str, prefix: str
) -> None:
    """Entries forged under the pool stream's keys (and with the right key, as a leaked-key
    attacker could) do not reach answers: the pool is drawn in-process, never read back."""
    import redis

    ckpt = load_checkpoint(ckpt_path)
    layout = BlockLayout(ckpt.sha256, ckpt.code_dim, HMAC_KEY.encode())
    client = redis.Redis.from_url(redis_url)
    for b in range(3):
        poison = np.full((10, ckpt.code_dim), 50.0, np.float32)
        client.set(
            f"{prefix}:codes:{NAMESPACE}:{ckpt.sha256}:pool:{b}",
            encode_block(layout, POOL_STREAM.name, b, poison),
        )
    x = random_images(4, seed=8).tolist()
    with make_client(create_app(redis_settings(ckpt_path, redis_url, prefix))) as a:
        with_poison = a.post("/predict", json={"inputs": x, "num_samples": 30}).json()
        assert sample(a, "apd_cache_hits_total", {"tier": "redis"}) == 0
    settings = redis_settings(ckpt_path, redis_url, prefix, redis_url=None)
    with make_client(create_app(settings)) as alone:
        reference = alone.post("/predict", json={"inputs": x, "num_samples": 30}).json()
    assert with_poison["predictions"] == reference["predictions"]  # K = pool size: all of it
    client.close()


def _approx(a: Any, b: Any, rel: float = 1e-6) -> bool:
    """The same JSON answer, floats equal to ``rel`` (relative) or 1e-12 (absolute)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_approx(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_approx(x, y, rel) for x, y in zip(a, b, strict=True))
    if type(a) is float and type(b) is float:
        return abs(a - b) <= max(rel * max(abs(a), abs(b)), 1e-12)
    return bool(a == b) and type(a) is type(b)


def test_planted_oversized_and_wrong_type_values_cost_once_and_are_deleted(
    ckpt_path: Path, redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Values planted under the service's keys that are not entries (8 MiB of bytes, a list)
    are read only up to one entry's length, refused, deleted, redrawn and rewritten: the
    next request that lands on them reads valid entries; Redis never goes degraded."""
    import redis

    ckpt = load_checkpoint(ckpt_path)
    key = f"{prefix}:codes:{NAMESPACE}:{ckpt.sha256}:seed-41:{{}}".format
    client = redis.Redis.from_url(redis_url)
    client.set(key(0), b"\0" * (8 << 20))
    client.rpush(key(1), b"not", b"a", b"string")
    request = {"inputs": random_images(2, seed=9).tolist(), "num_samples": 20, "seed": 41}
    with make_client(create_app(redis_settings(ckpt_path, redis_url, prefix))) as a:
        caplog.set_level("WARNING", logger="apd.service.infra.cache")
        assert a.post("/predict", json=request).status_code == 200
        assert sample(a, "apd_cache_corrupt_entries_total") == 2
        assert sample(a, "apd_cache_errors_total", {"kind": "timeout"}) == 0
        assert a.get("/readyz").json()["redis"] == "ok"
    assert "expected" in caplog.text and "not a string value" in caplog.text
    layout = BlockLayout(ckpt.sha256, ckpt.code_dim, HMAC_KEY.encode())
    for b in range(2):  # rewritten as valid entries: the planted values cost once
        raw = client.get(key(b))
        assert isinstance(raw, bytes) and len(raw) == layout.entry_bytes
    with make_client(create_app(redis_settings(ckpt_path, redis_url, prefix))) as b2:
        assert b2.post("/predict", json=request).status_code == 200
        assert sample(b2, "apd_cache_corrupt_entries_total") == 0
        assert sample(b2, "apd_cache_hits_total", {"tier": "redis"}) == 2
    client.close()


def test_a_password_for_a_redis_that_needs_none_is_a_warning(
    ckpt_path: Path, redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    import redis

    if redis.Redis.from_url(redis_url).config_get("requirepass").get("requirepass"):
        pytest.skip("the test Redis requires a password")
    caplog.set_level("WARNING", logger="apd.service.infra.cache")
    settings = redis_settings(ckpt_path, redis_url, prefix, redis_password="not-needed")
    with make_client(create_app(settings)) as a:
        # Redis accepts (and ignores) the password; the service says so once, at start
        assert a.get("/readyz").json()["redis"] == "ok"
    assert "accepts clients without a password" in caplog.text
    caplog.clear()
    with make_client(create_app(redis_settings(ckpt_path, redis_url, prefix))):
        pass
    assert "without a password" not in caplog.text
