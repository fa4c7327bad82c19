"""The API router: every route of the service."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.routes import health, inference, metrics, model, page, v2

api_router = APIRouter()
api_router.include_router(inference.router)
api_router.include_router(health.router)
api_router.include_router(model.router)
api_router.include_router(metrics.router)
api_router.include_router(v2.router)
api_router.include_router(page.router)
