"""The FastAPI application: ``create_app(settings)``; uvicorn runs ``create_app`` as a factory.

Startup work happens once, in the lifespan: load and check the checkpoint (unless the caller
passes one already loaded), build the factored forward, connect to Redis, and draw the
shared pool.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp

import apd
from apd.checkpoint import Checkpoint
from service.api.docs import add_offline_docs
from service.api.errors import http_error_handler, validation_error_handler
from service.api.middleware import (
    BodyLimitMiddleware,
    BodyTimeoutMiddleware,
    MetricsMiddleware,
    RequestIdMiddleware,
)
from service.api.router import api_router
from service.codecs.inputs import InputSchema
from service.codecs.schemas import SHIPPED_SHA256, request_examples
from service.config import Settings
from service.core.model import NonFiniteAnswer, ServiceRuntime, load_servable
from service.infra.admission import AdmissionMiddleware
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
    """FastAPI whose OpenAPI document is the served model's contract: its input shape, value
    range, classes and an example input (from the loaded checkpoint), and this server's own
    limits (``max_num_samples`` may be set below the API's 1000). Before the checkpoint is
    loaded the document describes inputs in general, and is not kept."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            doc = super().openapi()
            _state_limits(doc, self.state.settings)
            runtime: ServiceRuntime | None = self.state.runtime
            schema: InputSchema | None = self.state.input_schema
            if runtime is None or schema is None:
                self.openapi_schema = None
                return doc
            _state_model(doc, runtime.checkpoint, schema)
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


async def nonfinite_answer_handler(request: Request, exc: Exception) -> Response:
    """500 naming the problem (counted in ``apd_nonfinite_answers_total``): a NaN or an
    infinite number is never sent as an answer, and never as bare ``NaN`` in JSON."""
    key = "error" if request.url.path.startswith("/v2/") else "detail"
    log.error("%s", exc)
    return JSONResponse({key: str(exc)}, status_code=500)


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
        ckpt = checkpoint if checkpoint is not None else load_servable(settings)
        runtime = await ServiceRuntime.start(settings, ckpt, metrics)
        app.state.input_schema = InputSchema.of(ckpt.meta)
        app.state.runtime = runtime
        app.openapi_schema = None  # the document states the model loaded now
        try:
            yield
        finally:
            app.state.runtime = None
            app.state.input_schema = None
            await runtime.close()
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
    app.state.runtime = None
    app.state.input_schema = None
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
    app.add_exception_handler(NonFiniteAnswer, nonfinite_answer_handler)
    app.include_router(api_router)
    add_offline_docs(app)
    return app
