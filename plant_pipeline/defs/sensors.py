"""The sensors that launch work: ``incoming_photos_sensor`` and ``default_automation_condition_sensor``.

``default_automation_condition_sensor`` evaluates the assets' automation conditions (model_evaluation is eager: a
new trained_model is evaluated without a click). Dagster would create it stopped; declared here, it starts running.

``incoming_photos_sensor``: new photos under data/incoming/ launch a run that takes them in and rebuilds the shards.
Created stopped, as Dagster sensors and schedules are; a person turns it on in the UI (Automation). A tick only
lists incoming/ (a stat per file) and reads the ledger: it opens no photo, so a large drop stays cheap; the run
hashes, dedupes and decodes. The run key is derived from the path, size and mtime of the files
to read, so however often it ticks, one set of files starts one run.
"""

import hashlib
import json

from dagster import (
    AssetKey,
    AssetSelection,
    AutomationConditionSensorDefinition,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from plant_pipeline.defs.assets.user_photos import current_categories
from plant_pipeline.defs.automation import USER_PHOTO_ASSETS, add_user_photos_job
from plant_pipeline.defs.resources import PipelineStorage
from plant_pipeline.ml.data import DEFAULT_SETTLE_S, Skipped, scan_incoming
from plant_pipeline.ml.data.incoming import new_category_folders

INTERVAL_SECONDS = 60
_LISTED = 10  # files named in a skip reason; the count says how many there were
NEW_CATEGORIES_TAG = "plant_pipeline/new_categories"
_TAG_CHARS = 200  # tag values are meant to be short: the list is cut, with the count
_IN_FLIGHT = [DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING,
              DagsterRunStatus.STARTED]


# Dagster's name for the sensor it would add itself, so the UI and the docs about it still apply.
default_automation_condition_sensor = AutomationConditionSensorDefinition(
    "default_automation_condition_sensor",
    target=AssetSelection.all(),
    default_status=DefaultSensorStatus.RUNNING,
    description="Evaluates the assets' automation conditions every 30 s and launches what they ask for: "
    "model_evaluation, eager, runs after each new trained_model. Running from the start (a Dagster daemon runs "
    "it: `dagster dev`); stop it under Automation to evaluate by hand.",
)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def new_photos_run_key(files: list[tuple[str, int, int]]) -> str:
    """The same files (path, size, mtime_ns) give the same key, so Dagster launches them once; a file that
    changes gives a new key."""
    return "user-photos-" + _digest("\n".join(f"{path}\0{size}\0{mtime_ns}" for path, size, mtime_ns in sorted(files)))


def new_categories_text(names: list[str], limit: int = _TAG_CHARS) -> str:
    """The new categories' names, comma-separated, cut to ``limit`` characters with how many there are in all."""
    text = ", ".join(names)
    if len(text) <= limit:
        return text
    suffix = f"... ({len(names)} in all)"
    return text[: limit - len(suffix)].rstrip(", ") + suffix


def _listing(skipped: list[Skipped]) -> str:
    shown = "; ".join(f"{s.original}: {s.reason}" for s in skipped[:_LISTED])
    return shown + (f"; and {len(skipped) - _LISTED} more" if len(skipped) > _LISTED else "")


@sensor(
    job=add_user_photos_job,
    minimum_interval_seconds=INTERVAL_SECONDS,
    default_status=DefaultSensorStatus.STOPPED,
    description="Watches data/incoming/<category name or 0-based id>/ for files no run has looked at yet (by "
    "path, size and mtime; it opens none) and launches add_user_photos for them (only user_photos until "
    "flower_shards exists), which hashes and decodes them. Folders that name no category, where the source "
    "allows new ones, are named in the run's tag plant_pipeline/new_categories and the log. Files still being written wait; unknown categories, "
    "symlinks, files over the size limit and files a run found undecodable or conflicting are left in place "
    "and named in the skip reason and the log.",
)
def incoming_photos_sensor(context: SensorEvaluationContext, storage: PipelineStorage) -> SensorResult:
    categories = current_categories(storage)
    scan = scan_incoming(storage.path(), categories=categories)  # lists; opens no file under incoming/
    new_categories = new_category_folders(storage.path(), categories)
    problems = [[s.original, s.reason] for s in scan.rejected]
    # The cursor remembers which problems were logged, so a file left in place is warned about once, not every tick.
    cursor = json.dumps({"rejected": len(problems), "digest": _digest(json.dumps(problems))})
    if problems and cursor != context.cursor:
        for original, reason in problems:
            context.log.warning(f"left in place: {original}: {reason}")
    files = scan.to_read
    if not files:
        reason = (f"no new photos in {storage.incoming_dir} ({scan.known} taken in earlier, "
                  f"{len(scan.duplicates)} duplicates)")
        if scan.waiting:
            names = ", ".join(s.original for s in scan.waiting[:_LISTED])
            more = f" and {len(scan.waiting) - _LISTED} more" if len(scan.waiting) > _LISTED else ""
            reason += (f"; {len(scan.waiting)} files still being written (modified in the last "
                       f"{DEFAULT_SETTLE_S:g} s), looked at on a later tick: {names}{more}")
        if scan.rejected:
            reason += f"; {len(scan.rejected)} files left in place: {_listing(scan.rejected)}"
        if new_categories:
            reason += f"; folders that would create new categories: {new_categories_text(new_categories)}"
        return SensorResult(skip_reason=SkipReason(reason), cursor=cursor)

    # One intake at a time: a drop still being copied in then makes one more run when this one ends, not one
    # run (and one shard rebuild) per tick, each queued behind the intake lock.
    in_flight = context.instance.get_runs(RunsFilter(job_name=add_user_photos_job.name, statuses=_IN_FLIGHT), limit=1)
    if in_flight:
        run = in_flight[0]
        return SensorResult(skip_reason=SkipReason(
            f"{len(files)} new files wait for run {run.run_id} of {add_user_photos_job.name} "
            f"({run.status.value.lower()}) to finish"), cursor=cursor)

    shards_built = context.instance.get_latest_materialization_event(AssetKey("flower_shards")) is not None
    # Before the first prepare_data there are no shards to add the photos to: take them in now, shard them then.
    selection = USER_PHOTO_ASSETS if shards_built else ["user_photos"]
    tags = {"plant_pipeline/new_photos": str(len(files))}
    news = ""
    if new_categories:  # named here; the run creates each that has enough photos (user_photos' min_new_photos)
        tags[NEW_CATEGORIES_TAG] = new_categories_text(new_categories)
        news = f"; new categories: {new_categories_text(new_categories, 1000)}"
    context.log.info(f"{len(files)} new files to take in ({len(scan.rejected)} left in place, {len(scan.waiting)} "
                     f"still being written{news}): materialising {', '.join(selection)}")
    request = RunRequest(run_key=new_photos_run_key(files), asset_selection=[AssetKey(name) for name in selection],
                         tags=tags)
    return SensorResult(run_requests=[request], cursor=cursor)
