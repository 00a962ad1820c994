# The two commands: `make demo` runs the gateway with two simulated upstreams (on port 8080,
# or another: `make demo PORT=9090`), `make test` runs the whole test suite. Both create the
# virtual environment on the way.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench system-deps clean

$(BIN)/mjgate: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(BIN)/mjgate
	$(BIN)/mjgate demo $(if $(PORT),--port $(PORT))

system-deps:
	scripts/system-deps redis-server redis-sentinel redis-cli docker-compose chromium chromedriver
	scripts/install-prometheus

lint: $(BIN)/mjgate
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: $(BIN)/mjgate system-deps lint
	$(BIN)/pytest

bench: $(BIN)/mjgate
	scripts/system-deps redis-server wrk nginx
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
