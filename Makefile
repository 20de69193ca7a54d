# The two set-up commands (see README): `make demo` and `make test`.
# Both build everything they need from nothing: the cached virtual environment
# (scripts/env.sh), then the Rust extension, built in place into python/leanstream/
# by maturin (no install: PY puts this checkout on PYTHONPATH).
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
VENV = $(shell scripts/env.sh)
# The venv is shared by every checkout on this machine (it is keyed by the
# dependency list, not by the checkout), and maturin's editable install points
# it at whichever checkout built last: always run this checkout's package.
PY = PYTHONPATH=$(CURDIR)/python $(VENV)/bin/python

.PHONY: env build demo test test-rust test-python lint bench clean

env:
	@scripts/env.sh >/dev/null

build: env
	VIRTUAL_ENV=$(VENV) $(VENV)/bin/python -m maturin develop --release --quiet --skip-install

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
