"""Dynamic batching of concurrent unseeded queries: queries wait for a compute slot together.

For a model whose per-network work dominates at batch 1 (fcNN2, LeNet-5: each network's
layers are read from memory once per forward, whatever the batch), N concurrent batch-1
queries each pay for the K networks again. Here the queries of one model version with the
same K that arrive while every compute slot is busy share the next free slot: one forward over
their stacked inputs and one draw of K pool networks, each query getting its own rows back
(continuous batching, as vLLM and Triton's dynamic batcher do it). A query that finds a slot
free runs at once, so batching costs a lone query nothing; ``delay_s`` (Triton's
``max_queue_delay``, default 0) lets a batch that has a slot wait that much longer for more
queries, and ``max_rows`` bounds a batch.

Only unseeded queries come here. An unseeded answer is K networks drawn at random from the
pool; sharing that draw with other queries changes no query's distribution. A seeded query
must get exactly the answer it gets alone, so it never joins a batch (its numbers could
differ in the last bit with the batch's size).

A batch runs in its own task and cancel scope: a query whose client leaves stops waiting at
once; when every query of a batch has left, the batch is cancelled, at its forward's next
chunk.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import anyio
import numpy as np
from numpy.typing import NDArray

from apd.uncertainty import PredictiveSummary

FloatArray = NDArray[np.float32]
# The forward of a whole batch, run while the batch holds a compute slot: it must not take one.
Forward = Callable[[int, FloatArray], Awaitable[PredictiveSummary]]


class Observer(Protocol):
    """Where batch sizes go (a Prometheus histogram: ``apd_batch_queries``)."""

    def observe(self, amount: float) -> None: ...


@dataclass(eq=False)
class _Batch:
    num_samples: int
    parts: list[FloatArray] = field(default_factory=list)
    waiters: list[asyncio.Future[PredictiveSummary]] = field(default_factory=list)
    rows: int = 0
    full: asyncio.Event = field(default_factory=asyncio.Event)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)


class DynamicBatcher:
    """Stacks queries of one model version; ``forward(K, x)`` answers a whole batch while
    the batch holds one of ``slots`` (the worker's compute limiter); each batch's number of
    queries goes to ``sizes``."""

    def __init__(
        self,
        forward: Forward,
        slots: anyio.CapacityLimiter,
        sizes: Observer,
        *,
        max_rows: int,
        delay_s: float = 0.0,
    ) -> None:
        if max_rows < 2 or delay_s < 0:
            raise ValueError("a batcher needs max_rows >= 2 and delay_s >= 0")
        self._forward = forward
        self._slots = slots
        self._sizes = sizes
        self.max_rows = max_rows
        self.delay_s = delay_s
        self._open: dict[int, _Batch] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def __call__(self, num_samples: int, x: FloatArray) -> PredictiveSummary:
        """The summary of ``x``'s rows, computed in a batch with whatever arrives with it."""
        batch = self._open.get(num_samples)
        if batch is None or batch.rows + len(x) > self.max_rows:
            if batch is not None:
                batch.full.set()
            batch = _Batch(num_samples)
            self._open[num_samples] = batch
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        start = batch.rows
        batch.parts.append(x)
        batch.rows += len(x)
        waiter: asyncio.Future[PredictiveSummary] = asyncio.get_running_loop().create_future()
        batch.waiters.append(waiter)
        if batch.rows >= self.max_rows:
            batch.full.set()
        try:
            summary = await waiter
        except BaseException:
            waiter.cancel()
            if all(w.cancelled() for w in batch.waiters):
                batch.scope.cancel()  # nobody waits for it any more
            raise
        return summary.rows(slice(start, start + len(x)))

    async def _run(self, batch: _Batch) -> None:
        with batch.scope:
            async with self._slots:  # queries keep joining until a slot is free
                if self.delay_s > 0 and not batch.full.is_set():
                    try:
                        await asyncio.wait_for(batch.full.wait(), self.delay_s)
                    except TimeoutError:
                        pass
                if self._open.get(batch.num_samples) is batch:
                    del self._open[batch.num_samples]
                x = batch.parts[0] if len(batch.parts) == 1 else np.concatenate(batch.parts)
                self._sizes.observe(len(batch.waiters))
                try:
                    summary = await self._forward(batch.num_samples, x)
                except Exception as exc:  # each waiter gets it (a cancellation is the scope's)
                    for w in batch.waiters:
                        if not w.done():
                            w.set_exception(exc)
                    return
            for w in batch.waiters:
                if not w.done():
                    w.set_result(summary)
        for w in batch.waiters:  # cancelled before the forward finished
            if not w.done():
                w.cancel()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            try:
                await task
            except BaseException:
                pass
