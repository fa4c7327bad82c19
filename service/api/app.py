"""The FastAPI application: ``create_app(settings)``; uvicorn runs ``create_app`` as a factory.

Startup work happens once, in the lifespan: connect to Redis, and load the model repository
(one checkpoint, or a folder of models and versions: :mod:`service.core.repository`), which
then watches the folder. The routes are codecs over :meth:`service.core.model.ServedModel.predict`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import anyio
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp

import apd
from apd.checkpoint import Checkpoint, load_checkpoint
from service.api.docs import add_offline_docs
from service.api.errors import (
    CORE_ERRORS,
    core_error_handler,
    http_error_handler,
    validation_error_handler,
)
from service.api.middleware import (
    AdmissionMiddleware,
    BodyLimitMiddleware,
    BodyTimeoutMiddleware,
    MetricsMiddleware,
    RequestIdMiddleware,
)
from service.api.router import api_router
from service.codecs.inputs import InputSchema, schema_of
from service.codecs.schemas import SHIPPED_SHA256, request_examples
from service.config import Settings
from service.core.limits import LimitExceeded
from service.core.model import Resources, ServingConfig, check_servable
from service.core.repository import ModelNotFound, ModelRepository, ModelUnavailable
from service.infra.admission import MemoryBudget
from service.infra.cache import LocalBlockCache, RedisBlockStore
from service.infra.telemetry import Metrics, mark_worker_exited

log = logging.getLogger("apd.service")

DESCRIPTION = """\
Serves an APD checkpoint: posterior networks drawn from the distilled generator give the
posterior predictive of each input, its uncertainty (predictive entropy, expected
entropy, mutual information, model variance) and an anomaly flag at a threshold calibrated
when the checkpoint was made. `seed` makes an answer reproducible on any worker or replica.
Client mistakes get 4xx (422 malformed, 413 over a limit) with a message naming the field.
"""


class APDService(FastAPI):
    """FastAPI whose OpenAPI document is the default model's contract: its input shape, value
    range, classes and an example input (from its checkpoint), and this server's own limits
    (``max_num_samples`` may be set below the API's 1000). Before a model is loaded the
    document describes inputs in general, and is not kept."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            doc = super().openapi()
            _state_limits(doc, self.state.settings)
            repository: ModelRepository | None = self.state.repository
            if repository is None or not repository.ready or repository.default_model is None:
                self.openapi_schema = None
                return doc
            try:
                model = repository.resolve()
            except (ModelNotFound, ModelUnavailable):
                self.openapi_schema = None
                return doc
            _state_model(doc, model.checkpoint, schema_of(model.checkpoint))
        assert self.openapi_schema is not None
        return self.openapi_schema

    def build_middleware_stack(self) -> ASGIApp:
        # Outside Starlette's ServerErrorMiddleware, so that its 500s carry X-Request-ID.
        return RequestIdMiddleware(super().build_middleware_stack())


_REQUESTS: Final = ("PredictRequest", "AnomalyScoreRequest")


def _state_limits(doc: dict[str, Any], settings: Settings) -> None:
    schemas = doc["components"]["schemas"]
    for name in (*_REQUESTS, "ImageForm"):
        props = schemas[name]["properties"]
        for branch in props["num_samples"].get("anyOf", [props["num_samples"]]):
            if branch.get("type") == "integer":
                branch["maximum"] = settings.max_num_samples
        batch = props["inputs" if name in _REQUESTS else "files"]
        batch["maxItems"] = settings.max_batch  # more: 413, as API.md says
        batch["description"] += (
            f" This server: at most {settings.max_batch}, and request bodies of at"
            f" most {settings.max_body_bytes} bytes."
        )


def _state_model(doc: dict[str, Any], ckpt: Checkpoint, schema: InputSchema) -> None:
    """The served model in the document: its inputs (shape, range, an example) and classes.
    The answer examples are the shipped checkpoint's real answers: shown when it is served."""
    schemas = doc["components"]["schemas"]
    for name, examples in request_examples(schema.example).items():
        inputs = schemas[name]["properties"]["inputs"]
        inputs["items"] = schema.example_json_schema()
        inputs["description"] = f"{schema.describe()} {inputs['description']}"
        schemas[name]["examples"] = examples
    if ckpt.sha256 != SHIPPED_SHA256:
        for name in ("PredictResponse", "AnomalyScoreResponse"):
            schemas[name].pop("examples", None)
    classes = ckpt.spec.num_classes
    names = ckpt.meta.input.class_names
    prediction = schemas["Prediction"]["properties"]
    prediction["label"]["maximum"] = classes - 1
    prediction["probabilities"] |= {"minItems": classes, "maxItems": classes}
    label_name = prediction["label_name"]  # absent, never null, when there are no names
    label_name.pop("anyOf", None)
    label_name |= {"type": "string", "enum": names} if names else {"type": "string"}
    meta = ckpt.meta
    listed = ", ".join(names) if names else f"labels 0 to {classes - 1}"
    doc["info"]["description"] += (
        f"\nThis server serves **{meta.model_id}** (version {meta.version}). Inputs: "
        f"{schema.describe()} Classes ({classes}): {listed}. The example input is "
        f"{schema.example_source}.\n"
    )


def serving_config(settings: Settings) -> ServingConfig:
    """What every model version of a worker is served with."""
    return ServingConfig(
        limits=settings.limits,
        default_num_samples=settings.default_num_samples,
        pool_size=settings.pool_size,
        tail_cache_bytes=settings.tail_cache_bytes,
        forward_chunk_bytes=settings.forward_chunk_bytes,
        batch_delay_s=settings.batch_delay_ms / 1000,
        batch_max_rows=min(settings.batch_max_rows, settings.max_batch),
        request_timeout_s=settings.request_timeout_s,
        key_prefix=settings.redis_key_prefix,
        ttl_s=settings.cache_ttl_s,
        # Without Redis nothing leaves the process, and a random key signs nothing shared.
        hmac_key=settings.hmac_key or os.urandom(32),
        expected_sha256=settings.expected_sha256,
    )


def load_servable(settings: Settings) -> Checkpoint:
    """Load, validate and check the configured single checkpoint (:class:`CheckpointError`
    if not), before a worker starts: ``apd serve`` fails fast on it."""
    ckpt = load_checkpoint(settings.checkpoint)
    check_servable(ckpt, serving_config(settings))
    return ckpt


async def _open_redis(settings: Settings, metrics: Metrics) -> RedisBlockStore | None:
    if settings.redis_url is None:
        metrics.cache_degraded.set(0)
        return None
    redis = RedisBlockStore(
        settings.redis_url,
        metrics=metrics,
        socket_timeout_s=settings.redis_socket_timeout_s,
        health_interval_s=settings.redis_probe_s,
        retry_min_s=settings.redis_probe_s / 4,
        retry_max_s=settings.redis_probe_s * 5,
        password=settings.redis_secret,
    )
    await redis.start()
    return redis


def create_app(
    settings: Settings | None = None, checkpoint: Checkpoint | None = None
) -> APDService:
    """The service for ``settings`` (default: from ``APD_*`` variables).

    ``checkpoint``, if given, must be the one ``settings.checkpoint`` names, already loaded
    (``apd serve`` loads it before starting a single worker, to fail fast).
    """
    settings = settings if settings is not None else Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = await _open_redis(settings, metrics)
        resources = Resources(
            config=serving_config(settings),
            metrics=metrics,
            limiter=anyio.CapacityLimiter(settings.compute_concurrency),
            local=LocalBlockCache(settings.local_cache_bytes),
            redis=redis,
        )
        single = settings.model_repository is None
        repository = ModelRepository(
            resources,
            root=settings.model_repository,
            checkpoint=settings.checkpoint if single else None,
            preloaded=checkpoint if single else None,
            default_model=settings.default_model,
            poll_s=settings.repository_poll_s,
        )
        grpc_server = None
        try:
            await repository.start()
            app.state.budget = MemoryBudget(
                settings.memory_budget_bytes,
                settings.admission_wait_s,
                metrics,
                max_queue=settings.admission_queue,
                max_queue_per_client=settings.admission_queue_per_client,
            )
            app.state.repository = repository
            app.openapi_schema = None  # the document states the model loaded now
            if settings.grpc_port is not None:
                from service.grpc.server import start_grpc_server

                grpc_server = await start_grpc_server(
                    settings, repository, app.state.budget, metrics
                )
            yield
        finally:
            if grpc_server is not None:  # RPCs in flight get the grace HTTP requests get
                await grpc_server.stop(settings.shutdown_grace_s)
            app.state.repository = None
            await repository.close()
            if redis is not None:
                await redis.close()
            mark_worker_exited(os.getpid())

    app = APDService(
        title="APD inference service",
        summary="Calibrated uncertainty from a distilled Bayesian posterior",
        description=DESCRIPTION,
        version=apd.__version__,
        lifespan=lifespan,
        docs_url=None,  # add_offline_docs: /docs and /redoc without a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.repository = None
    # Outermost last: metrics see every answer, including the limits' 413 and 408; admission
    # reads bodies through the size limit and the deadline.
    app.add_middleware(AdmissionMiddleware)
    app.add_middleware(
        BodyTimeoutMiddleware,
        timeout_s=settings.body_timeout_s,
        min_rate=settings.min_body_rate_bytes_s,
        grace_s=settings.body_grace_s,
    )
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        max_header_bytes=settings.max_header_bytes,
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(HTTPException, http_error_handler)
    errors: list[type[Exception]] = [LimitExceeded, *CORE_ERRORS]
    for error in errors:
        app.add_exception_handler(error, core_error_handler)
    app.include_router(api_router)
    add_offline_docs(app)
    return app
