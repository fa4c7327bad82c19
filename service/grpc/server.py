"""The gRPC server of one worker, started and stopped by the app's lifespan
(:func:`service.api.app.create_app`) when ``grpc_port`` is set.

It runs on the worker's event loop, beside uvicorn, over the same model repository and memory
budget. With several workers each binds the same port (``SO_REUSEPORT``, on by default in
gRPC on Linux) and the kernel spreads connections over them, as it does for the HTTP port.
A message over ``max_body_bytes`` is refused by gRPC itself (RESOURCE_EXHAUSTED), as REST
refuses such a body with 413.
"""

from __future__ import annotations

import logging
from typing import Final

import grpc

from service.config import Settings
from service.core.repository import ModelRepository
from service.grpc.grpc_service_pb2_grpc import add_GRPCInferenceServiceServicer_to_server
from service.grpc.servicer import InferenceServicer
from service.infra.admission import MemoryBudget
from service.infra.telemetry import Metrics

log = logging.getLogger("apd.service.grpc")

# Answers are a few floats per input: far below this whatever max_batch.
MAX_SEND_BYTES: Final = 64 * 1024 * 1024


async def start_grpc_server(
    settings: Settings, repository: ModelRepository, budget: MemoryBudget, metrics: Metrics
) -> grpc.aio.Server:
    """``inference.GRPCInferenceService`` on ``settings.host:settings.grpc_port``, started;
    :class:`RuntimeError` if the port cannot be bound."""
    assert settings.grpc_port is not None
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_body_bytes),
            ("grpc.max_send_message_length", MAX_SEND_BYTES),
            ("grpc.so_reuseport", 1),
        ]
    )
    add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(repository, budget, metrics), server
    )
    address = f"{settings.host}:{settings.grpc_port}"
    if server.add_insecure_port(address) == 0:
        raise RuntimeError(f"--grpc-port {settings.grpc_port}: cannot listen on {address}")
    await server.start()
    log.info("Open Inference Protocol gRPC on %s", address)
    return server
