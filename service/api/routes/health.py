"""``GET /healthz`` (the process lives) and ``GET /readyz`` (it can serve)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.api.deps import MaybeRuntimeDep, SettingsDep
from service.codecs.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="200 while the process lives")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready yet"}},
    summary="200 once the checkpoint is loaded and the pool can be served",
)
async def readyz(runtime: MaybeRuntimeDep, settings: SettingsDep) -> Readiness | JSONResponse:
    if runtime is None or not runtime.pool.loaded:
        starting = Readiness(
            status="starting",
            cache="redis" if settings.redis_url else "memory",
            redis="disabled" if not settings.redis_url else "degraded",
            degraded=False,
            pool_networks=0,
        )
        return JSONResponse(status_code=503, content=starting.model_dump(mode="json"))
    redis = runtime.redis_state
    return Readiness(
        status="ready",
        cache=runtime.cache_kind,
        redis=redis,
        degraded=redis == "degraded",
        pool_networks=runtime.pool.size,
        checkpoint_sha256=runtime.checkpoint.sha256,
    )
