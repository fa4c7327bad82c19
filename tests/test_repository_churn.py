"""The model repository under a steady load: versions appear, fail and disappear, no request
without a version fails, and /predict, V2 REST and V2 gRPC agree (benchmarks/repository_churn.py,
shortened: the same scenario and expectations, fewer clients and shorter waits). One run serves
both tests: what REST and the repository did, and what the gRPC binding did."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from repository_churn import ChurnConfig, churn, grpc_available  # noqa: E402
from servebench import serve_flags  # noqa: E402

pytestmark = pytest.mark.slow  # a 2-worker server and four repository changes: about 30 s


@pytest.fixture(scope="module")
def record(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
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
    return churn(cfg, tmp_path_factory.mktemp("churn"))


def test_versions_appear_fail_and_disappear_under_http_load(record: dict[str, Any]) -> None:
    assert record["problems"]["http"] == []
    for kind in ("http-default", "http-a"):
        tally = record["answers"][kind]
        assert tally["failed"] == 0, (kind, tally)
        # the load spanned the change: versions 1 and 2 both answered requests without a version
        assert {"1", "2"} <= set(tally["by_version"]), (kind, tally)
    final = record["final_index"]
    assert final["a/2"][0] == "READY"
    assert final["a/3"][0] == "UNAVAILABLE" and final["a/3"][1]
    assert "a/1" not in final
    assert final["b/1"][0] == "READY"
    for mv in ("a/2", "b/1"):
        assert "v2_rest_tritonclient_http" in record["agreement"][mv]["protocols"]


def test_grpc_clients_through_the_churn_and_agreeing_with_rest(record: dict[str, Any]) -> None:
    if not grpc_available():
        pytest.skip("tritonclient[grpc] is not installed")
    assert record["problems"]["grpc"] == []
    tally = record["answers"]["grpc-a"]
    assert tally["failed"] == 0 and {"1", "2"} <= set(tally["by_version"]), tally
    for mv in ("a/2", "b/1"):
        assert "v2_grpc_tritonclient_grpc" in record["agreement"][mv]["protocols"]
