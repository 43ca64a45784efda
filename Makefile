# Set-up is part of every target: a virtual environment in .venv, installed from pyproject.toml
# (re-installed only when pyproject.toml or constraints.txt change).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= demo

.PHONY: demo test test-fast test-default test-long lint format test-monailabel test-browser chromium benchmark clean-demo

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

## The main job on the embedded demo world: generate it, prepare it with every data_prep step, train each
## bundle briefly with `python -m monai.bundle run`, evaluate, infer, and write $(DEMO)/report/index.html.
demo: $(VENV)/.installed
	$(PY) -m showcase --out $(DEMO)

JSON_CONFIGS = $(wildcard bundles/*/configs/*.json)

## Everything CI runs (.ci/run): lint, the default suite, the long suite, then the opt-in suites (MONAI Label server,
## report in Chromium).
test: lint test-default test-long test-monailabel test-browser

## The inner loop: the default suite without the tests marked slow (a few minutes).
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m 'not slow and not long and not monailabel and not browser'

## The default suite alone (under 10 minutes on 2 cores).
test-default: $(VENV)/.installed
	$(PY) -m pytest -q

## The tests marked long (bundle trainings and whole pipelines, a minute or more each).
test-long: $(VENV)/.installed
	$(PY) -m pytest -q -m long

## ruff (lint and format, 120 columns) and the bundle configs formatted the Model Zoo's way (pre-commit's
## pretty-format-json: 4 spaces, keys in their order).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pretty-format-json --no-sort-keys --indent 4 $(JSON_CONFIGS)

## Rewrite the code and the JSON configs in the project's format.
format: $(VENV)/.installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .
	-$(VENV)/bin/pretty-format-json --autofix --no-sort-keys --indent 4 $(JSON_CONFIGS)

## A real MONAI Label server (own venv, made by integration/monailabel/setup.sh) serving the bundles.
test-monailabel: $(VENV)/.installed
	bash integration/monailabel/setup.sh
	$(PY) -m pytest -q -m monailabel

## The main job's report rendered in headless Chromium.
test-browser: $(VENV)/.installed chromium
	$(PY) -m pytest -q -m browser

## Debian's chromium for the browser test (needs root or sudo; skipped when already there).
chromium:
	@command -v chromium >/dev/null 2>&1 || { $$(command -v sudo >/dev/null 2>&1 && echo sudo) apt-get update -q && DEBIAN_FRONTEND=noninteractive $$(command -v sudo >/dev/null 2>&1 && echo sudo) apt-get install -y -q chromium; }

benchmark: $(VENV)/.installed
	$(PY) benchmarks/bench_lidc_prepare.py

clean-demo:
	rm -rf $(DEMO)
