# The two commands a fresh machine needs (Python 3.11, CPU):
#   make demo   -> set up .venv and train the embedded demo (runs/demo/)
#   make test   -> set up .venv and run the test suite
VENV ?= .venv
PYTHON ?= python3
# CPU machines: the CPU wheel. On a CUDA machine: make TORCH='torch==2.13.0 --index-url <your CUDA wheel index>'
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: demo test lint format setup clean-demo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/neuromf train runspecs/demo.yaml --resume auto

test: $(VENV)/.installed
	$(PY) -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean-demo:
	rm -rf runs/demo
