"""Every limit on a query, defined once: the API's ceilings and this server's configured ones.

The request schemas (:mod:`service.codecs.schemas`) and the settings (:mod:`service.config`)
take their ceilings from here; :class:`Limits` checks a query against the configured values,
and every codec (JSON, images, V2 REST, V2 gRPC) maps its :class:`LimitExceeded` to its own
status (422 / 413, INVALID_ARGUMENT / RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

MAX_NUM_SAMPLES: Final = 1000  # the API's ceiling on K (../shared/API.md)
MAX_SEED: Final = 2**63 - 1  # seeds are 63-bit, so no seed equals the pool's stream
# Networks come in blocks of 10 (service.core.networks): part of what a seed means, fixed.
NETWORKS_PER_BLOCK: Final = 10


class Limit(enum.StrEnum):
    """Which limit a query exceeded: ``NUM_SAMPLES`` is a bad value (422),
    ``BATCH`` and ``IMAGE_PIXELS`` a request too large (413)."""

    NUM_SAMPLES = "num_samples"
    BATCH = "batch"
    IMAGE_PIXELS = "image_pixels"


class LimitExceeded(Exception):
    """A query over one of this server's limits; ``message`` says which and what to do."""

    def __init__(self, limit: Limit, message: str, value: int) -> None:
        super().__init__(message)
        self.limit = limit
        self.message = message
        self.value = value

    @property
    def too_large(self) -> bool:
        """A request too large (HTTP 413, gRPC RESOURCE_EXHAUSTED) rather than a bad value."""
        return self.limit is not Limit.NUM_SAMPLES


@dataclass(frozen=True)
class Limits:
    """This server's configured limits (``Settings.limits``)."""

    max_num_samples: int = MAX_NUM_SAMPLES
    max_batch: int = 256
    max_image_pixels: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        if not 1 <= self.max_num_samples <= MAX_NUM_SAMPLES:
            raise ValueError(f"max_num_samples must lie in 1..{MAX_NUM_SAMPLES}")
        if self.max_batch < 1 or self.max_image_pixels < 1:
            raise ValueError("max_batch and max_image_pixels must be positive")

    def num_samples(self, requested: int | None, default: int) -> int:
        """K for a query that asked for ``requested`` (None: the model's ``default``)."""
        k = default if requested is None else requested
        if k > self.max_num_samples:
            raise LimitExceeded(
                Limit.NUM_SAMPLES,
                f"num_samples is {k}: it must be less than or equal to {self.max_num_samples} "
                "(this server's max_num_samples)",
                k,
            )
        if k < 1:
            raise LimitExceeded(Limit.NUM_SAMPLES, f"num_samples must be >= 1, got {k}", k)
        return k

    def batch(self, n: int, what: str = "inputs", unit: str = "examples") -> None:
        """A batch of ``n`` examples (or image files) may be served."""
        if n > self.max_batch:
            raise LimitExceeded(
                Limit.BATCH,
                f"{what} holds {n} {unit}; the limit is max_batch={self.max_batch} per request",
                n,
            )

    def image_pixels(self, total: int, where: str) -> None:
        """Image files that decode to ``total`` pixels in all may be decoded."""
        if total > self.max_image_pixels:
            raise LimitExceeded(
                Limit.IMAGE_PIXELS,
                f"{where}: with the files before it, {total} decoded pixels; the limit is "
                f"max_image_pixels={self.max_image_pixels} per request (refused before "
                "decoding)",
                total,
            )
