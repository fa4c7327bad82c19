"""Batched forward of K posterior networks vs the naive Python loop, and vs the matmul rate.

For fcNN1 and fcNN2, K = 100 networks and batch sizes N = 1 and N = 64, times in one process:

* numpy batched: ``apd.networks.forward_probs(spec, theta (K, P), x (N, D))``;
* numpy loop:    ``[forward_probs(spec, theta[k:k+1], x) for k in range(K)]``, the same maths
  one network at a time (what one writes without the batched API);
* torch batched / torch loop: the same with :func:`training.torch_ops.forward_logits` + softmax.

Reports the speed-up (loop time / batched time, target >= 5x), the achieved GFLOP/s
(``2 N K sum_l fan_in_l fan_out_l`` multiply-adds per call) against the machine's measured
single-precision matmul rate (a square 2048 GEMM in numpy and in torch), and the weight bytes
read per second. Writes ``benchmarks/results/forward.json`` and ``forward.md``.

    python benchmarks/forward.py [--threads 2] [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from apd.networks import MLPSpec, forward_probs, get_spec
from training import torch_ops
from training.threads import device_description

RESULTS = Path(__file__).resolve().parent / "results"
K = 100
BATCH_SIZES = (1, 64)
ARCHS = ("fcnn1", "fcnn2")


def _time(fn: Callable[[], object], repeats: int, min_s: float = 0.2) -> float:
    """Median seconds per call over ``repeats`` rounds (each round >= ``min_s`` / repeats)."""
    return _time_interleaved({"f": fn}, repeats, min_s)["f"]


def _time_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, min_s: float = 0.2
) -> dict[str, float]:
    """Median seconds per call of each function, the functions taking turns in every round,
    so load from other processes on a shared machine hits all of them alike."""
    inner: dict[str, int] = {}
    for name, fn in fns.items():
        fn()
        t0 = time.perf_counter()
        fn()
        inner[name] = max(1, int(min_s / repeats / max(time.perf_counter() - t0, 1e-6)))
    rounds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            rounds[name].append((time.perf_counter() - t0) / inner[name])
    return {name: statistics.median(r) for name, r in rounds.items()}


def matmul_rate(repeats: int) -> dict[str, float]:
    """Measured float32 GEMM rate (GFLOP/s) on a 2048^3 product, numpy and torch."""
    n = 2048
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    flops = 2 * n**3
    t_np = _time(lambda: a @ b, max(3, repeats // 5), min_s=0.5)
    with torch.no_grad():
        t_t = _time(lambda: ta @ tb, max(3, repeats // 5), min_s=0.5)
    return {"numpy_gflops": flops / t_np / 1e9, "torch_gflops": flops / t_t / 1e9}


def forward_flops(spec: MLPSpec, k: int, n: int) -> int:
    return 2 * k * n * sum(i * o for (i, o), _ in spec.layer_shapes)


def bench_arch(spec: MLPSpec, n: int, repeats: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    theta = (0.05 * rng.standard_normal((K, spec.num_params))).astype(np.float32)
    x = rng.random((n, spec.input_dim)).astype(np.float32)
    t_theta, t_x = torch.from_numpy(theta), torch.from_numpy(x)

    def np_batched() -> np.ndarray:
        return forward_probs(spec, theta, x)

    def np_loop() -> np.ndarray:
        return np.concatenate([forward_probs(spec, theta[k : k + 1], x) for k in range(K)])

    def torch_batched() -> torch.Tensor:
        with torch.no_grad():
            return torch.softmax(torch_ops.forward_logits(spec, t_theta, t_x), dim=-1)

    def torch_loop() -> torch.Tensor:
        with torch.no_grad():
            return torch.cat(
                [
                    torch.softmax(torch_ops.forward_logits(spec, t_theta[k : k + 1], t_x), -1)
                    for k in range(K)
                ]
            )

    module = torch.nn.Sequential()
    for i, ((fan_in, fan_out), _) in enumerate(spec.layer_shapes):
        if i:
            module.append(torch.nn.ReLU())
        module.append(torch.nn.Linear(fan_in, fan_out))
    module_params = _module_layout(module, spec)

    def torch_module_loop() -> torch.Tensor:
        # the common pattern: copy each sample's weights into an nn.Module, then call it
        outs = []
        with torch.no_grad():
            for k in range(K):
                for (w, b), (mw, mb) in zip(
                    torch_ops.unflatten(spec, t_theta[k : k + 1]), module_params, strict=True
                ):
                    mw.copy_(w[0].T)
                    mb.copy_(b[0])
                outs.append(torch.softmax(module(t_x), -1))
        return torch.stack(outs)

    ref = np_loop()
    np.testing.assert_allclose(np_batched(), ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(torch_batched().numpy(), ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(torch_module_loop().numpy(), ref, rtol=1e-4, atol=1e-5)
    t = _time_interleaved(
        {
            "numpy_batched_s": np_batched,
            "numpy_loop_s": np_loop,
            "torch_batched_s": torch_batched,
            "torch_loop_s": torch_loop,
            "torch_module_loop_s": torch_module_loop,
        },
        repeats,
    )
    times = dict(t)
    flops = forward_flops(spec, K, n)
    weight_bytes = K * spec.num_params * 4
    out: dict[str, Any] = {"arch": spec.name, "K": K, "batch_size": n, "flops": flops, **times}
    for lib in ("numpy", "torch"):
        b = times[f"{lib}_batched_s"]
        out[f"{lib}_speedup"] = times[f"{lib}_loop_s"] / b
        out[f"{lib}_gflops"] = flops / b / 1e9
        out[f"{lib}_weight_gbps"] = weight_bytes / b / 1e9
    for lib in ("numpy", "torch"):
        out[f"{lib}_speedup_vs_module_loop"] = (
            times["torch_module_loop_s"] / times[f"{lib}_batched_s"]
        )
    return out


def _module_layout(
    module: torch.nn.Sequential, spec: MLPSpec
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (weight, bias) tensors of the Linear layers, in the spec's layer order."""
    linears = [m for m in module if isinstance(m, torch.nn.Linear)]
    assert len(linears) == spec.num_layers
    return [(m.weight, m.bias) for m in linears]


def _markdown(result: dict[str, Any]) -> str:
    rate = result["matmul"]
    lines = [
        "# Batched forward vs the naive loop (K = 100 networks)",
        "",
        f"Device: {result['device']}; {result['threads']} threads; {result['created_at']}.",
        f"Measured matmul rate (float32 2048^3 GEMM): numpy {rate['numpy_gflops']:.1f} "
        f"GFLOP/s, torch {rate['torch_gflops']:.1f} GFLOP/s.",
        "",
        "| arch | N | numpy batched | numpy loop | speed-up | GFLOP/s (% of GEMM) "
        "| torch batched | torch loop | speed-up | GFLOP/s (% of GEMM) "
        "| nn.Module loop | numpy batched speed-up | torch batched speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        cells = [r["arch"], str(r["batch_size"])]
        for lib in ("numpy", "torch"):
            pct = 100 * r[f"{lib}_gflops"] / rate[f"{lib}_gflops"]
            cells += [
                f"{1e3 * r[f'{lib}_batched_s']:.2f} ms",
                f"{1e3 * r[f'{lib}_loop_s']:.2f} ms",
                f"**{r[f'{lib}_speedup']:.1f}x**",
                f"{r[f'{lib}_gflops']:.1f} ({pct:.0f}%)",
            ]
        cells += [
            f"{1e3 * r['torch_module_loop_s']:.2f} ms",
            f"{r['numpy_speedup_vs_module_loop']:.1f}x",
            f"{r['torch_speedup_vs_module_loop']:.1f}x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Speed-up = loop time / batched time, all timed in this process, taking turns in every "
        "round (median of rounds). *loop* calls the same functional forward one network at a "
        "time; *nn.Module loop* copies each sample's weights into a `torch.nn.Sequential` and "
        "calls it, the usual way sampled weights are evaluated. At N = 1 the pass reads every "
        "weight once for one input, so it is bound by memory traffic, not by the GEMM rate; "
        "the weight read rate is in forward.json (`*_weight_gbps`). numpy batched is the reference "
        "forward of apd.networks; torch batched is training's torch forward.",
        "",
        "Reproduce: `python benchmarks/forward.py`",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="BLAS / torch threads")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with threadpool_limits(limits=args.threads):
        rate = matmul_rate(args.repeats)
        rows = []
        for arch in ARCHS:
            for n in BATCH_SIZES:
                row = bench_arch(get_spec(arch), n, args.repeats)
                rows.append(row)
                print(
                    f"{arch} N={n}: numpy {1e3 * row['numpy_batched_s']:.2f} ms "
                    f"({row['numpy_speedup']:.1f}x vs loop, {row['numpy_gflops']:.1f} GFLOP/s), "
                    f"torch {1e3 * row['torch_batched_s']:.2f} ms "
                    f"({row['torch_speedup']:.1f}x, {row['torch_gflops']:.1f} GFLOP/s)",
                    flush=True,
                )
    result = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device_description(args.threads),
        "threads": args.threads,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "load_average": os.getloadavg(),
        "matmul": rate,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "forward.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "forward.md").write_text(_markdown(result))
    print(f"matmul: {rate}; wrote {args.out / 'forward.json'} and forward.md")


if __name__ == "__main__":
    main()
