"""Tests for plant_pipeline.ml.data.download: resumable, retried, verified downloads (extraction: test_archive.py).

Network tests talk to a LoopbackServer on 127.0.0.1; the end-to-end tests serve the real mini mirror
from the shared datasets folder.
"""

from __future__ import annotations

import random
import shutil
import tarfile
from pathlib import Path

import pandas as pd
import pytest

from plant_pipeline.ml.data.archive import safe_extract_tgz
from plant_pipeline.ml.data.download import (
    OFFICIAL_MD5,
    RELEASE_FILES,
    ChecksumError,
    DownloadError,
    MirrorChecksumError,
    ReleaseSourceError,
    download_file,
    fetch_md5sums,
    fetch_release,
    md5sum,
    parse_md5sums,
    source_cache_dir,
)
from plant_pipeline.ml.data.manifest import summarize_manifest
from plant_pipeline.ml.data.oxford import build_manifest
from plant_pipeline.ml.errors import UsageError
from plant_pipeline_tests.data.archives import make_tgz, tar_file
from plant_pipeline_tests.http_server import LoopbackServer, free_port

BLOB_SIZE = 300_000
FAST = {"backoff_s": 0.01, "timeout_s": 10}


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A folder with one 300 kB file of random bytes, to be served."""
    root = tmp_path / "site"
    root.mkdir()
    (root / "blob.bin").write_bytes(random.Random(0).randbytes(BLOB_SIZE))
    return root


@pytest.fixture
def server(site: Path):
    with LoopbackServer(site) as srv:
        yield srv


def _blob_md5(site: Path) -> str:
    return md5sum(site / "blob.bin")


# -- checksums ------------------------------------------------------------------------------------
def test_md5sum_matches_hashlib_and_parse_md5sums_reads_both_formats(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"abc")
    assert md5sum(tmp_path / "a") == "900150983cd24fb0d6963f7d28e17f72"
    text = (
        "# comment\n\n"
        "687C52EBE81BA6A4FE779A9F5DD0A4BA  102flowers.tgz\n"
        "43ff0dcf7f0919ccb7cfd2a34418b1df *imagelabels.mat\n"
    )
    assert parse_md5sums(text) == {
        "102flowers.tgz": "687c52ebe81ba6a4fe779a9f5dd0a4ba",
        "imagelabels.mat": "43ff0dcf7f0919ccb7cfd2a34418b1df",
    }
    with pytest.raises(ValueError, match="line 1"):
        parse_md5sums("not-a-hash  file\n")


# -- download_file ----------------------------------------------------------------------------------
def test_download_verifies_reports_progress_and_skips_a_good_file(tmp_path, site, server) -> None:
    dest = tmp_path / "out" / "blob.bin"
    calls: list[tuple[int, int | None]] = []
    result = download_file(
        server.url_for("blob.bin"), dest, _blob_md5(site), chunk_size=4096,
        progress=lambda done, total: calls.append((done, total)), **FAST,
    )
    assert (result.bytes_downloaded, result.skipped, result.resumed) == (BLOB_SIZE, False, False)
    assert dest.read_bytes() == (site / "blob.bin").read_bytes()
    assert not dest.with_name("blob.bin.partial").exists()
    # ~every 5%: a handful of calls, increasing, ending at the total.
    assert 10 <= len(calls) <= 22
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert calls[-1] == (BLOB_SIZE, BLOB_SIZE)

    again = download_file(server.url_for("blob.bin"), dest, _blob_md5(site), **FAST)
    assert (again.skipped, again.bytes_downloaded) == (True, 0)
    assert len(server.requests) == 1


def test_existing_file_with_wrong_md5_is_downloaded_again(tmp_path, site, server) -> None:
    dest = tmp_path / "blob.bin"
    dest.write_bytes(b"stale")
    result = download_file(server.url_for("blob.bin"), dest, _blob_md5(site), **FAST)
    assert not result.skipped
    assert md5sum(dest) == _blob_md5(site)


def test_md5_mismatch_names_file_and_both_checksums_and_keeps_nothing(tmp_path, site, server) -> None:
    dest = tmp_path / "blob.bin"
    wrong = "0" * 32
    with pytest.raises(ChecksumError) as info:
        download_file(server.url_for("blob.bin"), dest, wrong, **FAST)
    message = str(info.value)
    assert "blob.bin" in message and wrong in message and _blob_md5(site) in message
    assert not dest.exists()
    assert not dest.with_name("blob.bin.partial").exists()


def test_interrupted_download_is_resumed_with_a_range_request(tmp_path, site, server) -> None:
    cut = 120_000
    server.truncate_next("blob.bin", after_bytes=cut)
    dest = tmp_path / "blob.bin"
    result = download_file(server.url_for("blob.bin"), dest, _blob_md5(site), **FAST)
    first, second = server.requests
    assert (first.range, first.bytes_sent) == (None, cut)
    assert (second.range, second.status) == (f"bytes={cut}-", 206)
    # Resumed, not restarted: the file crossed the wire once.
    assert server.bytes_served("blob.bin") == BLOB_SIZE
    assert result.resumed and result.bytes_downloaded == BLOB_SIZE
    assert md5sum(dest) == _blob_md5(site)


def test_partial_file_from_an_earlier_run_is_continued(tmp_path, site, server) -> None:
    dest = tmp_path / "blob.bin"
    dest.with_name("blob.bin.partial").write_bytes((site / "blob.bin").read_bytes()[:100_000])
    result = download_file(server.url_for("blob.bin"), dest, _blob_md5(site), **FAST)
    assert [r.range for r in server.requests] == ["bytes=100000-"]
    assert result.resumed and result.bytes_downloaded == BLOB_SIZE - 100_000
    assert md5sum(dest) == _blob_md5(site)


def test_complete_partial_file_answered_416_is_only_verified(tmp_path, site, server) -> None:
    dest = tmp_path / "blob.bin"
    dest.with_name("blob.bin.partial").write_bytes((site / "blob.bin").read_bytes())
    result = download_file(server.url_for("blob.bin"), dest, _blob_md5(site), **FAST)
    assert [r.status for r in server.requests] == [416]
    assert result.bytes_downloaded == 0 and md5sum(dest) == _blob_md5(site)


def test_server_ignoring_range_restarts_from_zero(tmp_path, site) -> None:
    dest = tmp_path / "blob.bin"
    # A wrong prefix proves the partial is overwritten, not appended to.
    dest.with_name("blob.bin.partial").write_bytes(b"x" * 50_000)
    with LoopbackServer(site, honor_range=False) as srv:
        result = download_file(srv.url_for("blob.bin"), dest, _blob_md5(site), **FAST)
        assert [(r.range, r.status) for r in srv.requests] == [("bytes=50000-", 200)]
    assert not result.resumed and result.bytes_downloaded == BLOB_SIZE
    assert md5sum(dest) == _blob_md5(site)


def test_flaky_link_that_keeps_making_progress_still_finishes(tmp_path, site, server) -> None:
    server.truncate_next("blob.bin", after_bytes=50_000, times=10)
    dest = tmp_path / "blob.bin"
    # Six cut connections in a row, but each extends the file, so retries=1 is not exhausted.
    download_file(server.url_for("blob.bin"), dest, _blob_md5(site), retries=1, **FAST)
    assert len(server.requests) == 6
    assert server.bytes_served("blob.bin") == BLOB_SIZE
    assert md5sum(dest) == _blob_md5(site)


def test_partial_file_of_a_file_that_changed_on_the_server_is_downloaded_again(tmp_path, site, server) -> None:
    dest = tmp_path / "blob.bin"
    # An earlier run stopped 100 kB into an older version of the file; the server now has another.
    dest.with_name("blob.bin.partial").write_bytes(random.Random(9).randbytes(100_000))
    result = download_file(server.url_for("blob.bin"), dest, _blob_md5(site), **FAST)
    assert [r.range for r in server.requests] == ["bytes=100000-", None]
    assert not result.resumed and md5sum(dest) == _blob_md5(site)


def test_refresh_fetches_again_and_keeps_the_old_copy_until_a_new_one_is_complete(tmp_path, site, server) -> None:
    dest = tmp_path / "blob.bin"
    dest.write_bytes(b"old listing")
    dest.with_name("blob.bin.partial").write_bytes(b"stale partial")  # never continued: it may be of another file
    result = download_file(server.url_for("blob.bin"), dest, None, refresh=True, **FAST)
    assert not result.skipped and [r.range for r in server.requests] == [None]
    assert md5sum(dest) == _blob_md5(site)
    dest.write_bytes(b"old listing")
    server.fail_next("blob.bin", status=404)
    with pytest.raises(DownloadError):
        download_file(server.url_for("blob.bin"), dest, None, refresh=True, **FAST)
    assert dest.read_bytes() == b"old listing"


@pytest.mark.parametrize("status", [500, 503, 429])
def test_transient_status_is_retried_then_succeeds(tmp_path, site, server, status) -> None:
    server.fail_next("blob.bin", status=status, times=2)
    dest = tmp_path / "blob.bin"
    download_file(server.url_for("blob.bin"), dest, _blob_md5(site), retries=2, **FAST)
    assert [r.status for r in server.requests] == [status, status, 200]
    assert md5sum(dest) == _blob_md5(site)


def test_persistent_500_fails_after_the_retries_naming_url_and_status(tmp_path, site, server) -> None:
    server.fail_next("blob.bin", status=500, times=10)
    url = server.url_for("blob.bin")
    with pytest.raises(DownloadError) as info:
        download_file(url, tmp_path / "blob.bin", _blob_md5(site), retries=2, **FAST)
    assert url in str(info.value) and "500" in str(info.value)
    assert len(server.requests) == 3
    assert not (tmp_path / "blob.bin").exists()


@pytest.mark.parametrize("status", [404, 403])
def test_client_error_fails_at_once_naming_url_and_status(tmp_path, site, server, status) -> None:
    path = "missing.bin" if status == 404 else "blob.bin"
    if status != 404:
        server.fail_next(path, status=status)
    url = server.url_for(path)
    with pytest.raises(DownloadError) as info:
        download_file(url, tmp_path / path, None, retries=3, **FAST)
    assert url in str(info.value) and str(status) in str(info.value)
    assert len(server.requests) == 1


def test_connection_refused_is_retried_then_reported(tmp_path) -> None:
    url = f"http://127.0.0.1:{free_port()}/blob.bin"
    with pytest.raises(DownloadError, match="3 times") as info:
        download_file(url, tmp_path / "blob.bin", None, retries=2, **FAST)
    assert url in str(info.value)


# -- fetch_release ------------------------------------------------------------------------------
@pytest.fixture
def fake_release(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "release"
    root.mkdir()
    rng = random.Random(1)
    for name in RELEASE_FILES:
        (root / name).write_bytes(rng.randbytes(20_000))
    sums = {name: md5sum(root / name) for name in RELEASE_FILES}
    return root, sums


def test_fetch_release_over_http_then_skips_on_rerun(tmp_path, fake_release) -> None:
    root, sums = fake_release
    seen: set[str] = set()
    with LoopbackServer(root) as srv:
        base = srv.url.rstrip("/")  # a missing trailing slash must not drop a path segment
        result = fetch_release(
            tmp_path / "dl", base_url=base, md5=sums, progress=lambda name, d, t: seen.add(name)
        )
        assert result.checksums == sums
        assert result.bytes_downloaded == 3 * 20_000
        assert result.source == srv.url
        assert seen == set(RELEASE_FILES)
        # The mirror's md5sums is asked for once, before the files (this one has none: 404).
        assert [r.path for r in srv.requests][0] == "/md5sums"
        assert {r.path for r in srv.requests} == {"/" + n for n in RELEASE_FILES} | {"/md5sums"}
        again = fetch_release(tmp_path / "dl", base_url=base, md5=sums)
        assert again.bytes_downloaded == 0 and len(srv.requests) == 4, "a complete cache asks the mirror nothing"
    assert all(md5sum(p) == sums[n] for n, p in result.paths.items())


def test_fetch_release_from_local_dir_without_http(tmp_path, fake_release) -> None:
    root, sums = fake_release
    # local_dir wins over base_url (a config may carry the official URL as its default); port 1 is
    # closed, so any HTTP attempt would fail.
    result = fetch_release(tmp_path / "dl", base_url="http://127.0.0.1:1/", local_dir=root, md5=sums)
    assert result.source == root.resolve().as_uri() and result.source.startswith("file://")
    assert result.checksums == sums
    assert {n: p.read_bytes() for n, p in result.paths.items()} == {
        n: (root / n).read_bytes() for n in RELEASE_FILES
    }
    assert fetch_release(tmp_path / "dl", local_dir=root, md5=sums).bytes_downloaded == 0


def test_fetch_release_from_local_dir_refuses_a_corrupt_file(tmp_path, fake_release) -> None:
    root, sums = fake_release
    (root / "setid.mat").write_bytes(b"corrupt")
    with pytest.raises(ChecksumError, match="setid.mat"):
        fetch_release(tmp_path / "dl", local_dir=root, md5=sums)
    assert not (tmp_path / "dl" / "setid.mat").exists()
    assert not (tmp_path / "dl" / "setid.mat.partial").exists()


def test_fetch_release_argument_errors(tmp_path, fake_release) -> None:
    root, sums = fake_release
    with pytest.raises(ValueError, match="setid.mat"):
        fetch_release(tmp_path, local_dir=root, md5={k: v for k, v in sums.items() if k != "setid.mat"})
    (root / "imagelabels.mat").unlink()
    with pytest.raises(DownloadError, match="imagelabels.mat"):
        fetch_release(tmp_path / "dl", local_dir=root, md5=sums)


# -- a source that cannot serve the release, or serves other files -------------------------------------
def test_unreachable_base_url_is_one_usage_error_naming_base_url_and_local_dir(tmp_path, fake_release) -> None:
    _, sums = fake_release
    base = f"http://127.0.0.1:{free_port()}/flowers/"  # nothing listens: connection refused
    with pytest.raises(ReleaseSourceError) as info:
        fetch_release(tmp_path / "dl", base_url=base, md5=sums, retries=1, backoff_s=0.01)
    message = str(info.value)
    assert isinstance(info.value, UsageError) and isinstance(info.value, DownloadError)
    assert f"GET {base}102flowers.tgz failed 2 times in a row" in message
    assert f"base_url to a reachable mirror of 102flowers.tgz, imagelabels.mat, setid.mat (now {base})" in message
    assert "local_dir to a folder that holds them" in message


def test_local_dir_without_a_file_names_local_dir(tmp_path, fake_release) -> None:
    root, sums = fake_release
    (root / "setid.mat").unlink()
    with pytest.raises(ReleaseSourceError, match=rf"setid.mat.*local_dir to a folder holding .* \(now {root}"):
        fetch_release(tmp_path / "dl", local_dir=root, md5=sums)


def _listing(root: Path, sums: dict[str, str]) -> None:
    (root / "md5sums").write_text("".join(f"{h}  {n}\n" for n, h in sums.items()))


def test_a_mirror_whose_md5sums_differ_fails_before_downloading_and_suggests_md5_empty(tmp_path, fake_release):
    root, sums = fake_release
    _listing(root, sums)
    expected = dict(sums, **{"102flowers.tgz": "0" * 32})
    with LoopbackServer(root) as srv:
        with pytest.raises(MirrorChecksumError) as info:
            fetch_release(tmp_path / "dl", base_url=srv.url, md5=expected)
        paths, url = [r.path for r in srv.requests], srv.url
        # Agreeing files are not the problem; with md5 from the listing itself the run goes through.
        fetch_release(tmp_path / "dl", base_url=srv.url, md5=sums)
    assert paths == ["/md5sums"], "nothing but the listing may be downloaded"
    message = str(info.value)
    assert f"102flowers.tgz: expected {'0' * 32}, the mirror lists {sums['102flowers.tgz']}" in message
    assert "imagelabels.mat" not in message and "`md5: {}`" in message and url in message


def test_the_mini_mirror_with_the_official_checksums_fails_in_one_request(tmp_path, shared_datasets) -> None:
    """The real case: base_url set to the mini mirror, md5 left at the official checksums."""
    with LoopbackServer(shared_datasets / "oxford-flowers-102-mini") as srv:
        with pytest.raises(MirrorChecksumError, match=r"102flowers.tgz: expected 52808999861908f626f3c1f4e79d11fa"):
            fetch_release(tmp_path / "dl", base_url=srv.url)
        assert [r.path for r in srv.requests] == ["/md5sums"]


def test_a_checksum_mismatch_after_download_also_suggests_md5_empty(tmp_path, fake_release) -> None:
    root, sums = fake_release
    with LoopbackServer(root) as srv:  # no md5sums on this mirror: the mismatch shows only after the download
        with pytest.raises(ChecksumError, match=r"setid.mat.*`md5: \{\}`"):
            fetch_release(tmp_path / "dl", base_url=srv.url, md5=dict(sums, **{"setid.mat": "1" * 32}))


def test_each_source_has_its_own_cache_folder(tmp_path) -> None:
    official = source_cache_dir(tmp_path)
    assert official == source_cache_dir(tmp_path, base_url="https://www.robots.ox.ac.uk/~vgg/data/flowers/102")
    assert official.parent == tmp_path and official.name.startswith("www.robots.ox.ac.uk-")
    mirror = source_cache_dir(tmp_path, base_url="http://127.0.0.1:8000/")
    other_port = source_cache_dir(tmp_path, base_url="http://127.0.0.1:8001/")
    local = source_cache_dir(tmp_path, base_url="http://127.0.0.1:8000/", local_dir=tmp_path / "demo_release")
    assert len({official, mirror, other_port, local}) == 4
    assert local.name.startswith("demo_release-") and local == source_cache_dir(tmp_path, local_dir=tmp_path / "x/../demo_release")


def test_fetch_md5sums_reads_the_listing_and_says_what_to_do_without_one(tmp_path, fake_release) -> None:
    root, sums = fake_release
    (root / "md5sums").write_text("".join(f"{h}  {n}\n" for n, h in sums.items()))
    with LoopbackServer(root) as srv:
        assert fetch_md5sums(tmp_path / "dl", base_url=srv.url) == sums
        assert fetch_md5sums(tmp_path / "dl", base_url=srv.url) == sums
        assert [r.path for r in srv.requests] == ["/md5sums", "/md5sums"]  # asked again, not trusted from disk
        (root / "md5sums").unlink()
        with pytest.raises(DownloadError, match=r"md5sums.*404.*give md5 explicitly"):
            fetch_md5sums(tmp_path / "dl", base_url=srv.url)
    assert (tmp_path / "dl" / "md5sums").is_file()  # the last good listing stays
    with pytest.raises(DownloadError, match=r"release/md5sums, which does not exist; give md5 explicitly"):
        fetch_md5sums(tmp_path / "dl", local_dir=root)


# -- the real mini mirror, end to end -------------------------------------------------------------
def test_official_label_files_pass_the_official_md5(shared_datasets: Path) -> None:
    official = shared_datasets / "oxford-flowers-102-official"
    for name in ("imagelabels.mat", "setid.mat"):
        assert md5sum(official / name) == OFFICIAL_MD5[name]


@pytest.fixture(scope="module")
def mini_run(shared_datasets: Path, tmp_path_factory):
    """Download the mini mirror over loopback HTTP (cut once midway), extract it, build the manifest."""
    mini = shared_datasets / "oxford-flowers-102-mini"
    sums = parse_md5sums((mini / "md5sums").read_text())
    root = tmp_path_factory.mktemp("oxford_flowers")
    tgz_size = (mini / "102flowers.tgz").stat().st_size
    with LoopbackServer(mini) as srv:
        srv.truncate_next("102flowers.tgz", after_bytes=tgz_size // 2)
        fetched = fetch_release(root / "downloads", base_url=srv.url, md5=sums)
        log = srv.requests
    files = safe_extract_tgz(fetched.paths["102flowers.tgz"], root)
    manifest = build_manifest(root, fetched.paths["imagelabels.mat"], fetched.paths["setid.mat"])
    return {"mini": mini, "sums": sums, "root": root, "fetched": fetched, "log": log,
            "tgz_size": tgz_size, "files": files, "manifest": manifest}


def test_mini_download_resumes_and_matches_the_mirror_md5sums(mini_run) -> None:
    fetched, log, size = mini_run["fetched"], mini_run["log"], mini_run["tgz_size"]
    assert fetched.checksums == mini_run["sums"]
    tgz = [r for r in log if r.path == "/102flowers.tgz"]
    assert [r.range for r in tgz] == [None, f"bytes={size // 2}-"]
    assert sum(r.bytes_sent for r in tgz) == size  # resumed, not restarted
    assert fetched.bytes_downloaded == sum((mini_run["mini"] / n).stat().st_size for n in RELEASE_FILES)


def test_mini_extracts_to_a_manifest_of_3060_images_with_all_classes_in_each_split(mini_run) -> None:
    root, manifest = mini_run["root"], mini_run["manifest"]
    assert len(mini_run["files"]) == 3060
    assert all(p.parent == root / "jpg" for p in mini_run["files"])
    assert summarize_manifest(manifest) == {
        "images_train": 1020, "images_validation": 1020, "images_test": 1020, "num_classes": 102,
        "images_per_class_min": 30, "images_per_class_max": 30, "num_images": 3060,
    }
    assert (manifest.groupby("split")["label"].nunique() == 102).all()
    # Cross-check against the mirror's own record of each image's label and split.
    source = pd.read_csv(mini_run["mini"] / "source_ids.csv")
    assert manifest["label"].tolist() == (source["label"] - 1).tolist()
    assert manifest["split"].tolist() == source["split"].replace({"valid": "validation"}).tolist()
    assert (root / manifest["path"].iloc[-1]).is_file()


def test_mini_from_local_dir_gives_the_same_files(shared_datasets: Path, tmp_path: Path) -> None:
    mini = shared_datasets / "oxford-flowers-102-mini"
    sums = parse_md5sums((mini / "md5sums").read_text())
    result = fetch_release(tmp_path, local_dir=mini, md5=sums)
    assert result.checksums == sums and result.source == mini.resolve().as_uri()


# -- a mirror that publishes a new release (md5: {} reads its md5sums) ----------------------------
@pytest.fixture(scope="module")
def two_releases(tmp_path_factory) -> tuple[Path, Path]:
    """Release folders A and B with md5sums: B's 102flowers.tgz holds other pixels for image 1; same .mat files."""
    from plant_pipeline.ml.data.demo_release import make_demo_release

    first = make_demo_release(tmp_path_factory.mktemp("release_a"), train_per_class=1, validation_per_class=1,
                              test_per_class=1, image_size=32).out_dir
    second = tmp_path_factory.mktemp("release_b")
    with tarfile.open(first / "102flowers.tgz", "r:gz") as tar:
        members = [(m, tar.extractfile(m).read() if m.isreg() else None) for m in tar.getmembers()]
    image_2 = next(data for m, data in members if m.name == "jpg/image_00002.jpg")
    members = [tar_file(m.name, image_2) if m.name == "jpg/image_00001.jpg" else (m, data) for m, data in members]
    make_tgz(second / "102flowers.tgz", members)
    for name in ("imagelabels.mat", "setid.mat"):
        shutil.copyfile(first / name, second / name)
    (second / "md5sums").write_text("".join(f"{md5sum(second / n)}  {n}\n" for n in RELEASE_FILES))
    return first, second


def _publish(release: Path, mirror: Path) -> None:
    for name in (*RELEASE_FILES, "md5sums"):
        shutil.copyfile(release / name, mirror / name)


def _member_bytes(archive: Path, name: str) -> bytes:
    with tarfile.open(archive, "r:gz") as tar:
        return tar.extractfile(name).read()


def test_mirror_publishing_a_new_release_is_fetched_and_extracted_on_the_next_run(tmp_path, two_releases) -> None:
    from dagster import materialize

    from plant_pipeline.defs.assets.flowers import oxford_flowers
    from plant_pipeline.defs.resources import PipelineStorage

    first, second = two_releases
    sums = {release: parse_md5sums((release / "md5sums").read_text()) for release in two_releases}
    assert sums[first]["102flowers.tgz"] != sums[second]["102flowers.tgz"]
    mirror, data = tmp_path / "mirror", tmp_path / "data"
    mirror.mkdir()
    image = "jpg/image_00001.jpg"

    def run(url: str):
        result = materialize(
            [oxford_flowers], resources={"storage": PipelineStorage(data_dir=str(data))},
            run_config={"ops": {"oxford_flowers": {"config": {"base_url": url, "md5": {}}}}},
        )
        [event] = result.get_asset_materialization_events()
        return event.materialization

    _publish(first, mirror)
    with LoopbackServer(mirror) as srv:
        before = run(srv.url)
        assert before.metadata["checksums"].value == sums[first]
        _publish(second, mirror)
        srv.clear_log()
        after = run(srv.url)
        log = [(r.path, r.status) for r in srv.requests]

    assert after.metadata["checksums"].value == sums[second]
    extracted = data / "oxford_flowers" / "extracted" / image
    assert extracted.read_bytes() == _member_bytes(second / "102flowers.tgz", image)
    assert extracted.read_bytes() != _member_bytes(first / "102flowers.tgz", image)
    # The listing is asked for again; only the changed file crosses the wire.
    assert sorted(log) == [("/102flowers.tgz", 200), ("/md5sums", 200)]
    # Same labels, new pixels: downstream assets must see a new data version.
    assert after.tags["dagster/data_version"] != before.tags["dagster/data_version"]


def test_a_failed_real_run_keeps_the_demos_archive_and_fails_with_one_message(tmp_path, two_releases) -> None:
    """The demo (local_dir) and a real run (base_url, official md5) share data/oxford_flowers/: the real run's
    failure must neither delete the demo's verified files nor bury what to change under a trace."""
    from dagster import materialize

    from plant_pipeline.defs.assets.flowers import oxford_flowers
    from plant_pipeline.defs.resources import PipelineStorage

    demo, data = two_releases[0], tmp_path / "data"
    downloads = data / "oxford_flowers" / "downloads"

    def run(config: dict):
        return materialize([oxford_flowers], resources={"storage": PipelineStorage(data_dir=str(data))},
                           run_config={"ops": {"oxford_flowers": {"config": config}}}, raise_on_error=False)

    def cached() -> dict[str, str]:
        return {str(p.relative_to(downloads)): md5sum(p) for p in downloads.rglob("*") if p.is_file()}

    demo_config = {"local_dir": str(demo), "md5": parse_md5sums((demo / "md5sums").read_text())}
    assert run(demo_config).success
    before = cached()
    assert any(name.endswith("102flowers.tgz") for name in before)
    (tmp_path / "empty").mkdir()
    with LoopbackServer(tmp_path / "empty") as srv:  # a mirror without the files: 404 at once, no retries
        failed, url = run({"base_url": srv.url}), srv.url
    assert not failed.success
    [failure] = [e for e in failed.all_events if e.event_type_value == "STEP_FAILURE"]
    error = failure.event_specific_data.error
    assert error.cause is None, "the causes (urllib, sockets) add a long trace that says nothing to do"
    assert f"GET {url}102flowers.tgz failed with HTTP 404" in error.message
    assert "base_url to a reachable mirror" in error.message and "local_dir" in error.message
    assert cached() == before, "the real run deleted or changed the demo's verified files"
    [again] = run(demo_config).get_asset_materialization_events()
    assert again.materialization.metadata["bytes_downloaded"].value == 0
