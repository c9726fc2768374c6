# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-stress bench load security-report lint typecheck pytest sim clean

# The daemons need neither extra. `report` (rich, matplotlib) draws the demo's and the benchmarks'
# tables and charts; `dev` (test, lint and type-check tools) includes it.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,report]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m gpu_agent.demo --clean
	$(BIN)/python -m controller.demo

test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

# The whole suite 5 times in a row while a busy loop runs on every core; stops at a failure.
test-stress: $(STAMP)
	$(BIN)/python -m tools.stress --runs 5

bench: $(STAMP)
	$(BIN)/python -m bench

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
