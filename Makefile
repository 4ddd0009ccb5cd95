# transferlab: `make demo` runs the quickstart pairwise grid; `make test` runs the test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU build of torch by default; GPU users install their own torch first (TORCH_SPEC= to skip).
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo test bench bench-training bench-serve bench-scale bench-scale-full smoke-configs fute-cpu lint clean

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

# Throughput and peak memory per model family x adaptation method (and ZeRO stages).
bench-training: venv
	$(BIN)/python benchmarks/bench_training.py

# Serving: throughput and p50/p99 latency at concurrency 1/8/32, batched vs unbatched, Serve vs direct scorer.
bench-serve: venv
	$(BIN)/python benchmarks/bench_serve.py

# scale (issue 20): the real driver on simulated TaskWeb-shaped studies of 500-8,000 trials on a 4-node
# cluster on this machine, faults at 8,000, and every analysis query over 30 M prediction rows (~15 min)
bench-scale: venv
	$(BIN)/python benchmarks/bench_scale.py

bench-scale-full: venv
	$(BIN)/python benchmarks/bench_scale.py --sizes 500,2000,8000,30000

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
