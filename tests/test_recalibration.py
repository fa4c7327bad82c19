"""apd/recalibration.py and the checkpoint's recalibration map: the fitted map against
scikit-learn's isotonic regression, its guards (monotone, argmax kept, rows summing to 1,
capped below 1), malformed maps refused on load, and the service returning the map of the
reference predictive while every score stays the networks' own."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from safetensors.numpy import load_file, save_file
from sklearn.isotonic import IsotonicRegression

from apd.checkpoint import (
    DIGEST_KEY,
    META_KEY,
    CheckpointError,
    Recalibration,
    content_digest,
    load_checkpoint,
    save_checkpoint,
)
from apd.networks import forward_probs
from apd.recalibration import confidence_cap, recalibrate_top_label, top_label_map
from apd.uncertainty import summarize
from service.api.app import create_app
from service.config import Settings
from tests.service_support import make_checkpoint, make_client, random_images
from training.distillation.calibrate import fit_recalibration
from training.metrics import expected_calibration_error, negative_log_likelihood


def overconfident(n: int, classes: int = 10, seed: int = 0) -> tuple[NDArray[Any], NDArray[Any]]:
    """Predictive rows and labels drawn from the rows at temperature 2 (flatter than the rows
    say): an overconfident predictive."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(classes, 0.1), size=n)
    truth = np.sqrt(p)
    truth /= truth.sum(axis=1, keepdims=True)
    labels = (rng.random((n, 1)) > truth.cumsum(axis=1)).sum(axis=1)
    return p, np.minimum(labels, classes - 1)


def test_the_fitted_map_is_scikit_learns_isotonic_regression() -> None:
    p, y = overconfident(2000)
    fit = fit_recalibration(p, y, num_samples=100, fitted_on="random")
    assert fit is not None
    conf, correct = p.max(axis=1), (p.argmax(axis=1) == y).astype(float)
    cap = confidence_cap(len(y))
    iso = IsotonicRegression(y_min=0.0, y_max=cap, out_of_bounds="clip").fit(conf, correct)
    # new confidences, inside and outside the fitted range
    c = np.concatenate([np.random.default_rng(1).random(5000), [0.0, 1e-9, 1.0]])
    got = top_label_map(c, fit.confidence, fit.calibrated)
    np.testing.assert_allclose(got, iso.predict(c), rtol=0, atol=1e-12)
    assert got.max() <= cap < 1.0


def test_recalibration_corrects_an_overconfident_predictive_out_of_sample() -> None:
    p, y = overconfident(5000, seed=2)
    fit = fit_recalibration(p, y, num_samples=100, fitted_on="random")
    assert fit is not None
    test_p, test_y = overconfident(5000, seed=3)
    q = fit.apply(test_p)
    before = expected_calibration_error(test_p, test_y)
    assert before > 0.15
    assert expected_calibration_error(q, test_y) < before / 5
    assert negative_log_likelihood(q, test_y) < negative_log_likelihood(test_p, test_y)
    assert fit.validation["ece_after"] < fit.validation["ece_before"]


def test_few_inputs_give_no_map() -> None:
    p, y = overconfident(499)
    assert fit_recalibration(p, y, num_samples=10) is None
    assert fit_recalibration(p, y, num_samples=10, min_inputs=100) is not None


def test_the_top_probability_is_monotone_in_the_confidence() -> None:
    knots_x, knots_y = [0.2, 0.5, 0.7, 0.9, 0.99], [0.25, 0.4, 0.8, 0.85, 0.999]
    # Two-class rows: the runner-up is 1 - c, so the guard never lifts a row of c > 1/2.
    c = np.sort(np.random.default_rng(4).uniform(0.5, 1.0, 3000))
    q = recalibrate_top_label(np.stack([c, 1 - c], axis=1), knots_x, knots_y)
    assert (np.diff(q[:, 0]) >= 0).all()
    np.testing.assert_allclose(q[:, 0], np.maximum(np.interp(c, knots_x, knots_y), 0.5 + 1e-9))


@pytest.mark.parametrize(
    ("knots_x", "knots_y"),
    [
        ([0.0, 1.0], [0.1, 0.1]),  # lowers every confidence below every runner-up
        ([0.0, 0.5, 1.0], [0.0, 0.9, 0.9999]),  # raises most
        ([0.3], [0.5]),  # one knot: a constant
    ],
)
def test_rows_keep_their_argmax_and_sum_to_one(knots_x: list[float], knots_y: list[float]) -> None:
    rng = np.random.default_rng(5)
    p = rng.dirichlet(np.full(10, 0.5), size=4000)
    p[:50, 3] = p[:50, 7] = 0.45  # exact ties: argmax keeps the first
    p[:50] /= p[:50].sum(axis=1, keepdims=True)
    p[50:60] = np.eye(10)[rng.integers(0, 10, 10)]  # no mass outside the top class
    q = recalibrate_top_label(p, knots_x, knots_y)
    np.testing.assert_array_equal(q.argmax(axis=1), p.argmax(axis=1))
    np.testing.assert_allclose(q.sum(axis=1), 1.0, atol=1e-12)
    assert (q >= 0).all() and (q <= 1).all()
    # the other classes keep their proportions
    top = p.argmax(axis=1)
    for i in range(100, 200):
        others = np.arange(10) != top[i]
        np.testing.assert_allclose(
            q[i, others] / q[i, others].sum(), p[i, others] / p[i, others].sum(), rtol=1e-9
        )


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"calibrated": [0.9, 0.5]}, "must not decrease"),
        ({"confidence": [0.5, 0.5]}, "increase strictly"),
        ({"confidence": [0.5, 1.5]}, "increase strictly"),
        ({"calibrated": [0.5]}, "2 confidence knots but 1"),
        ({"calibrated": [0.5, 0.9999]}, "cap"),
        ({"cap": 1.0}, "cap"),
        ({"method": "temperature"}, "method"),
    ],
)
def test_a_malformed_map_is_refused_on_load(
    tmp_path: Path, edit: dict[str, object], message: str
) -> None:
    path = make_checkpoint(tmp_path / "m.safetensors")
    good = {
        "method": "isotonic-top-label",
        "confidence": [0.3, 0.9],
        "calibrated": [0.4, 0.95],
        "cap": 0.99,
        "fitted_on": "test",
        "fit_size": 98,
        "num_samples": 20,
    }
    tensors = load_file(str(path))
    meta = json.loads(load_checkpoint(path).meta.model_dump_json())
    for recalibration, ok in ((good, True), (good | edit, False)):
        meta_json = json.dumps(meta | {"recalibration": recalibration})
        header = {META_KEY: meta_json, DIGEST_KEY: content_digest(meta_json, tensors)}
        save_file(tensors, str(path), metadata=header)
        if ok:
            assert load_checkpoint(path).meta.recalibration == Recalibration(**good)
            continue
        with pytest.raises(CheckpointError, match="recalibration") as e:
            load_checkpoint(path)
        assert message in str(e.value) and "\n" not in str(e.value)


def test_a_non_finite_knot_is_refused() -> None:
    with pytest.raises(ValueError, match="finite"):
        Recalibration(
            confidence=[0.3, float("nan")],
            calibrated=[0.4, 0.5],
            cap=0.99,
            fitted_on="test",
            fit_size=98,
            num_samples=20,
        )


def test_the_service_returns_the_map_of_the_reference_predictive(tmp_path: Path) -> None:
    """/predict and V2 answer with the checkpoint's map of the predictive the networks give;
    labels, uncertainty and anomaly scores are those of the same checkpoint without a map."""
    plain = make_checkpoint(tmp_path / "plain.safetensors")
    ckpt = load_checkpoint(plain)
    x = random_images(600, seed=7)
    reference = summarize(forward_probs(ckpt.spec, ckpt.generate(**ckpt.noise(20, 0)), x))
    labels = np.where(np.arange(600) % 3 == 0, 0, reference.labels)  # two thirds right
    fit = fit_recalibration(reference.probabilities, labels, 20, "random images")
    assert fit is not None
    mapped = tmp_path / "mapped.safetensors"
    save_checkpoint(
        mapped, ckpt.meta.model_copy(update={"recalibration": fit}), load_file(str(plain))
    )

    answers = {}
    for path in (plain, mapped):
        settings = Settings(checkpoint=path, redis_url=None, pool_size=50, num_threads=1)
        with make_client(create_app(settings)) as client:
            body = {"inputs": x[:8].tolist(), "num_samples": 20, "seed": 3}
            r = client.post("/predict", json=body)
            assert r.status_code == 200, r.text
            v2 = client.post(
                f"/v2/models/{ckpt.meta.model_id}/infer",
                json={
                    "inputs": [
                        {
                            "name": "input",
                            "shape": [8, 784],
                            "datatype": "FP32",
                            "data": body["inputs"],
                        }
                    ],
                    "parameters": {"num_samples": 20, "seed": 3},
                    "outputs": [{"name": "probabilities"}],
                },
            )
            assert v2.status_code == 200, v2.text
            answers[path] = (r.json()["predictions"], v2.json()["outputs"][0]["data"])

    (raw, _), (served, served_v2) = answers[plain], answers[mapped]
    raw_p = np.array([p["probabilities"] for p in raw])
    got = np.array([p["probabilities"] for p in served])
    want = load_checkpoint(mapped).meta.recalibration.apply(raw_p)  # type: ignore[union-attr]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    assert np.abs(got - raw_p).max() > 1e-3  # the map really changed them
    np.testing.assert_allclose(np.reshape(served_v2, got.shape), got, rtol=1e-6, atol=1e-7)
    for a, b in zip(raw, served, strict=True):
        assert a["label"] == b["label"]
        assert a["uncertainty"] == b["uncertainty"] and a["anomaly"] == b["anomaly"]


def test_apd_calibrate_adds_the_map_fitted_on_the_validation_split(tmp_path: Path) -> None:
    """`apd calibrate` on a checkpoint of its own npz data: the written checkpoint's map is
    the fit of its networks' (num_samples, seed 0) validation predictive, and serves."""
    from training.cli import main
    from training.own_data import DataSpec, load_dataset

    rng = np.random.default_rng(8)
    x = random_images(1300, seed=8)
    y = rng.integers(0, 10, 1300)
    data_path = tmp_path / "digits.npz"
    np.savez(
        data_path,
        x_train=x[:600],
        y_train=y[:600],
        x_val=x[600:1200],
        y_val=y[600:1200],
        x_test=x[1200:],
        y_test=y[1200:],
    )
    data = load_dataset(DataSpec(source=str(data_path)), None)
    src = make_checkpoint(tmp_path / "in.safetensors")
    ckpt = load_checkpoint(src)
    provenance = ckpt.meta.provenance.model_copy(update={"data": data.provenance()})
    save_checkpoint(
        src, ckpt.meta.model_copy(update={"provenance": provenance}), load_file(str(src))
    )
    out = tmp_path / "out.safetensors"
    assert main(["calibrate", "--checkpoint", str(src), "--out", str(out)]) == 0
    got = load_checkpoint(out)
    rec = got.meta.recalibration
    assert rec is not None and rec.fit_size == 600 and rec.cap == confidence_cap(600)
    k = got.meta.anomaly.num_samples
    p = got.summarize(data.val_x, k, 0).probabilities
    want = fit_recalibration(p, data.val_y, k, rec.fitted_on)
    assert want is not None
    assert (rec.confidence, rec.calibrated) == (want.confidence, want.calibrated)
    assert rec.validation == pytest.approx(want.validation)
    assert got.meta.metrics["calibration"]["recalibration"] == pytest.approx(want.validation)
