"""The model repository: every version of every model this worker serves, kept up to date.

Triton's layout and semantics: ``DIR/<model>/<version>/model.safetensors``, the model's name
its folder's, the version a positive integer; every version found is served, and a query
that names no version gets the model's highest READY one. ``apd serve --checkpoint FILE`` is
a repository of one (the checkpoint's ``model_id``, version 1), not watched.

The repository is polled every ``poll_s`` seconds (each worker polls its own copy; all read
the same folder and so converge within one interval):

* a version whose file appeared or changed is read only once its size and modification time
  have stayed the same for one whole interval, and at least :data:`SETTLE_S` (a file still
  being copied is LOADING; copying into another folder and renaming it in is safest); then it
  is loaded and verified (:func:`apd.checkpoint.load_checkpoint`: digest, probes) and checked
  against this server (:func:`~service.core.model.check_servable`) off the event loop, and
  becomes READY; a version already READY keeps answering until its replacement is;
* a version that fails to load is UNAVAILABLE with its one-line reason, and nothing else
  changes; it is tried again when its file changes;
* a version whose file disappeared is removed from the table at once (new queries go to the
  remaining versions); queries already running on it finish, holding their reference.

Nothing here fails a query that names no version while versions come and go: resolution
happens once per query, against the table of that moment.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import anyio.to_thread

from apd.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from service.core.model import Resources, ServedModel, check_servable

log = logging.getLogger("apd.service.repository")

CHECKPOINT_FILE: Final = "model.safetensors"
# A changed file is read once it has not changed for a whole poll and for at least this long.
SETTLE_S: Final = 1.0
Fingerprint = tuple[int, int]  # a checkpoint file's (size, mtime_ns)
_MODEL_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class VersionState(enum.StrEnum):
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"
    LOADING = "LOADING"


@dataclass(frozen=True)
class VersionStatus:
    """One row of the repository index (``POST /v2/repository/index``)."""

    name: str
    version: int
    state: VersionState
    reason: str = ""


class ModelNotFound(LookupError):
    """No such model, or no such version of it (404, NOT_FOUND)."""


class ModelUnavailable(Exception):
    """The model exists but has no READY version now (503, UNAVAILABLE)."""


class NoDefaultModel(ValueError):
    """A query that names no model, to a repository of several with no default (422)."""


@dataclass
class _Version:
    path: Path
    fingerprint: Fingerprint | None = None  # when last seen
    tried: Fingerprint | None = None  # the fingerprint last loaded (or failed)
    state: VersionState = VersionState.LOADING
    reason: str = "waiting for the file to stop changing"
    model: ServedModel | None = None


@dataclass
class _Model:
    versions: dict[int, _Version] = field(default_factory=dict)


def scan(root: Path) -> dict[tuple[str, int], tuple[Path, Fingerprint]]:
    """``(model, version) -> (checkpoint path, fingerprint)`` for every version folder under
    ``root`` that holds a checkpoint file (one ``stat`` each). Folders that are not models
    (hidden, bad names) or versions (not a positive integer) are skipped."""
    found: dict[tuple[str, int], tuple[Path, Fingerprint]] = {}
    try:
        models = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError as exc:
        log.warning("cannot read the model repository %s: %s", root, exc)
        return found
    for model_dir in models:
        if not _MODEL_NAME.match(model_dir.name):
            continue
        try:
            versions = [p for p in model_dir.iterdir() if p.is_dir()]
        except OSError:
            continue
        for v in versions:
            if not (v.name.isdigit() and int(v.name) > 0):
                continue
            path = v / CHECKPOINT_FILE
            try:
                st = path.stat()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                found[(model_dir.name, int(v.name))] = (path, (st.st_size, st.st_mtime_ns))
    return found


class ModelRepository:
    """The table of served versions and the poller that keeps it (module docstring)."""

    def __init__(
        self,
        resources: Resources,
        *,
        root: Path | None = None,
        checkpoint: Path | None = None,
        preloaded: Checkpoint | None = None,
        default_model: str | None = None,
        poll_s: float = 5.0,
    ) -> None:
        if (root is None) == (checkpoint is None):
            raise ValueError("give a repository folder or one checkpoint, not both")
        self.resources = resources
        self.root = root
        self.checkpoint = checkpoint
        self.poll_s = poll_s
        self._preloaded = preloaded
        self._default = default_model
        self._models: dict[str, _Model] = {}
        self._task: asyncio.Task[None] | None = None
        self._closing: list[ServedModel] = []

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Load what is there now; then, for a folder, poll it in the background. A single
        checkpoint that fails to load raises :class:`CheckpointError` (fail fast)."""
        if self.checkpoint is not None:
            path = self.checkpoint
            ckpt = self._preloaded
            if ckpt is None:
                ckpt = await anyio.to_thread.run_sync(load_checkpoint, path)
            model = await ServedModel.load(ckpt.meta.model_id, 1, ckpt, self.resources)
            entry = _Version(self.checkpoint, state=VersionState.READY, reason="", model=model)
            self._models[ckpt.meta.model_id] = _Model({1: entry})
            return
        await self.poll(first=True)
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="apd-repository")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for m in self._models.values():
            for v in m.versions.values():
                if v.model is not None:
                    await v.model.close()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.poll()
            except Exception:  # a bug must not stop the watching
                log.exception("polling the model repository failed")

    async def poll(self, first: bool = False) -> None:
        """One pass over the folder (see the module docstring). On the first pass every file
        found is read at once: the server starts on what the folder holds."""
        assert self.root is not None
        found = await anyio.to_thread.run_sync(scan, self.root)
        # Gone: out of the table now; running queries keep their reference.
        for name, m in list(self._models.items()):
            for version, v in list(m.versions.items()):
                if (name, version) not in found:
                    del m.versions[version]
                    log.info("model %s version %d removed from the repository", name, version)
                    if v.model is not None:
                        v.model.retire()
            if not m.versions:
                del self._models[name]
        for (name, version), (path, seen) in sorted(found.items()):
            v = self._models.setdefault(name, _Model()).versions.setdefault(version, _Version(path))
            settled = time.time() - seen[1] / 1e9 >= SETTLE_S
            stable = first or (seen == v.fingerprint and settled)
            v.fingerprint = seen
            if not stable or seen == v.tried:
                if not stable and v.model is None:
                    v.state, v.reason = (
                        VersionState.LOADING,
                        "waiting for the file to stop changing",
                    )
                continue
            await self._load(name, version, v, seen)

    async def _load(self, name: str, version: int, v: _Version, seen: Fingerprint) -> None:
        v.tried = seen
        if v.model is None:
            v.state, v.reason = VersionState.LOADING, "loading"
        try:
            ckpt = await anyio.to_thread.run_sync(load_checkpoint, v.path)
            check_servable(ckpt, self.resources.config)
            model = await ServedModel.load(name, version, ckpt, self.resources)
        except CheckpointError as exc:
            reason = str(exc)
            log.error("model %s version %d is UNAVAILABLE: %s", name, version, reason)
            if v.model is None:  # a READY version keeps serving its last good file
                v.state, v.reason = VersionState.UNAVAILABLE, reason
            return
        old, v.model = v.model, model
        v.state, v.reason = VersionState.READY, ""
        log.info("model %s version %d is READY (%s)", name, version, ckpt.sha256[:12])
        if old is not None:
            old.retire()

    # --- queries -------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """At least one version is READY."""
        return any(v.model is not None for m in self._models.values() for v in m.versions.values())

    def models(self) -> dict[str, list[int]]:
        """Each model's READY versions, ascending."""
        out = {}
        for name, m in sorted(self._models.items()):
            ready = sorted(n for n, v in m.versions.items() if v.model is not None)
            if ready:
                out[name] = ready
        return out

    @property
    def default_model(self) -> str | None:
        """The model a query without ``model`` goes to: the configured one, else the only
        one."""
        if self._default is not None:
            return self._default
        names = list(self._models)
        return names[0] if len(names) == 1 else None

    def index(self, ready_only: bool = False) -> list[VersionStatus]:
        rows = [
            VersionStatus(name, n, v.state, v.reason)
            for name, m in sorted(self._models.items())
            for n, v in sorted(m.versions.items())
        ]
        return [r for r in rows if r.state is VersionState.READY] if ready_only else rows

    def resolve(self, name: str | None = None, version: str | int | None = None) -> ServedModel:
        """The version a query goes to: ``name`` (None: the default model) at ``version``
        (None: its highest READY version)."""
        if name is None:
            name = self.default_model
            if name is None:
                names = ", ".join(sorted(self._models)) or "none loaded"
                raise NoDefaultModel(
                    f'this server serves several models and no default: name one in "model" '
                    f"({names})"
                )
        m = self._models.get(name)
        if m is None:
            known = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFound(f"unknown model {name!r}: this server serves {known}")
        if version is None or version == "":
            ready = [n for n, v in m.versions.items() if v.model is not None]
            if not ready:
                raise ModelUnavailable(
                    f"model {name!r} has no READY version now ({self._reasons(m)})"
                )
            served = m.versions[max(ready)].model
            assert served is not None
            return served
        n = _version_number(version)
        v = m.versions.get(n) if n is not None else None
        if v is None:
            known = ", ".join(str(k) for k in sorted(m.versions)) or "none"
            raise ModelNotFound(f"model {name!r} has no version {version!r} (versions: {known})")
        if v.model is None:
            raise ModelUnavailable(f"model {name!r} version {n} is {v.state.value}: {v.reason}")
        return v.model

    def _reasons(self, m: _Model) -> str:
        return "; ".join(f"version {n} {v.state.value}: {v.reason}" for n, v in m.versions.items())

    def served(self) -> list[ServedModel]:
        """Every READY version."""
        return [v.model for m in self._models.values() for v in m.versions.values() if v.model]


def _version_number(version: str | int) -> int | None:
    if isinstance(version, int):
        return version if version > 0 else None
    return int(version) if version.isdigit() and int(version) > 0 else None
