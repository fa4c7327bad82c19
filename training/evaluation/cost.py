"""Experiment 6: what each method costs to store and to serve.

* **bytes stored**: what must be kept to serve the predictive (:meth:`stored_bytes`): the
  weights of a point estimate or ensemble, the K = 100 SGLD samples a service would keep,
  the Gaussian's mean, diagonal and factor, the APD checkpoint file.
* **draw**: wall time to produce K networks (read K SGLD samples from the memory-mapped
  store, sample the Gaussian, run the generator; nothing for a fixed set);
* **predict**: wall time for the K networks' forward pass on a batch of inputs plus the
  uncertainty summary (:func:`apd.uncertainty.summarize`).

Each time is the median of ``repeats`` runs after one warm-up, on this machine's CPU with the
thread count in force (recorded in the report).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from training.evaluation.methods import PosteriorMethod
from training.evaluation.results import CostRecord


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(statistics.median(times))


def measure_cost(
    method: PosteriorMethod,
    x_batch: NDArray[np.float32],
    num_samples: int = 100,
    repeats: int = 5,
    seed: int = 0,
) -> CostRecord:
    """Bytes, draw time and predict time of ``method`` for K = ``num_samples`` networks."""
    members = method.draw(num_samples, seed)
    draw_s = _median_seconds(lambda: method.draw(num_samples, seed), repeats)
    predict_s = _median_seconds(lambda: members.summary(x_batch, seed), repeats)
    return CostRecord(
        method=method.key,
        stored_bytes=method.stored_bytes(),
        num_members=members.num_members,
        batch_size=len(x_batch),
        draw_seconds=draw_s,
        predict_seconds=predict_s,
    )
