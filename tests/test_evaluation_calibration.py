"""The evaluation's recalibration rows and the checkpoint's served scores, against independent
references on small generated data.

* ECE and NLL before and after the top-label recalibration
  (:func:`training.evaluation.anomaly.recalibration_record`) against scikit-learn:
  ``calibration_curve`` binned into the 15 equal-width bins with the bin sizes from
  ``np.histogram``, ``log_loss``, and the map rebuilt from ``IsotonicRegression`` and the
  rescaling written out from its definition.
* A checkpoint's method in the suite (:func:`training.evaluation.suite.classification_and_anomaly`):
  the classification row is the served probabilities, the data-support and combined rows'
  AUROC is scikit-learn's ``roc_auc_score`` of the scores recomputed from the checkpoint's
  arrays, the flag rates are the shares above the stored thresholds, and the report shows
  all of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from numpy.typing import NDArray
from sklearn.calibration import calibration_curve
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import log_loss, roc_auc_score

from apd.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from apd.networks import forward_probs
from apd.support import DataSupport
from apd.uncertainty import ScoreName, summarize
from tests.service_support import make_checkpoint, random_images
from tests.test_evaluation_report import SPEC, _results
from training.distillation.calibrate import calibrate_summary, fit_recalibration, support_record
from training.evaluation.anomaly import recalibration_record
from training.evaluation.methods import MemberNetworks
from training.evaluation.report import render_markdown, write_report
from training.evaluation.suite import SuiteResult, classification_and_anomaly
from training.metrics import DEFAULT_ECE_BINS

F64 = NDArray[np.float64]


def overconfident(n: int, seed: int, classes: int = 10) -> tuple[F64, NDArray[np.int64]]:
    """Rows of a predictive and labels drawn from flatter rows (temperature 2): the rows are
    overconfident, as an uncalibrated network's are."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, classes)) * 3.0
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    truth = np.sqrt(p)
    truth /= truth.sum(axis=1, keepdims=True)
    labels = (rng.random((n, 1)) > truth.cumsum(axis=1)).sum(axis=1)
    return p, np.minimum(labels, classes - 1)


def reference_ece(p: F64, y: NDArray[np.int64], n_bins: int = DEFAULT_ECE_BINS) -> float:
    """ECE from scikit-learn's reliability curve of the top label, weighted by bin sizes."""
    conf, correct = p.max(axis=1), (p.argmax(axis=1) == y).astype(float)
    frac_right, mean_conf = calibration_curve(correct, conf, n_bins=n_bins, strategy="uniform")
    # bin sizes with scikit-learn's bins, (a, b]: np.histogram's [-b, -a) of -conf, reversed
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    counts = np.histogram(-conf, bins=-edges[::-1])[0][::-1]
    counts = counts[counts > 0]
    return float((counts / len(y) * np.abs(frac_right - mean_conf)).sum())


def reference_recalibrated(val: F64, val_y: NDArray[np.int64], test: F64) -> F64:
    """The top-label map written out from its definition: isotonic regression of "the top
    label is right" on the confidence (capped at (n+1)/(n+2)), the top class set to g(c) (no
    lower than where the runner-up would tie it) and the others scaled by (1 - g) / (1 - c)."""
    n = len(val_y)
    iso = IsotonicRegression(y_min=0.0, y_max=(n + 1) / (n + 2), out_of_bounds="clip")
    iso.fit(val.max(axis=1), (val.argmax(axis=1) == val_y).astype(float))
    c = test.max(axis=1)
    top = test.argmax(axis=1)
    second = np.sort(test, axis=1)[:, -2]
    g = np.maximum(iso.predict(c), second / (second + 1 - c) + 1e-9)
    q = test * ((1 - g) / (1 - c))[:, None]
    q[np.arange(len(q)), top] = g
    return q


def test_ece_and_nll_before_and_after_match_scikit_learn() -> None:
    val, val_y = overconfident(3000, seed=0)
    test, test_y = overconfident(3000, seed=1)
    record = recalibration_record("m", test, test_y, 7, validation=(val, val_y))
    before, after = record["before"], record["after"]
    assert after is not None and record["map"] == "fitted" and record["fit_size"] == 3000
    classes = list(range(10))
    assert before["nll"] == pytest.approx(log_loss(test_y, test, labels=classes), rel=1e-9)
    assert before["ece"] == pytest.approx(reference_ece(test, test_y), abs=1e-12)
    q = reference_recalibrated(val, val_y, test)
    np.testing.assert_allclose(q.sum(axis=1), 1.0, atol=1e-12)
    assert after["nll"] == pytest.approx(log_loss(test_y, q, labels=classes), rel=1e-9)
    assert after["ece"] == pytest.approx(reference_ece(q, test_y), abs=1e-9)
    assert after["accuracy"] == before["accuracy"]  # the predicted label is kept
    # the map does what it is for, out of sample
    assert before["ece"] > 0.1 and after["ece"] < before["ece"] / 4
    assert after["nll"] < before["nll"]


def test_a_stored_map_is_applied_as_it_is_and_few_inputs_give_none() -> None:
    val, val_y = overconfident(800, seed=2)
    test, test_y = overconfident(500, seed=3)
    stored = fit_recalibration(val, val_y, 5, "elsewhere")
    assert stored is not None
    other_val = overconfident(900, seed=4)
    record = recalibration_record("apd", test, test_y, 5, stored, other_val)
    assert record["map"] == "checkpoint" and record["fitted_on"] == "elsewhere"
    assert record["fit_size"] == 800 and record["knots"] == len(stored.confidence)
    after = record["after"]
    assert after is not None
    assert after["nll"] == pytest.approx(log_loss(test_y, stored.apply(test), labels=range(10)))
    none = recalibration_record("m", test, test_y, 5, validation=(val[:100], val_y[:100]))
    assert none["map"] == "none" and none["after"] is None and none["fit_size"] == 100


def served_checkpoint(tmp_path: Path) -> Checkpoint:
    """A small random checkpoint as `apd distill` calibrates one: a data-support fit on
    "training" images, thresholds (with the combined rule) and a recalibration map on
    "validation" images."""
    path = make_checkpoint(tmp_path / "apd.safetensors", seed=3)
    ck = load_checkpoint(path)
    rng = np.random.default_rng(5)
    train = random_images(300, seed=6) * 0.5
    val = random_images(600, seed=7) * 0.5
    val_y = rng.integers(0, 10, len(val))
    support = DataSupport.fit(train, seed=0)
    anomaly, summary = calibrate_summary(
        ck.summarize(val, 20, 0), val, 20, 0.2, None, "unit-validation", support
    )
    recal = fit_recalibration(summary.probabilities, val_y, 20, "unit-validation", 100)
    meta = ck.meta.model_copy(
        update={
            "anomaly": anomaly,
            "data_support": support_record(support, "unit-train", len(train), 0.9),
            "recalibration": recal,
        }
    )
    save_checkpoint(path, meta, {**dict(ck.tensors), **support.tensors()})
    return load_checkpoint(path)


def test_a_checkpoint_reports_served_probabilities_data_support_and_combined_rows(
    tmp_path: Path,
) -> None:
    ck = served_checkpoint(tmp_path)
    rng = np.random.default_rng(8)
    theta = torch.from_numpy(np.ascontiguousarray(ck.generate(**ck.noise(12, 0))))
    apd = MemberNetworks(ck.spec, theta, checkpoint=ck)
    sgld = MemberNetworks(SPEC, torch.randn(6, SPEC.num_params, generator=torch.Generator()) * 0.1)
    test_x = random_images(200, seed=9) * 0.5
    test_y = rng.integers(0, 10, 200)
    ood = {"uniform": rng.random((150, 784), dtype=np.float32)}
    val = (random_images(600, seed=10) * 0.5, rng.integers(0, 10, 600))
    out = classification_and_anomaly(
        {"sgld": sgld, "apd": apd},
        test_x,
        test_y,
        ood,
        {"uniform": "noise"},
        (1.0, 5.0),
        validation=val,
        min_recalibration_inputs=100,
    )
    # the classification row is what the service serves
    served = ck.probabilities(summarize(forward_probs(ck.spec, theta.numpy(), test_x)))
    (row,) = [r for r in out["classification"]["rows"] if r["method"] == "apd"]
    assert row["nll"] == pytest.approx(log_loss(test_y, served, labels=range(10)), rel=1e-6)
    cal = {r["method"]: r for r in out["calibration"]["rows"]}
    assert cal["apd"]["map"] == "checkpoint" and cal["sgld"]["map"] == "fitted"
    after = cal["apd"]["after"]
    assert after is not None and after["nll"] == pytest.approx(row["nll"])
    # data support and the combined flag: for the checkpoint's method only
    rows = out["anomaly"]["rows"]
    assert {r["score"] for r in rows if r["method"] == "sgld"} == {
        "max_probability",
        "predictive_entropy",
        "mutual_information",
        "model_variance",
    }
    support = ck.data_support
    assert support is not None
    rule = ck.meta.anomaly.combined
    assert rule is not None
    t_mi = rule.thresholds[ScoreName.MUTUAL_INFORMATION]
    t_ds = rule.thresholds[ScoreName.DATA_SUPPORT]

    def scores(x: NDArray[np.float32]) -> dict[str, F64]:
        s = summarize(forward_probs(ck.spec, theta.numpy(), x))
        ds = support.score(x)
        return {
            "data_support": ds,
            "combined": np.maximum(s.mutual_information / t_mi, ds / t_ds),
            "mutual_information": s.mutual_information,
        }

    s_in = scores(test_x)
    for scale in (1.0, 5.0):
        s_out = scores(ood["uniform"] * np.float32(scale))
        for name in ("data_support", "combined"):
            (r,) = [
                r for r in rows if (r["method"], r["scale"], r["score"]) == ("apd", scale, name)
            ]
            labels = np.r_[np.zeros(len(test_x)), np.ones(len(s_out[name]))]
            expected = roc_auc_score(labels, np.r_[s_in[name], s_out[name]])
            assert r["auroc"] == pytest.approx(expected, abs=1e-12)
    flags = {(f["ood_set"], f["scale"], f["score"]): f for f in out["anomaly"]["flag_rates"]}
    assert {f["method"] for f in flags.values()} == {"apd"}
    thresholds = ck.meta.anomaly.thresholds
    for (ood_set, at, name), f in flags.items():
        x = test_x if ood_set is None or at is None else ood["uniform"] * np.float32(at)
        expected_rate = float((scores(x)[name] > thresholds[ScoreName(name)]).mean())
        assert f["flagged"] == pytest.approx(expected_rate)
    # uniform noise lies far from the "training" images: the data-support test sees it
    assert flags[("uniform", 1.0, "data_support")]["flagged"] == 1.0


def test_the_report_shows_recalibration_and_the_served_flags(tmp_path: Path) -> None:
    ck = served_checkpoint(tmp_path)
    results: Any = _results(tmp_path)
    theta = torch.from_numpy(np.ascontiguousarray(ck.generate(**ck.noise(8, 0))))
    members = {
        "sgld": MemberNetworks(SPEC, torch.randn(6, SPEC.num_params) * 0.1),
        "apd": MemberNetworks(ck.spec, theta, checkpoint=ck),
    }
    rng = np.random.default_rng(11)
    test_x, test_y = random_images(120, seed=12) * 0.5, rng.integers(0, 10, 120)
    ood = {"notmnist": rng.random((60, 784), dtype=np.float32)}
    for key in ("sgd",):
        del results["methods"][key]
    for key in ("fidelity", "fidelity_gaussian", "fidelity_mixture"):
        results.pop(key, None)
    results.update(
        classification_and_anomaly(
            members,
            test_x,
            test_y,
            ood,
            {"notmnist": "random"},
            (1.0,),
            validation=(random_images(300, seed=13) * 0.5, rng.integers(0, 10, 300)),
            min_recalibration_inputs=100,
        )
    )
    report = write_report(SuiteResult(results), tmp_path / "out").read_text()
    section = report.split("### Recalibration: ECE and NLL before and after")[1].split("## 2.")[0]
    for r in results["calibration"]["rows"]:
        label = results["methods"][r["method"]]["label"]
        assert f"| {label} | " in section
        assert f"{r['before']['ece']:.4f} | {r['after']['ece']:.4f}" in section
    assert "stored in the checkpoint (600 unit-validation inputs" in section
    assert "fitted here (300 mnist-validation inputs" in section
    assert "APD's row is the probabilities the service returns" in report
    flags = report.split("### The checkpoint's data-support score and combined flag")[1]
    flags = flags.split("\n### ")[0]
    assert "| in-distribution | - |" in flags and "| notmnist | 1 |" in flags
    assert "AUROC data support" in flags and "flagged by combined flag" in flags
    assert (tmp_path / "out" / "recalibration.png").stat().st_size > 0


def test_the_fidelity_section_says_whether_sglds_run_is_apds_teacher(tmp_path: Path) -> None:
    results: Any = _results(tmp_path)
    sampler = {"method": "sgld", "chains": 8, "seed": 0}
    results["methods"]["sgld"]["provenance"] = {
        "run": "runs/sgld",
        "sampler": sampler,
        "samples_created_at": "2026-01-02T00:00:00+00:00",
    }
    apd = results["methods"]["apd"]["provenance"]
    apd["teacher"] = {**sampler, "run": "elsewhere", "created_at": "2026-01-01T00:00:00+00:00"}
    section = render_markdown(results).split("### APD against its SGLD teacher")[1]
    assert "- Teacher: **not APD's own**" in section
    assert "another run with the same sampler settings" in section
    apd["teacher"] = {**sampler, "seed": 1, "created_at": "2026-01-01T00:00:00+00:00"}
    assert "another run with other sampler settings" in render_markdown(results)
    apd["teacher"]["created_at"] = "2026-01-02T00:00:00+00:00"
    assert "- Teacher: the SGLD run here is APD's own" in render_markdown(results)
    del apd["teacher"]  # a report written before: no line
    assert "- Teacher:" not in render_markdown(results)
