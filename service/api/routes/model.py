"""``GET /v1/model``: the served checkpoint's metadata."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import InputSchemaDep, RuntimeDep
from service.api.errors import ERROR_RESPONSES
from service.codecs.schemas import AnomalyInfo, InputInfo, Limits, ModelInfo
from service.core.model import FORWARD_NAME
from service.core.networks import NETWORKS_PER_BLOCK

router = APIRouter(tags=["model"])


@router.get(
    "/v1/model",
    response_model=ModelInfo,
    responses={503: ERROR_RESPONSES[503]},
    summary="The loaded checkpoint: identity, architecture, input, classes, thresholds, "
    "provenance, limits",
)
async def model_info(runtime: RuntimeDep, schema: InputSchemaDep) -> ModelInfo:
    ckpt = runtime.checkpoint
    meta = ckpt.meta
    settings = runtime.settings
    anomaly = meta.anomaly
    convention = meta.input
    return ModelInfo(
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
        default_num_samples=runtime.default_num_samples,
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
        pool_size=runtime.pool.size,
        limits=Limits(
            max_batch=settings.max_batch,
            max_num_samples=settings.max_num_samples,
            max_body_bytes=settings.max_body_bytes,
            networks_per_block=NETWORKS_PER_BLOCK,
        ),
    )
