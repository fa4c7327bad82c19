"""What a request's inputs are: examples of the served model's input shape, in its raw units.

The checkpoint's input convention (:class:`apd.checkpoint.InputConvention`) defines one
example: its ``shape`` (``[D]`` features, ``[H, W]`` or ``[C, H, W]`` images), ``dtype`` and
``value_range``. :class:`InputSchema` turns it into what the service checks and documents:

* an example is a flat list of its ``D`` values, or a list nested to its shape (``28`` rows of
  ``28`` for MNIST); features have one form only;
* its values are JSON numbers, finite, and for images (and any ``uint8`` data) within the
  value range: ``[0, 1]`` for float pixels (``pixel / 255``), ``[0, 255]`` for ``uint8``
  ones. For float features the recorded range only describes the training data: new data may
  lie outside it (that is what anomaly scores are for), so any finite float32 is an input;
* errors name the example and the index path at fault, and what was wrong: the length at
  which level, not a list, not a number (pydantic's own message), non-finite, out of range.

Parsing a batch of 64 MNIST images with ``json.loads`` and checking its 50,000 pixels one
Python object at a time takes about 10 ms, more than the forward it feeds. The inference
routes read their bodies with :func:`parse_json_body` instead (about 2 ms,
``benchmarks/results/json_path.md``): orjson parses, and a well-formed batch is checked whole
with NumPy (:meth:`InputSchema.check_batch`) into :class:`CheckedInputs`, which the request
models accept as it is. Anything that check refuses goes through the per-value validation
(:meth:`InputSchema.validate`), so every error is the one that validation gives.

The request models (:mod:`service.codecs.schemas`) are static, for every checkpoint; they validate
``inputs`` with the schema of the model being served, which the inference routes set for the
request (:func:`serving`). Outside a request it is the default convention's (MNIST).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import cached_property
from typing import Annotated, Any, Final, Literal

import numpy as np
import orjson
from numpy.typing import NDArray
from pydantic import Discriminator, Field, JsonValue, StrictFloat, Tag, TypeAdapter, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from apd.checkpoint import Checkpoint, CheckpointMeta, InputConvention
from service.codecs.examples import MNIST_TEST_0, mnist_example

FLOAT32_MAX: Final = float(np.finfo(np.float32).max)
# JSON number and array syntax. Deleting these bytes from a body leaves its keys, strings and
# literals (and exponents' ``e``): a few bytes to search for ``true``/``false``, not 400 kB.
_NUMERIC_BYTES: Final = b"0123456789.,[]+- \t\r\n"
_SIGNIFICANT: Final = 4  # digits of the values of a made-up example


class CheckedInputs(list[Any]):
    """A batch of examples, checked: ``raw``, float32 ``(N, D)`` in the model's raw units, and
    the examples as its rows. The parsed JSON lists are let go (a Python float takes 32 bytes
    in a list, a float32 value 4). Built by :meth:`InputSchema.check_batch` and
    :meth:`InputSchema.validate`; the request models accept one as it is."""

    def __init__(self, raw: NDArray[np.float32]) -> None:
        super().__init__(raw)
        self.raw = raw


def _error(
    kind: str, message: str, loc: tuple[int | str, ...], offending: Any, **ctx: Any
) -> ValidationError:
    return ValidationError.from_exception_data(
        "inputs",
        [
            InitErrorDetails(
                type=PydanticCustomError(kind, message, ctx or None),
                loc=loc,
                input=offending,
            )
        ],
    )


def constant_rows(x: NDArray[np.floating]) -> NDArray[np.intp]:
    """Indices of the examples ``x (N, D)`` whose values are all equal: an image file that
    becomes one (a blank page) is refused by ``/predict/image``, as there is nothing to
    classify; a JSON client's constant example is answered (and a constant grey or white
    image is flagged by the data-support score; a blank MNIST image is not: ``apd.support``)."""
    a = np.asarray(x)
    out: NDArray[np.intp] = np.flatnonzero(a.max(axis=1) == a.min(axis=1))
    return out


def _sized_list(item: Any, n: int, title: str | None = None) -> Any:
    """``list[item]`` of exactly ``n`` items (a type built at run time)."""
    return Annotated[list[item], Field(min_length=n, max_length=n, title=title)]


def _where(loc: Sequence[int]) -> str:
    return "".join(f"[{p}]" for p in loc)


def _round(values: NDArray[np.float64]) -> list[float]:
    return [float(f"{v:.{_SIGNIFICANT}g}") for v in values.tolist()]


@dataclass(frozen=True, eq=False)
class InputSchema:
    """One example of the served model's input (see the module docstring): how it is checked,
    described and documented. ``example`` is a valid example and ``example_source`` says where
    it comes from."""

    convention: InputConvention
    example: list[JsonValue] = field(repr=False)
    example_source: str
    mnist: bool = False  # an MNIST model: image files are laid out as MNIST's digits

    @classmethod
    def of(cls, meta: CheckpointMeta) -> InputSchema:
        """The schema of a checkpoint's inputs (MNIST models: those whose provenance names
        MNIST, as the shipped checkpoint's does)."""
        data = meta.provenance.data
        mnist = data.get("dataset") == "mnist" or "mnist_sha256" in data
        return cls.for_convention(meta.input, mnist=mnist)

    @classmethod
    def for_convention(cls, convention: InputConvention, mnist: bool = False) -> InputSchema:
        """The schema of ``convention``'s inputs, with an example: the first MNIST test image
        for MNIST data; for data the checkpoint keeps no example of, one made up in range:
        for standardised features the training data's mean (the raw input that preprocessing
        maps to 0), else the middle of the value range."""
        c = convention
        if mnist and c.input_dim == 784 and c.image_mode == "L":
            digit: list[JsonValue] = [*bytes.fromhex(MNIST_TEST_0)]
            pixels: list[JsonValue] = [*mnist_example()]
            raw = digit if c.dtype == "uint8" else pixels
            return cls(c, raw, "the first MNIST test image (a 7)", mnist=True)
        lo, hi = c.value_range
        dim = c.input_dim
        scale = np.broadcast_to(np.asarray(c.scale, np.float64), (dim,))
        shift = np.broadcast_to(np.asarray(c.shift, np.float64), (dim,))
        if c.image_mode is None and (shift != 0).any():
            values = np.clip(-shift / scale, lo, hi)
            source = "the training data's mean (the input its preprocessing maps to 0)"
        else:
            values = np.full(dim, (lo + hi) / 2)
            source = "the middle of the value range (the checkpoint keeps no example)"
        if c.dtype == "uint8":
            values = np.round(values)
        example: list[JsonValue] = np.reshape(_round(values), c.shape).tolist()
        return cls(c, example, source)

    # ---- what an example is ----------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.convention.shape)

    @property
    def size(self) -> int:
        """Values in one example (the flat form's length)."""
        return self.convention.input_dim

    @property
    def value_range(self) -> tuple[float, float]:
        lo, hi = self.convention.value_range
        return float(lo), float(hi)

    @property
    def image_mode(self) -> Literal["L", "RGB"] | None:
        """``L`` or ``RGB`` when an image file can stand for an example, else None."""
        return self.convention.image_mode

    @property
    def checks_range(self) -> bool:
        """Whether values outside ``value_range`` are refused: pixels and ``uint8`` data, whose
        range is that of the data type; a float feature's recorded range only describes the
        training data."""
        return self.convention.dtype == "uint8" or self.image_mode is not None

    # ---- words -------------------------------------------------------------------------

    @property
    def _images(self) -> bool:
        return self.image_mode is not None

    @property
    def _kind(self) -> str:
        """The prefix of error types: ``image_shape`` or ``input_shape``, ..."""
        return "image" if self._images else "input"

    @property
    def _noun(self) -> str:
        return "an image" if self._images else "an example"

    @property
    def _values(self) -> str:
        return "pixels" if self._images else "values"

    @property
    def _unit(self) -> str:
        return "floats" if self.convention.dtype == "float32" else "numbers"

    def _level(self, dims: tuple[int, ...]) -> str:
        """The name of a nested list of shape ``dims``: a row of values, a channel of rows."""
        if len(dims) == 1:
            return "row"
        return "channel" if self._images and len(dims) == 2 else "list"

    def _nested(self, dims: tuple[int, ...]) -> str:
        """``(28, 28)`` -> ``28 rows of 28 floats``."""
        if len(dims) == 1:
            return f"{dims[0]} {self._unit}"
        return f"{dims[0]} {self._level(dims[1:])}s of {self._nested(dims[1:])}"

    def _forms(self) -> str:
        """What an example is: ``784 floats or 28 rows of 28 floats``."""
        flat = f"{self.size} {self._unit}"
        return flat if len(self.shape) == 1 else f"{flat} or {self._nested(self.shape)}"

    def _range_text(self) -> str:
        lo, hi = self.value_range
        pixel = self._images and self.convention.dtype == "float32"
        return f"[{lo:g}, {hi:g}]" + (" (pixel / 255)" if pixel and (lo, hi) == (0, 1) else "")

    def describe(self) -> str:
        """One paragraph for the OpenAPI document and ``/v1/model``."""
        what = "Images" if self._images else "Examples"
        shape = "x".join(map(str, self.shape))
        text = f"{what}, each a flat list of {self.size} {self._unit}"
        if len(self.shape) > 1:
            text += f" or a {shape} nested list"
        if self.checks_range:
            text += f", {self._values} in {self._range_text()}"
        else:
            lo, hi = self.value_range
            text += f", in the data's raw units (any finite float; training saw [{lo:g}, {hi:g}])"
        return f"{text}. This model: {self.convention.description}."

    # ---- validation ----------------------------------------------------------------------

    def form(self, example: Any) -> Literal["flat", "nested"] | None:
        """Which form an example takes, so that errors come from that form alone."""
        if not isinstance(example, list):
            return None
        if (
            len(self.shape) > 1
            and len(example) == self.shape[0]
            and any(isinstance(v, list) for v in example)
        ):
            return "nested"
        return "flat" if len(example) == self.size else None

    @cached_property
    def example_type(self) -> Any:
        """One example as a pydantic type: its JSON schema (min and max items at each level,
        the value range) and its type checks (JSON numbers only)."""
        extra: dict[str, JsonValue] | None = None
        if self.checks_range:
            lo, hi = self.value_range
            extra = {"minimum": lo, "maximum": hi}
        value: Any = Annotated[StrictFloat, Field(json_schema_extra=extra)]
        noun = self._noun.split()[1]
        if len(self.shape) == 1:
            return _sized_list(value, self.size, f"{noun.title()} ({self.size} {self._unit})")
        flat = _sized_list(value, self.size, f"Flat {noun} ({self.size} {self._unit})")
        nested = value
        for i, n in enumerate(reversed(self.shape)):
            last = i == len(self.shape) - 1
            shape = "x".join(map(str, self.shape))
            title = f"Nested {noun} ({shape} {self._unit})" if last else None
            nested = _sized_list(nested, n, title)
        return Annotated[
            Annotated[flat, Tag("flat")] | Annotated[nested, Tag("nested")],
            Discriminator(self.form),
        ]

    @cached_property
    def _batch(self) -> TypeAdapter[list[Any]]:
        return TypeAdapter(list[self.example_type])  # type: ignore[name-defined]

    def example_json_schema(self) -> dict[str, Any]:
        """The JSON schema of one example."""
        schema: dict[str, Any] = TypeAdapter(self.example_type).json_schema()
        return schema

    def validate(self, inputs: list[Any]) -> CheckedInputs:
        """A batch checked example by example; raises ``ValidationError`` naming the first
        problem (``loc`` relative to ``inputs``): the structure first (the shape of each
        example), then the types (JSON numbers only: every error of the first example with
        one), then the values."""
        for i, example in enumerate(inputs):
            self._check_structure(i, example)
        for i, example in enumerate(inputs):
            # The errors of the first invalid example only: one of up to max_batch x D
            # wrong values each would be a Python error object (2 s and 40 MB for 200,000).
            try:
                self._batch.validate_python([example])
            except ValidationError:
                self._batch.validate_python(inputs[: i + 1])  # raises, at the example's place
        x = np.empty((len(inputs), self.size), dtype=np.float64)
        for i, example in enumerate(inputs):
            x[i] = np.asarray(example, dtype=np.float64).reshape(self.size)
        self._check_values(inputs, x)
        return CheckedInputs(x.astype(np.float32))

    def _check_structure(self, i: int, example: Any) -> None:
        kind = self._kind
        if not isinstance(example, list):
            raise _error(
                f"{kind}_type",
                "inputs[{index}] must be a list of {forms}, not {got}",
                (i,),
                example,
                index=i,
                forms=self._forms(),
                got=type(example).__name__,
            )
        form = self.form(example)
        if form == "nested":
            self._check_nested(example, self.shape, (i,))
        elif form is None:
            raise _error(
                f"{kind}_shape",
                "inputs[{index}] has {n} items; {noun} is {forms}",
                (i,),
                example,
                index=i,
                n=len(example),
                noun=self._noun,
                forms=self._forms(),
            )

    def _check_nested(self, value: list[Any], dims: tuple[int, ...], loc: tuple[int, ...]) -> None:
        """``value``, a list of ``dims[0]`` items, holds lists of ``dims[1]`` items, each of
        which (and so on down) holds what ``dims[1:]`` says; the numbers are pydantic's."""
        if len(dims) == 1:
            return
        sub = dims[1:]
        level = self._level(sub)
        for j, item in enumerate(value):
            here = (*loc, j)
            if not isinstance(item, list):
                raise _error(
                    f"{self._kind}_shape",
                    "inputs{where} must be a {level} of {nested}, not {got}",
                    here,
                    item,
                    where=_where(here),
                    level=level,
                    nested=self._nested(sub),
                    got=type(item).__name__,
                )
            if len(item) != sub[0]:
                raise _error(
                    f"{self._kind}_shape",
                    "inputs{where} has {n} {what}; each of the {count} {level}s needs {need}",
                    here,
                    item,
                    where=_where(here),
                    n=len(item),
                    what="values" if len(sub) == 1 else "items",
                    count=dims[0],
                    level=level,
                    need=sub[0],
                )
            self._check_nested(item, sub, here)

    @property
    def integral(self) -> bool:
        """Whether values must be whole numbers: ``uint8`` data (integer grey levels)."""
        return self.convention.dtype == "uint8"

    def _check_values(self, inputs: list[Any], x: NDArray[np.float64]) -> None:
        finite = np.isfinite(x)
        if self.checks_range:
            lo, hi = self.value_range
            bad = ~finite | (x < lo) | (x > hi)
        else:
            bad = ~finite | (np.abs(x) > FLOAT32_MAX)
        if self.integral:
            bad |= finite & (x != np.round(x))
        if not bad.any():
            return
        i, p = (int(v) for v in np.argwhere(bad)[0])
        index = np.unravel_index(p, self.shape) if self.form(inputs[i]) == "nested" else (p,)
        loc = (i, *(int(v) for v in index))
        value = float(x[i, p])
        total = int(bad.sum())
        if not finite[i, p]:
            raise _error(
                "finite_number",
                "inputs{where} is {value}: {values} must be finite numbers "
                "({total} bad value(s) in this request)",
                loc,
                value,
                where=_where(loc),
                value=str(value),
                values=self._values,
                total=total,
            )
        if self.checks_range:
            whole = self.integral and self.value_range[0] <= value <= self.value_range[1]
            rule = (
                "are whole numbers in {range} (uint8, e.g. grey levels 0-255, not pixel / 255)"
                if whole
                else "must lie in {range}"
            )
            raise _error(
                "integer_value" if whole else "pixel_range" if self._images else "value_range",
                "inputs{where} is {value}: "
                + ("this model's " if whole else "")
                + "{values} "
                + rule
                + " ({total} bad value(s) in this request)",
                loc,
                value,
                where=_where(loc),
                value=value,
                values=self._values,
                range=self._range_text(),
                total=total,
            )
        raise _error(
            "float32_range",
            "inputs{where} is {value}: values must be finite float32 numbers, at most "
            "{limit} in magnitude ({total} bad value(s) in this request)",
            loc,
            value,
            where=_where(loc),
            value=value,
            limit=f"{FLOAT32_MAX:.4g}",
            total=total,
        )

    def check_batch(self, inputs: Any) -> CheckedInputs | None:
        """``inputs`` as :class:`CheckedInputs` if it is a non-empty list of examples of one
        form (all flat or all nested) whose values are numbers that :meth:`validate` accepts;
        else None (then :meth:`validate` says what is wrong). ``None`` or a string among the
        values gives an object or string array, ragged examples a ValueError: all refused.
        The caller must refuse ``true``/``false``, which NumPy reads as 1.0/0.0."""
        if not isinstance(inputs, list) or not inputs:
            return None
        try:
            batch = np.array(inputs)
        except (ValueError, TypeError, OverflowError, RecursionError):
            return None
        if batch.dtype.kind not in "iuf" or batch.shape[1:] not in (self.shape, (self.size,)):
            return None
        x = batch.reshape(len(inputs), self.size)
        if self.checks_range:
            lo, hi = self.value_range
            ok = bool(x.min() >= lo and x.max() <= hi)  # False for NaN too
        else:
            ok = bool(np.abs(x).max() <= FLOAT32_MAX)  # False for NaN too
        if ok and self.integral:
            ok = bool((x == np.round(x)).all())
        return CheckedInputs(x.astype(np.float32)) if ok else None

    # ---- image files -------------------------------------------------------------------

    def image_to_raw(self, data: bytes) -> NDArray[np.float32]:
        """An image file -> one example, flat, float32 in the model's raw units: for MNIST
        models laid out as MNIST's digits (:func:`service.codecs.images.mnist_input`: a light
        background inverted, the strokes cropped and centred), for others the checkpoint's
        :meth:`~apd.checkpoint.InputConvention.image_to_raw`. ``ValueError`` for what is not a
        readable image."""
        if self.mnist:
            from service.codecs.images import mnist_input

            raw = mnist_input(data)
            return raw if self.convention.dtype == "float32" else np.round(raw * 255)
        raw = self.convention.image_to_raw(data)
        return np.asarray(raw, dtype=np.float32).reshape(self.size)


DEFAULT_INPUT: Final = InputSchema.for_convention(InputConvention(), mnist=True)
_SERVED: ContextVar[InputSchema | None] = ContextVar("served_input", default=None)


def served_input() -> InputSchema:
    """The input schema that request models validate with: the served model's during a
    request to an inference route, else the default convention's (MNIST)."""
    return _SERVED.get() or DEFAULT_INPUT


@contextmanager
def serving(schema: InputSchema) -> Iterator[None]:
    """Validate request models with ``schema`` inside this block."""
    token = _SERVED.set(schema)
    try:
        yield
    finally:
        _SERVED.reset(token)


def _may_hold_bool(raw: bytes) -> bool:
    """Whether a JSON ``true``/``false`` literal may occur in ``raw`` (never a false "no")."""
    rest = raw.translate(None, _NUMERIC_BYTES)
    return b"true" in rest or b"false" in rest


def parse_json_body(raw: bytes, schema: InputSchema | None = None) -> Any:
    """The JSON value of a request body, with its ``inputs`` checked whole when they are valid
    examples of ``schema`` (default: :func:`served_input`).

    orjson parses; valid ``inputs`` become :class:`CheckedInputs`. Any other body is parsed
    again by Python's parser, whose answer is the contract (orjson reads integers past 2**64
    as floats, refuses ``NaN``/``Infinity`` and byte order marks): its error is FastAPI's 422
    ``json_invalid``, and its value goes to the request model's per-value validation, which
    says which example and value is wrong, and how. A body holding ``true`` or ``false``
    anywhere also goes that way (NumPy would read them as numbers; no valid request holds one).
    """
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)
    if isinstance(value, dict) and not _may_hold_bool(raw):
        checked = (schema or served_input()).check_batch(value.get("inputs"))
        if checked is not None:
            value["inputs"] = checked
            return value
    return json.loads(raw)


_SCHEMAS: dict[str, InputSchema] = {}


def schema_of(ckpt: Checkpoint) -> InputSchema:
    """The input schema of a served checkpoint (made once per checkpoint)."""
    schema = _SCHEMAS.get(ckpt.sha256)
    if schema is None:
        if len(_SCHEMAS) >= 256:
            _SCHEMAS.clear()
        schema = _SCHEMAS[ckpt.sha256] = InputSchema.of(ckpt.meta)
    return schema


def named_model(raw: bytes) -> tuple[str | None, str | None]:
    """The ``"model"`` and ``"version"`` a JSON body names (strings; None where absent or not
    a string, which the request model then refuses). Parsed only when the body holds either
    key's name, so a body that names no model costs one byte search."""
    if b'"model"' not in raw and b'"version"' not in raw:
        return None, None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(value, dict):
        return None, None
    name, version = value.get("model"), value.get("version")
    return (
        name if isinstance(name, str) and name else None,
        version if isinstance(version, str) and version else None,
    )
