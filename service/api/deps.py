"""Dependencies of the routes, as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request

from service.config import Settings
from service.core.model import ServedModel
from service.core.repository import ModelRepository
from service.infra.telemetry import Metrics

NOT_READY = "the service is starting: no model loaded yet"


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


def get_repository_or_none(request: Request) -> ModelRepository | None:
    repository: ModelRepository | None = getattr(request.app.state, "repository", None)
    return repository


def get_repository(
    repository: Annotated[ModelRepository | None, Depends(get_repository_or_none)],
) -> ModelRepository:
    if repository is None:
        raise HTTPException(status_code=503, detail=NOT_READY)
    return repository


def get_model(request: Request) -> ServedModel:
    """The model version a request's body named (resolved when the body was read:
    :mod:`service.api.json_body`), else the default model's highest READY version."""
    model: ServedModel | None = getattr(request.state, "served_model", None)
    if model is not None:
        return model
    return get_repository(get_repository_or_none(request)).resolve()


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
RepositoryDep = Annotated[ModelRepository, Depends(get_repository)]
MaybeRepositoryDep = Annotated[ModelRepository | None, Depends(get_repository_or_none)]
ModelDep = Annotated[ServedModel, Depends(get_model)]
