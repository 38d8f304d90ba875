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
DEMO_MODEL := tiny-random-llava
# After a demo, its model and run config (as environment variables) for `make dev`: the UI then runs offline.
DEMO_ENV := $(abspath $(DATA_DIR)/demo.env)
# `make dev MODEL=<hub id or folder>` chooses the model; from the command line only, since shells may export a MODEL.
UI_MODEL := $(if $(filter command line,$(origin MODEL)),$(MODEL))
# Runs print to Dagster's log and log files, where a tqdm bar is a line of noise per update.
QUIET := HF_HUB_DISABLE_PROGRESS_BARS=1
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

# What make demo ends with: the newest evaluation's summary.json (the base model's are under reports/base/).
define DEMO_RESULT
import json, pathlib, sys
reports, ui = pathlib.Path(sys.argv[1]), sys.argv[2]
found = sorted((p for p in reports.glob("*/summary.json")), key=lambda p: p.stat().st_mtime)
if not found:
    sys.exit(f"make demo: no evaluation report under {reports}; the run's log above says what failed")
summary = json.loads(found[-1].read_text())
shown = ", ".join(f"{name} {summary[key]:.3f}" for name, key in (("top-1", "top1_accuracy"), ("top-5", "top5_accuracy"),
                  ("macro", "macro_accuracy")) if summary.get(key) is not None)
print(f"""
make demo: done. The demo model on {summary['num_test_images']} test photos of {summary['num_classes_scored']} classes: \
accuracy {shown} (chance: {1 / summary['num_classes_scored']:.3f}).
Report: {found[-1].parent / 'report.md'}
Next:
  make dev                                   the UI on {ui}, with the demo's data and model (offline)
  .venv/bin/plant-pipeline identify PHOTO    which plant a photo shows, by the model in production
  make dev MODEL=llava-hf/llava-interleave-qwen-0.5b-hf   the UI on a real model (README: The real run)""")
endef
export DEMO_RESULT

# The whole asset graph on synthetic flowers and the tiny model, offline. dg launch runs the full_pipeline job in
# this process, as `dagster asset materialize` (which dg supersedes) would. On success the choice is recorded in
# $(DEMO_ENV) for `make dev`.
demo: $(STAMP) $(DAGSTER_HOME)/dagster.yaml $(DEMO_OVERLAY)
	$(PY) -m plant_pipeline.ml.data.demo_release $(DEMO_RELEASE) --train-per-class 20
	$(QUIET) PLANT_PIPELINE_MODEL=$(DEMO_MODEL) $(VENV)/bin/dg launch --job full_pipeline \
		-m plant_pipeline.definitions -c config/demo.yaml -c $(DEMO_OVERLAY)
	@printf "PLANT_PIPELINE_MODEL='%s'\nPLANT_PIPELINE_RUN_CONFIG='%s'\n" '$(DEMO_MODEL)' \
		'$(abspath config/demo.yaml):$(DEMO_OVERLAY)' > $(DEMO_ENV).tmp && mv $(DEMO_ENV).tmp $(DEMO_ENV)
	@$(PY) -c "$$DEMO_RESULT" '$(abspath $(DATA_DIR)/reports)' 'http://$(UI_HOST):$(UI_PORT)'

# -rs: each skipped test's reason (a missing GPU, make, the shared datasets).
test: $(STAMP)
	$(PY) -m pytest -q -rs

# The UI on http://$(UI_HOST):$(UI_PORT): dg dev, which serves the workspace as `dagster dev` (which it supersedes)
# does. SIGINT semantics so Ctrl-C / kill -TERM stop every child process.
# The model: MODEL=... on the command line, else PLANT_PIPELINE_MODEL from the environment, else after a demo the
# demo's model and run config ($(DEMO_ENV): every launch in the UI runs offline on them), else the default.
dev: $(STAMP) $(DAGSTER_HOME)/dagster.yaml
	@if [ -n '$(UI_MODEL)' ]; then export PLANT_PIPELINE_MODEL='$(UI_MODEL)'; \
	elif [ -z "$${PLANT_PIPELINE_MODEL:-}" ] && [ -f '$(DEMO_ENV)' ]; then set -a; . '$(DEMO_ENV)'; set +a; \
		echo "make dev: the demo's model and run config ($(DEMO_ENV)); make dev MODEL=<hub id or folder> for another"; \
	fi; \
	echo "make dev: model $${PLANT_PIPELINE_MODEL:-(the default)}, run config defaults $${PLANT_PIPELINE_RUN_CONFIG:-(none)}"; \
	exec env --default-signal=INT $(QUIET) $(VENV)/bin/dg dev -w workspace.yaml -h $(UI_HOST) -p $(UI_PORT)

# Each benchmark prints one table and a final JSON line; gpu_train.py needs a CUDA GPU, real_photos.py and
# preprocess.py the shared datasets. A failure is reported and the rest still run.
bench: $(STAMP)
	status=0; for script in bench/*.py; do echo "== $$script"; $(PY) $$script || { echo "$$script failed"; status=1; }; done; exit $$status

clean:
	rm -rf $(VENV) $(DATA_DIR)
