"""``POST /predict`` and ``POST /anomaly-score``."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, HTTPException

from apd.uncertainty import PredictiveSummary, ScoreName
from service.api.deps import RuntimeDep
from service.api.errors import ERROR_RESPONSES, validation_error
from service.api.json_body import ImageBatchRoute
from service.runtime import ServiceRuntime
from service.schemas import (
    AnomalyFlag,
    AnomalyScoreRequest,
    AnomalyScoreResponse,
    ModelRef,
    Prediction,
    PredictRequest,
    PredictResponse,
    Uncertainty,
)

router = APIRouter(tags=["inference"], route_class=ImageBatchRoute)


def _model_ref(runtime: ServiceRuntime) -> ModelRef:
    meta = runtime.checkpoint.meta
    return ModelRef(
        id=meta.model_id, version=meta.version, checkpoint_sha256=runtime.checkpoint.sha256
    )


def _num_samples(runtime: ServiceRuntime, requested: int | None) -> int:
    if requested is None:
        return runtime.default_num_samples
    limit = runtime.settings.max_num_samples
    if requested > limit:
        raise validation_error(
            "num_samples",
            f"Input should be less than or equal to {limit} (this server's max_num_samples)",
            "less_than_equal",
            requested,
        )
    return requested


def _check_batch(runtime: ServiceRuntime, n: int) -> None:
    limit = runtime.settings.max_batch
    if n > limit:
        raise HTTPException(
            status_code=413,
            detail=f"inputs holds {n} images; the limit is max_batch={limit} per request",
        )


def _score_name(runtime: ServiceRuntime, requested: ScoreName | None) -> ScoreName:
    if requested is None:
        return runtime.default_score
    if requested not in runtime.thresholds:
        valid = ", ".join(s.value for s in runtime.thresholds)
        raise validation_error(
            "score",
            f"score {requested.value!r} has no calibrated threshold in this checkpoint; "
            f"choose one of: {valid}",
            "enum",
            requested.value,
        )
    return requested


async def _summarize(
    runtime: ServiceRuntime, body: PredictRequest | AnomalyScoreRequest, endpoint: str
) -> tuple[PredictiveSummary, int]:
    _check_batch(runtime, len(body.inputs))
    k = _num_samples(runtime, body.num_samples)
    summary = await runtime.infer(body.pixels, k, body.seed, endpoint)
    return summary, k


@router.post(
    "/predict",
    response_model=PredictResponse,
    responses=ERROR_RESPONSES,
    summary="Posterior predictive, uncertainty and anomaly flag for each input",
)
async def predict(body: PredictRequest, runtime: RuntimeDep) -> PredictResponse:
    summary, k = await _summarize(runtime, body, "/predict")
    name = runtime.default_score
    threshold = runtime.thresholds[name]
    scores = summary.score(name)
    flags = scores > threshold
    runtime.metrics.anomaly_flags.labels(score=name.value).inc(int(flags.sum()))
    labels = summary.labels
    predictions = [
        Prediction(
            label=int(labels[i]),
            probabilities=summary.probabilities[i].tolist(),
            uncertainty=Uncertainty(
                predictive_entropy=float(summary.predictive_entropy[i]),
                expected_entropy=float(summary.expected_entropy[i]),
                mutual_information=float(summary.mutual_information[i]),
                model_variance=float(summary.model_variance[i]),
            ),
            anomaly=AnomalyFlag(
                score=float(scores[i]),
                is_anomaly=bool(flags[i]),
                threshold=threshold,
                score_name=name,
            ),
        )
        for i in range(len(labels))
    ]
    return PredictResponse(
        model=_model_ref(runtime), num_samples=k, seed=body.seed, predictions=predictions
    )


@router.post(
    "/anomaly-score",
    response_model=AnomalyScoreResponse,
    responses=ERROR_RESPONSES,
    summary="Anomaly scores and flags at the checkpoint's calibrated threshold",
)
async def anomaly_score(body: AnomalyScoreRequest, runtime: RuntimeDep) -> AnomalyScoreResponse:
    name = _score_name(runtime, body.score)
    summary, k = await _summarize(runtime, body, "/anomaly-score")
    threshold = runtime.thresholds[name]
    scores = np.asarray(summary.score(name), dtype=np.float64)
    flags = scores > threshold
    runtime.metrics.anomaly_flags.labels(score=name.value).inc(int(flags.sum()))
    return AnomalyScoreResponse(
        score_name=name,
        threshold=threshold,
        target_fpr=runtime.checkpoint.meta.anomaly.target_fpr,
        scores=scores.tolist(),
        is_anomaly=flags.tolist(),
        num_samples=k,
        seed=body.seed,
        model=_model_ref(runtime),
    )
