"""A served model version answers a query: ``await model.predict(query) -> answer``.

This is the one entry point of the serving core (in the spirit of KServe's ``DataPlane``):
every route and protocol (``/predict``, ``/predict/image``, ``/anomaly-score``, V2 REST, V2
gRPC) decodes its request into a :class:`Query` of validated inputs, K, seed and score, calls
:meth:`ServedModel.predict`, and encodes the :class:`Answer`: the predictive summary, the
probabilities served (recalibrated where the checkpoint says so) and the anomaly flags.

A query's K networks are codes in the generator's affine subspace (with the residual noise
of their forward, where the generator adds some), run by the factored forward
(:class:`apd.factored.AffinePosterior`): the cost of a query is about one network's first
layer plus a small per-network part, and its memory is bounded by ``forward_chunk_mb``
whatever K. A CNN whose generator adds residual noise is the exception: its networks are
materialised a block at a time (:func:`summarize_materialised`), slower but equally bounded.
The networks come from the version's :class:`~service.core.networks.NetworkSource`; unseeded
queries may be batched with others (:mod:`service.core.batching`).

A query stops at its forward's next chunk when its caller is cancelled (a client that
disconnected, a gRPC deadline) or when its deadline passes (:class:`DeadlineExceeded`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Final, TypeVar

import anyio
import anyio.from_thread
import anyio.to_thread
import numpy as np
from numpy.typing import NDArray

from apd.checkpoint import Checkpoint, CheckpointError
from apd.factored import AffinePosterior
from apd.networks import MLPSpec, forward_probs
from apd.uncertainty import PredictiveAccumulator, PredictiveSummary, ScoreName
from service.core.batching import DynamicBatcher
from service.core.limits import Limits
from service.core.networks import (
    NETWORKS_PER_BLOCK,
    NetworkBlock,
    NetworkPlan,
    NetworkSource,
    block_noise,
)
from service.infra.cache import LocalBlockCache, RedisBlockStore
from service.infra.telemetry import Metrics

FloatArray = NDArray[np.float32]
T = TypeVar("T")
log = logging.getLogger("apd.service")

# Tails (the layers after the first) are kept beside the codes of seeded queries' networks
# (the in-process LRU) when a network's tail has at most this many weights: fcNN1's 1,010
# (4 KB) are; fcNN2's 164,410 (658 KB) are recomputed from the codes a chunk at a time. The
# pool keeps tails for as many of its networks as ``tail_cache_mb`` holds.
MAX_KEPT_TAIL_PARAMS: Final = 16_384
FORWARD_NAME: Final = "numpy-factored"


class NonFiniteAnswer(Exception):
    """The computed answer holds a NaN or an infinite number: it is never sent (500)."""


class DeadlineExceeded(Exception):
    """The query's deadline passed before its answer was computed (504, DEADLINE_EXCEEDED)."""


class UnknownScore(ValueError):
    """A score name the checkpoint has no calibrated threshold for (422, INVALID_ARGUMENT)."""


class _Interrupted(Exception):
    """Raised in a forward's thread when its query was cancelled."""


@dataclass(frozen=True)
class Query:
    """What a caller asks of a model: ``inputs (N, D)`` already validated against the model's
    input convention, in its raw units (:mod:`service.codecs.inputs`); K (None: the model's
    default), seed, the anomaly score to flag with (None: the model's default), the endpoint
    (for metrics) and a monotonic deadline (None: none)."""

    inputs: FloatArray
    num_samples: int | None = None
    seed: int | None = None
    score: ScoreName | None = None
    endpoint: str = "predict"
    deadline: float | None = None


@dataclass(frozen=True)
class Answer:
    """A model's answer to a :class:`Query`: the summary of K networks, the probabilities
    served (:meth:`apd.checkpoint.Checkpoint.probabilities`), and the flags of score
    ``score_name`` at ``threshold`` (:meth:`apd.checkpoint.AnomalyCalibration.flags`)."""

    summary: PredictiveSummary
    probabilities: NDArray[np.float64]
    num_samples: int
    seed: int | None
    score_name: ScoreName
    scores: NDArray[np.float64]
    flags: NDArray[np.bool_]
    threshold: float


@dataclass(frozen=True)
class ServingConfig:
    """What every model version of one worker is served with (from the settings)."""

    limits: Limits
    default_num_samples: int | None
    pool_size: int
    tail_cache_bytes: int
    forward_chunk_bytes: int
    batch_delay_s: float
    batch_max_rows: int
    request_timeout_s: float | None
    key_prefix: str
    ttl_s: int
    hmac_key: bytes
    expected_sha256: str | None = None


@dataclass
class Resources:
    """What the model versions of one worker share: config, metrics, the compute limiter
    (forwards in threads), the in-process LRU of networks and the Redis store."""

    config: ServingConfig
    metrics: Metrics
    limiter: anyio.CapacityLimiter
    local: LocalBlockCache[NetworkBlock]
    redis: RedisBlockStore | None


def check_servable(ckpt: Checkpoint, config: ServingConfig) -> None:
    """Raise :class:`CheckpointError` if this service cannot serve ``ckpt`` as configured."""
    where = f"checkpoint {ckpt.path}"
    if config.expected_sha256 is not None and ckpt.sha256 != config.expected_sha256:
        raise CheckpointError(
            f"{where}: sha256 {ckpt.sha256} is not the expected {config.expected_sha256}"
        )
    if ckpt.meta.input.input_dim != ckpt.spec.input_dim:
        raise CheckpointError(
            f"{where}: its input convention has {ckpt.meta.input.input_dim} values per example, "
            f"its network takes {ckpt.spec.input_dim}"
        )
    default = config.default_num_samples or ckpt.meta.num_samples_default
    if default > config.limits.max_num_samples:
        raise CheckpointError(
            f"{where}: its default num_samples {default} exceeds max_num_samples "
            f"{config.limits.max_num_samples}; set default_num_samples"
        )


def summarize_materialised(
    ckpt: Checkpoint, plan: NetworkPlan, x: FloatArray, interrupt: Callable[[], None]
) -> PredictiveSummary:
    """The reference path, for CNNs whose generator adds residual noise: each block's networks
    are drawn as weights (:meth:`Checkpoint.generate`) and run (:func:`forward_probs`), one
    block at a time."""
    acc = PredictiveAccumulator()
    left = plan.num_networks
    for b in plan.blocks:
        interrupt()
        z, eps = block_noise(plan.stream, b, ckpt.noise_dim, ckpt.num_params)
        theta = ckpt.generate(z, eps)[: min(left, NETWORKS_PER_BLOCK)]
        acc.add(forward_probs(ckpt.spec, theta, x))
        left -= len(theta)
    return acc.summary()


class ServedModel:
    """One version of one model, loaded, checked and ready: :meth:`predict` answers."""

    def __init__(self, name: str, version: int, ckpt: Checkpoint, resources: Resources) -> None:
        config = resources.config
        self.name = name
        self.version = version
        self.checkpoint = ckpt
        self.metrics = resources.metrics
        self.limits = config.limits
        self.limiter = resources.limiter
        self.request_timeout_s = config.request_timeout_s
        self.default_num_samples = config.default_num_samples or ckpt.meta.num_samples_default
        offset, directions = ckpt.affine
        residual = ckpt.residual_std
        # The factored forward; for a CNN with residual noise only its memory bound is used
        # (its networks are materialised: summarize_materialised).
        self.factored = residual is None or isinstance(ckpt.spec, MLPSpec)
        self.posterior = AffinePosterior(
            ckpt.spec,
            offset,
            directions,
            residual_std=residual if self.factored else None,
            chunk_bytes=config.forward_chunk_bytes,
        )
        tailed = 0
        keep_tails = False
        if self.factored:
            keep_tails = self.posterior.tail_params <= MAX_KEPT_TAIL_PARAMS
            per_block = NETWORKS_PER_BLOCK * self.posterior.tail_params * 4
            tailed = min(
                config.pool_size, config.tail_cache_bytes // per_block * NETWORKS_PER_BLOCK
            )
        self.source = NetworkSource(
            ckpt,
            self.posterior if self.factored else None,
            namespace=f"{name}/{version}",
            pool_size=config.pool_size,
            tailed_size=tailed,
            keep_tails=keep_tails,
            local=resources.local,
            redis=resources.redis,
            hmac_key=config.hmac_key,
            key_prefix=config.key_prefix,
            ttl_s=config.ttl_s,
            metrics=resources.metrics,
            limiter=resources.limiter,
        )
        self.batcher = (
            DynamicBatcher(
                self._forward_pool,
                resources.limiter,
                resources.metrics.batch_queries.labels(model=name, version=str(version)),
                max_rows=config.batch_max_rows,
                delay_s=config.batch_delay_s,
            )
            if config.batch_max_rows > 1
            else None
        )
        self._labels = {"model": name, "version": str(version)}

    @classmethod
    async def load(
        cls, name: str, version: int, ckpt: Checkpoint, resources: Resources
    ) -> ServedModel:
        """The version serving ``ckpt`` (already loaded and verified), its pool drawn."""
        check_servable(ckpt, resources.config)
        model = cls(name, version, ckpt, resources)
        t0 = time.perf_counter()
        await model.source.load()
        log.info(
            "model %s version %d: pool of %d networks (%.1f MB) ready in %.2f s (checkpoint "
            "%s, %s)",
            name,
            version,
            model.source.size,
            model.source.nbytes / 1e6,
            time.perf_counter() - t0,
            ckpt.sha256[:12],
            "factored forward" if model.factored else "materialised networks (CNN residual)",
        )
        resources.metrics.model_info.labels(
            model=name,
            version=str(version),
            model_id=ckpt.meta.model_id,
            checkpoint_version=ckpt.meta.version,
            sha256=ckpt.sha256,
            backend=FORWARD_NAME,
        ).set(1)
        return model

    def retire(self) -> None:
        """Out of the repository: its info metric goes; queries running on it finish (they
        hold their reference), and its memory goes with the last of them."""
        meta = self.checkpoint.meta
        try:
            self.metrics.model_info.remove(
                self.name, str(self.version), meta.model_id, meta.version,
                self.checkpoint.sha256, FORWARD_NAME,
            )  # fmt: skip
        except KeyError:
            pass

    async def close(self) -> None:
        """At shutdown: batches waiting to run are cancelled."""
        if self.batcher is not None:
            await self.batcher.close()

    @property
    def thresholds(self) -> dict[ScoreName, float]:
        return dict(self.checkpoint.meta.anomaly.thresholds)

    @property
    def default_score(self) -> ScoreName:
        return self.checkpoint.meta.anomaly.default_score

    def score_name(self, requested: ScoreName | None) -> ScoreName:
        """The score a query flags with: ``requested`` if calibrated, else
        :class:`UnknownScore`; None: the checkpoint's default."""
        if requested is None:
            return self.default_score
        if requested not in self.thresholds:
            valid = ", ".join(s.value for s in self.thresholds)
            raise UnknownScore(
                f"score {requested.value!r} has no calibrated threshold in this checkpoint; "
                f"choose one of: {valid}"
            )
        return requested

    def num_samples(self, requested: int | None) -> int:
        """K for a query that asked for ``requested`` (:class:`Limits.num_samples`)."""
        return self.limits.num_samples(requested, self.default_num_samples)

    async def predict(self, query: Query) -> Answer:
        """The answer to ``query`` (see the module docstring)."""
        self.limits.batch(len(query.inputs))
        k = self.num_samples(query.num_samples)
        name = self.score_name(query.score)
        x = self.checkpoint.meta.input.preprocess(query.inputs)
        deadlines = [query.deadline]
        if self.request_timeout_s is not None:  # the server's, and the client's if earlier
            deadlines.append(time.monotonic() + self.request_timeout_s)
        deadline = min((d for d in deadlines if d is not None), default=None)
        t0 = time.perf_counter()
        try:
            with anyio.fail_after(None if deadline is None else deadline - time.monotonic()):
                if query.seed is None and self.batcher is not None:
                    summary = await self.batcher(k, x)
                else:
                    summary = await self._forward(self.source.plan(k, query.seed), x)
        except TimeoutError:
            self.metrics.requests_cancelled.labels(reason="deadline").inc()
            raise DeadlineExceeded(
                f"the answer was not ready within the request's deadline (model {self.name} "
                f"version {self.version}, K = {k}, {len(x)} inputs); retry later or with a "
                "smaller K"
            ) from None
        labels = {**self._labels, "endpoint": query.endpoint}
        self.metrics.inference_duration.labels(**labels).observe(time.perf_counter() - t0)
        self.metrics.networks_sampled.labels(**self._labels).inc(k)
        if not all(a is None or np.isfinite(a).all() for a in vars(summary).values()):
            self.metrics.nonfinite_answers.labels(**labels).inc()
            raise NonFiniteAnswer(
                f"the model computed a non-finite answer for this request (model {self.name} "
                f"version {self.version}, checkpoint {self.checkpoint.sha256[:12]}): not sent; "
                "the served checkpoint is broken"
            )
        scores, flags, threshold = self.checkpoint.meta.anomaly.flags(summary, name)
        self.metrics.anomaly_flags.labels(**self._labels, score=name.value).inc(int(flags.sum()))
        return Answer(
            summary=summary,
            probabilities=self.checkpoint.probabilities(summary),
            num_samples=k,
            seed=query.seed,
            score_name=name,
            scores=scores,
            flags=flags,
            threshold=threshold,
        )

    async def _forward_pool(self, k: int, x: FloatArray) -> PredictiveSummary:
        """A batch's forward: the batch holds its compute slot already."""
        return await self._forward(self.source.plan(k, None), x, holding_slot=True)

    async def _forward(
        self, plan: NetworkPlan, x: FloatArray, holding_slot: bool = False
    ) -> PredictiveSummary:
        """The summary of the plan's networks on preprocessed ``x``, computed in a worker
        thread (the data-support score too) under a compute slot (unless the caller holds
        one), interrupted at a chunk if cancelled."""
        posterior = self.posterior if self.factored else None
        segments = None if posterior is None else await self.source.segments(plan)
        support = self.checkpoint.data_support
        ckpt = self.checkpoint

        def compute(interrupt: Callable[[], None]) -> PredictiveSummary:
            if posterior is None or segments is None:
                summary = summarize_materialised(ckpt, plan, x, interrupt)
            else:
                parts = [(s.codes, s.tails) for s in segments]
                summary = posterior.summarize_segments(parts, x, interrupt)
            if support is None:
                return summary
            return replace(summary, data_support=support.score(x))

        return await self._in_thread(compute, None if holding_slot else self.limiter)

    async def _in_thread(
        self, fn: Callable[[Callable[[], None]], T], limiter: anyio.CapacityLimiter | None
    ) -> T:
        """``fn(interrupt)`` in a worker thread; ``interrupt()`` raises once the caller is
        cancelled, by an anyio cancel scope or by a plain asyncio cancellation."""
        stop = threading.Event()

        def interrupt() -> None:
            if stop.is_set():
                raise _Interrupted
            anyio.from_thread.check_cancelled()

        try:
            return await anyio.to_thread.run_sync(fn, interrupt, limiter=limiter)
        except BaseException:
            stop.set()
            raise
