# The two commands a new user runs: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck bench models handheld-models clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/customs-edge demo $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/pytest -q -n 2 $(ARGS)

bench: $(STAMP)
	$(BIN)/python bench/pipeline.py $(ARGS)

models: $(STAMP)
	$(BIN)/python -m customs_edge.training.train all

# the handheld's wood and insect classifiers only (images from simulators.specimens; < 2 min each)
handheld-models: $(STAMP)
	$(BIN)/python -m customs_edge.training.train wood
	$(BIN)/python -m customs_edge.training.train insects

clean:
	rm -rf $(VENV) var build *.egg-info
