"""What one worker holds while it serves: checkpoint, backend, caches, pool, metrics.

Built once, in the app's lifespan (:meth:`ServiceRuntime.start`), and closed on shutdown.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
from numpy.typing import NDArray

from apd.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from apd.uncertainty import PredictiveSummary, ScoreName, summarize
from service.backends import GeneratorBackend, create_backend
from service.cache import BlockLayout, LocalBlockCache, NetworkCache, RedisBlockStore
from service.config import Settings
from service.metrics import Metrics
from service.posterior_pool import PosteriorPool, Stream, block_noise
from service.schemas import IMAGE_PIXELS, IMAGE_SIDE

FloatArray = NDArray[np.float32]
log = logging.getLogger("apd.service")


def check_servable(ckpt: Checkpoint, settings: Settings) -> None:
    """Raise :class:`CheckpointError` if this service cannot serve ``ckpt`` as configured."""
    where = f"checkpoint {ckpt.path}"
    if settings.expected_sha256 is not None and ckpt.sha256 != settings.expected_sha256:
        raise CheckpointError(
            f"{where}: sha256 {ckpt.sha256} is not the expected {settings.expected_sha256}"
        )
    shape = list(ckpt.meta.input.shape)
    if shape != [IMAGE_SIDE, IMAGE_SIDE] or ckpt.spec.input_dim != IMAGE_PIXELS:
        raise CheckpointError(
            f"{where}: expects inputs of shape {shape} ({ckpt.spec.input_dim} values); "
            f"this service serves {IMAGE_SIDE}x{IMAGE_SIDE} images"
        )
    default = settings.default_num_samples or ckpt.meta.num_samples_default
    if default > settings.max_num_samples:
        raise CheckpointError(
            f"{where}: its default num_samples {default} exceeds max_num_samples "
            f"{settings.max_num_samples}; set default_num_samples"
        )


def load_servable(settings: Settings) -> Checkpoint:
    """Load, validate and check the configured checkpoint (:class:`CheckpointError` if not)."""
    ckpt = load_checkpoint(settings.checkpoint)
    check_servable(ckpt, settings)
    return ckpt


def summarize_segments(
    backend: GeneratorBackend, segments: Sequence[FloatArray], x: FloatArray
) -> PredictiveSummary:
    """Uncertainty summary of the networks in ``segments`` on ``x``.

    Each segment (a contiguous ``(k_i, P)`` array) is one batched forward pass.
    """
    probs = [backend.forward_probs(seg, x) for seg in segments]
    return summarize(probs[0] if len(probs) == 1 else np.concatenate(probs, axis=0))


@dataclass
class ServiceRuntime:
    settings: Settings
    checkpoint: Checkpoint
    backend: GeneratorBackend
    metrics: Metrics
    cache: NetworkCache
    pool: PosteriorPool
    redis: RedisBlockStore | None
    limiter: anyio.CapacityLimiter
    default_num_samples: int

    @classmethod
    async def start(cls, settings: Settings, ckpt: Checkpoint, metrics: Metrics) -> ServiceRuntime:
        backend = create_backend(settings.backend, ckpt, settings.num_threads)
        limiter = anyio.CapacityLimiter(settings.compute_concurrency)
        g = ckpt.meta.generator

        def generate(stream: Stream, blocks: Sequence[int]) -> list[FloatArray]:
            out = []
            for b in blocks:
                z, eps = block_noise(stream, b, g.noise_dim, ckpt.num_params, g.has_residual)
                theta = backend.generate(z, eps)
                theta.setflags(write=False)
                out.append(theta)
            return out

        async def run_compute(fn: Callable[[], Any]) -> Any:
            return await anyio.to_thread.run_sync(fn, limiter=limiter)

        redis: RedisBlockStore | None = None
        if settings.redis_url is not None:
            redis = RedisBlockStore(
                settings.redis_url,
                metrics=metrics,
                socket_timeout_s=settings.redis_socket_timeout_s,
                health_interval_s=settings.redis_health_interval_s,
                retry_min_s=settings.redis_retry_min_s,
                retry_max_s=settings.redis_retry_max_s,
            )
            await redis.start()
        else:
            metrics.cache_degraded.set(0)
        cache = NetworkCache(
            layout=BlockLayout(ckpt.sha256, ckpt.num_params),
            generate=generate,
            run_compute=run_compute,
            local=LocalBlockCache(settings.local_cache_bytes),
            redis=redis,
            metrics=metrics,
            key_prefix=settings.redis_key_prefix,
            ttl_s=settings.cache_ttl_s,
            lock_timeout_s=settings.redis_lock_timeout_s,
            lock_wait_s=settings.redis_lock_wait_s,
        )

        async def pool_source(stream: Stream, blocks: Sequence[int]) -> list[FloatArray]:
            return await cache.get_blocks(stream, blocks, keep_local=False)

        pool = PosteriorPool(settings.pool_size, cache.get_blocks, pool_source)
        t0 = time.perf_counter()
        try:
            await pool.load()
        except BaseException:
            if redis is not None:
                await redis.close()
            raise
        log.info(
            "pool of %d networks ready in %.2f s (checkpoint %s, backend %s, cache %s)",
            pool.size,
            time.perf_counter() - t0,
            ckpt.sha256[:12],
            backend.kind.value,
            "redis" if redis else "memory",
        )
        metrics.model_info.labels(
            model_id=ckpt.meta.model_id,
            version=ckpt.meta.version,
            sha256=ckpt.sha256,
            backend=backend.kind.value,
        ).set(1)
        return cls(
            settings=settings,
            checkpoint=ckpt,
            backend=backend,
            metrics=metrics,
            cache=cache,
            pool=pool,
            redis=redis,
            limiter=limiter,
            default_num_samples=settings.default_num_samples or ckpt.meta.num_samples_default,
        )

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.close()

    @property
    def cache_kind(self) -> str:
        return "redis" if self.redis is not None else "memory"

    @property
    def redis_state(self) -> str:
        if self.redis is None:
            return "disabled"
        return "ok" if self.redis.available else "degraded"

    @property
    def thresholds(self) -> dict[ScoreName, float]:
        return dict(self.checkpoint.meta.anomaly.thresholds)

    @property
    def default_score(self) -> ScoreName:
        return self.checkpoint.meta.anomaly.default_score

    async def infer(
        self, pixels: FloatArray, num_samples: int, seed: int | None, endpoint: str
    ) -> PredictiveSummary:
        """Summary of K = ``num_samples`` posterior networks on ``pixels (N, 784)``."""
        plan = self.pool.plan(num_samples, seed)
        segments = await self.pool.segments(plan)
        scale = self.checkpoint.meta.input.scale
        x = pixels if scale == 1.0 else pixels * np.float32(scale)
        t0 = time.perf_counter()
        summary: PredictiveSummary = await anyio.to_thread.run_sync(
            summarize_segments, self.backend, segments, x, limiter=self.limiter
        )
        self.metrics.inference_duration.labels(endpoint=endpoint).observe(time.perf_counter() - t0)
        self.metrics.networks_sampled.inc(num_samples)
        return summary
