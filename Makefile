# One command sets up and serves, one sets up and tests (see README).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Datasets: ../shared/data on the team's machines, ./data elsewhere (MNIST downloads there).
APD_DATA_DIR ?= $(if $(wildcard ../shared/data/mnist),$(abspath ../shared/data),$(CURDIR)/data)
export APD_DATA_DIR

.PHONY: setup serve test lint typecheck unit format clean deploy-check image image-train

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first, pinned, so no dependency pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[serve,train,dev]'
	touch $@

setup: $(BIN)/.installed

serve: setup
	$(BIN)/apd serve

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
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
