"""Active learning end to end on scikit-learn's 8 x 8 digits: the protocol's bookkeeping,
warm starts, and parallel curves that equal the serial ones exactly."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from apd.networks import build_spec
from training.evaluation.active_learning import (
    Acquisition,
    ActiveLearningSettings,
    Learner,
    fit_online_apd,
    fit_sgld,
    run_active_learning,
)

SPEC = build_spec("mlp:16", (64,), 10)
TINY = ActiveLearningSettings(
    seeds=(0,),
    rounds=3,
    acquire=5,
    candidates=40,
    test_every=2,
    num_samples=4,
    acquisitions=(Acquisition.BALD, Acquisition.RANDOM),
    chains=2,
    first_burn_in=30,
    burn_in=5,
    thinning=2,
    buffer_size=8,
    warmup_samples=4,
    gan_steps=6,
    apd_rank=3,
    selection_inputs=30,
)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int64)
    return x[:1200], y[:1200], x[1200:], y[1200:]


def test_curves_follow_the_protocol_and_parallel_equals_serial(
    digits: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> None:
    serial = run_active_learning(SPEC, *digits, TINY, progress=False)
    parallel = run_active_learning(SPEC, *digits, TINY, progress=False, workers=2)
    assert len(serial.curves) == 2 * 2  # learners x acquisitions, one seed
    for a, b in zip(serial.curves, parallel.curves, strict=True):
        assert (a.learner, a.acquisition, a.seed) == (b.learner, b.acquisition, b.seed)
        # tested at rounds 0, 2 and the last (3): 20, 30 and 35 labels
        assert a.labels == b.labels == [20, 30, 35]
        np.testing.assert_allclose(a.accuracy, b.accuracy, atol=1e-12)
        assert all(0.0 <= acc <= 1.0 for acc in a.accuracy)
    record = serial.to_dict()
    assert record["settings"]["pool_size"] is None and record["settings"]["warm_start"]
    assert {(s["learner"], s["acquisition"]) for s in record["summary"]} == {
        (learner.value, acq.value)
        for learner in (Learner.SGLD, Learner.APD)
        for acq in (Acquisition.BALD, Acquisition.RANDOM)
    }


def test_a_failed_curve_stops_the_parallel_run_and_its_workers(
    digits: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> None:
    """A curve that fails in a worker fails the run at once, and no worker outlives it
    (an earlier executor waited for the other running curves, and left them running)."""
    import multiprocessing

    before = set(multiprocessing.active_children())
    wrong = build_spec("mlp:16", (65,), 10)  # the digits have 64 inputs: every fit fails
    many = replace(TINY, seeds=(0, 1, 2, 3), rounds=30)
    with pytest.raises(RuntimeError, match=r"shape|65|64"):
        run_active_learning(wrong, *digits, many, progress=False, workers=2)
    assert set(multiprocessing.active_children()) <= before


def test_random_acquisition_draws_the_same_labels_for_both_learners(
    digits: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> None:
    """Random acquisition ignores the model, so SGLD and APD label the same images: their
    curves then differ only by the learner. (Same first round: same initial labels.)"""
    s = replace(TINY, acquisitions=(Acquisition.RANDOM,), test_every=1)
    result = run_active_learning(SPEC, *digits, s, progress=False)
    sgld, apd = result.curves
    assert sgld.labels == apd.labels == [20, 25, 30, 35]


def test_a_warm_start_continues_the_chains(
    digits: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> None:
    x, y = digits[0][:40], digits[1][:40]
    theta, chains = fit_sgld(SPEC, x, y, TINY, seed=0)
    assert theta.shape == (TINY.num_samples, SPEC.num_params)
    assert chains.shape == (TINY.chains, SPEC.num_params)
    # a warm round runs the shorter schedule from the given states: the chains move, but by
    # far less than the distance between two fresh initialisations
    _, moved = fit_sgld(SPEC, x, y, TINY, seed=1, init=chains)
    _, fresh = fit_sgld(SPEC, x, y, TINY, seed=1)
    assert 0 < float((moved - chains).norm()) < float((fresh - chains).norm())
    theta_apd, chains_apd = fit_online_apd(SPEC, x, y, TINY, 2, digits[0][40:70], init=chains)
    assert theta_apd.shape == theta.shape and chains_apd.shape == chains.shape
    with pytest.raises(ValueError, match="initial chain states"):
        fit_online_apd(SPEC, x, y, TINY, 2, digits[0][40:70], init=chains[:1])


def test_settings_refuse_impossible_protocols() -> None:
    with pytest.raises(ValueError, match="candidates must be at least acquire"):
        ActiveLearningSettings(candidates=5, acquire=10)
    with pytest.raises(ValueError, match="pool is too small"):
        ActiveLearningSettings(pool_size=100)
    with pytest.raises(ValueError, match="test_every must be positive"):
        ActiveLearningSettings(test_every=0)


def test_both_learners_fit_a_cnn(
    digits: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> None:
    """CNNs take the autograd path in SGLD and in online APD's chains."""
    cnn = build_spec("cnn:conv4x3,pool2,fc8", (1, 8, 8), 10)
    x, y = digits[0][:40], digits[1][:40]
    theta, chains = fit_sgld(cnn, x, y, TINY, seed=0)
    assert theta.shape == (TINY.num_samples, cnn.num_params)
    theta_apd, _ = fit_online_apd(cnn, x, y, TINY, 1, digits[0][40:70], init=chains)
    assert theta_apd.shape == theta.shape and bool(torch.isfinite(theta_apd).all())
