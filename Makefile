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

export VCACHE_MODELS_DIR := $(abspath $(MODELS))

.PHONY: help demo test check lint typecheck unit bench bench-families bench-quick bench-store bench-encoder system-deps venv llama llama-cpp-python models clean distclean

help:
	@echo "make demo         build everything and show a cache miss, then hits, on a generated model"
	@echo "make test         build everything and run lint, type checks and the test suite"
	@echo "make bench        end-to-end benchmarks on the realistic vision and audio models -> docs/benchmarks.md"
	@echo "make bench-quick  the same on the tiny model (fast sanity run)"
	@echo "make bench-families  every vision family's realistic model: encode vs hit (docs/models.md)"
	@echo "make llama        build the patched and the stock llama-server (LLAMA_CPP=path for your checkout)"

# --- set-up -----------------------------------------------------------------------------------

# system packages the build and the tests use; installed only when missing (needs root or sudo)
SYSTEM_TOOLS := cmake:cmake g++:g++ git:git ccache:ccache redis-server:redis-server
system-deps:
	@$(PYTHON) scripts/system_deps.py $(SYSTEM_TOOLS)

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,redis]'
	touch $@

venv: $(VENV)/.installed

llama: system-deps
	$(PYTHON) scripts/build_llama_server.py --variant both --jobs $(JOBS) $(LLAMA_SRC)

# the bindings run on the patched build's shared libraries: one compile of llama.cpp
llama-cpp-python: venv llama
	scripts/install_llama_cpp_python.sh $(VENV)

models: venv
	$(PY) -m vision_cache.synthetic --all --out $(MODELS)

# --- the two README commands ------------------------------------------------------------------

demo: system-deps venv
	$(PYTHON) scripts/build_llama_server.py --variant patched --jobs $(JOBS) $(LLAMA_SRC)
	$(PY) scripts/demo.py

test: system-deps venv llama llama-cpp-python models check

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

bench: llama venv
	$(PY) -m scripts.bench_e2e --size realistic
	$(PY) -m scripts.bench_audio --size realistic

# every vision family's realistic model: encoder time, time to first token raw and from the
# package, package size (docs/models.md); generates each model (GBs), deletes it afterwards
bench-families: llama venv
	$(PY) -m scripts.bench_families --out .build/bench-families.json

bench-quick: llama models
	$(PY) -m scripts.bench_e2e --size tiny
	$(PY) -m scripts.bench_audio --size tiny

bench-encoder: llama-cpp-python
	$(PY) -m vision_cache.synthetic --family gemma3 --size realistic --out $(MODELS)
	$(PY) -m scripts.bench_encoder_worker --size realistic

bench-store: venv
	$(PY) scripts/bench_store.py

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache .coverage .coverage.*

distclean: clean
	rm -rf $(VENV) $(BUILD)
