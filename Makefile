# Two commands for a newcomer: `make serve` and `make test`. Both set everything up first.
PYTHON ?= python3
# pytest processes: two measured fastest on the 2-core machine (docs/testing.md); modules stay whole on one.
TEST_WORKERS ?= 2
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup serve test test-quick lint audit clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[train,ray,dev]'
	touch $@

setup: $(STAMP)

# Registers the offline ImageNet model once (idempotent), then serves on port 3000 with it as the
# default model (a request without `model` gets it, however many models are promoted beside it).
serve: setup
	$(VENV)/bin/imgclf bootstrap
	IMGCLF_DEFAULT_MODEL=$${IMGCLF_DEFAULT_MODEL-imagenet-lite0} $(VENV)/bin/imgclf serve --port 3000

# Every test, the layering contracts included (tests/test_layering.py runs lint-imports).
test: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

# The inner loop: everything but the tests marked slow (servers, training, subprocesses, the browser).
test-quick: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow"

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
