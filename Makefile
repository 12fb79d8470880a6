# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv when it is missing. torch==2.13.0 is installed in the same pip
# command as the rest (requirements.txt): installed alone, pip would pick a CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SERVE_STAMP := $(VENV)/.installed-serve

.PHONY: demo test test-fast bench clean-venv

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# llama.cpp's OpenAI-compatible server, for the server-engine tests: compiled from source (minutes,
# once per machine: pip keeps the built wheel in ~/.cache/pip). -c keeps every pin of requirements.txt.
$(SERVE_STAMP): $(STAMP) requirements-serve.txt
	$(PY) -m pip install --quiet -c requirements.txt -r requirements-serve.txt
	touch $(SERVE_STAMP)

demo: $(STAMP)
	$(PY) -m vrpo demo

test: $(SERVE_STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup --durations=15 -rs tests

test-fast: $(STAMP)
	$(PY) -m pytest -n 2 -m "not slow" -rs tests

bench: $(STAMP)
	$(PY) benchmarks/losses.py

clean-venv:
	rm -rf $(VENV)
