# `make run` and `make test` each set up a fresh machine themselves:
# a .venv in the repo root, the project and its dependencies, and the Fashion-MNIST data set.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST_DIR := /usr/share/datasets/fashion-mnist
# torch/torchvision are pinned first so that the resolver never pulls a different build.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# Two pytest-xdist workers, whole files each: most tests wait on real servers and processes, so two
# workers fit a 2-core machine (make test TEST_WORKERS=0 runs them in one process).
TEST_WORKERS ?= 2
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data browser test run lint bench clean

setup: $(STAMP) data

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.[dev,embedded]'
	touch $(STAMP)

# Fashion-MNIST ships in Debian (MIT licence). Elsewhere training.data falls back to torchvision's
# download and says what to do if that fails too.
data:
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  if command -v apt-get >/dev/null; then \
	    ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	      || echo "warning: could not install dataset-fashion-mnist with apt-get"; \
	  else echo "note: no apt-get; Fashion-MNIST will be downloaded by torchvision on first use"; fi; \
	fi
	@# docker-compose validates docker-compose.yml in tests/service (skipped with a reason without it);
	@# caddy validates the production profile's proxy configuration (service/deploy/Caddyfile).
	@if ! command -v docker-compose >/dev/null && command -v apt-get >/dev/null; then \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq docker-compose >/dev/null) \
	    || echo "warning: could not install docker-compose with apt-get"; \
	fi
	@# Unpacked into the venv rather than installed: the package would start a web server on :80.
	@if ! command -v caddy >/dev/null && [ ! -x $(VENV)/bin/caddy ] && command -v apt-get >/dev/null; then \
	  tmp=$$(mktemp -d) && (cd $$tmp && (apt-get download -qq caddy 2>/dev/null \
	    || ($(SUDO) apt-get update -qq && apt-get download -qq caddy)) && dpkg -x caddy_*.deb x \
	    && cp x/usr/bin/caddy $(CURDIR)/$(VENV)/bin/caddy) \
	    || echo "warning: could not fetch caddy with apt-get download"; rm -rf $$tmp; \
	fi

# The search page's tests drive Debian's Chromium through its chromedriver (Selenium, dev extra).
browser:
	@if ! { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; } && command -v apt-get >/dev/null; then \
	  ($(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    chromium chromium-driver >/dev/null) || echo "warning: could not install chromium with apt-get"; \
	fi

test: setup browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports  # layers index <- training <- service, no import cycles (pyproject.toml)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# First run: the committed demo encoder and a 10k-image Fashion-MNIST catalogue (service/demo.py),
# then serve. Both steps are skipped once done, so the next `make run` is up in seconds.
run: setup
	$(PY) -m service.demo
	$(PY) -m service

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: setup browser
	$(PY) bench/train_throughput.py
	$(PY) bench/index_bench.py --n 200000
	$(PY) bench/search_bench.py
	$(PY) bench/page_bench.py
	$(PY) bench/replica_visibility.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
