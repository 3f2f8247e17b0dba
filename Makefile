# Two commands do all the set-up: `make demo` and `make test`. Both create .venv if missing and (re)install the
# package only when pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The report's browser test runs in headless Chromium: Debian's package, installed when missing (root, or sudo).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_OUT ?= demo_run

.PHONY: demo test test-fast lint install bench clean-demo browser datumaro

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mlcseg run --images samples --out $(DEMO_OUT) --backbone random-vit-s8 num_classes=3 num_categories=2 min_region_area=64
	@echo "report: $(DEMO_OUT)/report.html"

browser:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium; }

# Datumaro (CVAT's dataset converter) pins older Pillow and pyarrow than the package: the export tests run it from
# a venv of its own
DATUMARO_STAMP := .venv-datumaro/.installed-stamp
datumaro: $(DATUMARO_STAMP)
$(DATUMARO_STAMP):
	test -x .venv-datumaro/bin/python || $(PYTHON) -m venv .venv-datumaro
	.venv-datumaro/bin/python -m pip install -q 'datumaro==1.13.12'
	touch $(DATUMARO_STAMP)

test: $(STAMP) browser $(DATUMARO_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -n 2 --dist loadscope --durations=25  # two workers; the 25 slowest tests and the wall time

# Between edits: every test but the tiers marked slow, cluster, s3 and browser (pyproject.toml); `make test` runs all.
test-fast: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n 2 --dist loadscope -m "not slow and not cluster and not s3 and not browser" --durations=10

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) bench/extract_throughput.py

clean-demo:
	rm -rf $(DEMO_OUT)
