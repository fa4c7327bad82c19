"""``GET /metrics``: Prometheus exposition text (all workers' values in multi-process mode)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from service.api.deps import MetricsDep
from service.infra.telemetry import CONTENT_TYPE

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    summary="Prometheus metrics (apd_*)",
)
def metrics(m: MetricsDep) -> Response:
    return Response(content=m.render(), media_type=CONTENT_TYPE)
