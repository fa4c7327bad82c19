"""What one worker holds while it serves: checkpoint, factored posterior, caches, pool, budget.

Built once, in the app's lifespan (:meth:`ServiceRuntime.start`), and closed on shutdown.

A request's K networks are codes in the generator's affine subspace, run by the factored
forward (:class:`apd.factored.AffinePosterior`): the cost of a request is about one network's
first layer plus a small per-network part, and its memory is bounded by ``forward_chunk_mb``
whatever K. Checkpoints whose generator adds residual noise are not affine; their networks are
materialised a block at a time (:func:`summarize_materialised`), slower but equally bounded.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Final

import anyio
import anyio.to_thread
import numpy as np
from numpy.typing import NDArray

from apd.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from apd.factored import AffinePosterior
from apd.networks import forward_probs
from apd.uncertainty import PredictiveAccumulator, PredictiveSummary, ScoreName
from service.config import Settings
from service.core.networks import (
    NETWORKS_PER_BLOCK,
    NetworkBlock,
    NetworkPlan,
    PosteriorPool,
    Stream,
    block_noise,
)
from service.infra.admission import MemoryBudget, ParseLimits
from service.infra.cache import BlockLayout, LocalBlockCache, NetworkCache, RedisBlockStore
from service.infra.telemetry import Metrics

FloatArray = NDArray[np.float32]


class NonFiniteAnswer(Exception):
    """The computed answer holds a NaN or an infinite number: it is never sent (500)."""


log = logging.getLogger("apd.service")

# Tails (the layers after the first) are kept beside the codes of seeded requests' networks
# (the in-process LRU) when a network's tail has at most this many weights: fcNN1's 1,010
# (4 KB) are; fcNN2's 164,410 (658 KB) are recomputed from the codes a chunk at a time. The
# pool keeps tails for as many of its networks as ``tail_cache_mb`` holds.
MAX_KEPT_TAIL_PARAMS: Final = 16_384
FORWARD_NAME: Final = "numpy-factored"


def check_servable(ckpt: Checkpoint, settings: Settings) -> None:
    """Raise :class:`CheckpointError` if this service cannot serve ``ckpt`` as configured."""
    where = f"checkpoint {ckpt.path}"
    if settings.expected_sha256 is not None and ckpt.sha256 != settings.expected_sha256:
        raise CheckpointError(
            f"{where}: sha256 {ckpt.sha256} is not the expected {settings.expected_sha256}"
        )
    if ckpt.meta.input.input_dim != ckpt.spec.input_dim:
        raise CheckpointError(
            f"{where}: its input convention has {ckpt.meta.input.input_dim} values per example, "
            f"its network takes {ckpt.spec.input_dim}"
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


def summarize_materialised(ckpt: Checkpoint, plan: NetworkPlan, x: FloatArray) -> PredictiveSummary:
    """The reference path, for generators with residual noise: each block's networks are
    drawn as weights (:meth:`Checkpoint.generate`) and run (:func:`forward_probs`), one block
    at a time."""
    g = ckpt.meta.generator
    acc = PredictiveAccumulator()
    left = plan.num_networks
    for b in plan.blocks:
        z, eps = block_noise(plan.stream, b, g.noise_dim, ckpt.num_params, g.has_residual)
        theta = ckpt.generate(z, eps)[: min(left, NETWORKS_PER_BLOCK)]
        acc.add(forward_probs(ckpt.spec, theta, x))
        left -= len(theta)
    return acc.summary()


def draw_blocks(
    ckpt: Checkpoint,
    posterior: AffinePosterior,
    stream: Stream,
    blocks: Sequence[int],
    known: Mapping[int, FloatArray],
    with_tails: bool,
) -> list[NetworkBlock]:
    """Blocks of ``stream``, from their codes where ``known`` (read from a cache), drawing the
    others' noise and running the generator over all of them in one pass; with their tails
    when ``with_tails``. Read-only arrays."""
    todo = [b for b in blocks if b not in known]
    drawn: dict[int, FloatArray] = {}
    if todo:
        noise_dim = ckpt.meta.generator.noise_dim
        z = [block_noise(stream, b, noise_dim, ckpt.num_params, False)[0] for b in todo]
        codes = ckpt.codes(np.concatenate(z))
        for i, b in enumerate(todo):
            drawn[b] = codes[i * NETWORKS_PER_BLOCK : (i + 1) * NETWORKS_PER_BLOCK]
    out = []
    for b in blocks:
        codes = np.ascontiguousarray(known[b] if b in known else drawn[b])
        codes.setflags(write=False)
        tails = posterior.tails(codes) if with_tails else None
        if tails is not None:
            tails.setflags(write=False)
        out.append(NetworkBlock(codes, tails))
    return out


@dataclass
class ServiceRuntime:
    settings: Settings
    checkpoint: Checkpoint
    posterior: AffinePosterior
    metrics: Metrics
    cache: NetworkCache
    pool: PosteriorPool
    redis: RedisBlockStore | None
    limiter: anyio.CapacityLimiter
    budget: MemoryBudget
    default_num_samples: int

    @classmethod
    async def start(cls, settings: Settings, ckpt: Checkpoint, metrics: Metrics) -> ServiceRuntime:
        limiter = anyio.CapacityLimiter(settings.compute_concurrency)
        offset, directions = ckpt.affine
        posterior = AffinePosterior(
            ckpt.spec, offset, directions, chunk_bytes=settings.forward_chunk_bytes
        )
        keep_tails = posterior.tail_params <= MAX_KEPT_TAIL_PARAMS

        def complete(
            stream: Stream,
            blocks: Sequence[int],
            known: Mapping[int, FloatArray],
            with_tails: bool = keep_tails,
        ) -> list[NetworkBlock]:
            return draw_blocks(ckpt, posterior, stream, blocks, known, with_tails)

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
                password=settings.redis_secret,
            )
            await redis.start()
        else:
            metrics.cache_degraded.set(0)
        # Without Redis nothing leaves the process, and a random key signs nothing shared.
        hmac_key = settings.hmac_key or os.urandom(32)
        cache = NetworkCache(
            layout=BlockLayout(ckpt.sha256, posterior.code_dim, hmac_key),
            complete=complete,
            run_compute=run_compute,
            local=LocalBlockCache(settings.local_cache_bytes),
            redis=redis,
            metrics=metrics,
            key_prefix=settings.redis_key_prefix,
            ttl_s=settings.cache_ttl_s,
        )

        async def draw(stream: Stream, blocks: Sequence[int], tails: bool) -> list[NetworkBlock]:
            drawn: list[NetworkBlock] = await run_compute(
                lambda: complete(stream, blocks, {}, tails)
            )
            metrics.networks_generated.inc(sum(len(b) for b in drawn))
            return drawn

        per_block = NETWORKS_PER_BLOCK * posterior.tail_params * 4
        tailed = min(
            settings.pool_size, settings.tail_cache_bytes // per_block * NETWORKS_PER_BLOCK
        )
        pool = PosteriorPool(settings.pool_size, cache.get_blocks, draw, tailed)
        t0 = time.perf_counter()
        try:
            await pool.load()  # for a residual generator only its plan is used
        except BaseException:
            if redis is not None:
                await redis.close()
            raise
        log.info(
            "pool of %d networks (%.1f MB) ready in %.2f s (checkpoint %s, code length %d, "
            "factored first layer %.1f MB, cache %s)",
            pool.size,
            pool.nbytes / 1e6,
            time.perf_counter() - t0,
            ckpt.sha256[:12],
            posterior.code_dim,
            posterior.stacked_bytes / 1e6,
            "redis" if redis else "memory",
        )
        metrics.model_info.labels(
            model_id=ckpt.meta.model_id,
            version=ckpt.meta.version,
            sha256=ckpt.sha256,
            backend=FORWARD_NAME,
        ).set(1)
        return cls(
            settings=settings,
            checkpoint=ckpt,
            posterior=posterior,
            metrics=metrics,
            cache=cache,
            pool=pool,
            redis=redis,
            limiter=limiter,
            budget=MemoryBudget(
                settings.memory_budget_bytes,
                settings.admission_wait_s,
                metrics,
                max_queue=settings.admission_queue,
                max_queue_per_client=settings.admission_queue_per_client,
            ),
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

    @property
    def parse_limits(self) -> ParseLimits:
        """What the JSON of a valid request to this model can hold (service.infra.admission)."""
        return ParseLimits.of(tuple(self.checkpoint.meta.input.shape), self.settings.max_batch)

    async def infer(
        self, inputs: FloatArray, num_samples: int, seed: int | None, endpoint: str
    ) -> PredictiveSummary:
        """Summary of K = ``num_samples`` posterior networks on ``inputs (N, D)``: validated
        examples in the model's raw units, preprocessed here with the checkpoint's convention
        (:meth:`apd.checkpoint.InputConvention.preprocess`)."""
        plan = self.pool.plan(num_samples, seed)
        x = self.checkpoint.meta.input.preprocess(inputs)
        forward: Callable[[], PredictiveSummary]
        if self.checkpoint.is_affine:
            segments = await self.pool.segments(plan)
            parts = [(s.codes, s.tails) for s in segments]
            forward = partial(self.posterior.summarize_segments, parts, x)
        else:
            forward = partial(summarize_materialised, self.checkpoint, plan, x)
        support = self.checkpoint.data_support

        def compute() -> PredictiveSummary:  # off the event loop, the data support too
            summary = forward()
            if support is None:
                return summary
            return replace(summary, data_support=support.score(x))

        t0 = time.perf_counter()
        summary = await anyio.to_thread.run_sync(compute, limiter=self.limiter)
        self.metrics.inference_duration.labels(endpoint=endpoint).observe(time.perf_counter() - t0)
        self.metrics.networks_sampled.inc(num_samples)
        if not all(a is None or np.isfinite(a).all() for a in vars(summary).values()):
            self.metrics.nonfinite_answers.labels(endpoint=endpoint).inc()
            raise NonFiniteAnswer(
                f"the model computed a non-finite answer for this request (checkpoint "
                f"{self.checkpoint.sha256[:12]}): not sent; the served checkpoint is broken"
            )
        return summary

    def flags(
        self, summary: PredictiveSummary, name: ScoreName
    ) -> tuple[NDArray[np.float64], NDArray[np.bool_], float]:
        """``(scores, flags, threshold)`` of score ``name`` as the checkpoint's calibration
        flags them (:meth:`apd.checkpoint.AnomalyCalibration.flags`: a NaN score is flagged),
        counted in the flags metric."""
        scores, flags, threshold = self.checkpoint.meta.anomaly.flags(summary, name)
        self.metrics.anomaly_flags.labels(score=name.value).inc(int(flags.sum()))
        return scores, flags, threshold
