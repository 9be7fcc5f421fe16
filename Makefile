# Developer entry points. On a fresh clone `make demo` and `make test` create .venv,
# install requirements.txt into it, build the C++ extension (editable install) and run.
#
#   make venv     .venv with requirements.txt (redone when requirements.txt changes)
#   make build    pip install --no-build-isolation -e . (redone when csrc/, setup.py or
#                 pyproject.toml change)
#   make demo     python -m slimops demo
#   make test     pytest tests -q in TEST_WORKERS processes (default 2; extra pytest
#                 arguments: PYTEST_ARGS="-k linear")
#   make bench    pytest bench --benchmark-only (extra arguments: BENCH_ARGS=...)
#   make cmake    libslimops.so + C++ smoke test via CMake in build-cmake/, then ctest
#   make clean    build outputs (keeps .venv); `make distclean` removes .venv too

PYTHON ?= python3
VENV ?= .venv
MAX_JOBS ?= 2
PYTEST_ARGS ?=
BENCH_ARGS ?=
# pytest-xdist workers for `make test`. Why two: much of the suite is single-threaded
# (the Triton interpreter's kernel tests, subprocesses, Python-bound small ops), so a second
# process on the second core cut the suite's time from 26 to 14-15 minutes on a 2-core AMD
# EPYC. --dist loadfile: a module's tests run in one worker, so its module-scoped fixtures
# run once (the AOT compiles, read by two modules, are shared through a file:
# tests/helpers.py aot_results). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
CMAKE_BUILD_DIR ?= build-cmake
CMAKE_BUILD_TYPE ?= Release

VENV_PY := $(VENV)/bin/python
PIP := $(VENV_PY) -m pip
VENV_STAMP := $(VENV)/.stamp
BUILD_STAMP := $(VENV)/.slimops-build.stamp

# Everything the extension is compiled from. The directories are listed too, so adding or
# removing a source file (which changes its directory's mtime) also triggers a rebuild.
CSRC := $(shell find csrc \( -name '*.cpp' -o -name '*.h' -o -name '*.inc' -o -name '*.cu' -o -name '*.cuh' -o -type d \) -print 2>/dev/null)

# Every recipe line runs in bash with errexit, nounset and pipefail.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DELETE_ON_ERROR:
# Quiet "Entering directory" lines from the make that `cmake --build` runs.
MAKEFLAGS += --no-print-directory

.PHONY: all help venv build demo test bench cmake clean distclean

all: build

help:
	@sed -n '1,/^$$/p' $(firstword $(MAKEFILE_LIST))

venv: $(VENV_STAMP)

$(VENV_STAMP): requirements.txt
	@echo ">> venv: $(VENV) with requirements.txt"
	if [ ! -x "$(VENV_PY)" ]; then $(PYTHON) -m venv "$(VENV)"; fi
	$(PIP) install --progress-bar off -r requirements.txt
	touch "$@"

build: $(BUILD_STAMP)

# --no-build-isolation: compile against the torch already in the venv (requirements.txt
# pins it). --no-deps: the venv step installed the dependencies; never let this step
# resolve torch again (a looser pin would pull a multi-GB CUDA build). pip -q still prints
# the compiler output when the build fails.
$(BUILD_STAMP): $(VENV_STAMP) setup.py pyproject.toml $(CSRC)
	@echo ">> build: pip install --no-build-isolation -e . (MAX_JOBS=$(MAX_JOBS))"
	MAX_JOBS=$(MAX_JOBS) $(PIP) install -q --no-build-isolation --no-deps -e .
	touch "$@"

demo: build
	$(VENV_PY) -m slimops demo

test: build
	$(VENV_PY) -m pytest tests -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: build
	$(VENV_PY) -m pytest bench --benchmark-only $(BENCH_ARGS)

# libtorch from the venv's torch wheel; see the top of CMakeLists.txt.
cmake: venv
	@echo ">> cmake: configure + build $(CMAKE_BUILD_DIR)/, then ctest"
	torch_prefix="$$($(VENV_PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"; \
	cmake -S . -B "$(CMAKE_BUILD_DIR)" -DCMAKE_BUILD_TYPE="$(CMAKE_BUILD_TYPE)" \
	      -DCMAKE_PREFIX_PATH="$$torch_prefix"
	cmake --build "$(CMAKE_BUILD_DIR)" -j "$(MAX_JOBS)"
	cd "$(CMAKE_BUILD_DIR)" && ctest --output-on-failure

clean:
	rm -rf build "$(CMAKE_BUILD_DIR)" *.egg-info .pytest_cache .benchmarks "$(BUILD_STAMP)"
	rm -f slimops/_C*.so
	find . -path "./$(VENV)" -prune -o -path ./.git -prune -o \
	       -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf "$(VENV)"
