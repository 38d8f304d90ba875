# Two commands set everything up on a fresh machine: `make demo` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_DIR ?= data
# The UI's address: names of the project's own, since shells export HOST (the machine's name) and some PORT.
UI_HOST ?= 127.0.0.1
UI_PORT ?= 3000
# make demo's run config: config/demo.yaml plus an overlay that points oxford_flowers at $(DATA_DIR)'s release.
DEMO_RELEASE := $(abspath $(DATA_DIR)/demo_release)
DEMO_OVERLAY := $(abspath $(DATA_DIR)/demo_run.yaml)
export DAGSTER_HOME ?= $(abspath $(DATA_DIR)/dagster_home)
export PLANT_PIPELINE_DATA_DIR ?= $(DATA_DIR)
# Real photos for the tests that need them (skipped where absent); .ci/run sets this too.
export PLANT_PIPELINE_SHARED_DATASETS ?= $(wildcard $(abspath ../shared/datasets))

# Every package, at the version and hash requirements.lock records (`make lock` writes it from pyproject.toml), so
# CI installs the same set every day. The lock pins torch's CPU build (2.13.0+cpu), which pip takes from its
# configured find-links; there is no other candidate with that hash, so no CUDA build is ever resolved.
LOCK := requirements.lock
LOCK_VENV := build/lock-venv
PIP_VERSION := 26.3

.PHONY: install lock demo test dev bench clean

install: $(STAMP)

# The lock's platform. Elsewhere (a Mac, another Python) the lock's versions, without their hashes, constrain an
# ordinary install of pyproject.toml, so pip picks the platform's own wheels (torch's included).
LOCK_PLATFORM := linux-x86_64-cp311
THIS_PLATFORM := $(shell $(PYTHON) -c 'import platform, sys; print(f"{sys.platform}-{platform.machine()}-cp{sys.version_info[0]}{sys.version_info[1]}")')
CONSTRAINTS := $(VENV)/lock-constraints.txt
# macOS has one torch build (CPU + MPS), without the +cpu tag; on Linux the tag stays, so no CUDA build is taken.
TORCH_ON_MAC := $(if $(filter darwin-%,$(THIS_PLATFORM)),-e 's/^torch==\(.*\)+cpu$$/torch==\1/')

$(STAMP): pyproject.toml $(LOCK)
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet pip==$(PIP_VERSION)
ifeq ($(THIS_PLATFORM),$(LOCK_PLATFORM))
	$(PY) -m pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps -e .
else
	@echo "requirements.lock is for $(LOCK_PLATFORM), this is $(THIS_PLATFORM): installing within the lock's versions"
	sed -e '/^ *#/d' -e '/^ *--hash/d' -e 's/ *\\$$//' -e '/^$$/d' $(TORCH_ON_MAC) $(LOCK) > $(CONSTRAINTS)
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e '.[test,dev]'
endif
	$(PY) -m pip check
	touch $(STAMP)

# After a change to pyproject.toml's dependencies. The lock is for CPython 3.11 on Linux x86_64 (CI's platform);
# the pip-compile in its header says how it was made.
lock:
	test -d $(LOCK_VENV) || $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet pip-tools
	$(LOCK_VENV)/bin/pip-compile --quiet --extra test --extra dev --generate-hashes --allow-unsafe --strip-extras \
		--no-emit-index-url --no-emit-find-links --output-file $(LOCK) pyproject.toml

$(DAGSTER_HOME)/dagster.yaml: config/dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp config/dagster.yaml $@

# JSON is YAML: json.dumps quotes any path; dagster merges the -c files in order, the later winning.
$(DEMO_OVERLAY): config/demo.yaml
	mkdir -p $(dir $@)
	$(PYTHON) -c 'import json, sys; print(json.dumps({"ops": {"oxford_flowers": {"config": {"local_dir": sys.argv[1]}}}}))' \
		'$(DEMO_RELEASE)' > $@.tmp && mv $@.tmp $@

# The whole asset graph on synthetic flowers and the tiny model, offline.
demo: $(STAMP) $(DAGSTER_HOME)/dagster.yaml $(DEMO_OVERLAY)
	$(PY) -m plant_pipeline.ml.data.demo_release $(DEMO_RELEASE) --train-per-class 20
	PLANT_PIPELINE_MODEL=tiny-random-llava $(VENV)/bin/dagster asset materialize \
		-m plant_pipeline.definitions --select '*' -c config/demo.yaml -c $(DEMO_OVERLAY)

test: $(STAMP)
	$(PY) -m pytest -q

# The UI on http://$(UI_HOST):$(UI_PORT). SIGINT semantics so Ctrl-C / kill -TERM stop every child process.
dev: $(STAMP) $(DAGSTER_HOME)/dagster.yaml
	env --default-signal=INT $(VENV)/bin/dagster dev -w workspace.yaml -h $(UI_HOST) -p $(UI_PORT)

# Each benchmark prints one table and a final JSON line; gpu_train.py needs a CUDA GPU, real_photos.py and
# preprocess.py the shared datasets. A failure is reported and the rest still run.
bench: $(STAMP)
	status=0; for script in bench/*.py; do echo "== $$script"; $(PY) $$script || { echo "$$script failed"; status=1; }; done; exit $$status

clean:
	rm -rf $(VENV) $(DATA_DIR)
