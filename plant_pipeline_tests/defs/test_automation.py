"""Jobs, eager evaluation, and the retraining schedule's decision (build_schedule_context on a real instance)."""

from pathlib import Path

from dagster import (
    AssetKey,
    AssetMaterialization,
    AutomationCondition,
    AutomationConditionSensorDefinition,
    DagsterEventType,
    DagsterInstance,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunRequest,
    SkipReason,
    asset,
    build_schedule_context,
    instance_for_test,
    materialize,
)

from plant_pipeline import definitions
from plant_pipeline.defs.automation import RETRAIN_CRON, retraining_reason

defs = definitions.defs()  # the Definitions the code location loads


def _report(instance, asset: str, **tags: str) -> None:
    instance.report_runless_asset_event(AssetMaterialization(asset_key=asset, tags=tags))


def _evaluate(instance) -> RunRequest | SkipReason:
    """The retraining schedule's decision, through the schedule the code location loads."""
    schedule = defs.resolve_schedule_def("retraining_schedule")
    tick = schedule.evaluate_tick(build_schedule_context(instance=instance))
    if tick.skip_message is not None:
        return SkipReason(tick.skip_message)
    [request] = tick.run_requests
    return request


def test_jobs_cover_the_graph_and_the_schedule_starts_stopped():
    assets = {
        name: {key.to_user_string() for key in defs.resolve_job_def(name).asset_layer.executable_asset_keys}
        for name in ("prepare_data", "add_user_photos", "train_and_evaluate", "full_pipeline")
    }
    assert assets["prepare_data"] == {"oxford_flowers", "folder_photos", "hf_dataset_photos", "category_map",
                                      "user_photos", "flower_shards"}
    assert assets["add_user_photos"] == {"user_photos", "flower_shards"}
    assert assets["train_and_evaluate"] == {"trained_model", "model_evaluation", "production_model"}
    assert assets["full_pipeline"] == assets["prepare_data"] | assets["train_and_evaluate"]
    schedule = defs.resolve_schedule_def("retraining_schedule")
    assert schedule.default_status == DefaultScheduleStatus.STOPPED
    assert schedule.cron_schedule == RETRAIN_CRON == "0 3 * * 1"
    assert schedule.job_name == "train_and_evaluate"


def test_the_incoming_photos_sensor_starts_stopped_and_launches_add_user_photos():
    sensor = defs.resolve_sensor_def("incoming_photos_sensor")
    assert sensor.default_status == DefaultSensorStatus.STOPPED
    assert sensor.job_name == "add_user_photos"
    assert sensor.minimum_interval_seconds == 60


def test_model_evaluation_is_evaluated_eagerly():
    [spec] = [s for s in defs.resolve_all_asset_specs() if s.key.to_user_string() == "model_evaluation"]
    assert spec.automation_condition == AutomationCondition.eager()


def test_model_evaluation_is_evaluated_without_a_click():
    # Dagster would add a default_automation_condition_sensor of its own, stopped until someone starts it.
    sensor = defs.resolve_sensor_def("default_automation_condition_sensor")
    assert isinstance(sensor, AutomationConditionSensorDefinition)
    assert sensor.default_status == DefaultSensorStatus.RUNNING
    assert AssetKey("model_evaluation") in sensor.asset_selection.resolve(defs.resolve_asset_graph())


def test_the_instance_prints_info_lines_and_still_records_every_event(tmp_path, capfd):
    import shutil

    @asset
    def chatty(context) -> None:
        context.log.info("an info line")

    shutil.copy(Path(__file__).parents[2] / "config" / "dagster.yaml", tmp_path / "dagster.yaml")
    with DagsterInstance.from_config(str(tmp_path)) as instance:
        result = materialize([chatty], instance=instance)
        stored = {record.event_log_entry.dagster_event_type for record in
                  instance.get_records_for_run(result.run_id).records}
    printed = "".join(capfd.readouterr())
    assert "an info line" in printed
    assert " - DEBUG - " not in printed and "STEP_START" not in printed, printed
    assert {DagsterEventType.STEP_START, DagsterEventType.RUN_SUCCESS} <= stored  # the UI's event log is whole


def test_schedule_skips_without_shards_and_asks_for_data_prep():
    with instance_for_test() as instance:
        result = _evaluate(instance)
    assert isinstance(result, SkipReason) and "prepare_data" in result.skip_message


def test_schedule_trains_when_never_trained():
    with instance_for_test() as instance:
        _report(instance, "flower_shards", **{"dagster/data_version": "aaa"})
        result = _evaluate(instance)
    assert isinstance(result, RunRequest)
    assert "never been materialised" in result.tags["plant_pipeline/retrain_reason"]


def test_schedule_skips_when_nothing_changed_and_retrains_when_shards_change():
    with instance_for_test() as instance:
        _report(instance, "flower_shards", **{"dagster/data_version": "aaa"})
        _report(instance, "trained_model", **{"dagster/input_data_version/flower_shards": "aaa",
                                              "dagster/code_version": "1"})
        unchanged = _evaluate(instance)
        _report(instance, "flower_shards", **{"dagster/data_version": "bbb"})
        changed = _evaluate(instance)
    assert isinstance(unchanged, SkipReason) and "nothing changed" in unchanged.skip_message
    assert isinstance(changed, RunRequest)
    assert "aaa -> bbb" in changed.tags["plant_pipeline/retrain_reason"]


def test_a_new_training_code_version_triggers_retraining():
    with instance_for_test() as instance:
        _report(instance, "flower_shards", **{"dagster/data_version": "aaa"})
        _report(instance, "trained_model", **{"dagster/input_data_version/flower_shards": "aaa",
                                              "dagster/code_version": "1"})
        assert retraining_reason(instance, "1") is None
        assert "code version changed (1 -> 2)" in retraining_reason(instance, "2")


def test_training_holds_the_gpu_pool_and_the_instance_limits_it_to_one(tmp_path):
    import shutil

    assert defs.resolve_assets_def("trained_model").node_def.pool == "gpu"
    shutil.copy(Path(__file__).parents[2] / "config" / "dagster.yaml", tmp_path / "dagster.yaml")
    with DagsterInstance.from_config(str(tmp_path)) as instance:
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
