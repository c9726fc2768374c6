# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-stress bench chaos load security-report lint typecheck pytest sim clean redis chromium

# The daemons need no extra. `report` (rich, matplotlib) draws the demo's and the benchmarks'
# tables and charts; `workflows` (Celery, redis) runs the studio's workflows; `dev` (test, lint
# and type-check tools) includes both.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,report,workflows]'
	touch $(STAMP)

# Redis for the Celery workflows (their tests, demo and benchmark): Debian's redis-server,
# installed when missing (as root, or through sudo).
redis:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server >/dev/null; }

# Chromium for the dashboard's browser tests: Debian's package, installed when missing. The
# tests drive it with Playwright, which never downloads a browser of its own here.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing chromium"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null \
	  || echo "chromium could not be installed: the browser tests will skip and say so"; }

demo: $(STAMP) redis
	$(BIN)/python -m gpu_agent.demo --clean
	$(BIN)/python -m controller.demo
	$(BIN)/python -m controller.workflows.demo

test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) redis chromium
	$(BIN)/pytest

# The whole suite 5 times in a row while a busy loop runs on every core; stops at a failure.
test-stress: $(STAMP)
	$(BIN)/python -m tools.stress --runs 5

bench: $(STAMP) redis
	$(BIN)/python -m bench

# A simulated working day per seed under 1,000 injected faults, invariants checked throughout;
# 10 seeds, out/chaos.json. `python -m bench chaos --seed N` replays one seed.
chaos: $(STAMP)
	$(BIN)/python -m bench chaos

# 500 streamed LLM requests and 1,000 image jobs at once through the controller; out/load.json.
load: $(STAMP)
	$(BIN)/python -m bench.load

# Runs the fault and hostile-input tests and rewrites the table in SECURITY.md.
security-report: $(STAMP)
	$(BIN)/python -m tools.security_report

sim: $(STAMP)
	$(BIN)/gpu-agent sim

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
