"""The CLI refuses before it harms: each refusal is one line that names the flag or file and
the fix, with a non-zero exit, and nothing is written.

``apd distill`` refuses an existing ``--out`` (without ``--force``), an SGD run, a file given as
a run folder; it reads back what the run recorded about its data (a moved CSV needs only its new
place, not ``--label-column`` again). Usage errors are one line pointing at ``--help``; a busy
port for ``apd serve`` is one line.
"""

from __future__ import annotations

import argparse
import csv
import json
import socket
from pathlib import Path

import numpy as np
import pytest

import apd_cli
from apd.networks import build_spec
from training.cli import main as training_main

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "mnist-fcnn1" / "model.safetensors"


def one_line(err: str) -> str:
    """stderr, checked to be one line with no traceback."""
    text = err.strip()
    assert text and "\n" not in text and "Traceback" not in text, err
    return text


def test_distill_refuses_an_existing_out_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"a checkpoint worth keeping")
    assert training_main(["distill", "--samples", str(tmp_path), "--out", str(out)]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"--out {out} exists" in err and "--force" in err
    assert out.read_bytes() == b"a checkpoint worth keeping"
    # With --force the refusal is gone: what fails next is the (empty) sample folder.
    assert training_main(["distill", "--samples", str(tmp_path), "--out", str(out), "--force"])
    err = one_line(capsys.readouterr().err)
    assert "exists" not in err and "--samples" in err


def test_distill_refuses_a_file_as_the_run_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    samples = tmp_path / "samples.csv"
    samples.write_text("a,b\n1,2\n")
    out = tmp_path / "m.safetensors"
    assert training_main(["distill", "--samples", str(samples), "--out", str(out)]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"--samples {samples} is a file, not a run folder" in err
    assert "apd train sgld" in err and not out.exists()


@pytest.mark.parametrize("method", ["sgd", "dropout"])
def test_distill_refuses_a_run_that_is_not_sgld(
    method: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / f"{method}-run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"method": method, "arch": "fcnn1"}))
    (run / "weights.safetensors").write_bytes(b"")
    (run / "READY").touch()
    out = tmp_path / "m.safetensors"
    assert training_main(["distill", "--samples", str(run), "--out", str(out)]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"is an {method.upper()} run, not an SGLD run" in err and "apd train sgld" in err
    assert "meta.json" not in err and not out.exists()


def test_distill_names_a_folder_that_is_no_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.safetensors"
    assert training_main(["distill", "--samples", str(tmp_path), "--out", str(out)]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"--samples {tmp_path} is not an SGLD run folder" in err


@pytest.mark.parametrize(
    ("argv", "prog", "problem"),
    [
        (["train", "sgld", "--out", "runs/x"], "apd train sgld", "required: --arch"),
        (
            ["train", "sgld", "--arch", "fcnn1", "--out", "r", "--stpes", "3"],
            "apd train sgld",
            "unrecognized arguments: --stpes 3",
        ),
        (["train", "sgx"], "apd train", "invalid choice: 'sgx'"),
        (["distill", "--samples", "r"], "apd distill", "required: --out"),
        (
            ["distill", "--out", "m.safetensors", "--steps", "many"],
            "apd distill",
            "--steps: invalid int value",
        ),
        (["export"], "apd export", "required"),
    ],
)
def test_usage_errors_are_one_line_pointing_at_help(
    argv: list[str], prog: str, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        apd_cli.main(argv)
    assert exc.value.code == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"{prog}: error: ") and problem in err, err
    assert err.endswith(f"(see: {prog} --help)") and "usage:" not in err


def test_unknown_command_and_no_command_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert apd_cli.main(["trian"]) == 2
    err = one_line(capsys.readouterr().err)
    assert "unknown command 'trian'" in err and "train" in err and "apd --help" in err
    assert apd_cli.main([]) == 2
    assert "apd --help" in one_line(capsys.readouterr().err)


def test_distill_reads_the_recorded_csv_from_its_new_place(tmp_path: Path) -> None:
    """A run on a CSV records its label column and path; after the file moves, ``--dataset``
    with the new place is all distill needs (no ``--label-column`` again)."""
    from training.distillation.distill import recorded_data
    from training.own_data import DataSpec, load_dataset
    from training.sample_store import SampleStore

    rng = np.random.default_rng(0)
    table = tmp_path / "wine.csv"
    with table.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["alcohol", "ash", "cultivar"])
        for i in range(60):
            out.writerow([*rng.normal(size=2).round(3), ["a", "b", "c"][i % 3]])
    spec = DataSpec(source=str(table.resolve()), label_column="cultivar")
    data = load_dataset(spec, None)
    net = build_spec("mlp:4", data.input_shape, data.num_classes)
    store = SampleStore.create(
        tmp_path / "run" / "samples",
        net,
        capacity=2,
        meta={"sampler": {}, "data_sha256": data.fingerprint, "data": spec.to_dict()},
    )
    store.append(np.zeros((1, net.num_params), np.float32), np.arange(1), 0)
    store.close()
    moved = tmp_path / "moved.csv"
    table.rename(moved)
    run = SampleStore.open(tmp_path / "run" / "samples")
    args = argparse.Namespace(dataset=str(moved), label_column=None, data_dir=None)
    again = recorded_data(run, args)
    assert again.fingerprint == data.fingerprint
    assert again.convention.class_names == ["a", "b", "c"]
    assert again.spec.label_column == "cultivar"
    np.testing.assert_array_equal(again.val_x, data.val_x)
    # Without --dataset, the moved file is named with the fix.
    args = argparse.Namespace(dataset="mnist", label_column=None, data_dir=None)
    with pytest.raises(Exception, match="no longer exists; pass --dataset"):
        recorded_data(run, args)


@pytest.mark.parametrize(
    ("argv", "problem"),
    [(["--bogus"], "unrecognized arguments: --bogus"), (["--port", "abc"], "port: Input")],
)
def test_serve_usage_errors_are_one_line_pointing_at_help(
    argv: list[str], problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import main as serve_main

    assert serve_main(argv) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith("apd serve: error: ") and problem in err
    assert err.endswith("(see: apd serve --help)")


def test_serve_on_a_busy_port_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli import main as serve_main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = serve_main(
            ["--checkpoint", str(SHIPPED), "--port", str(port), "--log-format", "text"]
        )
    assert code == 1
    err = one_line(capsys.readouterr().err)
    assert err == (
        f"apd serve: error: --port {port}: 127.0.0.1:{port} is in use (another server?); "
        "stop it or pass another --port"
    )
