"""Fetch the Oxford Flowers 102 release: resumable, retried, md5-verified downloads (extraction: archive.py).

Every file lands atomically (``<name>.partial`` then ``os.replace``), so a file at its final path is
always complete and verified; re-runs skip what is already there and good. Each source (base URL or local
folder) keeps its files in a folder of its own (source_cache_dir), so one source never deletes another's as stale.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from plant_pipeline.ml.errors import PlantPipelineError, UsageError
from plant_pipeline.ml.files import file_digest

logger = logging.getLogger(__name__)

OFFICIAL_BASE_URL = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
RELEASE_FILES: tuple[str, ...] = ("102flowers.tgz", "imagelabels.mat", "setid.mat")
OFFICIAL_MD5: dict[str, str] = {
    "102flowers.tgz": "52808999861908f626f3c1f4e79d11fa",
    "imagelabels.mat": "e0620be6f572b9609742df49c70aed4d",
    "setid.mat": "a5357ecc9cb78c4bef273ce3793fc85c",
}

MD5SUMS = "md5sums"  # a mirror's own checksum listing, as `md5sum FILES > md5sums` writes it
_PARTIAL_SUFFIX = ".partial"
_MD5_RE = re.compile(r"^[0-9a-f]{32}$")
# 408/429/5xx say "try again later"; every other 4xx will not get better by retrying.
_TRANSIENT_STATUS = frozenset({408, 429}) | frozenset(range(500, 600))
_PROGRESS_BYTES_UNKNOWN_TOTAL = 8 << 20
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

ProgressFn = Callable[[int, "int | None"], None]
ReleaseProgressFn = Callable[[str, int, "int | None"], None]


class DownloadError(PlantPipelineError, RuntimeError):
    """A file could not be fetched: an HTTP error status, or transient failures that outlasted the retries."""


class ChecksumError(UsageError):
    """A fetched file's md5 differs from the expected one; the bad bytes were deleted."""


class MirrorChecksumError(ChecksumError):
    """A mirror's own md5sums list other checksums than the expected ones; found before downloading anything."""


class ReleaseSourceError(DownloadError, UsageError):
    """The release's source (base_url or local_dir) could not serve a file; the message names both settings."""


class _TransientError(Exception):
    """A failure worth retrying (connection dropped, 5xx, short body); internal to download_file."""


@dataclass
class _Transfer:
    """What the attempts of one download_file call have done so far."""

    received: int = 0  # body bytes written to the partial file, across all attempts
    resumed: bool = False  # some attempt continued a partial file with a 206 answer


@dataclass(frozen=True)
class DownloadResult:
    """The outcome of one download_file / copy_file call."""

    path: Path
    bytes_downloaded: int  # bytes actually transferred by this call (0 when skipped)
    md5: str
    resumed: bool  # an earlier partial file was continued with a Range request
    skipped: bool  # the file was already in place with the expected md5


@dataclass(frozen=True)
class FetchResult:
    """The outcome of fetch_release: where each release file is and its verified md5."""

    paths: dict[str, Path]
    bytes_downloaded: int
    checksums: dict[str, str]
    source: str  # the base URL, or a file:// URI of the local folder


def md5sum(path: Path | str, chunk_size: int = 1 << 20) -> str:
    """Hex md5 of a file: the checksum the official release publishes."""
    return file_digest(path, "md5", chunk_size)


def parse_md5sums(text: str) -> dict[str, str]:
    """Parse ``md5sum`` tool output ("HASH  name" or "HASH *name") into {name: hash}.

    Blank lines and ``#`` comments are skipped; any other malformed line raises ValueError.
    """
    sums: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"^([0-9a-fA-F]{32}) [ *](.+)$", line)
        if match is None:
            raise ValueError(
                f"md5sums line {lineno} is not 'HASH  name' or 'HASH *name': {raw!r}; "
                "regenerate the file with `md5sum FILES > md5sums`"
            )
        sums[match.group(2).strip()] = match.group(1).lower()
    return sums


def _normalize_md5(value: str, what: str) -> str:
    md5 = value.strip().lower()
    if not _MD5_RE.match(md5):
        raise ValueError(f"expected md5 for {what} must be 32 hex digits, got {value!r}")
    return md5


def _partial_path(dest: Path) -> Path:
    return dest.with_name(dest.name + _PARTIAL_SUFFIX)


def _existing_is_good(dest: Path, expected_md5: str | None) -> str | None:
    """Return dest's md5 when it can be kept as is; delete it (and return None) when it is bad."""
    if not dest.is_file():
        return None
    actual = md5sum(dest)
    if expected_md5 is None or actual == expected_md5:
        return actual
    logger.warning("%s has md5 %s, expected %s; fetching it again", dest, actual, expected_md5)
    # A known-bad file must not sit at the final path, even if the new fetch then fails.
    dest.unlink()
    return None


def _finish(partial: Path, dest: Path, expected_md5: str | None, what: str) -> str:
    """Verify the completed partial file and move it into place; delete it on a mismatch."""
    actual = md5sum(partial)
    if expected_md5 is not None and actual != expected_md5:
        size = partial.stat().st_size
        partial.unlink()
        raise ChecksumError(
            f"md5 mismatch for {dest.name} from {what}: expected {expected_md5}, got {actual} "
            f"({size} bytes); the bad file was deleted. The source may be corrupt or changed, or "
            "the expected checksum is wrong."
        )
    os.replace(partial, dest)
    return actual


def format_bytes(n: int) -> str:
    """A byte count for people: "345.0 MiB"."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


class _Progress:
    """Calls the callback and logs every ~5% of a known total, or every 8 MiB of an unknown one."""

    def __init__(self, label: str, total: int | None, start: int, callback: ProgressFn | None):
        self.label, self.total, self.callback = label, total, callback
        self.step = max(total // 20, 1) if total else _PROGRESS_BYTES_UNKNOWN_TOTAL
        self.next_mark = (start // self.step + 1) * self.step
        self.reported: int | None = None

    def update(self, done: int, final: bool = False) -> None:
        if done < self.next_mark and not (final and done != self.reported):
            return
        self.next_mark = (done // self.step + 1) * self.step
        self.reported = done
        if self.total:
            logger.info(
                "%s: %s / %s (%.0f%%)",
                self.label, format_bytes(done), format_bytes(self.total), 100.0 * done / self.total,
            )
        else:
            logger.info("%s: %s", self.label, format_bytes(done))
        if self.callback is not None:
            self.callback(done, self.total)


def _open_url(url: str, offset: int, timeout_s: float) -> http.client.HTTPResponse:
    headers = {"User-Agent": "plant-pipeline/0.1", "Accept-Encoding": "identity"}
    if offset > 0:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    host = urllib.parse.urlsplit(url).hostname or ""
    # Loopback servers (tests, local mirrors) must not go through an environment HTTP proxy.
    handlers = [urllib.request.ProxyHandler({})] if host in _LOOPBACK_HOSTS else []
    opener = urllib.request.build_opener(*handlers)
    return opener.open(request, timeout=timeout_s)


def _parse_content_range(value: str | None) -> tuple[int, int | None] | None:
    """'bytes START-END/TOTAL' -> (START, TOTAL or None for '*'); None when unparseable."""
    match = re.match(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", value or "")
    if match is None:
        return None
    total = None if match.group(3) == "*" else int(match.group(3))
    return int(match.group(1)), total


def _attempt(
    url: str, partial: Path, timeout_s: float, chunk_size: int, progress: ProgressFn | None,
    state: _Transfer,
) -> None:
    """One GET into ``partial``, continuing it when possible; updates ``state`` as bytes arrive.

    Raises _TransientError for failures worth retrying, DownloadError for the rest.
    """
    offset = partial.stat().st_size if partial.exists() else 0
    try:
        response = _open_url(url, offset, timeout_s)
    except urllib.error.HTTPError as exc:
        status = exc.code
        content_range = exc.headers.get("Content-Range") if exc.headers else None
        exc.close()
        if status == 416 and offset > 0:
            parsed = re.match(r"^\s*bytes\s+\*/(\d+)\s*$", content_range or "")
            if parsed and int(parsed.group(1)) == offset:
                return  # the partial already holds the whole file; only verification is left
            partial.unlink()
            raise _TransientError(f"HTTP 416 for a resume at byte {offset}; restarting from 0") from None
        if status in _TRANSIENT_STATUS:
            raise _TransientError(f"HTTP {status} {exc.reason}") from None
        raise DownloadError(
            f"GET {url} failed with HTTP {status} {exc.reason}; check the URL (base_url) and that the "
            "file exists on the server"
        ) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise _TransientError(f"{type(exc).__name__}: {exc}") from exc

    with response:
        status = response.status
        length = response.headers.get("Content-Length")
        body_length = int(length) if length and length.isdigit() else None
        if status == 206 and offset > 0:
            parsed = _parse_content_range(response.headers.get("Content-Range"))
            if parsed is None or parsed[0] != offset:
                partial.unlink()
                raise _TransientError(
                    f"206 with Content-Range {response.headers.get('Content-Range')!r} does not "
                    f"continue byte {offset}; restarting from 0"
                )
            start, total, mode = offset, parsed[1], "ab"
            state.resumed = True
        elif status in (200, 206):
            if offset > 0:
                logger.info("%s: server ignored the Range request; restarting from byte 0", url)
            start, total, mode = 0, body_length, "wb"
        else:
            raise DownloadError(f"GET {url} answered HTTP {status}, expected 200 or 206")

        tracker = _Progress(url, total, start, progress)
        received = 0
        with open(partial, mode) as fh:
            while True:
                try:
                    chunk = response.read(chunk_size)
                except (http.client.HTTPException, OSError) as exc:
                    raise _TransientError(
                        f"connection lost after {start + received} bytes: {type(exc).__name__}: {exc}"
                    ) from exc
                if not chunk:
                    break
                fh.write(chunk)
                received += len(chunk)
                state.received += len(chunk)
                tracker.update(start + received)
        done = start + received
        # http.client returns b"" rather than raising when a server closes before Content-Length.
        if body_length is not None and received < body_length:
            raise _TransientError(f"connection closed after {done} of {start + body_length} bytes")
        if total is not None and done != total:
            raise _TransientError(f"received {done} bytes, server announced {total}")
        tracker.update(done, final=True)


def download_file(
    url: str,
    dest: Path,
    expected_md5: str | None,
    *,
    retries: int = 4,
    backoff_s: float = 0.5,
    timeout_s: float = 60,
    chunk_size: int = 1 << 20,
    progress: ProgressFn | None = None,
    refresh: bool = False,
) -> DownloadResult:
    """Download ``url`` to ``dest``: stream to ``dest.partial``, resume it with Range, verify, rename.

    A dest already present with ``expected_md5`` is kept (``skipped=True``); with ``expected_md5=None``
    any existing dest is trusted, since only complete files are ever renamed into place, unless
    ``refresh`` is set: then the file is fetched whole again (for small listings that can change, such
    as a mirror's md5sums) and replaces dest only once complete. A partial file left by an earlier run
    that turns out not to match (the file on the server changed meanwhile) is downloaded once more from
    the start. Connection
    errors, short bodies, 408, 429 and 5xx are retried up to ``retries`` times in a row with
    exponential backoff (an attempt that extends the partial file resets the count, so a flaky
    link still finishes a large file); other statuses raise DownloadError at once. An md5 mismatch
    deletes the partial file and raises ChecksumError. ``progress(bytes_done, total)`` is called about
    every 5% (or 8 MiB when the size is unknown) and at the end.
    """
    dest = Path(dest)
    expected = None if expected_md5 is None else _normalize_md5(expected_md5, dest.name)
    partial = _partial_path(dest)
    if refresh:
        # Without a checksum to tell an old partial from the new file, only a whole fetch is safe.
        partial.unlink(missing_ok=True)
    else:
        existing = _existing_is_good(dest, expected)
        if existing is not None:
            logger.info("%s already present with md5 %s; not downloading", dest, existing)
            return DownloadResult(dest, 0, existing, resumed=False, skipped=True)

    dest.parent.mkdir(parents=True, exist_ok=True)
    earlier_partial = partial.exists()
    if earlier_partial:
        logger.info("%s: resuming from %d bytes already in %s", url, partial.stat().st_size, partial)
    else:
        logger.info("%s: downloading to %s", url, dest)

    state = _Transfer()
    failures = 0
    best = partial.stat().st_size if partial.exists() else 0
    while True:
        try:
            _attempt(url, partial, timeout_s, chunk_size, progress, state)
            break
        except _TransientError as exc:
            size = partial.stat().st_size if partial.exists() else 0
            if size > best:
                best, failures = size, 0
            else:
                failures += 1
            if failures > retries:
                kept = f"The partial file {partial} is kept, so a re-run resumes it. " if size else ""
                raise DownloadError(
                    f"GET {url} failed {failures} times in a row; last error: {exc}. {kept}"
                    "Check the network and the server, then re-run."
                ) from exc
            delay = backoff_s * 2 ** max(failures - 1, 0)
            logger.warning("%s: %s; retrying in %.2f s", url, exc, delay)
            time.sleep(delay)

    try:
        md5 = _finish(partial, dest, expected, url)
    except ChecksumError:
        if not (earlier_partial and state.resumed):
            raise
        # The earlier run's bytes may be of an older release; _finish deleted them, so this starts at 0.
        logger.warning("%s: the continued partial file did not match md5 %s; downloading it again from the "
                       "start (the file on the server may have changed since the earlier run)", url, expected)
        return download_file(url, dest, expected_md5, retries=retries, backoff_s=backoff_s, timeout_s=timeout_s,
                             chunk_size=chunk_size, progress=progress)
    logger.info("%s: saved %s (md5 %s, %d bytes transferred)", url, dest, md5, state.received)
    return DownloadResult(dest, state.received, md5, resumed=state.resumed, skipped=False)


def copy_file(
    src: Path, dest: Path, expected_md5: str | None, *, chunk_size: int = 1 << 20,
    progress: ProgressFn | None = None,
) -> DownloadResult:
    """Copy a local file into place the way download_file does: via ``.partial``, verified, atomic."""
    src, dest = Path(src), Path(dest)
    expected = None if expected_md5 is None else _normalize_md5(expected_md5, dest.name)
    if not src.is_file():
        raise DownloadError(f"{src} does not exist; the local source folder must hold {dest.name}")
    existing = _existing_is_good(dest, expected)
    if existing is not None:
        logger.info("%s already present with md5 %s; not copying", dest, existing)
        return DownloadResult(dest, 0, existing, resumed=False, skipped=True)

    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_path(dest)
    total = src.stat().st_size
    tracker = _Progress(str(src), total, 0, progress)
    copied = 0
    with open(src, "rb") as fin, open(partial, "wb") as fout:
        while chunk := fin.read(chunk_size):
            fout.write(chunk)
            copied += len(chunk)
            tracker.update(copied)
    tracker.update(copied, final=True)
    md5 = _finish(partial, dest, expected, str(src))
    return DownloadResult(dest, copied, md5, resumed=False, skipped=False)


def fetch_release(
    dest_dir: Path,
    *,
    base_url: str | None = None,
    local_dir: Path | None = None,
    md5: Mapping[str, str] | None = None,
    progress: ReleaseProgressFn | None = None,
    compare_listing: bool = True,
    retries: int = 4,
    backoff_s: float = 0.5,
) -> FetchResult:
    """Fetch the three release files into ``dest_dir`` from ``base_url`` (default: the official site)
    or, without HTTP, from the folder ``local_dir``, which takes precedence when both are given.

    ``md5`` replaces OFFICIAL_MD5 entirely (a mirror such as the mini subset has its own checksums)
    and must name all of RELEASE_FILES. ``progress(name, bytes_done, total)`` reports each file;
    ``retries`` and ``backoff_s`` are download_file's. Before downloading anything over HTTP, the mirror's ``md5sums`` (where it has one) is compared with
    ``md5`` and a disagreement raises MirrorChecksumError (``compare_listing=False`` when ``md5`` was read
    from that very listing). A source that cannot serve a file raises ReleaseSourceError, naming
    base_url and local_dir. Use one ``dest_dir`` per source (source_cache_dir): a file there with another
    md5 is deleted as stale.
    """
    if md5 is None:
        expected = dict(OFFICIAL_MD5)
    else:
        missing = [name for name in RELEASE_FILES if name not in md5]
        if missing:
            raise ValueError(
                f"md5 must give a checksum for each of {list(RELEASE_FILES)}; missing {missing} "
                f"(got {sorted(md5)}). Pass the mirror's md5sums (parse_md5sums) or leave md5=None "
                "for the official checksums."
            )
        expected = {name: _normalize_md5(md5[name], name) for name in RELEASE_FILES}

    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    if local_dir is not None:
        local_dir = Path(local_dir).resolve()
        source = local_dir.as_uri()
        if base_url is not None:
            logger.info("reading the release from %s; base_url %s is not used", local_dir, base_url)
    else:
        source = base_url or OFFICIAL_BASE_URL
        if not source.endswith("/"):
            source += "/"  # urljoin would otherwise replace the last path segment

    results: dict[str, DownloadResult] = {}
    for name in RELEASE_FILES:
        present = _existing_is_good(dest_dir / name, expected[name])
        if present is not None:
            logger.info("%s already present with md5 %s; not fetching it", dest_dir / name, present)
            results[name] = DownloadResult(dest_dir / name, 0, present, resumed=False, skipped=True)
    needed = [name for name in RELEASE_FILES if name not in results]
    if needed and local_dir is None and compare_listing:
        _check_mirror_listing(source, {name: expected[name] for name in needed})
    for name in needed:
        file_progress = None
        if progress is not None:
            file_progress = (lambda n: lambda done, total: progress(n, done, total))(name)
        try:
            if local_dir is not None:
                result = copy_file(local_dir / name, dest_dir / name, expected[name], progress=file_progress)
            else:
                url = urllib.parse.urljoin(source, urllib.parse.quote(name))
                result = download_file(url, dest_dir / name, expected[name], progress=file_progress,
                                       retries=retries, backoff_s=backoff_s)
        except ChecksumError as exc:
            raise ChecksumError(
                f"{exc} If {source} holds other files than the expected ones on purpose, give each file's md5 in "
                f"md5, or `md5: {{}}` to read the source's own {MD5SUMS}."
            ) from None
        except DownloadError as exc:
            raise ReleaseSourceError(f"{exc} {_source_fix(base_url, local_dir)}") from exc
        results[name] = result
    total_bytes = sum(r.bytes_downloaded for r in results.values())
    logger.info("release fetched from %s into %s (%d bytes transferred)", source, dest_dir, total_bytes)
    return FetchResult(paths={n: results[n].path for n in RELEASE_FILES}, bytes_downloaded=total_bytes,
                       checksums={n: results[n].md5 for n in RELEASE_FILES}, source=source)


def _source_fix(base_url: str | None, local_dir: Path | str | None) -> str:
    """The end of every message about a source that cannot serve the release: the two settings that choose it."""
    if local_dir is not None:
        return (f"Set oxford_flowers' local_dir to a folder holding {', '.join(RELEASE_FILES)} (now {local_dir}), "
                "or leave it empty to download from base_url.")
    return (f"Set oxford_flowers' base_url to a reachable mirror of {', '.join(RELEASE_FILES)} (now "
            f"{base_url or OFFICIAL_BASE_URL}), or local_dir to a folder that holds them (an air-gapped copy; no "
            "network needed); a re-run resumes what was downloaded.")


def _read_listing(url: str, timeout_s: float = 10, max_bytes: int = 1 << 20) -> str | None:
    """The text of a small file at ``url``, or None when there is none (404) or no answer: one try, no retries."""
    try:
        with _open_url(url, 0, timeout_s) as response:
            return response.read(max_bytes).decode("utf-8", errors="replace")
    except urllib.error.HTTPError as exc:
        exc.close()
        logger.debug("%s: HTTP %s; not checking the mirror's checksums", url, exc.code)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        # The download that follows retries and then says what to change; one failed probe must not stop it.
        logger.info("%s: %s; not checking the mirror's checksums", url, exc)
    return None


def _check_mirror_listing(source: str, expected: Mapping[str, str]) -> None:
    """Before downloading from ``source``, compare its ``md5sums`` (where it publishes one) with ``expected``:
    a mirror of other files (a subset, a newer release) fails here in a second, not after 124 MB."""
    url = urllib.parse.urljoin(source, MD5SUMS)
    text = _read_listing(url)
    if text is None:
        return
    try:
        listed = parse_md5sums(text)
    except ValueError as exc:
        logger.warning("%s cannot be read (%s); downloading without comparing it", url, exc)
        return
    differ = {name: listed[name] for name in expected if name in listed and listed[name] != expected[name]}
    if differ:
        shown = "; ".join(f"{name}: expected {expected[name]}, the mirror lists {md5}" for name, md5 in differ.items())
        raise MirrorChecksumError(
            f"the mirror {source} publishes other checksums than the expected ones in its {MD5SUMS} ({shown}), so "
            "it serves other files; nothing was downloaded. If its files are the ones you want (a subset such as "
            "the mini mirror, a newer release), set `md5: {}` in oxford_flowers' config to use its md5sums; "
            "otherwise point base_url at a mirror of the expected files, or give md5 for each file explicitly."
        )
    logger.info("%s agrees with the expected checksums of %s", url, ", ".join(sorted(expected)))


def source_cache_dir(downloads: Path | str, *, base_url: str | None = None, local_dir: Path | str | None = None) -> Path:
    """The folder under ``downloads`` that keeps one source's files: one per base URL or local folder, named
    for its host (or folder) plus a hash, so a run from one source never deletes another's verified files."""
    if local_dir is not None:
        origin = Path(local_dir).resolve().as_uri()
        label = Path(local_dir).resolve().name
    else:
        origin = base_url or OFFICIAL_BASE_URL
        origin = origin if origin.endswith("/") else origin + "/"
        label = urllib.parse.urlsplit(origin).hostname or "mirror"
    label = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-.")[:40] or "source"
    return Path(downloads) / f"{label}-{hashlib.sha256(origin.encode()).hexdigest()[:10]}"


def fetch_md5sums(dest_dir: Path, *, base_url: str | None = None, local_dir: Path | None = None) -> dict[str, str]:
    """The checksums a mirror or folder publishes beside the release files (its ``md5sums`` listing).

    Over HTTP the listing is fetched again on every call (it is tiny) and kept in ``dest_dir``, so a
    mirror that publishes a new release is noticed: fetch_release then replaces exactly the files whose
    md5 changed. ``local_dir`` takes precedence over ``base_url``, as in fetch_release.
    """
    if local_dir is not None:
        listing = Path(local_dir) / MD5SUMS
        if not listing.is_file():
            raise ReleaseSourceError(
                f"md5 is empty, so checksums are read from {listing}, which does not exist; give md5 "
                f"explicitly or add an {MD5SUMS} file to the folder (`md5sum {' '.join(RELEASE_FILES)} > {MD5SUMS}`)"
            )
    else:
        source = base_url or OFFICIAL_BASE_URL
        url = urllib.parse.urljoin(source if source.endswith("/") else source + "/", MD5SUMS)
        try:
            listing = download_file(url, Path(dest_dir) / MD5SUMS, None, refresh=True).path
        except DownloadError as exc:
            raise ReleaseSourceError(
                f"md5 is empty, so checksums are read from the mirror's {MD5SUMS}, which could not be fetched: "
                f"{exc} To run on the files already downloaded without the mirror, give md5 explicitly. "
                f"{_source_fix(base_url, local_dir)}"
            ) from exc
    try:
        return parse_md5sums(listing.read_text())
    except ValueError as exc:
        raise ValueError(f"{listing}: {exc}") from exc
