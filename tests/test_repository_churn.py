"""The model repository under a steady load: versions appear, fail and disappear, no request
without a version fails, and /predict, V2 REST and V2 gRPC agree (benchmarks/repository_churn.py,
shortened: the same scenario and expectations, fewer clients and shorter waits)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from repository_churn import ChurnConfig, churn  # noqa: E402
from servebench import serve_flags  # noqa: E402

pytestmark = pytest.mark.slow  # a 2-worker server and four repository changes: about 30 s


def test_versions_appear_fail_and_disappear_under_load(tmp_path: Path) -> None:
    if "--model-repository" not in serve_flags():
        pytest.skip("apd serve has no --model-repository yet (issue #23)")
    poll = ("--repository-poll-s", "0.5") if "--repository-poll-s" in serve_flags() else ()
    cfg = ChurnConfig(
        http_clients=3,
        grpc_clients=1,
        copy_s=1.5,
        settle_s=1.0,
        num_samples=10,
        server_args=poll,
    )
    record = churn(cfg, tmp_path)
    assert record["problems"] == []
    answers = record["answers"]
    kinds = {"http-default", "http-a"} | ({"grpc-a"} if record["grpc_clients"] else set())
    assert set(answers) == kinds
    for kind, tally in answers.items():
        assert tally["failed"] == 0, (kind, tally)
        # the load spanned the change: versions 1 and 2 both answered requests without a version
        assert {"1", "2"} <= set(tally["by_version"]), (kind, tally)
    assert record["final_index"]["a/2"][0] == "READY"
    assert record["final_index"]["a/3"][0] == "UNAVAILABLE" and record["final_index"]["a/3"][1]
    assert "a/1" not in record["final_index"]
    assert record["final_index"]["b/1"][0] == "READY"
