# Two entry points: `make bench` (the main job) and `make test`.
# Both create .venv on first use and install the package into it, pinned by constraints.txt.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: test test-isa bench gpu-check install-test install-bench lint clean test-compat

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

# The numerics-sensitive tests under other CPU kernels: ATen's portable and AVX2 kernels instead of
# AVX-512, and MKL restricted to AVX2 (each changes float32 rounding, as another CPU would).
ISA_TESTS := tests/test_contract.py tests/test_rga.py tests/test_pyramid.py tests/test_pfsa.py \
	tests/test_memory.py tests/test_norms.py tests/test_ddp.py tests/test_inference.py
ISA_SETTINGS := ATEN_CPU_CAPABILITY=default ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2

test-isa: install-test
	@set -e; for setting in $(ISA_SETTINGS); do \
		echo "== $$setting"; env $$setting $(PY) -m pytest -q -p no:cacheprovider $(ISA_TESTS); \
	done

# The default benchmark: every attention kind at one paper site (reference vs fused) and the
# ResNet-50 + RGA-SC network overhead, each row one realistic training step; CPU-sized (a few
# minutes on 2 cores). Exits non-zero if a row failed other than by running out of memory.
bench: $(BENCH_INSTALL)
	$(PY) -m reid_attention bench --threads 2

# The re-ID framework integrations (tests/integrations): torchreid (deep-person-reid) and fast-reid train
# and evaluate our models end to end on a synthetic Market-1501, on the CPU, in about 6 min of 2 cores.
# Installs the test extra and each framework's extra into .venv, then fastreid without its dependencies
# (its only release pins torch 1.13.1, which has no wheel for Python >= 3.11; docs/integrations.md).
INTEGRATION_EXTRAS := test,torchreid,fastreid
.PHONY: test-integrations
test-integrations: $(VENV)/bin/activate
	$(PIP) -e ".[$(INTEGRATION_EXTRAS)]"
	$(PIP) --no-deps fastreid==1.4.0
	$(PY) -m pytest -q tests/integrations

# On a CUDA machine: the CUDA tests and the GPU benchmarks (benchmarks/gpu_check.sh installs what it needs).
gpu-check:
	benchmarks/gpu_check.sh

# The layer, norm and insertion tests on a version matrix (torch 2.5 to 2.15, Python 3.9 to 3.13,
# einops 0.7): one venv per entry in .compat-cache/, reused; results in tools/compat_results.md.
# Warm: about 33 min on 2 shared cores (3-8 min an entry). Cold: about 3 GB of downloads per CUDA
# torch build and 15 min more; the venvs keep about 27 GB. COMPAT_ARGS="--list", "--only NAME",
# "--at HEAD" (test a commit, not the working tree), or "--entry 'python=3.11 torch=2.6.0'".
test-compat:
	$(PYTHON) tools/compat.py $(COMPAT_ARGS)

# The API reference, generated from the docstrings by pdoc (in the test extra): HTML in docs/api/
# (git-ignored). Fails on a pdoc warning or a docstring cross-reference that names nothing.
.PHONY: docs
docs: install-test
	$(PY) docs/build_api.py docs/api

$(VENV)/.installed-dev: $(VENV)/bin/activate pyproject.toml constraints.txt
	$(PIP) -e ".[dev]"
	touch $@

# ruff (rules in pyproject.toml) on every Python file, mypy --strict on the package.
LINT_PATHS := src tests benchmarks examples tools docs hubconf.py
lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .hypothesis
