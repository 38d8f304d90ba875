"""Tests for plant_pipeline.ml.data.archive: safe, idempotent extraction of hostile and damaged archives.
Malformed-but-harmless archives (duplicates, Windows names, size caps) are in test_archive_checks.py."""

from __future__ import annotations

import json
import random
import tarfile
from pathlib import Path

import pytest

from plant_pipeline.ml.data import archive as archive_module
from plant_pipeline.ml.data.archive import ArchiveError, UnsafeArchiveError, safe_extract_tgz
from plant_pipeline.ml.data.download import md5sum
from plant_pipeline_tests.data.archives import good_members, make_tgz, tar_file, tar_special


def test_extract_moves_files_in_keeps_other_content_and_skips_on_rerun(tmp_path, monkeypatch) -> None:
    archive = make_tgz(tmp_path / "a.tgz", good_members())
    root = tmp_path / "root"
    (root / "downloads").mkdir(parents=True)
    (root / "downloads" / "keep.txt").write_text("keep")

    files = safe_extract_tgz(archive, root)
    assert files == [root / f"jpg/image_0000{i}.jpg" for i in (1, 2, 3)]
    assert (root / "jpg/image_00002.jpg").read_bytes() == b"A" * 1000 + b"\x02"
    assert (root / "downloads" / "keep.txt").read_text() == "keep"
    assert json.loads((root / archive_module.EXTRACT_MARKER).read_text())["md5"] == md5sum(archive)
    assert sorted(p.name for p in root.iterdir()) == [archive_module.EXTRACT_MARKER, "downloads", "jpg"]

    def no_open(*args, **kwargs):
        raise AssertionError("a re-run with the same archive must not open it")

    monkeypatch.setattr(archive_module.tarfile, "open", no_open)
    assert safe_extract_tgz(archive, root) == files


def test_extract_redoes_work_for_a_new_archive_or_missing_files(tmp_path) -> None:
    root = tmp_path / "root"
    safe_extract_tgz(make_tgz(tmp_path / "a.tgz", good_members(b"A", 3)), root)
    newer = make_tgz(tmp_path / "b.tgz", good_members(b"B", 2))
    files = safe_extract_tgz(newer, root)
    # The archive's jpg/ replaces the old one: no stale image_00003 from the first archive.
    assert sorted(p.name for p in (root / "jpg").iterdir()) == ["image_00001.jpg", "image_00002.jpg"]
    assert files[0].read_bytes().startswith(b"B")
    files[1].unlink()
    assert safe_extract_tgz(newer, root) == files and files[1].is_file()


@pytest.mark.parametrize(
    "member",
    [
        tar_file("../evil.txt", b"x"),
        tar_file("jpg/../../evil.txt", b"x"),
        tar_file("/tmp/plant_pipeline_evil.txt", b"x"),
        tar_special("jpg/link.jpg", tarfile.SYMTYPE, "/etc/passwd"),
        tar_special("jpg/hard.jpg", tarfile.LNKTYPE, "jpg/image_00001.jpg"),
        tar_special("jpg/dev", tarfile.CHRTYPE),
        tar_special("jpg/fifo", tarfile.FIFOTYPE),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink", "device", "fifo"],
)
def test_unsafe_member_is_refused_and_nothing_is_left(tmp_path, member) -> None:
    archive = make_tgz(tmp_path / "bad.tgz", good_members() + [member])
    root = tmp_path / "a" / "root"
    with pytest.raises(UnsafeArchiveError) as info:
        safe_extract_tgz(archive, root)
    assert "bad.tgz" in str(info.value) and member[0].name in str(info.value)
    # The good members extracted before the bad one were rolled back, and nothing escaped.
    assert list(root.iterdir()) == []
    assert not (tmp_path / "a" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert not Path("/tmp/plant_pipeline_evil.txt").exists()


@pytest.mark.parametrize("damage", ["truncated", "flipped", "not-gzip"])
def test_corrupt_archive_gives_a_clear_error_and_extracts_nothing(tmp_path, damage) -> None:
    rng = random.Random(2)
    members = [tar_file(f"jpg/image_{i:05d}.jpg", rng.randbytes(30_000)) for i in range(1, 6)]
    archive = make_tgz(tmp_path / "flowers.tgz", members)
    data = bytearray(archive.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "flipped":
        for i in range(len(data) // 2, len(data) // 2 + 64):
            data[i] ^= 0xFF
    else:
        data = bytearray(b"<html>not found</html>" * 100)
    archive.write_bytes(bytes(data))
    root = tmp_path / "root"
    with pytest.raises(ArchiveError, match="flowers.tgz"):
        safe_extract_tgz(archive, root)
    assert list(root.iterdir()) == []


def test_a_move_in_that_fails_leaves_no_marker_so_the_next_run_extracts_again(tmp_path, monkeypatch) -> None:
    root = tmp_path / "root"
    safe_extract_tgz(make_tgz(tmp_path / "a.tgz", good_members(b"A", 2) + [tar_file("README", b"a")]), root)
    newer = make_tgz(tmp_path / "b.tgz", good_members(b"B", 2) + [tar_file("README", b"b")])
    real_replace = archive_module.replace_folder

    def fail_on_jpg(staged: Path, final: Path) -> Path:
        if Path(final).name == "jpg":
            raise OSError("disk full")
        return real_replace(staged, final)

    monkeypatch.setattr(archive_module, "replace_folder", fail_on_jpg)
    with pytest.raises(OSError, match="disk full"):
        safe_extract_tgz(newer, root)
    # README (sorted first) was replaced, jpg/ was not: without a marker this mix is never taken as done.
    assert (root / "README").read_bytes() == b"b"
    assert (root / "jpg" / "image_00001.jpg").read_bytes().startswith(b"A")
    assert not (root / archive_module.EXTRACT_MARKER).exists()

    monkeypatch.undo()
    files = safe_extract_tgz(newer, root)
    assert (root / "jpg" / "image_00001.jpg").read_bytes().startswith(b"B")
    assert json.loads((root / archive_module.EXTRACT_MARKER).read_text())["md5"] == md5sum(newer)
    # Nothing is left aside: the old jpg/ and README are gone.
    assert sorted(p.name for p in root.iterdir()) == [archive_module.EXTRACT_MARKER, "README", "jpg"]
    assert len(files) == 3
