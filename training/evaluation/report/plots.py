"""The report's figures, drawn with matplotlib from ``results.json``; each carries its
provenance line under the plot, so a PNG on its own still says where it came from."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import numpy as np

from training.evaluation.report.sections import (
    METHOD_COLORS,
    SCORE_LABELS,
    _al_pool,
    _al_source,
    _al_test,
    _scale,
    al_apd_networks,
    provenance_line,
)
from training.evaluation.results import ClassificationRecord, EvaluationResults

# --------------------------------------------------------------------------- plots


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig: Any, path: Path, caption: str) -> None:
    fig.text(0.0, -0.01, caption, fontsize=6.5, ha="left", va="top", wrap=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)


def _reliability_axis(ax: Any, row: ClassificationRecord, title: str) -> None:
    """One reliability diagram: accuracy per confidence bin against the diagonal."""
    rel = row["reliability"]
    edges = np.asarray(rel["edges"])
    centres = (edges[:-1] + edges[1:]) / 2
    acc = np.array([np.nan if v is None else v for v in rel["accuracy"]])
    conf = np.array([np.nan if v is None else v for v in rel["confidence"]])
    width = edges[1] - edges[0]
    ax.bar(centres, np.nan_to_num(acc), width=width * 0.95, color="#1f77b4", label="accuracy")
    ax.plot(conf, acc, "o", color="black", ms=3, label="(confidence, accuracy)")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set_title(f"{title}\nECE {row['ece']:.4f}", fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")


def plot_reliability(results: EvaluationResults, path: Path) -> None:
    plt = _plt()
    rows = results["classification"]["rows"]
    fig, axes = plt.subplots(
        1, len(rows), figsize=(3.0 * len(rows), 3.4), squeeze=False, layout="constrained"
    )
    for ax, row in zip(axes[0], rows, strict=True):
        _reliability_axis(ax, row, results["methods"][row["method"]]["label"])
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle("Reliability diagrams, MNIST test", fontsize=10)
    _finish(fig, path, provenance_line(results))


# The methods whose reliability the recalibration figure shows before and after.
RECALIBRATION_FIGURE: Final = ("ensemble", "sgld", "apd")


def plot_recalibration(results: EvaluationResults, path: Path) -> None:
    """Reliability before (top) and after (bottom) the recalibration map, for the methods of
    :data:`RECALIBRATION_FIGURE` that have one (every recalibrated method when none of them
    has)."""
    plt = _plt()
    mapped = [r for r in results["calibration"]["rows"] if r["after"] is not None]
    rows = [r for r in mapped if r["method"] in RECALIBRATION_FIGURE] or mapped
    if not rows:
        return
    fig, axes = plt.subplots(
        2, len(rows), figsize=(3.0 * len(rows), 6.6), squeeze=False, layout="constrained"
    )
    for col, r in enumerate(rows):
        label = results["methods"][r["method"]]["label"]
        after = r["after"]
        assert after is not None
        _reliability_axis(axes[0][col], r["before"], f"{label}, before")
        _reliability_axis(axes[1][col], after, f"{label}, after ({r['map']} map)")
    for row_axes in axes:
        row_axes[0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle(
        "Reliability before and after the top-label recalibration, MNIST test", fontsize=10
    )
    _finish(fig, path, provenance_line(results, [r["method"] for r in rows]))


def plot_anomaly(results: EvaluationResults, path: Path) -> None:
    plt = _plt()
    an = results["anomaly"]
    scales = an["scales"]
    scores = list(SCORE_LABELS)
    methods = list(results["methods"])
    sets = list(an["ood_size"])
    table = {(r["method"], r["ood_set"], r["scale"], r["score"]): r["auroc"] for r in an["rows"]}
    fig, axes = plt.subplots(
        len(scales),
        len(scores),
        figsize=(4.2 * len(scores), 3.2 * len(scales)),
        squeeze=False,
        layout="constrained",
    )
    width = 0.8 / max(1, len(methods))
    for i, scale in enumerate(scales):
        for j, score in enumerate(scores):
            ax = axes[i][j]
            for k, m in enumerate(methods):
                vals = [table.get((m, s, scale, score)) for s in sets]
                ys = [np.nan if v is None else v for v in vals]
                xs = np.arange(len(sets)) + (k - (len(methods) - 1) / 2) * width
                ax.bar(xs, ys, width=width, color=METHOD_COLORS.get(m), label=m)
            ax.set_xticks(np.arange(len(sets)))
            ax.set_xticklabels(sets, fontsize=7, rotation=20)
            ax.set_ylim(0.0, 1.0)
            ax.axhline(0.5, color="grey", lw=0.8, ls=":")
            ax.set_title(f"{SCORE_LABELS[score]}, OOD scale {_scale(scale)}", fontsize=9)
            if j == 0:
                ax.set_ylabel("AUROC")
    axes[0][0].legend(fontsize=7, ncol=2, loc="lower left")
    fig.suptitle("Anomaly detection AUROC, MNIST test vs each OOD set", fontsize=10)
    _finish(fig, path, provenance_line(results))


def plot_adversarial(results: EvaluationResults, path: Path, score: str) -> None:
    plt = _plt()
    adv = results["adversarial"]
    rows = adv["rows"]
    kinds = adv["settings"]["kinds"]
    settings = ["white-box", adv["settings"]["transfer_source"]]
    methods = list(results["methods"])
    fig, axes = plt.subplots(
        2, 2 * len(kinds), figsize=(4.0 * 2 * len(kinds), 6.6), squeeze=False, layout="constrained"
    )
    for c, (kind, crafted) in enumerate((k, s) for k in kinds for s in settings):
        for r, what in enumerate(("accuracy", score)):
            ax = axes[r][c]
            for m in methods:
                sel = [
                    x
                    for x in rows
                    if x["method"] == m and x["attack"] == kind and x["crafted_on"] == crafted
                ]
                if m == adv["settings"]["transfer_source"] and crafted != "white-box":
                    sel = [
                        x
                        for x in rows
                        if x["method"] == m
                        and x["attack"] == kind
                        and x["crafted_on"] == "white-box"
                    ]
                if not sel:
                    continue
                sel.sort(key=lambda x: x["eps"])
                eps = [0.0] + [x["eps"] for x in sel]
                if what == "accuracy":
                    ys = [sel[0]["clean_accuracy"]] + [x["accuracy"] for x in sel]
                else:
                    aurocs = [x["auroc"][what] for x in sel]
                    ys = [0.5] + [np.nan if a is None else a for a in aurocs]
                ax.plot(eps, ys, "o-", ms=3, color=METHOD_COLORS.get(m), label=m)
            where = "white-box" if crafted == "white-box" else f"transfer from {crafted}"
            ax.set_title(f"{kind.upper()}, {where}", fontsize=9)
            ax.set_xlabel("eps (L-inf, pixels in [0, 1])")
            ax.set_ylabel("accuracy" if what == "accuracy" else f"AUROC by {SCORE_LABELS[what]}")
            ax.set_ylim(0, 1.02)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(
        "Adversarial examples: accuracy (top) and clean-vs-attacked AUROC by "
        f"{SCORE_LABELS[score]} (bottom)",
        fontsize=10,
    )
    _finish(fig, path, provenance_line(results))


def plot_active_learning(results: EvaluationResults, path: Path) -> None:
    plt = _plt()
    al = results["active_learning"]
    summary = al["summary"]
    acqs = al["settings"]["acquisitions"]
    fig, axes = plt.subplots(
        1,
        len(acqs),
        figsize=(4.2 * len(acqs), 3.6),
        squeeze=False,
        sharey=True,
        layout="constrained",
    )
    colors = {k: METHOD_COLORS[k] for k in ("sgld", "apd", "dropout")}
    for ax, acq in zip(axes[0], acqs, strict=True):
        for s in summary:
            if s["acquisition"] != acq:
                continue
            x = s["labels"]
            c = colors.get(s["learner"], "black")
            ax.plot(
                x, s["mean"], "o-", ms=3, color=c, label=f"{s['learner']} (mean of {s['seeds']})"
            )
            ax.fill_between(x, s["min"], s["max"], color=c, alpha=0.2, lw=0)
        ax.set_title(f"acquisition: {acq}", fontsize=9)
        ax.set_xlabel("labelled images")
    axes[0][0].set_ylabel("test accuracy")
    axes[0][0].legend(fontsize=7)
    st = al["settings"]
    caption = (
        f"Band: min-max over seeds {', '.join(str(x) for x in st['seeds'])}. "
        f"Pool {_al_pool(st)}, test on {_al_test(st)}, K={st['num_samples']}, "
        f"T={st['temperature']:g}, online APD {st['gan_steps']} GAN steps per fit"
        + ("" if (k := al_apd_networks(st)) is None else f" and K={k}")
        + ". "
        + provenance_line(results, source=_al_source(results))
    )
    start = "warm start" if st.get("warm_start", False) else "cold start"
    fig.suptitle(f"Active learning on MNIST ({start} every round)", fontsize=10)
    _finish(fig, path, caption)
