"""The README's example requests: make the files in examples/, and keep the README's answers true.

    python examples/make_examples.py                  # write the request files (committed)
    python examples/make_examples.py --update-readme  # rewrite the README's answers from the
                                                      # shipped model, served by `apd serve`

The files need no training stack: the digit is the first MNIST test image (a 7), which the
service itself carries (``service.codecs.examples.MNIST_TEST_0``); the anomaly example adds the
first character of Omniglot's evaluation alphabets (from ``$APD_DATA_DIR/omniglot``, made the way
the evaluation reads it: inverted to white on black, Lanczos-resized 105 -> 28). Made with NumPy
and Pillow, both in the serve-only install.

* ``digit.json``: ``{"inputs": [the 7 as 28 rows of 28 pixels / 255], "num_samples": 100,
  "seed": 7}`` for ``POST /predict``;
* ``anomaly.json``: the 7 and the Omniglot character, same K and seed, for
  ``POST /anomaly-score``;
* ``digit.png``: the 7 as a 28x28 grey PNG (white on black), for ``POST /predict/image``;
* ``digit-on-white.png``: the 7 as a photo of ink on paper would give it: dark on light,
  112x112, off-centre; the server inverts, crops and centres it as the page does.

``--update-readme`` starts ``apd serve`` on the shipped model (the settings of ``make serve``,
on a free port), runs every request of the README as written (each ``curl`` block followed by
a ``json`` answer block) and writes what the server answered into the answer blocks, rounded
(:func:`shown`). ``tests/test_readme.py`` runs the same requests and compares at that
rounding.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
README = ROOT / "README.md"
DECIMALS = 3  # of every number shown in the README's answers
PIXEL_DECIMALS = 4  # of the pixels in the request files
NUM_SAMPLES, SEED = 100, 7
OMNIGLOT_FILE = "images_evaluation.zip"
README_HOST = "localhost:8000"  # what the README's requests name; replaced by the real one
# A README request: a ```sh block holding one curl command, then a ```json block: its answer.
REQUEST = re.compile(r"```sh\n(curl [^`]*?)\n```\n```json\n(.*?)\n```", re.DOTALL)
UPDATE_HINT = "python examples/make_examples.py --update-readme"


# ---------------------------------------------------------------------------- the files


def mnist_digit() -> np.ndarray:
    """The first MNIST test image (a 7), uint8 28x28, as the service carries it."""
    sys.path.insert(0, str(ROOT))
    from service.codecs.examples import MNIST_TEST_0

    return np.frombuffer(bytes.fromhex(MNIST_TEST_0), dtype=np.uint8).reshape(28, 28)


def omniglot_character(data_dir: Path) -> tuple[np.ndarray, str]:
    """The first character image of Omniglot's evaluation set, uint8 28x28 white on black."""
    from PIL import Image

    path = data_dir / "omniglot" / OMNIGLOT_FILE
    if not path.is_file():
        sys.exit(f"make_examples: {path} not found; set APD_DATA_DIR to the folder with omniglot/")
    with zipfile.ZipFile(path) as z:
        name = sorted(m for m in z.namelist() if m.endswith(".png"))[0]
        with Image.open(io.BytesIO(z.read(name))) as im:
            small = im.convert("L").resize((28, 28), Image.Resampling.LANCZOS)
    return 255 - np.asarray(small, dtype=np.uint8), name


def _rows(image: np.ndarray) -> list[list[float]]:
    return [[round(int(v) / 255, PIXEL_DECIMALS) for v in row] for row in image]


def _request(images: list[np.ndarray]) -> str:
    body = {"inputs": [_rows(x) for x in images], "num_samples": NUM_SAMPLES, "seed": SEED}
    return json.dumps(body, separators=(",", ":")) + "\n"


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG", optimize=True)
    return out.getvalue()


def on_white(digit: np.ndarray) -> np.ndarray:
    """The digit as dark ink on light paper, 4x larger, off-centre, with a grey background."""
    from PIL import Image

    big = np.asarray(Image.fromarray(digit).resize((84, 84), Image.Resampling.BICUBIC))
    page = np.full((112, 112), 235, dtype=np.uint8)
    ink = (235 - (big.astype(np.float32) / 255) * 205).astype(np.uint8)
    page[4:88, 22:106] = ink
    return page


def make_files(data_dir: Path) -> list[Path]:
    digit = mnist_digit()
    character, _ = omniglot_character(data_dir)
    files = {
        "digit.json": _request([digit]).encode(),
        "anomaly.json": _request([digit, character]).encode(),
        "digit.png": _png(digit),
        "digit-on-white.png": _png(on_white(digit)),
    }
    for name, content in files.items():
        (EXAMPLES / name).write_bytes(content)
    return [EXAMPLES / name for name in files]


# ---------------------------------------------------------------------------- the README


@dataclass(frozen=True)
class ReadmeRequest:
    command: str  # as the README shows it
    answer: Any  # the answer the README shows (parsed)
    span: tuple[int, int]  # where the answer block's JSON lies in the README's text


def readme_requests(text: str) -> list[ReadmeRequest]:
    """Every request of the README with the answer it shows."""
    return [
        ReadmeRequest(m.group(1), json.loads(m.group(2)), m.span(2)) for m in REQUEST.finditer(text)
    ]


def shown(value: Any) -> Any:
    """An answer as the README shows it: every float rounded to :data:`DECIMALS` places."""
    if isinstance(value, float):
        return round(value, DECIMALS) + 0.0  # no -0.0
    if isinstance(value, dict):
        return {k: shown(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shown(v) for v in value]
    return value


def format_answer(value: Any, indent: int = 0, width: int = 96) -> str:
    """JSON, one line where it fits in ``width``, else one key or item per line."""
    flat = json.dumps(value, ensure_ascii=False)
    if len(flat) + indent <= width or not isinstance(value, dict | list) or not value:
        return flat
    pad = " " * (indent + 1)
    if isinstance(value, dict):
        items = [
            f"{pad}{json.dumps(k)}: {format_answer(v, indent + 1, width)}" for k, v in value.items()
        ]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    items = [pad + format_answer(v, indent + 1, width) for v in value]
    return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"


def run_request(command: str, base: str) -> Any:
    """Run a README request as written (in the repository's root) against ``base``
    (``127.0.0.1:PORT``); its answer, parsed."""
    assert command.startswith("curl "), command
    real = command.replace(README_HOST, base)
    out = subprocess.run(
        ["bash", "-c", real], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"{command!r} failed ({out.returncode}): {out.stderr.strip()}")
    return json.loads(out.stdout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def served(timeout_s: float = 120.0) -> Iterator[str]:
    """``apd serve`` on the shipped model with ``make serve``'s settings (no APD_* variable
    from this environment), on a free port; yields ``127.0.0.1:PORT`` once ready."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("APD_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "apd_cli", "serve", "--port", str(port)]
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    base = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise RuntimeError(f"apd serve exited {proc.returncode}: {err[-2000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://{base}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            if time.monotonic() > deadline:
                raise RuntimeError(f"apd serve not ready within {timeout_s:g} s")
            time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def update_readme() -> int:
    text = README.read_text()
    requests = readme_requests(text)
    if not requests:
        sys.exit("make_examples: the README shows no request (```sh curl ...``` + ```json```)")
    with served() as base:
        answers = [format_answer(shown(run_request(r.command, base))) for r in requests]
    for r, answer in sorted(zip(requests, answers, strict=True), key=lambda p: -p[0].span[0]):
        text = text[: r.span[0]] + answer + text[r.span[1] :]
    README.write_text(text)
    for r in requests:
        print(f"answered: {shlex.split(r.command)[-1]}")
    print(f"rewrote {len(requests)} answers in {README.relative_to(ROOT)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--update-readme",
        action="store_true",
        help="rewrite the README's answers from the shipped model (starts apd serve)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("APD_DATA_DIR", ROOT / "data")),
        help="the folder with omniglot/ (default: $APD_DATA_DIR, else ./data)",
    )
    args = parser.parse_args(argv)
    if args.update_readme:
        return update_readme()
    for path in make_files(args.data_dir):
        print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
