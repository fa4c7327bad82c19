"""Dependencies of the routes, as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request

from service.codecs.inputs import InputSchema
from service.config import Settings
from service.core.model import ServiceRuntime
from service.infra.telemetry import Metrics

NOT_READY = "the service is starting: checkpoint not loaded yet"


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


def get_runtime_or_none(request: Request) -> ServiceRuntime | None:
    runtime: ServiceRuntime | None = getattr(request.app.state, "runtime", None)
    return runtime


def get_runtime(
    runtime: Annotated[ServiceRuntime | None, Depends(get_runtime_or_none)],
) -> ServiceRuntime:
    if runtime is None:
        raise HTTPException(status_code=503, detail=NOT_READY)
    return runtime


def get_input_schema(request: Request) -> InputSchema:
    """The served model's input schema (set with the runtime when the checkpoint loads)."""
    schema: InputSchema | None = getattr(request.app.state, "input_schema", None)
    if schema is None:
        raise HTTPException(status_code=503, detail=NOT_READY)
    return schema


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
RuntimeDep = Annotated[ServiceRuntime, Depends(get_runtime)]
InputSchemaDep = Annotated[InputSchema, Depends(get_input_schema)]
MaybeRuntimeDep = Annotated[ServiceRuntime | None, Depends(get_runtime_or_none)]
