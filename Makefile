# Two entry points: `make bench` (the main job) and `make test`.
# Both create .venv on first use and install the package into it, pinned by constraints.txt.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: test bench install-test install-bench lint clean

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

test: install-test
	$(PY) -m pytest -q

# The default benchmark: every attention kind at its largest paper site (reference vs fused)
# and the ResNet-50 + RGA-SC network overhead; CPU-sized (a few minutes on 2 cores).
bench: install-bench
	$(PY) -m reid_attention bench --threads 2

lint:
	$(PIP) -e ".[dev]" && $(VENV)/bin/ruff check src tests benchmarks examples

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .hypothesis
