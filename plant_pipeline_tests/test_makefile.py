"""The Makefile's install, dev and demo targets, read with ``make -n`` (nothing runs) or by running one cheap rule,
and the lock that ``make install`` installs from."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dagster import config_from_files, validate_run_config
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from plant_pipeline.definitions import defs

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
# What `make install` installs: the runtime set and these extras (the `lock` rule names the same).
LOCKED_EXTRAS = ("test", "dev")


def _make(*args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr
    return re.sub(r"\\\n\s*", " ", done.stdout)  # continuation lines joined


def _dagster_dev_line(text: str) -> str:
    [line] = [line for line in text.splitlines() if "dg dev" in line]
    return line


@needs_make
def test_dev_ignores_a_host_and_port_the_shell_exports():
    # Shells export HOST as the machine's name (and some platforms PORT): the UI must not follow them.
    line = _dagster_dev_line(_make("-n", "dev", env={"HOST": "example.org", "PORT": "8080"}))
    assert "-h 127.0.0.1 -p 3000" in line, line
    assert "example.org" not in line and "8080" not in line


@needs_make
def test_dev_binds_where_the_project_variables_say():
    line = _dagster_dev_line(_make("-n", "dev", "UI_HOST=0.0.0.0", "UI_PORT=3001"))
    assert "-h 0.0.0.0 -p 3001" in line, line


@needs_make
def test_demo_reads_the_synthetic_release_from_data_dir(tmp_path):
    data_dir = tmp_path / "elsewhere"
    plan = _make("-n", "demo", f"DATA_DIR={data_dir}")
    overlay = data_dir / "demo_run.yaml"
    # dg launch, not `dagster asset materialize`, whose first line is a warning that dg supersedes it.
    launch = "dg launch --job full_pipeline -m plant_pipeline.definitions -c config/demo.yaml -c"
    assert f"{launch} {overlay}" in re.sub(" +", " ", plan), plan
    assert "asset materialize" not in plan
    assert f"demo_release {data_dir}/demo_release" in plan, plan

    # The rule that writes the overlay runs without the venv; merged over config/demo.yaml it moves only the path.
    _make(str(overlay), f"DATA_DIR={data_dir}")
    # config_from_files merges as `dagster ... -c a -c b` does (the later file winning).
    base = config_from_files([str(REPO / "config" / "demo.yaml")])
    merged = config_from_files([str(REPO / "config" / "demo.yaml"), str(overlay)])
    assert merged["ops"]["oxford_flowers"]["config"]["local_dir"] == str(data_dir / "demo_release")
    assert merged["ops"]["oxford_flowers"]["config"]["md5"] == {}
    assert merged["ops"]["trained_model"] == base["ops"]["trained_model"]
    assert validate_run_config(defs().resolve_implicit_global_asset_job_def(), merged)


def _locked() -> dict[str, Version]:
    """requirements.lock's pins: name -> version."""
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        match = re.match(r"([A-Za-z0-9._-]+)==(\S+)", line)
        if match:
            pins[canonicalize_name(match[1])] = Version(match[2])
    return pins


def test_the_lock_pins_every_dependency_within_pyproject_and_torch_on_cpu():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"]]
    wanted += [Requirement(r) for extra in LOCKED_EXTRAS for r in project["optional-dependencies"][extra]]
    pins = _locked()
    missing = [str(r) for r in wanted if canonicalize_name(r.name) not in pins]
    assert not missing, f"not in requirements.lock (run `make lock`): {missing}"
    outside = [f"{r} (locked {pins[canonicalize_name(r.name)]})" for r in wanted
               if not r.specifier.contains(pins[canonicalize_name(r.name)], prereleases=True)]
    assert not outside, f"requirements.lock disagrees with pyproject.toml (run `make lock`): {outside}"
    # The CPU wheel; a CUDA build would bring nvidia-* and triton with it.
    assert pins["torch"].local == "cpu"
    assert not [name for name in pins if name.startswith("nvidia-") or name == "triton"]
    # dg's CLI pins dagster to its own release: the whole family moves together.
    assert pins["dagster-dg-cli"] == pins["dagster"] == pins["dagster-webserver"] == pins["dagster-pipes"]


def test_every_locked_package_is_hashed():
    text = (REPO / "requirements.lock").read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 1)[1])
    unhashed = [entry.split()[0] for entry in entries if "==" in entry.split()[0] and "--hash=sha256:" not in entry]
    assert not unhashed
    assert "file://" not in text, "a local path in the lock installs nowhere else"


@needs_make
def test_install_takes_the_lock_and_nothing_else():
    plan = _make("-n", "-B", "install", "THIS_PLATFORM=linux-x86_64-cp311")
    assert "pip install --quiet --require-hashes --no-deps -r requirements.lock" in plan, plan
    assert "pip install --quiet --no-deps -e ." in plan, plan
    assert "pip check" in plan, plan


@needs_make
@pytest.mark.parametrize("platform, torch_pin", [("darwin-arm64-cp311", "torch==2.13.0"),
                                                 ("linux-x86_64-cp312", "torch==2.13.0+cpu")])
def test_elsewhere_install_stays_within_the_locks_versions(tmp_path, platform, torch_pin):
    # A Mac has one torch build, without the +cpu tag; on Linux the tag stays, so no CUDA build can be taken.
    venv = tmp_path / "venv"
    plan = _make("-n", "-B", "install", f"THIS_PLATFORM={platform}", f"VENV={venv}").splitlines()
    assert not any("--require-hashes" in line for line in plan), plan
    constraints = venv / "lock-constraints.txt"
    install = [line for line in plan if f"-c {constraints}" in line]
    assert install and "-e '.[test,dev]'" in install[0], plan
    write = next(line for line in plan if line.startswith("sed ") and str(constraints) in line)
    venv.mkdir()
    subprocess.run(["bash", "-c", write], cwd=REPO, check=True, timeout=30)
    lines = constraints.read_text().splitlines()
    assert torch_pin in lines, [line for line in lines if line.startswith("torch")]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+==\S+( *;.*)?", line) for line in lines), lines
    assert len(lines) == len(_locked())


@needs_make
def test_test_shows_why_tests_were_skipped():
    [line] = [line for line in _make("-n", "test").splitlines() if "pytest" in line]
    assert "-rs" in line.split(), line


def _fake_venv(tmp_path) -> Path:
    """A venv whose `dg` prints the environment make dev starts it with, instead of serving."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / ".installed").touch()
    dagster = venv / "bin" / "dg"
    dagster.write_text('#!/bin/sh\necho "model=$PLANT_PIPELINE_MODEL run_config=$PLANT_PIPELINE_RUN_CONFIG '
                       'bars_off=$HF_HUB_DISABLE_PROGRESS_BARS args=$*"\n')
    dagster.chmod(0o755)
    return venv


def _dev(tmp_path, *args: str, env: dict[str, str] | None = None) -> str:
    venv, data_dir = tmp_path / "venv", tmp_path / "data"
    environment = {"DAGSTER_HOME": str(data_dir / "dagster_home"), **(env or {})}
    for name in ("PLANT_PIPELINE_MODEL", "PLANT_PIPELINE_RUN_CONFIG", "MODEL"):
        environment.setdefault(name, "")
    out = _make("dev", f"VENV={venv}", f"DATA_DIR={data_dir}", "-o", str(venv / ".installed"), *args, env=environment)
    [line] = [line for line in out.splitlines() if line.startswith("model=")]
    return line


@needs_make
def test_dev_after_the_demo_serves_its_model_and_run_config_until_another_model_is_chosen(tmp_path):
    _fake_venv(tmp_path)
    data_dir = tmp_path / "data"
    assert _dev(tmp_path).startswith("model= run_config= "), "before a demo: the default model, no run config"

    # What make demo writes once its run succeeded (its recipe line, run here without the run).
    plan = _make("-n", "demo", f"DATA_DIR={data_dir}").splitlines()
    data_dir.mkdir(exist_ok=True)
    subprocess.run(["bash", "-c", next(line for line in plan if line.startswith("printf "))], cwd=REPO, check=True,
                   timeout=30)
    run_config = f"{REPO / 'config' / 'demo.yaml'}{os.pathsep}{data_dir / 'demo_run.yaml'}"
    after_demo = _dev(tmp_path)
    assert after_demo.startswith(f"model=tiny-random-llava run_config={run_config} bars_off=1 "), after_demo
    assert "args=dev -w workspace.yaml" in after_demo
    # A MODEL some shell exports is not a choice; MODEL= on the command line and PLANT_PIPELINE_MODEL are.
    assert _dev(tmp_path, env={"MODEL": "exported/elsewhere"}).startswith("model=tiny-random-llava run_config=/")
    assert _dev(tmp_path, "MODEL=llava-hf/llava-1.5-7b-hf").startswith("model=llava-hf/llava-1.5-7b-hf run_config= ")
    assert _dev(tmp_path, env={"PLANT_PIPELINE_MODEL": "/models/mine"}).startswith("model=/models/mine run_config= ")


@needs_make
def test_demo_ends_with_the_result_and_what_to_do_next(tmp_path):
    script = _make("-s", "--eval", 'show-demo-result: ; @printf "%s" "$$DEMO_RESULT"', "show-demo-result")
    reports = tmp_path / "reports"
    summary = {"top1_accuracy": 0.9379, "top5_accuracy": 0.99, "macro_accuracy": 0.93, "num_test_images": 306,
               "num_classes_scored": 102}
    for run, top1 in (("older", 0.5), ("newer", 0.9379)):
        (reports / run).mkdir(parents=True)
        (reports / run / "summary.json").write_text(json.dumps({**summary, "top1_accuracy": top1}))
        time.sleep(0.01)  # distinct mtimes: the newest report is the demo's
    done = subprocess.run([sys.executable, "-c", script, str(reports), "http://127.0.0.1:3000"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "top-1 0.938, top-5 0.990, macro 0.930" in done.stdout and "306 test photos of 102 classes" in done.stdout
    assert str(reports / "newer" / "report.md") in done.stdout
    assert "make dev " in done.stdout and "plant-pipeline identify PHOTO" in done.stdout and "MODEL=" in done.stdout

    empty = subprocess.run([sys.executable, "-c", script, str(tmp_path / "none"), "x"], capture_output=True, text=True,
                           timeout=60)
    assert empty.returncode != 0 and "no evaluation report" in empty.stderr
