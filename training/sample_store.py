"""On-disk store of posterior samples: memory-mapped ``.npy`` arrays plus JSON metadata.

A run's ``samples/`` folder holds

* ``theta.npy``  float32 ``(S, P)``: sample s is one flat parameter vector in the layout of
  :mod:`apd.networks` (written through ``np.lib.format.open_memmap``, read with
  ``np.load(mmap_mode="r", allow_pickle=False)``, so loading never runs pickle and never
  reads the whole file into memory);
* ``chain.npy``  int32 ``(S,)``: the chain each sample came from;
* ``step.npy``   int64 ``(S,)``: the sampler step after which it was taken;
* ``meta.json``: ``{format: "apd-samples", version: 1, arch, layer_sizes, num_params,
  num_samples, num_chains, sampler: {...settings}, data_sha256, created_at}``, written last
  by :meth:`SampleStore.close`, so a folder without it is an unfinished run. A CNN's store
  has ``input_shape`` and ``layers`` (:meth:`apd.networks.CNNSpec.to_dict`) instead of
  ``layer_sizes``. Runs of ``apd train`` also record ``data`` (the
  :class:`training.own_data.DataSpec` the samples were drawn on).

:meth:`SampleStore.open` checks all of it and raises :class:`SampleStoreError` (a
:class:`~training.errors.UserError`) with a one-line reason.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from apd.networks import NetworkSpec, spec_from_dict
from training.errors import UserError

FORMAT_NAME: Final = "apd-samples"
FORMAT_VERSION: Final = 1
THETA: Final = "theta.npy"
CHAIN: Final = "chain.npy"
STEP: Final = "step.npy"
META: Final = "meta.json"
_REQUIRED_META: Final = ("sampler", "data_sha256")
_RESERVED_META: Final = (
    "format",
    "version",
    "arch",
    "layer_sizes",
    "input_shape",
    "layers",
    "num_params",
    "num_samples",
    "num_chains",
    "created_at",
)


class SampleStoreError(UserError):
    """A sample folder that cannot be read or written, with the reason in one line."""


def _check_finite_rows(theta: NDArray[np.float32], path: Path, rows: int = 4096) -> None:
    """NaN/Inf check in blocks, so a multi-GB memmap is never copied whole."""
    for start in range(0, theta.shape[0], rows):
        block = np.asarray(theta[start : start + rows])
        if not np.isfinite(block).all():
            bad = start + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
            raise SampleStoreError(f"{path}: sample {bad} contains NaN or Inf")


class SampleStore:
    """Posterior samples of one architecture, held in a folder (see the module docstring)."""

    def __init__(
        self,
        path: Path,
        spec: NetworkSpec,
        theta: NDArray[np.float32],
        chain: NDArray[np.int32],
        step: NDArray[np.int64],
        meta: dict[str, Any],
        size: int,
        writable: bool,
    ) -> None:
        self._path = path
        self._spec = spec
        self._theta = theta
        self._chain = chain
        self._step = step
        self._meta = meta
        self._size = size
        self._writable = writable

    # -- writing -------------------------------------------------------------------------

    @classmethod
    def create(
        cls, path: str | Path, spec: NetworkSpec, capacity: int, meta: Mapping[str, Any]
    ) -> SampleStore:
        """A new, empty store for up to ``capacity`` samples in ``path`` (created).

        ``meta`` must hold ``sampler`` (the settings, a JSON object) and ``data_sha256``;
        other JSON-serialisable keys are kept. The store fills in the format, the
        architecture, the counts and ``created_at``.
        """
        path = Path(path)
        if capacity <= 0:
            raise SampleStoreError(f"capacity must be positive, got {capacity}")
        missing = [k for k in _REQUIRED_META if k not in meta]
        if missing:
            raise SampleStoreError(f"sample store meta is missing {missing}")
        clash = [k for k in _RESERVED_META if k in meta]
        if clash:
            raise SampleStoreError(f"sample store meta may not set {clash}; the store fills them")
        try:
            json.dumps(dict(meta))
        except TypeError as exc:
            raise SampleStoreError(f"sample store meta is not JSON-serialisable: {exc}") from None
        if (path / META).exists():
            raise SampleStoreError(f"{path} already holds a finished sample store")
        path.mkdir(parents=True, exist_ok=True)
        theta = np.lib.format.open_memmap(
            path / THETA, mode="w+", dtype=np.float32, shape=(capacity, spec.num_params)
        )
        chain = np.full(capacity, -1, dtype=np.int32)
        step = np.full(capacity, -1, dtype=np.int64)
        return cls(path, spec, theta, chain, step, dict(meta), 0, writable=True)

    def append(
        self,
        theta: NDArray[np.floating] | Any,
        chain_ids: NDArray[np.integer] | Any,
        step: int,
    ) -> None:
        """Write samples ``theta (C, P)`` from chains ``chain_ids (C,)`` taken at ``step``."""
        if not self._writable:
            raise SampleStoreError(f"{self._path} is open read-only")
        t = np.asarray(theta, dtype=np.float32)
        ids = np.asarray(chain_ids, dtype=np.int64).reshape(-1)
        if t.ndim != 2 or t.shape[1] != self._spec.num_params or t.shape[0] != ids.shape[0]:
            raise SampleStoreError(
                f"append expects theta (C, {self._spec.num_params}) and chain_ids (C,), "
                f"got {t.shape} and {ids.shape}"
            )
        if not np.isfinite(t).all():
            raise SampleStoreError(f"refusing to store non-finite samples at step {step}")
        end = self._size + t.shape[0]
        if end > self._theta.shape[0]:
            raise SampleStoreError(f"sample store is full ({self._theta.shape[0]} samples)")
        self._theta[self._size : end] = t
        self._chain[self._size : end] = ids
        self._step[self._size : end] = step
        self._size = end

    def close(self) -> None:
        """Trim the arrays to what was written, then write ``meta.json`` (last)."""
        if not self._writable:
            return
        n = self._size
        if n == 0:
            raise SampleStoreError(f"no samples were written to {self._path}")
        capacity = self._theta.shape[0]
        if isinstance(self._theta, np.memmap):
            self._theta.flush()
        del self._theta
        theta_path = self._path / THETA
        if n < capacity:
            src = np.load(theta_path, mmap_mode="r", allow_pickle=False)
            tmp = self._path / "theta.tmp.npy"
            dst = np.lib.format.open_memmap(
                tmp, mode="w+", dtype=np.float32, shape=(n, self._spec.num_params)
            )
            for start in range(0, n, 1024):
                dst[start : min(n, start + 1024)] = src[start : min(n, start + 1024)]
            dst.flush()
            del dst, src
            tmp.replace(theta_path)
        np.save(self._path / CHAIN, self._chain[:n], allow_pickle=False)
        np.save(self._path / STEP, self._step[:n], allow_pickle=False)
        network = self._spec.to_dict()
        del network["name"], network["activation"]
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "arch": self._spec.name,
            **network,
            "num_samples": n,
            "num_chains": len(np.unique(self._chain[:n])),
            **self._meta,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        (self._path / META).write_text(json.dumps(meta, indent=2) + "\n")
        opened = SampleStore.open(self._path)
        self.__dict__.update(opened.__dict__)

    # -- reading -------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path) -> SampleStore:
        """Open a finished store read-only (memory-mapped), validating files against meta."""
        path = Path(path)
        if not path.is_dir():
            raise SampleStoreError(f"sample folder {path} does not exist")
        for name in (META, THETA, CHAIN, STEP):
            if not (path / name).is_file():
                raise SampleStoreError(f"{path} has no {name}; is the run finished?")
        try:
            meta = json.loads((path / META).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SampleStoreError(f"{path / META} is not valid JSON: {exc}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise SampleStoreError(f"{path / META} is not an {FORMAT_NAME} store")
        if meta.get("version") != FORMAT_VERSION:
            raise SampleStoreError(
                f"{path}: store version {meta.get('version')} is not supported "
                f"(this build reads {FORMAT_VERSION})"
            )
        try:
            num_samples = int(meta["num_samples"])
            num_params = int(meta["num_params"])
            num_chains = int(meta["num_chains"])
            spec = spec_from_dict(meta)
        except (KeyError, TypeError) as exc:
            raise SampleStoreError(f"{path / META} is missing or has a bad field: {exc}") from None
        except ValueError as exc:
            raise SampleStoreError(f"{path}: {exc}") from None
        missing = [k for k in _REQUIRED_META if k not in meta]
        if missing:
            raise SampleStoreError(f"{path / META} is missing {missing}")
        arrays: dict[str, np.ndarray] = {}
        expected = {
            THETA: (np.dtype(np.float32), (num_samples, num_params)),
            CHAIN: (np.dtype(np.int32), (num_samples,)),
            STEP: (np.dtype(np.int64), (num_samples,)),
        }
        for name, (dtype, shape) in expected.items():
            try:
                arr = np.load(path / name, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                raise SampleStoreError(
                    f"{path / name} is not a readable .npy file: {exc}"
                ) from None
            if arr.dtype != dtype:
                raise SampleStoreError(f"{path / name} has dtype {arr.dtype}, expected {dtype}")
            if arr.shape != shape:
                raise SampleStoreError(
                    f"{path / name} has shape {arr.shape}, but meta.json implies {shape}"
                )
            arrays[name] = arr
        chain = np.asarray(arrays[CHAIN])
        if num_samples and (chain.min() < 0 or len(np.unique(chain)) != num_chains):
            raise SampleStoreError(
                f"{path}: chain ids do not match num_chains {num_chains} in meta.json"
            )
        _check_finite_rows(arrays[THETA], path / THETA)
        return cls(
            path,
            spec,
            arrays[THETA],
            chain,
            np.asarray(arrays[STEP]),
            meta,
            num_samples,
            writable=False,
        )

    @classmethod
    def merge(cls, stores: Sequence[SampleStore]) -> SampleStore:
        """One read-only store of the samples of runs made independently (on several
        machines, or an Indexed Job's pods), as if one run had sampled all their chains.

        The runs must share the architecture, the data fingerprint and every sampler setting
        but the seed (the posterior they sample); chain ids are renumbered so that chains stay
        distinct (run i's chain c becomes ``c + chains of runs 0..i-1``). The merged arrays
        are held in memory (S x P float32); ``meta["runs"]`` lists the source folders.
        """
        if not stores:
            raise SampleStoreError("nothing to merge")
        first = stores[0]
        if len(stores) == 1:
            return first
        seeds = []
        for other in stores:
            where = f"{other.path} and {first.path}"
            if other.spec != first.spec:
                raise SampleStoreError(
                    f"{where} hold different architectures ({other.spec} vs {first.spec}); "
                    "runs to merge must share one"
                )
            if other.meta.get("data_sha256") != first.meta.get("data_sha256"):
                raise SampleStoreError(f"{where} were sampled on different data (data_sha256)")
            # The same data read the same way (split, preprocessing); the path may differ.
            read = [
                {k: v for k, v in (s.meta.get("data") or {}).items() if k != "source"}
                for s in (other, first)
            ]
            if read[0] != read[1]:
                diff = sorted(
                    k for k in read[0].keys() | read[1].keys() if read[0].get(k) != read[1].get(k)
                )
                raise SampleStoreError(
                    f"{where} read their data differently ({', '.join(diff)}); runs to merge "
                    "must share the split and preprocessing"
                )
            a = {k: v for k, v in dict(other.meta["sampler"]).items() if k != "seed"}
            b = {k: v for k, v in dict(first.meta["sampler"]).items() if k != "seed"}
            if a != b:
                diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
                raise SampleStoreError(
                    f"{where} differ in sampler settings {diff}: they sample different "
                    "posteriors and cannot be merged"
                )
            seeds.append(dict(other.meta["sampler"]).get("seed"))
        if len(set(map(str, seeds))) != len(seeds):
            raise SampleStoreError(
                f"runs to merge share a seed ({seeds}): their chains would be the same chains"
            )
        chains, offset = [], 0
        for store in stores:
            ids, chain = np.unique(store.chain, return_inverse=True)
            chains.append((chain + offset).astype(np.int32))
            offset += len(ids)
        theta = np.concatenate([np.asarray(s.theta) for s in stores])
        theta.setflags(write=False)
        meta = dict(first.meta)
        meta |= {
            "num_samples": len(theta),
            "num_chains": offset,
            "runs": [str(s.path) for s in stores],
            "sampler": dict(first.meta["sampler"]) | {"seed": seeds},
        }
        return cls(
            first.path,
            first.spec,
            theta,
            np.concatenate(chains),
            np.concatenate([np.asarray(s.step) for s in stores]),
            meta,
            len(theta),
            writable=False,
        )

    # -- properties ----------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def theta(self) -> NDArray[np.float32]:
        """``(S, P)`` float32, memory-mapped (read-only once the store is closed)."""
        return self._theta[: self._size]

    @property
    def chain(self) -> NDArray[np.int32]:
        return self._chain[: self._size]

    @property
    def step(self) -> NDArray[np.int64]:
        return self._step[: self._size]

    @property
    def spec(self) -> NetworkSpec:
        return self._spec

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self._meta)

    def __len__(self) -> int:
        return self._size

    def select_spread(self, k: int) -> NDArray[np.int64]:
        """Indices of ``k`` samples spread evenly across chains and across time in each.

        Every chain gets ``k // C`` samples, the chains with the most samples one more for
        the remainder (a chain never gives more than it has; what it cannot give goes to the
        others). Inside a chain, ordered by step with ``n`` samples, the ``m`` chosen are at
        positions ``n - 1 - floor(j n / m)``, ``j = 0..m-1``: evenly spaced and always ending
        at the chain's latest sample. Returned sorted ascending; deterministic.
        """
        n_total = self._size
        if not 0 < k <= n_total:
            raise ValueError(f"cannot select {k} samples from a store of {n_total}")
        chain = self.chain
        ids, counts = np.unique(chain, return_counts=True)
        quota = np.zeros(len(ids), dtype=np.int64)
        remaining = k
        open_ = counts > 0
        while remaining > 0:
            live = np.flatnonzero(open_ & (quota < counts))
            share = remaining // len(live)
            if share == 0:
                # hand out the remainder to the chains with the most samples left
                order = live[np.argsort(-(counts[live] - quota[live]), kind="stable")]
                quota[order[:remaining]] += 1
                break
            give = np.minimum(share, counts[live] - quota[live])
            quota[live] += give
            remaining -= int(give.sum())
        picks: list[NDArray[np.int64]] = []
        for cid, m in zip(ids, quota, strict=True):
            if m == 0:
                continue
            rows = np.flatnonzero(chain == cid)
            rows = rows[np.argsort(self.step[rows], kind="stable")]
            n = len(rows)
            pos = n - 1 - (np.arange(m) * n) // m
            picks.append(rows[pos])
        return np.sort(np.concatenate(picks)).astype(np.int64)

    def __repr__(self) -> str:
        return (
            f"SampleStore({str(self._path)!r}, arch={self._spec.name}, samples={self._size}, "
            f"chains={len(np.unique(self.chain)) if self._size else 0})"
        )
