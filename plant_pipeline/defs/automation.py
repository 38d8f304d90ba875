"""Jobs and the retraining schedule: retrain only when the shards or the training code changed.

The schedule is created stopped, as Dagster schedules are; a person turns it on in the UI (Automation). Its cron
is ``PLANT_PIPELINE_RETRAIN_CRON``, read when the code location loads (``automation()``), else Mondays 03:00.
"""

import os

from dagster import (
    AssetKey,
    AssetSelection,
    DagsterInstance,
    DefaultScheduleStatus,
    Definitions,
    RunRequest,
    ScheduleDefinition,
    ScheduleEvaluationContext,
    SkipReason,
    define_asset_job,
    definitions,
)

DATA_ASSETS = ["oxford_flowers", "folder_photos", "hf_dataset_photos", "category_map", "user_photos",
               "flower_shards"]
USER_PHOTO_ASSETS = ["user_photos", "flower_shards"]
TRAIN_ASSETS = ["trained_model", "model_evaluation", "production_model"]
RETRAIN_CRON = "0 3 * * 1"  # Mondays 03:00
RETRAIN_CRON_ENV = "PLANT_PIPELINE_RETRAIN_CRON"

prepare_data_job = define_asset_job(
    "prepare_data", selection=AssetSelection.assets(*DATA_ASSETS),
    description="Read the sources (the Oxford release by default; an image folder or a datasets dataset where "
    "configured), build the category map of the chosen one, take in new user photos and build the shards.",
)
add_user_photos_job = define_asset_job(
    "add_user_photos", selection=AssetSelection.assets(*USER_PHOTO_ASSETS),
    description="Take in new photos from data/incoming and rebuild the shards with them; incoming_photos_sensor "
    "launches it.",
)
train_and_evaluate_job = define_asset_job(
    "train_and_evaluate", selection=AssetSelection.assets(*TRAIN_ASSETS),
    description="Fine-tune on the current shards, evaluate on the test split, and promote the model to production "
    "when its checks pass and it is not worse than production's by more than the margin.",
)
full_pipeline_job = define_asset_job("full_pipeline", selection=AssetSelection.all(),
                                     description="The whole graph, data to the production model.")


def _tags(instance: DagsterInstance, asset: str) -> dict[str, str] | None:
    event = instance.get_latest_materialization_event(AssetKey(asset))
    if event is None or event.asset_materialization is None:
        return None
    return dict(event.asset_materialization.tags or {})


def retraining_reason(instance: DagsterInstance, training_code_version: str | None) -> str | None:
    """Why the model should be retrained now, or None when nothing it depends on changed.

    Dagster tags every materialisation with the data versions of its inputs and its code version, so the
    last training records which shards and which code it saw.
    """
    shards = _tags(instance, "flower_shards")
    if shards is None:
        return None
    trained = _tags(instance, "trained_model")
    if trained is None:
        return "trained_model has never been materialised"
    current, seen = shards.get("dagster/data_version"), trained.get("dagster/input_data_version/flower_shards")
    if current != seen:
        return f"flower_shards changed since the last training (data version {seen} -> {current})"
    if training_code_version is not None and trained.get("dagster/code_version") != training_code_version:
        return (f"trained_model's code version changed ({trained.get('dagster/code_version')} -> "
                f"{training_code_version})")
    return None


def retrain_if_changed(context: ScheduleEvaluationContext) -> RunRequest | SkipReason:
    """The retraining schedule's decision: a run when retraining_reason gives one, else a skip saying why."""
    from plant_pipeline.defs.assets.training import trained_model

    reason = retraining_reason(context.instance, trained_model.code_versions_by_key[AssetKey("trained_model")])
    if reason is None:
        if _tags(context.instance, "flower_shards") is None:
            return SkipReason("no flower_shards materialisation yet: run the prepare_data job first")
        return SkipReason("nothing changed since the last training: same shards data version and code version")
    context.log.info(reason)
    return RunRequest(run_key=None, tags={"plant_pipeline/retrain_reason": reason[:200]})


def build_retraining_schedule(cron: str = RETRAIN_CRON) -> ScheduleDefinition:
    return ScheduleDefinition(
        name="retraining_schedule", cron_schedule=cron, job=train_and_evaluate_job, execution_fn=retrain_if_changed,
        default_status=DefaultScheduleStatus.STOPPED,
        description="Retrain and evaluate when the shards or the training code changed since the last training; "
        f"otherwise skip with the reason. Cron from {RETRAIN_CRON_ENV} (default {RETRAIN_CRON!r}).",
    )


@definitions
def automation() -> Definitions:
    # The cron is read here, when the code location loads, not at import.
    return Definitions(
        jobs=[prepare_data_job, add_user_photos_job, train_and_evaluate_job, full_pipeline_job],
        schedules=[build_retraining_schedule(os.environ.get(RETRAIN_CRON_ENV, RETRAIN_CRON))],
    )
