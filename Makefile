# transferlab: `make demo` runs the quickstart pairwise grid; `make test` runs the test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU build of torch by default; GPU users install their own torch first (TORCH_SPEC= to skip).
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo test bench lint clean

$(BIN)/transferlab: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/pip install -q "$(TORCH_SPEC)"; fi
	$(BIN)/pip install -q -e ".[dev]"
	touch $(BIN)/transferlab

venv: $(BIN)/transferlab

demo: venv
	$(BIN)/transferlab run configs/quickstart.yaml

test: venv
	$(BIN)/python -m pytest -q tests

bench: venv
	$(BIN)/python benchmarks/bench_analysis.py

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf results reports
