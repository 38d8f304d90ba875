"""A killed run gives back the "gpu" pool slot, and the training child dies with the process that launched it."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from dagster import DagsterInstance, DagsterRun, DagsterRunStatus, build_sensor_context

from plant_pipeline.defs.assets.training import die_with_parent
from plant_pipeline.defs.run_health import (
    REAP_INTERVAL_ENV,
    WORKER_TAG,
    dead_run_reaper,
    process_start,
    worker_gone,
    worker_tag,
)

REPO = Path(__file__).resolve().parents[2]
DAGSTER = str(Path(sys.executable).with_name("dagster"))
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")

# A code location with one asset in pool "gpu" and the executor every job of the real one runs on (see
# test_definitions.py); HOLD=1 keeps the slot.
LOCATION = """
import os, time
from dagster import Definitions, asset
from plant_pipeline.defs.run_health import health_checked_executor

@asset(pool="gpu")
def gpu_holder():
    if os.environ.get("HOLD"):
        time.sleep(120)
    return 1

defs = Definitions(assets=[gpu_holder], executor=health_checked_executor)
"""


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if process_start(pid) is None:
            return True
        time.sleep(0.1)
    return False


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_worker_gone_tells_live_dead_and_reused_pids():
    assert not worker_gone(worker_tag())
    assert worker_gone(json.dumps({"host": os.uname().nodename, "pid": _dead_pid(), "start": ""}))
    reused = json.loads(worker_tag())
    if reused["start"]:  # /proc: the same pid started at another time is another process
        reused["start"] = reused["start"] + "0"
        assert worker_gone(json.dumps(reused))
    elsewhere = json.dumps({"host": "another-machine", "pid": _dead_pid(), "start": ""})
    assert not worker_gone(elsewhere), "a worker on another host cannot be checked from here"


@pytest.fixture
def instance(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "config" / "dagster.yaml", home)
    with DagsterInstance.from_config(str(home)) as instance:
        yield instance


def _started_run(instance: DagsterInstance, worker: str) -> str:
    run_id = str(uuid.uuid4())
    instance.add_run(DagsterRun(job_name="__ASSET_JOB", run_id=run_id, status=DagsterRunStatus.STARTED,
                                tags={WORKER_TAG: worker}))
    return run_id


def test_the_reaper_fails_runs_whose_worker_died_and_frees_their_slot(instance):
    storage = instance.event_log_storage
    storage.set_concurrency_slots("gpu", 1)
    dead = _started_run(instance, json.dumps({"host": os.uname().nodename, "pid": _dead_pid(), "start": ""}))
    alive = _started_run(instance, worker_tag())
    assert storage.claim_concurrency_slot("gpu", dead, "trained_model").is_claimed
    assert not storage.claim_concurrency_slot("gpu", alive, "trained_model").is_claimed, "the dead run holds it"

    skip = dead_run_reaper(build_sensor_context(instance=instance))
    assert dead in skip.skip_message
    assert instance.get_run_by_id(dead).status == DagsterRunStatus.FAILURE
    assert instance.get_run_by_id(alive).status == DagsterRunStatus.STARTED
    [failure] = [e for e in instance.all_logs(dead) if e.dagster_event and e.dagster_event.is_run_failure]
    assert "worker" in failure.message and "is gone" in failure.message
    assert storage.get_concurrency_info("gpu").active_slot_count == 0
    assert storage.claim_concurrency_slot("gpu", alive, "trained_model").is_claimed
    assert "no run" in dead_run_reaper(build_sensor_context(instance=instance)).skip_message


def test_a_run_killed_while_holding_the_gpu_slot_does_not_block_the_one_waiting_for_it(tmp_path, instance):
    """dagster asset materialize SIGKILLed mid-step, no daemon: the run waiting for the slot reaps it and proceeds."""
    location = tmp_path / "location.py"
    location.write_text(LOCATION)
    in_process = tmp_path / "in_process.yaml"
    in_process.write_text("execution:\n  config:\n    in_process: {}\n")
    env = {**os.environ, "DAGSTER_HOME": str(instance.root_directory), REAP_INTERVAL_ENV: "0.5",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [DAGSTER, "asset", "materialize", "-f", str(location), "--select", "gpu_holder", "-c", str(in_process)]
    gpu = instance.event_log_storage.get_concurrency_info
    processes = []
    try:
        holder = subprocess.Popen(command, env={**env, "HOLD": "1"}, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        processes.append(holder)
        _wait_for(lambda: gpu("gpu").active_slot_count == 1, holder, "the first run never took the gpu slot")
        waiter = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True)
        processes.append(waiter)
        _wait_for(lambda: gpu("gpu").pending_step_count == 1, waiter, "the second run never waited for the slot")

        os.killpg(holder.pid, signal.SIGKILL)  # the CLI and anything it started, as the OOM killer or a restart would
        holder.wait(timeout=10)
        output, _ = waiter.communicate(timeout=90)
        assert waiter.returncode == 0, output[-3000:]
    finally:
        for process in processes:
            _kill(process.pid)
            process.wait()
    runs = {run.run_id: run for run in instance.get_runs()}
    [killed] = [run for run in runs.values() if run.run_id != _run_id(output)]
    assert killed.status == DagsterRunStatus.FAILURE
    assert runs[_run_id(output)].status == DagsterRunStatus.SUCCESS
    assert "is gone" in output, "the waiting run's log says whom it failed"
    assert gpu("gpu").active_slot_count == 0


def _wait_for(condition, process: subprocess.Popen, message: str, within_s: float = 90) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert process.poll() is None and time.monotonic() < deadline, message
        time.sleep(0.2)


def _run_id(cli_output: str) -> str:
    """The run id the CLI prints on each event line (``... - __ASSET_JOB - <run id> - ...``)."""
    [run_id] = set(re.findall(r"__ASSET_JOB - ([0-9a-f-]{36}) -", cli_output))
    return run_id


# One write(2) per line: two ranks share the pipe, and print() may write its pieces one by one.
WORKER = "import os, time; os.write(1, f'worker {os.getpid()}\\n'.encode()); time.sleep(120)"


def _launch(command: list[str], ranks: int) -> tuple[int, list[int]]:
    """A forked copy of this process starts ``command`` as trained_model does; returns its pid and the workers'."""
    read, write = os.pipe()
    launcher = os.fork()  # cheaper than a fresh interpreter importing dagster
    if launcher == 0:
        try:
            subprocess.Popen(command, preexec_fn=die_with_parent(), stdout=write, stderr=subprocess.DEVNULL)
            time.sleep(120)
        finally:
            os._exit(1)
    os.close(write)
    pids, seen, deadline = [], b"", time.monotonic() + 60
    try:
        # torchrun writes a banner of its own to the same pipe; never wait past the deadline.
        while len(pids) < ranks and time.monotonic() < deadline:
            if select.select([read], [], [], 0.2)[0]:
                chunk = os.read(read, 4096)
                if not chunk:
                    break
                seen += chunk
                pids = [int(pid) for pid in re.findall(rb"worker (\d+)\n", seen)]
    finally:
        os.close(read)
    if len(pids) < ranks:
        _kill(launcher)
        os.waitpid(launcher, 0)
        pytest.fail(f"{len(pids)} of {ranks} training processes started; they wrote {seen!r}")
    return launcher, pids


@linux_only
@pytest.mark.parametrize("ranks", [1, 2], ids=["one process", "torchrun"])
def test_the_training_child_dies_when_its_launcher_is_killed(tmp_path, ranks):
    if ranks == 1:
        command = [sys.executable, "-c", WORKER]
    else:
        script = tmp_path / "worker.py"
        script.write_text(WORKER)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                   str(script)]
    launcher, workers = _launch(command, ranks)
    try:
        os.kill(launcher, signal.SIGKILL)
        os.waitpid(launcher, 0)
        # torchrun gets SIGTERM and stops its ranks first; a lone child gets SIGTERM and exits.
        assert all(_gone(pid, within_s=30) for pid in workers), "a training process outlived its launcher"
    finally:
        _kill(launcher)
        for pid in workers:
            _kill(pid)
