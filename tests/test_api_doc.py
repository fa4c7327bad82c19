"""docs/api.md and the OpenAPI document say the same, and the OpenAPI examples are real.

* Every endpoint of ``/openapi.json`` has a section in docs/api.md (``### METHOD /path``) and
  no section names another; each section's request and answer field tables name exactly the
  fields of the JSON request body and 200 answer in the OpenAPI document (nested fields as
  ``a.b``, list items as ``a[].b``), and its "Status codes" line the documented statuses. The
  V2 output tensor table matches the served model's metadata.
* The shipped checkpoint, asked the OpenAPI request examples, gives the OpenAPI answer
  examples: model id, version, sha256 and thresholds exactly, the other numbers to the 4
  significant digits the examples show; docs/api.md shows the same examples.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import SHIPPED_CHECKPOINT, Settings

ROOT = Path(__file__).resolve().parents[1]
API_DOC = ROOT / "docs" / "api.md"
SHIPPED = ROOT / SHIPPED_CHECKPOINT

_SECTION = re.compile(r"^#{2,4} (GET|POST|PUT|PATCH|DELETE) (/\S*)\s*$")
_STATUSES = re.compile(r"^Status codes: ([\d, ]+)\.?$")
_NAME = re.compile(r"`([^`]+)`")


@dataclass
class Endpoint:
    request: set[str] = field(default_factory=set)
    answer: set[str] = field(default_factory=set)
    tensors: list[tuple[str, str]] = field(default_factory=list)
    statuses: set[str] = field(default_factory=set)
    examples: list[Any] = field(default_factory=list)


def parse_api_doc(text: str) -> dict[tuple[str, str], Endpoint]:
    """``(method, path) -> Endpoint`` from the markdown: ``### METHOD /path`` sections, their
    tables (by the first header cell: ``request field``, ``answer field``, ``output tensor``;
    each row's first cell names its fields in backticks), ``Status codes:`` lines and
    ``json`` code blocks."""
    endpoints: dict[tuple[str, str], Endpoint] = {}
    current: Endpoint | None = None
    table: str | None = None
    block: list[str] | None = None
    for line in text.splitlines():
        if block is not None:
            if line.startswith("```"):
                if current is not None:
                    current.examples.append(json.loads("\n".join(block)))
                block = None
            else:
                block.append(line)
            continue
        if line.startswith("```json"):
            block = []
            continue
        if line.startswith("#"):
            table = None
            m = _SECTION.match(line)
            if m:
                key = (m[1].lower(), m[2])
                assert key not in endpoints, f"{key} documented twice"
                current = endpoints[key] = Endpoint()
            elif line.startswith("## "):
                current = None
            continue
        if current is None:
            continue
        if m := _STATUSES.match(line):
            current.statuses = {s.strip() for s in m[1].split(",")}
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if table is None:
                table = cells[0]
            elif set(cells[0]) <= set("-: "):
                continue
            elif table == "output tensor":
                current.tensors.append((_NAME.findall(cells[0])[0], cells[1]))
            elif table in ("request field", "answer field"):
                names = _NAME.findall(cells[0])
                assert names, f"a row of {table} names no field: {line}"
                (current.request if table == "request field" else current.answer).update(names)
        else:
            table = None
    return endpoints


def with_parents(names: set[str]) -> set[str]:
    """``a[].b.c`` also names ``a`` and ``a[].b``."""
    out = set(names)
    for name in names:
        for m in re.finditer(r"\[\]|(?<!\])\.", name):
            if m.start():  # a list answer's items, ``[].a``, have no parent name
                out.add(name[: m.start()])
    return out


def schema_fields(schema: dict[str, Any], defs: dict[str, Any], prefix: str = "") -> set[str]:
    """Every field a JSON body of ``schema`` can hold, as ``a``, ``a.b``, ``a[].b``."""
    while "$ref" in schema:
        schema = defs[schema["$ref"].rsplit("/", 1)[1]]
    out: set[str] = set()
    for alt in schema.get("anyOf", []) + schema.get("oneOf", []):
        out |= schema_fields(alt, defs, prefix)
    if schema.get("type") == "array" and "items" in schema:
        out |= schema_fields(schema["items"], defs, prefix + "[]")
    for name, sub in schema.get("properties", {}).items():
        path = f"{prefix}.{name}" if prefix else name
        out |= {path} | schema_fields(sub, defs, path)
    return out


def _json_schema(content: dict[str, Any]) -> dict[str, Any] | None:
    """The schema of a JSON body, or of a form's fields (``POST /predict/image``)."""
    media = content.get("application/json") or content.get("multipart/form-data")
    return None if media is None else media["schema"]


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(Settings(checkpoint=SHIPPED, redis_url=None))) as c:
        yield c


@pytest.fixture(scope="module")
def openapi(client: TestClient) -> dict[str, Any]:
    r = client.get("/openapi.json")
    assert r.status_code == 200
    doc: dict[str, Any] = r.json()
    return doc


@pytest.fixture(scope="module")
def documented() -> dict[tuple[str, str], Endpoint]:
    return parse_api_doc(API_DOC.read_text(encoding="utf-8"))


def test_parser_reads_sections_tables_and_statuses() -> None:
    text = (
        "## Group\n### POST /x\n| request field | type |\n|---|---|\n| `a.b`, `c` | t |\n\n"
        "| answer field | type |\n|---|---|\n| `d[].e` | t |\n\nStatus codes: 200, 422.\n"
        '```json\n{"d": []}\n```\n| output tensor | datatype |\n|---|---|\n| `p` | FP32 |\n'
        "## Other\n| answer field | t |\n|---|---|\n| `ignored` | t |\n"
    )
    (key, ep), *rest = parse_api_doc(text).items()
    assert key == ("post", "/x") and not rest
    assert ep.request == {"a.b", "c"} and ep.answer == {"d[].e"}
    assert ep.statuses == {"200", "422"} and ep.examples == [{"d": []}]
    assert ep.tensors == [("p", "FP32")]
    assert with_parents({"d[].e.f"}) == {"d", "d[].e", "d[].e.f"}


def test_every_openapi_endpoint_is_documented_and_no_other(
    openapi: dict[str, Any], documented: dict[tuple[str, str], Endpoint]
) -> None:
    served = {(m, p) for p, ops in openapi["paths"].items() for m in ops}
    assert sorted(served - set(documented)) == [], "in /openapi.json, not in docs/api.md"
    assert sorted(set(documented) - served) == [], "in docs/api.md, not in /openapi.json"


def test_documented_fields_and_statuses_are_the_openapi_ones(
    openapi: dict[str, Any], documented: dict[tuple[str, str], Endpoint]
) -> None:
    defs = openapi["components"]["schemas"]
    problems = []
    for (method, path), ep in sorted(documented.items()):
        op = openapi["paths"].get(path, {}).get(method)
        if op is None:
            continue  # the test above names it
        where = f"{method.upper()} {path}"
        body = _json_schema(op.get("requestBody", {}).get("content", {}))
        request = set() if body is None else schema_fields(body, defs)
        answer_schema = _json_schema(op["responses"]["200"].get("content", {}))
        answer = set() if answer_schema is None else schema_fields(answer_schema, defs)
        for kind, doc, real in (
            ("request", with_parents(ep.request), request),
            ("answer", with_parents(ep.answer), answer),
        ):
            if doc - real:
                problems.append(f"{where}: {kind} fields not in OpenAPI: {sorted(doc - real)}")
            if real - doc:
                problems.append(f"{where}: {kind} fields not documented: {sorted(real - doc)}")
        if ep.statuses != set(op["responses"]):
            problems.append(f"{where}: statuses {sorted(ep.statuses)} != {sorted(op['responses'])}")
    assert not problems, "\n".join(problems)


def test_documented_output_tensors_are_the_served_ones(
    client: TestClient, documented: dict[tuple[str, str], Endpoint]
) -> None:
    name = client.get("/v1/model").json()["id"]
    meta = client.get(f"/v2/models/{name}").json()
    served = [(t["name"], t["datatype"]) for t in meta["outputs"]]
    assert documented[("post", "/v2/models/{name}/infer")].tensors == served
    assert [t["name"] for t in meta["inputs"]] == ["input"]


# --------------------------------------------------------------------------------------
# The examples: real answers of the shipped checkpoint

EXACT_FLOATS = {"threshold", "target_fpr"}


def differences(real: Any, shown: Any, where: str = "") -> Iterator[str]:
    """Where ``shown`` (an example) is not ``real``: floats to ``shown``'s 4 significant digits
    (those under a key in EXACT_FLOATS exactly), everything else exactly."""
    if isinstance(real, dict) and isinstance(shown, dict):
        if set(real) != set(shown):
            yield f"{where}: keys {sorted(shown)} != {sorted(real)}"
        for key in set(real) & set(shown):
            yield from differences(real[key], shown[key], f"{where}.{key}")
    elif isinstance(real, list) and isinstance(shown, list):
        if len(real) != len(shown):
            yield f"{where}: {len(shown)} items, the answer has {len(real)}"
        for i, (r, s) in enumerate(zip(real, shown, strict=False)):
            yield from differences(r, s, f"{where}[{i}]")
    elif type(real) is float and type(shown) in (float, int):
        key = where.rsplit(".", 1)[-1]
        expected = real if key in EXACT_FLOATS else float(f"{real:.4g}")
        # A value on a rounding boundary (1.80749...e-07) may round either way between BLAS
        # builds (float32 logits differ in their last bits): real +- 1e-5 relative rounds right.
        near = (
            {expected}
            if key in EXACT_FLOATS
            else {float(f"{real * (1 + d):.4g}") for d in (-1e-5, 0.0, 1e-5)}
        )
        if shown not in near:
            yield f"{where}: shows {shown}, the answer is {real} ({expected})"
    elif type(real) is not type(shown) or real != shown:
        yield f"{where}: shows {shown!r}, the answer is {real!r}"


def test_differences_is_live() -> None:
    real = {"a": [0.123456, 1e-7], "threshold": 0.2354017, "ok": True, "n": 7}
    assert not list(differences(real, {**real, "a": [0.1235, 1e-07]}))
    assert list(differences(real, {**real, "a": [0.1234, 1e-07]}))  # wrongly rounded
    assert list(differences(real, {**real, "threshold": 0.2354}))  # must be exact
    assert list(differences(real, {**real, "ok": 1}))  # a bool is not an int
    assert list(differences(real, {**real, "n": 8}))
    assert list(differences(real, {k: v for k, v in real.items() if k != "n"}))


@pytest.mark.parametrize(
    ("path", "request_schema", "answer_schema"),
    [
        ("/predict", "PredictRequest", "PredictResponse"),
        ("/anomaly-score", "AnomalyScoreRequest", "AnomalyScoreResponse"),
    ],
)
def test_openapi_examples_are_real_answers_of_the_shipped_model(
    client: TestClient,
    openapi: dict[str, Any],
    documented: dict[tuple[str, str], Endpoint],
    path: str,
    request_schema: str,
    answer_schema: str,
) -> None:
    schemas = openapi["components"]["schemas"]
    request = schemas[request_schema]["examples"][0]
    (shown,) = schemas[answer_schema]["examples"]
    assert request.get("seed") is not None, "only a seeded example has one answer"
    r = client.post(path, json=request)
    assert r.status_code == 200, r.text
    problems = list(differences(r.json(), shown))
    assert not problems, f"{answer_schema} example is not the real answer:\n" + "\n".join(problems)
    # docs/api.md shows the same answer.
    assert documented[("post", path)].examples == [shown]
