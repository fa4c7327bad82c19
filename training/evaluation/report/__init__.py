"""Write an evaluation as ``report.md`` + PNG plots + ``results.json`` in one folder.

Every table and figure carries a provenance line: the runs and seeds it came from, the
checkpoint digest, the evaluation seed and the code revision. The figures carry it too,
printed under the plot, so a PNG on its own still says where it came from.

Nothing is filtered: every anomaly row, every attack setting and every active-learning curve
in ``results.json`` appears in the report, and each APD-vs-SGLD anomaly row is marked
against the fidelity target whether it meets it or not.

The report is rendered from ``results.json`` as read back (:func:`load_results` checks it
against :class:`~training.evaluation.results.EvaluationResults`), so after a change to the
wording here a report can be rendered again without re-running the evaluation:

    python -m training.evaluation.report                 # every report under docs/results/
    python -m training.evaluation.report docs/results/fcnn1/results.json [--out DIR]
    python -m training.evaluation.report --check         # render, compare, write nothing

:mod:`~training.evaluation.report.sections` holds the text, :mod:`~.plots` the figures,
``__main__`` the command line; none of them imports torch (the toy figure, drawn from the
trained toy networks, is imported when :func:`write_report` draws it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from training.evaluation.report.plots import (
    plot_active_learning,
    plot_adversarial,
    plot_anomaly,
    plot_recalibration,
    plot_reliability,
)
from training.evaluation.report.sections import (
    REPORT_FILE,
    RESULTS_FILE,
    SCORE_LABELS,
    provenance_line,
    render_markdown,
    toy_source,
)
from training.evaluation.results import load_results

if TYPE_CHECKING:
    from training.evaluation.suite import SuiteResult

__all__ = ["REPORT_FILE", "RESULTS_FILE", "SCORE_LABELS", "render_markdown", "write_report"]


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def _clean_nan(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean_nan(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_clean_nan(v) for v in o]
    return o


def write_report(result: SuiteResult, out_dir: Path) -> Path:
    """Write ``report.md``, the PNGs and ``results.json`` into ``out_dir``; returns the report."""
    from training.evaluation.toy2d import plot_toy

    out_dir.mkdir(parents=True, exist_ok=True)
    results = result.results
    if "classification" in results:
        plot_reliability(results, out_dir / "reliability.png")
    if "calibration" in results:
        plot_recalibration(results, out_dir / "recalibration.png")
    if "anomaly" in results:
        plot_anomaly(results, out_dir / "anomaly_auroc.png")
    if "adversarial" in results:
        for score in ("mutual_information", "predictive_entropy"):
            plot_adversarial(results, out_dir / f"adversarial_{score}.png", score)
    if "active_learning" in results:
        plot_active_learning(results, out_dir / "active_learning.png")
    if result.toy is not None:
        plot_toy(
            result.toy, out_dir / "toy.png", provenance_line(results, source=toy_source(results))
        )
    results_file = out_dir / RESULTS_FILE
    results_file.write_text(
        json.dumps(_clean_nan(results), indent=1, default=_json_default, allow_nan=False) + "\n"
    )
    # read back and checked, so that the report is what results.json renders to; written
    # again as read, so that its keys are in the order of the record types (a record built
    # in another order, e.g. a method's provenance, reads back the same bytes)
    checked = load_results(results_file)
    results_file.write_text(json.dumps(checked, indent=1) + "\n")
    report = out_dir / REPORT_FILE
    report.write_text(render_markdown(checked))
    return report
