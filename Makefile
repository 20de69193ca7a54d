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

.PHONY: env build demo test test-rust test-aarch64 test-python test-plain test-gpu-machine lint \
	bench gpu-wheels wheels smoke-aarch64 clean

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

# The same Rust tests cross-compiled for aarch64 Linux and run under qemu-user. The first
# run installs the Debian cross toolchain and qemu and the rustup target (about 20 s); the
# whole takes about 1.5 minutes from nothing, 30 s warm (scripts/aarch64.sh).
test-aarch64:
	scripts/aarch64.sh test

# On a CPU where bitsandbytes detects AVX512-BF16, 4-bit layers run its fused kernel: the
# tests whose outcome depends on the kernel (marker cpu_kernel) then run a second time
# with the detection forced off, as on a CPU without it (tests/cpu_kernel.py).
HAS_FUSED_KERNEL = $(PY) -c 'import sys, bitsandbytes.functional as F; sys.exit(not F.has_avx512bf16())'

test-python: build
	$(PY) -m pytest
	@if $(HAS_FUSED_KERNEL) 2>/dev/null; then \
		echo "bitsandbytes detects AVX512-BF16: the cpu_kernel tests again with its plain kernel"; \
		LEANSTREAM_TEST_CPU_KERNEL=plain $(PY) -m pytest -m cpu_kernel; \
	fi

# The whole suite as on a CPU without AVX512-BF16 (bitsandbytes' detection forced off).
test-plain: build
	LEANSTREAM_TEST_CPU_KERNEL=plain $(PY) -m pytest

# The tests not marked gpu as a full pytest on a GPU machine runs them: torch answers that one
# CUDA device is there, in the test process and in the processes tests start
# (tests/gpu_machine/sitecustomize.py); they must still plan the CPU (tests/conftest.py).
test-gpu-machine: build
	LEANSTREAM_TEST_GPU_MACHINE=1 $(PY) -m pytest -m "not gpu"

test: lint test-rust test-aarch64 test-python test-gpu-machine

bench: build
	$(PY) benches/load.py

# What benches/gpu.sh needs on a lent GPU machine (Python 3.12, no Rust): the
# abi3 wheel, bitsandbytes (missing there), the transformers we pin (it has 5.17) and peft
# (one test; diffusers, 6 MB, does not fit: its tests skip there), into
# .whl/ (git-ignored; 58 MB: with the 2 MB tree, 60 of the 64 MiB a call may carry).
GPU_WHEELS = bitsandbytes==0.50.2 transformers==5.23.0 peft==0.21.2
gpu-wheels: env
	rm -rf .whl && mkdir -p .whl
	VIRTUAL_ENV=$(VENV) $(VENV)/bin/python -m maturin build --release --quiet --out .whl
	$(VENV)/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
		-d .whl $(GPU_WHEELS)

# The release abi3 wheels (cp311-abi3: any CPython >= 3.11) for x86_64 and aarch64 Linux,
# into dist/ (git-ignored); the aarch64 one is cross-compiled (scripts/aarch64.sh). Each is
# tagged manylinux_2_xx by maturin's audit from the glibc symbols it uses: 2_34 when built
# against Debian 12's glibc, as here. The aarch64 extension is then imported under qemu by
# Debian's aarch64 CPython and opens a checkpoint.
wheels: env
	mkdir -p dist && rm -f dist/leanstream-*.whl
	VIRTUAL_ENV=$(VENV) $(VENV)/bin/python -m maturin build --release --quiet --out dist
	VIRTUAL_ENV=$(VENV) scripts/aarch64.sh wheel dist
	scripts/aarch64.sh import dist/leanstream-*_aarch64.whl
	@ls dist/leanstream-*.whl

# leanstream.load of a tiny Llama at NF4 and int8 on emulated aarch64 (qemu-user, Debian's
# aarch64 CPython 3.11, the registry's aarch64 torch and bitsandbytes wheels), bit for bit
# bitsandbytes' quantization and transformers' own quantized model there. Not part of `make
# test`: the first run downloads about 3 GB of wheels (4.5 GB unpacked in the cache), 3 minutes;
# then about 1.5 minutes (scripts/aarch64.sh smoke).
smoke-aarch64: wheels
	VIRTUAL_ENV=$(VENV) scripts/aarch64.sh smoke

clean:
	cargo clean
	rm -rf build .pytest_cache
