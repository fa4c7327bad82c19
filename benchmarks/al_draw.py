"""How greedy the power batch rule is, round by round, for each active-learning learner.

Power acquisition (Kirsch et al. 2023) draws a round's batch from ``p(x) ~ score(x) ^ beta``
over the candidates; how far that is from random depends on the exponent *and* on the
shape of the learner's scores. This benchmark runs one protocol curve per learner (BALD,
the protocol's settings, one seed) and records, every round, the BALD scores' median and
maximum over the candidates and the perplexity ``exp H[p]`` of the power draw at several
exponents: 1 = the batch is one candidate's, the number of candidates = random. The
learners' curves acquire exactly as the report's do (the recording wraps ``draw``).

Writes ``benchmarks/results/al_draw.{json,md,png}`` (``al_draw-TAG.*`` with ``--tag``).

    python benchmarks/al_draw.py [--learners sgld apd] [--seed 0] [--rounds 50]
        [--exponents 4 6 8] [--test 2000] [--tag TAG]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shlex
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from numpy.typing import NDArray
from scipy.special import softmax
from scipy.stats import entropy

from apd.networks import MNIST_INPUT_SHAPE, get_spec
from training.evaluation import acquisition
from training.evaluation.acquisition import Acquisition, draw
from training.evaluation.active_learning import (
    ActiveLearningSettings,
    Learner,
    dropout_spec,
    run_curve,
)
from training.mnist import load_mnist
from training.revision import code_revision

RESULTS: Final = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
WINDOW: Final = 10  # rounds per row of the summary table


def draw_perplexity(scores: NDArray[np.float64], exponent: float) -> float:
    """``exp H[p]`` of the power draw's first pick, ``p ~ scores ** exponent``."""
    with np.errstate(divide="ignore"):
        p = softmax(exponent * np.log(np.maximum(scores, 0.0)))
    return float(np.exp(entropy(p)))


def _curve(job: tuple[str, int, int, int, tuple[float, ...]]) -> dict[str, Any]:
    learner_name, seed, rounds, test, exponents = job
    torch.set_num_threads(1)
    learner = Learner(learner_name)
    rows: list[dict[str, Any]] = []

    def recording_draw(scores: NDArray[np.float64], *args: Any) -> NDArray[np.int64]:
        rows.append(
            {
                "median": float(np.median(scores)),
                "max": float(scores.max()),
                "perplexity": {str(b): draw_perplexity(scores, b) for b in exponents},
            }
        )
        return draw(scores, *args)

    acquisition.draw = recording_draw  # type: ignore[assignment]
    data = load_mnist()
    test_idx = np.random.default_rng(0).choice(len(data.test_x), test, replace=False)
    s = replace(ActiveLearningSettings(), rounds=rounds)
    spec = get_spec("lenet5")
    if learner is Learner.DROPOUT:
        spec = dropout_spec(spec, s, MNIST_INPUT_SHAPE)
    curve = run_curve(
        spec,
        np.asarray(data.train_x),
        np.asarray(data.train_y),
        np.asarray(data.test_x)[test_idx],
        np.asarray(data.test_y)[test_idx],
        learner,
        Acquisition.BALD,
        seed,
        s,
    )
    return {"learner": learner_name, "curve": curve, "rounds": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--learners", nargs="+", default=["sgld", "apd"], choices=list(Learner))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--exponents", type=float, nargs="+", default=[4.0, 6.0, 8.0])
    ap.add_argument("--test", type=int, default=2000, help="random test images scored")
    ap.add_argument("--tag", default=None, help="write al_draw-TAG.* instead of al_draw.*")
    args = ap.parse_args()
    if args.rounds < 1 or args.test < 1 or min(args.exponents) <= 0:
        ap.error("--rounds, --test and --exponents must be positive")
    load_start = round(os.getloadavg()[0], 2)
    revision = code_revision()
    exponents = tuple(args.exponents)
    jobs = [(name, args.seed, args.rounds, args.test, exponents) for name in args.learners]
    with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
        learners = pool.map(_curve, jobs)
    settings = replace(ActiveLearningSettings(), rounds=args.rounds).to_dict()
    out = RESULTS / ("al_draw" if args.tag is None else f"al_draw-{args.tag}")
    record = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "benchmarks/al_draw.py", *sys.argv[1:]]),
        "code_revision": revision,
        "load_average_1min": {"start": load_start, "end": round(os.getloadavg()[0], 2)},
        "seed": args.seed,
        "test_images": args.test,
        "exponents": list(exponents),
        "settings": settings,
        "learners": learners,
        "figure": out.with_suffix(".png").name,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(record))
    plot(record, out.with_suffix(".png"))
    print(markdown(record))


def _windows(record: dict[str, Any]) -> list[tuple[int, int]]:
    n = min(len(x["rounds"]) for x in record["learners"])
    return [(lo, min(lo + WINDOW, n)) for lo in range(0, n, WINDOW)]


def _geomean(values: list[float]) -> float:
    return float(np.exp(np.mean(np.log(values))))


def markdown(r: dict[str, Any]) -> str:
    exps = [str(b) for b in r["exponents"]]  # the JSON's keys
    windows = _windows(r)
    head = " | ".join(f"rounds {lo}-{hi - 1}" for lo, hi in windows)
    lines = [
        "# Power acquisition: how greedy each learner's draw is",
        "",
        f"Recorded {r['created_at']} by `{r['command']}`, code {r['code_revision'][:12]}; "
        f"one process of one thread per learner, 1-minute load average "
        f"{r['load_average_1min']['start']} -> {r['load_average_1min']['end']} (2 cores).",
        "",
        f"One BALD curve per learner, seed {r['seed']}, the protocol's settings (batch rule "
        f"{r['settings']['batch_rule']}, exponent {r['settings'].get('power_exponent', '-')}) "
        f"over {r['settings']['candidates']:,} candidates a round. Perplexity of the power "
        "draw ``p ~ BALD ** beta`` (geometric mean over the rounds; 1 = one candidate, "
        f"{r['settings']['candidates']:,} = random), and the BALD scores' median (mean over "
        "the rounds, nats):",
        "",
        f"| learner | | {head} |",
        "|---|---|" + "---|" * len(windows),
    ]
    for x in r["learners"]:
        rows = x["rounds"]
        for b in exps:
            cells = " | ".join(
                f"{_geomean([q['perplexity'][b] for q in rows[lo:hi]]):.0f}" for lo, hi in windows
            )
            lines.append(f"| {x['learner']} | perplexity, beta {b} | {cells} |")
        cells = " | ".join(
            f"{np.mean([q['median'] for q in rows[lo:hi]]):.3f}" for lo, hi in windows
        )
        lines.append(f"| {x['learner']} | median BALD | {cells} |")
    lines += [
        "",
        f"Test accuracy of these curves ({r['test_images']:,} random test images): "
        + "; ".join(
            f"{x['learner']} "
            + ", ".join(
                f"{n}: {100 * a:.1f} %"
                for n, a in zip(x["curve"]["labels"], x["curve"]["accuracy"], strict=True)
            )
            for x in r["learners"]
        )
        + ".",
        "",
        f"![perplexity by round]({r['figure']})",
        "",
    ]
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    styles = ["-", "--", ":", "-."]
    for i, x in enumerate(r["learners"]):
        color = f"C{i}"
        for j, b in enumerate(str(e) for e in r["exponents"]):
            ax.plot(
                [q["perplexity"][b] for q in x["rounds"]],
                styles[j % len(styles)],
                color=color,
                label=f"{x['learner']}, beta {b}",
            )
        bx.plot([q["median"] for q in x["rounds"]], color=color, label=x["learner"])
    ax.set(yscale="log", xlabel="round", ylabel="perplexity of the power draw")
    bx.set(xlabel="round", ylabel="median BALD over the candidates (nats)")
    ax.legend(fontsize=8)
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
