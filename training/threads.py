"""Torch's CPU threads: a block run on a set number, and the line that says what a figure
was measured on."""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator
from pathlib import Path

import torch


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads (``None``: leave as is).

    The subspace GAN's matrices are tiny (100 x 40): on a busy 2-core machine a second
    thread made a generator step 100x slower (1.5 s instead of 14 ms), while the large
    forward passes ran as fast on one thread as on two.
    """
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name with its family, model and stepping numbers (``cpuinfo``: a
    virtual machine may name two CPU generations alike, e.g. "AMD EPYC"; the platform's name
    where there is none). Results of long stochastic runs (SGLD chains) are bit-for-bit
    reproducible only on the same CPU model: its math kernels round differently, and the
    chains amplify it."""
    with contextlib.suppress(OSError):
        fields: dict[str, str] = {}
        for line in cpuinfo.read_text().splitlines():
            key, sep, value = line.partition(":")
            if not sep:
                break  # the first processor's block ends at its blank line
            fields.setdefault(key.strip(), value.strip())
        if "model name" in fields:
            numbers = ", ".join(
                f"{label} {fields[key]}"
                for label, key in (
                    ("family", "cpu family"),
                    ("model", "model"),
                    ("stepping", "stepping"),
                )
                if key in fields
            )
            return fields["model name"] + (f" ({numbers})" if numbers else "")
    return platform.processor() or platform.machine()


def device_description(threads: int) -> str:
    """``"cpu: <model name>, N threads (of M cores)"``: what the numbers were measured on."""
    return f"cpu: {cpu_model()}, {threads} torch threads (of {os.cpu_count()} cores)"
