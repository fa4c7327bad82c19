"""``GET /healthz`` (the process lives) and ``GET /readyz`` (it can serve)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.api.deps import MaybeRepositoryDep, SettingsDep
from service.codecs.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="200 while the process lives")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready yet"}},
    summary="200 while at least one model version is READY",
)
async def readyz(repository: MaybeRepositoryDep, settings: SettingsDep) -> Readiness | JSONResponse:
    cache = "redis" if settings.redis_url else "memory"
    if repository is None or not repository.ready:
        starting = Readiness(
            status="starting",
            cache=cache,
            redis="disabled" if not settings.redis_url else "degraded",
            degraded=False,
            pool_networks=0,
        )
        return JSONResponse(status_code=503, content=starting.model_dump(mode="json"))
    redis_store = repository.resources.redis
    redis = "disabled" if redis_store is None else "ok" if redis_store.available else "degraded"
    default = repository.default_model
    model = repository.resolve(default) if default in repository.models() else None
    return Readiness(
        status="ready",
        cache=cache,
        redis=redis,
        degraded=redis == "degraded",
        pool_networks=sum(m.source.size for m in repository.served()),
        checkpoint_sha256=None if model is None else model.checkpoint.sha256,
    )
