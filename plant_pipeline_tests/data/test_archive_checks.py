"""safe_extract_tgz on archives that are malformed rather than hostile: duplicate or clashing member
names, Windows separators, a missing ``jpg/`` folder, and size caps (a decompression bomb)."""

from __future__ import annotations

import gzip
import io
import random
import tarfile
from pathlib import Path

import pytest

from plant_pipeline.ml.data import archive as archive_module
from plant_pipeline.ml.data.archive import ArchiveError, ExtractLimits, safe_extract_tgz
from plant_pipeline_tests.data.archives import good_members, make_tgz, tar_file, tar_folder


def _assert_nothing_extracted(root: Path) -> None:
    assert not root.exists() or list(root.iterdir()) == []


# -- duplicate and clashing names -----------------------------------------------------------------
@pytest.mark.parametrize(
    "second", ["jpg/image_00002.jpg", "./jpg/image_00002.jpg", "jpg//image_00002.jpg"],
    ids=["same-name", "dot-prefix", "double-slash"],
)
def test_a_member_listed_twice_is_refused_rather_than_the_last_one_winning(tmp_path, second) -> None:
    archive = make_tgz(tmp_path / "dup.tgz", good_members() + [tar_file(second, b"second copy")])
    root = tmp_path / "root"
    with pytest.raises(ArchiveError) as info:
        safe_extract_tgz(archive, root)
    message = str(info.value)
    assert "dup.tgz" in message and "jpg/image_00002.jpg" in message
    assert "2 times" in message and "repack" in message
    _assert_nothing_extracted(root)


@pytest.mark.parametrize("file_first", [True, False], ids=["file-then-folder", "folder-then-file"])
def test_a_regular_file_named_jpg_beside_the_jpg_folder_is_a_clear_archive_error(tmp_path, file_first) -> None:
    clash = tar_file("jpg", b"not a folder")
    members = [clash] + good_members() if file_first else good_members() + [clash]
    archive = make_tgz(tmp_path / "clash.tgz", members)
    root = tmp_path / "root"
    with pytest.raises(ArchiveError) as info:
        safe_extract_tgz(archive, root)
    message = str(info.value)
    assert "clash.tgz" in message and "'jpg'" in message and "regular file" in message and "folder" in message
    assert ".extracting" not in message  # not the hidden temporary folder's name
    _assert_nothing_extracted(root)


def test_a_regular_file_named_jpg_and_nothing_else_says_the_folder_is_missing(tmp_path) -> None:
    archive = make_tgz(tmp_path / "flat.tgz", [tar_file("jpg", b"x" * 100)])
    with pytest.raises(ArchiveError, match=r"flat\.tgz.*no regular files under jpg/.*found: jpg \(a file\)"):
        safe_extract_tgz(archive, tmp_path / "root")


# -- backslashes: normalised to folder separators -------------------------------------------------
def test_backslash_member_names_are_extracted_as_folders_and_skipped_on_rerun(tmp_path, monkeypatch) -> None:
    members = [tar_file(f"jpg\\image_{i:05d}.jpg", bytes([i]) * 500) for i in (1, 2)]
    archive = make_tgz(tmp_path / "win.tgz", members)
    root = tmp_path / "root"
    files = safe_extract_tgz(archive, root)
    assert files == [root / "jpg" / "image_00001.jpg", root / "jpg" / "image_00002.jpg"]
    assert (root / "jpg" / "image_00002.jpg").read_bytes() == b"\x02" * 500
    assert sorted(p.name for p in root.iterdir()) == [archive_module.EXTRACT_MARKER, "jpg"]

    def no_open(*args, **kwargs):
        raise AssertionError("an archive extracted once must not be extracted again")

    monkeypatch.setattr(archive_module.tarfile, "open", no_open)
    assert safe_extract_tgz(archive, root) == files


def test_a_backslash_name_that_repeats_a_slash_name_is_a_duplicate(tmp_path) -> None:
    members = good_members() + [tar_file("jpg\\image_00001.jpg", b"other")]
    with pytest.raises(ArchiveError, match=r"jpg/image_00001\.jpg.*2 times"):
        safe_extract_tgz(make_tgz(tmp_path / "mixed.tgz", members), tmp_path / "root")


# -- the release's jpg/ folder ----------------------------------------------------------------------
def test_an_archive_without_a_jpg_folder_says_so_and_lists_what_it_holds(tmp_path) -> None:
    members = [tar_folder("102flowers"), tar_file("102flowers/jpg/image_00001.jpg", b"x" * 100),
               tar_file("README", b"r")]
    archive = make_tgz(tmp_path / "nested.tgz", members)
    root = tmp_path / "root"
    with pytest.raises(ArchiveError) as info:
        safe_extract_tgz(archive, root)
    message = str(info.value)
    assert "nested.tgz" in message and "no regular files under jpg/" in message
    assert "102flowers/ (a folder), README (a file)" in message
    _assert_nothing_extracted(root)


def test_another_image_folder_can_be_asked_for(tmp_path) -> None:
    archive = make_tgz(tmp_path / "png.tgz", [tar_file("png/image_00001.png", b"p" * 100)])
    assert safe_extract_tgz(archive, tmp_path / "root", expect_folder="png") == [tmp_path / "root/png/image_00001.png"]


# -- size caps ------------------------------------------------------------------------------------------
def _zeros_tgz(path: Path, n_files: int, file_size: int) -> Path:
    """A decompression bomb in miniature: zeros compress about 1000:1."""
    return make_tgz(path, [tar_file(f"jpg/image_{i:05d}.jpg", bytes(file_size)) for i in range(1, n_files + 1)])


def test_default_limits_refuse_a_highly_compressed_archive_before_writing(tmp_path, monkeypatch) -> None:
    archive = _zeros_tgz(tmp_path / "bomb.tgz", n_files=20, file_size=4 << 20)  # 80 MiB from ~80 kB
    compressed = archive.stat().st_size
    assert compressed < 200_000
    opened: list[str] = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    root = tmp_path / "root"
    with pytest.raises(ArchiveError) as info:
        safe_extract_tgz(archive, root)
    message = str(info.value)
    assert "bomb.tgz" in message and "compression ratio" in message and "max_compression_ratio" in message
    assert not [f for f in opened if str(root) in f and ".extracting" in f]  # refused from the headers
    _assert_nothing_extracted(root)


def test_a_lowered_total_cap_refuses_the_archive_naming_sizes_and_the_knob(tmp_path) -> None:
    rng = random.Random(3)
    members = [tar_file(f"jpg/image_{i:05d}.jpg", rng.randbytes(100_000)) for i in range(1, 4)]
    archive = make_tgz(tmp_path / "big.tgz", members)
    root = tmp_path / "root"
    with pytest.raises(ArchiveError) as info:
        safe_extract_tgz(archive, root, limits=ExtractLimits(max_total_bytes=250_000))
    message = str(info.value)
    assert "big.tgz" in message and "jpg/image_00003.jpg" in message
    assert "300000" in message.replace(",", "") and "250000" in message.replace(",", "")
    assert "max_extracted_gib" in message
    _assert_nothing_extracted(root)
    # The same archive passes under a cap just above it.
    assert len(safe_extract_tgz(archive, root, limits=ExtractLimits(max_total_bytes=300_000))) == 3


def test_the_caps_are_enforced_while_writing_when_headers_understate_the_size(tmp_path, monkeypatch) -> None:
    rng = random.Random(4)
    members = [tar_file(f"jpg/image_{i:05d}.jpg", rng.randbytes(100_000)) for i in range(1, 4)]
    archive = make_tgz(tmp_path / "lying.tgz", members)
    # Let the header check see only a tenth of each size, as a header that lies about a member would.
    real_sizes = archive_module.header_size
    monkeypatch.setattr(archive_module, "header_size", lambda member: real_sizes(member) // 10)
    root = tmp_path / "root"
    with pytest.raises(ArchiveError, match=r"lying\.tgz.*while writing.*250,000"):
        safe_extract_tgz(archive, root, limits=ExtractLimits(max_total_bytes=250_000))
    _assert_nothing_extracted(root)


def test_the_member_count_is_capped(tmp_path) -> None:
    archive = make_tgz(tmp_path / "many.tgz", [tar_file(f"jpg/image_{i:05d}.jpg", b"x") for i in range(1, 12)])
    with pytest.raises(ArchiveError, match=r"many\.tgz.*more than 10 members"):
        safe_extract_tgz(archive, tmp_path / "root", limits=ExtractLimits(max_members=10))


def test_small_archives_that_compress_well_are_not_mistaken_for_bombs(tmp_path) -> None:
    # 3 MiB of zeros (ratio ~1000) stays below ratio_free_bytes: demo and test archives like it are fine.
    archive = _zeros_tgz(tmp_path / "small.tgz", n_files=3, file_size=1 << 20)
    assert len(safe_extract_tgz(archive, tmp_path / "root")) == 3


@pytest.mark.parametrize(
    "kwargs", [{"max_total_bytes": 0}, {"max_ratio": 0.5}, {"max_members": 0}, {"ratio_free_bytes": -1}]
)
def test_extract_limits_refuse_nonsense(kwargs) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ExtractLimits(**kwargs)


def test_default_limits_leave_the_real_archive_far_inside() -> None:
    limits = ExtractLimits()
    real_compressed, real_members = 344_862_509, 8_190  # 102flowers.tgz: 8,189 JPEGs and jpg/
    assert limits.max_total_bytes >= 5 * real_compressed  # JPEGs do not compress: extracted ~ compressed
    assert limits.max_ratio >= 10 and limits.max_members >= 10 * real_members


def test_gzip_wrapped_tar_written_by_hand_still_extracts(tmp_path) -> None:
    # A plain tar inside gzip, as `tar czf` writes it (no folder entries), goes through unchanged.
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for i in (1, 2):
            info, data = tar_file(f"jpg/image_{i:05d}.jpg", bytes([i]) * 10)
            tar.addfile(info, io.BytesIO(data))
    archive = tmp_path / "plain.tgz"
    archive.write_bytes(gzip.compress(raw.getvalue()))
    files = safe_extract_tgz(archive, tmp_path / "root")
    assert [f.read_bytes() for f in files] == [b"\x01" * 10, b"\x02" * 10]
