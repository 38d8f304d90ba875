"""``incoming_photos_sensor``: new photos under data/incoming/ launch a run that takes them in and rebuilds the shards.

Created stopped, as Dagster sensors and schedules are; a person turns it on in the UI (Automation). The run key
is derived from the new photos' content hashes, so however often it ticks, one set of photos starts one run.
"""

import hashlib
import json

from dagster import (
    AssetKey,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from plant_pipeline.defs.automation import USER_PHOTO_ASSETS, add_user_photos_job
from plant_pipeline.defs.resources import PipelineStorage
from plant_pipeline.ml import incoming

INTERVAL_SECONDS = 60
_LISTED = 10  # files named in a skip reason; the count says how many there were


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def new_photos_run_key(hashes: list[str]) -> str:
    """The same set of new photos gives the same key, so Dagster launches it once."""
    return "user-photos-" + _digest("\n".join(sorted(hashes)))


def _listing(skipped: list[incoming.Skipped]) -> str:
    shown = "; ".join(f"{s.original}: {s.reason}" for s in skipped[:_LISTED])
    return shown + (f"; and {len(skipped) - _LISTED} more" if len(skipped) > _LISTED else "")


@sensor(
    job=add_user_photos_job,
    minimum_interval_seconds=INTERVAL_SECONDS,
    default_status=DefaultSensorStatus.STOPPED,
    description="Watches data/incoming/<category name or 0-based id>/ for photos whose content (sha256) is not "
    "taken in yet and launches add_user_photos for them (only user_photos until flower_shards exists). Unknown "
    "categories and undecodable files are left in place and named in the skip reason and the log.",
)
def incoming_photos_sensor(context: SensorEvaluationContext, storage: PipelineStorage) -> SensorResult:
    scan = incoming.scan_incoming(storage.path())
    problems = [[s.original, s.reason] for s in scan.rejected]
    # The cursor remembers which problems were logged, so a file left in place is warned about once, not every tick.
    cursor = json.dumps({"rejected": len(problems), "digest": _digest(json.dumps(problems))})
    if problems and cursor != context.cursor:
        for original, reason in problems:
            context.log.warning(f"left in place: {original}: {reason}")
    if not scan.new:
        reason = (f"no new photos in {storage.incoming_dir} ({scan.known} taken in earlier, "
                  f"{len(scan.duplicates)} duplicates)")
        if scan.rejected:
            reason += f"; {len(scan.rejected)} files left in place: {_listing(scan.rejected)}"
        return SensorResult(skip_reason=SkipReason(reason), cursor=cursor)

    shards_built = context.instance.get_latest_materialization_event(AssetKey("flower_shards")) is not None
    # Before the first prepare_data there are no shards to add the photos to: take them in now, shard them then.
    selection = USER_PHOTO_ASSETS if shards_built else ["user_photos"]
    context.log.info(f"{len(scan.new)} new photos ({len(scan.rejected)} files left in place): "
                     f"materialising {', '.join(selection)}")
    request = RunRequest(
        run_key=new_photos_run_key(scan.new_hashes),
        asset_selection=[AssetKey(name) for name in selection],
        tags={"plant_pipeline/new_photos": str(len(scan.new))},
    )
    return SensorResult(run_requests=[request], cursor=cursor)
