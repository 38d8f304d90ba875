"""Tests for the synthetic release: official layout and formats, reproducibility, idempotence, and
that its classes are told apart by simple colour features (a quick proxy for "a tiny ViT can learn it")."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from plant_pipeline.ml.data import demo_release
from plant_pipeline.ml.data.categories import NUM_CLASSES
from plant_pipeline.ml.data.demo_drawing import CLASS_DESIGNS, DemoDataError, describe_class, preview_grid
from plant_pipeline.ml.data.demo_release import make_demo_release

# Small enough to generate in about half a second; 2 training images a class feed the centroid test.
SMALL = dict(train_per_class=2, validation_per_class=1, test_per_class=1, image_size=48)
SMALL_N = NUM_CLASSES * 4


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> demo_release.DemoRelease:
    return make_demo_release(tmp_path_factory.mktemp("demo") / "release", **SMALL)


@pytest.fixture(scope="module")
def labels(release: demo_release.DemoRelease) -> np.ndarray:
    """0-based label of each image, indexed by image_id - 1."""
    return scipy.io.loadmat(release.paths["imagelabels.mat"])["labels"][0].astype(np.int64) - 1


@pytest.fixture(scope="module")
def split_ids(release: demo_release.DemoRelease) -> dict[str, np.ndarray]:
    setid = scipy.io.loadmat(release.paths["setid.mat"])
    return {name: setid[name][0].astype(np.int64) for name in ("trnid", "valid", "tstid")}


@pytest.fixture(scope="module")
def images(release: demo_release.DemoRelease) -> dict[int, np.ndarray]:
    with tarfile.open(release.paths["102flowers.tgz"]) as tar:
        return {
            int(member.name[len("jpg/image_") : -len(".jpg")]): np.asarray(
                Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
            )
            for member in tar.getmembers()
        }


def test_release_holds_exactly_the_official_files(release: demo_release.DemoRelease) -> None:
    names = {path.name for path in release.out_dir.iterdir()}
    assert names == {"102flowers.tgz", "imagelabels.mat", "setid.mat", "md5sums", "demo_params.json"}
    assert set(release.paths) == {"102flowers.tgz", "imagelabels.mat", "setid.mat", "md5sums"}
    assert release.num_images == SMALL_N
    assert not list(release.out_dir.parent.glob(".*partial*")), "the temporary folder was left behind"


def test_archive_members_are_numbered_regular_jpegs_with_fixed_metadata(
    release: demo_release.DemoRelease,
) -> None:
    raw = release.paths["102flowers.tgz"].read_bytes()
    assert raw[:2] == b"\x1f\x8b" and raw[4:8] == b"\0\0\0\0", "gzip header must carry mtime 0"
    with tarfile.open(release.paths["102flowers.tgz"], "r:gz") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [f"jpg/image_{i:05d}.jpg" for i in range(1, SMALL_N + 1)]
        assert all(m.isreg() for m in members)
        metadata = {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members}
        assert metadata == {(0, 0, 0, "", "", 0o644)}
        sizes = set()
        for member in members[:40]:
            image = Image.open(io.BytesIO(tar.extractfile(member).read()))
            assert image.format == "JPEG" and image.mode == "RGB"
            sizes.add(image.size)
    assert any(w != h for w, h in sizes), "some images must be non-square, like real photographs"
    size = SMALL["image_size"]
    assert all(min(w, h) >= 0.8 * size and max(w, h) <= 1.3 * size for w, h in sizes)


def test_mat_files_match_the_official_variables_dtypes_and_shapes(
    release: demo_release.DemoRelease, labels: np.ndarray
) -> None:
    label_mat = scipy.io.loadmat(release.paths["imagelabels.mat"])
    assert [k for k in label_mat if not k.startswith("__")] == ["labels"]
    assert label_mat["labels"].dtype == np.uint8 and label_mat["labels"].shape == (1, SMALL_N)
    assert labels.min() == 0 and labels.max() == NUM_CLASSES - 1
    setid = scipy.io.loadmat(release.paths["setid.mat"])
    assert sorted(k for k in setid if not k.startswith("__")) == ["trnid", "tstid", "valid"]
    expected = {"trnid": 2 * NUM_CLASSES, "valid": NUM_CLASSES, "tstid": NUM_CLASSES}
    for name, count in expected.items():
        assert setid[name].dtype == np.uint16 and setid[name].shape == (1, count), name


def test_md5sums_lists_the_true_hashes_in_md5sum_format(release: demo_release.DemoRelease) -> None:
    lines = release.paths["md5sums"].read_text().splitlines()
    assert [line.split("  ")[1] for line in lines] == ["102flowers.tgz", "imagelabels.mat", "setid.mat"]
    for line in lines:
        digest, name = line.split("  ")
        assert digest == hashlib.md5((release.out_dir / name).read_bytes()).hexdigest() == release.md5[name]


def test_splits_are_disjoint_cover_all_images_and_hold_every_class(
    labels: np.ndarray, split_ids: dict[str, np.ndarray]
) -> None:
    all_ids = np.concatenate(list(split_ids.values()))
    assert len(all_ids) == len(set(all_ids.tolist())) == SMALL_N
    assert set(all_ids.tolist()) == set(range(1, SMALL_N + 1))
    per_class = {"trnid": 2, "valid": 1, "tstid": 1}
    for name, ids in split_ids.items():
        counts = np.bincount(labels[ids - 1], minlength=NUM_CLASSES)
        assert (counts == per_class[name]).all(), name


def test_image_ids_are_shuffled_across_classes_and_splits(
    labels: np.ndarray, split_ids: dict[str, np.ndarray]
) -> None:
    assert (np.diff(labels) != 0).mean() > 0.9, "consecutive ids should rarely share a class"
    train = split_ids["trnid"]
    assert train.max() - train.min() + 1 > len(train), "train ids should not be one contiguous block"


def test_same_parameters_give_byte_identical_files_and_another_seed_does_not(
    release: demo_release.DemoRelease, tmp_path: Path
) -> None:
    again = make_demo_release(tmp_path / "again", **SMALL)
    for name in ("102flowers.tgz", "imagelabels.mat", "setid.mat", "md5sums"):
        assert again.paths[name].read_bytes() == release.paths[name].read_bytes(), name
    other = make_demo_release(tmp_path / "other", **{**SMALL, "seed": 1})
    assert other.md5["102flowers.tgz"] != release.md5["102flowers.tgz"]


def test_second_call_returns_the_release_without_rewriting(tmp_path: Path) -> None:
    params = dict(train_per_class=1, validation_per_class=1, test_per_class=1, image_size=32)
    first = make_demo_release(tmp_path / "r", **params)
    stamps = {name: path.stat().st_mtime_ns for name, path in first.paths.items()}
    second = make_demo_release(tmp_path / "r", **params)
    assert second == first
    assert {name: path.stat().st_mtime_ns for name, path in second.paths.items()} == stamps


def test_changed_parameters_or_a_damaged_file_regenerate(tmp_path: Path) -> None:
    params = dict(train_per_class=1, validation_per_class=1, test_per_class=1, image_size=32)
    out = tmp_path / "r"
    out.mkdir()
    (out / "notes.txt").write_text("not ours")  # a foreign file must survive regeneration
    first = make_demo_release(out, **params)
    bigger = make_demo_release(out, **{**params, "train_per_class": 2})
    assert bigger.num_images == NUM_CLASSES * 4
    assert json.loads((out / "demo_params.json").read_text())["params"]["train_per_class"] == 2
    (out / "setid.mat").write_bytes(b"damaged")
    repaired = make_demo_release(out, **{**params, "train_per_class": 2})
    assert repaired.md5 == bigger.md5 != first.md5
    assert hashlib.md5((out / "setid.mat").read_bytes()).hexdigest() == repaired.md5["setid.mat"]
    assert (out / "notes.txt").read_text() == "not ours"


def test_a_failed_generation_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(scipy.io, "savemat", fail)
    with pytest.raises(OSError, match="disk full"):
        make_demo_release(
            tmp_path / "r", train_per_class=1, validation_per_class=1, test_per_class=1, image_size=32
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"test_per_class": 0}, "test_per_class must be >= 1"),
        ({"image_size": 8}, "image_size must be >= 16"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"train_per_class": 700}, "exceed the 65535"),
    ],
)
def test_bad_parameters_are_rejected_before_writing(tmp_path: Path, overrides: dict, message: str) -> None:
    with pytest.raises(DemoDataError, match=message):
        make_demo_release(tmp_path / "r", **{**SMALL, **overrides})
    assert not (tmp_path / "r").exists()


def test_each_class_has_a_unique_design_and_both_colour_factors_alone_identify_it() -> None:
    designs = [describe_class(label) for label in range(NUM_CLASSES)]
    assert [d["label"] for d in designs] == list(range(NUM_CLASSES))
    assert len({(d["petal_colour"], d["centre_colour"]) for d in designs}) == NUM_CLASSES
    # The centre colour determines the form, so count and shape never contradict the colours.
    forms = {(d["petal_count"], d["petal_shape"], d["centre_colour"]) for d in designs}
    assert len({d["centre_colour"] for d in designs}) == len(forms) == 6
    assert {d["petal_count"] for d in designs} >= {3, 4, 5, 6, 8}
    assert CLASS_DESIGNS[0].category_name == "pink primrose"
    with pytest.raises(DemoDataError, match="0..101"):
        describe_class(NUM_CLASSES)


def _colour_histogram(pixels: np.ndarray, levels: int = 4, keep: float = 0.4) -> np.ndarray:
    """A coarse RGB histogram of the central square, where the flower is; sqrt for a Hellinger distance."""
    h, w, _ = pixels.shape
    side = int(min(h, w) * keep)
    top, left = (h - side) // 2, (w - side) // 2
    quantised = pixels[top : top + side, left : left + side].reshape(-1, 3).astype(np.int64) * levels // 256
    bins = (quantised[:, 0] * levels + quantised[:, 1]) * levels + quantised[:, 2]
    hist = np.bincount(bins, minlength=levels**3).astype(np.float64)
    return np.sqrt(hist / hist.sum())


def test_nearest_colour_centroid_tells_the_102_classes_apart(
    images: dict[int, np.ndarray], labels: np.ndarray, split_ids: dict[str, np.ndarray]
) -> None:
    features = {image_id: _colour_histogram(pixels) for image_id, pixels in images.items()}
    centroids = np.zeros((NUM_CLASSES, len(features[1])))
    for image_id in split_ids["trnid"]:
        centroids[labels[image_id - 1]] += features[image_id] / 2
    held_out = np.concatenate([split_ids["valid"], split_ids["tstid"]])
    predicted = [np.argmin(((centroids - features[i]) ** 2).sum(axis=1)) for i in held_out]
    accuracy = float(np.mean(np.array(predicted) == labels[held_out - 1]))
    assert accuracy >= 0.9, f"colour nearest-centroid accuracy {accuracy:.3f} on held-out images"


def test_preview_grid_has_a_cell_per_class(tmp_path: Path) -> None:
    grid = preview_grid(image_size=48, cell=40)
    grid.save(tmp_path / "preview.png")
    assert Image.open(tmp_path / "preview.png").size == (17 * 40, 6 * 40)
    pixels = np.asarray(grid)
    # Every cell holds a drawing, not the white sheet.
    cells = pixels.reshape(6, 40, 17, 40, 3).std(axis=(1, 3, 4))
    assert (cells > 20).all()


def test_cli_writes_the_release_and_reports_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(tmp_path / "cli"), "--train-per-class", "1", "--validation-per-class", "1",
            "--test-per-class", "1", "--image-size", "32"]
    assert demo_release.main(argv) == 0
    out = capsys.readouterr().out
    assert f"{NUM_CLASSES * 3} images" in out and "102flowers.tgz" in out and "setid.mat" in out
    assert (tmp_path / "cli" / "md5sums").is_file()
    assert demo_release.main([str(tmp_path / "bad"), "--test-per-class", "0"]) == 2
