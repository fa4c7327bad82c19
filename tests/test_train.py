"""``apd train`` (training/train.py): run directories, reproducibility, one-line errors.

MNIST is replaced by a tiny synthetic 10-class problem (monkeypatched ``load_dataset``), so
these tests train real fcNN1 networks in seconds and can check that they learn. One slow test
runs a few SGLD steps of the active-learning CNN on the real MNIST.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file

from apd.checkpoint import InputConvention
from training import defaults, train
from training.cli import main
from training.errors import UserError
from training.mnist import DataError
from training.own_data import MNIST_CLASSES, Dataset, DataSpec
from training.sample_store import SampleStore

SGLD_FAST = ["--steps", "60", "--cycle-steps", "30", "--thinning", "5", "--chains", "2"]
DATA_FLAGS = (
    *("dataset", "label_column", "image_size", "channels", "val_fraction", "split_seed"),
    "preprocess",
)
POINT_FAST = ["--epochs", "2", "--batch-size", "20"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _split(n: int, g: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Class c lights up a 10-pixel block c of the image (plus noise), values in [0, 1]."""
    y = torch.randint(0, 10, (n,), generator=g)
    x = 0.2 * torch.rand(n, 784, generator=g)
    for c in range(10):
        x[y == c, 10 * c : 10 * c + 10] += 0.8
    return x.numpy(), y.numpy()


@pytest.fixture(autouse=True)
def synthetic_data(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if "real_mnist" in request.fixturenames:
        return

    def fake(spec: DataSpec, data_dir: str | None) -> Dataset:
        g = torch.Generator().manual_seed(123)
        (tx, ty), (vx, vy), (sx, sy) = _split(400, g), _split(200, g), _split(200, g)
        convention = InputConvention(class_names=MNIST_CLASSES, data_sha256="f" * 64)
        return Dataset(spec, tx, ty, vx, vy, sx, sy, convention, fingerprint="f" * 64)

    monkeypatch.setattr(train, "load_dataset", fake)


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["train", *argv, "--no-progress", "--threads", "1"])
    return code, capsys.readouterr().err


def test_sgld_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code, err = _run(["sgld", "--arch", "fcnn1", "--out", str(out), *SGLD_FAST], capsys)
    assert code == 0, err
    assert (out / "READY").is_file()
    cfg = json.loads((out / "config.json").read_text())
    # every flag resolved: unset ones carry the architecture's tuned default
    assert cfg["steps"] == 60 and cfg["chains"] == 2
    for key, value in asdict(defaults.DEFAULTS["sgld"]["fcnn1"]).items():
        if key not in ("steps", "cycle_steps", "thinning", "chains"):
            assert cfg[key] == value, key
    assert set(cfg) == {
        *("method", "arch", "out", "data_dir", "seed", "threads", "batch_size", "lr", "force"),
        *("no_progress", "chains", "steps", "burn_in", "thinning", "schedule", "gamma"),
        *("decay_steps", "cycle_steps", "explore_fraction", "temperature", "prior_std"),
        *("preconditioner", "eval_every", "device", "data_sha256", "apd_version"),
        *DATA_FLAGS,
        *("data", "data_split", "input", "network"),
    }
    assert cfg["data_sha256"] == "f" * 64 and cfg["seed"] == 0
    assert cfg["data"] == DataSpec().to_dict() and cfg["network"]["layer_sizes"] == [784, 100, 10]
    assert cfg["input"]["shape"] == [28, 28] and cfg["input"]["class_names"] == MNIST_CLASSES
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.9  # the synthetic classes are easy: it learned
    assert 0 < metrics["test_nll"] < 1.0
    assert {"val_accuracy", "val_nll", "train_wall_s", "device"} <= set(metrics)
    store = SampleStore.open(out / "samples")
    # 2 cycles of 30 steps, sampling stage = last half, every 5th step -> 3 per cycle
    assert len(store) == 2 * 2 * 3 and store.meta["num_chains"] == 2
    assert store.meta["sampler"]["schedule"]["kind"] == "cyclical"
    assert store.meta["data_sha256"] == "f" * 64
    assert store.meta["data"] == DataSpec().to_dict()  # apd distill reads the data back
    assert metrics["num_samples_evaluated"] == 12


def test_sgld_is_reproducible(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    thetas = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        argv = ["sgld", "--arch", "fcnn1", "--out", str(tmp_path / name), "--seed", seed]
        assert _run([*argv, *SGLD_FAST], capsys)[0] == 0
        thetas.append(np.array(SampleStore.open(tmp_path / name / "samples").theta))
    np.testing.assert_array_equal(thetas[0], thetas[1])
    assert not np.array_equal(thetas[0], thetas[2])


@pytest.mark.parametrize(("method", "p"), [("sgd", "0.0"), ("dropout", "0.5")])
def test_point_estimate_run_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], method: str, p: str
) -> None:
    out = tmp_path / method
    code, err = _run([method, "--arch", "fcnn1", "--out", str(out), *POINT_FAST], capsys)
    assert code == 0, err
    theta = load_file(str(out / "weights.safetensors"))["theta"]
    assert theta.shape == (1, 79510) and theta.dtype == np.float32
    with safe_open(str(out / "weights.safetensors"), "np") as f:
        meta = f.metadata()
    assert meta["arch"] == "fcnn1" and meta["dropout"] == p
    assert json.loads(meta["network"])["layer_sizes"] == [784, 100, 10]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.9 and (out / "READY").is_file()
    assert ("200 dropout passes" in metrics["predictive"]) == (method == "dropout")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["epochs"] == 2 and cfg["lr"] == 0.1 and cfg["weight_decay"] == 1e-4
    assert set(cfg) == {
        *("method", "arch", "out", "data_dir", "seed", "threads", "batch_size", "lr", "force"),
        *("no_progress", "epochs", "momentum", "weight_decay", "data_sha256", "apd_version"),
        *DATA_FLAGS,
        *("data", "data_split", "input", "network"),
    }


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sgld", "--arch", "fcnn9"], "unknown architecture 'fcnn9'"),
        (["sgld", "--arch", "fcnn1", "--lr", "-0.1"], "--lr (the step size) must be positive"),
        (["sgd", "--arch", "fcnn1", "--lr", "0"], "--lr (the step size) must be positive"),
        (["sgld", "--arch", "fcnn1", "--burn-in", "50", "--steps", "50"], "--burn-in"),
        (["sgld", "--arch", "fcnn1", "--schedule", "linear"], "--schedule must be one of"),
        (["sgld", "--arch", "fcnn1", "--preconditioner", "adam"], "--preconditioner must be"),
        (["sgld", "--arch", "fcnn1", "--temperature", "-1"], "--temperature"),
        (["sgld", "--arch", "fcnn1", "--chains", "0"], "--chains must be positive"),
        (["dropout", "--arch", "fcnn1", "--momentum", "1.5"], "--momentum"),
        (["sgld", "--arch", "fcnn1", "--device", "warp"], "--device 'warp' is not a torch device"),
    ],
)
def test_bad_flags_give_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, err = _run([*argv, "--out", str(tmp_path / "r")], capsys)
    assert code == 2
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # nothing written for a rejected command


def test_non_empty_out_needs_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["sgd", "--arch", "fcnn1", "--out", str(out), *POINT_FAST]
    code, err = _run(argv, capsys)
    assert code == 2 and "--force" in err and err.count("\n") == 1
    assert _run([*argv, "--force"], capsys)[0] == 0
    assert (out / "notes.txt").read_text() == "mine"  # --force only replaces run files


def test_data_error_gives_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def missing(spec: DataSpec, data_dir: str | None) -> Dataset:
        raise DataError("/nowhere/mnist/train-images-idx3-ubyte.gz is missing; put it there")

    monkeypatch.setattr(train, "load_dataset", missing)
    code, err = _run(["sgld", "--arch", "fcnn1", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and err.count("\n") == 1 and "train-images" in err


def test_divergence_gives_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["sgld", "--arch", "fcnn1", "--out", str(tmp_path / "r"), *SGLD_FAST]
    code, err = _run([*argv, "--lr", "1e9", "--schedule", "constant"], capsys)
    assert code == 2 and "lower the step size" in err and err.count("\n") == 1


def _args(argv: list[str]) -> Any:
    import argparse

    parser = argparse.ArgumentParser()
    train.configure(parser)
    return parser.parse_args(argv)


def test_generic_defaults_follow_the_steps_and_the_data() -> None:
    """Any network but the tuned fcnn1/fcnn2 gets its family's defaults, with the cyclical
    schedule's cycle and the thinning derived from --steps (4 cycles, about 100 samples per
    chain), and a default minibatch no larger than the training split."""
    args = _args(["sgld", "--arch", "mlp:50", "--out", "r", "--steps", "3000"])
    cfg = train.resolve_config(args, num_train=60)
    assert isinstance(cfg, train.SGLDRunConfig)
    assert (cfg.cycle_steps, cfg.thinning, cfg.chains, cfg.lr) == (750, 15, 4, 0.5)
    assert cfg.batch_size == 60
    kept = train.count_retained(3000, 0, 15, train.sgld_settings(cfg, 60).schedule)
    assert kept == defaults.SGLD_SAMPLES_PER_CHAIN
    cnn = train.resolve_config(_args(["sgld", "--arch", "al-cnn", "--out", "r"]))
    assert cnn.lr == defaults.GENERIC_DEFAULTS["cnn"].lr < defaults.GENERIC_DEFAULTS["mlp"].lr
    # the tuned architectures keep their own
    fcnn1 = train.resolve_config(_args(["sgld", "--arch", "fcnn1", "--out", "r"]), 50_000)
    assert fcnn1.cycle_steps == 10_000 and fcnn1.thinning == 100
    with pytest.raises(UserError, match="exceeds the 60 training examples"):
        train.resolve_config(
            _args(["sgd", "--arch", "fcnn1", "--out", "r", "--batch-size", "80"]), 60
        )


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        ("mlp:0", "mlp widths must be positive"),
        ("cnn:fc10", "a cnn starts with a conv layer"),
        ("cnn:conv8x3,dropout", "bad layer 'dropout'"),
        ("cnn:conv8x30", "does not fit 1x28x28 inputs"),
    ],
)
def test_bad_architectures_give_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], arch: str, message: str
) -> None:
    code, err = _run(["sgld", "--arch", arch, "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err
    assert not (tmp_path / "r").exists()


def test_a_small_cnn_trains_with_sgld_on_per_chain_batches(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A CNN goes through the same SGLD run as an MLP (autograd for its gradient)."""
    out = tmp_path / "cnn"
    argv = ["sgld", "--arch", "cnn:conv4x5,pool4,fc16", "--out", str(out), *SGLD_FAST]
    code, err = _run([*argv, "--lr", "0.5"], capsys)
    assert code == 0, err
    store = SampleStore.open(out / "samples")
    assert store.spec.name == "cnn:conv4x5,pool4,fc16"
    assert store.meta["layers"][0]["output_shape"] == [4, 24, 24]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.5  # the synthetic classes: it learned


@pytest.fixture
def real_mnist() -> None:
    """The real MNIST for this test (no synthetic stand-in), or a skip."""
    from training.mnist import MNIST_FILES, resolve_data_dir

    if not all((resolve_data_dir() / "mnist" / f).is_file() for f in MNIST_FILES):
        pytest.skip("MNIST not available (set APD_DATA_DIR)")


@pytest.mark.slow
@pytest.mark.usefixtures("real_mnist")
def test_al_cnn_runs_sgld_steps_on_mnist(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The paper's active-learning CNN, a few SGLD steps on the real MNIST (the full run is
    benchmarks/train_cnn.py)."""
    out = tmp_path / "al-cnn"
    argv = ["sgld", "--arch", "al-cnn", "--out", str(out), "--chains", "2", "--steps", "3"]
    code, err = _run([*argv, "--thinning", "3", "--schedule", "constant"], capsys)
    assert code == 0, err
    store = SampleStore.open(out / "samples")
    assert len(store) == 2 and store.spec.num_params == 600_810
    assert store.meta["data"]["source"] == "mnist"
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and np.isfinite(metrics["test_nll"])
