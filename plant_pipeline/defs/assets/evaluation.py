"""Asset ``model_evaluation``: per-class accuracy of the trained model on the test shards, and its checks; logged
to the MLflow run of the training that made the model, where it has one."""

from pathlib import Path

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AutomationCondition,
    Config,
    MaterializeResult,
    MetadataValue,
    asset,
)
from pydantic import Field

from plant_pipeline.defs.failures import usage_errors_as_failures
from plant_pipeline.defs.locks import locked_output
from plant_pipeline.defs.metadata import image, rounded, table
from plant_pipeline.defs.resources import ModelResource, PipelineStorage, with_run_config_defaults
from plant_pipeline.ml.evaluation import (
    PER_CLASS_FILE,
    PREDICTIONS_FILE,
    SUMMARY_FILE,
    class_label,
    compare,
    evaluate_shards,
    evaluation_figures,
    log_evaluation,
    missing_classes,
    per_class_table,
    read_report,
    read_shard_categories,
    report_markdown,
    summary_metrics,
    write_report,
)
from plant_pipeline.ml.files import sha256_file
from plant_pipeline.ml.shards import INDEX_FILE
from plant_pipeline.ml.training import check_tracking_store, load_trained


class ModelEvaluationConfig(Config):
    method: str = Field(default="auto", description="rank: score every category's answer by likelihood (from one "
                        "shared image+prompt prefix); prune: rank only the names under the likeliest first tokens; "
                        "generate: greedy answer matched to the closest name; auto: rank, or prune for many names.")
    normalize: str = Field(default="mean", description="rank only: 'mean' log-probability per answer token (long "
                           "names are not penalised) or 'sum' (joint likelihood).")
    batch_size: int = Field(default=8, description="Test images per forward pass.")
    max_samples: int | None = Field(default=None, description="Score only the first N test images (None: all).")
    compare_with_base: bool = Field(default=True, description="Also score the base model (cached per model and "
                                    "shards) and report the gain from fine-tuning.")
    accuracy_floor: float = Field(default=0.05, description="Check: top-1 accuracy must be at least this (0..1).")
    floor_severity: str = Field(default="WARN", description="Severity when below the floor: WARN or ERROR.")
    regression_margin: float = Field(default=0.02, description="Check: top-1 may fall by at most this much "
                                     "against the previous materialisation.")


# Defaults from PLANT_PIPELINE_RUN_CONFIG's files where it is set (make dev after make demo).
ModelEvaluationConfig = with_run_config_defaults(ModelEvaluationConfig, "model_evaluation")


def _latest_metadata(context: AssetExecutionContext, asset_name: str) -> dict | None:
    event = context.instance.get_latest_materialization_event(AssetKey(asset_name))
    if event is None or event.asset_materialization is None:
        return None
    return {key: value.value for key, value in event.asset_materialization.metadata.items()}


# The full per-class table goes to per_class.csv; the UI shows its worst rows only.
METADATA_ROWS = 200
# What people read is rounded to this many decimals; top1/macro/top5_accuracy and summary.json stay exact for
# the checks and the comparisons that read them.
SHOWN_DIGITS = 4


def _labelled(names: list[str], ids: list[int]) -> list[str]:
    """Classes as people read them in a list: "12 sunflower"."""
    return [class_label(i, name) for i, name in zip(ids, names)][:METADATA_ROWS]


def _summary_line(summary) -> str:
    """The accuracies as a person reads them: "top-1 0.8123, macro 0.7990, top-5 0.9512 on 1020 test images"."""
    parts = [f"{label} {summary[key]:.{SHOWN_DIGITS}f}" for label, key in
             (("top-1", "top1_accuracy"), ("macro", "macro_accuracy"), ("top-5", "top5_accuracy"))
             if summary.get(key) is not None]
    return ", ".join(parts) + f" on {summary['num_test_images']} test images"


def _ui_report(summary, per_class, comparison, title: str, figures: list[str], files: list[str]) -> str:
    """report.md for Dagster's UI, where its relative links would lead nowhere (broken pictures, dead links): the
    figures and files are named as this materialisation's metadata entries instead."""
    footer = ("Figures: the " + " and ".join(f"**{name}**" for name in figures) + " entries of this "
              "materialisation. Files: the " + ", ".join(f"**{name}**" for name in files) + " entries, in the "
              "folder of **report_path** with report.md.")
    return report_markdown(summary, per_class, comparison, title=title, footer=footer)


def _evaluate(model, processor, shards_dir: Path, config: ModelEvaluationConfig, context, label: str):
    def progress(done: int, total: int | None) -> None:
        if done == total or done % (config.batch_size * 20) == 0:
            context.log.info(f"{label}: {done}/{total} test images scored")

    categories = read_shard_categories(shards_dir)
    result = evaluate_shards(model, processor, shards_dir, method=config.method, categories=categories,
                             normalize=config.normalize, batch_size=config.batch_size,
                             max_samples=config.max_samples, progress=progress)
    context.log.info(f"{label}: {result.method_reason}")
    per_class = per_class_table(result.predictions, categories.names)
    return result, summary_metrics(result.predictions, categories.names), per_class


def _base_report(context, spec, shards_dir: Path, config: ModelEvaluationConfig, storage: PipelineStorage):
    """The base model's summary on these shards, computed once and kept beside the reports."""
    samples = "all" if config.max_samples is None else str(config.max_samples)
    key = f"{spec.slug}-{sha256_file(shards_dir / INDEX_FILE)[:12]}-{config.method}-{config.normalize}-{samples}"
    out_dir = storage.path("reports", "base", key)
    cached = read_report(out_dir)
    if cached is not None:
        return cached
    processor = spec.load_processor()
    model = spec.load_model()
    result, summary, per_class = _evaluate(model, processor, shards_dir, config, context, "base model")
    write_report(out_dir, summary, per_class, None, {}, result.predictions, title=f"Base model {spec.model_name}")
    return summary, per_class


@asset(
    deps=["trained_model", "flower_shards"],
    group_name="training",
    code_version="1",
    kinds={"pytorch"},
    # Evaluate as soon as a new model (or new shards) lands, when the automation daemon runs (dagster dev).
    automation_condition=AutomationCondition.eager(),
    description="Top-1, macro and top-5 accuracy on the test split, a per-class table (worst first), a confusion "
    "matrix, and the change against the previous evaluation and the base model.",
    check_specs=[
        AssetCheckSpec("accuracy_floor", asset="model_evaluation", description="top-1 at least the configured floor"),
        AssetCheckSpec("no_regression", asset="model_evaluation",
                       description="top-1 not lower than the previous evaluation by more than the configured margin"),
        AssetCheckSpec("coverage", asset="model_evaluation", description="every class has test images and was scored"),
    ],
)
@usage_errors_as_failures("model_evaluation")
@locked_output
def model_evaluation(
    context: AssetExecutionContext, config: ModelEvaluationConfig, storage: PipelineStorage, model: ModelResource
) -> MaterializeResult:
    if config.floor_severity.upper() not in ("WARN", "ERROR"):  # fail on a typo now, not after evaluating
        raise ValueError(f"floor_severity must be WARN or ERROR; got {config.floor_severity!r}")
    severity = AssetCheckSeverity(config.floor_severity.upper())
    trained = _latest_metadata(context, "trained_model")
    if trained is None or "model_path" not in trained:
        raise FileNotFoundError("trained_model has no materialisation with a model_path; materialise it first")
    mlflow_run = trained.get("mlflow_run_id")
    if mlflow_run:  # a tracking server that is down fails now, not after the evaluation
        check_tracking_store(trained["mlflow_tracking_uri"])
    spec = model.spec(storage)
    shards_dir = storage.shards_dir(spec.slug)
    fine_tuned, processor = load_trained(trained["model_path"], spec)
    result, summary, per_class = _evaluate(fine_tuned, processor, shards_dir, config, context, "fine-tuned")
    del fine_tuned

    previous = _latest_metadata(context, "model_evaluation")
    previous_report = read_report(previous["report_path"]) if previous and "report_path" in previous else None
    vs_previous = compare(summary, per_class, *(previous_report or (None, None)))
    vs_base = compare(summary, per_class, *_base_report(context, spec, shards_dir, config, storage)) \
        if config.compare_with_base else None

    categories = read_shard_categories(shards_dir)
    figures = evaluation_figures(result.predictions, per_class, categories.names)
    report_dir = storage.path("reports", context.run.run_id)
    # The model folder names the run identity; its absolute path is in model_path.
    title = f"Evaluation of {Path(trained['model_path']).name}"
    write_report(report_dir, summary, per_class, vs_previous, figures, result.predictions, title=title)
    figure_keys = [file.removesuffix(".png") for file in figures]
    files = {"summary_path": SUMMARY_FILE, "per_class_path": PER_CLASS_FILE, "predictions_path": PREDICTIONS_FILE}

    top1 = summary["top1_accuracy"]
    missing = missing_classes(per_class)
    missing_ids = sorted(per_class.loc[per_class["test_images"] == 0, "category_id"].tolist())
    previous_top1 = previous_report[0]["top1_accuracy"] if previous_report else None
    checks = [
        AssetCheckResult(
            check_name="accuracy_floor", passed=top1 >= config.accuracy_floor,
            severity=severity,
            metadata={"top1_accuracy": top1, "floor": config.accuracy_floor},
        ),
        AssetCheckResult(
            check_name="no_regression",
            passed=previous_top1 is None or top1 >= previous_top1 - config.regression_margin,
            metadata={"top1_accuracy": top1, "previous_top1_accuracy": previous_top1,
                      "margin": config.regression_margin},
        ),
        AssetCheckResult(
            check_name="coverage", passed=not missing and summary["num_classes_scored"] == len(categories),
            metadata={"classes_scored": summary["num_classes_scored"], "num_categories": len(categories),
                      "classes_without_test_images": _labelled(missing, missing_ids),
                      "num_classes_without_test_images": len(missing)},
        ),
    ]
    shown = _summary_line(summary)
    context.log.info(shown)
    metadata = {
        "summary": shown,
        "top1_accuracy": top1,
        "macro_accuracy": summary["macro_accuracy"],
        "top5_accuracy": summary["top5_accuracy"],
        "num_test_images": summary["num_test_images"],
        "images_per_second": round(result.images_per_second, 2),
        "method": result.method,
        "method_reason": result.method_reason,
        "num_categories": len(categories),
        "question": categories.question,
        "category_source": categories.source,
        "model_path": MetadataValue.path(str(trained["model_path"])),
        "report_path": MetadataValue.path(str(report_dir)),
        "report": MetadataValue.md(_ui_report(summary, per_class, vs_previous, title, figure_keys, list(files))),
        **{key: MetadataValue.path(str(report_dir / file)) for key, file in files.items()},
        "per_class": table(per_class, limit=METADATA_ROWS, digits=SHOWN_DIGITS),
        **{key: image(png, key.replace("_", " ")) for key, png in zip(figure_keys, figures.values())},
        "delta_top1_vs_previous": rounded(vs_previous["delta_top1"], SHOWN_DIGITS),
        "delta_macro_vs_previous": rounded(vs_previous["delta_macro"], SHOWN_DIGITS),
        "classes_worse_than_previous": _labelled(vs_previous["classes_worse"], vs_previous["classes_worse_ids"]),
    }
    if mlflow_run:
        log_evaluation(trained["mlflow_tracking_uri"], mlflow_run, summary, report_dir, step=trained.get("steps", 0))
        metadata.update(mlflow_run_id=mlflow_run, mlflow_tracking_uri=trained["mlflow_tracking_uri"])
        if "mlflow_run" in trained:
            metadata["mlflow_run"] = MetadataValue.url(trained["mlflow_run"])
    if vs_base is not None:
        metadata.update({"delta_top1_vs_base": rounded(vs_base["delta_top1"], SHOWN_DIGITS),
                         "delta_macro_vs_base": rounded(vs_base["delta_macro"], SHOWN_DIGITS),
                         "classes_worse_than_base": _labelled(vs_base["classes_worse"], vs_base["classes_worse_ids"])})
    # None is not a metadata value; leave such keys out rather than invent a number.
    return MaterializeResult(metadata={k: v for k, v in metadata.items() if v is not None}, check_results=checks)
