# Two entry points: `make bench` (the main job) and `make test`.
# Both create .venv on first use and install the package into it, pinned by constraints.txt.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: test bench gpu-check install-test install-bench lint clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-test: $(VENV)/bin/activate pyproject.toml constraints.txt
	$(PIP) -e ".[test]"
	touch $@

$(VENV)/.installed-bench: $(VENV)/bin/activate pyproject.toml constraints.txt
	$(PIP) -e ".[bench]"
	touch $@

install-test: $(VENV)/.installed-test
install-bench: $(VENV)/.installed-bench

# The test extra holds everything bench needs, so after `make test` the bench run reuses that
# install instead of installing again; only a venv without it gets the (smaller) bench extra.
BENCH_INSTALL := $(if $(wildcard $(VENV)/.installed-test),$(VENV)/.installed-test,$(VENV)/.installed-bench)

test: install-test
	$(PY) -m pytest -q

# The default benchmark: every attention kind at one paper site (reference vs fused) and the
# ResNet-50 + RGA-SC network overhead, each row one realistic training step; CPU-sized (a few
# minutes on 2 cores). Exits non-zero if a row failed other than by running out of memory.
bench: $(BENCH_INSTALL)
	$(PY) -m reid_attention bench --threads 2

# On a CUDA machine: the CUDA tests and the GPU benchmarks (benchmarks/gpu_check.sh installs what it needs).
gpu-check:
	benchmarks/gpu_check.sh

lint:
	$(PIP) -e ".[dev]" && $(VENV)/bin/ruff check src tests benchmarks examples

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .hypothesis
