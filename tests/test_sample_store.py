"""SampleStore (training/sample_store.py): round trip, validation, spread selection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from apd.networks import MLPSpec, build_spec
from training.errors import UserError
from training.sample_store import SampleStore, SampleStoreError

SPEC = MLPSpec("tiny", (3, 4, 2))  # P = 3*4 + 4 + 4*2 + 2 = 26
META = {"sampler": {"method": "sgld", "lr": 0.1}, "data_sha256": "ab" * 32}


def _write(path: Path, chains: int = 3, steps: int = 5, capacity: int | None = None) -> np.ndarray:
    """A store with ``steps`` appends of ``chains`` samples; returns the written thetas."""
    rng = np.random.default_rng(0)
    store = SampleStore.create(path, SPEC, capacity or chains * steps, META)
    written = []
    for s in range(steps):
        theta = rng.standard_normal((chains, SPEC.num_params)).astype(np.float32)
        store.append(theta, np.arange(chains), step=10 * (s + 1))
        written.append(theta)
    store.close()
    return np.concatenate(written)


def test_round_trip(tmp_path: Path) -> None:
    written = _write(tmp_path / "s", capacity=100)  # over-allocated: close() trims
    store = SampleStore.open(tmp_path / "s")
    assert isinstance(store.theta, np.memmap)
    assert store.theta.shape == (15, SPEC.num_params) and store.theta.dtype == np.float32
    np.testing.assert_array_equal(store.theta, written)
    np.testing.assert_array_equal(store.chain, np.tile(np.arange(3), 5))
    np.testing.assert_array_equal(store.step, np.repeat(np.arange(1, 6) * 10, 3))
    assert store.chain.dtype == np.int32 and store.step.dtype == np.int64
    assert store.spec == SPEC
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["format"] == "apd-samples" and meta["version"] == 1
    assert meta["num_samples"] == 15 and meta["num_chains"] == 3
    assert meta["num_params"] == SPEC.num_params and meta["layer_sizes"] == [3, 4, 2]
    assert meta["sampler"] == META["sampler"] and meta["data_sha256"] == META["data_sha256"]
    assert "created_at" in meta and meta["arch"] == "tiny"


def test_files_load_without_pickle(tmp_path: Path) -> None:
    _write(tmp_path / "s")
    for name in ("theta.npy", "chain.npy", "step.npy"):
        np.load(tmp_path / "s" / name, allow_pickle=False)


def test_store_is_an_error_the_cli_reports() -> None:
    assert issubclass(SampleStoreError, UserError)


@pytest.mark.parametrize("missing", ["theta.npy", "chain.npy", "step.npy", "meta.json"])
def test_missing_file(tmp_path: Path, missing: str) -> None:
    _write(tmp_path / "s")
    (tmp_path / "s" / missing).unlink()
    with pytest.raises(SampleStoreError, match=missing):
        SampleStore.open(tmp_path / "s")


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(SampleStoreError, match="does not exist"):
        SampleStore.open(tmp_path / "nope")


def _edit_meta(path: Path, **changes: object) -> None:
    meta = json.loads((path / "meta.json").read_text())
    meta.update(changes)
    (path / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"num_samples": 16}, "shape"),
        ({"num_params": 27}, "num_params"),
        ({"layer_sizes": [3, 5, 2]}, "num_params"),
        ({"format": "other"}, "not an apd-samples"),
        ({"version": 2}, "version 2"),
        ({"num_chains": 4}, "num_chains"),
    ],
)
def test_meta_mismatch(tmp_path: Path, changes: dict[str, object], match: str) -> None:
    _write(tmp_path / "s")
    _edit_meta(tmp_path / "s", **changes)
    with pytest.raises(SampleStoreError, match=match):
        SampleStore.open(tmp_path / "s")


def test_bad_json(tmp_path: Path) -> None:
    _write(tmp_path / "s")
    (tmp_path / "s" / "meta.json").write_text("{not json")
    with pytest.raises(SampleStoreError, match="not valid JSON"):
        SampleStore.open(tmp_path / "s")


def test_wrong_dtype(tmp_path: Path) -> None:
    written = _write(tmp_path / "s")
    np.save(tmp_path / "s" / "theta.npy", written.astype(np.float64))
    with pytest.raises(SampleStoreError, match="dtype float64"):
        SampleStore.open(tmp_path / "s")


def test_pickled_array_is_refused(tmp_path: Path) -> None:
    _write(tmp_path / "s")
    np.save(tmp_path / "s" / "chain.npy", np.array([{"a": 1}] * 15, dtype=object))
    with pytest.raises(SampleStoreError, match=r"chain\.npy"):
        SampleStore.open(tmp_path / "s")


def test_truncated_theta(tmp_path: Path) -> None:
    _write(tmp_path / "s")
    f = tmp_path / "s" / "theta.npy"
    f.write_bytes(f.read_bytes()[:-50])
    with pytest.raises(SampleStoreError, match=r"theta\.npy"):
        SampleStore.open(tmp_path / "s")


def test_nan_is_refused_on_open(tmp_path: Path) -> None:
    written = _write(tmp_path / "s")
    written[7, 3] = np.nan
    np.save(tmp_path / "s" / "theta.npy", written)
    with pytest.raises(SampleStoreError, match="sample 7 contains NaN"):
        SampleStore.open(tmp_path / "s")


def test_append_validates(tmp_path: Path) -> None:
    store = SampleStore.create(tmp_path / "s", SPEC, 4, META)
    with pytest.raises(SampleStoreError, match="append expects"):
        store.append(np.zeros((2, 5), np.float32), np.arange(2), 1)
    with pytest.raises(SampleStoreError, match="non-finite"):
        store.append(np.full((1, SPEC.num_params), np.inf, np.float32), [0], 1)
    store.append(np.zeros((4, SPEC.num_params), np.float32), np.arange(4), 1)
    with pytest.raises(SampleStoreError, match="full"):
        store.append(np.zeros((1, SPEC.num_params), np.float32), [0], 2)


def test_create_validates_meta(tmp_path: Path) -> None:
    with pytest.raises(SampleStoreError, match="missing"):
        SampleStore.create(tmp_path / "a", SPEC, 4, {"sampler": {}})
    with pytest.raises(SampleStoreError, match="may not set"):
        SampleStore.create(tmp_path / "b", SPEC, 4, {**META, "num_samples": 3})
    _write(tmp_path / "c")
    with pytest.raises(SampleStoreError, match="already holds"):
        SampleStore.create(tmp_path / "c", SPEC, 4, META)


def test_close_without_samples(tmp_path: Path) -> None:
    store = SampleStore.create(tmp_path / "s", SPEC, 4, META)
    with pytest.raises(SampleStoreError, match="no samples"):
        store.close()


def _store_with(tmp_path: Path, counts: list[int]) -> SampleStore:
    """Chains with the given sample counts, appended interleaved as a sampler would."""
    store = SampleStore.create(tmp_path / "s", SPEC, sum(counts), META)
    for s in range(max(counts)):
        ids = [c for c, n in enumerate(counts) if n > s]
        store.append(np.full((len(ids), SPEC.num_params), s, np.float32), ids, step=s)
    store.close()
    return SampleStore.open(tmp_path / "s")


def test_select_spread_balances_chains_and_time(tmp_path: Path) -> None:
    store = _store_with(tmp_path, [100, 100, 100, 100])
    idx = store.select_spread(20)
    assert len(idx) == 20 and len(set(idx.tolist())) == 20
    assert np.all(np.diff(idx) > 0)
    for c in range(4):
        steps = np.sort(store.step[idx][store.chain[idx] == c])
        # 5 per chain, evenly spaced by 20 steps and ending at the chain's last sample
        np.testing.assert_array_equal(steps, [19, 39, 59, 79, 99])


def test_select_spread_uneven_chains(tmp_path: Path) -> None:
    store = _store_with(tmp_path, [2, 50, 30])
    idx = store.select_spread(30)
    per_chain = np.bincount(store.chain[idx], minlength=3)
    assert per_chain.tolist() == [2, 14, 14]  # the short chain gives all it has
    assert len(set(idx.tolist())) == 30
    idx = store.select_spread(10)
    assert sorted(np.bincount(store.chain[idx], minlength=3).tolist()) == [2, 4, 4]


def test_select_spread_all_and_too_many(tmp_path: Path) -> None:
    store = _store_with(tmp_path, [3, 4])
    np.testing.assert_array_equal(store.select_spread(7), np.arange(7))
    with pytest.raises(ValueError):
        store.select_spread(8)
    with pytest.raises(ValueError):
        store.select_spread(0)


def _write_run(path: Path, seed: int, chains: int = 2, **sampler: object) -> np.ndarray:
    rng = np.random.default_rng(seed)
    meta = {
        "sampler": {"method": "sgld", "lr": 0.1, "seed": seed, **sampler},
        "data_sha256": "ab" * 32,
    }
    store = SampleStore.create(path, SPEC, chains * 3, meta)
    written = []
    for s in range(3):
        theta = rng.standard_normal((chains, SPEC.num_params)).astype(np.float32)
        store.append(theta, np.arange(chains), step=10 * (s + 1))
        written.append(theta)
    store.close()
    return np.concatenate(written)


def test_runs_made_independently_merge_into_one_posterior(tmp_path: Path) -> None:
    a = _write_run(tmp_path / "a", seed=0, chains=2)
    b = _write_run(tmp_path / "b", seed=1, chains=3)
    merged = SampleStore.merge([SampleStore.open(tmp_path / "a"), SampleStore.open(tmp_path / "b")])
    assert len(merged) == len(a) + len(b) == 15
    np.testing.assert_array_equal(merged.theta, np.concatenate([a, b]))
    np.testing.assert_array_equal(np.unique(merged.chain), np.arange(5))  # 2 + 3 chains
    np.testing.assert_array_equal(merged.chain[len(a) :], np.tile(np.arange(3), 3) + 2)
    assert merged.meta["num_chains"] == 5 and merged.meta["sampler"]["seed"] == [0, 1]
    assert merged.meta["runs"] == [str(tmp_path / "a"), str(tmp_path / "b")]
    rows = merged.select_spread(10)  # every chain contributes: 2 each
    assert sorted(np.bincount(merged.chain[rows]).tolist()) == [2, 2, 2, 2, 2]


@pytest.mark.parametrize(
    ("other", "reason"),
    [
        ({"seed": 0}, "share a seed"),
        ({"seed": 1, "lr": 0.2}, r"sampler settings \['lr'\]"),
    ],
)
def test_runs_of_different_posteriors_are_not_merged(
    tmp_path: Path, other: dict[str, object], reason: str
) -> None:
    _write_run(tmp_path / "a", seed=0)
    seed = int(other.pop("seed"))  # type: ignore[call-overload]
    _write_run(tmp_path / "b", seed=seed, **other)
    with pytest.raises(SampleStoreError, match=reason):
        SampleStore.merge([SampleStore.open(tmp_path / "a"), SampleStore.open(tmp_path / "b")])


def test_runs_on_other_data_or_architecture_are_not_merged(tmp_path: Path) -> None:
    _write_run(tmp_path / "a", seed=0)
    meta = {"sampler": {"method": "sgld", "lr": 0.1, "seed": 1}, "data_sha256": "cd" * 32}
    store = SampleStore.create(tmp_path / "b", SPEC, 2, meta)
    store.append(np.zeros((2, SPEC.num_params), np.float32), np.arange(2), step=1)
    store.close()
    with pytest.raises(SampleStoreError, match="different data"):
        SampleStore.merge([SampleStore.open(tmp_path / "a"), SampleStore.open(tmp_path / "b")])
    wide = MLPSpec("wide", (3, 5, 2))
    meta["data_sha256"] = "ab" * 32
    store = SampleStore.create(tmp_path / "c", wide, 2, meta)
    store.append(np.zeros((2, wide.num_params), np.float32), np.arange(2), step=1)
    store.close()
    with pytest.raises(SampleStoreError, match="different architectures"):
        SampleStore.merge([SampleStore.open(tmp_path / "a"), SampleStore.open(tmp_path / "c")])


def test_runs_that_read_their_data_differently_are_not_merged(tmp_path: Path) -> None:
    """Same data file (fingerprint), other validation split: other training examples, so
    another posterior. A different path to the same data is fine (another machine)."""
    spec = {"source": "/a/data.npz", "val_fraction": 0.2, "split_seed": 0}
    for name, seed, data in (
        ("a", 0, spec),
        ("b", 1, {**spec, "source": "/elsewhere/data.npz"}),
        ("c", 2, {**spec, "split_seed": 1}),
    ):
        meta = {"sampler": {"lr": 0.1, "seed": seed}, "data_sha256": "ab" * 32, "data": data}
        store = SampleStore.create(tmp_path / name, SPEC, 2, meta)
        store.append(np.zeros((2, SPEC.num_params), np.float32), np.arange(2), step=1)
        store.close()
    a, b, c = (SampleStore.open(tmp_path / n) for n in "abc")
    assert len(SampleStore.merge([a, b])) == 4
    with pytest.raises(SampleStoreError, match=r"read their data differently \(split_seed\)"):
        SampleStore.merge([a, c])


def test_a_cnn_store_round_trips(tmp_path: Path) -> None:
    spec = build_spec("cnn:conv2x3,pool2,fc4", (1, 8, 8), 3)
    meta = {"sampler": {"lr": 0.1}, "data_sha256": "ab" * 32}
    store = SampleStore.create(tmp_path / "s", spec, 2, meta)
    theta = np.random.default_rng(0).standard_normal((2, spec.num_params)).astype(np.float32)
    store.append(theta, np.arange(2), step=1)
    store.close()
    record = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert "layer_sizes" not in record and record["input_shape"] == [1, 8, 8]
    assert record["layers"][0] == {
        "type": "conv2d",
        "out_channels": 2,
        "kernel_size": 3,
        "padding": 0,
        "output_shape": [2, 6, 6],
    }
    opened = SampleStore.open(tmp_path / "s")
    assert opened.spec == spec
    np.testing.assert_array_equal(opened.theta, theta)
    _edit_meta(tmp_path / "s", num_params=spec.num_params + 1)
    with pytest.raises(SampleStoreError, match="num_params"):
        SampleStore.open(tmp_path / "s")
