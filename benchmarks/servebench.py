"""What the serving benchmarks share: the record's header, real MNIST test digits, a check that
``apd serve`` has the flags a benchmark needs, round-robin timing and checkpoints of the real
architectures.

Used by :mod:`benchmarks.batching`, :mod:`benchmarks.seeded_k`,
:mod:`benchmarks.repository_churn` and :mod:`benchmarks.serve_latency` (imported as
``servebench`` with ``benchmarks/`` on ``sys.path``, as :mod:`loadgen` is). Only the public
interfaces are used: the ``apd serve`` command line and HTTP.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

ROOT: Final = Path(__file__).resolve().parents[1]
RESULTS: Final = ROOT / "benchmarks" / "results"
SHIPPED: Final = ROOT / "models" / "mnist-fcnn1" / "model.safetensors"


class MissingFeature(SystemExit):
    """The server lacks what a benchmark measures: exits with a message that says so."""

    def __init__(self, what: str) -> None:
        super().__init__(f"apd serve cannot run this benchmark: {what}")


# --- the record ----------------------------------------------------------------------------


def uptime() -> str:
    """``uptime``'s line (the machine's load), or the load averages where it is missing."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def header(argv: Sequence[str]) -> dict[str, Any]:
    """Command, revision (and whether service/ or apd/ had uncommitted changes), machine, time
    and ``uptime`` before the run."""
    from training.revision import code_revision

    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "apd", "service", "apd_cli"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()
    script = Path(argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return {
        "command": "python " + shlex.join([str(shown), *argv[1:]]),
        "revision": code_revision(ROOT)[:10],
        "uncommitted_changes": bool(dirty),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "uptime_before": uptime(),
    }


def header_lines(r: dict[str, Any]) -> list[str]:
    """The markdown lines that say how a record was made."""
    dirty = " (with uncommitted changes to apd/ or service/)" if r["uncommitted_changes"] else ""
    return [
        f"`{r['command']}` at revision {r['revision']}{dirty}, {r['started_at']}; {r['machine']}.",
        f"Load before: `{r['uptime_before']}`; after: `{r.get('uptime_after', '?')}`.",
    ]


# --- inputs and checkpoints ----------------------------------------------------------------


@functools.cache
def mnist_test_digits() -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """The 10,000 MNIST test digits (pixels / 255) and labels, from ``APD_DATA_DIR``."""
    from training.errors import UserError
    from training.mnist import load_mnist

    try:
        mnist = load_mnist(os.environ.get("APD_DATA_DIR"), download=False)
    except UserError as exc:
        raise SystemExit(f"MNIST test digits needed (set APD_DATA_DIR): {exc}") from exc
    return np.asarray(mnist.test_x, np.float32), np.asarray(mnist.test_y, np.int64)


ARCH_CHECKPOINTS: Final[dict[str, dict[str, Any]]] = {
    # The shape of the distilled fcNN2 (docs/results/fcnn2/report.md: 784-400-400-10, subspace
    # rank 46; generator noise 32, hidden 85-85-100-100-100, float16 basis), as
    # benchmarks/serve_latency.py --arch fcnn2 serves it.
    "fcnn2": {"noise_dim": 32, "hidden": (85, 85, 100, 100, 100), "rank": 46},
    # LeNet-5 as apd.networks names it (conv6x5p2, pool2, conv16x5, pool2, fc120, fc84, fc10),
    # with apd distill's default generator (noise 32, hidden 100-100-100, rank 46, float16).
    "lenet5": {"noise_dim": 32, "hidden": (100, 100, 100), "rank": 46},
}


def arch_checkpoint(arch: str, path: Path, *, seed: int = 0, model_id: str | None = None) -> Path:
    """A random checkpoint whose target network is the real ``arch`` (speed does not depend on
    the weights): :data:`ARCH_CHECKPOINTS` says its generator."""
    from apd.networks import get_spec
    from tests.service_support import make_checkpoint

    return make_checkpoint(
        path,
        spec=get_spec(arch),
        basis_dtype="float16",
        seed=seed,
        model_id=model_id or f"random-{arch}",
        **ARCH_CHECKPOINTS[arch],
    )


# --- the server ----------------------------------------------------------------------------


@functools.cache
def serve_help() -> str:
    """``apd serve --help``."""
    from tests.harness import apd_command, serve_env

    out = subprocess.run(
        [*apd_command(), "serve", "--help"],
        capture_output=True,
        text=True,
        env=serve_env(),
        cwd=ROOT,
        timeout=120,
    )
    if out.returncode != 0:
        raise SystemExit(f"apd serve --help failed:\n{out.stderr[-2000:]}")
    return out.stdout


def serve_flags() -> frozenset[str]:
    """Every ``--flag`` that ``apd serve --help`` lists."""
    return frozenset(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", serve_help()))


def serve_default(flag: str) -> str | None:
    """The default ``apd serve --help`` states for ``flag`` (None if it states none)."""
    options = serve_help().split("options:", 1)[-1]
    m = re.search(rf"^\s+{re.escape(flag)}\b.*?\(default:\s*([^)]*)\)", options, re.M | re.S)
    return " ".join(m.group(1).split()) if m else None


def require_flags(*flags: str, why: str) -> None:
    """Exit with a message naming the flags ``apd serve`` lacks (``why``: the feature)."""
    missing = [f for f in flags if f not in serve_flags()]
    if missing:
        raise MissingFeature(f"it has no {', '.join(missing)} ({why}; `apd serve --help`)")


def require_route(response: Any, what: str) -> Any:
    """``response`` (httpx), unless it is a 404/405 from a route the server does not have."""
    if response.status_code in (404, 405) and "error" not in response.text[:200]:
        raise MissingFeature(
            f"{response.request.method} {response.request.url.path} is "
            f"{response.status_code}: {what}"
        )
    return response


# --- timing ---------------------------------------------------------------------------------

BLOCKS: Final = 4


def interleaved(
    variants: dict[str, Callable[[], object]], n: int, warmup: int = 3
) -> dict[str, list[float]]:
    """Seconds of each of ``n`` calls of each variant, taken in :data:`BLOCKS` blocks per
    variant, round-robin, so that all variants share the machine's load.

    Calls alternate by block, not one by one: after a call, BLAS and OpenMP threads spin for a
    while (OpenBLAS, torch's OpenMP, the server's), and a variant run right after another
    one's call competes with those threads on 2 cores (measured 2-5x slower); a pause of
    0.3 s before each block lets them sleep, and each block starts with untimed warm-up
    calls."""
    per_block = max(1, n // BLOCKS)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(BLOCKS):
        for name, fn in variants.items():
            time.sleep(0.3)
            for _ in range(warmup):
                fn()
            for _ in range(per_block):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return times
