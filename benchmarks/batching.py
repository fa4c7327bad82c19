"""Dynamic batching: throughput and latency of concurrent batch-1 requests, batching off and on.

For fcNN2 and LeNet-5 (random checkpoints of the real architectures,
:data:`servebench.ARCH_CHECKPOINTS`; speed does not depend on the weights), two ``apd serve``
processes of one worker each run side by side on the same checkpoint and settings: one with
``--batch-max-rows 1`` (batching off), one with the server's default batching settings (on).
Closed-loop clients (:func:`loadgen.run_clients`: each waits for its answer before sending the
next) at concurrency 1, 2, 4, 8, 16 and 32 send ``POST /predict`` with one real MNIST test digit,
K = 100, no seed (the pool); the points alternate between the two servers (off then on, at each
concurrency), each after an untimed warm-up at its concurrency, so that both see the same
machine. Per point: throughput (answered requests per second), p50 and p99 latency, errors,
and the client's own CPU time (it shares the machine with the server).

Issue #23's target, at concurrency 16: throughput on / off >= 4 and p99 on <= p99 off, for each
architecture. And batching may not change an answer: seeded requests sent to the batching
server while it is loaded must get the numbers the other server gives them. Writes
``benchmarks/results/batching.{md,json,png}`` (the plot: throughput and p99 against
concurrency).

    python benchmarks/batching.py [--duration-s 10] [--archs fcnn2,lenet5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

# One BLAS thread in this process too, as the servers run (forward_per_row): before NumPy loads.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

ROOT: Final = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from loadgen import RequestSpec, parse_metrics, run_clients, summarize  # noqa: E402
from servebench import (  # noqa: E402
    ARCH_CHECKPOINTS,
    RESULTS,
    arch_checkpoint,
    header,
    header_lines,
    mnist_test_digits,
    require_flags,
    serve_default,
    uptime,
)

CONCURRENCY: Final = (1, 2, 4, 8, 16, 32)
TARGET_AT: Final = 16
TARGET_THROUGHPUT_RATIO: Final = 4.0
MODES: Final = {"off": ["--batch-max-rows", "1"], "on": []}  # on: the server's defaults
BATCH_FLAGS: Final = ("--batch-delay-ms", "--batch-max-rows")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", default="fcnn2,lenet5", help="comma-separated: fcnn2, lenet5")
    p.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)))
    p.add_argument("--duration-s", type=float, default=10.0, help="timed seconds per point")
    p.add_argument("--warmup-s", type=float, default=2.0, help="untimed seconds before each")
    p.add_argument("--num-samples", type=int, default=100, help="K of every request")
    p.add_argument("--threads", type=int, default=1, help="the servers' --num-threads")
    p.add_argument(
        "--allow-no-batching",
        action="store_true",
        help="run against a server without --batch-delay-ms (to check this script): 'off' "
        "and 'on' are then both the server's defaults, and the target is not judged",
    )
    p.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if bad := [a for a in args.archs if a not in ARCH_CHECKPOINTS]:
        p.error(f"unknown arch {bad}; choose from {sorted(ARCH_CHECKPOINTS)}")
    if min(args.concurrency) < 1 or args.duration_s <= 0 or args.num_samples < 1:
        p.error("--concurrency, --duration-s and --num-samples must be positive")
    return args


def requests(k: int, n: int = 256) -> list[RequestSpec]:
    """``n`` bodies of one MNIST test digit each, K = ``k``, no seed."""
    x, _ = mnist_test_digits()
    return [
        RequestSpec(
            "/predict",
            1,
            None,
            k,
            json.dumps({"inputs": np.round(x[i : i + 1], 4).tolist(), "num_samples": k}).encode(),
        )
        for i in range(n)
    ]


def server_args(args: argparse.Namespace, mode: str) -> list[str]:
    common = ["--workers", "1", "--num-threads", str(args.threads)]
    # Every client of the benchmark has the same address: let all of them wait for admission.
    common += ["--admission-queue-per-client", "256", "--admission-queue", "256"]
    return common + ([] if args.allow_no_batching else MODES[mode])


@contextlib.contextmanager
def servers(checkpoint: Path, args: argparse.Namespace) -> Iterator[dict[str, str]]:
    from tests.harness import apd_serve

    with contextlib.ExitStack() as stack:
        yield {
            mode: stack.enter_context(
                apd_serve(
                    checkpoint,
                    args=[*server_args(args, mode), "--log-level", "warning"],
                    timeout=180,
                )
            ).base_url
            for mode in MODES
        }


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def point(url: str, bodies: list[RequestSpec], c: int, args: argparse.Namespace) -> dict[str, Any]:
    """One closed-loop run at concurrency ``c`` after an untimed warm-up."""
    time.sleep(0.5)  # let the other server's threads sleep
    asyncio.run(
        run_clients(url, bodies, concurrency=c, duration_s=args.warmup_s, max_requests=10**6)
    )
    cpu0 = cpu_s()
    result = asyncio.run(
        run_clients(
            url,
            bodies,
            concurrency=c,
            duration_s=args.duration_s,
            max_requests=10**6,
            request_timeout_s=60.0,
        )
    )
    s = summarize(result.samples, result.wall_s)
    return {
        "concurrency": c,
        "requests": s["requests"],
        "errors": s["errors"],
        "error_kinds": s["error_kinds"],
        "throughput_rps": s["throughput_rps"],
        "p50_ms": s["latency_ms"]["p50"],
        "p99_ms": s["latency_ms"]["p99"],
        "client_cpu_share": round((cpu_s() - cpu0) / result.wall_s, 3),
    }


def seeded_unchanged(urls: dict[str, str], bodies: list[RequestSpec], k: int) -> dict[str, Any]:
    """Seeded requests sent to the batching server while 16 unseeded clients load it, against
    the same requests to the server without batching: the answers must be identical (a seeded
    request is answered as it is alone)."""
    import httpx

    x, _ = mnist_test_digits()
    seeded = [
        {"inputs": np.round(x[i : i + 1], 4).tolist(), "num_samples": k, "seed": 100 + i}
        for i in range(8)
    ]

    async def answers(url: str, loaded: bool) -> list[Any]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            load = (
                asyncio.ensure_future(
                    run_clients(url, bodies, concurrency=16, duration_s=3.0, max_requests=10**6)
                )
                if loaded
                else None
            )
            await asyncio.sleep(0.5 if loaded else 0)
            out = await asyncio.gather(*(c.post("/predict", json=b) for b in seeded))
            if load is not None:
                await load
        return [r.json()["predictions"] if r.status_code == 200 else r.status_code for r in out]

    alone = asyncio.run(answers(urls["off"], loaded=False))
    batched = asyncio.run(answers(urls["on"], loaded=True))
    same = sum(a == b for a, b in zip(alone, batched, strict=True))
    return {"requests": len(seeded), "identical": same, "all_identical": same == len(seeded)}


def batching_metrics(url: str) -> dict[str, float]:
    """The server's metric samples whose name says 'batch' (what it reports of its batches)."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=10).text
    return {k: v for k, v in parse_metrics(text).items() if "batch" in k.split("{")[0]}


def judge(points: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    at = {m: next((p for p in points[m] if p["concurrency"] == TARGET_AT), None) for m in MODES}
    off, on = at["off"], at["on"]
    if off is None or on is None or not off["throughput_rps"]:
        return {"measured": False}
    ratio = on["throughput_rps"] / off["throughput_rps"]
    p99 = on["p99_ms"] / off["p99_ms"]
    return {
        "measured": True,
        "throughput_on_over_off": round(ratio, 2),
        "p99_on_over_off": round(p99, 2),
        "no_errors": off["errors"] == 0 and on["errors"] == 0,
        "meets_target": ratio >= TARGET_THROUGHPUT_RATIO
        and p99 <= 1.0
        and off["errors"] == 0
        and on["errors"] == 0,
    }


def forward_per_row(checkpoint: Path, k: int, batch: int = 16, repeats: int = 15) -> dict[str, Any]:
    """The compute bound of batching: the factored forward of K pool networks on 1 input and
    on ``batch`` inputs, in this process, one BLAS thread (as the servers run): the per-row
    speed-up is the most batching can give when the forward is all the work."""
    from apd.checkpoint import load_checkpoint
    from apd.factored import AffinePosterior
    from service.core.networks import POOL_STREAM, draw_codes, num_blocks

    ckpt = load_checkpoint(checkpoint)
    posterior = AffinePosterior(
        ckpt.spec, *ckpt.affine, residual_std=ckpt.residual_std, chunk_bytes=8 << 20
    )
    codes = draw_codes(ckpt, posterior, POOL_STREAM, range(num_blocks(k)))[:k]
    tails = posterior.tails(codes)  # the pool keeps them (tail_cache_mb)
    rng = np.random.default_rng(0)
    ms = {}
    for n in (1, batch):
        x = rng.random((n, ckpt.spec.input_dim), dtype=np.float32)
        posterior.summarize_segments([(codes, tails)], x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            posterior.summarize_segments([(codes, tails)], x)
            times.append(time.perf_counter() - t0)
        ms[n] = float(np.median(times)) * 1e3
    return {
        "batch": batch,
        "ms_one_input": round(ms[1], 2),
        "ms_batch": round(ms[batch], 2),
        "per_row_speedup": round(ms[1] * batch / ms[batch], 2),
    }


def http_ceiling(args: argparse.Namespace, c: int = TARGET_AT) -> dict[str, Any]:
    """The most batch-1 requests per second this machine answers at all: the shipped fcNN1,
    K = 1 (no compute to speak of), no batching, ``c`` clients on the same cores. Against
    the server without batching it bounds what batching can reach here, whatever the model."""
    from tests.harness import apd_serve

    shipped = ROOT / "models" / "mnist-fcnn1" / "model.safetensors"
    flags = [*server_args(args, "off"), "--pool-size", "100"]
    with apd_serve(shipped, args=flags) as server:
        return point(server.base_url, requests(1), c, args)


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    if args.allow_no_batching:
        print("--allow-no-batching: both servers run without batching flags", flush=True)
    else:
        require_flags(*BATCH_FLAGS, why="dynamic batching, issue #23")
    record = header(argv)
    record |= {
        "num_samples": args.num_samples,
        "duration_s": args.duration_s,
        "warmup_s": args.warmup_s,
        "batching_flags_given": not args.allow_no_batching,
        "server_batching_defaults": {f: serve_default(f) for f in BATCH_FLAGS},
        "server_args": {m: server_args(args, m) for m in MODES},
        "archs": {},
    }
    bodies = requests(args.num_samples)
    workdir = Path(tempfile.mkdtemp(prefix="apd-batching-"))
    for arch in args.archs:
        print(f"{arch}: writing the checkpoint ...", flush=True)
        ckpt = arch_checkpoint(arch, workdir / f"{arch}.safetensors")
        points: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
        with servers(ckpt, args) as urls:
            for c in args.concurrency:
                for mode, url in urls.items():
                    points[mode].append(point(url, bodies, c, args))
                    p = points[mode][-1]
                    print(
                        f"{arch} {mode:>3} c={c:>2}: {p['throughput_rps']} req/s, p50 "
                        f"{p['p50_ms']} ms, p99 {p['p99_ms']} ms, errors {p['errors']}",
                        flush=True,
                    )
            print(f"{arch}: seeded answers with batching on and off ...", flush=True)
            seeded = seeded_unchanged(urls, bodies, args.num_samples)
            metrics = {m: batching_metrics(u) for m, u in urls.items()}
        bound = forward_per_row(ckpt, args.num_samples)
        ckpt.unlink()
        record["archs"][arch] = {
            "checkpoint": f"random {arch}, generator {ARCH_CHECKPOINTS[arch]}, float16 basis",
            "points": points,
            "batch_metrics": metrics,
            "seeded_unchanged": seeded,
            "at_concurrency_16": judge(points),
            "forward_bound": bound,
        }
    print("the HTTP ceiling (shipped fcNN1, K = 1) ...", flush=True)
    record["http_ceiling"] = http_ceiling(args)
    record["uptime_after"] = uptime()
    return record


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(r["archs"])
    fig, axes = plt.subplots(len(archs), 2, figsize=(10, 3.6 * len(archs)), squeeze=False)
    for row, arch in zip(axes, archs, strict=True):
        for mode, style in (("off", "o--"), ("on", "s-")):
            pts = r["archs"][arch]["points"][mode]
            c = [p["concurrency"] for p in pts]
            row[0].plot(c, [p["throughput_rps"] for p in pts], style, label=f"batching {mode}")
            row[1].plot(c, [p["p99_ms"] for p in pts], style, label=f"batching {mode}")
        for ax, what in zip(row, ("throughput (req/s)", "p99 latency (ms)"), strict=True):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent clients (batch 1)")
            ax.set_ylabel(what)
            ax.set_title(f"{arch}, K = {r['num_samples']}")
            ax.grid(True, alpha=0.3)
            ax.legend()
        row[0].set_ylim(bottom=0)
        row[1].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Dynamic batching: concurrent batch-1 requests",
        "",
        *header_lines(r),
        f"`POST /predict`, one MNIST test digit, K = {r['num_samples']}, no seed; closed-loop "
        f"clients, {r['duration_s']} s per point after {r['warmup_s']} s of warm-up; both servers",
        "run side by side and the points alternate between them. Servers: "
        + "; ".join(f"{m}: `apd serve {' '.join(a)}`" for m, a in r["server_args"].items())
        + ".",
        "Batching on is the server's defaults: "
        + ", ".join(f"`{f} {v}`" for f, v in r["server_batching_defaults"].items())
        + ".",
    ]
    if not r["batching_flags_given"]:
        lines += [
            "",
            "**Run with `--allow-no-batching`: both servers are the same (no batching flags); "
            "this checks the script, not batching.**",
        ]
    lines += ["", "![throughput and p99 against concurrency](batching.png)", ""]
    for arch, a in r["archs"].items():
        lines += [
            f"## {arch} ({a['checkpoint']})",
            "",
            "| clients | off req/s | on req/s | on/off | off p50 ms | on p50 ms "
            "| off p99 ms | on p99 ms | errors off/on | client CPU off/on |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
        ]
        for off, on in zip(a["points"]["off"], a["points"]["on"], strict=True):
            ratio = on["throughput_rps"] / off["throughput_rps"] if off["throughput_rps"] else 0
            lines.append(
                f"| {off['concurrency']} | {off['throughput_rps']} | {on['throughput_rps']} | "
                f"{ratio:.2f} | {off['p50_ms']} | {on['p50_ms']} | {off['p99_ms']} | "
                f"{on['p99_ms']} | {off['errors']}/{on['errors']} | "
                f"{off['client_cpu_share']}/{on['client_cpu_share']} |"
            )
        j = a["at_concurrency_16"]
        if j["measured"]:
            met = "met" if j["meets_target"] and r["batching_flags_given"] else "**not met**"
            lines += [
                "",
                f"At {TARGET_AT} clients: throughput on/off **{j['throughput_on_over_off']}** "
                f"(target >= {TARGET_THROUGHPUT_RATIO}), p99 on/off **{j['p99_on_over_off']}** "
                f"(target <= 1), no errors: {j['no_errors']}: {met}.",
            ]
        u = a["seeded_unchanged"]
        lines += [
            "",
            f"Seeded requests (K = {r['num_samples']}) sent to the batching server under 16 "
            f"unseeded clients: {u['identical']} of {u['requests']} answers identical to the "
            "server without batching"
            + ("." if u["all_identical"] else " (**a seeded answer changed**)."),
        ]
        b = a["forward_bound"]
        off16 = next(p for p in a["points"]["off"] if p["concurrency"] == TARGET_AT)
        ceiling = r["http_ceiling"]["throughput_rps"]
        lines += [
            "",
            f"The limit. The forward alone (in process, K = {r['num_samples']}, one thread): "
            f"{b['ms_one_input']} ms for one input, {b['ms_batch']} ms for {b['batch']}: "
            f"batching can make a row at most **{b['per_row_speedup']}x** cheaper. The HTTP "
            f"path alone (the shipped fcNN1 at K = 1, {TARGET_AT} clients on the same cores) "
            f"answers at most **{ceiling} req/s** here, so against the {off16['throughput_rps']}"
            f" req/s without batching no batching can exceed "
            f"**{ceiling / off16['throughput_rps']:.2f}x** on this machine.",
        ]
        if a["batch_metrics"]["on"]:
            lines += ["", "The batching server's batch metrics after the run:", ""]
            lines += [f"- `{k}` {v:g}" for k, v in a["batch_metrics"]["on"].items()]
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    args = parse_args(argv[1:])
    record = run(args, argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batching.json").write_text(json.dumps(record, indent=2) + "\n")
    plot(record, args.out / "batching.png")
    (args.out / "batching.md").write_text(markdown(record) + "\n")
    print(markdown(record))
    missed = [
        a
        for a, v in record["archs"].items()
        if not v["at_concurrency_16"].get("meets_target")
        or not v["seeded_unchanged"]["all_identical"]
    ]
    return 1 if args.check and (missed or not record["batching_flags_given"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
