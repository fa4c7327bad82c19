"""The inference routes' JSON path (orjson, the image batch checked whole with NumPy) against
the per-pixel path it replaces (Python's ``json`` and the request model checking each pixel).

The per-pixel path is the reference: for every body, valid or not, the fast path must give
the same pixels or the same errors (type, ``loc``, message), and over HTTP the same status and
the same 422 body. And it must actually be the fast path that valid batches take.
"""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson
import pytest
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from apd.checkpoint import InputConvention
from service.api import json_body
from service.api.errors import http_error_handler, validation_error_handler
from service.api.json_body import InputBatchRoute
from service.codecs.inputs import (
    DEFAULT_INPUT,
    CheckedInputs,
    InputSchema,
    parse_json_body,
    serving,
)
from service.codecs.schemas import AnomalyScoreRequest, PredictRequest
from tests.service_support import make_client

rng = np.random.default_rng(0)
DIGITS = np.round(rng.random((4, 784)) * (rng.random((4, 784)) < 0.3), 4)
FLAT = DIGITS[0].tolist()
NESTED = DIGITS[1].reshape(28, 28).tolist()


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


def literal_body(pixels: list[str]) -> bytes:
    """A one-image body with pixels written as given (NaN, Infinity, huge integers...)."""
    return ('{"inputs": [[' + ", ".join(pixels) + "]]}").encode()


ROWS = [[0.1] * 28 for _ in range(28)]
BODIES: dict[str, bytes] = {
    "flat": dumps({"inputs": [FLAT], "num_samples": 3, "seed": 1}),
    "nested": dumps({"inputs": [NESTED], "num_samples": 3, "seed": 1}),
    "flat and nested": dumps({"inputs": [FLAT, NESTED]}),
    "integers": dumps({"inputs": [[0] * 783 + [1]]}),
    "integers nested": dumps({"inputs": [[[0, 1] * 14] * 28]}),
    "edges": dumps({"inputs": [[0.0, 1.0, -0.0, 5e-324, *FLAT[4:]]]}),
    "explicit nulls": dumps({"inputs": [FLAT], "num_samples": None, "seed": None}),
    "score": dumps({"inputs": [FLAT], "score": "model_variance"}),
    "duplicate key": b'{"inputs": [[2.0]], "inputs": ' + dumps([FLAT]) + b"}",
    "whitespace": b' {\n "inputs" : [ ' + dumps(FLAT) + b" ] }\n",
    "byte order mark": b"\xef\xbb\xbf" + dumps({"inputs": [FLAT]}),
    "utf-16": json.dumps({"inputs": [FLAT]}).encode("utf-16"),
    "short image": dumps({"inputs": [[0.5] * 783]}),
    "long image": dumps({"inputs": [[0.5] * 785]}),
    "28 numbers": dumps({"inputs": [[0.1] * 28]}),
    "short row": dumps({"inputs": [[*ROWS[:27], [0.1] * 27]]}),
    "27 rows": dumps({"inputs": [ROWS[:27]]}),
    "3-d image": dumps({"inputs": [[[[0.1]] * 28] * 28]}),
    "image a string": dumps({"inputs": ["abc"]}),
    "image empty": dumps({"inputs": [[], []]}),
    "inputs a number": dumps({"inputs": 5}),
    "inputs null": dumps({"inputs": None}),
    "inputs an object": dumps({"inputs": {"a": 1}}),
    "empty batch": dumps({"inputs": []}),
    "no inputs": dumps({"num_samples": 3}),
    "NaN": literal_body(["0.5"] * 783 + ["NaN"]),
    "Infinity": literal_body(["Infinity"] + ["0.5"] * 783),
    "1e400": literal_body(["1e400"] + ["0.5"] * 783),
    "huge integer": literal_body(["1" + "0" * 400] + ["0.5"] * 783),
    "30-digit integer": literal_body(["123456789012345678901234567890"] + ["0.5"] * 783),
    "above 1": dumps({"inputs": [[*FLAT[:-1], 1.5]]}),
    "below 0": dumps({"inputs": [[-0.01, *FLAT[1:]]]}),
    "two bad images": dumps({"inputs": [FLAT, [2.0] * 784, [*FLAT[:7], 3.0, *FLAT[8:]]]}),
    "bad nested pixel": dumps({"inputs": [[*ROWS[:5], [0.1] * 3 + [7.0] + [0.1] * 24, *ROWS[6:]]]}),
    "string pixels": dumps({"inputs": [["0.5"] * 784]}),
    "one string pixel": dumps({"inputs": [[*FLAT[:10], "0.5", *FLAT[11:]]]}),
    "true pixel": dumps({"inputs": [[True, *FLAT[1:]]]}),
    "false nested pixel": dumps({"inputs": [[[False] + [0.1] * 27, *ROWS[1:]]]}),
    "null pixel": dumps({"inputs": [[None, *FLAT[1:]]]}),
    "null row": dumps({"inputs": [[None, *ROWS[1:]]]}),
    "object pixel": dumps({"inputs": [[{}, *FLAT[1:]]]}),
    "list pixel": dumps({"inputs": [[[0.5], *FLAT[1:]]]}),
    "num_samples 0": dumps({"inputs": [FLAT], "num_samples": 0}),
    "num_samples 2.5": dumps({"inputs": [FLAT], "num_samples": 2.5}),
    "num_samples 3.0": dumps({"inputs": [FLAT], "num_samples": 3.0}),
    "num_samples true": dumps({"inputs": [FLAT], "num_samples": True}),
    "num_samples huge": b'{"inputs": [' + dumps(FLAT) + b'], "num_samples": 1' + b"0" * 30 + b"}",
    "seed 2**64-1": b'{"inputs": [' + dumps(FLAT) + b'], "seed": 18446744073709551615}',
    "seed huge": b'{"inputs": [' + dumps(FLAT) + b'], "seed": 1' + b"0" * 400 + b"}",
    "seed string": dumps({"inputs": [FLAT], "seed": "7"}),
    "unknown field": dumps({"inputs": [FLAT], "samples": 3}),
    "unknown field true": dumps({"inputs": [FLAT], "flag": True}),
    "key named true": dumps({"inputs": [FLAT], "true": 1}),
    "unknown score": dumps({"inputs": [FLAT], "score": "entropy"}),
    "array body": b"[1, 2]",
    "string body": b'"hello"',
    "null body": b"null",
    "not JSON": b"inputs=0.5",
    "truncated": b'{"inputs": [[0.5, 0.5',
    "blank": b"   ",
    "invalid UTF-8": b'{"inputs": "\xff"}',
    "lone surrogate": b'{"inputs": [[0.5]], "x": "\\ud800"}',
    "deep": b"[" * 5000 + b"]" * 5000,
    "deep inputs": b'{"inputs": ' + b"[" * 900 + b"]" * 900 + b"}",
}
VALID = {
    "flat",
    "nested",
    "flat and nested",
    "integers",
    "integers nested",
    "edges",
    "explicit nulls",
    "score",
    "duplicate key",
    "whitespace",
    "byte order mark",
    "utf-16",
    "num_samples 3.0",
}


def outcome(model: type[BaseModel], parse: Any, raw: bytes) -> tuple[str, Any]:
    """("ok", (pixels, other fields)) or ("invalid", errors) or ("not JSON", error)."""
    try:
        value = parse(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        return "not JSON", (type(exc), str(exc))
    try:
        request = model.model_validate(value)
    except ValidationError as exc:
        return "invalid", exc.errors(include_url=False, include_input=False)
    fields = request.model_dump(exclude={"inputs"})
    return "ok", (request.raw.tobytes(), request.raw.shape, fields)  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", list(BODIES))
@pytest.mark.parametrize("model", [PredictRequest, AnomalyScoreRequest])
def test_fast_path_gives_what_the_per_pixel_path_gives(name: str, model: type[BaseModel]) -> None:
    raw = BODIES[name]
    expected = outcome(model, json.loads, raw)
    assert outcome(model, parse_json_body, raw) == expected
    if name in VALID and model is AnomalyScoreRequest:
        assert expected[0] == "ok", expected


def takes_fast_path(raw: bytes) -> bool:
    """Whether a valid body should take the fast path: UTF-8 JSON that orjson reads (not
    UTF-16, no byte order mark), every image of one form (mixed batches go per pixel)."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    return len({len(image) for image in value["inputs"]}) == 1


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_batches_of_one_form_take_the_fast_path(name: str) -> None:
    raw = BODIES[name]
    value = parse_json_body(raw)
    if not takes_fast_path(raw):
        assert not isinstance(value["inputs"], CheckedInputs)
        return
    assert isinstance(value["inputs"], CheckedInputs)
    reference = np.array(
        [np.asarray(image, dtype=np.float64).reshape(784) for image in json.loads(raw)["inputs"]]
    )
    assert value["inputs"].raw.dtype == np.float32
    np.testing.assert_array_equal(value["inputs"].raw, reference.astype(np.float32))


def test_the_checked_batch_is_not_checked_again() -> None:
    """The models accept a CheckedInputs as it is: its pixels are the request's pixels, and
    only parse_json_body builds one."""
    raw = dumps({"inputs": [FLAT, FLAT]})
    value = parse_json_body(raw)
    checked = value["inputs"]
    assert isinstance(checked, CheckedInputs)
    request = PredictRequest.model_validate(value)
    assert request.inputs is checked
    assert request.raw is checked.raw
    assert len(request.inputs) == 2


# --- random bodies: a valid batch, then a few mistakes -------------------------------------

ODD_PIXELS: list[Any] = [
    True,
    False,
    None,
    "0.5",
    "",
    {},
    [],
    [0.5],
    0,
    1,
    2,
    -1,
    1.5,
    -0.25,
    -0.0,
    1e-300,
    1.0000001,
    math.nan,
    math.inf,
    -math.inf,
    10**30,
    2**64,
]


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    n = draw(st.integers(1, 3))
    images: list[Any] = []
    for i in range(n):
        image = DIGITS[i].tolist()
        images.append(
            [image[r * 28 : (r + 1) * 28] for r in range(28)] if draw(st.booleans()) else image
        )
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, n - 1))
        image = images[i]
        if not isinstance(image, list):
            continue
        kind = draw(st.sampled_from(["pixel", "pixel", "length", "row", "image"]))
        if kind == "image":
            images[i] = draw(st.sampled_from(ODD_PIXELS))
            continue
        nested = len(image) == 28 and isinstance(image[0], list)
        target = image[draw(st.integers(0, 27))] if nested else image
        if not isinstance(target, list):
            continue
        if kind == "pixel" and target:
            target[draw(st.integers(0, len(target) - 1))] = draw(st.sampled_from(ODD_PIXELS))
        elif kind == "length":
            if draw(st.booleans()) and target:
                target.pop()
            else:
                target.append(0.5)
        elif nested:
            image[draw(st.integers(0, 27))] = draw(st.sampled_from(ODD_PIXELS))
    body: dict[str, Any] = {"inputs": images}
    extras = {
        "num_samples": st.sampled_from([None, 1, 3, 0, 2.0, "3"]),
        "seed": st.sampled_from([None, 0, 7, -1, 2**63, True]),
        "score": st.sampled_from(["mutual_information", "nope"]),
        "other": st.just(1),
    }
    for key, values in extras.items():
        if draw(st.booleans()):
            body[key] = draw(values)
    return json.dumps(body, allow_nan=True).encode()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies())
def test_random_bodies_fast_path_matches_per_pixel_path(raw: bytes) -> None:
    expected = outcome(AnomalyScoreRequest, json.loads, raw)
    assert outcome(AnomalyScoreRequest, parse_json_body, raw) == expected
    value = parse_json_body(raw)
    if expected[0] == "ok" and takes_fast_path(raw):
        assert isinstance(value["inputs"], CheckedInputs)  # valid: taken fast


# --- over HTTP: the route class changes how the body is read, nothing else ----------------


def image_app(route_class: type[APIRoute]) -> FastAPI:
    """The inference routes' body handling: the request models and the service's error
    handlers, with a handler that answers what it was given."""
    app = FastAPI()
    app.state.repository = _OneModel()
    app.router.route_class = route_class
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(HTTPException, http_error_handler)

    @app.post("/predict")
    async def predict(body: PredictRequest, request: Request) -> dict[str, Any]:
        parsed = await request.json()  # as the route read it: checked whole, or not
        return {
            "checked": isinstance(parsed["inputs"], CheckedInputs),
            "n": len(body.inputs),
            "sum": float(body.raw.astype(np.float64).sum()),
            "seed": body.seed,
        }

    @app.post("/anomaly-score")
    async def anomaly_score(body: AnomalyScoreRequest) -> dict[str, Any]:
        return {"n": len(body.inputs), "score": body.score}

    return app


class _OneModel:
    """A repository of one model whose inputs are :data:`DEFAULT_INPUT`'s (MNIST's)."""

    checkpoint = SimpleNamespace(sha256="default-input")

    def resolve(self, name: str | None = None, version: str | None = None) -> Any:
        return self


@pytest.fixture(scope="module")
def clients() -> Any:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(json_body, "schema_of", lambda ckpt: DEFAULT_INPUT)
        with make_client(image_app(InputBatchRoute)) as fast:
            with make_client(image_app(APIRoute)) as old:
                yield fast, old


@pytest.mark.parametrize("name", list(BODIES))
def test_http_answers_are_those_of_the_per_pixel_path(clients: Any, name: str) -> None:
    fast, old = clients
    for path in ("/predict", "/anomaly-score"):
        kwargs = {"content": BODIES[name], "headers": {"content-type": "application/json"}}
        got, expected = fast.post(path, **kwargs), old.post(path, **kwargs)
        assert got.status_code == expected.status_code, (path, got.text[:300])
        body, reference = got.json(), expected.json()
        if path == "/predict" and got.status_code == 200:
            assert reference["checked"] is False
            assert body.pop("checked") is takes_fast_path(BODIES[name])
            reference.pop("checked")
        assert body == reference


def test_openapi_document_is_unchanged() -> None:
    """The request bodies are documented from the same models, whatever reads them."""
    fast, old = image_app(InputBatchRoute).openapi(), image_app(APIRoute).openapi()
    assert fast == old
    body = fast["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/PredictRequest"}


def test_service_inference_routes_read_bodies_the_fast_way() -> None:
    from service.api.routes import inference

    routes = [r for r in inference.router.routes if isinstance(r, APIRoute)]
    assert {r.path for r in routes} >= {"/predict", "/anomaly-score"}
    assert all(isinstance(r, InputBatchRoute) for r in routes)


# --- other models' inputs: features, uint8 images, RGB images -------------------------------

SCHEMAS = {
    # 13 float features, standardised; the training range only describes the data
    "features": InputSchema.for_convention(
        InputConvention(
            shape=[13],
            value_range=(0.13, 1680.0),
            scale=[0.5] * 13,
            shift=[-1.0] * 13,
            description="13 features",
        )
    ),
    # 8 x 8 uint8 images (the digits of scikit-learn)
    "uint8 images": InputSchema.for_convention(
        InputConvention(shape=[8, 8], dtype="uint8", value_range=(0, 255), scale=1 / 255)
    ),
    # RGB, channels first
    "rgb": InputSchema.for_convention(
        InputConvention(shape=[3, 4, 5], dtype="uint8", value_range=(0, 255), scale=1 / 255)
    ),
}

ODD_VALUES: list[Any] = [
    True,
    None,
    "1",
    [],
    [1.0],
    -1,
    0,
    255,
    255.5,
    256,
    1e6,
    -1e30,
    1e39,
    math.nan,
    math.inf,
    10**30,
]


def _valid(schema: InputSchema, rng: np.random.Generator) -> np.ndarray:
    if schema.checks_range:
        return rng.integers(0, 256, schema.shape).astype(np.float64)
    return np.round(rng.normal(50, 30, schema.shape), 3)


@st.composite
def schema_bodies(draw: st.DrawFn, schema: InputSchema) -> bytes:
    """A valid batch of ``schema``'s examples, flat or nested, then a few mistakes."""
    rng = np.random.default_rng(draw(st.integers(0, 1000)))
    examples: list[Any] = []
    for _ in range(draw(st.integers(1, 3))):
        x = _valid(schema, rng)
        examples.append(x.tolist() if draw(st.booleans()) else x.reshape(-1).tolist())
    for _ in range(draw(st.integers(0, 2))):
        i = draw(st.integers(0, len(examples) - 1))
        kind = draw(st.sampled_from(["value", "value", "length", "replace"]))
        if kind == "replace":
            examples[i] = copy.deepcopy(draw(st.sampled_from(ODD_VALUES)))
            continue
        target = examples[i]  # walk down a random path to a list of numbers or of lists
        while isinstance(target, list) and target and isinstance(target[0], list):
            if draw(st.booleans()):
                break
            target = target[draw(st.integers(0, len(target) - 1))]
        if not isinstance(target, list) or not target:
            continue
        if kind == "value":
            odd = copy.deepcopy(draw(st.sampled_from(ODD_VALUES)))  # never mutate the shared list
            target[draw(st.integers(0, len(target) - 1))] = odd
        elif draw(st.booleans()):
            target.pop()
        else:
            target.append(target[0])
    return json.dumps({"inputs": examples, "seed": 1}, allow_nan=True).encode()


def schema_outcome(schema: InputSchema, parse: Any, raw: bytes) -> tuple[str, Any]:
    with serving(schema):
        return outcome(PredictRequest, parse, raw)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_other_models_fast_path_matches_per_value_path(name: str) -> None:
    schema = SCHEMAS[name]
    seen: set[str] = set()

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(schema_bodies(schema))
    def check(raw: bytes) -> None:
        expected = schema_outcome(schema, json.loads, raw)
        assert schema_outcome(schema, lambda b: parse_json_body(b, schema), raw) == expected
        seen.add(expected[0])
        if expected[0] == "ok":
            inputs = json.loads(raw)["inputs"]
            want = np.array([np.asarray(x, np.float64).reshape(-1) for x in inputs], np.float32)
            np.testing.assert_array_equal(np.frombuffer(expected[1][0], np.float32), want.ravel())
            fast = parse_json_body(raw, schema)["inputs"]
            one_form = len({len(x) for x in inputs}) == 1
            assert isinstance(fast, CheckedInputs) == one_form

    check()
    assert seen == {"ok", "invalid"}


SCHEMA_ERRORS: list[tuple[str, Any, str]] = [
    ("features", [1.0] * 12, "inputs[0] has 12 items; an example is 13 floats"),
    ("features", "x", "inputs[0] must be a list of 13 floats, not str"),
    ("features", [1.0] * 12 + ["2"], "inputs[0][12]: Input should be a valid number"),
    ("features", [1.0] * 12 + [1e39], "inputs[0][12] is 1e+39: values must be finite float32"),
    ("features", [1.0] * 12 + [-1e39], "values must be finite float32 numbers, at most 3.403e+38"),
    ("uint8 images", [0] * 65, "inputs[0] has 65 items; an image is 64 numbers or 8 rows of 8"),
    ("uint8 images", [[0] * 8] * 7, "inputs[0] has 7 items; an image is 64 numbers"),
    ("uint8 images", [[0] * 8] * 7 + [[0] * 9], "inputs[0][7] has 9 values; each of the 8 rows"),
    ("uint8 images", [[0] * 8] * 7 + [None], "inputs[0][7] must be a row of 8 numbers, not None"),
    ("uint8 images", [0] * 63 + [256], "inputs[0][63] is 256.0: pixels must lie in [0, 255]"),
    ("uint8 images", [[0] * 8] * 7 + [[0] * 7 + [-3]], "inputs[0][7][7] is -3.0: pixels must"),
    ("rgb", [0] * 59, "an image is 60 numbers or 3 channels of 4 rows of 5 numbers"),
    ("rgb", [[[0] * 5] * 4] * 2 + [7], "inputs[0][2] must be a channel of 4 rows of 5 numbers"),
    ("rgb", [[[0] * 5] * 4] * 2 + [[[0] * 5] * 3], "inputs[0][2] has 3 items; each of the 3"),
    ("rgb", [[[0] * 5] * 4] * 2 + [[[0] * 5] * 3 + [[0] * 4]], "inputs[0][2][3] has 4 values"),
    ("rgb", [[[0] * 5] * 4] * 2 + [[[0] * 5] * 3 + [[0] * 4 + [999]]], "inputs[0][2][3][4] is 999"),
]


@pytest.mark.parametrize(
    ("name", "example", "message"), SCHEMA_ERRORS, ids=[f"{c[0]}: {c[2]}" for c in SCHEMA_ERRORS]
)
def test_other_models_errors_name_the_example_path_and_problem(
    name: str, example: Any, message: str
) -> None:
    raw = dumps({"inputs": [example]})
    for parse in (json.loads, lambda b: parse_json_body(b, SCHEMAS[name])):
        kind, errors = schema_outcome(SCHEMAS[name], parse, raw)
        assert kind == "invalid"
        loc = errors[0]["loc"]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:])
        line = f"inputs{where}: {errors[0]['msg']}"
        assert message in line, line


def test_features_outside_the_training_range_are_inputs() -> None:
    """A feature's recorded range describes the training data, not what may be sent."""
    schema = SCHEMAS["features"]
    raw = dumps({"inputs": [[-5e6] + [1e30] * 12]})
    assert schema_outcome(schema, json.loads, raw)[0] == "ok"
    assert isinstance(parse_json_body(raw, schema)["inputs"], CheckedInputs)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_made_up_examples_are_valid_and_documented_as_such(name: str) -> None:
    schema = SCHEMAS[name]
    assert np.shape(schema.example) == schema.shape
    assert schema_outcome(schema, json.loads, dumps({"inputs": [schema.example]}))[0] == "ok"
    if name == "features":  # the mean of the training data: the raw input mapped to 0
        assert schema.example == [2.0] * 13 and "mean" in schema.example_source
    else:
        assert np.all(np.asarray(schema.example) == 128)  # the middle of [0, 255]
    item = schema.example_json_schema()
    forms = item.get("oneOf", [item])
    assert forms[0]["maxItems"] == math.prod(schema.shape)
