"""Are the anomaly rows APD misses at input scale 5 distillation loss, or SGLD-sample noise?

The evaluation's teacher is 100 SGLD samples spread across the run's chains
(:meth:`training.sample_store.SampleStore.select_spread`). This benchmark puts these
predictives beside it on every anomaly row (OOD set x score x input scale 1 and 5, the
evaluation's rows: 10,000 images per OOD set, seed 0; at scale s only the OOD images are
multiplied by s):

* ``sgld_b``: a second draw of 100 samples from the same run, disjoint from the teacher's
  and spread the same way (evenly over each chain's samples that the teacher did not take);
* ``apd_N``: 100 networks drawn from the checkpoint with NumPy seed N, for each N of
  ``--apd-seeds`` (default 0 and 1), as weights (:meth:`apd.checkpoint.Checkpoint.generate`);
* ``served_N`` (``--served``): 100 networks as the service runs them, codes in the factored
  forward (:class:`apd.factored.AffinePosterior`; with residual noise, the local
  reparameterisation of docs/serving.md), NumPy seed N;
* ``proj``: the teacher's own 100 samples projected onto the checkpoint's affine subspace
  (least-squares codes on its stored basis), the best any generator of that subspace can do
  network by network;
* ``proj_b``: the second draw projected the same way, what a perfect generator of that
  subspace would draw (fresh samples, none of the teacher's);
* ``proj_rN`` (``--ranks N ...``): the teacher's samples projected onto the top-N principal
  subspace of all the run's samples, the same construction (float16 basis) with more
  directions (what a bigger checkpoint would hold), and ``proj_rN_int8`` onto the same
  basis rounded to 8 bits per entry (one scale per direction), which holds twice the
  directions of a float16 basis in the same bytes; with ``--bits B ...`` also
  ``proj_rN_bB``: the basis rounded to B bits per entry (2**B uniform levels, one float16
  step per group of 64 entries of a direction: B + 0.25 bits an entry), what a dense basis
  of N directions would need to fit a larger network in a few MB;
* ``kronAxB`` (``--kron A:B ...``, MLPs): the teacher's samples projected onto a structured
  subspace, one per weight matrix ``W (in, out)``: its deviations from the mean restricted
  to ``L C R^T``, ``L`` the top-``A`` eigenvectors of ``sum_s D_s D_s^T`` and ``R`` the
  top-``B`` (at most ``out``) of ``sum_s D_s^T D_s`` over the run's samples (``D_s = W_s -
  mean``), biases kept whole. Such a basis costs ``in A + out B`` numbers per layer where a
  flat direction costs ``in out``: it spans ``A B`` directions of a layer for the bytes of a
  few flat ones (what fits fcNN2 in 8 MB, if the rows survive it);
* ``--residual``: every projection also with residual noise (``_res``): independent
  Gaussian noise per weight with the standard deviation of what the projection leaves out
  of the run's samples, as a checkpoint's residual adds it (NumPy seed 0); ``--residual
  only``: with residual noise only (the design a checkpoint with ``--residual-scales 1``
  serves). For a ``--bits`` basis ``_res`` is the float basis's residual; ``_ownres`` is what
  the rounded basis itself leaves out of the run's samples, the rounding's loss included (what
  a checkpoint fitting its residual after rounding would serve).

``--ood-size N`` takes the first N images of each OOD set and of the MNIST test split (default
all 10,000): the AUROCs of a subset, for a quicker survey of many subspaces.

If the AUROC of ``sgld_b`` differs from the teacher's by as much as APD's does on the rows
APD misses, the miss is within what swapping one set of 100 SGLD samples for another does:
sample noise, not distillation loss. If ``proj`` misses the same rows, the loss is the
subspace's (what it leaves out of the samples), not the generator's, and the ``proj_rN``
rows say how many directions the scaled inputs need. Writes
``benchmarks/results/scale5_noise[-TAG].{json,md}``.

    python benchmarks/scale5_noise.py --run runs/sgld-fcnn1 \\
        --checkpoint models/mnist-fcnn1/model.safetensors
    python benchmarks/scale5_noise.py --run runs/sgld-fcnn2 --ranks 9 \\
        --kron 32:32 64:64 --residual --tag fcnn2-kron      # subspaces only, no checkpoint
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from numpy.typing import NDArray

from apd.checkpoint import BasisDtype, Checkpoint, load_checkpoint
from apd.factored import AffinePosterior, FirstLayer, ForwardPlan
from apd.networks import MLPSpec, NetworkSpec
from apd.uncertainty import ScoreName, summarize
from training.distillation.fidelity import ood_aurocs
from training.distillation.package import sample_networks
from training.distillation.subspace import fit_subspace
from training.evaluation.anomaly import scaled
from training.evaluation.methods import spread_indices
from training.metrics import AUROC_TOLERANCE, accuracy, negative_log_likelihood
from training.mnist import OOD_SETS, load_mnist, load_ood
from training.revision import code_revision
from training.run_layout import SAMPLES_DIR
from training.sample_store import SampleStore
from training.torch_ops import member_probs

ROOT: Final = Path(__file__).resolve().parents[1]
RESULTS: Final = ROOT / "benchmarks" / "results"
K: Final = 100
OOD_SIZE: Final = 10_000
BASES: Final[tuple[tuple[BasisDtype, str], ...]] = (("float16", ""), ("int8", "_int8"))
SCALES: Final = (1.0, 5.0)
SCORES: Final = (
    ScoreName.MAX_PROBABILITY,
    ScoreName.PREDICTIVE_ENTROPY,
    ScoreName.MUTUAL_INFORMATION,
    ScoreName.MODEL_VARIANCE,
)


GROUP: Final = 64  # entries of a direction sharing one scale in the B-bit rounding
# Max (1960), Table: the step of the mean-square-optimal uniform quantizer with 2**B levels
# for a unit Gaussian, B = 1..7
MAX_STEP: Final = {1: 1.596, 2: 0.9957, 3: 0.5860, 4: 0.3352, 5: 0.1881, 6: 0.1041, 7: 0.0568}


def round_bits(basis: NDArray[np.float32], bits: int) -> NDArray[np.float32]:
    """``basis (r, P)`` rounded to ``bits`` per entry: each group of :data:`GROUP` entries of a
    direction on ``2**bits`` mid-rise levels (no level at 0: every code is spent) whose step
    is the group's root mean square times Max's (1960) optimal uniform step for a Gaussian,
    clipped beyond the outer levels; the step stored as float16. Returns float32."""
    r, p = basis.shape
    pad = -p % GROUP
    groups = np.pad(basis, ((0, 0), (0, pad))).reshape(r, -1, GROUP).astype(np.float64)
    half = 2 ** (bits - 1)
    rms = np.sqrt(np.square(groups).mean(axis=2, keepdims=True))
    step = (rms * MAX_STEP[bits]).astype(np.float16).astype(np.float64)
    safe = np.where(step > 0, step, 1.0)
    codes = np.clip(np.floor(groups / safe), -half, half - 1) + 0.5
    return (codes * step).reshape(r, -1)[:, :p].astype(np.float32)


def project(
    offset: NDArray[np.float32], directions: NDArray[np.float32], theta: NDArray[np.float32]
) -> NDArray[np.float32]:
    """``theta (K, P)`` replaced by its nearest points ``offset + c @ directions`` (least
    squares in float64: a stored basis is rounded, so its rows are only nearly orthonormal)."""
    offset64, directions64 = offset.astype(np.float64), directions.astype(np.float64)
    codes, *_ = np.linalg.lstsq(directions64.T, (theta - offset64).T, rcond=None)
    return (offset64 + codes.T @ directions64).astype(np.float32)


def residual_std_of(
    offset: NDArray[np.float32],
    directions: NDArray[np.float32],
    theta: NDArray[np.float32],
    chunk: int = 100,
) -> NDArray[np.float32]:
    """Per weight, the standard deviation over all rows of ``theta (S, P)`` of what
    :func:`project` onto ``offset + span(directions)`` leaves out: the residual noise of that
    subspace as its own (for a rounded basis, the rounding's loss included), in chunks."""
    total = np.zeros(theta.shape[1], np.float64)
    squares = np.zeros(theta.shape[1], np.float64)
    for start in range(0, len(theta), chunk):
        part = np.asarray(theta[start : start + chunk], dtype=np.float32)
        left = (part - project(offset, directions, part)).astype(np.float64)
        total += left.sum(axis=0)
        squares += np.square(left).sum(axis=0)
    n = len(theta)
    var = np.maximum(squares / n - np.square(total / n), 0.0) * n / max(n - 1, 1)
    return np.sqrt(var).astype(np.float32)


class KroneckerSubspace:
    """Per weight matrix ``W (in, out)`` of an MLP, the deviations ``D = W - mean`` restricted
    to ``L L^T D R R^T`` (module docstring, ``--kron``); biases pass whole."""

    def __init__(
        self,
        spec: MLPSpec,
        mean: NDArray[np.float64],
        factors: list[tuple[NDArray[np.float64], NDArray[np.float64]]],
        held: float,
    ) -> None:
        self.spec, self.mean, self.factors, self.variance_held = spec, mean, factors, held
        self.directions = sum(lf.shape[1] * rf.shape[1] for lf, rf in factors)
        self.directions += sum(bs.stop - bs.start for _, bs in spec.offsets())  # biases
        self.basis_numbers = sum(lf.size + rf.size for lf, rf in factors)
        self.residual_std = np.zeros(spec.num_params, np.float32)

    @classmethod
    def fit(
        cls, theta: NDArray[np.floating], spec: MLPSpec, a: int, b: int, chunk: int = 50
    ) -> KroneckerSubspace:
        """The row and column spaces of every layer's deviations over all ``theta``'s rows
        (``(S, P)``, a memmap is read ``chunk`` rows at a time), and the residual std."""
        s = len(theta)
        mean = np.zeros(spec.num_params)
        for start in range(0, s, chunk):
            mean += np.asarray(theta[start : start + chunk], np.float64).sum(axis=0)
        mean /= s
        factors, total, kept = [], 0.0, 0.0
        for ((i, o), _), (ws, _) in zip(spec.layer_shapes, spec.offsets(), strict=True):
            left, right = np.zeros((i, i)), np.zeros((o, o))
            for start in range(0, s, chunk):
                d = (np.asarray(theta[start : start + chunk, ws], np.float64) - mean[ws]).reshape(
                    -1, i, o
                )
                left += np.einsum("sio,sjo->ij", d, d)
                right += np.einsum("sio,sip->op", d, d)
            lf = np.linalg.eigh(left)[1][:, ::-1][:, : min(a, i)]
            rf = np.linalg.eigh(right)[1][:, ::-1][:, : min(b, o)]
            factors.append((lf, rf))
            total += float(np.trace(left))
        out = cls(spec, mean, factors, 0.0)
        sq = np.zeros(spec.num_params)
        for start in range(0, s, chunk):
            rows = np.asarray(theta[start : start + chunk], np.float64)
            projected = out.project(rows, np.float64)
            sq += np.square(rows - projected).sum(axis=0)
            for ws, _ in spec.offsets():  # the factors are orthonormal: |L C R^T| = |C|
                kept += float(np.square(projected[:, ws] - mean[ws]).sum())
        out.variance_held = kept / total
        out.residual_std = np.sqrt(sq / (s - 1)).astype(np.float32)
        return out

    def project(
        self, theta: NDArray[np.floating], dtype: type[np.floating] = np.float32
    ) -> NDArray[Any]:
        """``theta (K, P)`` with every layer's deviation replaced by its projection."""
        out = np.array(theta, dtype=np.float64)
        for (ws, _), (lf, rf) in zip(self.spec.offsets(), self.factors, strict=True):
            d = (out[:, ws] - self.mean[ws]).reshape(len(out), len(lf), len(rf))
            proj = lf @ (lf.T @ d @ rf) @ rf.T
            out[:, ws] = self.mean[ws] + proj.reshape(len(out), -1)
        return out.astype(dtype)


def second_draw(store: SampleStore, first: NDArray[np.int64], k: int) -> NDArray[np.int64]:
    """``k`` samples disjoint from ``first``, spread evenly over each chain's remaining ones
    (``k // C`` per chain, the remainder to the first chains)."""
    chain = np.asarray(store.chain)
    rest = np.setdiff1d(np.arange(len(chain)), first)
    ids = np.unique(chain)
    picks = []
    for i, c in enumerate(ids):
        mine = rest[chain[rest] == c]
        m = k // len(ids) + (1 if i < k % len(ids) else 0)
        picks.append(mine[spread_indices(len(mine), m)])
    return np.sort(np.concatenate(picks))


Members = Callable[[NDArray[np.float32]], NDArray[np.float32]]


def weights_members(spec: NetworkSpec, theta: torch.Tensor) -> Members:
    """Softmax outputs ``(K, N, C)`` of the networks ``theta (K, P)``."""
    return lambda x: member_probs(spec, theta, x).numpy()


def served_members(ckpt: Checkpoint, seed: int) -> Members:
    """Softmax outputs ``(K, N, C)`` of K networks run as the service runs them: codes (and
    residual noise) from NumPy seed ``seed`` through the factored forward, inputs in
    chunks of 1,000."""
    posterior = AffinePosterior(ckpt.spec, *ckpt.affine, residual_std=ckpt.residual_std)
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((K, ckpt.noise_dim), dtype=np.float32)
    noise = rng.standard_normal((K, posterior.residual_dim), dtype=np.float32)
    codes = posterior.codes(ckpt.codes(z), noise)

    def run(x: NDArray[np.float32]) -> NDArray[np.float32]:
        parts = []
        for start in range(0, len(x), 1000):
            chunk = np.ascontiguousarray(x[start : start + 1000])
            plan = ForwardPlan(FirstLayer.FACTORED, K, K, len(chunk))
            parts.append(posterior.member_probs(codes, chunk, plan).transpose(0, 2, 1))
        return np.concatenate(parts, axis=1)

    return run


def aurocs(
    members: Members,
    test_x: NDArray[np.float32],
    ood: dict[str, NDArray[np.float32]],
) -> dict[str, float]:
    """AUROC of every (set, scale, score) row, keyed ``set/scale/score``."""
    inside = summarize(members(test_x))
    out: dict[str, float] = {}
    for name, x in ood.items():
        for scale in SCALES:
            s = summarize(members(scaled(x, scale)))
            for score, value in ood_aurocs(inside, s, SCORES).items():
                out[f"{name}/{scale:g}/{score}"] = value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="the SGLD run the checkpoint distils")
    ap.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="the APD checkpoint (without one: only the SGLD draws and the projections)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--ranks",
        type=int,
        nargs="*",
        default=[],
        help="also project the teacher onto the top-N principal subspace of the run, per N",
    )
    ap.add_argument(
        "--apd-seeds",
        type=int,
        nargs="+",
        default=[0, 1],
        help="NumPy seeds of the checkpoint's draws of 100 networks (apd_SEED each)",
    )
    ap.add_argument(
        "--served",
        action="store_true",
        help="also the networks as the service runs them (served_SEED for each --apd-seeds)",
    )
    ap.add_argument(
        "--kron",
        nargs="*",
        default=[],
        metavar="A:B",
        help="also project the teacher onto per-layer row/column subspaces of ranks A and B",
    )
    ap.add_argument(
        "--residual",
        nargs="?",
        const="also",
        choices=["also", "only"],
        default=None,
        help="also (or: only) each projection with residual noise",
    )
    ap.add_argument(
        "--ood-size",
        type=int,
        default=OOD_SIZE,
        help=f"images per OOD set and of the MNIST test split (default {OOD_SIZE:,})",
    )
    ap.add_argument(
        "--bits",
        type=int,
        nargs="*",
        default=[],
        help="also each --ranks basis rounded to this many bits per entry (1-7), per value",
    )
    ap.add_argument("--tag", default="", help="suffix of the results files' names")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    args = ap.parse_args()
    if any(rank <= 0 for rank in args.ranks):
        ap.error(f"--ranks must be positive, got {args.ranks}")
    if any(not 1 <= b <= 7 for b in args.bits):
        ap.error(f"--bits takes 1 to 7 bits per entry, got {args.bits}")
    if not 0 < args.ood_size <= OOD_SIZE:
        ap.error(f"--ood-size takes 1 to {OOD_SIZE:,} images, got {args.ood_size}")
    if args.bits and not args.ranks:
        ap.error("--bits rounds the --ranks bases: give --ranks too")
    if args.served and args.checkpoint is None:
        ap.error("--served needs --checkpoint")
    try:
        kron = [tuple(int(v) for v in item.split(":")) for item in args.kron]
    except ValueError:
        kron = []
    if len(kron) != len(args.kron) or any(len(k) != 2 or min(k) <= 0 for k in kron):
        ap.error(f"--kron takes positive A:B pairs, got {args.kron}")
    load_start = round(os.getloadavg()[0], 2)
    torch.set_num_threads(args.threads)

    mnist = load_mnist()
    store = SampleStore.open(args.run / SAMPLES_DIR)
    spec = store.spec
    ood = {name: load_ood(name, n=args.ood_size, seed=0) for name in OOD_SETS}
    test_x = np.asarray(mnist.test_x)[: args.ood_size]
    test_y = np.asarray(mnist.test_y)[: args.ood_size]
    first = store.select_spread(K)
    second = second_draw(store, first, K)
    ckpt = load_checkpoint(args.checkpoint) if args.checkpoint is not None else None
    samples = np.asarray(store.theta[first])
    thetas = {
        "sgld_a": torch.from_numpy(samples),
        "sgld_b": torch.from_numpy(np.asarray(store.theta[second])),
    }
    if ckpt is not None:
        thetas |= {
            f"apd_{seed}": torch.from_numpy(sample_networks(ckpt, K, seed=seed))
            for seed in args.apd_seeds
        }
        thetas["proj"] = torch.from_numpy(project(*ckpt.affine, samples))
        thetas["proj_b"] = torch.from_numpy(project(*ckpt.affine, np.asarray(store.theta[second])))
    structure: dict[str, dict[str, int | float]] = {}
    noise_rng = np.random.default_rng(0)

    def add(name: str, projected: NDArray[np.float32], residual_std: NDArray[np.float32]) -> None:
        if args.residual != "only":
            thetas[name] = torch.from_numpy(projected)
        if args.residual:
            eps = noise_rng.standard_normal(projected.shape, dtype=np.float32)
            thetas[f"{name}_res"] = torch.from_numpy(projected + residual_std * eps)

    for rank in args.ranks:
        for dtype, suffix in BASES:
            sub = fit_subspace(store.theta, rank, basis_dtype=dtype)
            add(f"proj_r{rank}{suffix}", project(sub.mean, sub.basis, samples), sub.residual_std)
            structure[f"proj_r{rank}{suffix}"] = {
                "directions": rank,
                "basis_numbers": rank * spec.num_params,
                "variance_held": sub.explained_variance_ratio,
            }
        if args.bits:
            sub = fit_subspace(store.theta, rank)
            groups = -(-spec.num_params // GROUP)
            for bits in args.bits:
                name = f"proj_r{rank}_b{bits}"
                rounded = round_bits(sub.basis, bits)
                projected = project(sub.mean, rounded, samples)
                # residual noise: the float basis's (the rounding's loss not added) ...
                add(name, projected, sub.residual_std)
                if args.residual:  # ... and the rounded basis's own (``_ownres``)
                    own = residual_std_of(sub.mean, rounded, store.theta)
                    eps = noise_rng.standard_normal(samples.shape, dtype=np.float32)
                    thetas[f"{name}_ownres"] = torch.from_numpy(projected + own * eps)
                structure[name] = {
                    "directions": rank,
                    "basis_numbers": rank * spec.num_params,
                    "variance_held": sub.explained_variance_ratio,
                    "basis_bytes": rank * (-(-spec.num_params * bits // 8) + 2 * groups),
                }
    for a, b in kron:
        if not isinstance(spec, MLPSpec):
            ap.error("--kron is for MLPs (dense layers only)")
        ks = KroneckerSubspace.fit(store.theta, spec, a, b)
        add(f"kron{a}x{b}", ks.project(samples), ks.residual_std)
        structure[f"kron{a}x{b}"] = {
            "directions": ks.directions,
            "basis_numbers": ks.basis_numbers,
            "variance_held": ks.variance_held,
        }
    members = {name: weights_members(spec, theta) for name, theta in thetas.items()}
    if args.served:
        assert ckpt is not None  # checked with the arguments
        members |= {f"served_{seed}": served_members(ckpt, seed) for seed in args.apd_seeds}
    who = [name for name in members if name != "sgld_a"]
    table = {who: aurocs(run, test_x, ood) for who, run in members.items()}
    test = {}
    for name, run in members.items():
        probs = run(test_x).mean(axis=0)
        test[name] = {
            "accuracy": accuracy(probs, test_y),
            "nll": negative_log_likelihood(probs, test_y),
        }
    rows = []
    for key, teacher in table["sgld_a"].items():
        if not np.isfinite(teacher):
            continue
        drops = {f"{name}_drop": teacher - table[name][key] for name in who}
        rows.append({"row": key, "teacher": teacher, **drops})
    record = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "benchmarks/scale5_noise.py", *sys.argv[1:]]),
        "code_revision": code_revision(),
        "load_average_1min": {"start": load_start, "end": round(os.getloadavg()[0], 2)},
        "run": str(args.run),
        "checkpoint": str(args.checkpoint) if args.checkpoint is not None else None,
        "samples": len(store),
        "ood_size": args.ood_size,
        "rows": rows,
        "predictives": who,
        "structure": structure,
        "summary": summarise(rows, who),
        "test": test,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "scale5_noise" + (f"-{args.tag}" if args.tag else "")
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(record))
    print(markdown(record))


def summarise(rows: list[dict[str, Any]], who: list[str]) -> dict[str, dict[str, float]]:
    """Per scale and predictive: rows whose AUROC drop exceeds the tolerance, and the largest
    absolute difference from the teacher."""
    out: dict[str, dict[str, float]] = {}
    for scale in SCALES:
        mine = [r for r in rows if r["row"].split("/")[1] == f"{scale:g}"]
        for name in who:
            drops = np.array([r[f"{name}_drop"] for r in mine])
            out[f"{name}@{scale:g}"] = {
                "rows": len(drops),
                "misses": int((drops > AUROC_TOLERANCE).sum()),
                "max_abs_difference": float(np.abs(drops).max()),
                "mean_abs_difference": float(np.abs(drops).mean()),
            }
    return out


def markdown(r: dict[str, Any]) -> str:
    who = r["predictives"]
    lines = [
        "# Scale-5 anomaly rows: APD against a second SGLD draw and its own subspace",
        "",
        f"Recorded {r['created_at']} by `{r['command']}`, code {r['code_revision'][:12]}; "
        f"run {r['run']} ({r['samples']} samples), checkpoint {r['checkpoint'] or 'none'}. "
        f"1-minute load average {r['load_average_1min']['start']} -> "
        f"{r['load_average_1min']['end']} (2 cores). "
        f"{r.get('ood_size', OOD_SIZE):,} images per OOD set and of the MNIST test split.",
        "",
        "The teacher (sgld_a) is the evaluation's: 100 samples spread over the chains. sgld_b: "
        "100 other samples of the same run, spread the same way. apd_N: 100 networks "
        "from the checkpoint, NumPy seed N (served_N: run as the service runs them, "
        "docs/serving.md). proj / proj_b: the teacher's / sgld_b's samples "
        "projected onto the checkpoint's subspace (proj_b: what a perfect generator of that "
        "subspace would draw). proj_rN / proj_rN_int8: the teacher's samples projected onto "
        "the run's top-N principal subspace, basis in float16 / in 8 bits with one scale per "
        "direction; `_res`: with the residual noise of what the projection leaves out. "
        f"A miss: AUROC more than {AUROC_TOLERANCE} below "
        "the teacher's.",
        "",
        "| predictive | scale | rows | misses | max abs. difference | mean abs. difference |",
        "|---|---|---|---|---|---|",
    ]
    for key, s in r["summary"].items():
        name, scale = key.split("@")
        lines.append(
            f"| {name} | {scale} | {s['rows']} | {s['misses']} | {s['max_abs_difference']:.4f} "
            f"| {s['mean_abs_difference']:.4f} |"
        )
    if "test" in r:
        lines += [
            "",
            "MNIST test split, mean softmax of each predictive's 100 networks:",
            "",
            "| predictive | test accuracy | test NLL |",
            "|---|---|---|",
            *(
                f"| {name} | {100 * m['accuracy']:.2f} % | {m['nll']:.4f} |"
                for name, m in r["test"].items()
            ),
        ]
    if r.get("structure"):
        lines += [
            "",
            "Subspaces: directions spanned (kron: A B per layer plus the biases), numbers the "
            "basis stores (a flat direction stores every weight; a kron layer its two factors), "
            "share of the run's sample variance they hold (kron: of the weight matrices'):",
            "",
            "| subspace | directions | basis numbers | basis at 8 bits | variance held |",
            "|---|---|---|---|---|",
            *(
                f"| {name} | {m['directions']:,} | {m['basis_numbers']:,} | "
                f"{m['basis_numbers'] / 1e6:.2f} MB | {100 * m['variance_held']:.2f} % |"
                for name, m in r["structure"].items()
            ),
        ]
    lines += [
        "",
        "Every row (AUROC drop against the teacher; positive = lower than the teacher):",
        "",
        f"| OOD set / scale / score | teacher | {' | '.join(who)} |",
        "|---|---|" + "---|" * len(who),
    ]
    for row in r["rows"]:
        drops = " | ".join(f"{row[f'{name}_drop']:+.4f}" for name in who)
        lines.append(f"| {row['row']} | {row['teacher']:.4f} | {drops} |")
    return "\n".join([*lines, ""])


if __name__ == "__main__":
    main()
