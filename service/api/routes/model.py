"""``GET /v1/model``, ``GET /v1/models/{name}``: a model's card; ``GET /v1/models``: the list."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import ModelDep, RepositoryDep, SettingsDep
from service.api.errors import ERROR_RESPONSES
from service.codecs.inputs import schema_of
from service.codecs.schemas import (
    AnomalyInfo,
    InputInfo,
    Limits,
    ModelInfo,
    ModelList,
    ModelVersions,
)
from service.config import Settings
from service.core.limits import NETWORKS_PER_BLOCK
from service.core.model import FORWARD_NAME, ServedModel

router = APIRouter(tags=["model"])


@router.get(
    "/v1/model",
    response_model=ModelInfo,
    responses={503: ERROR_RESPONSES[503]},
    summary="The default model's card: identity, architecture, input, classes, thresholds, "
    "provenance, limits",
)
async def model_info(model: ModelDep, settings: SettingsDep) -> ModelInfo:
    return model_card(model, settings)


@router.get(
    "/v1/models",
    response_model=ModelList,
    responses={503: ERROR_RESPONSES[503]},
    summary="Every model with a READY version, its versions and the default model",
)
async def model_list(repository: RepositoryDep) -> ModelList:
    models = [
        ModelVersions(
            name=name, versions=[str(v) for v in versions], default_version=str(versions[-1])
        )
        for name, versions in repository.models().items()
    ]
    return ModelList(models=models, default_model=repository.default_model)


@router.get(
    "/v1/models/{name}",
    response_model=ModelInfo,
    responses={404: ERROR_RESPONSES[404], 503: ERROR_RESPONSES[503]},
    summary="Model ``name``'s card (its highest READY version, or ``?version=``)",
)
async def named_model_info(
    name: str, repository: RepositoryDep, settings: SettingsDep, version: str | None = None
) -> ModelInfo:
    return model_card(repository.resolve(name, version), settings)


def model_card(model: ServedModel, settings: Settings) -> ModelInfo:
    schema = schema_of(model.checkpoint)
    ckpt = model.checkpoint
    meta = ckpt.meta
    anomaly = meta.anomaly
    convention = meta.input
    return ModelInfo(
        name=model.name,
        repository_version=str(model.version),
        id=meta.model_id,
        version=meta.version,
        sha256=ckpt.sha256,
        checkpoint_bytes=ckpt.size_bytes,
        target=meta.target.model_dump(mode="json"),
        parameter_count=meta.target.num_params,
        generator=meta.generator.model_dump(mode="json"),
        generator_parameter_count=sum(
            int(t.size) for n, t in ckpt.tensors.items() if n.startswith("generator.")
        ),
        input=InputInfo(
            shape=list(convention.shape),
            size=convention.input_dim,
            dtype=convention.dtype,
            value_range=convention.value_range,
            range_checked=schema.checks_range,
            scale=convention.scale,
            shift=convention.shift,
            image_mode=convention.image_mode,
            data_sha256=convention.data_sha256,
            description=convention.description,
        ),
        num_classes=ckpt.spec.num_classes,
        class_names=convention.class_names,
        default_num_samples=model.default_num_samples,
        anomaly=AnomalyInfo(
            default_score=anomaly.default_score,
            target_fpr=anomaly.target_fpr,
            thresholds=dict(anomaly.thresholds),
            calibration_set=anomaly.calibration_set,
            calibration_size=anomaly.calibration_size,
            calibration_num_samples=anomaly.num_samples,
            flagged_on_calibration=dict(anomaly.flagged),
            fpr_interval=dict(anomaly.fpr_interval),
            combined=None if anomaly.combined is None else anomaly.combined.model_dump(mode="json"),
            data_support=None
            if meta.data_support is None
            else meta.data_support.model_dump(mode="json"),
        ),
        provenance=meta.provenance.model_dump(mode="json"),
        metrics=dict(meta.metrics),
        backend=FORWARD_NAME,
        pool_size=model.source.size,
        limits=Limits(
            max_batch=settings.max_batch,
            max_num_samples=settings.max_num_samples,
            max_body_bytes=settings.max_body_bytes,
            networks_per_block=NETWORKS_PER_BLOCK,
        ),
    )
