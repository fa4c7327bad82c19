"""The README's requests, as written, against the shipped model as `make serve` serves it.

Every ``curl`` block of the README followed by a ``json`` block is run (in the repository's
root, so the files of examples/ are the committed ones) against ``apd serve`` on the shipped
checkpoint, and the answer must be the one shown, at the README's rounding
(``examples/make_examples.py``, which also rewrites the answers when the model changes).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 250


def _load_make_examples() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "make_examples", ROOT / "examples" / "make_examples.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_examples"] = module
    spec.loader.exec_module(module)
    return module


mk = _load_make_examples()


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed: the README's requests are curl commands")
    with mk.served() as address:
        yield address


def test_readme_is_a_front_page() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines; at most {MAX_LINES}"


def test_readme_requests_use_only_shipped_files() -> None:
    requests = mk.readme_requests(README.read_text())
    paths = ["/predict", "/anomaly-score", "/predict/image"]
    assert all(any(f"{mk.README_HOST}{p} " in r.command + " " for r in requests) for p in paths)
    for r in requests:
        for word in r.command.split():
            if "@" in word:  # -d @file, -F files=@file
                name = word.split("@", 1)[1].strip("'\"")
                assert name.startswith("examples/") and (ROOT / name).is_file(), word


def test_every_readme_request_answers_what_the_readme_shows(base: str) -> None:
    requests = mk.readme_requests(README.read_text())
    assert len(requests) >= 4
    wrong = []
    for r in requests:
        got = mk.shown(mk.run_request(r.command, base))
        if got != r.answer:
            wrong.append(
                f"{r.command}\n  README shows: {json.dumps(r.answer)[:600]}\n"
                f"  server says:  {json.dumps(got)[:600]}"
            )
    assert not wrong, (
        "the README's answers are not the shipped model's; if the model changed on purpose, "
        f"run `{mk.UPDATE_HINT}` and commit README.md\n" + "\n".join(wrong)
    )


def test_the_answer_blocks_are_formatted_as_the_update_writes_them() -> None:
    """So that `--update-readme` on an unchanged model leaves README.md as it is."""
    text = README.read_text()
    for r in mk.readme_requests(text):
        assert text[r.span[0] : r.span[1]] == mk.format_answer(r.answer), f"run `{mk.UPDATE_HINT}`"
