"""The service's one settings class, read from ``APD_*`` environment variables and from flags.

``apd serve --redis-url redis://... --workers 2`` and ``APD_REDIS_URL=redis://...
APD_WORKERS=2 apd serve`` are the same; flags win over the environment. Every field is
validated when the service starts, and an invalid value is reported in one line
(:func:`describe_validation_error`).
"""

from __future__ import annotations

import enum
import importlib.metadata
from pathlib import Path
from typing import Annotated, Final, Self
from urllib.parse import urlsplit

from pydantic import (
    Field,
    FilePath,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.core.limits import MAX_NUM_SAMPLES, NETWORKS_PER_BLOCK, Limits

PROJECT_ROOT: Final = Path(__file__).resolve().parents[1]
SHIPPED_CHECKPOINT: Final = Path("models", "mnist-fcnn1", "model.safetensors")
"""The shipped model, relative to the source tree; a regular install puts the same file under
``<prefix>/share/apd/`` (pyproject.toml's ``[tool.setuptools.data-files]``)."""


def installed_copy(dist: importlib.metadata.Distribution) -> Path | None:
    """Where ``dist`` (the installed ``apd``) put the shipped model, read from its RECORD, so
    every install scheme (a venv, ``--user``, ``--prefix``) is found; None if it holds none."""
    wanted = ("share", "apd", *SHIPPED_CHECKPOINT.parts)
    for file in dist.files or ():
        if file.parts[-len(wanted) :] == wanted:
            located = Path(str(dist.locate_file(file))).resolve()
            if located.is_file():
                return located
    return None


def shipped_checkpoint() -> Path:
    """The default checkpoint: the source tree's copy (a checkout or an editable install), else
    the installed one; with neither, the source path, which loading then reports missing."""
    source = PROJECT_ROOT / SHIPPED_CHECKPOINT
    if source.is_file():
        return source
    try:
        installed = installed_copy(importlib.metadata.distribution("apd"))
    except importlib.metadata.PackageNotFoundError:
        installed = None
    return installed or source


DEFAULT_CHECKPOINT: Final = shipped_checkpoint()
ENV_PREFIX: Final = "APD_"


class LogLevel(enum.StrEnum):
    CRITICAL = "critical"
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"
    DEBUG = "debug"


class LogFormat(enum.StrEnum):
    JSON = "json"
    TEXT = "text"


Seconds = Annotated[float, Field(gt=0, le=3600)]


class Settings(BaseSettings):
    """Everything ``apd serve`` can be told. Environment: ``APD_<NAME>``; flag: ``--<name>``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        frozen=True,
        cli_prog_name="apd serve",
        cli_kebab_case=True,
        cli_exit_on_error=False,
        cli_hide_none_type=True,
    )

    # Models: what to serve.
    checkpoint: Path = Field(
        default=DEFAULT_CHECKPOINT,
        description="APD checkpoint (.safetensors), served as a repository of one model "
        "(its model_id, version 1); ignored with model_repository",
    )
    model_repository: Path | None = Field(
        default=None,
        description="model repository folder, DIR/<model>/<version>/model.safetensors "
        "(Triton's layout): every version found is served, the folder is watched",
    )
    default_model: str | None = Field(
        default=None,
        min_length=1,
        description="the model of requests that name none (default: the only model)",
    )
    repository_poll_s: Seconds = Field(
        default=5.0, description="how often the model repository is scanned for changes"
    )
    expected_sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="Refuse to start unless the checkpoint file has this sha256",
    )
    num_threads: int = Field(
        default=1,
        ge=0,
        le=256,
        description="BLAS threads of one computation (the factored forward's GEMMs): keep "
        "num_threads x compute_concurrency x workers at most the cores (a 2-core box: 1 x 2 "
        "x 1), as computations that run together on more threads than cores spin against "
        "each other (benchmarks/results/batching.md at f8685ec, 2 threads: batching then made "
        "fcNN2 0.34x and LeNet-5 0.16x as fast); 0: the library's default",
    )
    compute_concurrency: int = Field(
        default=2,
        ge=1,
        le=64,
        description="forward computations running at once per worker (each with num_threads)",
    )

    # Servers.
    grpc_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="also serve the Open Inference Protocol's gRPC binding on this port",
    )
    host: str = Field(default="127.0.0.1", min_length=1, description="address to bind")
    port: int = Field(default=8000, ge=1, le=65535, description="port to bind")
    workers: int = Field(default=1, ge=1, le=64, description="uvicorn worker processes")
    log_level: LogLevel = Field(default=LogLevel.INFO, description="uvicorn log level")
    log_format: LogFormat = Field(
        default=LogFormat.JSON,
        description="log lines (the service's, uvicorn's and its access log): one JSON object "
        "each, with timestamp, level, logger, message and request id; or text",
    )
    limit_concurrency: int | None = Field(
        default=None, ge=1, description="uvicorn: connections/tasks at once per worker before 503"
    )
    timeout_keep_alive_s: int = Field(
        default=5, ge=1, le=600, description="idle keep-alive timeout"
    )
    header_timeout_s: Seconds = Field(
        default=10.0,
        description="a connection whose next request's headers are not complete by then "
        "(from its opening or the previous response) is closed",
    )
    body_timeout_s: Seconds = Field(
        default=30.0, description="a request body not fully received by then gets 408"
    )
    min_body_rate_bytes_s: int = Field(
        default=8192,
        ge=0,
        le=1 << 30,
        description="a body that, after body_grace_s, has arrived at fewer bytes per second "
        "than this on average gets 408 (0: only body_timeout_s)",
    )
    body_grace_s: Seconds = Field(
        default=5.0, description="time a body may take before min_body_rate_bytes_s applies"
    )
    shutdown_grace_s: Seconds = Field(
        default=20.0,
        description="on SIGTERM: stop accepting, finish the requests in flight for at most "
        "this long, then close what is left and exit (under Kubernetes' 30 s)",
    )

    # Request limits.
    default_num_samples: int | None = Field(
        default=None,
        ge=1,
        le=MAX_NUM_SAMPLES,
        description="K when a request gives none (default: checkpoint's)",
    )
    max_num_samples: int = Field(
        default=MAX_NUM_SAMPLES,
        ge=1,
        le=MAX_NUM_SAMPLES,
        description="largest K a request may ask for",
    )
    max_batch: int = Field(
        default=256, ge=1, le=4096, description="most images in one request (413 above)"
    )
    max_body_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, le=1 << 30, description="largest request body (413 above)"
    )

    max_image_pixels: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        le=1 << 30,
        description="decoded pixels of all the images of one /predict/image request, resize "
        "work included (413 above, before any is decoded)",
    )
    max_header_bytes: int = Field(
        default=16 * 1024, ge=1024, le=1 << 20, description="largest request headers (431 above)"
    )

    # Posterior networks and their caches.
    pool_size: int = Field(
        default=1000,
        ge=NETWORKS_PER_BLOCK,
        le=100_000,
        description="networks in the shared pool (held as codes: 4.2 KB each for fcNN1)",
    )
    tail_cache_mb: float = Field(
        default=128.0,
        ge=0,
        le=1 << 20,
        description="the pool's networks' layers after the first, kept ready, MiB per worker "
        "(fcNN1: the whole pool in 4 MB; fcNN2: 190 networks): requests whose K fits are "
        "answered from them without recomputing those layers",
    )
    local_cache_mb: float = Field(
        default=32.0,
        ge=0,
        le=1 << 20,
        description="in-process LRU of seeded requests' network codes, MiB per worker",
    )
    redis_url: str | None = Field(
        default=None, description="Redis for the shared cache (unset: in-process only)"
    )
    redis_password: SecretStr | None = Field(
        default=None, description="Redis password (or put it in redis_url, or use the _file)"
    )
    redis_password_file: FilePath | None = Field(
        default=None, description="file holding the Redis password (a mounted secret)"
    )
    cache_hmac_key: SecretStr | None = Field(
        default=None,
        description="secret key (16+ bytes) authenticating cached networks in Redis; "
        "required with redis_url",
    )
    cache_hmac_key_file: FilePath | None = Field(
        default=None, description="file holding cache_hmac_key (a mounted secret)"
    )
    redis_key_prefix: str = Field(
        default="apd", pattern=r"^[A-Za-z0-9_.\-]{1,64}$", description="prefix of every Redis key"
    )
    cache_ttl_s: int = Field(default=7 * 24 * 3600, ge=1, description="TTL of cached network codes")
    redis_socket_timeout_s: Seconds = Field(default=0.25, description="Redis connect/read timeout")
    redis_probe_s: Seconds = Field(
        default=1.0,
        description="Redis ping interval while up; while down, retries start at a quarter of "
        "it and back off to 5 times it",
    )

    # Memory admission (docs/limits.md).
    memory_budget_mb: float = Field(
        default=384.0,
        gt=0,
        le=1 << 20,
        description="bytes of in-flight work (request bodies as they arrive, forward working "
        "sets) admitted at once per worker, MiB; more waits, then gets 503",
    )
    admission_wait_s: Seconds = Field(
        default=5.0,
        description="how long work waits for memory budget before 503 with Retry-After",
    )
    admission_queue: int = Field(
        default=64,
        ge=0,
        le=100_000,
        description="requests waiting for memory budget at once per worker; more: 503 at once",
    )
    admission_queue_per_client: int = Field(
        default=8,
        ge=0,
        le=100_000,
        description="requests from one client address waiting for memory budget at once; "
        "more: 503 at once (behind a proxy every client has its address: raise it)",
    )
    request_timeout_s: Seconds | None = Field(
        default=60.0,
        description="a request's computation stops (504) past this many seconds",
    )
    batch_max_rows: int = Field(
        default=64,
        ge=1,
        le=4096,
        description="dynamic batching: unseeded requests for the same model version and K "
        "that wait for a compute slot together share one forward, of at most this many "
        "inputs (1: no batching)",
    )
    batch_delay_ms: float = Field(
        default=0.0,
        ge=0,
        le=1000,
        description="dynamic batching: how long a batch that has a compute slot may still "
        "wait for more requests (Triton's max_queue_delay; 0: none, a lone request runs at "
        "once)",
    )
    forward_chunk_mb: float = Field(
        default=8.0,
        gt=0,
        le=1024,
        description="working set of one chunk of networks in the forward, MiB",
    )

    @field_validator("pool_size")
    @classmethod
    def _whole_blocks(cls, v: int) -> int:
        if v % NETWORKS_PER_BLOCK:
            raise ValueError(f"must be a multiple of {NETWORKS_PER_BLOCK} (networks per block)")
        return v

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, v: str | None) -> str | None:
        if v is None or v.strip() == "":
            return None
        scheme = urlsplit(v).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"scheme must be redis://, rediss:// or unix://, not {scheme!r}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.default_num_samples is not None and self.default_num_samples > self.max_num_samples:
            raise ValueError(
                f"default_num_samples {self.default_num_samples} exceeds max_num_samples "
                f"{self.max_num_samples}"
            )
        for name in ("redis_password", "cache_hmac_key"):
            if getattr(self, name) is not None and getattr(self, f"{name}_file") is not None:
                raise ValueError(f"set {name} or {name}_file, not both")
        key = self.hmac_key
        if key is not None and len(key) < 16:
            raise ValueError("cache_hmac_key must be at least 16 bytes")
        if self.redis_url is not None and key is None:
            raise ValueError(
                "redis_url is set but cache_hmac_key is not: cached networks are authenticated "
                "with it (set APD_CACHE_HMAC_KEY or APD_CACHE_HMAC_KEY_FILE)"
            )
        return self

    @property
    def hmac_key(self) -> bytes | None:
        """The cache HMAC key, from the setting or its file (trailing newline stripped)."""
        return _secret(self.cache_hmac_key, self.cache_hmac_key_file)

    @property
    def redis_secret(self) -> str | None:
        key = _secret(self.redis_password, self.redis_password_file)
        return None if key is None else key.decode()

    @property
    def limits(self) -> Limits:
        return Limits(self.max_num_samples, self.max_batch, self.max_image_pixels)

    @property
    def memory_budget_bytes(self) -> int:
        return int(self.memory_budget_mb * 1024 * 1024)

    @property
    def forward_chunk_bytes(self) -> int:
        return int(self.forward_chunk_mb * 1024 * 1024)

    @property
    def tail_cache_bytes(self) -> int:
        return int(self.tail_cache_mb * 1024 * 1024)

    @property
    def local_cache_bytes(self) -> int:
        return int(self.local_cache_mb * 1024 * 1024)

    def to_env(self) -> dict[str, str | None]:
        """These settings as ``APD_*`` variables (None: unset), for worker processes."""
        out: dict[str, str | None] = {}
        for name, value in self.model_dump(mode="json").items():
            if isinstance(getattr(self, name), SecretStr):
                value = getattr(self, name).get_secret_value()
            out[f"{ENV_PREFIX}{name.upper()}"] = None if value is None else str(value)
        return out


def _secret(value: SecretStr | None, path: Path | None) -> bytes | None:
    if value is not None:
        return value.get_secret_value().encode()
    if path is not None:
        return path.read_bytes().rstrip(b"\r\n")
    return None


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming each invalid setting and what is wrong with it."""
    parts = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"]) or "settings"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{name}: {msg} (got {err.get('input')!r})" if err["loc"] else msg)
    return "invalid settings: " + "; ".join(parts)
