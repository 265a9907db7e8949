# Two commands for a newcomer: `make serve` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup serve test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[train,ray,dev]'
	touch $@

setup: $(STAMP)

# Registers the offline ImageNet model once (idempotent), then serves on port 3000.
serve: setup
	$(VENV)/bin/imgclf bootstrap
	$(VENV)/bin/imgclf serve --port 3000

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check imgclf service training tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
