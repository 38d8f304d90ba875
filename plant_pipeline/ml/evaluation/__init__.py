"""Stage 4: evaluation. Scoring every category name for each test image (scoring.py) or matching a generated
answer (answers.py), per-class metrics, figures and the written report.
"""

from plant_pipeline.ml.evaluation.evaluate import EvalResult, evaluate_shards, read_shard_categories
from plant_pipeline.ml.evaluation.metrics import (
    class_label,
    compare,
    confusion_counts,
    confusion_matrix,
    missing_classes,
    most_confused_pairs,
    per_class_table,
    summary_metrics,
)
from plant_pipeline.ml.evaluation.plots import (
    evaluation_figures,
    plot_accuracy_overview,
    plot_confused_pairs,
    plot_confusion_matrix,
    plot_per_class_accuracy,
)
from plant_pipeline.ml.evaluation.report import (
    PER_CLASS_FILE,
    PREDICTIONS_FILE,
    SUMMARY_FILE,
    read_report,
    report_markdown,
    write_report,
)
from plant_pipeline.ml.evaluation.scoring import EvaluationError, choose_method, rank_candidates
from plant_pipeline.ml.evaluation.tracking import log_evaluation

__all__ = [
    "PER_CLASS_FILE",
    "PREDICTIONS_FILE",
    "SUMMARY_FILE",
    "EvalResult",
    "EvaluationError",
    "choose_method",
    "class_label",
    "compare",
    "confusion_counts",
    "confusion_matrix",
    "evaluate_shards",
    "evaluation_figures",
    "log_evaluation",
    "missing_classes",
    "most_confused_pairs",
    "plot_accuracy_overview",
    "plot_confused_pairs",
    "per_class_table",
    "plot_confusion_matrix",
    "plot_per_class_accuracy",
    "rank_candidates",
    "read_report",
    "read_shard_categories",
    "report_markdown",
    "summary_metrics",
    "write_report",
]
