"""``apd serve`` on bad checkpoints: exit code, the one line on stderr, and time to refuse.

    python benchmarks/bad_checkpoints.py      # writes results/bad_checkpoints.{json,md}

The bad files are the ones ``tests/test_bad_checkpoints.py`` builds from a valid tiny
checkpoint (truncated, bit-flipped, wrong architecture, missing metadata, wrong format
version, missing). Each run is bounded by a 60 s timeout; none binds a port.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.harness import apd_command, free_port, make_tiny_checkpoint, serve_env  # noqa: E402
from tests.test_bad_checkpoints import _bad_files  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def main() -> int:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="apd-badckpt-") as tmp:
        good = make_tiny_checkpoint(Path(tmp) / "good.safetensors")
        for kind, path in _bad_files(good, Path(tmp)).items():
            cmd = [*apd_command(), "serve", "--checkpoint", str(path), "--port", str(free_port())]
            t0 = time.monotonic()
            proc = subprocess.run(
                cmd,
                cwd=ROOT,
                env=serve_env({"APD_REDIS_URL": ""}),
                capture_output=True,
                timeout=60,
                stdin=subprocess.DEVNULL,
            )
            stderr = proc.stderr.decode(errors="replace")
            lines = [ln for ln in stderr.splitlines() if ln.strip()]
            rows.append(
                {
                    "case": kind,
                    "exit_code": proc.returncode,
                    "stderr_lines": len(lines),
                    "traceback": "Traceback" in stderr,
                    "stderr": lines[0].replace(tmp, "$TMP") if lines else "",
                    "seconds": round(time.monotonic() - t0, 2),
                }
            )
    record = {
        "command": "python benchmarks/bad_checkpoints.py",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "cases": rows,
        "all_refused": all(
            r["exit_code"] == 1 and r["stderr_lines"] == 1 and not r["traceback"] for r in rows
        ),
    }
    md = [
        "# `apd serve` on bad checkpoints",
        "",
        f"Produced by `{record['command']}` on {record['started_at']} ({record['machine']}).",
        "Each: `apd serve --checkpoint BAD --port N`; no port is bound for any of them.",
        "",
        "| case | exit code | stderr lines | traceback | seconds | stderr |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        cells = [r["case"], r["exit_code"], r["stderr_lines"], r["traceback"], r["seconds"]]
        md.append("| " + " | ".join(str(c) for c in cells) + f" | `{r['stderr']}` |")
    md += ["", f"All refused with one line and exit code 1: **{record['all_refused']}**", ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bad_checkpoints.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / "bad_checkpoints.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0 if record["all_refused"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
