"""The run directory ``apd train`` writes and the evaluation reads.

* ``config.json``: every flag, resolved, with the data, the network and the code version;
* ``metrics.json``: the method's validation (and test) metrics, wall time and device;
* ``samples/`` (SGLD): a :class:`~training.sample_store.SampleStore`; or
  ``weights.safetensors`` (SGD, MC-Dropout): tensor ``theta (1, P)``;
* ``READY``: an empty file written last, so a reader can tell a finished run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

CONFIG_FILE: Final = "config.json"
METRICS_FILE: Final = "metrics.json"
WEIGHTS_FILE: Final = "weights.safetensors"
SAMPLES_DIR: Final = "samples"
READY_FILE: Final = "READY"


def is_finished(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a finished run (its ``READY`` file, written last)."""
    return (run_dir / READY_FILE).is_file()
