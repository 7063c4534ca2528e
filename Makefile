# vcache: the two commands the README starts with are `make demo` and `make test`.
# Everything they need (system packages, virtualenv, llama-server builds, test models) is
# installed by the targets below, each step skipped when its output is already there.

PYTHON    ?= python3
VENV      ?= .venv
PY        := $(VENV)/bin/python
BUILD     ?= .build
MODELS    ?= $(BUILD)/models
LLAMA_CPP ?=
LLAMA_SRC := $(if $(LLAMA_CPP),--source $(LLAMA_CPP),)
JOBS      ?= $(shell nproc 2>/dev/null || echo 2)
# the builds the tests use; LLAMA_BACKEND=cuda for NVIDIA GPUs (the tests run either way)
LLAMA_BACKEND ?= cpu
VCACHE    := $(VENV)/bin/vcache

export VCACHE_MODELS_DIR := $(abspath $(MODELS))
# `vcache build-server` keeps its builds here rather than in the user's cache directory
export VCACHE_LLAMA_CACHE := $(abspath $(BUILD)/llama)

.PHONY: help demo demo-deps test conformance check lint typecheck unit bench bench-families bench-quick bench-store bench-encoder gpu-check compat rebase-patches system-deps venv llama llama-cpp-python models clean distclean

help:
	@echo "make demo         build everything and show a cache miss, then hits, on a generated model"
	@echo "make test         build everything and run lint, type checks and the test suite"
	@echo "make conformance  llama.cpp's server tests, direct and through vcache, compared"
	@echo "make bench        end-to-end (vision, audio), against-stock and load benchmarks -> docs/benchmarks.md"
	@echo "make bench-quick  the same on the tiny model (fast sanity run)"
	@echo "make bench-families  every vision family's realistic model: encode vs hit (docs/models.md)"
	@echo "make llama        build the patched and the stock llama-server (LLAMA_CPP=path for your checkout,"
	@echo "                  LLAMA_BACKEND=cuda for NVIDIA GPUs)"
	@echo "make gpu-check    on a machine with an NVIDIA GPU: CUDA builds, model tests and benchmarks"
	@echo "make compat       apply, build and test the patches on the last five llama-cpp-python trees"
	@echo "                  -> llama_patches/README.md (hours on two cores; not part of make test)"
	@echo "make rebase-patches LLAMA_CPP=path  port the patches onto a llama.cpp checkout, build, check"

# --- set-up -----------------------------------------------------------------------------------

# system packages, installed only when missing (that needs root or sudo; with everything
# present, nothing does). `?`: optional, skipped when it cannot be installed.
DEMO_TOOLS := cmake:cmake g++:g++ git:git ?ccache:ccache
# chromium runs the browser test against llama.cpp's web UI (which the servers embed, built
# with the Node.js that pip installs in the venv: Debian 12's own is too old for it)
TEST_TOOLS := cmake:cmake g++:g++ git:git ccache:ccache redis-server:redis-server \
              chromium:chromium
system-deps:
	@$(PYTHON) scripts/system_deps.py $(TEST_TOOLS)

demo-deps:
	@$(PYTHON) scripts/system_deps.py $(DEMO_TOOLS)

PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

# the demo's share of the virtualenv: vcache itself, and gguf to write the demo model
$(VENV)/.demo-installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e . 'gguf==0.19.0'
	touch $@

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e '.[dev,redis]'
	touch $@ $(VENV)/.demo-installed

venv: $(VENV)/.installed

llama: system-deps venv
	$(VCACHE) build-server --$(LLAMA_BACKEND) --ui --variant patched --jobs $(JOBS) $(LLAMA_SRC)
	$(VCACHE) build-server --$(LLAMA_BACKEND) --ui --variant stock --jobs $(JOBS) $(LLAMA_SRC)

# the bindings run on the patched build's shared libraries: one compile of llama.cpp
llama-cpp-python: venv llama
	scripts/install_llama_cpp_python.sh $(VENV) \
	    "$$(dirname "$$($(VCACHE) build-server --$(LLAMA_BACKEND) $(LLAMA_SRC))")"

models: venv
	$(PY) -m vision_cache.synthetic --all --out $(MODELS)

# --- the two README commands ------------------------------------------------------------------

# builds the patched server only (for CUDA when an NVIDIA GPU is present); no Redis, no root
# when the tools are there
demo: demo-deps $(VENV)/.demo-installed
	$(PY) scripts/demo.py --jobs $(JOBS) $(LLAMA_SRC)

test: system-deps venv llama llama-cpp-python models check conformance

# llama.cpp's own server tests, straight at llama-server and through vcache, compared test by
# test (stock and patched upstreams); fails on any test that passes direct only, and again
# alone (about 15 minutes on two idle cores; the last step of make test)
conformance: venv llama
	nice -n 10 $(PY) -m scripts.conformance

check: lint typecheck unit

lint: venv
	$(VENV)/bin/ruff check proxy vision_cache scripts tests fuzz
	$(VENV)/bin/ruff format --check proxy vision_cache scripts tests fuzz

typecheck: venv llama-cpp-python
	$(VENV)/bin/mypy

# the line coverage of proxy/ and vision_cache/ (93.6% reached; the vcache processes it
# starts included; the floor is the whole percent reached): under it fails `make test`
COVERAGE_FLOOR ?= 93

unit: venv
	$(VENV)/bin/pytest -q --cov --cov-report=term --cov-fail-under=$(COVERAGE_FLOOR)

# --- benchmarks -------------------------------------------------------------------------------

# end to end, then against stock llama-server at its best and where its prompt cache cannot
# help, then text latency while other clients send big images (each writes its own section)
bench: llama venv
	$(PY) -m scripts.bench_e2e --size realistic
	$(PY) -m scripts.bench_audio --size realistic
	$(PY) -m scripts.bench_stock --size realistic
	$(PY) -m scripts.bench_load

# every vision family's realistic model: encoder time, time to first token raw and from the
# package, package size (docs/models.md); generates each model (GBs), deletes it afterwards
bench-families: llama venv
	$(PY) -m scripts.bench_families --out .build/bench-families.json

bench-quick: llama models
	$(PY) -m scripts.bench_e2e --size tiny
	$(PY) -m scripts.bench_audio --size tiny
	$(PY) -m scripts.bench_stock --size tiny
	$(PY) -m scripts.bench_load --clients 4 --seconds 5 --no-write

bench-encoder: llama-cpp-python
	$(PY) -m vision_cache.synthetic --family gemma3 --size realistic --out $(MODELS)
	$(PY) -m scripts.bench_encoder_worker --size realistic

bench-store: venv
	$(PY) scripts/bench_store.py

# the patches on the llama.cpp trees of the last five llama-cpp-python releases (outside make test)
compat: system-deps venv models
	nice -n 10 $(PY) -m scripts.compat --jobs $(JOBS)

# three-way apply onto a llama.cpp git checkout, build, tiny equivalence check, report
rebase-patches: system-deps venv
	$(PY) -m scripts.rebase_patches $(LLAMA_CPP)

# on a machine with an NVIDIA GPU: CUDA builds, conformance tests and benchmarks on the GPU
gpu-check:
	scripts/gpu_check.sh

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache .coverage .coverage.*

distclean: clean
	rm -rf $(VENV) $(BUILD)
