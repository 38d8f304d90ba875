"""Command-line entry point for ``train()``: one JSON run file in, the TrainResult JSON out (rank 0, atomically).

Runs unchanged as a plain process, under ``torchrun`` / ``python -m torch.distributed.run`` and under
``accelerate launch`` (DDP, FSDP, DeepSpeed: see config/accelerate/ and docs/scaling.md)::

    python -m plant_pipeline.ml.training.cli --config run.json --result result.json [--set train.max_steps=20]
    torchrun --standalone --nproc_per_node=2 -m plant_pipeline.ml.training.cli --config run.json --result result.json
    accelerate launch --config_file config/accelerate/ddp.yaml -m plant_pipeline.ml.training.cli --config run.json ...

The run file holds ``{"train": {TrainConfig fields}, "model": {ModelSpec fields}, "shards_dir": ...,
"checkpoints_dir": ..., "output_dir": ...}`` (``train`` and ``model`` are kept apart: both have a ``dtype``).
When a Dagster Pipes session launched the process (``DAGSTER_PIPES_CONTEXT`` is set), rank 0 sends its
progress lines and the final metadata back through ``dagster_pipes``; the core never imports dagster itself.
Exit codes: 0 done, 2 a setting or input that cannot work (the message says what to change), 1 anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from plant_pipeline.ml.errors import UsageError
from plant_pipeline.ml.files import atomic_write_json
from plant_pipeline.ml.training.monitor import logger as progress_logger
from plant_pipeline.ml.training.monitor import step_label
from plant_pipeline.ml.training.results import TrainResult
from plant_pipeline.ml.training.run_file import ENTRY_MODULE, RunFile, RunFileError  # noqa: F401 (re-exported)

logger = logging.getLogger("plant_pipeline.ml.training.cli")

PIPES_CONTEXT_ENV = "DAGSTER_PIPES_CONTEXT"  # the variable dagster_pipes itself checks
RECORD_KEYS_ENV = "PLANT_PIPELINE_RECORD_KEYS"  # same as --record-keys, for launchers that only pass env vars

# Bad settings, damaged shards or checkpoints are inputs to change, rebuild or move away, not bugs: the message
# says which and how.
USAGE_ERRORS = (UsageError, FileNotFoundError)


# ---- what goes back to Dagster --------------------------------------------------------------------

def format_progress(record: dict) -> str:
    """One log line for a progress record from train()'s on_log."""
    parts = [step_label(record.get("step", 0), record.get("max_steps", 0))]
    for key, fmt in (("loss", "{:.4f}"), ("eval_loss", "{:.4f}"), ("samples_per_second", "{:.1f}"),
                     ("eta_seconds", "{:.0f}"), ("rss_mb", "{:.0f}")):
        if record.get(key) is not None:
            parts.append(f"{key} {fmt.format(record[key])}")
    return ", ".join(parts)


def result_metadata(result: TrainResult, checkpoints_dir: str | Path) -> dict[str, Any]:
    """The trained_model asset's metadata in dagster_pipes' wire form (paths typed, None left out).

    The loss-curve image is added by the asset from ``loss_curve_path`` (it has the Markdown helpers).
    """
    metadata = {
        "model_path": {"raw_value": str(result.model_path), "type": "path"},
        "steps": result.steps,
        "final_train_loss": result.final_train_loss,
        "final_validation_loss": result.final_validation_loss,
        "initial_validation_loss": result.initial_validation_loss,
        "samples_per_second": round(result.samples_per_second, 2),
        "peak_memory_mb": round(result.peak_memory_mb, 1),
        "peak_cuda_memory_mb": result.peak_cuda_memory_mb,
        "peak_mps_memory_mb": result.peak_mps_memory_mb,
        "device": result.device,
        "dtype": result.dtype,
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "resumed_from_step": result.resumed_from_step,
        "stopped_early": result.stopped_early,
        "stop_reason": result.stop_reason,
        "best_step": result.best_step,
        "best_eval_loss": result.best_eval_loss,
        "checkpoints_dir": {"raw_value": str(checkpoints_dir), "type": "path"},
        "seconds": round(result.seconds, 1),
    }
    return {k: v for k, v in metadata.items() if v is not None}


def _open_pipes(rank: int):
    """dagster_pipes' context on rank 0 of a Pipes-launched run; otherwise nothing (and no import)."""
    if rank != 0 or PIPES_CONTEXT_ENV not in os.environ:
        return contextlib.nullcontext(None)
    from dagster_pipes import (
        open_dagster_pipes,  # a tiny separate package; dagster itself is not imported
    )

    return open_dagster_pipes()


# ---- sample-key recording (a debug aid for the distributed tests) ---------------------------------

class _RecordingCollator:
    """Wraps the trainer's collator and appends each batch's sample keys to ``DIR/keys-rank<R>-pid<P>.jsonl``.

    A module-level class so it pickles into DataLoader workers; each process writes its own file.
    """

    def __init__(self, inner: Callable, directory: str, rank: int):
        self.inner, self.directory, self.rank = inner, directory, rank

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def __call__(self, samples):
        from plant_pipeline.ml.training.collate import SAMPLE_KEYS

        batch = self.inner(samples)
        path = Path(self.directory) / f"keys-rank{self.rank}-pid{os.getpid()}.jsonl"
        with path.open("a") as handle:
            handle.write(json.dumps({"rank": self.rank, "keys": list(batch[SAMPLE_KEYS])}) + "\n")
        return batch


def _key_recorder(directory: str, rank: int) -> Callable[[Callable], Callable]:
    """train()'s ``wrap_collator``: records the keys of every batch the collator builds."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    return lambda collator: _RecordingCollator(collator, directory, rank)


# ---- main -----------------------------------------------------------------------------------------

@contextlib.contextmanager
def _progress_to_pipes_only(pipes):
    """Under Pipes the progress lines reach Dagster's log through Pipes; their stderr copy, which the launcher tees
    to the same terminal, would show each line twice. Without Pipes they stay on stderr, the only place they go."""
    if pipes is None:
        yield
        return
    before = progress_logger.level
    progress_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        progress_logger.setLevel(before)


def _quiet_progress_bars() -> None:
    """No tqdm bars (loading weights, writing checkpoints): this process writes to a log file and Dagster's log,
    where a bar is a line of noise per update."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def run(run_file: RunFile, result_path: str | Path | None = None, record_keys: str | None = None) -> TrainResult:
    """train() with this process's rank: rank 0 writes ``result_path`` and reports to Pipes when launched by it."""
    from plant_pipeline.ml.training.run import train

    rank = int(os.environ.get("RANK", "0"))
    wrap_collator = _key_recorder(record_keys, rank) if record_keys else None
    _quiet_progress_bars()
    with _open_pipes(rank) as pipes, _progress_to_pipes_only(pipes):
        def on_log(record: dict) -> None:
            if pipes is not None:
                pipes.log.info(format_progress(record))

        result = train(run_file.train, model_spec=run_file.model, shards_dir=run_file.shards_dir,
                       checkpoints_dir=run_file.checkpoints_dir, output_dir=run_file.output_dir, on_log=on_log,
                       wrap_collator=wrap_collator)
        if record_keys:
            atomic_write_json(Path(record_keys) / f"result-rank{rank}.json",
                              {"rank": rank, "steps": result.steps, "world_size": result.world_size})
        if rank == 0:
            if result_path is not None:
                atomic_write_json(result_path, result.to_dict())
            if pipes is not None:
                pipes.report_asset_materialization(metadata=result_metadata(result, run_file.checkpoints_dir))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {ENTRY_MODULE}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="Run file (JSON): train, model, shards_dir, checkpoints_dir, "
                                                        "output_dir.")
    parser.add_argument("--result", help="Where rank 0 writes the TrainResult as JSON (atomically).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="Override one setting, e.g. train.max_steps=20 (value parsed as JSON); repeatable.")
    parser.add_argument("--record-keys", default=os.environ.get(RECORD_KEYS_ENV), metavar="DIR",
                        help="Debug: every rank appends the sample keys of each batch it collates to DIR, and "
                             f"its step count to DIR/result-rank<R>.json (also via ${RECORD_KEYS_ENV}).")
    args = parser.parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    try:
        run(RunFile.load(args.config, args.overrides), args.result, args.record_keys)
    except USAGE_ERRORS as err:
        # A setting to change, not a bug: the message alone says what to do; no traceback to wade through.
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
