"""The code revision that results, checkpoints and benchmark records name."""

from __future__ import annotations

import subprocess
from pathlib import Path


def code_revision(repo: Path | None = None) -> str:
    """``git rev-parse HEAD`` of the repository holding this code, else ``"unknown"``."""
    where = repo or Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    rev = out.stdout.strip()
    return rev if len(rev) == 40 else "unknown"


def uncommitted_changes(repo: Path | None = None) -> bool | None:
    """Whether the working tree holding this code has local changes to tracked files
    (``None`` when git cannot tell)."""
    where = repo or Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip())
