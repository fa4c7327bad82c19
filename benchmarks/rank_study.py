"""Why the subspace GAN fails at rank 92, and what makes it train there: every setting tried.

Distils one SGLD run (``--run``) with :func:`training.distillation.offline.distill_offline`
under named settings (``VARIANTS``: rank, basis dtype, code scaling, moment-matched start,
critic size, learning rate, steps, rank schedule), each the default preset with some fields
replaced, and records for each the subspace's share of the samples' variance, the distiller's
own validation figures (KL to the teacher's predictive, accuracy and mutual-information ratio
at the kept step; KL at the last step), the checkpoint tensors' size and the wall time. The
teacher and validation monitor are ``apd distill``'s (100 samples spread over the chains, the
validation split). ``REFERENCES`` are the same figures for generator-free stand-ins in the
same subspace (the training samples' own codes; a Gaussian per component), which bound what a
GAN of that subspace can reach.

The record also keeps ``r92-grow`` (a coarse-to-fine rank schedule, run at code 7e812091):
it did not help and its code was removed, so it is no longer a setting here.

Two distillations run at a time, each on one thread. Each call records the settings it ran
(``--variants``) with its own command, code revision, date and load, and merges them into
``benchmarks/results/rank_study.{json,md}`` (a setting run again replaces its row).

    python benchmarks/rank_study.py --run runs/sgld-fcnn1 --variants r46 r92
    python benchmarks/rank_study.py --run runs/sgld-fcnn1 --references
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch

from apd.checkpoint import BasisDtype
from training.distillation.fidelity import ValidationMonitor
from training.distillation.offline import distill_offline, mode_labels, preset
from training.distillation.subspace import fit_subspace
from training.own_data import DataSpec, load_dataset
from training.revision import code_revision
from training.run_layout import SAMPLES_DIR
from training.sample_store import SampleStore

ROOT: Final = Path(__file__).resolve().parents[1]
RESULTS: Final = ROOT / "benchmarks" / "results"
TEACHER_SAMPLES: Final = 100
TRAIN_SAMPLES: Final = 2000  # the default preset's max_train_samples

# name -> (what it tests, overrides of the default preset, or {"preset": name})
VARIANTS: Final[dict[str, tuple[str, dict[str, Any]]]] = {
    "r46": ("the default (rank 46, float16)", {"rank": 46, "basis_dtype": "float16"}),
    "r92": ("rank 92, int8, rank-46 settings", {"rank": 92, "basis_dtype": "int8"}),
    "r92-shared": (
        "rank 92, one shared scale for all codes",
        {"rank": 92, "basis_dtype": "int8", "code_scaling": "shared"},
    ),
    "r46-shared": (
        "rank 46, float16, one shared scale for all codes",
        {"rank": 46, "basis_dtype": "float16", "code_scaling": "shared"},
    ),
    "r138-shared": (
        "rank 138, int8, one shared scale for all codes",
        {"rank": 138, "basis_dtype": "int8", "code_scaling": "shared"},
    ),
    "r92-moments-shared": (
        "rank 92, moment-matched start and one shared scale",
        {
            "rank": 92,
            "basis_dtype": "int8",
            "moment_init_steps": 2000,
            "code_scaling": "shared",
        },
    ),
    "auto": (
        "--preset auto: rank by variance held (98.8 %), int8, one shared scale",
        {"preset": "auto"},
    ),
}


def _setup(run: Path) -> tuple[SampleStore, np.ndarray, np.ndarray, ValidationMonitor]:
    store = SampleStore.open(run / SAMPLES_DIR)
    data = load_dataset(DataSpec(), None)
    rows = store.select_spread(min(TRAIN_SAMPLES, len(store)))
    teacher_rows = store.select_spread(min(TEACHER_SAMPLES, len(store)))
    teacher = torch.from_numpy(np.asarray(store.theta[teacher_rows]))
    monitor = ValidationMonitor(store.spec, data.val_x, data.val_y, teacher)
    modes = mode_labels(store.chain[rows], store.step[rows], store.meta.get("sampler"))
    return store, rows, modes, monitor


def distil(run: Path, name: str) -> dict[str, Any]:
    """One distillation under setting ``name``: its figures."""
    torch.set_num_threads(1)
    what, overrides = VARIANTS[name]
    store, rows, modes, monitor = _setup(run)
    settings = dict(overrides)
    config = preset(settings.pop("preset", "default"), arch=store.spec.name, **settings)
    t0 = time.perf_counter()
    result = distill_offline(
        store.theta, config, rows=rows, chains=modes, monitor=monitor, progress=False
    )
    seconds = time.perf_counter() - t0
    best = next(h for h in result.history if h["step"] == result.best_step)
    tensors = result.generator.checkpoint_tensors(config.basis_dtype)
    assert result.subspace is not None
    return {
        "name": name,
        "what": what,
        "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
        "config": config.to_dict(),
        "rank": int(result.subspace["rank"]),
        "basis_dtype": config.basis_dtype,
        "explained_variance_ratio": result.subspace["explained_variance_ratio"],
        "best_step": result.best_step,
        "steps": config.steps,
        "val_kl": best["val_kl"],
        "val_accuracy": best["val_accuracy"],
        "val_nll": best["val_nll"],
        "val_mi_ratio": best["val_mi_ratio"],
        "last_val_kl": result.history[-1]["val_kl"],
        "last_val_mi_ratio": result.history[-1]["val_mi_ratio"],
        "history": [
            {k: h[k] for k in ("step", "val_kl", "val_mi_ratio", "val_accuracy")}
            for h in result.history
        ],
        "tensor_bytes": int(sum(t.nbytes for t in tensors.values())),
        "seconds": round(seconds, 1),
        "teacher": monitor.teacher_metrics,
    }


class _Fixed:
    """Networks given in advance, in the shape :class:`ValidationMonitor` draws from."""

    def __init__(self, theta: torch.Tensor) -> None:
        self.theta = theta
        self.scale = torch.zeros(1)
        self.training = False

    def eval(self) -> None:
        pass

    def train(self, mode: bool = True) -> None:
        pass

    def sample(self, k: int, rng: torch.Generator | None = None) -> torch.Tensor:
        return self.theta[:k]


def references(run: Path, ranks: list[int]) -> list[dict[str, Any]]:
    """Generator-free stand-ins per rank (int8 basis above 46, float16 at and below): 100 of
    the training samples' own codes, a diagonal Gaussian per component, and the components'
    means alone; and the spread of the codes within components against the whole."""
    torch.set_num_threads(1)
    store, rows, modes, monitor = _setup(run)
    rng = np.random.default_rng(0)
    out = []
    for rank in ranks:
        dtype: BasisDtype = "float16" if rank <= 46 else "int8"
        sub = fit_subspace(store.theta, rank, rows=rows, basis_dtype=dtype)
        c = sub.coefficients.astype(np.float64)
        comps = np.unique(modes)
        within = np.sqrt(np.mean([c[modes == k].var(0) for k in comps], axis=0))
        basis, mean = torch.from_numpy(sub.basis), torch.from_numpy(sub.mean)
        pick = rng.choice(len(c), TEACHER_SAMPLES, replace=False)
        comp = modes[rng.choice(len(c), TEACHER_SAMPLES)]
        mus = {k: c[modes == k].mean(0) for k in comps}
        sds = {k: c[modes == k].std(0) for k in comps}
        codes = {
            "own codes": c[pick],
            "Gaussian per component": np.stack(
                [mus[k] + sds[k] * rng.standard_normal(rank) for k in comp]
            ),
            "component means": np.stack([mus[k] for k in comp]),
        }
        for what, z in codes.items():
            theta = mean + torch.from_numpy(z).float() @ basis
            m = monitor.evaluate(_Fixed(theta))  # type: ignore[arg-type]
            out.append(
                {
                    "rank": rank,
                    "basis_dtype": dtype,
                    "reference": what,
                    "explained_variance_ratio": sub.explained_variance_ratio,
                    "within_component_std_share_first": float(within[0] / c[:, 0].std()),
                    "within_component_std_share_last": float(within[-1] / c[:, -1].std()),
                    "code_std_first_over_last": float(c[:, 0].std() / c[:, -1].std()),
                    "val_kl": m["val_kl"],
                    "val_accuracy": m["val_accuracy"],
                    "val_mi_ratio": m["val_mi_ratio"],
                }
            )
    return out


def _stamp(args_list: list[str], revision: str) -> dict[str, Any]:
    return {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "benchmarks/rank_study.py", *args_list]),
        "code_revision": revision,
    }


def markdown(record: dict[str, Any]) -> str:
    lines = [
        "# Rank study: training the subspace GAN beyond rank 46",
        "",
        f"Run {record['run']}. Every row carries the command, code revision, date and 1-minute "
        "load average (2 cores, two distillations at a time, one thread each) of the call that "
        "recorded it (`benchmarks/results/rank_study.json`). Validation figures are the "
        "distiller's own: mean KL(teacher || generator) on the MNIST validation split, 100 "
        "networks, at the step kept (lowest KL) and the last step; MI ratio: the generator's "
        "mean mutual information over the teacher's. Size: the checkpoint's tensors.",
        "",
        "| setting | what | rank | basis | variance held | kept step | val KL | val KL, last "
        "| val accuracy | MI ratio | size | wall time | code | recorded (load) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["variants"].values():
        lines.append(
            f"| {r['name']} | {r['what']} | {r['rank']} | {r['basis_dtype']} "
            f"| {100 * r['explained_variance_ratio']:.2f} % | {r['best_step']:,} / "
            f"{r['steps']:,} | {r['val_kl']:.5f} | {r['last_val_kl']:.5f} "
            f"| {100 * r['val_accuracy']:.2f} % | {r['val_mi_ratio']:.2f} "
            f"| {r['tensor_bytes'] / 1e6:.2f} MB | {r['seconds']:.0f} s "
            f"| {r['code_revision'][:8]} | {r['created_at'][:16]} ({r['load']}) |"
        )
    refs = record.get("references")
    if refs:
        lines += [
            "",
            "Generator-free references in the same subspace (recorded "
            f"{refs['created_at']} by `{refs['command']}`, code {refs['code_revision'][:12]}): "
            "100 of the training samples' own codes; a diagonal Gaussian per component (each "
            "component's mean and per-direction std, what the moment-matched start aims at); "
            "the components' means alone. Within/total std: the codes' within-component "
            "standard deviation over their total, in the first and the last direction.",
            "",
            "| rank | basis | variance held | std first / last direction | within / total std, "
            "first / last | stand-in | val KL | val accuracy | MI ratio |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in refs["rows"]:
            lines.append(
                f"| {r['rank']} | {r['basis_dtype']} | {100 * r['explained_variance_ratio']:.2f} "
                f"% | {r['code_std_first_over_last']:.1f} | "
                f"{r['within_component_std_share_first']:.2f} / "
                f"{r['within_component_std_share_last']:.2f} | {r['reference']} "
                f"| {r['val_kl']:.5f} | {100 * r['val_accuracy']:.2f} % | {r['val_mi_ratio']:.2f} |"
            )
    return "\n".join([*lines, ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "sgld-fcnn1")
    ap.add_argument("--variants", nargs="*", default=[], choices=sorted(VARIANTS))
    ap.add_argument(
        "--references",
        type=int,
        nargs="*",
        default=None,
        metavar="RANK",
        help="record the generator-free references at these ranks (none given: 46 92 138 184)",
    )
    args = ap.parse_args()
    if not (args.run / "READY").is_file():
        ap.error(f"--run {args.run}: not a finished SGLD run (no READY file)")
    path = RESULTS / "rank_study.json"

    def recorded() -> dict[str, Any]:
        record: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        if record.get("run") not in (None, str(args.run)):
            ap.error(f"{path} records run {record['run']}; study one run per record")
        return {"run": str(args.run), "variants": {}, **record}

    recorded()
    load_start = round(os.getloadavg()[0], 2)
    revision = code_revision()  # the code that runs, whatever is committed meanwhile
    new: dict[str, Any] = {}
    if args.references is not None:
        ranks = args.references or [46, 92, 138, 184]
        rows = references(args.run, ranks)
        new["references"] = {**_stamp(sys.argv[1:], revision), "rows": rows}
    variants = {}
    if args.variants:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(2, ctx) as pool:
            futures = [pool.submit(distil, args.run, name) for name in args.variants]
            rows = [f.result() for f in futures]
        load = f"{load_start} -> {round(os.getloadavg()[0], 2)}"
        for row in rows:
            variants[row["name"]] = {**row, **_stamp(sys.argv[1:], revision), "load": load}
    # merged into the record as it is now: another call may have written it meanwhile
    record = recorded() | new
    record["variants"] |= variants
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / "rank_study.md").write_text(markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    main()
