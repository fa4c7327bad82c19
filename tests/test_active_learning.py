"""Active learning end to end on scikit-learn's 8 x 8 digits: the protocol's bookkeeping,
warm starts, and parallel curves that equal the serial ones exactly."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import TypeAdapter
from sklearn.datasets import load_digits

from apd.networks import build_spec
from apd.uncertainty import ScoreName
from training import sgld
from training.errors import UserError
from training.evaluation.acquisition import Acquisition, BatchRule, select
from training.evaluation.active_learning import (
    ActiveLearningSettings,
    Learner,
    dropout_spec,
    fit_dropout,
    fit_online_apd,
    fit_sgld,
    glorot_theta,
    run_active_learning,
)
from training.evaluation.methods import MemberNetworks
from training.evaluation.report.sections import _al_runs
from training.evaluation.results import ActiveLearningSection
from training.revision import code_revision
from training.threads import cpu_model

SPEC = build_spec("mlp:16", (64,), 10)
IMAGE = (8, 8)  # the digits' shape, for the MC-Dropout learner's CNN
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
    apd_networks=6,  # online APD draws its own K, not SGLD's num_samples
    selection_inputs=30,
    dropout_arch="cnn:conv4x3,pool2,fc8",
    dropout_rates=(0.25, 0.5),
    dropout_epochs=5,
    dropout_passes=6,
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
    serial = run_active_learning(SPEC, *digits, TINY, progress=False, image_shape=IMAGE)
    parallel = run_active_learning(
        SPEC, *digits, TINY, progress=False, workers=2, image_shape=IMAGE
    )
    assert len(serial["curves"]) == 3 * 2  # learners x acquisitions, one seed
    for a, b in zip(serial["curves"], parallel["curves"], strict=True):
        assert (a["learner"], a["acquisition"], a["seed"]) == (
            b["learner"],
            b["acquisition"],
            b["seed"],
        )
        # tested at rounds 0, 2 and the last (3): 20, 30 and 35 labels
        assert a["labels"] == b["labels"] == [20, 30, 35]
        np.testing.assert_allclose(a["accuracy"], b["accuracy"], atol=1e-12)
        assert all(0.0 <= acc <= 1.0 for acc in a["accuracy"])
    record = serial
    assert record["settings"]["pool_size"] is None and record["settings"]["warm_start"]
    assert {(s["learner"], s["acquisition"]) for s in record["summary"]} == {
        (learner.value, acq.value)
        for learner in (Learner.SGLD, Learner.APD, Learner.DROPOUT)
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
        run_active_learning(wrong, *digits, many, progress=False, workers=2, image_shape=IMAGE)
    assert set(multiprocessing.active_children()) <= before


def test_an_interrupted_run_resumes_from_its_curve_log(
    digits: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """A run that logs its curves and is then asked for more reruns none of the logged ones:
    the resumed run equals an uninterrupted one, its wall time adds up both runs and it
    names them. Curves logged under settings that shape their learner otherwise are not
    reused (other learners' settings do not count, nor the batch rule for random curves); a
    corrupt log is refused, not overwritten."""
    s = replace(TINY, learners=(Learner.SGLD, Learner.DROPOUT))
    log = tmp_path / "curves.jsonl"
    whole = run_active_learning(SPEC, *digits, s, progress=False, image_shape=IMAGE)
    first = run_active_learning(
        SPEC, *digits, replace(s, learners=(Learner.DROPOUT,)), False, image_shape=IMAGE, log=log
    )
    assert len(log.read_text().splitlines()) == 2
    line = json.loads(log.read_text().splitlines()[0])
    assert line["cpu"] == cpu_model() and line["code_revision"] == code_revision()
    resumed = run_active_learning(SPEC, *digits, s, False, image_shape=IMAGE, log=log)
    assert [_key(c) for c in resumed["curves"]] == [_key(c) for c in whole["curves"]]
    for a, b in zip(resumed["curves"], whole["curves"], strict=True):
        np.testing.assert_allclose(a["accuracy"], b["accuracy"], atol=1e-12)
    assert len(log.read_text().splitlines()) == 4  # only the two SGLD curves ran
    assert resumed["seconds"] >= first["seconds"]
    assert [r["curves"] for r in resumed["runs"]] == [2, 2]
    checked = TypeAdapter(ActiveLearningSection).validate_json(json.dumps(resumed), strict=True)
    text = "\n".join(_al_runs(checked))
    assert "from 2 runs of the same command" in text and text.count(cpu_model()) == 2
    # a setting that shapes no learner of the run (online APD's rank) reuses every curve
    apd_only = replace(s, apd_rank=3)
    again = run_active_learning(SPEC, *digits, apd_only, False, image_shape=IMAGE, log=log)
    assert len(log.read_text().splitlines()) == 4
    assert again["curves"] == resumed["curves"]
    # a line logged before a setting existed: reused when the setting does not shape its
    # learner (online APD's K and these SGLD and MC-Dropout curves)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    for line in lines:
        del line["settings"]["apd_networks"]
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    older = run_active_learning(SPEC, *digits, s, False, image_shape=IMAGE, log=log)
    assert len(log.read_text().splitlines()) == 4 and older["curves"] == resumed["curves"]
    # other settings: nothing reused, every curve runs (and is logged) again
    other = replace(s, learners=(Learner.DROPOUT,), dropout_epochs=4)
    run_active_learning(SPEC, *digits, other, False, image_shape=IMAGE, log=log)
    assert len(log.read_text().splitlines()) == 6
    # how scored acquisitions pick their batch does not shape a random curve
    joint = run_active_learning(
        SPEC, *digits, replace(s, batch_rule=BatchRule.JOINT), False, image_shape=IMAGE, log=log
    )
    reran = [json.loads(line) for line in log.read_text().splitlines()[6:]]
    assert [(e["curve"]["acquisition"], e["settings"]["batch_rule"]) for e in reran] == [
        ("bald", "joint"),
        ("bald", "joint"),
    ]
    for a, b in zip(joint["curves"], resumed["curves"], strict=True):
        assert a == b or a["acquisition"] == Acquisition.BALD
    log.write_text(log.read_text() + "{not json\n")
    with pytest.raises(UserError, match=r"curves.jsonl:9: not a curve-log line"):
        run_active_learning(SPEC, *digits, s, False, image_shape=IMAGE, log=log)


def _key(curve: dict[str, object]) -> tuple[object, ...]:
    return curve["learner"], curve["acquisition"], curve["seed"]


def test_random_acquisition_draws_the_same_labels_for_both_learners(
    digits: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> None:
    """Random acquisition ignores the model, so every learner labels the same images: their
    curves then differ only by the learner. (Same first round: same initial labels.)"""
    s = replace(TINY, acquisitions=(Acquisition.RANDOM,), test_every=1)
    result = run_active_learning(SPEC, *digits, s, progress=False, image_shape=IMAGE)
    sgld, apd, dropout = result["curves"]
    assert sgld["labels"] == apd["labels"] == dropout["labels"] == [20, 25, 30, 35]


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
    assert theta_apd.shape == (TINY.apd_networks, SPEC.num_params)
    assert chains_apd.shape == chains.shape
    with pytest.raises(ValueError, match="initial chain states"):
        fit_online_apd(SPEC, x, y, TINY, 2, digits[0][40:70], init=chains[:1])


def test_settings_refuse_impossible_protocols() -> None:
    with pytest.raises(ValueError, match="candidates must be at least acquire"):
        ActiveLearningSettings(candidates=5, acquire=10)
    with pytest.raises(ValueError, match="pool is too small"):
        ActiveLearningSettings(pool_size=100)
    with pytest.raises(ValueError, match="test_every must be positive"):
        ActiveLearningSettings(test_every=0)
    with pytest.raises(ValueError, match="power_exponent must be positive"):
        ActiveLearningSettings(power_exponent=0.0)
    with pytest.raises(ValueError, match="online APD runs plain SGLD"):
        ActiveLearningSettings(preconditioner=sgld.Preconditioner.RMSPROP)
    psgld = ActiveLearningSettings(
        preconditioner=sgld.Preconditioner.RMSPROP, learners=(Learner.SGLD,)
    )
    assert psgld.to_dict()["preconditioner"] == "rmsprop"


def test_both_learners_fit_a_cnn(
    digits: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> None:
    """CNNs take the autograd path in SGLD and in online APD's chains."""
    cnn = build_spec("cnn:conv4x3,pool2,fc8", (1, 8, 8), 10)
    x, y = digits[0][:40], digits[1][:40]
    theta, chains = fit_sgld(cnn, x, y, TINY, seed=0)
    assert theta.shape == (TINY.num_samples, cnn.num_params)
    theta_apd, _ = fit_online_apd(cnn, x, y, TINY, 1, digits[0][40:70], init=chains)
    assert theta_apd.shape == (TINY.apd_networks, cnn.num_params)
    assert bool(torch.isfinite(theta_apd).all())


# The MC-Dropout learner: Gal et al. (2017)'s recipe, scaled to the 8 x 8 digits (a small CNN
# with their dropout on both dense layers' inputs, trained long enough to fit 8 x 8 images).
GAL = replace(
    TINY,
    dropout_arch="cnn:conv8x3,pool2,fc32",
    dropout_rates=(0.25, 0.5),
    dropout_epochs=300,
    dropout_lr=3e-3,
    dropout_passes=40,
)


@pytest.fixture(scope="module")
def dropout_members(
    digits: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> MemberNetworks:
    spec = dropout_spec(SPEC, GAL, IMAGE)
    theta = fit_dropout(spec, digits[0][:60], digits[1][:60], GAL, seed=0)
    return MemberNetworks(spec, theta, GAL.dropout_rates, GAL.dropout_passes)


def test_the_dropout_learner_predicts_and_its_passes_differ(
    digits: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    dropout_members: MemberNetworks,
) -> None:
    """60 labels teach the CNN the digits far above chance (10 %), and its K members are
    K different dropout passes (fresh masks each call), not one network K times."""
    probs = dropout_members.probs(digits[2], seed=1)
    assert probs.shape == (GAL.dropout_passes, len(digits[2]), 10)
    assert float((probs.mean(0).argmax(-1) == digits[3]).mean()) > 0.6
    spread = probs.std(axis=0).max(axis=-1)  # per input, across passes
    assert float(np.mean(spread > 1e-3)) > 0.9
    assert not np.allclose(probs, dropout_members.probs(digits[2], seed=2))


def test_bald_on_the_dropout_learner_picks_higher_information_points(
    digits: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    dropout_members: MemberNetworks,
) -> None:
    """The points BALD picks with one set of masks carry more mutual information than random
    picks under an independent set: the ranking is the network's, not the masks' noise."""
    candidates = np.arange(200, 700)
    pool = digits[0][candidates]
    rng = np.random.default_rng(0)
    bald = select(dropout_members.probs(pool, seed=1), Acquisition.BALD, candidates, 20, rng)
    rand = select(None, Acquisition.RANDOM, candidates, 20, rng)
    mi = dropout_members.summary(pool, seed=2).score(ScoreName.MUTUAL_INFORMATION)
    assert mi[bald - 200].mean() > 1.15 * mi[rand - 200].mean()


def test_the_dropout_weight_decay_shrinks_the_first_dense_layer_only(
    digits: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> None:
    """``c / N ||W||^2`` on the first dense layer's weights (Keras's ``l2(c / N)`` in Gal et
    al.'s code): a large c drives those weights towards 0; the conv, not penalised, keeps
    the scale of its initialisation (it moves less, as the signal through the dense layer
    fades, but is not driven to 0)."""
    spec = dropout_spec(SPEC, GAL, IMAGE)
    x, y = digits[0][:40], digits[1][:40]
    loose = fit_dropout(spec, x, y, replace(GAL, dropout_weight_decay=0.0), seed=0)
    tight = fit_dropout(spec, x, y, replace(GAL, dropout_weight_decay=1e4), seed=0)
    (conv_w, _), (dense_w, _), _ = spec.offsets()
    assert float(tight[0, dense_w].abs().mean()) < 0.2 * float(loose[0, dense_w].abs().mean())
    init = float(glorot_theta(spec, torch.Generator().manual_seed(0))[0, conv_w].abs().mean())
    assert float(tight[0, conv_w].abs().mean()) > 0.5 * init


def test_dropout_settings_that_do_not_fit_the_network_are_refused() -> None:
    with pytest.raises(ValueError, match="takes 2 dropout rates"):
        dropout_spec(SPEC, replace(GAL, dropout_rates=(0.5,)), IMAGE)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\)"):
        dropout_spec(SPEC, replace(GAL, dropout_rates=(0.25, 1.0)), IMAGE)
    with pytest.raises(ValueError, match="dropout_passes must be positive"):
        ActiveLearningSettings(dropout_passes=0)


def test_the_dropout_learner_is_recorded_and_described_in_the_report(
    digits: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> None:
    """The section the suite writes passes results.json's strict check after a JSON round
    trip, and the report's protocol paragraph describes the MC-Dropout learner's recipe."""
    import json

    from pydantic import TypeAdapter

    from training.evaluation.report.sections import _al_fits, _al_protocol
    from training.evaluation.results import ActiveLearningSection

    s = replace(TINY, rounds=1, acquisitions=(Acquisition.RANDOM,))
    section = run_active_learning(SPEC, *digits, s, progress=False, image_shape=IMAGE)
    loaded = TypeAdapter(ActiveLearningSection).validate_json(json.dumps(section), strict=True)
    assert loaded["settings"]["dropout_rates"] == [0.25, 0.5]
    assert [c["learner"] for c in loaded["curves"]] == ["sgld", "apd", "dropout"]
    text = _al_fits(loaded["settings"])
    assert "MC-Dropout (Gal, Islam & Ghahramani 2017's protocol)" in text
    assert "conv4x3, pool2, fc8" in text and "dropout 0.25, 0.5" in text
    assert "K = 6 dropout passes" in text and "L2 3.5 / N" in text
    assert loaded["settings"]["batch_rule"] == "power"
    assert loaded["settings"].get("power_exponent") == 4.0
    text = _al_protocol(loaded)
    assert "in proportion to the score to the power 4, power acquisition" in text
    top = {**loaded, "settings": {**loaded["settings"], "batch_rule": "top"}}
    assert "BALD and entropy take the top 5" in _al_protocol(top)  # type: ignore[arg-type]
    power = {**loaded, "settings": {**loaded["settings"], "power_exponent": 1.0}}
    assert "in proportion to the score, power" in _al_protocol(power)  # type: ignore[arg-type]
    joint = {**loaded, "settings": {**loaded["settings"], "batch_rule": "joint"}}
    assert "score the round's 5 as a batch" in _al_protocol(joint)  # type: ignore[arg-type]
