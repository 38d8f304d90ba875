"""The Makefile's dev and demo targets, read with ``make -n`` (nothing runs) or by running one cheap rule."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from dagster import validate_run_config

from plant_pipeline.definitions import defs

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def _make(*args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr
    return re.sub(r"\\\n\s*", " ", done.stdout)  # continuation lines joined


def _dagster_dev_line(text: str) -> str:
    [line] = [line for line in text.splitlines() if "dagster dev" in line]
    return line


def test_dev_ignores_a_host_and_port_the_shell_exports():
    # Shells export HOST as the machine's name (and some platforms PORT): the UI must not follow them.
    line = _dagster_dev_line(_make("-n", "dev", env={"HOST": "example.org", "PORT": "8080"}))
    assert "-h 127.0.0.1 -p 3000" in line, line
    assert "example.org" not in line and "8080" not in line


def test_dev_binds_where_the_project_variables_say():
    line = _dagster_dev_line(_make("-n", "dev", "UI_HOST=0.0.0.0", "UI_PORT=3001"))
    assert "-h 0.0.0.0 -p 3001" in line, line


def test_demo_reads_the_synthetic_release_from_data_dir(tmp_path):
    data_dir = tmp_path / "elsewhere"
    plan = _make("-n", "demo", f"DATA_DIR={data_dir}")
    overlay = data_dir / "demo_run.yaml"
    assert f"-c config/demo.yaml -c {overlay}" in plan, plan
    assert f"demo_release {data_dir}/demo_release" in plan, plan

    # The rule that writes the overlay runs without the venv; merged over config/demo.yaml it moves only the path.
    _make(str(overlay), f"DATA_DIR={data_dir}")
    from dagster._cli.workspace.cli_target import get_run_config_from_file_list

    base = get_run_config_from_file_list([str(REPO / "config" / "demo.yaml")])
    merged = get_run_config_from_file_list([str(REPO / "config" / "demo.yaml"), str(overlay)])
    assert merged["ops"]["oxford_flowers"]["config"]["local_dir"] == str(data_dir / "demo_release")
    assert merged["ops"]["oxford_flowers"]["config"]["md5"] == {}
    assert merged["ops"]["trained_model"] == base["ops"]["trained_model"]
    assert validate_run_config(defs.resolve_implicit_global_asset_job_def(), merged)
