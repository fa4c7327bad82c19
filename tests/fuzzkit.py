"""Schemathesis against the service's own OpenAPI document, counting every generated case.

Used by ``tests/test_fuzz_openapi.py`` (in-process ASGI, CI-sized) and ``benchmarks/fuzz.py``
(a live ``apd serve`` over loopback HTTP, thousands of cases). Each API operation is fuzzed
in schemathesis's positive mode (valid requests, which must get a 2xx or a documented 4xx
such as 413) and negative mode (requests that break the schema, which must get a 4xx), plus
the examples written into the document. Every response is checked with:

* ``not_a_server_error``: no 5xx, ever;
* ``status_code_conformance``: the status is one the document lists for the operation;
* ``response_schema_conformance``: the body matches the documented schema of that status;
* ``content_type_conformance``: the media type is the documented one.

Failures are collected (not raised at the first) so that a run reports all it found.
Generation is seeded, so a run is reproducible; a deadline bounds it in time.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    response_schema_conformance,
    content_type_conformance,
]
CHECK_NAMES = [c.__name__ for c in CHECKS]


@dataclass
class FuzzFailure:
    operation: str
    mode: str
    status: int
    message: str


@dataclass
class FuzzReport:
    cases: int = 0
    by_operation: Counter[str] = field(default_factory=Counter)
    by_status: Counter[int] = field(default_factory=Counter)
    server_errors: int = 0
    failures: list[FuzzFailure] = field(default_factory=list)
    unsatisfiable: list[str] = field(default_factory=list)  # e.g. no invalid GET /healthz
    timed_out: bool = False
    wall_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "cases": self.cases,
            "by_operation": dict(self.by_operation),
            "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
            "server_errors": self.server_errors,
            "check_failures": len(self.failures),
            "failures": [f.__dict__ for f in self.failures[:50]],
            "checks": CHECK_NAMES,
            "not_generatable": self.unsatisfiable,
            "timed_out": self.timed_out,
            "wall_s": round(self.wall_s, 2),
        }


class _Deadline(Exception):
    pass


def _short(message: str, limit: int = 600) -> str:
    text = " | ".join(line.strip() for line in message.strip().splitlines() if line.strip())
    return text[:limit]


def run_fuzz(
    schema: Any,
    *,
    examples_per_operation: int,
    seed: int = 20240601,
    deadline_s: float = 60.0,
    modes: tuple[GenerationMode, ...] = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE),
    base_url: str | None = None,
) -> FuzzReport:
    """Fuzz every operation of ``schema`` in each mode with ``examples_per_operation`` cases."""
    report = FuzzReport()
    start = time.monotonic()
    stop_at = start + deadline_s
    call_kwargs: dict[str, Any] = {"timeout": 30} if base_url else {}
    if base_url:
        call_kwargs["base_url"] = base_url

    def exercise(case: Any, label: str, mode: str) -> None:
        if time.monotonic() > stop_at:
            raise _Deadline
        response = case.call(**call_kwargs)
        report.cases += 1
        report.by_operation[f"{label} [{mode}]"] += 1
        report.by_status[response.status_code] += 1
        if response.status_code >= 500:
            report.server_errors += 1
        try:
            case.validate_response(response, checks=CHECKS)
        except (AssertionError, FailureGroup) as exc:
            report.failures.append(FuzzFailure(label, mode, response.status_code, _short(str(exc))))

    operations = [r.ok() for r in schema.get_all_operations()]
    try:
        for op in operations:
            label = f"{op.method.upper()} {op.path}"
            strategies: list[tuple[str, Any]] = [
                (mode.value, op.as_strategy(generation_mode=mode)) for mode in modes
            ]
            examples = schema.get_strategies_from_examples(op)
            strategies += [("examples", s) for s in examples]
            for mode_name, strategy in strategies:
                n = examples_per_operation if mode_name != "examples" else 3
                run = _fuzzer(
                    strategy, n, seed, lambda c, lb=label, md=mode_name: exercise(c, lb, md)
                )
                try:
                    run()
                except hypothesis.errors.Unsatisfiable:
                    report.unsatisfiable.append(f"{label} [{mode_name}]")
    except _Deadline:
        report.timed_out = True
    report.wall_s = time.monotonic() - start
    return report


def _fuzzer(strategy: Any, n: int, seed: int, body: Any) -> Any:
    """A Hypothesis test drawing ``n`` cases from ``strategy`` and passing each to ``body``."""

    @settings(
        max_examples=n,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )
    @hypothesis.seed(seed)
    @given(case=strategy)
    def fuzz_one(case: Any) -> None:
        body(case)

    return fuzz_one


def schema_from_app(app: Any) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def schema_from_url(base_url: str) -> Any:
    return schemathesis.openapi.from_url(f"{base_url}/openapi.json")
