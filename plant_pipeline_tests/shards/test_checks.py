"""The flower_shards checks on damaged shards: each fails naming the damage (never raises), and a failed
integrity or leakage check stops the assets downstream in the same run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
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
from plant_pipeline.ml import shards as core
from plant_pipeline.ml.data.categories import write_category_map
from plant_pipeline.ml.data.manifest import write_manifest
from plant_pipeline.ml.shards.build import ShardConfig, build_shards
from plant_pipeline.ml.shards.checks import (
    CheckOutcome,
    check_class_coverage,
    check_exactness,
    check_integrity,
    check_no_leakage,
    check_quarantine_rate,
)
from plant_pipeline.ml.shards.format import INDEX_FILE
from plant_pipeline.ml.shards.reader import read_samples
from plant_pipeline.ml.shards.tar import closed_size
from plant_pipeline.ml.testing import tar_sample
from plant_pipeline_tests.shards.flower_folder import CATEGORIES, NAMES, make_flower_folder


@pytest.fixture(scope="module")
def built_dir(flowers, built):
    """(dataset root, manifest, shards folder) of the awkward folder's build: 12 stored, 4 quarantined."""
    root, manifest = flowers
    return root, manifest, built.out_dir


def _all_checks(shards_dir: Path, root: Path, manifest, model_dir: Path) -> dict:
    return {
        "integrity": check_integrity(shards_dir, manifest),
        "coverage": check_class_coverage(shards_dir, len(NAMES)),
        "leakage": check_no_leakage(shards_dir),
        "exactness": check_exactness(shards_dir, root, str(model_dir), sample_size=100),
        "quarantine": check_quarantine_rate(shards_dir, max_fraction=0.5),
    }


def test_every_shard_reading_check_fails_naming_a_deleted_shard(built_dir, tiny_model_dir, tmp_path):
    root, manifest, out_dir = built_dir
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


def test_every_shard_reading_check_fails_naming_a_truncated_shard(built_dir, tiny_model_dir, tmp_path):
    root, manifest, out_dir = built_dir
    copy = Path(shutil.copytree(out_dir, tmp_path / "copy"))
    shard = copy / "train" / "train-00000.tar"
    shard.write_bytes(shard.read_bytes()[:5000])  # cut inside the first sample's pixels
    outcomes = _all_checks(copy, root, manifest, tiny_model_dir)
    for name in ("integrity", "coverage", "leakage", "exactness"):
        assert not outcomes[name].passed, name
        assert "train/train-00000.tar" in outcomes[name].description, (name, outcomes[name].description)


def test_every_check_fails_naming_a_missing_index(built_dir, tiny_model_dir, tmp_path):
    root, manifest, out_dir = built_dir
    copy = Path(shutil.copytree(out_dir, tmp_path / "copy"))
    (copy / INDEX_FILE).unlink()
    for name, outcome in _all_checks(copy, root, manifest, tiny_model_dir).items():
        assert not outcome.passed, name
        assert str(copy / INDEX_FILE) in outcome.description and "materialise flower_shards" in outcome.description


def test_quarantine_rate_lists_the_counts_threshold_and_reasons(built_dir):
    _, _, out_dir = built_dir
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
def test_quarantine_rate_rejects_a_threshold_outside_0_to_1(built_dir, max_fraction):
    with pytest.raises(ValueError, match="max_fraction must be between 0 and 1"):
        check_quarantine_rate(built_dir[2], max_fraction=max_fraction)


# --- checks on a good build, and on damaged copies of it ------------------------------------------------------------------------------------------


def test_checks_pass_on_a_good_build(built, flowers, tiny_model_dir):
    root, manifest = flowers
    outcomes = {
        "integrity": check_integrity(built.out_dir, manifest),
        "coverage": check_class_coverage(built.out_dir, len(NAMES)),
        "leakage": check_no_leakage(built.out_dir),
        "exactness": check_exactness(built.out_dir, root, str(tiny_model_dir), sample_size=100),
        "quarantine": check_quarantine_rate(built.out_dir, max_fraction=0.5),
    }
    assert all(isinstance(o, CheckOutcome) and o.passed for o in outcomes.values()), outcomes
    assert outcomes["exactness"].metadata["samples_checked"] == 12
    assert outcomes["exactness"].metadata["max_abs_diff"] == 0.0
    assert outcomes["integrity"].metadata["shards_checked"] == 6
    json.dumps([o.metadata for o in outcomes.values()])  # metadata must be plain JSON for the UI


def test_quarantine_rate_check_fails_above_the_threshold(built):
    outcome = check_quarantine_rate(built.out_dir, max_fraction=0.01)
    assert not outcome.passed and outcome.metadata["quarantined_fraction"]["train"] == pytest.approx(3 / 9)


def _rewrite_shard(path: Path, keep=lambda sample: True, change=lambda sample: sample) -> None:
    """Rewrite a shard through the writer's own tar layout, dropping or changing samples."""
    samples = [change(s) for s in read_samples(path) if keep(s)]
    data = b"".join(tar_sample(s) for s in samples)
    path.write_bytes(data + b"\0" * (closed_size(len(data)) - len(data)))


def test_integrity_fails_when_a_shard_is_corrupted_or_missing(built, flowers, tmp_path):
    _, manifest = flowers
    copy = Path(shutil.copytree(built.out_dir, tmp_path / "copy"))
    shard = copy / "train" / "train-00000.tar"
    data = bytearray(shard.read_bytes())
    data[3000:3010] = bytes(255 - b for b in data[3000:3010])  # inside the first sample's pixels
    shard.write_bytes(bytes(data))
    outcome = check_integrity(copy, manifest)
    assert not outcome.passed
    assert any("train/train-00000.tar: sha256" in p for p in outcome.metadata["problems"])
    (copy / "test" / "test-00001.tar").unlink()
    outcome = check_integrity(copy, manifest)
    assert any("test/test-00001.tar: missing" in p for p in outcome.metadata["problems"])
    assert any(p.startswith("test: expected 3 samples") for p in outcome.metadata["problems"])


def test_integrity_fails_when_the_manifest_has_rows_the_shards_lack(built, flowers):
    _, manifest = flowers
    extra = pd.concat([manifest, pd.DataFrame([{"image_id": 99, "path": "jpg/new.jpg", "label": 0,
                                                "split": "validation", "source": "oxford_flowers"}])])
    outcome = check_integrity(built.out_dir, extra)
    assert not outcome.passed and "missing ['image_00099']" in outcome.metadata["problems"][0]


def test_coverage_fails_when_a_class_is_deleted(built, tmp_path):
    copy = Path(shutil.copytree(built.out_dir, tmp_path / "copy"))
    for shard in (copy / "test").glob("*.tar"):
        _rewrite_shard(shard, keep=lambda s: s.meta["label"] != 2)
    outcome = check_class_coverage(copy, len(NAMES))
    assert not outcome.passed and outcome.metadata["missing"] == {"test": [2]}
    assert "test: 1" in outcome.description


def test_leakage_fails_when_one_image_is_in_two_splits(flowers, tiny_model_dir, tmp_path):
    root, manifest = flowers
    leaky = manifest[manifest["image_id"].isin([1, 10, 13])].copy()
    leaky.loc[leaky["image_id"] == 13, "path"] = "jpg/a1.jpg"  # the train image again, under another id
    out = tmp_path / "leaky"
    build_shards(leaky, root, str(tiny_model_dir), out, categories=CATEGORIES, config=ShardConfig(num_workers=1))
    outcome = check_no_leakage(out)
    assert not outcome.passed and outcome.metadata["num_leaks"] == 1
    assert outcome.metadata["leaks"][0]["samples"] == {"train": "image_00001", "test": "image_00013"}


def test_exactness_fails_when_stored_pixels_drift(built, flowers, tiny_model_dir, tmp_path):
    root, _ = flowers
    copy = Path(shutil.copytree(built.out_dir, tmp_path / "copy"))

    def brighten(sample):
        sample.pixels = np.minimum(sample.pixels.astype(np.int16) + 1, 255).astype(np.uint8)
        return sample

    _rewrite_shard(copy / "validation" / "validation-00000.tar", change=brighten)
    outcome = check_exactness(copy, root, str(tiny_model_dir), sample_size=100)
    assert not outcome.passed and outcome.metadata["max_abs_diff"] > 0
    assert any("pixel_values differ" in p for p in outcome.metadata["problems"])


# --- the Dagster layer ---------------------------------------------------------------------------------


@asset(deps=[flower_shards], description="Stands in for training: must not run on shards that failed integrity.")
def reads_shards() -> None:
    return None


def _resources(data_dir: Path, model_dir: Path) -> dict:
    return {"storage": PipelineStorage(data_dir=str(data_dir)),
            "model": ModelResource(model_name=str(model_dir), local_files_only=True)}


def _write_inputs(data_dir: Path, manifest) -> None:
    """What flower_shards reads: the manifest (labels as category ids) and the category map."""
    storage = PipelineStorage(data_dir=str(data_dir))
    write_manifest(manifest, storage.dataset_manifest_path)
    write_category_map(storage.category_map_path, CATEGORIES)


@pytest.fixture(scope="module")
def flipped_run(tmp_path_factory, tiny_model_dir):
    """flower_shards with one byte of a shard flipped right after it is written, then its checks and an
    asset downstream, in one run."""
    data = tmp_path_factory.mktemp("data")
    manifest = make_flower_folder(data)
    _write_inputs(data, manifest)
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


def test_integrity_and_leakage_are_the_blocking_checks():
    specs = {spec.name: spec for check in (shards_integrity, shards_class_coverage, shards_no_leakage,
                                           shards_exactness, shards_quarantine_rate) for spec in check.check_specs}
    assert {name for name, spec in specs.items() if spec.blocking} == {"shards_integrity", "shards_no_leakage"}


def test_failed_leakage_check_stops_the_assets_downstream(tmp_path, tiny_model_dir):
    # A test image that is a train image under another id: the shards are intact, so integrity passes.
    data = tmp_path / "data"
    manifest = make_flower_folder(data)
    manifest.loc[manifest["image_id"] == 13, "path"] = "jpg/a1.jpg"
    _write_inputs(data, manifest)
    result = materialize(
        [flower_shards, shards_integrity, shards_no_leakage, reads_shards],
        resources=_resources(data, tiny_model_dir), raise_on_error=False,
        run_config={"ops": {"flower_shards": {"config": {"num_workers": 1, "min_shards": 1}}}},
    )
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks["shards_integrity"].passed
    leakage = checks["shards_no_leakage"]
    assert not leakage.passed and leakage.severity == AssetCheckSeverity.ERROR
    assert leakage.metadata["num_leaks"].value == 1
    materialised = {e.asset_key for e in result.get_asset_materialization_events()}
    assert AssetKey("flower_shards") in materialised and AssetKey("reads_shards") not in materialised
    assert not result.success


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
