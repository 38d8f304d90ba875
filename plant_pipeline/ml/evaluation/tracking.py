"""Logging an evaluation to the MLflow run of the training that made the model, so a run holds both its losses
and its accuracy (compare runs on ``test_top1_accuracy`` in the MLflow UI)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from plant_pipeline.ml.training.tracking import MlflowRun

METRICS = ("top1_accuracy", "macro_accuracy", "top5_accuracy")
PREFIX = "test_"  # beside the training's eval_loss (validation split): these are the test split's


def log_evaluation(tracking_uri: str, run_id: str, summary: Mapping, report_dir: str | Path, *, step: int,
                   artifact_path: str = "evaluation") -> list[str]:
    """Log ``summary``'s accuracies as ``test_*`` metrics at ``step`` (the model's training steps) and the report
    folder's per-class CSV, pictures and report.md under ``artifact_path``; returns the artifact names logged.

    The store is checked first (TrackingError naming it), so a server that is down fails before anything is logged.
    """
    run = MlflowRun.attach(tracking_uri, run_id)
    run.log_metrics({PREFIX + k: summary[k] for k in METRICS if summary.get(k) is not None}, step)
    files = sorted(f for f in Path(report_dir).iterdir() if f.suffix in (".csv", ".png", ".md"))
    run.log_files(files, artifact_path)
    return [f"{artifact_path}/{f.name}" for f in files]
