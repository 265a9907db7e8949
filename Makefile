# Two commands for a newcomer: `make serve` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup serve test lint audit clean

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
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check imgclf service training tests benchmarks

# Known vulnerabilities of the serving image's packages (bentofile.yaml python.packages, resolved),
# from PyPI's advisory data. Needs pypi.org's JSON API (the project's pages per version); --strict
# makes a package that cannot be looked up a failure, never a silent pass. Not part of `make test`.
audit: setup
	$(PY) -c "import yaml; print(*yaml.safe_load(open('bentofile.yaml'))['python']['packages'], sep='\n')" > $(VENV)/serving-requirements.txt
	$(VENV)/bin/pip-audit --strict --progress-spinner off --desc -r $(VENV)/serving-requirements.txt

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
