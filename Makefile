# The two set-up commands (see README): `make demo` and `make test`.
# Both build everything they need from nothing: the cached virtual environment
# (scripts/env.sh), then the Rust extension, installed into it with maturin.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
VENV = $(shell scripts/env.sh)
PY = $(VENV)/bin/python

.PHONY: env build demo test test-rust test-python lint bench clean

env:
	@scripts/env.sh >/dev/null

build: env
	@cd . && VIRTUAL_ENV=$(VENV) $(PY) -m maturin develop --release --quiet

demo: build
	$(PY) -m leanstream.demo

lint: env
	cargo fmt --all --check
	cargo clippy --all-targets --no-default-features -- -D warnings
	cargo clippy --all-targets -- -D warnings
	$(PY) -m ruff format --check python tests benches
	$(PY) -m ruff check python tests benches

test-rust:
	cargo test --no-default-features

test-python: build
	$(PY) -m pytest

test: lint test-rust test-python

bench: build
	$(PY) benches/load.py

clean:
	cargo clean
	rm -rf build .pytest_cache
