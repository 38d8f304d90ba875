"""Asset ``production_model``: promotes the model that model_evaluation last evaluated when its checks passed and
its top-1 is not worse than production's by more than a margin; otherwise production stays and the metadata says
why. The Identifier, ``plant-pipeline identify`` and ``plant-pipeline serve`` follow the pointer it writes."""

from pathlib import Path

from dagster import (
    AssetCheckKey,
    AssetExecutionContext,
    AssetKey,
    AutomationCondition,
    Config,
    DagsterInstance,
    MaterializeResult,
    MetadataValue,
    asset,
)
from pydantic import Field

from plant_pipeline.defs.assets.evaluation import model_evaluation
from plant_pipeline.defs.failures import usage_errors_as_failures
from plant_pipeline.defs.locks import locked_output
from plant_pipeline.defs.resources import ModelResource, PipelineStorage
from plant_pipeline.ml.evaluation import read_report, read_shard_categories
from plant_pipeline.ml.files import sha256_file
from plant_pipeline.ml.serving.promotion import (
    DEFAULT_KEEP,
    DEFAULT_MARGIN,
    Decision,
    decide,
    in_production,
    promote,
    weights_digest,
)
from plant_pipeline.ml.serving.registry import MODEL_CARD_FILE, read_pointer
from plant_pipeline.ml.shards import INDEX_FILE

EVALUATION = AssetKey("model_evaluation")
# What the production pointer records of an evaluation (the rest of its metadata stays in Dagster).
METRICS = ("top1_accuracy", "macro_accuracy", "top5_accuracy", "num_test_images", "num_categories")


class ProductionModelConfig(Config):
    margin: float = Field(default=DEFAULT_MARGIN, description="Promote only when the evaluated top-1 is at most "
                          "this much below the production model's (0..1); a better model is always promoted.")
    require_checks: bool = Field(default=True, description="Promote only when every check of model_evaluation "
                                 "passed for that evaluation (accuracy_floor, no_regression, coverage).")
    keep: int = Field(default=DEFAULT_KEEP, description="Promoted model folders to keep under "
                      "data/production/models (the production one is never removed).")


def _failed_checks(instance: DagsterInstance, run_id: str) -> list[str]:
    """model_evaluation's checks that did not pass in the run of its latest materialisation (a check with no
    result in that run counts as failed: nothing says the model passed it)."""
    keys = sorted(model_evaluation.check_keys, key=lambda key: key.name)
    records = instance.event_log_storage.get_latest_asset_check_execution_by_key(keys)
    failed = []
    for key in keys:
        record = records.get(key)
        if record is None or record.run_id != run_id:
            failed.append(f"{key.name} (no result for this evaluation)")
        elif record.status.value != "SUCCEEDED":  # FAILED, or PLANNED: still running
            failed.append(key.name)
    return failed


def _changed_inputs(instance: DagsterInstance, evaluation_tags: dict[str, str]) -> list[str]:
    """The evaluation's inputs materialised again since it ran: Dagster tags each materialisation with its own
    data version and those of its inputs. A retraining writes to the same folder, so the weights there may no
    longer be the ones evaluated."""
    changed = []
    for name in ("trained_model", "flower_shards"):
        seen = evaluation_tags.get(f"dagster/input_data_version/{name}")
        latest = instance.get_latest_materialization_event(AssetKey(name))
        now = (latest.asset_materialization.tags or {}).get("dagster/data_version") \
            if latest is not None and latest.asset_materialization is not None else None
        if seen and now and seen != now:
            changed.append(f"{name} (data version {seen} -> {now})")
    return changed


def _check_names(keys: set[AssetCheckKey]) -> str:
    return ", ".join(sorted(key.name for key in keys))


@asset(
    deps=["model_evaluation"],
    group_name="serving",
    code_version="1",
    # Decide as soon as a new evaluation lands, when the automation daemon runs (dagster dev).
    automation_condition=AutomationCondition.eager(),
    description="The model in service: the evaluated model is promoted (copied with its categories and a model "
    "card into data/production/models/<id>, then data/production/production.json points at it) when "
    f"model_evaluation's checks ({_check_names(model_evaluation.check_keys)}) passed and its top-1 is not below "
    "production's by more than the margin; otherwise production stays and the metadata says why.",
)
@usage_errors_as_failures("production_model")
@locked_output
def production_model(context: AssetExecutionContext, config: ProductionModelConfig, storage: PipelineStorage,
                     model: ModelResource) -> MaterializeResult:
    records = context.instance.fetch_materializations(EVALUATION, limit=1).records
    if not records:
        raise FileNotFoundError("model_evaluation has no materialisation; materialise it first")
    entry = records[0].event_log_entry
    evaluation = {key: value.value for key, value in entry.asset_materialization.metadata.items()}
    if "model_path" not in evaluation:
        raise FileNotFoundError(f"model_evaluation's materialisation of run {entry.run_id} names no model_path; "
                                "materialise model_evaluation again")
    candidate_path = Path(evaluation["model_path"])
    metrics = {key: evaluation[key] for key in METRICS if evaluation.get(key) is not None}
    current = read_pointer(storage.path())
    if current is not None and not Path(current.model_path).is_dir():
        # Compare with nothing rather than keep pointing at a folder no reader can load.
        context.log.warning(f"production model {current.model_id}'s folder {current.model_path} is gone; deciding "
                            "as if nothing were in production")
        current = None
    spec = model.spec(storage)
    shards_dir = storage.shards_dir(spec.slug)
    categories = read_shard_categories(shards_dir)
    failed = _failed_checks(context.instance, entry.run_id) if config.require_checks else []
    digest = weights_digest(candidate_path)

    changed = _changed_inputs(context.instance, dict(entry.asset_materialization.tags or {}))
    if changed:
        decision = Decision(False, f"{', '.join(changed)} changed since this evaluation; materialise "
                            "model_evaluation again")
    elif in_production(digest, current):
        decision = Decision(False, f"{candidate_path} is already in production as {current.model_id}")
    elif evaluation.get("num_categories", len(categories)) != len(categories):
        decision = Decision(False, f"the shards now hold {len(categories)} categories but the model was evaluated "
                            f"on {evaluation['num_categories']}; materialise model_evaluation again")
    else:
        decision = decide(metrics, current, margin=config.margin, checks_passed=not failed, failed_checks=failed)
    context.log.info(decision.reason)

    info = current
    if decision.promote:
        report = read_report(evaluation["report_path"]) if "report_path" in evaluation else None
        lineage = {"Trained model": str(candidate_path), "Evaluation run": entry.run_id,
                   "Evaluation report": str(evaluation.get("report_path", "n/a"))}
        info = promote(candidate_path, data_dir=storage.path(), categories=categories, base_model=spec.model_name,
                       data_version=sha256_file(shards_dir / INDEX_FILE)[:12], metrics=metrics,
                       per_class=report[1] if report else None, lineage=lineage, keep=config.keep, digest=digest)
        context.log.info(f"production is now {info.model_id} ({info.model_path})")

    metadata = {
        "promoted": decision.promote,
        "reason": decision.reason,
        "top1_accuracy": metrics.get("top1_accuracy"),
        "previous_production_top1_accuracy": current.metrics.get("top1_accuracy") if current else None,
        "previous_production_model_id": current.model_id if current else None,
        "failed_checks": failed,
        "evaluated_model_path": MetadataValue.path(str(candidate_path)),
        "evaluation_run_id": entry.run_id,
    }
    if info is not None:
        card = Path(info.model_path) / MODEL_CARD_FILE
        metadata.update({
            "model_id": info.model_id,
            "model_path": MetadataValue.path(info.model_path),
            "production_top1_accuracy": info.metrics.get("top1_accuracy"),
            "data_version": info.data_version,
            "model_card": MetadataValue.md(card.read_text()) if card.is_file() else None,
        })
    # None is not a metadata value; leave such keys out rather than invent a number.
    return MaterializeResult(metadata={k: v for k, v in metadata.items() if v is not None})
