"""``apd distill`` end to end on a small synthetic sample store, and its one-line errors.

The store holds fcNN1 samples from three "chains" (a few SGD-free random networks around
three different centres), tagged with the real MNIST fingerprint; distillation runs a few
generator steps. What is checked is the plumbing: the checkpoint loads, carries thresholds
for every score calibrated on the validation split, provenance and metrics, the generator is
chain-conditional, and the fidelity history is written beside it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from apd.checkpoint import load_checkpoint
from apd.networks import get_spec
from apd.uncertainty import ScoreName
from training.cli import main

DATA_DIR = Path(os.environ.get("APD_DATA_DIR", "data"))
needs_mnist = pytest.mark.skipif(
    not (DATA_DIR / "mnist" / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="MNIST not available (set APD_DATA_DIR)",
)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.mnist import dataset_fingerprint, load_mnist
    from training.sample_store import SampleStore

    spec = get_spec("fcnn1")
    run = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    store = SampleStore.create(
        run / "samples",
        spec,
        capacity=60,
        meta={"sampler": {"kind": "synthetic"}, "data_sha256": dataset_fingerprint(load_mnist())},
    )
    centres = rng.normal(0, 0.05, (3, spec.num_params)).astype(np.float32)
    for step in range(20):
        theta = centres + rng.normal(0, 0.01, centres.shape).astype(np.float32)
        store.append(theta, np.arange(3), step)
    store.close()
    return run


@pytest.mark.slow
@needs_mnist
def test_distill_writes_a_complete_checkpoint(
    store_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.safetensors"
    args = ["distill", "--samples", str(store_dir), "--out", str(out), "--steps", "6"]
    args += ["--eval-every", "3", "--rank", "4", "--num-samples", "8", "--no-progress"]
    assert main(args) == 0
    ckpt = load_checkpoint(out)
    meta = ckpt.meta
    assert meta.model_id == "mnist-fcnn1"
    assert meta.target.num_params == get_spec("fcnn1").num_params
    assert meta.num_samples_default == 8
    assert meta.input.scale == 1.0
    assert meta.generator.design == "subspace"
    assert meta.generator.basis_dtype == "float16"
    # Three chains: two fixed front layers select the component in front of the 3x100 MLP.
    assert meta.generator.hidden_sizes[2:] == [100, 100, 100]
    assert set(meta.anomaly.thresholds) == set(ScoreName)
    assert meta.anomaly.default_score is ScoreName.COMBINED
    # the data-support score fitted on the training split, the combined rule, honest intervals
    assert meta.data_support is not None and ckpt.data_support is not None
    assert meta.anomaly.combined is not None
    assert sum(meta.anomaly.combined.rates.values()) >= 0.05
    for name, (lo, hi) in meta.anomaly.fpr_interval.items():
        assert lo <= meta.anomaly.flagged[name] / 10_000 <= hi
    assert meta.probes is not None  # load_checkpoint recomputed them
    assert meta.anomaly.calibration_size == 10_000
    assert meta.anomaly.target_fpr == 0.05
    prov = meta.provenance
    assert len(prov.data["data_sha256"]) == 64 and prov.data["dataset"] == "mnist"
    assert meta.input.class_names == [str(i) for i in range(10)]
    assert meta.input.data_sha256 == prov.data["data_sha256"]
    assert prov.sampler["kind"] == "synthetic"
    assert prov.distillation["steps"] == 6
    assert prov.code_revision
    assert 0.0 <= meta.metrics["validation"]["accuracy"] <= 1.0
    for rate in meta.metrics["validation"]["flag_rate"].values():
        assert rate <= 0.05
    history = json.loads((tmp_path / "m.fidelity.json").read_text())
    assert [h["step"] for h in history["history"]] == [3, 6]
    # The summary names each file with its folder.
    assert f"and {tmp_path / 'm.fidelity.json'}\n" in capsys.readouterr().out


ONLINE = ["--algorithm", "online", "--arch", "fcnn1", "--out", "x.safetensors"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--out", "x.safetensors"], "needs --samples"),
        (["--samples", "nowhere", "--out", "x.pt"], "must name a .safetensors"),
        (["--algorithm", "online", "--out", "x.safetensors"], "needs --arch"),
        (["--samples", "r", "--out", "x.safetensors", "--target-fpr", "1.5"], "--target-fpr"),
        (["--samples", "r", "--out", "x.safetensors", "--variance-held", "0.9"], "--rank auto"),
        (
            [
                "--algorithm",
                "online",
                "--arch",
                "fcnn1",
                "--out",
                "x.safetensors",
                "--rank",
                "auto",
            ],
            "for offline distillation",
        ),
        (
            [*ONLINE, "--preset", "auto", "--rank", "40"],
            "offline distillation only",
        ),
        (
            ["--samples", "r", "--out", "x.safetensors", "--rank", "auto", "--variance-held", "2"],
            "--variance-held must lie in (0, 1]",
        ),
    ],
)
def test_user_mistakes_are_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["distill", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert "\n" not in err and "Traceback" not in err


def test_missing_sample_store_is_a_user_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not (DATA_DIR / "mnist").is_dir():
        pytest.skip("MNIST not available")
    args = [
        "distill",
        "--samples",
        str(tmp_path / "none"),
        "--out",
        str(tmp_path / "m.safetensors"),
    ]
    assert main(args) == 2
    assert "--samples" in (err := capsys.readouterr().err) and "no such folder" in err


def test_default_preset_steps_follow_the_target_network() -> None:
    from training.distillation.offline import PRESETS, preset

    base = PRESETS["default"].config.steps
    assert preset("default", arch="fcnn1").steps == base == 10_000
    assert preset("default", arch="fcnn2").steps == 20_000
    # An explicit --steps wins, and other presets keep their own.
    assert preset("default", arch="fcnn2", steps=500).steps == 500
    assert preset("paper", arch="fcnn2").steps == PRESETS["paper"].config.steps
    assert preset("default").steps == base


def test_rank_auto_is_the_variance_rule_and_a_given_rank_is_the_rank() -> None:
    import argparse

    from training.distillation.distill import (
        AUTO_MAX_RANK,
        AUTO_VARIANCE_HELD,
        _config,
        configure,
    )

    parser = argparse.ArgumentParser()
    configure(parser)

    def config(*extra: str) -> tuple[int, float | None]:
        c = _config(
            parser.parse_args(["--samples", "r", "--out", "x.safetensors", *extra]), "fcnn1"
        )
        return c.rank, c.variance_target

    assert config("--rank", "auto") == (AUTO_MAX_RANK, AUTO_VARIANCE_HELD)
    assert config("--rank", "auto", "--variance-held", "0.95") == (AUTO_MAX_RANK, 0.95)
    assert config("--rank", "60") == (60, None)
    assert config() == (46, None)
    assert config("--preset", "auto") == (AUTO_MAX_RANK, AUTO_VARIANCE_HELD)
    assert config("--preset", "auto", "--rank", "46") == (46, None)
