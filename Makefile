# Two commands set everything up on a fresh machine: `make demo` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_DIR ?= data
HOST ?= 127.0.0.1
PORT ?= 3000
export DAGSTER_HOME ?= $(abspath $(DATA_DIR)/dagster_home)
export PLANT_PIPELINE_DATA_DIR ?= $(DATA_DIR)
# Real photos for the tests that need them (skipped where absent); .ci/run sets this too.
export PLANT_PIPELINE_SHARED_DATASETS ?= $(wildcard $(abspath ../shared/datasets))

.PHONY: install demo test dev bench clean

install: $(STAMP)

# torch is installed first, pinned, so pip takes the CPU wheel instead of resolving a CUDA build.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

$(DAGSTER_HOME)/dagster.yaml: config/dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp config/dagster.yaml $@

# The whole asset graph on synthetic flowers and the tiny model, offline.
demo: $(STAMP) $(DAGSTER_HOME)/dagster.yaml
	$(PY) -m plant_pipeline.ml.demo_data $(DATA_DIR)/demo_release --train-per-class 20
	PLANT_PIPELINE_MODEL=tiny-random-llava $(VENV)/bin/dagster asset materialize \
		-m plant_pipeline.definitions --select '*' -c config/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q

# The UI on http://$(HOST):$(PORT). SIGINT semantics so Ctrl-C / kill -TERM stop every child process.
dev: $(STAMP) $(DAGSTER_HOME)/dagster.yaml
	env --default-signal=INT $(VENV)/bin/dagster dev -w workspace.yaml -h $(HOST) -p $(PORT)

# Each benchmark prints one table and a final JSON line; gpu_train.py needs a CUDA GPU, real_photos.py and
# preprocess.py the shared datasets. A failure is reported and the rest still run.
bench: $(STAMP)
	status=0; for script in bench/*.py; do echo "== $$script"; $(PY) $$script || { echo "$$script failed"; status=1; }; done; exit $$status

clean:
	rm -rf $(VENV) $(DATA_DIR)
