"""Dynamic batching (service.core.batching): concurrent unseeded queries of one model version
and K share one forward and get their own rows; seeded queries never join a batch and get
exactly their answer alone; a batch that nobody waits for any more is cancelled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from apd.checkpoint import load_checkpoint
from apd.uncertainty import PredictiveSummary, summarize
from service.api.app import serving_config
from service.config import Settings
from service.core.batching import DynamicBatcher
from service.core.model import Query, Resources, ServedModel
from service.infra.cache import LocalBlockCache
from service.infra.telemetry import Metrics
from tests.service_support import make_checkpoint, random_images


class _Sizes:
    """Batch sizes, as the batcher reports them."""

    def __init__(self) -> None:
        self.seen: list[float] = []

    def observe(self, amount: float) -> None:
        self.seen.append(amount)


def batched_queries(model: ServedModel) -> tuple[float, float]:
    """(batches, queries) the model's batcher answered, from ``apd_batch_queries``."""
    labels = {"model": model.name, "version": str(model.version)}
    registry = model.metrics.registry
    count = registry.get_sample_value("apd_batch_queries_count", labels) or 0.0
    total = registry.get_sample_value("apd_batch_queries_sum", labels) or 0.0
    return count, total


def fake_summary(k: int, x: np.ndarray) -> PredictiveSummary:
    """A summary whose rows say which input and K made them (an independent reference)."""
    logits = np.stack([x[:, :3] * (j + 1) for j in range(k)])
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return summarize(p)


def test_concurrent_queries_share_one_forward_and_get_their_own_rows() -> None:
    calls: list[tuple[int, int]] = []

    async def forward(k: int, x: np.ndarray) -> PredictiveSummary:
        calls.append((k, len(x)))
        await anyio.sleep(0)
        return fake_summary(k, x)

    batcher = DynamicBatcher(forward, anyio.CapacityLimiter(1), _Sizes(), max_rows=64)
    rng = np.random.default_rng(0)
    xs = [rng.random((n, 5)) for n in (1, 2, 1, 3)]
    got: dict[int, PredictiveSummary] = {}

    async def ask(i: int, k: int) -> None:
        got[i] = await batcher(k, xs[i])

    async def run() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, 0, 10)
            tg.start_soon(ask, 1, 10)
            tg.start_soon(ask, 2, 20)  # another K: its own batch
            tg.start_soon(ask, 3, 10)

    anyio.run(run)
    assert sorted(calls) == [(10, 6), (20, 1)]
    for i, k in ((0, 10), (1, 10), (2, 20), (3, 10)):
        np.testing.assert_allclose(got[i].probabilities, fake_summary(k, xs[i]).probabilities)
        np.testing.assert_allclose(
            got[i].mutual_information, fake_summary(k, xs[i]).mutual_information
        )


def test_a_lone_query_runs_at_once_and_those_arriving_while_busy_share_the_next_slot() -> None:
    sizes: list[int] = []

    async def forward(k: int, x: np.ndarray) -> PredictiveSummary:
        sizes.append(len(x))
        await anyio.sleep(0.2)
        return fake_summary(k, x)

    batcher = DynamicBatcher(forward, anyio.CapacityLimiter(1), _Sizes(), max_rows=64)
    waited: list[float] = []

    async def ask(after_s: float) -> None:
        await anyio.sleep(after_s)
        t0 = anyio.current_time()
        await batcher(10, np.ones((1, 5)))
        waited.append(anyio.current_time() - t0)

    async def run() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, 0.0)  # alone: runs at once
            for i in range(5):  # arrive while the slot is busy: one batch after it
                tg.start_soon(ask, 0.02 + 0.01 * i)

    anyio.run(run)
    assert sizes == [1, 5]
    assert min(waited) < 0.3  # the lone query did not wait for anyone


def test_a_full_batch_runs_at_once_and_the_next_query_opens_another() -> None:
    sizes: list[int] = []

    async def forward(k: int, x: np.ndarray) -> PredictiveSummary:
        sizes.append(len(x))
        return fake_summary(k, x)

    # One slot, held by the first batch while the others fill; a long delay: only fullness
    # runs a batch that has its slot.
    batcher = DynamicBatcher(forward, anyio.CapacityLimiter(1), _Sizes(), max_rows=4, delay_s=10.0)

    async def run() -> None:
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                for _ in range(8):
                    tg.start_soon(batcher, 10, np.ones((1, 5)))

    anyio.run(run)
    assert sizes == [4, 4]


def test_a_batch_nobody_waits_for_is_cancelled() -> None:
    started, finished = anyio.Event(), []

    async def forward(k: int, x: np.ndarray) -> PredictiveSummary:
        started.set()
        await anyio.sleep(5)
        finished.append(True)
        return fake_summary(k, x)

    batcher = DynamicBatcher(forward, anyio.CapacityLimiter(1), _Sizes(), max_rows=64)

    async def run() -> None:
        with anyio.move_on_after(0.2):
            await batcher(10, np.ones((1, 5)))
        assert started.is_set()
        await anyio.sleep(0.1)
        assert not batcher._tasks, "the batch still runs"

    anyio.run(run)
    assert finished == []


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("batching") / "model.safetensors")


async def _model(path: Path, max_rows: int) -> ServedModel:
    settings = Settings(checkpoint=path, batch_max_rows=max_rows, batch_delay_ms=50, pool_size=30)
    resources = Resources(
        serving_config(settings),
        Metrics(),
        anyio.CapacityLimiter(2),
        LocalBlockCache(1 << 24),
        None,
    )
    return await ServedModel.load("m", 1, load_checkpoint(path), resources)


def test_seeded_queries_are_never_batched_and_answer_as_alone(ckpt_path: Path) -> None:
    x = random_images(4, seed=2).astype(np.float32)

    async def run() -> tuple[dict[int, Any], list[Any]]:
        batched = await _model(ckpt_path, max_rows=64)
        alone = await _model(ckpt_path, max_rows=1)
        reference = [await alone.predict(Query(x[i : i + 1], 30, seed=9)) for i in range(4)]
        # K = the pool's 30 networks: an unseeded answer is the whole pool, so known.
        whole_pool = [await alone.predict(Query(x[i : i + 1], 30)) for i in range(4)]
        answers: dict[int, Any] = {}

        async def ask(i: int) -> None:
            answers[i] = await batched.predict(Query(x[i : i + 1], 30, seed=9))

        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(ask, i)
        assert batched.batcher is not None and batched_queries(batched) == (0, 0)
        for i in range(4):
            assert np.array_equal(answers[i].probabilities, reference[i].probabilities)
            assert np.array_equal(answers[i].scores, reference[i].scores)
        # Unseeded: one batch for the four, each row a valid answer of K pool networks.
        pooled: dict[int, Any] = {}

        async def ask_pool(i: int) -> None:
            pooled[i] = await batched.predict(Query(x[i : i + 1], 30))

        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(ask_pool, i)
        assert batched_queries(batched) == (1, 4)
        # K beyond the pool: the batch draws the pool stream's next blocks while it holds its
        # compute slot.
        beyond = await batched.predict(Query(x[:2], 45))
        assert beyond.num_samples == 45 and beyond.probabilities.shape == (2, 10)
        return pooled, whole_pool

    pooled, whole_pool = anyio.run(run)
    for i in range(4):  # its own row of the batch: the answer it gets alone, to rounding
        np.testing.assert_allclose(pooled[i].probabilities, whole_pool[i].probabilities, rtol=1e-5)
        np.testing.assert_allclose(pooled[i].scores, whole_pool[i].scores, rtol=1e-4, atol=1e-9)
