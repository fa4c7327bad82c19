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
    # Built without re-validation (model_construct): every value comes from the summary's
    # arrays, already of the declared types; 3 x N validations were ~5% of a batch-64 request.
    labels = summary.labels.tolist()
    probabilities = summary.probabilities.tolist()
    columns = zip(
        summary.predictive_entropy.tolist(),
        summary.expected_entropy.tolist(),
        summary.mutual_information.tolist(),
        summary.model_variance.tolist(),
        np.asarray(scores, dtype=np.float64).tolist(),
        flags.tolist(),
        strict=True,
    )
    predictions = [
        Prediction.model_construct(
            label=labels[i],
            probabilities=probabilities[i],
            uncertainty=Uncertainty.model_construct(
                predictive_entropy=h, expected_entropy=e, mutual_information=mi, model_variance=v
            ),
            anomaly=AnomalyFlag.model_construct(
                score=score, is_anomaly=flag, threshold=threshold, score_name=name
            ),
        )
        for i, (h, e, mi, v, score, flag) in enumerate(columns)
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
