"""Schemathesis against a live ``apd serve`` (2 workers, private Redis) over loopback HTTP.

    python benchmarks/fuzz.py                       # >= 1,000 cases, writes results/fuzz.*
    python benchmarks/fuzz.py --per-operation 20 --quick   # smoke run, writes nothing

The schema is the server's own ``/openapi.json``. Every operation is fuzzed in positive and
negative mode (``--per-operation`` cases each) plus its documented examples; every response
is checked for no 5xx and for conformance of status code, media type and body schema (see
``tests/fuzzkit.py``). Generation is seeded; ``--deadline`` bounds the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fuzzkit import run_fuzz, schema_from_url  # noqa: E402
from tests.harness import RedisServer, apd_serve, make_tiny_checkpoint  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def render(record: dict[str, Any]) -> str:
    r = record["report"]
    lines = [
        "# Fuzzing the OpenAPI contract (schemathesis)",
        "",
        f"Produced by `{record['command']}` on {record['started_at']} ({record['machine']}).",
        f"Server: `{record['serve_command']}` with a private redis-server on loopback; "
        f"schemathesis {record['schemathesis']}, seed {record['seed']}.",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| generated cases | {r['cases']} |",
        f"| 5xx responses | {r['server_errors']} |",
        f"| check failures | {r['check_failures']} |",
        f"| checks | {', '.join(r['checks'])} |",
        f"| statuses | {r['by_status']} |",
        f"| wall time | {r['wall_s']} s (finished: {not r['timed_out']}) |",
        "",
        "Cases by operation and mode:",
        "",
        "| operation [mode] | cases |",
        "| --- | --- |",
    ]
    lines += [f"| {op} | {n} |" for op, n in r["by_operation"].items()]
    if r["not_generatable"]:
        lines += ["", f"No invalid request exists for: {', '.join(r['not_generatable'])}."]
    if r["failures"]:
        lines += ["", "## Failures (first 50)", ""]
        seen: set[tuple[str, int]] = set()
        for f in r["failures"]:
            key = (f["operation"], f["status"])
            if key in seen:
                continue
            seen.add(key)
            op, mode, status = f["operation"], f["mode"], f["status"]
            lines.append(f"- `{op}` [{mode}] → {status}: {f['message'][:400]}")
    lines += ["", "Raw figures: `fuzz.json` beside this file.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--per-operation", type=int, default=250, help="cases per operation and mode")
    p.add_argument("--seed", type=int, default=20240601)
    p.add_argument("--deadline", type=float, default=560.0, help="seconds")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="print only, write nothing")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    import schemathesis

    record: dict[str, Any] = {
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "loadavg_start": os.getloadavg(),
        "schemathesis": schemathesis.__version__,
        "seed": args.seed,
    }
    with tempfile.TemporaryDirectory(prefix="apd-fuzz-") as tmp:
        ckpt = make_tiny_checkpoint(Path(tmp) / "tiny.safetensors")
        redis = RedisServer()
        redis.start()
        try:
            serve_args = ["--workers", str(args.workers), "--redis-url", redis.url]
            serve_args += ["--max-batch", "16", "--log-level", "warning"]
            shown = " ".join(serve_args)
            record["serve_command"] = f"apd serve --checkpoint tiny.safetensors {shown}"
            with apd_serve(ckpt, args=serve_args, timeout=180) as server:
                schema = schema_from_url(server.base_url)
                report = run_fuzz(
                    schema,
                    examples_per_operation=args.per_operation,
                    seed=args.seed,
                    deadline_s=args.deadline,
                    base_url=server.base_url,
                )
                alive = server.proc.poll() is None
        finally:
            redis.cleanup()
    record["report"] = report.as_dict()
    record["server_alive_after"] = alive
    record["loadavg_end"] = os.getloadavg()
    text = render(record)
    print(text)
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fuzz.json").write_text(json.dumps(record, indent=2) + "\n")
        (args.out / "fuzz.md").write_text(text)
    ok = report.server_errors == 0 and not report.failures and not report.timed_out
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
