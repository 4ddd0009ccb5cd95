# transferlab: `make demo` runs the quickstart pairwise grid; `make test` runs the test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU build of torch by default; GPU users install their own torch first (TORCH_SPEC= to skip).
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo test bench bench-budget bench-training bench-serve smoke-configs fute-cpu lint clean

# deepspeed (in `dev`) is an sdist: its isolated build env gets only setuptools (without torch its
# setup.py skips op pre-compilation), so no CUDA torch is fetched and no --no-build-isolation is
# needed; pip caches the built wheel.
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

# Figures: vectorised analyses vs loops; staged vs naive pairwise plan (wall-time ratio next to its compute
# ratio), per-trial overhead on warm workers, worker-idle time saved by releasing transfers early.
bench: venv
	$(BIN)/python benchmarks/bench_analysis.py
	$(BIN)/python benchmarks/bench_pairwise.py

# Replay speed of the budgeted-grid evaluation (30 seed splits x every TaskWeb setup).
bench-budget: venv
	$(BIN)/python benchmarks/bench_budget.py

# Throughput and peak memory per model family x adaptation method (and ZeRO stages).
bench-training: venv
	$(BIN)/python benchmarks/bench_training.py

# Serving: throughput and p50/p99 latency at concurrency 1/8/32, batched vs unbatched, Serve vs direct scorer.
bench-serve: venv
	$(BIN)/python benchmarks/bench_serve.py

# Every config in configs/ end to end with --smoke (tiny models, 3 tasks, a few steps), timed.
smoke-configs: venv
	$(BIN)/python -m rayjobs.smoke

# FUTE (paper 004) on a CPU: embeddings, selection evaluations and the report with figures (reports/fute_cpu/).
fute-cpu: venv
	$(BIN)/python benchmarks/fute_cpu.py

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf results reports
