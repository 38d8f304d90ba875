"""The Dagster instance on a real PostgreSQL server, configured by config/dagster_postgres.yaml.

.ci/run starts a throwaway server and sets PLANT_PIPELINE_TEST_POSTGRES_URL; without it the test skips.
A run of the data assets is written through one instance and read back through a fresh one, and from the
PostgreSQL tables themselves.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import sqlalchemy as db
from dagster import AssetKey, DagsterEventType, DagsterInstance, DagsterRunStatus, materialize

from plant_pipeline.defs.assets.flowers import category_map, category_map_complete, oxford_flowers
from plant_pipeline.defs.resources import ModelResource, PipelineStorage
from plant_pipeline.ml.data.demo_release import make_demo_release

POSTGRES_URL_ENV = "PLANT_PIPELINE_TEST_POSTGRES_URL"
EXAMPLE_CONFIG = Path(__file__).resolve().parents[2] / "config" / "dagster_postgres.yaml"


@pytest.fixture
def postgres_url() -> str:
    url = os.environ.get(POSTGRES_URL_ENV)
    if not url:
        pytest.skip(f"{POSTGRES_URL_ENV} is not set; .ci/run starts a PostgreSQL server and sets it "
                    "(postgresql://user:password@127.0.0.1:port/database)")
    return url


@pytest.fixture
def postgres_home(tmp_path, postgres_url, monkeypatch) -> Path:
    """A DAGSTER_HOME holding the shipped example config, its DAGSTER_PG_* variables taken from the URL."""
    url = urlsplit(postgres_url)
    monkeypatch.setenv("DAGSTER_PG_HOST", url.hostname or "127.0.0.1")
    monkeypatch.setenv("DAGSTER_PG_PORT", str(url.port or 5432))
    monkeypatch.setenv("DAGSTER_PG_DB", url.path.lstrip("/"))
    monkeypatch.setenv("DAGSTER_PG_USERNAME", unquote(url.username or ""))
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", unquote(url.password or ""))
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(EXAMPLE_CONFIG, home / "dagster.yaml")
    return home


def test_run_event_log_and_materialisations_stored_in_postgres(postgres_home, postgres_url, tmp_path):
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage

    release = make_demo_release(tmp_path / "release", train_per_class=1, validation_per_class=1,
                                test_per_class=1, image_size=32)
    with DagsterInstance.from_config(str(postgres_home)) as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        result = materialize(
            [oxford_flowers, category_map, category_map_complete], instance=instance,
            resources={"storage": PipelineStorage(data_dir=str(tmp_path / "data")),
                       "model": ModelResource(model_name="unused")},
            run_config={"ops": {"oxford_flowers": {"config": {"local_dir": str(release.out_dir), "md5": {}}}}},
        )
        assert result.success
        run_id = result.run_id

    # A fresh instance sees everything: it was stored in the server, not held in memory.
    with DagsterInstance.from_config(str(postgres_home)) as instance:
        run = instance.get_run_by_id(run_id)
        assert run is not None and run.status == DagsterRunStatus.SUCCESS
        events = [e.dagster_event.event_type for e in instance.all_logs(run_id) if e.is_dagster_event]
        assert DagsterEventType.RUN_START in events and events[-1] == DagsterEventType.RUN_SUCCESS
        assert events.count(DagsterEventType.ASSET_MATERIALIZATION) == 2
        assert DagsterEventType.ASSET_CHECK_EVALUATION in events
        latest = instance.get_latest_materialization_event(AssetKey("category_map"))
        assert latest is not None and latest.run_id == run_id
        assert latest.asset_materialization.metadata["num_categories"].value == 102
        check = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [category_map_complete.check_key])[category_map_complete.check_key]
        assert check.run_id == run_id and check.status.value == "SUCCEEDED"

    # The rows themselves, in the server's tables; and no SQLite database was created beside them.
    engine = db.create_engine(db.engine.make_url(postgres_url).set(drivername="postgresql+psycopg2"))
    try:
        with engine.connect() as conn:
            status = conn.execute(db.text("SELECT status FROM runs WHERE run_id = :id"), {"id": run_id}).scalar_one()
            materialised = conn.execute(db.text(
                "SELECT asset_key FROM event_logs WHERE run_id = :id AND dagster_event_type = 'ASSET_MATERIALIZATION'"
            ), {"id": run_id}).scalars().all()
            known_assets = conn.execute(db.text("SELECT asset_key FROM asset_keys")).scalars().all()
    finally:
        engine.dispose()
    assert status == "SUCCESS"
    assert sorted(json.loads(key)[0] for key in materialised) == ["category_map", "oxford_flowers"]
    assert {json.dumps(["category_map"]), json.dumps(["oxford_flowers"])} <= set(known_assets)
    assert not [p for p in postgres_home.rglob("*") if p.suffix in {".db", ".sqlite"}]
