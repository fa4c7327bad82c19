"""Parse and validate a ``/predict`` body: the per-pixel path against the NumPy fast path.

Both paths run in this process on the same bytes, interleaved, at the same revision:

* old: ``json.loads`` then :class:`service.codecs.schemas.PredictRequest` validation of every pixel
  (what FastAPI did with the body before, and what the service still does to name an error);
* new: :func:`service.codecs.inputs.parse_json_body` (orjson, the batch checked whole with NumPy)
  then the same model, which accepts the checked batch as it is.

The bodies are batches of MNIST-style digits (the API example's digit, shifted), pixels
``p / 255`` written in full (``repr``, as ``json.dumps(x / 255)`` sends them) or to 3
decimals, flat (784 floats) or nested (28 rows of 28). Both paths must give the same float32
pixels. One more body has a pixel out of range in its last image: the new path parses it
twice (orjson, then Python's parser for the per-pixel errors), which this row prices.
Results go to ``benchmarks/results/json_path.md`` (and ``.json``).

Run: ``python benchmarks/json_path.py`` (``--help`` for options); a few seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydantic import ValidationError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.codecs.examples import MNIST_TEST_0  # noqa: E402
from service.codecs.inputs import CheckedInputs, parse_json_body  # noqa: E402
from service.codecs.schemas import PredictRequest  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def digits(n: int) -> NDArray[np.float64]:
    """``n`` digits in [0, 1]: the example 7 shifted by up to 3 pixels each way."""
    base = np.frombuffer(bytes.fromhex(MNIST_TEST_0), dtype=np.uint8).reshape(28, 28)
    rng = np.random.default_rng(0)
    out = np.empty((n, 28, 28))
    for i in range(n):
        dy, dx = rng.integers(-3, 4, size=2)
        out[i] = np.roll(base, (int(dy), int(dx)), axis=(0, 1)) / 255.0
    return out


def body(images: NDArray[np.float64], decimals: int | None, nested: bool) -> bytes:
    x = images if decimals is None else np.round(images, decimals)
    inputs = x.tolist() if nested else x.reshape(len(x), 784).tolist()
    return json.dumps({"inputs": inputs, "num_samples": 100, "seed": 7}).encode()


def old_path(raw: bytes) -> PredictRequest | None:
    try:
        return PredictRequest.model_validate(json.loads(raw))
    except ValidationError:
        return None


def new_path(raw: bytes) -> PredictRequest | None:
    try:
        return PredictRequest.model_validate(parse_json_body(raw))
    except ValidationError:
        return None


def time_ms(fn: Callable[[bytes], Any], raw: bytes, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(raw)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def revision() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "service", "benchmarks/json_path.py")
    return rev + (" + uncommitted changes to service/" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=30, help="timed runs per path and body")
    parser.add_argument("--rounds", type=int, default=5, help="old/new interleavings")
    parser.add_argument("--out", type=Path, default=RESULTS / "json_path")
    args = parser.parse_args(argv)

    images = digits(args.batch)
    bad = images.copy()
    bad[-1, 27, 27] = 1.5
    cases = [
        (decimals, nested, images, "200") for decimals in (None, 3) for nested in (False, True)
    ]
    cases.append((None, False, bad, "422"))
    rows = []
    for decimals, nested, batch, answer in cases:
        raw = body(batch, decimals, nested)
        old, new = old_path(raw), new_path(raw)
        if answer == "200":
            assert old is not None and new is not None
            np.testing.assert_array_equal(old.raw, new.raw)
            fast = parse_json_body(raw)["inputs"]
            assert isinstance(fast, CheckedInputs), "fast path not taken"
        else:
            assert old is None and new is None
        old_ms: list[float] = []
        new_ms: list[float] = []
        for _ in range(args.rounds):  # interleaved, so drift hits both alike
            old_ms += time_ms(old_path, raw, args.repeat)
            new_ms += time_ms(new_path, raw, args.repeat)
        o, n = statistics.median(old_ms), statistics.median(new_ms)
        rows.append(
            {
                "pixels": "full repr" if decimals is None else f"{decimals} decimals",
                "form": "nested 28x28" if nested else "flat 784",
                "answer": answer,
                "body_bytes": len(raw),
                "old_ms": round(o, 3),
                "new_ms": round(n, 3),
                "new_over_old": round(n / o, 3),
            }
        )
        print(rows[-1], flush=True)

    command = (
        "python benchmarks/json_path.py"
        + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    )
    meta = {
        "command": command,
        "revision": revision(),
        "batch": args.batch,
        "timed_runs_per_path": args.repeat * args.rounds,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    lines = [
        "# JSON request path: parse + validate a /predict body, old vs new",
        "",
        f"Command: `{command}`; revision {meta['revision']}; Python {meta['python']}, "
        f"{meta['machine']}, load average {meta['load_average_1min']} (shared machine). "
        f"Batch {args.batch}; median of {meta['timed_runs_per_path']} timed runs per path and "
        "body, the two paths interleaved in one process.",
        "",
        "old: `json.loads` + `PredictRequest` validating each pixel (StrictFloat per element); "
        "new: `parse_json_body` (orjson + the batch checked whole with NumPy) + the same "
        "model. Both give the same float32 pixels (checked). The 422 row is a batch with "
        "one pixel out of range: the new path parses it twice, to give the per-pixel "
        "path's error.",
        "",
        "| pixels | form | answer | body bytes | old ms | new ms | new / old |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['pixels']} | {r['form']} | {r['answer']} | {r['body_bytes']} | {r['old_ms']:.2f} | "
        f"{r['new_ms']:.2f} | {r['new_over_old']:.2f} |"
        for r in rows
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
