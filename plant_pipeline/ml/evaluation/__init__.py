"""Stage 4: evaluation. Scoring every category name for each test image (scoring.py) or matching a generated
answer (answers.py), per-class metrics, figures and the written report.
"""

from plant_pipeline.ml.evaluation.evaluate import EvalResult, evaluate_shards
from plant_pipeline.ml.evaluation.metrics import (
    compare,
    confusion_matrix,
    missing_classes,
    per_class_table,
    summary_metrics,
)
from plant_pipeline.ml.evaluation.plots import plot_confusion_matrix, plot_per_class_accuracy
from plant_pipeline.ml.evaluation.report import read_report, write_report
from plant_pipeline.ml.evaluation.scoring import EvaluationError
from plant_pipeline.ml.evaluation.tracking import log_evaluation

__all__ = [
    "EvalResult",
    "EvaluationError",
    "compare",
    "confusion_matrix",
    "evaluate_shards",
    "log_evaluation",
    "missing_classes",
    "per_class_table",
    "plot_confusion_matrix",
    "plot_per_class_accuracy",
    "read_report",
    "summary_metrics",
    "write_report",
]
