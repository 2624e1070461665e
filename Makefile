# Two entry points (see README): `make train` runs the quickstart, `make test` runs the test suite.
# Each creates .venv and installs what it needs. torch==2.13.0 is pinned first so pip takes the
# local CPU wheel and never pulls a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: train test install clean results

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test,gym]"
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	rm -rf runs/quickstart
	$(BIN)/turnrl train --preset quickstart --out runs/quickstart
	$(BIN)/turnrl eval runs/quickstart

test: $(STAMP)
	$(BIN)/python -m pytest -q; status=$$?; if [ $$status -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$status

results: $(STAMP)
	$(BIN)/python scripts/algo_table.py

clean:
	rm -rf $(VENV) runs .pytest_cache
