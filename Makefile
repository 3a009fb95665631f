# Every target is idempotent and installs what it needs on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.reslab-installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup data browser train test lint bench clean docs

setup: $(STAMP) data browser

# pip finds torch 2.14.1 / torchvision 0.29.1 on this machine's disk; uv or poetry would not.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet -e '.[dev]'
	touch $(STAMP)

# Debian's package holds the four original IDX files; without apt or root, reslab looks in
# --data-dir and then downloads through torchvision.
data:
	@if [ -f $(FMNIST) ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else echo "note: dataset-fashion-mnist not installed (no apt or not root); reslab will use --data-dir or download"; fi

# Debian's chromium and its WebDriver, for the browser test of `reslab serve`
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq chromium chromium-driver; \
	else echo "note: chromium not installed (no apt or not root); the browser test of reslab serve skips"; fi

train: setup
	$(VENV)/bin/reslab train

test: setup
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

# the reference site: results page regenerated first, then a strict build (broken links fail)
docs: $(STAMP)
	$(PY) benchmarks/report.py
	$(VENV)/bin/mkdocs build --strict -d build/site

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
