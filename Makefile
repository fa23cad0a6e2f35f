# deqguard developer entry points. `make test` and `make serve` set up .venv on first use;
# the stamp file makes repeat runs quick (re-install only when pyproject.toml changes).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help setup test test-slow test-all lint format serve clean wheelhouse image base-images image-test compose-test

help:
	@echo "make test       set up .venv if needed, run the fast tests"
	@echo "make test-slow  run only the tests marked slow"
	@echo "make test-all   run every test"
	@echo "make serve      set up .venv if needed, serve the default model (DEQGUARD_* env, SERVE_ARGS=...)"
	@echo "make lint       ruff check + ruff format --check"
	@echo "make format     ruff format + ruff check --fix"
	@echo "make setup      only create/refresh .venv"
	@echo "make image      wheelhouse/ (pip wheel, on the host) + docker build from it (BASE_IMAGE=..., IMAGE=...)"
	@echo "make base-images local Debian base/nginx/Prometheus images (debootstrap; no registry needed)"
	@echo "make image-test build the image, run it, check it (root + Docker; see docs/DEPLOYMENT.md)"
	@echo "make compose-test bring up the CPU compose stack from local images and check it"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/pytest -q

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow

test-all: $(STAMP)
	$(BIN)/pytest -q -m ''

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

serve: $(STAMP)
	exec $(BIN)/deqguard serve $(SERVE_ARGS)

clean:
	rm -rf .pytest_cache .ruff_cache *.egg-info
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -prune -exec rm -rf {} +

# ---------------------------------------------------------------- container image (docs/DEPLOYMENT.md)
# BASE_IMAGE empty: the Dockerfile's default (the CUDA runtime image). WHEEL_PYTHON builds the
# wheelhouse and must be the base image's Python minor version (3.11 for Debian 12).
IMAGE        ?= deqguard:latest
BASE_IMAGE   ?=
WHEEL_PYTHON ?= $(BIN)/python
DOCKER_BUILD_ARGS ?=

wheelhouse: $(STAMP)
	nice -n 10 $(WHEEL_PYTHON) -m pip wheel -q --wheel-dir wheelhouse . 'setuptools>=68' wheel

image: wheelhouse
	nice -n 10 docker build $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) $(DOCKER_BUILD_ARGS) -t $(IMAGE) .

base-images:
	scripts/with_docker.sh scripts/make_local_images.sh all

image-test: $(STAMP)
	scripts/with_docker.sh env DEQGUARD_DOCKER_TESTS=1 OMP_NUM_THREADS=1 $(BIN)/pytest -q -s -m docker -p no:cacheprovider tests/image/test_image.py

compose-test: $(STAMP)
	scripts/with_docker.sh --compose env DEQGUARD_DOCKER_TESTS=1 OMP_NUM_THREADS=1 $(BIN)/pytest -q -s -m docker -p no:cacheprovider tests/image/test_compose.py
