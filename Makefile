# Two commands do all the set-up: `make demo` and `make test`. Both create .venv if missing and (re)install the
# package only when pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_OUT ?= demo_run

.PHONY: demo test lint install bench clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mlcseg run --images samples --out $(DEMO_OUT) --backbone random-vit-s8 num_classes=3 num_categories=2 min_region_area=64
	@echo "report: $(DEMO_OUT)/report.html"

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/extract_throughput.py

clean-demo:
	rm -rf $(DEMO_OUT)
