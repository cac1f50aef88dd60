# `make demo` and `make test` set themselves up: they create .venv/ with the pinned dependencies
# when it is missing (or when setup.cfg changed), then run.
PYTHON ?= $(shell command -v python3.11 || command -v python3.10 || command -v python3.9 || echo python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MNIST_DIR ?= $(abspath ../shared/datasets/mnist)
export MNIST_DIR

DATA_DIR ?= data/mnist
MODEL_DIR ?= models/cnn
EXPORT_DIR ?= exports/cnn
PREDICT_DIR ?= predictions/cnn

.PHONY: setup demo test lint format clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,plot]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) main.py --mode=prepare --data_dir=$(DATA_DIR)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) data models exports predictions *.egg-info
