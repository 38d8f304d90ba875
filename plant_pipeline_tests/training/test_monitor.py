"""What a training run prints: each progress line once, the evaluation before training labelled as such.

cli.run() with a stand-in for train() that drives the real progress callback as the Trainer does (an evaluation
before training, then logging steps), and a stand-in Pipes session: no model is trained.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from types import SimpleNamespace

import pytest
import torch

from plant_pipeline.ml.training import cli
from plant_pipeline.ml.training.monitor import MemoryMonitor, make_progress_callback
from plant_pipeline.ml.training.results import TrainResult

MAX_STEPS = 40
run_module = importlib.import_module("plant_pipeline.ml.training.run")  # the module; the package's `run` is not


def _result() -> TrainResult:
    return TrainResult(model_path="m", steps=MAX_STEPS, max_steps=MAX_STEPS, final_train_loss=1.0,
                       final_validation_loss=1.0, initial_validation_loss=6.0, samples_per_second=1.0,
                       peak_memory_mb=1.0, peak_cuda_memory_mb=None, peak_mps_memory_mb=None, device="cpu",
                       dtype="float32", trainable_params=1, total_params=1, log_history=[], resumed_from_step=None,
                       seconds=1.0, loss_curve_path=None)


def _fake_train(config, *, on_log, **kwargs) -> TrainResult:
    """The Trainer's calls into the progress callback: evaluate() before train() (the state has no plan yet), then
    a log every 20 steps."""
    from transformers import TrainerState

    callback = make_progress_callback(on_log, MemoryMonitor(torch.device("cpu")), global_batch=8)
    args = SimpleNamespace(max_steps=MAX_STEPS)
    state = TrainerState()
    callback.on_log(args, state, None, logs={"eval_loss": 6.0})
    state.max_steps = MAX_STEPS
    callback.on_train_begin(args, state, None)
    for step in (20, 40):
        state.global_step = step
        callback.on_log(args, state, None, logs={"loss": 2.0})
    return _result()


class _Pipes:
    def __init__(self):
        self.lines: list[str] = []
        self.log = SimpleNamespace(info=self.lines.append)

    def report_asset_materialization(self, metadata):
        self.metadata = metadata


@pytest.fixture
def stderr_lines(monkeypatch):
    """What the cli's stderr handler (logging.basicConfig in main) would print."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()  # run() turns them off for the process; restored after
    handler = Collect(level=logging.INFO)
    root = logging.getLogger()
    monkeypatch.setattr(root, "level", logging.INFO)
    root.addHandler(handler)
    monkeypatch.setattr(run_module, "train", _fake_train)
    yield lines
    root.removeHandler(handler)
    if bars:
        transformers_logging.enable_progress_bar()


def _run_file(tmp_path) -> cli.RunFile:
    return cli.RunFile(shards_dir=str(tmp_path), checkpoints_dir=str(tmp_path), output_dir=str(tmp_path))


def test_under_pipes_each_progress_line_reaches_dagster_once_and_not_stderr(tmp_path, monkeypatch, stderr_lines):
    pipes = _Pipes()
    monkeypatch.setattr(cli, "_open_pipes", lambda rank: contextlib.nullcontext(pipes))
    cli.run(_run_file(tmp_path))
    assert pipes.lines[0].startswith("step 0/40 (before training), eval_loss 6.0000, rss_mb "), pipes.lines
    assert [line.split(",")[0] for line in pipes.lines] == ["step 0/40 (before training)", "step 20/40", "step 40/40"]
    assert not [line for line in stderr_lines if line.startswith("step ")], stderr_lines
    assert pipes.metadata["steps"] == MAX_STEPS
    # The filter ends with the session: a later run without Pipes logs again.
    assert logging.getLogger("plant_pipeline.ml.training.monitor").level == logging.NOTSET


def test_without_pipes_each_progress_line_goes_to_stderr_once(tmp_path, stderr_lines):
    cli.run(_run_file(tmp_path))
    steps = [line.split(" ")[0:2] for line in stderr_lines if line.startswith("step ")]
    assert steps == [["step", "0/40"], ["step", "20/40"], ["step", "40/40"]], stderr_lines
    assert "step 0/0" not in "\n".join(stderr_lines)
    assert stderr_lines[[line.startswith("step ") for line in stderr_lines].index(True)].startswith(
        "step 0/40 (before training) eval_loss=6")


def test_the_child_draws_no_progress_bars(tmp_path, stderr_lines):
    from transformers.utils import logging as transformers_logging

    transformers_logging.enable_progress_bar()
    cli.run(_run_file(tmp_path))
    assert not transformers_logging.is_progress_bar_enabled()
