# One command sets up and serves, one sets up and tests (see README).
PYTHON ?= python3
# The full stack (training, tests, tools): .venv. Serving alone: .venv-serve, no torch.
VENV   := .venv
BIN    := $(VENV)/bin
SERVE_VENV := .venv-serve
SERVE_BIN  := $(SERVE_VENV)/bin
# The serving dependencies, exact and hash-checked: the versions the tests run with.
LOCK   := requirements/serve.lock
# PyTorch's CPU build, pinned: from a local wheel folder where pip's configuration names one
# holding it (find-links, as on the team's machines), else from PyTorch's CPU wheel index
# (an extra index: the exact version "+cpu" is only there, so no CUDA build can be chosen).
TORCH_VERSION   := 2.13.0+cpu
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
PIP_FIND_LINKS_DIRS = $(subst file://,,$(PIP_FIND_LINKS) \
	$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
TORCH_LOCAL_WHEEL = $(firstword $(foreach d,$(PIP_FIND_LINKS_DIRS),\
	$(wildcard $(d)/torch-$(TORCH_VERSION)-*.whl)))
TORCH_SOURCE = $(if $(TORCH_LOCAL_WHEEL),,--extra-index-url $(TORCH_CPU_INDEX))
# Datasets: ../shared/data on the team's machines, ./data elsewhere (MNIST downloads there).
APD_DATA_DIR ?= $(if $(wildcard ../shared/data/mnist),$(abspath ../shared/data),$(CURDIR)/data)
export APD_DATA_DIR

.PHONY: setup setup-serve serve test lint typecheck unit format clean deploy-check image \
	image-train lock proto

$(BIN)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The serving closure at its locked versions (tests/test_packaging.py holds the two equal).
	$(BIN)/pip install -q --require-hashes -r $(LOCK)
	# The CPU build of torch first, pinned, so no dependency pulls a multi-GB CUDA build.
	$(BIN)/pip install -q 'torch==$(TORCH_VERSION)' $(TORCH_SOURCE)
	$(BIN)/pip install -q -e '.[serve,train,dev,eval]'
	# laplace-torch's torchvision: unused, and PyPI's CUDA build breaks the CPU torch (pyproject).
	$(BIN)/pip uninstall -q -y torchvision
	touch $@

setup: $(BIN)/.installed

# Serving only (README "Quick start"): the locked [serve] closure and apd, no torch.
$(SERVE_BIN)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_BIN)/pip install -q --require-hashes -r $(LOCK)
	$(SERVE_BIN)/pip install -q --no-deps -e .
	touch $@

setup-serve: $(SERVE_BIN)/.installed

serve: setup-serve
	$(SERVE_BIN)/apd serve

# Rewrite the lock from the versions installed in .venv (after upgrading a dependency there
# and running the tests), then `make setup` installs from it.
lock:
	$(BIN)/pip list --format=freeze --exclude-editable 2>/dev/null > $(VENV)/tested-versions.txt
	$(BIN)/uv pip compile -q pyproject.toml --extra serve --generate-hashes \
		--python $(BIN)/python --constraint $(VENV)/tested-versions.txt \
		--custom-compile-command 'make lock' --output-file $(LOCK)

# The gRPC stubs of the Open Inference Protocol (service/grpc/), from its .proto, with the
# dev dependency grpcio-tools (serving needs only grpcio and protobuf); committed, and
# tests/test_grpc.py checks they are what this writes.
PROTO := service/grpc/grpc_service.proto
proto:
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. $(PROTO)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

unit: setup
	$(BIN)/pytest -q

test: lint typecheck unit

# The deployment checks alone (also part of `make test`): static checks of the Dockerfile,
# compose, Prometheus, Grafana and Kubernetes files, then the loopback topology (needs Debian's
# prometheus: apt-get install prometheus).
deploy-check: setup
	$(BIN)/pytest -q tests/test_deploy_static.py tests/test_topology.py tests/test_k8s_manifests.py

# Images, where a Docker engine runs (docs/deployment.md).
image:
	docker build --target runtime -t apd:0.1.0 .

image-train:
	docker build --target train -t apd-train:0.1.0 .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) $(SERVE_VENV) .pytest_cache .mypy_cache .ruff_cache
