"""``apd serve``: run the inference service under uvicorn.

Flags mirror :class:`service.config.Settings` (``--checkpoint``, ``--host``, ``--port``,
``--workers``, ``--redis-url``, ...; ``apd serve --help`` lists them all) and
win over the ``APD_*`` environment. Before anything is served, this process validates the
settings and loads and checks the checkpoint; a problem is one line on stderr and a non-zero
exit code (2: bad settings, 1: a checkpoint that cannot be served or a port already in use).

NumPy's BLAS reads its thread count once, when NumPy loads, so this module sets
``OPENBLAS_NUM_THREADS``/``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` from ``--num-threads``
(``APD_NUM_THREADS``; default 1: with the two compute slots of ``compute_concurrency``, both
cores of a 2-core box, and no more threads than cores)
before anything imports NumPy, unless they are set already; worker processes inherit them.
Without this, every worker's forward would start one BLAS thread per core, and a few
concurrent requests would oversubscribe the machine many times over.

With ``--workers N > 1`` uvicorn starts N worker processes, each building the app from
``APD_*`` variables that this process sets from its validated settings (pinning the
checkpoint's sha256, so a file replaced meanwhile is refused), and Prometheus multi-process
mode is switched on with a fresh directory so that ``/metrics`` aggregates every worker (and
reports each worker's and this process's memory and CPU, :mod:`service.infra.telemetry`).

Logging (:mod:`service.infra.logging_config`): every line, the service's and uvicorn's, is one JSON
object (``--log-format text`` for plain lines), in this process and in every worker.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from pydantic import ValidationError
from pydantic_settings import CliApp, SettingsError

if TYPE_CHECKING:  # the runtime imports wait until the BLAS threads are set (they load NumPy)
    from service.config import Settings

PROG = "apd serve"
APP_FACTORY = "service.api.app:create_app"
BLAS_THREAD_VARS: Final = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
# Settings.num_threads's default, read before the settings (and NumPy) are imported.
DEFAULT_NUM_THREADS: Final = 1


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def port_in_use(host: str, port: int, flag: str = "--port") -> str | None:
    """Why ``host:port`` cannot be bound (as uvicorn binds it: ``SO_REUSEADDR``), or None.
    The gRPC port is checked the same way: gRPC binds with ``SO_REUSEPORT``, which would
    otherwise share the port with another server that set it."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"--host {host}: {exc.strerror}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return (
                    f"{flag} {port}: {host}:{port} is in use (another server?); stop it or "
                    f"pass another {flag}"
                )
            return f"--host {host} {flag} {port}: cannot listen there: {exc.strerror}"
    return None


def limit_blas_threads(argv: Sequence[str]) -> None:
    """Set the BLAS thread variables from ``--num-threads`` / ``APD_NUM_THREADS`` (default 1;
    0 leaves the library default), unless already set. Invalid values are left for the
    settings to report."""
    value = os.environ.get("APD_NUM_THREADS", str(DEFAULT_NUM_THREADS))
    for i, arg in enumerate(argv):
        if arg == "--num-threads" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--num-threads="):
            value = arg.split("=", 1)[1]
    if value.isascii() and value.isdigit() and int(value) > 0:
        for var in BLAS_THREAD_VARS:
            os.environ.setdefault(var, value)


def parse_settings(argv: Sequence[str]) -> Settings:
    """Settings from flags over ``APD_*`` variables (raises on a bad flag or value)."""
    from service.config import Settings

    return CliApp.run(Settings, cli_args=list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    limit_blas_threads(args)
    from apd.checkpoint import CheckpointError
    from service.config import describe_validation_error

    try:
        settings = parse_settings(args)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except SettingsError as exc:
        return _fail(f"{str(exc).splitlines()[0]} (see: {PROG} --help)", 2)
    except ValidationError as exc:
        return _fail(f"{describe_validation_error(exc)} (see: {PROG} --help)", 2)

    from service.api.app import load_servable

    checkpoint = None
    if settings.model_repository is None:
        try:
            checkpoint = load_servable(settings)
        except CheckpointError as exc:
            return _fail(str(exc), 1)
    elif not settings.model_repository.is_dir():
        return _fail(
            f"model repository {settings.model_repository} is not a folder; it holds "
            "<model>/<version>/model.safetensors (see: apd serve --help)",
            1,
        )

    busy = port_in_use(settings.host, settings.port)
    if busy is None and settings.grpc_port is not None:
        busy = (
            f"--grpc-port {settings.grpc_port} is also --port; give gRPC its own port"
            if settings.grpc_port == settings.port
            else port_in_use(settings.host, settings.grpc_port, "--grpc-port")
        )
    if busy is not None:  # one line, before uvicorn's three log lines and exit code 3
        return _fail(busy, 1)

    import uvicorn

    from service.infra.http_server import BoundedH11Protocol
    from service.infra.logging_config import log_config
    from service.infra.telemetry import MULTIPROC_ENV, register_process

    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level.value,
        "log_config": log_config(settings.log_level.value, settings.log_format.value),
        "limit_concurrency": settings.limit_concurrency,
        "timeout_keep_alive": settings.timeout_keep_alive_s,
        "server_header": False,
        # SIGTERM: stop accepting, let requests in flight finish for at most this long, then
        # cancel them and exit (bodies still arriving are closed at once, BoundedH11Protocol)
        "timeout_graceful_shutdown": settings.shutdown_grace_s,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        # h11 bounds header size while headers stream in (httptools buffers any header
        # whole); this subclass bounds the time they may take and how much of a refused
        # body is read (lingering close).
        "http": BoundedH11Protocol,
    }
    BoundedH11Protocol.header_timeout_s = settings.header_timeout_s
    try:
        if settings.workers == 1:
            from service.api.app import create_app

            uvicorn.run(create_app(settings, checkpoint), **common)
            return 0
        with tempfile.TemporaryDirectory(prefix="apd-metrics-") as metrics_dir:
            os.environ[MULTIPROC_ENV] = metrics_dir
            register_process("supervisor")  # its memory counts against the same limit
            pinned = settings
            if checkpoint is not None:  # every worker serves the file checked here
                pinned = settings.model_copy(
                    update={
                        "expected_sha256": checkpoint.sha256,
                        "checkpoint": checkpoint.path.resolve(),
                    }
                )
            for name, value in pinned.to_env().items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            uvicorn.run(APP_FACTORY, factory=True, workers=settings.workers, **common)
        return 0
    except SystemExit as exc:  # uvicorn exits on a port in use or a worker that fails to start
        return exc.code if isinstance(exc.code, int) else 1


if __name__ == "__main__":
    raise SystemExit(main())
