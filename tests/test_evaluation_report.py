"""The anomaly tables, the fidelity check and the report, on small random networks.

Nothing here needs MNIST: the "test set" and the OOD sets are random images and the methods
are random networks, so the numbers mean nothing; what is checked is that every row reaches
the report, that APD-vs-SGLD rows are marked against the target whichever way they fall,
that single-network scores are reported as undefined, that ``results.json`` is strict
JSON, and that a ``results.json`` is checked against its types when it is read back.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from apd.networks import MLPSpec
from training.errors import UserError
from training.evaluation import anomaly
from training.evaluation.active_learning import ActiveLearningSettings, initial_labels
from training.evaluation.methods import MemberNetworks
from training.evaluation.report import SCORE_LABELS, render_markdown, write_report
from training.evaluation.report.__main__ import main
from training.evaluation.results import (
    AnomalyRecord,
    EvaluationResults,
    Provenance,
    load_results,
    spec_record,
)
from training.evaluation.suite import (
    SuiteConfig,
    SuiteResult,
    classification_and_anomaly,
    method_records,
)

SPEC = MLPSpec("tiny", (784, 6, 10))
REFERENCE_RESULTS = sorted(Path(__file__).parents[1].glob("docs/results/*/results.json"))


def _members(seed: int, k: int) -> MemberNetworks:
    g = torch.Generator().manual_seed(seed)
    return MemberNetworks(SPEC, torch.randn(k, SPEC.num_params, generator=g) * 0.1)


def _results(tmp_path: Path) -> EvaluationResults:
    rng = np.random.default_rng(0)
    test_x = rng.random((120, 784), dtype=np.float32) * 0.5
    test_y = rng.integers(0, 10, 120)
    ood = {
        "notmnist": rng.random((60, 784), dtype=np.float32),
        "uniform": rng.random((60, 784), dtype=np.float32),
    }
    members = {"sgd": _members(0, 1), "sgld": _members(1, 6), "apd": _members(2, 6)}
    described = {k: f"{k} (random stand-in)" for k in ood}
    config = SuiteConfig(
        arch="tiny",
        runs=tmp_path,
        checkpoint=None,
        name="unit",
        num_samples=6,
        dropout_passes=6,
        experiments=("classification", "anomaly"),
    )
    results: EvaluationResults = {
        "meta": {
            "name": "unit",
            "arch": "tiny",
            "spec": spec_record(SPEC.to_dict()),
            "created_at": "2026-01-01T00:00:00+00:00",
            "code_revision": "f" * 40,
            "uncommitted_changes": True,
            "command": "apd evaluate --arch tiny",
            "machine": "test",
            "data_sha256": "d" * 64,
            "test_inputs": len(test_x),
            "config": config.to_dict(),
            "seconds": {"total": 1.0},
        },
        "methods": {
            k: {
                "label": k.upper(),
                "num_members": m.num_members,
                "stored_bytes": 4 * SPEC.num_params * m.num_members,
                "provenance": {"run": f"runs/{k}", "seed": 0},
            }
            for k, m in members.items()
        },
        "missing_methods": {},
    }
    results.update(
        classification_and_anomaly(members, test_x, test_y, ood, described, (1.0, 5.0), seed=0)
    )
    results["methods"]["apd"]["provenance"] = {
        "checkpoint": "model.safetensors",
        "sha256": "0" * 64,
        "design": "subspace",
        "subspace_rank": 4,
        "code_revision": "abc",
    }
    return results


def test_report_lists_every_anomaly_and_fidelity_row(tmp_path: Path) -> None:
    results = _results(tmp_path)
    fid = results["fidelity"]
    # 2 sets x 2 scales x 4 scores, all defined for K = 6
    assert fid["anomaly_rows"] == 16
    assert fid["issue_score_rows"] == 12
    report = write_report(SuiteResult(results), tmp_path).read_text()
    fid_section = report.split("### APD against its SGLD teacher")[1].split("### ")[0]
    table_rows = [
        line for line in fid_section.splitlines() if line.startswith("| ") and "OOD set" not in line
    ]
    assert len(table_rows) == 16
    for row in fid["anomaly"]:
        verdict = "yes" if row["drop"] <= row["tolerance"] else "**NO**"
        expected = (
            f"| {row['ood_set']} | {row['scale']:g} | {SCORE_LABELS[row['score']]} | "
            f"{row['teacher_auroc']:.4f} | {row['student_auroc']:.4f} | {row['drop']:+.4f} | "
            f"{verdict} |"
        )
        assert expected in fid_section
    assert f"**{fid['anomaly_rows_within']} of 16**" in report
    # every (set, scale, score) appears in each of the AUROC / AUPR-in / AUPR-out tables
    for title in ("AUROC", "AUPR-in", "AUPR-out"):
        for scale in ("1", "5"):
            section = report.split(f"### {title}, input scale {scale}\n")[1].split("###")[0]
            assert sum(line.startswith("| notmnist") for line in section.splitlines()) == 4
    assert (tmp_path / "reliability.png").stat().st_size > 0
    assert (tmp_path / "anomaly_auroc.png").stat().st_size > 0
    assert "with uncommitted local changes" in report
    assert "not run in this report: adversarial, active_learning, toy, cost" in report


def test_a_report_of_self_training_experiments_names_no_methods(tmp_path: Path) -> None:
    """Active learning and the toy train their own models: no trained run is listed, and
    no run is reported missing."""
    meta = _results(tmp_path)["meta"]
    meta["config"]["experiments"] = ["active_learning"]
    report = render_markdown({"meta": meta, "methods": {}, "missing_methods": {}})
    assert "## Methods and where they came from" not in report
    assert "Not evaluated" not in report
    assert "no trained run or checkpoint is used" in report
    assert "not run in this report: classification, anomaly, adversarial, toy, cost" in report


def test_results_json_is_strict_and_single_network_scores_are_undefined(tmp_path: Path) -> None:
    write_report(SuiteResult(_results(tmp_path)), tmp_path)
    data = json.loads((tmp_path / "results.json").read_text(), parse_constant=pytest.fail)
    sgd_rows = [r for r in data["anomaly"]["rows"] if r["method"] == "sgd"]
    for r in sgd_rows:
        undefined = r["score"] in ("mutual_information", "model_variance")
        assert (r["auroc"] is None) == undefined


@pytest.mark.parametrize("path", REFERENCE_RESULTS, ids=lambda p: p.parent.name)
def test_reference_results_read_back_unchanged_and_render_their_report(path: Path) -> None:
    """Every committed results.json passes the checks, holds nothing the types leave out
    (written again it is the same bytes) and renders to its committed report.md."""
    results = load_results(path)
    assert json.dumps(results, indent=1) + "\n" == path.read_text()
    assert render_markdown(results) == (path.parent / "report.md").read_text()


def test_render_again_from_results_json(tmp_path: Path) -> None:
    first = write_report(SuiteResult(_results(tmp_path)), tmp_path / "eval")
    assert main([str(tmp_path / "eval" / "results.json"), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "report.md").read_text() == first.read_text()


def _drop_seed(d: Any) -> None:
    del d["meta"]["config"]["seed"]


def _auroc_as_text(d: Any) -> None:
    d["anomaly"]["rows"][3]["auroc"] = "0.9"


def _count_as_float(d: Any) -> None:
    d["fidelity"]["anomaly_rows"] = 16.0


def _misspelt_key(d: Any) -> None:
    d["methods"]["apd"]["lable"] = d["methods"]["apd"].pop("label")


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (_drop_seed, "field meta.config.seed: Field required"),
        (_auroc_as_text, "field anomaly.rows.3.auroc: Input should be a valid number"),
        (_count_as_float, "field fidelity.anomaly_rows: Input should be a valid integer"),
        (_misspelt_key, "field methods.apd.label: Field required"),
    ],
)
def test_a_results_json_with_a_bad_field_gives_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    spoil: Callable[[Any], None],
    message: str,
) -> None:
    write_report(SuiteResult(_results(tmp_path)), tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    spoil(data)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(UserError, match="^" + re.escape(f"{bad}: {message}")) as err:
        load_results(bad)
    assert len(str(err.value).splitlines()) == 1
    assert main([str(bad), "--out", str(tmp_path / "out")]) == 2
    out = capsys.readouterr().err
    assert out.count("\n") == 1 and message in out and "Traceback" not in out
    assert not (tmp_path / "out" / "report.md").exists()


def test_fidelity_rows_mark_drops_against_the_tolerance() -> None:
    def row(method: str, auroc: float | None) -> AnomalyRecord:
        return {
            "method": method,
            "ood_set": "notmnist",
            "scale": 1.0,
            "score": "mutual_information",
            "auroc": auroc,
            "aupr_in": 0.0,
            "aupr_out": 0.0,
        }

    rows = [row("sgld", 0.95), row("apd", 0.9449)]
    (f,) = anomaly.fidelity_rows(rows)
    assert f["drop"] == pytest.approx(0.0051) and not f["within_target"]
    (g,) = anomaly.fidelity_rows([row("sgld", 0.95), row("apd", 0.946)])
    assert g["within_target"] and g["issue_target"]
    undefined = row("apd", None)  # a single network's mutual information
    assert anomaly.fidelity_rows([row("sgld", 0.95), undefined]) == []


def test_initial_labels_are_balanced_and_the_protocol_counts_steps() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), 30)
    idx = initial_labels(y, 2, rng)
    np.testing.assert_array_equal(np.bincount(y[idx]), np.full(10, 2))
    s = ActiveLearningSettings()
    assert s.sgld_steps(first=True) == 500 + 10 * 5 + 70
    assert s.sgld_steps(first=False) == 30 + 10 * 5 + 70
    assert s.tested(0) and s.tested(50) and not s.tested(3) and s.tested(40)
    assert not s.tested(45)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--arch", "fcnn9"], "unknown architecture"),
        (["--arch", "fcnn1", "--runs", "no/such/runs"], "does not exist"),
        (["--arch", "fcnn1", "--checkpoint", "no/such.safetensors"], "does not exist"),
        (["--arch", "fcnn1", "--attack-eps", "0.1,x"], "comma-separated numbers"),
        (["--arch", "fcnn1", "--experiments", "anomaly,magic"], "unknown experiment"),
        (["--arch", "fcnn1", "--mixture-rank", "1"], "mixture's rank must be at least 2"),
        (["--arch", "fcnn1", "--laplace-fit-inputs", "0"], "laplace_fit_inputs must be positive"),
        (["--arch", "fcnn1", "--variant", "rank46"], "--variant takes NAME=CHECKPOINT"),
        (["--arch", "fcnn1", "--variant", "r/46=x"], "--variant takes NAME=CHECKPOINT"),
        (["--arch", "fcnn1", "--variant", "r46=/nonexistent.safetensors"], "does not exist"),
        (
            ["--arch", "fcnn1", "--variant", f"r46={__file__}", "--variant", f"R46={__file__}"],
            "--variant names must differ",
        ),
    ],
)
def test_bad_evaluate_flags_give_one_line(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.cli import main

    runs = ["--runs", str(tmp_path)] if "--runs" not in argv else []
    assert main(["evaluate", *argv, *runs, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("apd evaluate: error:") and message in err
    assert len(err.splitlines()) == 1


def _peer_results(tmp_path: Path) -> EvaluationResults:
    """Every experiment that evaluates methods, with the fair peers fitted for real (the
    mixture to random "samples" of two chains, laplace-torch to random labelled images)."""
    from training.evaluation.adversarial import AttackSettings, run_adversarial
    from training.evaluation.cost import measure_cost
    from training.evaluation.laplace_peer import LaplaceFlavour, fit_laplace
    from training.evaluation.methods import (
        FixedNetworks,
        PosteriorMethod,
        fit_gaussian,
        fit_mixture,
    )

    rng = np.random.default_rng(1)
    p = SPEC.num_params
    test_x = rng.random((80, 784), dtype=np.float32) * 0.5
    test_y = rng.integers(0, 10, 80)
    ood = {"uniform": rng.random((40, 784), dtype=np.float32)}
    sgd = (rng.normal(size=(1, p)) * 0.1).astype(np.float32)
    chain = np.repeat([0, 1], 20)
    samples = rng.normal(size=(40, p)) * 0.02 + 0.1 * rng.normal(size=(2, p))[chain]
    samples = samples.astype(np.float32)
    train_x = rng.random((200, 784), dtype=np.float32)
    train_y = rng.integers(0, 10, 200)
    run: Provenance = {"run": "runs/sgd-tiny", "seed": 0}
    found: dict[str, PosteriorMethod] = {
        "sgd": FixedNetworks("sgd", "SGD", SPEC, sgd, run),
        **{
            f.value: fit_laplace(SPEC, sgd[0], train_x, train_y, f, source=run)
            for f in LaplaceFlavour
        },
        "sgld": FixedNetworks("sgld", "SGLD", SPEC, samples, {"run": "runs/sgld-tiny"}),
        "gaussian": fit_gaussian(SPEC, samples, rank=3),
        "mixture": fit_mixture(SPEC, samples, chain, np.tile(np.arange(20), 2), rank=5),
        "apd": FixedNetworks("apd", "APD", SPEC, samples[::5] + 0.01),
    }
    members = {k: m.draw(6, 0) for k, m in found.items()}
    config = SuiteConfig(
        arch="tiny",
        runs=tmp_path,
        checkpoint=None,
        name="peers",
        num_samples=6,
        experiments=("classification", "anomaly", "adversarial", "cost"),
    )
    attacks = AttackSettings(eps=(0.1,), pgd_steps=2, num_inputs=30)
    results: EvaluationResults = {
        "meta": {
            **_results(tmp_path)["meta"],
            "name": "peers",
            "config": config.to_dict(),
        },
        "methods": method_records(found, members),
        "missing_methods": {"dropout": "no run", "ensemble": "no runs"},
    }
    results.update(
        classification_and_anomaly(members, test_x, test_y, ood, {"uniform": "noise"}, (1.0,))
    )
    rows = run_adversarial(members, test_x[:30], test_y[:30], attacks, progress=False)
    results["adversarial"] = {
        "settings": attacks.to_dict(),
        "inputs": "30 random images",
        "rows": rows,
    }
    results["cost"] = {
        "batch_size": 10,
        "rows": [measure_cost(m, test_x[:10], 6, repeats=1) for m in found.values()],
        "sgld_store_bytes": None,
    }
    results["methods"]["apd"]["provenance"] = {
        "checkpoint": "model.safetensors",
        "sha256": "0" * 64,
        "design": "subspace",
        "code_revision": "abc",
    }
    return results


@pytest.mark.slow  # about 10 s: two Laplace fits and nine methods' plots
def test_the_fair_peers_have_rows_in_every_table(tmp_path: Path) -> None:
    pytest.importorskip("laplace", reason="laplace-torch is in the eval extra")
    from training.evaluation import peers

    results = _peer_results(tmp_path)
    assert "fidelity_mixture" in results
    report = write_report(SuiteResult(results), tmp_path).read_text()
    labels = {k: m["label"] for k, m in results["methods"].items()}
    new = ("laplace_ll", "laplace_kfac", "mixture")
    assert labels["laplace_ll"] == "Laplace, last layer (KFAC)"
    assert labels["laplace_kfac"] == "Laplace, all layers (KFAC)"
    assert labels["gaussian"] == "One Gaussian across chains (illustration)"

    def section(title: str) -> str:
        return report.split(title)[1].split("\n## ")[0].split("\n### ")[0]

    methods_table = section("## Methods and where they came from")
    for key in new:
        assert f"| {labels[key]} | `{key}` | 6 |" in methods_table
    assert "one SWAG Gaussian per chain (2 components of 20-20 samples)" in methods_table
    assert "KFAC GGN over 200 training images" in methods_table
    # rows: classification, cost, the peers' headline table
    for title in ("## 1. Classification", "## 6. Cost", "## 7. APD against its peers"):
        body = section(title)
        for key in new:
            assert sum(line.startswith(f"| {labels[key]} |") for line in body.splitlines()) == 1
    # columns: every anomaly table and every adversarial table
    tables = [section(f"### {t}, input scale 1\n") for t in ("AUROC", "AUPR-in", "AUPR-out")]
    tables.append(section("### Accuracy under attack"))
    tables += [section(f"### Clean vs attacked AUROC by {s}") for s in SCORE_LABELS.values()]
    for body in tables:
        header = next(line for line in body.splitlines() if line.startswith("| "))
        for key in new:
            assert f" {labels[key]} |" in header
    gaussians = section("### Does the GAN beat a Gaussian?")
    assert "| Gaussian mixture (MultiSWAG) |" in gaussians
    assert "| one Gaussian (illustration) |" in gaussians
    # the verdicts: one line per peer present (SGD and the one Gaussian are not judged)
    found = peers.verdicts(results)
    assert [v.peer for v in found] == ["laplace_ll", "laplace_kfac", "sgld", "mixture"]
    summary = section("## 7. APD against its peers")
    for v in found:
        n = len(v.wins) + len(v.ties) + len(v.losses)
        assert n == 12  # accuracy, NLL, ECE; 2 anomaly (1 scale); 2 x 2 adversarial; 3 cost
        assert f"- Against {labels[v.peer]}, APD **wins** on {len(v.wins)}" in summary
        assert f"**loses** on {len(v.losses)}" in summary
    assert "- Against SGD" not in summary and "- Against One Gaussian" not in summary


@pytest.mark.parametrize(
    ("arch", "named"),
    [
        ("lenet5", "lenet5: 1x28x28 -> conv6x5p2, pool2, conv16x5, pool2, fc120, fc84 -> 10"),
        ("al-cnn", "al-cnn: 1x28x28 -> conv32x3, conv32x3, pool2, fc128 -> 10"),
        ("fcnn2", "[784, 400, 400, 10]"),
    ],
)
def test_results_record_any_network_and_the_report_names_its_layers(arch: str, named: str) -> None:
    from apd.networks import get_spec
    from training.evaluation.report.sections import _network

    record = spec_record(get_spec(arch).to_dict())
    assert record["num_params"] == get_spec(arch).num_params
    assert _network(record) == named


def test_every_committed_report_renders_again_from_its_results_without_torch() -> None:
    """``python -m training.evaluation.report --check`` renders every report under
    docs/results/ from its results.json, byte for byte the committed report.md, in a process
    that never imports torch (the report needs only the JSON)."""
    import subprocess
    import sys

    script = (
        "import runpy, sys\n"
        "sys.argv = ['report', '--check']\n"
        "try:\n"
        "    runpy.run_module('training.evaluation.report', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "heavy = sorted(m for m in ('torch', 'laplace', 'sklearn.neural_network') "
        "if m in sys.modules)\n"
        "print('IMPORTED', heavy)\n"
        "sys.exit(code)\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "IMPORTED []" in done.stdout
    assert len(list((root / "docs" / "results").glob("*/results.json"))) >= 4


def test_the_check_fails_on_a_report_that_differs(tmp_path: Path) -> None:
    src = Path(__file__).resolve().parents[1] / "docs" / "results" / "fcnn1"
    (tmp_path / "results.json").write_text((src / "results.json").read_text())
    (tmp_path / "report.md").write_text((src / "report.md").read_text() + "edited\n")
    assert main([str(tmp_path / "results.json"), "--check"]) == 1
    assert main([str(tmp_path / "results.json")]) == 0  # renders it again
    assert main([str(tmp_path / "results.json"), "--check"]) == 0
    assert (tmp_path / "report.md").read_text() == (src / "report.md").read_text()


def test_an_apd_variant_stands_beside_apd_in_the_tables_and_against_sgld(tmp_path: Path) -> None:
    """``apd evaluate --variant NAME=CHECKPOINT``: the other checkpoint loads as method
    ``apd-NAME`` (one of another network is reported missing, not fatal), has its own row in
    the methods and classification tables and its fidelity against SGLD beside APD's, and
    the report renders again from results.json."""
    from tests.service_support import make_checkpoint
    from training.evaluation.suite import load_methods, variant_key

    spec = MLPSpec("fcnn-test", (784, 32, 10))
    main_ck = make_checkpoint(tmp_path / "main.safetensors", rank=12, seed=0)
    small = make_checkpoint(tmp_path / "small.safetensors", rank=4, seed=1)
    other = make_checkpoint(tmp_path / "other.safetensors", sizes=(784, 16, 10), seed=2)
    assert variant_key("Rank 4.5") == "apd-rank-4-5"
    cfg = SuiteConfig(
        arch="fcnn-test",
        runs=tmp_path,
        checkpoint=main_ck,
        name="variants",
        num_samples=6,
        experiments=("classification", "anomaly"),
        variants=(("rank 4", small), ("wrong net", other)),
    )
    found, missing = load_methods(cfg, spec, lambda _: None)
    assert list(found) == ["apd", "apd-rank-4"]
    assert found["apd-rank-4"].label == "APD (rank 4)"
    assert "apd-wrong-net" in missing and "generator targets" in missing["apd-wrong-net"]
    g = torch.Generator().manual_seed(5)
    sgld = MemberNetworks(spec, torch.randn(6, spec.num_params, generator=g) * 0.05)
    members = {"sgld": sgld, **{k: m.draw(6, 0) for k, m in found.items()}}
    rng = np.random.default_rng(0)
    test_x, test_y = rng.random((60, 784), dtype=np.float32), rng.integers(0, 10, 60)
    ood = {"uniform": rng.random((30, 784), dtype=np.float32)}
    results: EvaluationResults = {
        **_results(tmp_path),
        "methods": {
            "sgld": {
                "label": "SGLD",
                "num_members": 6,
                "stored_bytes": 1,
                "provenance": {"run": "runs/sgld", "seed": 0},
            },
            **method_records(found, {k: members[k] for k in found}),
        },
    }
    results.update(
        classification_and_anomaly(members, test_x, test_y, ood, {"uniform": "noise"}, (1.0,))
    )
    variant = results["fidelity_variants"]["apd-rank-4"]
    assert len(variant["anomaly"]) == len(results["fidelity"]["anomaly"]) > 0
    report = render_markdown(results)
    table = report.split("### Does the GAN beat a Gaussian?")[1].split("\n## ")[0]
    mb = results["methods"]["apd-rank-4"]["stored_bytes"] / 1e6
    assert f"| APD (rank 4), rank 4, {mb:.2f} MB |" in table
    assert "| APD, rank 12, " in table
    assert "| APD (rank 4) | `apd-rank-4` | 6 |" in report
    assert "apd-rank-4=small.safetensors" in report
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    assert render_markdown(load_results(path)) == report
