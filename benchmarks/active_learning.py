"""Active learning at the paper's protocol: wall time and the paper's claims, checked.

Runs (unless ``--summarize-only``)

    apd evaluate --arch ARCH --runs RUNS --name NAME --reference \\
        --experiments active_learning --threads WORKERS \\
        --al-log OUT/active_learning-curves.jsonl

which logs each finished curve (a run cut short resumes from the log: the curves it holds
under the same settings are not run again, and the wall time adds up the runs) and writes
the reference report ``docs/results/NAME/`` (20 labels, 10 per round, 50 rounds, BALD /
entropy / random, SGLD, online APD and MC-Dropout, 3 seeds: see
:mod:`training.evaluation.active_learning`), then reads its ``results.json`` and checks

* the run's wall time against the budget of one 3-hour session on this CPU;
* at the last round, BALD and predictive entropy beat random acquisition (mean over seeds),
  for every learner;
* the field's reference, at the last round (mean over seeds): SGLD with BALD at 95 % or
  more, and within 1 point of MC-Dropout with BALD; online APD with BALD within 1 point of
  SGLD with BALD;
* from 120 labels on, at every tested label count: SGLD's BALD above its random, and online
  APD's BALD mean within SGLD's BALD seed spread (min-max); for every acquisition, the count
  of tested label counts where online APD's mean lies in SGLD's spread.

Writes ``benchmarks/results/active_learning.json`` and ``active_learning.md``.

    python benchmarks/active_learning.py [--arch lenet5] [--workers 2] [--rounds 50]
        [--summarize-only]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from training.cli import main as apd_main
from training.evaluation.results import CurveSummary, load_results
from training.revision import code_revision

ROOT: Final = Path(__file__).resolve().parents[1]
RESULTS: Final = ROOT / "benchmarks" / "results"
BUDGET_S: Final = 3 * 3600
REFERENCE: Final = 0.95  # SGLD with BALD at the last round (Gal et al.'s BALD: 95 % at 355)
FROM_LABELS: Final = 120


def check(summary: list[CurveSummary]) -> dict[str, Any]:
    """The claims, from the report's per-(learner, acquisition) summaries."""
    by = {(s["learner"], s["acquisition"]): s for s in summary}
    learners = sorted({s["learner"] for s in summary})
    labels = summary[0]["labels"]
    last: dict[str, dict[str, float]] = {
        learner: {acq: by[learner, acq]["mean"][-1] for (lr, acq) in by if lr == learner}
        for learner in learners
    }
    beats = {
        learner: {
            acq: last[learner][acq] > last[learner]["random"]
            for acq in ("bald", "entropy")
            if acq in last[learner] and "random" in last[learner]
        }
        for learner in learners
    }
    within: dict[str, dict[str, int]] = {}
    for (learner, acq), s in by.items():
        if learner != "apd" or ("sgld", acq) not in by:
            continue
        ref = by["sgld", acq]
        inside = sum(
            lo <= mu <= hi for mu, lo, hi in zip(s["mean"], ref["min"], ref["max"], strict=True)
        )
        within[acq] = {"points": len(s["mean"]), "inside_sgld_spread": inside}
    later = [i for i, n in enumerate(labels) if n >= FROM_LABELS]
    targets: list[dict[str, Any]] = []

    def target(text: str, met: bool) -> None:
        targets.append({"claim": text, "met": bool(met)})

    sgld_bald = last.get("sgld", {}).get("bald")
    if sgld_bald is not None:
        target(
            f"SGLD with BALD >= {100 * REFERENCE:.0f} % at the last round", sgld_bald >= REFERENCE
        )
        if ("sgld", "random") in by:
            b, r = by["sgld", "bald"]["mean"], by["sgld", "random"]["mean"]
            target(
                f"SGLD's BALD above its random at every tested count from {FROM_LABELS} labels",
                all(b[i] > r[i] for i in later),
            )
        if "bald" in last.get("dropout", {}):
            target(
                "SGLD with BALD within 1 point of MC-Dropout with BALD at the last round",
                sgld_bald >= last["dropout"]["bald"] - 0.01,
            )
        if "bald" in last.get("apd", {}):
            target(
                "online APD with BALD within 1 point of SGLD with BALD at the last round",
                abs(last["apd"]["bald"] - sgld_bald) <= 0.01,
            )
            a, ref = by["apd", "bald"], by["sgld", "bald"]
            target(
                f"online APD's BALD within SGLD's BALD seed spread from {FROM_LABELS} labels",
                all(ref["min"][i] <= a["mean"][i] <= ref["max"][i] for i in later),
            )
    return {
        "labels": labels[-1],
        "last_round_mean_accuracy": last,
        "beats_random": beats,
        "apd_within_sgld_spread": within,
        "targets": targets,
    }


def markdown(r: dict[str, Any]) -> str:
    ok = {True: "met", False: "NOT met"}
    c = r["claims"]
    lines = [
        "# Active learning at the paper's protocol",
        "",
        f"Recorded {r['created_at']} by `{r['command']}`, code {r['code_revision'][:12]}; "
        f"report [{r['report']}]({os.path.relpath(ROOT / r['report'], RESULTS)}/report.md). "
        + (
            "1-minute load average: start {start}, end {end} (2 cores).".format(**r["load"])
            if r["load"]
            else "Summarised from an existing report (load not recorded here)."
        ),
        "",
        f"- Wall time of the run ({r['rounds']} rounds; the protocol: 50): "
        f"{r['seconds'] / 60:.1f} min, budget one session ({BUDGET_S / 3600:.0f} h) for 50 "
        "rounds: "
        + (f"**{ok[r['seconds'] <= BUDGET_S]}**" if r["rounds"] >= 50 else "not measured"),
        "",
        f"Test accuracy at {c['labels']} labels, mean over seeds:",
        "",
        "| learner | " + " | ".join(next(iter(c["last_round_mean_accuracy"].values()))) + " |",
        "|---|" + "---|" * len(next(iter(c["last_round_mean_accuracy"].values()))),
    ]
    for learner, accs in c["last_round_mean_accuracy"].items():
        cells = " | ".join(f"{100 * a:.2f} %" for a in accs.values())
        lines.append(f"| {learner} | {cells} |")
    lines += ["", "Claims:", ""]
    for learner, beats in c["beats_random"].items():
        for acq, met in beats.items():
            lines.append(f"- {learner}: {acq} beats random at the last round: **{ok[met]}**")
    for t in c.get("targets", []):
        lines.append(f"- {t['claim']}: **{ok[t['met']]}**")
    for acq, w in c["apd_within_sgld_spread"].items():
        lines.append(
            f"- online APD within SGLD's seed spread ({acq}): {w['inside_sgld_spread']} of "
            f"{w['points']} tested label counts"
        )
    return "\n".join([*lines, ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="lenet5")
    ap.add_argument("--name", default=None, help="report name (default ARCH-active-learning)")
    ap.add_argument("--runs", type=Path, default=Path("runs"))
    ap.add_argument("--workers", type=int, default=2, help="processes of one thread each")
    ap.add_argument("--rounds", type=int, default=50, help="acquisition rounds (the paper: 50)")
    ap.add_argument(
        "--summarize-only", action="store_true", help="read the existing report, run nothing"
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    name = args.name or f"{args.arch}-active-learning"
    report = Path("docs") / "results" / name
    load: dict[str, float] = {}
    if not args.summarize_only:
        load["start"] = round(os.getloadavg()[0], 2)
        args.runs.mkdir(parents=True, exist_ok=True)
        argv = ["evaluate", "--arch", args.arch, "--runs", str(args.runs), "--name", name]
        argv += ["--reference", "--experiments", "active_learning", "--al-rounds", str(args.rounds)]
        # relative to the working directory, so that the report's command reads as typed
        argv += ["--al-log", os.path.relpath(args.out / "active_learning-curves.jsonl")]
        if apd_main([*argv, "--threads", str(args.workers)]) != 0:
            raise SystemExit("apd evaluate failed")
        load["end"] = round(os.getloadavg()[0], 2)
    results = load_results(ROOT / report / "results.json")
    al = results["active_learning"]
    record = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "benchmarks/active_learning.py", *sys.argv[1:]]),
        "code_revision": code_revision(),
        "report": str(report),
        "report_command": results["meta"]["command"],
        "report_code_revision": results["meta"]["code_revision"],
        "machine": results["meta"]["machine"],
        "load": load,
        "seconds": al["seconds"],
        "rounds": al["settings"]["rounds"],
        "claims": check(al["summary"]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "active_learning.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "active_learning.md").write_text(markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    main()
