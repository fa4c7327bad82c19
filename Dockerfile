# syntax=docker/dockerfile:1
#
# Images for apd (see docs/deployment.md).
#
#   docker build -t apd:0.1.0 .                       # runtime (default): serves, no torch
#   docker build --target train -t apd-train:0.1.0 .  # training stack: torch 2.13.0 CPU
#
# The runtime image holds the core package, the [serve] extras and the shipped checkpoint
# (inside the wheel), and serves with the factored NumPy forward, so it carries no torch and
# no onnxruntime. The serving dependencies come from requirements/serve.lock: exact versions
# (the ones the tests ran with), every file checked against its sha256.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------
# builder: build the apd wheel and a virtual environment with only what serving needs.
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# The locked dependencies first, in their own layer: it is rebuilt only when the lock changes.
COPY requirements/serve.lock requirements/serve.lock
RUN python -m venv --without-pip /opt/venv \
 && python -m pip --python /opt/venv/bin/python install --compile --require-hashes \
        -r requirements/serve.lock

COPY pyproject.toml README.md LICENSE ./
COPY apd/ apd/
COPY apd_cli/ apd_cli/
COPY service/ service/
COPY models/mnist-fcnn1/ models/mnist-fcnn1/

# The serving wheel is built from apd/, apd_cli/, service/ and the shipped model only: training/
# is not in this stage, so the runtime image cannot import (or carry) the training code. The
# wheel installs the model at /opt/venv/share/apd/models/mnist-fcnn1/. --no-deps: everything
# it needs is already there from the lock, and pip check proves it.
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && set -- /wheels/apd-*.whl \
 && python -m pip --python /opt/venv/bin/python install --compile --no-deps "$1" \
 && python -m pip --python /opt/venv/bin/python check \
 && ! /opt/venv/bin/python -c "import torch" 2>/dev/null

# A model repository for the runtime image: the shipped model, the file the wheel installed,
# as version 1 of mnist-fcnn1 (`apd serve --model-repository /models`). A copy, not a link, so
# that version 1 stays the same file when the image is upgraded under an existing volume.
RUN mkdir -p /models/mnist-fcnn1/1 \
 && cp /opt/venv/share/apd/models/mnist-fcnn1/model.safetensors /models/mnist-fcnn1/1/model.safetensors

# ---------------------------------------------------------------------------------------
# train: the offline pipeline (SGLD, distillation, ONNX export, evaluation), CPU torch.
FROM ${PYTHON_IMAGE} AS train

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    APD_DATA_DIR=/data

RUN groupadd --system --gid 10001 apd \
 && useradd --system --uid 10001 --gid apd --home-dir /work --no-create-home \
        --shell /usr/sbin/nologin apd

# torch first, from the CPU index, pinned, so nothing later pulls a multi-GB CUDA build.
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY apd/ apd/
COPY apd_cli/ apd_cli/
COPY service/ service/
COPY training/ training/
COPY models/mnist-fcnn1/ models/mnist-fcnn1/
RUN /opt/venv/bin/pip install ".[train]" \
 && /opt/venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__; assert not torch.version.cuda"

ENV PATH=/opt/venv/bin:$PATH
WORKDIR /work
RUN mkdir -p /work /data && chown apd:apd /work /data
USER 10001:10001
VOLUME ["/data", "/work"]

# No server here: the healthcheck is explicitly off rather than inherited or missing.
HEALTHCHECK NONE
ENTRYPOINT ["apd"]
CMD ["--help"]
# ---------------------------------------------------------------------------------------
# runtime (the last stage, so the default target): non-root, healthchecked, NumPy only.
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="apd" \
      org.opencontainers.image.description="Adversarial Posterior Distillation: calibrated uncertainty for MNIST from a GAN weight generator" \
      org.opencontainers.image.licenses="MIT"

RUN groupadd --system --gid 10001 apd \
 && useradd --system --uid 10001 --gid apd --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin apd

COPY --from=builder /opt/venv /opt/venv
# The model repository (/models, Triton's layout; docs/deployment.md), owned by the service's
# user down to its top folder, so that a new named volume mounted there (docker-compose.yml)
# starts as a copy of it that the service's user can add versions to.
COPY --from=builder --chown=10001:10001 /models /models

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    APD_CHECKPOINT=/opt/venv/share/apd/models/mnist-fcnn1/model.safetensors \
    APD_HOST=0.0.0.0 \
    APD_PORT=8000 \
    APD_WORKERS=1

WORKDIR /app
USER 10001:10001
# 8000: HTTP (REST); 8001: the Open Inference Protocol's gRPC binding, when APD_GRPC_PORT
# asks for it (Triton's two ports).
EXPOSE 8000 8001

# Healthy once the checkpoint is loaded (/readyz); Redis being down is "degraded", still 200.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('APD_PORT', '8000'), timeout=2)"]

ENTRYPOINT ["apd"]
CMD ["serve"]
