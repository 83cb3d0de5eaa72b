# archserve: `make serve` sets everything up and starts the server; `make test` runs the tests.
# Each target installs what it needs into .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch for the export stage and the tests (the service never imports it).
# Override for another platform, e.g. TORCH_SPEC="torch torchvision --index-url <your CPU wheel index>".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
MODELS_DIR ?= models
DEFAULT_MODELS ?= resnet18,resnet50
PYTEST_ARGS ?=
PORT ?= 8000

.PHONY: install models serve test test-fast test-services bench schema

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Export the default model set, unless the repository already holds models.
models: install
	@if [ -z "$$(find $(MODELS_DIR) -mindepth 3 -maxdepth 3 -name model.json 2>/dev/null)" ]; then \
		$(BIN)/python -m export --models $(DEFAULT_MODELS) --out $(MODELS_DIR); \
	else echo "$(MODELS_DIR)/ already holds models; not exporting"; fi

# Set up everything, export the default models if there are none, serve on :8000.
serve: models
	$(BIN)/python -m service --models-dir $(MODELS_DIR) --port $(PORT)

# Services some tests use: a throwaway PostgreSQL on 127.0.0.1:55432 (.ci/postgres.sh) and
# promtool, both Debian packages (installing them needs root). Missing, their tests fail under
# CI=true and are skipped otherwise, with the reason.
test-services:
	@bash .ci/postgres.sh >/dev/null || { [ -z "$$CI" ] && echo "note: no PostgreSQL: the PostgreSQL store tests will be skipped" >&2; }
	@bash .ci/promtool.sh || { [ -z "$$CI" ] && echo "note: no promtool: the promtool checks will be skipped" >&2; }

test: install test-services
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Everything but the deep models (CI runs them all).
test-fast: install test-services
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

schema: install
	$(BIN)/python -m modelrepo > modelrepo/model.schema.json

# Engine-only vs end-to-end vs a naive server, for resnet50 and resnet18 (see bench/README.md).
bench: install
	$(BIN)/python -m bench.run $(BENCH_ARGS)
