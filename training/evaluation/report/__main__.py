"""``python -m training.evaluation.report``: render ``report.md`` again from ``results.json``
(every committed report under ``docs/results/`` by default; see the package docstring)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from training.errors import UserError
from training.evaluation.report.sections import REPORT_FILE, RESULTS_FILE, render_markdown
from training.evaluation.results import load_results

REPORTS: Final = Path(__file__).resolve().parents[3] / "docs" / "results"
"""Where the committed reports live: one folder each, ``results.json`` beside ``report.md``."""


def main(argv: Sequence[str] | None = None) -> int:
    """Render ``report.md`` from each ``results.json`` given (default: every committed one),
    beside it or into ``--out``; with ``--check``, write nothing and fail when a report
    differs from what its ``results.json`` renders to. The plots are not redrawn."""
    parser = argparse.ArgumentParser(
        prog="python -m training.evaluation.report",
        description="Render report.md from the results.json of an evaluation (the plots are "
        "not redrawn).",
    )
    parser.add_argument(
        "results",
        type=Path,
        nargs="*",
        help=f"results.json written by apd evaluate (default: every one under {REPORTS})",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="folder for report.md (one results.json only)"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 when a report.md differs from its results.json's rendering",
    )
    args = parser.parse_args(argv)
    files: list[Path] = args.results or sorted(REPORTS.glob(f"*/{RESULTS_FILE}"))
    if args.out is not None and len(files) != 1:
        parser.error("--out takes exactly one results.json")
    if not files:
        parser.error(f"no {RESULTS_FILE} under {REPORTS}")
    stale: list[Path] = []
    for path in files:
        try:
            text = render_markdown(load_results(path))
        except UserError as exc:
            print(f"{parser.prog}: error: {exc}", file=sys.stderr)
            return 2
        out_dir: Path = args.out or path.parent
        report = out_dir / REPORT_FILE
        if args.check:
            if not report.is_file() or report.read_text() != text:
                stale.append(report)
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        report.write_text(text)
        print(f"wrote {report}", file=sys.stderr)
    for report in stale:
        print(f"{report} differs from what its {RESULTS_FILE} renders to", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
