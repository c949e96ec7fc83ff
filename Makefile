# Two commands do all set-up: `make demo` and `make test`. Both create or reuse .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# A bare `torch` requirement can pull a multi-GB CUDA build; install the CPU release first (TRAPS.md).
TORCH_SPEC ?= torch==2.13.0
export WORKBENCH_HOME ?= $(CURDIR)/workbench-runs

.PHONY: install demo test test-fast clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[widgets,test]"
	$(PY) -m workbench assets install
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m workbench train configs/demo.yaml

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not integration"

clean:
	rm -rf $(VENV) workbench-runs .pytest_cache
