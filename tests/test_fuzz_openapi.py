"""Schemathesis against the app's own ``/openapi.json``, in process (ASGI), CI-sized.

Every operation is fuzzed with valid and schema-breaking requests and its documented
examples (seeded; about 400 cases in all, bounded at 60 s): no response may be a 5xx, and
every status, media type and body must be the documented ones. ``benchmarks/fuzz.py``
runs the same checks over HTTP against a live ``apd serve`` with thousands of cases.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.harness import make_tiny_checkpoint

pytest.importorskip("schemathesis")

from service.api.app import create_app
from service.config import Settings
from tests.fuzzkit import run_fuzz, schema_from_app

EXAMPLES_PER_OPERATION = 12  # per operation and phase: 26 operations since the model repository


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Any:
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("fuzz") / "tiny.safetensors")
    settings = Settings(
        checkpoint=ckpt,
        redis_url=None,
        pool_size=10,
        max_batch=4,
        max_num_samples=50,
        max_body_bytes=256 * 1024,
    )
    return create_app(settings)


def test_openapi_fuzz_no_server_errors_and_conformant(app: Any) -> None:
    schema = schema_from_app(app)
    report = run_fuzz(schema, examples_per_operation=EXAMPLES_PER_OPERATION, deadline_s=60)
    summary = report.as_dict()
    assert not report.timed_out, f"fuzzing did not finish in time: {summary}"
    assert report.cases >= 100, summary
    # every operation was reached, with valid and invalid requests
    operations = {key.split(" [")[0] for key in report.by_operation}
    assert {"POST /predict", "POST /anomaly-score", "GET /readyz", "GET /v1/model"} <= operations
    assert any(200 <= s < 300 for s in report.by_status), summary
    assert any(400 <= s < 500 for s in report.by_status), summary
    assert report.server_errors == 0, summary
    assert not report.failures, "\n".join(
        f"{f.operation} [{f.mode}] -> {f.status}: {f.message}" for f in report.failures[:10]
    )
