# Two commands do all set-up: `make demo` and `make test`. Both create or reuse .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# A bare `torch` requirement can pull a multi-GB CUDA build; install the CPU release first.
TORCH_SPEC ?= torch==2.13.0
export WORKBENCH_HOME ?= $(CURDIR)/workbench-runs

.PHONY: install demo test test-fast browser clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[widgets,notebooks,test,serve,cluster]"
	$(PY) -m workbench assets install
	@touch $(STAMP)

install: $(STAMP)

# Trains the embedded default (offline, ~2 min), prints its accuracy, then serves the dashboard on 127.0.0.1.
demo: install
	$(PY) -m workbench train configs/demo.yaml
	$(PY) scripts/serve_dashboard.py

# Browser tests drive Debian's chromium (never a downloaded browser). As root (CI) it is installed here;
# elsewhere those tests skip and say how to enable them.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium not installed: browser tests will skip (as root: apt-get install chromium)"; }

# Two test processes (pytest-xdist), each test file whole on one of them (its module fixtures are built once):
# most tests wait on subprocesses, servers and browsers, so two cores run two at once (22 -> 14 min measured).
TEST_WORKERS ?= 2
test: install browser
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not integration"

clean:
	rm -rf $(VENV) workbench-runs .pytest_cache
