"""The flower_shards checks on damaged shards: each fails naming the damage (never raises), and a failed
integrity check stops the assets downstream in the same run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from dagster import AssetCheckSeverity, AssetKey, asset, materialize

from plant_pipeline.defs.assets import shards as shard_assets
from plant_pipeline.defs.assets.shards import (
    QuarantineRateConfig,
    flower_shards,
    shards_class_coverage,
    shards_exactness,
    shards_integrity,
    shards_no_leakage,
    shards_quarantine_rate,
)
from plant_pipeline.defs.resources import ModelResource, PipelineStorage
from plant_pipeline.ml.data.manifest import write_manifest
from plant_pipeline.ml.shards import build as core
from plant_pipeline.ml.shards.checks import (
    check_class_coverage,
    check_exactness,
    check_integrity,
    check_no_leakage,
    check_quarantine_rate,
)
from plant_pipeline.ml.shards.format import INDEX_FILE
from plant_pipeline_tests.shards.test_shards import NAMES, make_flower_folder


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir):
    """The awkward test folder (12 stored, 4 quarantined) built into two shards per split."""
    root = tmp_path_factory.mktemp("flowers")
    manifest = make_flower_folder(root)
    result = core.build_shards(manifest, root, str(tiny_model_dir), tmp_path_factory.mktemp("shards"),
                               config=core.ShardConfig(num_workers=1, min_shards=2), names=NAMES)
    return root, manifest, result.out_dir


def _all_checks(shards_dir: Path, root: Path, manifest, model_dir: Path) -> dict:
    return {
        "integrity": check_integrity(shards_dir, manifest),
        "coverage": check_class_coverage(shards_dir, len(NAMES)),
        "leakage": check_no_leakage(shards_dir),
        "exactness": check_exactness(shards_dir, root, str(model_dir), sample_size=100),
        "quarantine": check_quarantine_rate(shards_dir, max_fraction=0.5),
    }


def test_every_shard_reading_check_fails_naming_a_deleted_shard(built, tiny_model_dir, tmp_path):
    root, manifest, out_dir = built
    copy = Path(shutil.copytree(out_dir, tmp_path / "copy"))
    (copy / "validation" / "validation-00001.tar").unlink()
    outcomes = _all_checks(copy, root, manifest, tiny_model_dir)
    for name in ("integrity", "coverage", "leakage", "exactness"):
        outcome = outcomes[name]
        assert not outcome.passed, name
        assert "validation/validation-00001.tar: missing" in json.dumps(outcome.metadata), (name, outcome.metadata)
        assert "validation/validation-00001.tar" in outcome.description, (name, outcome.description)
    # The quarantine rate is read from the index alone: a missing shard does not change it.
    assert outcomes["quarantine"].passed
    assert outcomes["exactness"].metadata["samples_checked"] == 10  # the 2 samples of the deleted shard are not
    json.dumps([o.metadata for o in outcomes.values()])


def test_every_shard_reading_check_fails_naming_a_truncated_shard(built, tiny_model_dir, tmp_path):
    root, manifest, out_dir = built
    copy = Path(shutil.copytree(out_dir, tmp_path / "copy"))
    shard = copy / "train" / "train-00000.tar"
    shard.write_bytes(shard.read_bytes()[:5000])  # cut inside the first sample's pixels
    outcomes = _all_checks(copy, root, manifest, tiny_model_dir)
    for name in ("integrity", "coverage", "leakage", "exactness"):
        assert not outcomes[name].passed, name
        assert "train/train-00000.tar" in outcomes[name].description, (name, outcomes[name].description)


def test_every_check_fails_naming_a_missing_index(built, tiny_model_dir, tmp_path):
    root, manifest, out_dir = built
    copy = Path(shutil.copytree(out_dir, tmp_path / "copy"))
    (copy / INDEX_FILE).unlink()
    for name, outcome in _all_checks(copy, root, manifest, tiny_model_dir).items():
        assert not outcome.passed, name
        assert str(copy / INDEX_FILE) in outcome.description and "materialise flower_shards" in outcome.description


def test_quarantine_rate_lists_the_counts_threshold_and_reasons(built):
    _, _, out_dir = built
    outcome = check_quarantine_rate(out_dir, max_fraction=0.2)
    assert not outcome.passed and "train 33.3%" in outcome.description and "test 25.0%" in outcome.description
    meta = outcome.metadata
    assert meta["max_fraction"] == 0.2
    assert meta["quarantined"] == {"train": 3, "validation": 0, "test": 1}
    assert meta["quarantined_fraction"]["validation"] == 0.0
    assert {q["path"] for q in meta["examples"]} == {"jpg/a7_corrupt.jpg", "jpg/a8_missing.jpg",
                                                      "jpg/a9_truncated.jpg", "png/c16_text.png"}
    assert check_quarantine_rate(out_dir, max_fraction=0.34).passed


@pytest.mark.parametrize("max_fraction", [-0.1, 1.5])
def test_quarantine_rate_rejects_a_threshold_outside_0_to_1(built, max_fraction):
    with pytest.raises(ValueError, match="max_fraction must be between 0 and 1"):
        check_quarantine_rate(built[2], max_fraction=max_fraction)


# --- the Dagster layer ---------------------------------------------------------------------------------


@asset(deps=[flower_shards], description="Stands in for training: must not run on shards that failed integrity.")
def reads_shards() -> None:
    return None


def _resources(data_dir: Path, model_dir: Path) -> dict:
    return {"storage": PipelineStorage(data_dir=str(data_dir)),
            "model": ModelResource(model_name=str(model_dir), local_files_only=True)}


@pytest.fixture(scope="module")
def flipped_run(tmp_path_factory, tiny_model_dir):
    """flower_shards with one byte of a shard flipped right after it is written, then its checks and an
    asset downstream, in one run."""
    data = tmp_path_factory.mktemp("data")
    manifest = make_flower_folder(data)
    write_manifest(manifest, PipelineStorage(data_dir=str(data)).manifest_path)
    build = core.build_shards

    def build_then_flip(*args, **kwargs):
        result = build(*args, **kwargs)
        shard = result.out_dir / "train" / "train-00000.tar"
        data = bytearray(shard.read_bytes())
        data[3000] ^= 0xFF  # a pixel of the first sample: same size, only the sha256 can tell
        shard.write_bytes(bytes(data))
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(shard_assets.core, "build_shards", build_then_flip)
        result = materialize(
            [flower_shards, shards_integrity, shards_quarantine_rate, reads_shards],
            resources=_resources(data, tiny_model_dir), raise_on_error=False,
            run_config={"ops": {"flower_shards": {"config": {"num_workers": 1, "min_shards": 1}}}},
        )
    return data, result


def test_failed_integrity_stops_the_assets_downstream(flipped_run):
    _, result = flipped_run
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    integrity = checks["shards_integrity"]
    assert not integrity.passed and integrity.severity == AssetCheckSeverity.ERROR
    assert any("train/train-00000.tar: sha256" in p for p in integrity.metadata["problems"].value)
    materialised = {e.asset_key for e in result.get_asset_materialization_events()}
    assert AssetKey("flower_shards") in materialised and AssetKey("reads_shards") not in materialised
    assert not result.success


def test_integrity_is_the_one_blocking_check():
    specs = {spec.name: spec for check in (shards_integrity, shards_class_coverage, shards_no_leakage,
                                           shards_exactness, shards_quarantine_rate) for spec in check.check_specs}
    assert {name for name, spec in specs.items() if spec.blocking} == {"shards_integrity"}


def test_quarantine_rate_is_an_asset_check_that_warns_by_default(flipped_run):
    _, result = flipped_run
    quarantine = {c.check_name: c for c in result.get_asset_check_evaluations()}["shards_quarantine_rate"]
    assert not quarantine.passed and quarantine.severity == AssetCheckSeverity.WARN
    assert quarantine.metadata["quarantined"].value == {"train": 3, "validation": 0, "test": 1}
    assert quarantine.metadata["max_fraction"].value == 0.01


def test_quarantine_rate_severity_and_threshold_are_configurable(flipped_run, tiny_model_dir):
    data, _ = flipped_run
    resources = _resources(data, tiny_model_dir)
    strict = shards_quarantine_rate(config=QuarantineRateConfig(severity="ERROR"), **resources)
    assert not strict.passed and strict.severity == AssetCheckSeverity.ERROR
    assert shards_quarantine_rate(config=QuarantineRateConfig(max_fraction=0.5), **resources).passed
    with pytest.raises(ValueError, match="severity must be WARN or ERROR"):
        shards_quarantine_rate(config=QuarantineRateConfig(severity="loud"), **resources)


def test_checks_fail_instead_of_raising_when_a_shard_is_gone(flipped_run, tiny_model_dir, tmp_path):
    data = Path(shutil.copytree(flipped_run[0], tmp_path / "data"))
    resources = _resources(data, tiny_model_dir)
    shards_dir = resources["storage"].shards_dir(resources["model"].spec(resources["storage"]).slug)
    (shards_dir / "test" / "test-00000.tar").unlink()
    for check in (shards_integrity, shards_class_coverage, shards_no_leakage, shards_exactness):
        outcome = check(**resources)
        assert not outcome.passed and "test/test-00000.tar" in outcome.description, check
