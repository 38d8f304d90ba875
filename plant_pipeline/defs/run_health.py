"""Runs whose worker process died unannounced fail, and give back the pool slots they held.

A run killed with SIGKILL (OOM killer, closed terminal, container restart) cannot report its end, and Dagster's
default run launcher cannot check its worker, so the run stays STARTED and keeps the only slot of pool "gpu":
every later training waits "blocked by limit for pool gpu" for ever. Every run of this code location records its
worker (host, pid, process start) in the run tag ``plant_pipeline/run_worker``; ``reap_dead_runs`` fails the
STARTED runs whose worker on this host is gone and frees their slots. Every run does it while it runs (the
executor below: at its start, then every ``PLANT_PIPELINE_REAP_INTERVAL_S`` seconds, so a plain
``dagster asset materialize`` waiting for the slot heals without a daemon), ``dagster dev``'s daemon does it every
30 s (the ``dead_run_reaper`` sensor), and a person can: ``python -m plant_pipeline.defs.run_health``.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from dagster import (
    DagsterInstance,
    DagsterRunStatus,
    DefaultSensorStatus,
    Definitions,
    Executor,
    ExecutorDefinition,
    RunsFilter,
    SensorEvaluationContext,
    SkipReason,
    definitions,
    multi_or_in_process_executor,
    sensor,
)

WORKER_TAG = "plant_pipeline/run_worker"
REAPER_INTERVAL_SECONDS = 30
REAP_INTERVAL_ENV = "PLANT_PIPELINE_REAP_INTERVAL_S"
# CANCELING too: cancelling a run whose worker is dead never completes.
_WATCHED = [DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING]
_PROC = Path("/proc")


def process_start(pid: int) -> str | None:
    """An id of when process ``pid`` started (boot id and start tick), so a reused pid is told apart.

    None when there is no such process (or only its zombie); "" where the system does not say (no /proc: macOS),
    in which case the pid alone is compared.
    """
    if not (_PROC / "self" / "stat").exists():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
        boot = (_PROC / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
    except FileNotFoundError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    if fields[0] in ("Z", "X"):
        return None
    return f"{boot}:{fields[19]}"  # field 22 of proc(5), starttime


def worker_tag(pid: int | None = None) -> str:
    """The tag value naming this process (or ``pid``) as a run's worker."""
    pid = os.getpid() if pid is None else pid
    return json.dumps({"host": socket.gethostname(), "pid": pid, "start": process_start(pid) or ""})


def worker_gone(tag: str) -> bool:
    """True when the worker the tag names ran on this host and is no longer running. Other hosts: False."""
    try:
        info = json.loads(tag)
        host, pid, start = info["host"], int(info["pid"]), info.get("start", "")
    except (ValueError, KeyError, TypeError):
        return False
    if host != socket.gethostname():
        return False
    now = process_start(pid)
    return now is None or bool(start and now and now != start)


def reap_dead_runs(instance: DagsterInstance, log: Callable[[str], None] | None = None) -> list[str]:
    """Fail the runs of this host whose worker is gone and free their pool slots; returns their run ids."""
    reaped = []
    for run in instance.get_runs(filters=RunsFilter(statuses=_WATCHED)):
        tag = run.tags.get(WORKER_TAG)
        if tag is None or not worker_gone(tag):
            continue
        current = instance.get_run_by_id(run.run_id)
        if current is None or current.status not in _WATCHED:
            continue  # it ended while we looked
        info = json.loads(tag)
        message = (f"run {run.run_id}'s worker (pid {info['pid']} on {info['host']}) is gone: it was killed without "
                   "reporting (SIGKILL, OOM killer, closed terminal, restart). Marked failed and its pool slots freed "
                   "by plant_pipeline's dead-run reaper; materialise its assets again to redo the work.")
        instance.report_run_failed(current, message)
        if instance.event_log_storage.supports_global_concurrency_limits:
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        if log is not None:
            log(message)
        reaped.append(run.run_id)
    return reaped


def reap_interval_s() -> float:
    value = os.environ.get(REAP_INTERVAL_ENV, str(REAPER_INTERVAL_SECONDS))
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{REAP_INTERVAL_ENV} must be a number of seconds; got {value!r}") from None


def _reap(instance: DagsterInstance, log) -> None:
    try:
        reap_dead_runs(instance, log=log)
    except Exception as error:  # housekeeping must never fail the run that does it
        log(f"dead-run reaper: {error!r}")


def _reap_until(stop: threading.Event, instance: DagsterInstance, interval_s: float, log) -> None:
    while not stop.wait(interval_s):
        _reap(instance, log)


class _WorkerRecordingExecutor(Executor):
    """Runs the default executor with the run tagged with its worker, reaping dead runs while it runs.

    Reaping beside the run, not only at its start, frees a slot this run is already waiting for.
    """

    def __init__(self, inner: Executor):
        self._inner = inner

    @property
    def retries(self):
        return self._inner.retries

    @property
    def step_dependency_config(self):
        return self._inner.step_dependency_config

    def execute(self, plan_context, execution_plan) -> Iterator:
        instance = plan_context.instance
        instance.add_run_tags(plan_context.run_id, {WORKER_TAG: worker_tag()})
        _reap(instance, plan_context.log.warning)  # before the first claim, so it does not report a stale block
        stop = threading.Event()
        reaper = threading.Thread(target=_reap_until, name="dead-run-reaper", daemon=True,
                                  args=(stop, instance, reap_interval_s(), plan_context.log.warning))
        reaper.start()
        try:
            yield from self._inner.execute(plan_context, execution_plan)
        finally:
            stop.set()


health_checked_executor = ExecutorDefinition(
    name="multi_or_in_process_executor",  # the default's name and config: run configs stay as they were
    config_schema=multi_or_in_process_executor.config_schema,
    requirements=multi_or_in_process_executor.get_requirements,
    executor_creation_fn=lambda init_context: _WorkerRecordingExecutor(
        multi_or_in_process_executor.executor_creation_fn(init_context)),
    description="Dagster's default executor (multiprocess, or in_process by config) that records the run's worker "
    "process in a run tag and, while the run runs, fails runs whose worker died, freeing their pool slots.",
)


@sensor(
    minimum_interval_seconds=REAPER_INTERVAL_SECONDS,
    default_status=DefaultSensorStatus.RUNNING,
    description="Housekeeping, launches nothing: fails STARTED runs whose worker process on this machine is gone "
    "(killed by SIGKILL, the OOM killer, a restart) and frees their pool slots, so a training run waiting for the "
    "'gpu' pool proceeds.",
)
def dead_run_reaper(context: SensorEvaluationContext) -> SkipReason:
    reaped = reap_dead_runs(context.instance, log=context.log.warning)
    if reaped:
        return SkipReason(f"failed {len(reaped)} run(s) whose worker is gone and freed their slots: "
                          f"{', '.join(reaped)}")
    return SkipReason("no run with a dead worker on this machine")


@definitions
def run_health() -> Definitions:
    # The executor becomes every job's default: each run of the code location records its worker.
    return Definitions(sensors=[dead_run_reaper], executor=health_checked_executor)


def main() -> None:
    with DagsterInstance.get() as instance:
        reaped = reap_dead_runs(instance, log=print)
    print(f"{len(reaped)} run(s) with a dead worker failed and their pool slots freed")


if __name__ == "__main__":
    main()
