# `make demo` and `make test` set themselves up: they create .venv/ with the pinned dependencies
# when it is missing (or when setup.cfg changed), then run.
# .venv's Python: PYTHON=... if given, else python3.11/3.10/3.9/python3 if one is 3.9-3.11, else a
# Python 3.11 from uv; with none of these, one line saying how to get one (tools/find_python.sh).
PYTHON ?=
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The second environment: Keras 3 (TensorFlow 2.21), for the tests that carry models across.
VENV3 := .venv-keras3
STAMP3 := $(VENV3)/.installed
EXTRAS := test,plot,onnx,beam
# MNIST: --source_dir (SOURCE_DIR=...), else $MNIST_DIR (defaults to ../shared/datasets/mnist when
# that folder exists), else ~/.keras/datasets/mnist.npz, else a download.
ifneq ($(wildcard ../shared/datasets/mnist),)
MNIST_DIR ?= $(abspath ../shared/datasets/mnist)
endif
ifdef MNIST_DIR
export MNIST_DIR
endif
SOURCE_DIR ?=

DATA_DIR ?= data/mnist
MODEL ?= cnn
EPOCHS ?= 1
MODEL_DIR ?= models/$(MODEL)
EXPORT_DIR ?= exports/$(MODEL)
PREDICT_DIR ?= predictions/$(MODEL)
# pytest-xdist workers for `make test` (each file stays on one worker; 2 paid off on 2 cores).
TEST_WORKERS ?= 2
RUN = $(PY) main.py --model=$(MODEL) --data_dir=$(DATA_DIR) --model_dir=$(MODEL_DIR)

.PHONY: setup setup-keras3 demo test lint format clean

setup: $(STAMP)
setup-keras3: $(STAMP3)

# Expanded only when the recipe runs, and the search only when .venv has no Python yet. A venv
# made by uv has no pip: uv installs into it.
VENV_PYTHON = $(shell PYTHON='$(PYTHON)' sh tools/find_python.sh)
make_venv = $(if $(filter error:,$(firstword $(1))),$(error $(wordlist 2,999,$(1))),$(if \
	$(filter uv,$(1)),uv venv --python 3.11 $(VENV),$(1) -m venv $(VENV)))

$(STAMP): setup.cfg pyproject.toml
	$(if $(wildcard $(PY)),,$(call make_venv,$(VENV_PYTHON)))
	if $(PY) -m pip --version >/dev/null 2>&1; then \
		$(PY) -m pip install --quiet --upgrade pip && $(PY) -m pip install --quiet -e '.[$(EXTRAS)]'; \
	else \
		uv pip install --quiet --python $(PY) -e '.[$(EXTRAS)]'; \
	fi
	touch $(STAMP)

# Keras 3 beside, never inside, .venv: TensorFlow 2.15 pins keras<2.16. Same Python as .venv.
$(STAMP3): tools/keras3-requirements.txt $(STAMP)
	$(if $(wildcard $(VENV3)/bin/python),,"$$($(PY) -c 'import sys; print(sys._base_executable)')" -m venv $(VENV3))
	if $(VENV3)/bin/python -m pip --version >/dev/null 2>&1; then \
		$(VENV3)/bin/python -m pip install --quiet -r tools/keras3-requirements.txt; \
	else \
		uv pip install --quiet --python $(VENV3)/bin/python -r tools/keras3-requirements.txt; \
	fi
	touch $(STAMP3)

# The main job: prepare MNIST, train one epoch, evaluate on test, export, predict with plots.
demo: $(STAMP)
	$(PY) main.py --mode=prepare --data_dir=$(DATA_DIR) $(if $(SOURCE_DIR),--source_dir=$(SOURCE_DIR))
	$(RUN) --mode=train --epochs=$(EPOCHS)
	$(RUN) --mode=evaluate --eval_split=test
	$(RUN) --mode=export --export_dir=$(EXPORT_DIR) --keras_output=$(EXPORT_DIR)/$(MODEL).keras
	$(RUN) --mode=predict --output_dir=$(PREDICT_DIR) --plot

test: $(STAMP) $(STAMP3)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) $(VENV3) data models exports predictions *.egg-info
