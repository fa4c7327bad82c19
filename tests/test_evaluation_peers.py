"""APD's wins, ties and losses against its peers, on hand-made numbers whose verdicts are
known by construction."""

from __future__ import annotations

from typing import Any

import pytest

from training.evaluation import peers
from training.evaluation.results import EvaluationResults


def _cls(method: str, accuracy: float, nll: float, ece: float) -> dict[str, Any]:
    return {"method": method, "accuracy": accuracy, "nll": nll, "ece": ece}


def _anomaly(method: str, entropy: list[float], mi: list[float | None]) -> list[dict[str, Any]]:
    rows = []
    for ood_set, h, m in zip(("a", "b"), entropy, mi, strict=True):
        for score, auroc in (("predictive_entropy", h), ("mutual_information", m)):
            rows.append(
                {"method": method, "ood_set": ood_set, "scale": 1.0, "score": score, "auroc": auroc}
            )
    return rows


def _cost(method: str, stored: int, draw: float, predict: float) -> dict[str, Any]:
    return {
        "method": method,
        "stored_bytes": stored,
        "draw_seconds": draw,
        "predict_seconds": predict,
    }


def _results() -> EvaluationResults:
    """APD against the mixture and MC-Dropout; SGD and the one Gaussian are there too."""
    methods = ("sgd", "gaussian", "dropout", "mixture", "apd")
    results: dict[str, Any] = {
        "meta": {},
        "methods": {m: {"label": m} for m in methods},
        "missing_methods": {},
        "classification": {
            "rows": [
                _cls("sgd", 0.99, 0.01, 0.001),
                _cls("gaussian", 0.5, 2.0, 0.3),
                # accuracy 0.0008 below APD's: a tie (0.001); NLL 0.02 above: APD wins
                _cls("dropout", 0.9792, 0.08, 0.010),
                # accuracy 0.002 above APD's: APD loses; NLL within 0.01: a tie
                _cls("mixture", 0.9820, 0.065, 0.020),
                _cls("apd", 0.9800, 0.060, 0.012),
            ]
        },
        "anomaly": {
            "ood_size": {"a": 10, "b": 10},
            "scales": [1.0],
            "rows": [
                *_anomaly("sgd", [0.9, 0.9], [None, None]),
                *_anomaly("gaussian", [0.5, 0.5], [0.5, 0.5]),
                *_anomaly("dropout", [0.96, 0.98], [0.90, 0.90]),  # means 0.97, 0.90
                *_anomaly("mixture", [0.97, 0.99], [0.99, 0.99]),  # 0.98, 0.99
                *_anomaly("apd", [0.975, 0.99], [0.95, 0.95]),  # 0.9825, 0.95
            ],
        },
        "cost": {
            "batch_size": 100,
            "rows": [
                _cost("sgd", 100, 0.0, 0.01),
                _cost("gaussian", 1000, 0.2, 0.08),
                _cost("dropout", 100, 0.0, 0.12),  # APD stores more; draw 0 vs 0.05: loses
                _cost("mixture", 10_000, 0.045, 0.09),  # stores less; draw within 25 %: tie
                _cost("apd", 800, 0.05, 0.08),
            ],
            "sgld_store_bytes": None,
        },
    }
    return results  # type: ignore[return-value]


def test_verdicts_against_each_peer() -> None:
    found = {v.peer: v for v in peers.verdicts(_results())}
    assert list(found) == ["dropout", "mixture"]  # in PEERS order; SGD, Gaussian not judged
    d = found["dropout"]
    assert d.wins == ("NLL", "OOD AUROC entropy x1", "OOD AUROC MI x1", "predict 100")
    assert d.ties == ("accuracy", "ECE")  # ECE 0.012 vs 0.010: within 0.005
    assert d.losses == ("stored bytes", "draw K")
    m = found["mixture"]
    assert m.wins == ("ECE", "stored bytes")
    assert m.ties == ("NLL", "OOD AUROC entropy x1", "draw K", "predict 100")
    assert m.losses == ("accuracy", "OOD AUROC MI x1")


def test_headline_means_over_sets_and_undefined_scores() -> None:
    crit, table = peers.headline(_results())
    assert [c.name for c in crit] == [
        "accuracy",
        "NLL",
        "ECE",
        "OOD AUROC entropy x1",
        "OOD AUROC MI x1",
        "stored bytes",
        "draw K",
        "predict 100",
    ]
    assert table["apd"]["OOD AUROC entropy x1"] == pytest.approx(0.9825)
    assert table["sgd"]["OOD AUROC MI x1"] is None  # one network has no mutual information
    assert peers.verdicts({**_results(), "methods": {"sgd": {"label": "SGD"}}}) == []  # type: ignore[typeddict-item]


@pytest.mark.parametrize(
    ("higher", "relative", "subject", "peer", "verdict"),
    [
        (True, False, 0.5, 0.496, "tie"),
        (True, False, 0.5, 0.494, "win"),
        (False, False, 0.5, 0.494, "loss"),
        (False, True, 100.0, 91.0, "tie"),  # within 10 % of the larger
        (False, True, 100.0, 89.0, "loss"),
        (False, True, 80.0, 100.0, "win"),
    ],
)
def test_criterion_verdict(
    higher: bool, relative: bool, subject: float, peer: float, verdict: str
) -> None:
    c = peers.Criterion("x", "e", higher, 0.10 if relative else 0.005, relative)
    assert c.verdict(subject, peer) == verdict
