"""A loopback HTTP file server for tests: Range requests, scripted faults and a request log.

    with LoopbackServer(root) as server:
        server.fail_next("102flowers.tgz", status=500, times=2)   # the next 2 GETs answer 500
        server.fail_next("m/config.json", status=404, headers={"X-Error-Code": "RepoNotFound"})  # a hub's answer
        server.truncate_next("102flowers.tgz", after_bytes=1000)  # the next GET drops after 1000 bytes
        download_file(server.url + "102flowers.tgz", ...)
        [(r.path, r.range, r.status, r.bytes_sent) for r in server.requests]
"""

from __future__ import annotations

import re
import socket
import sys
import threading
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_COPY_CHUNK = 64 * 1024


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class RequestRecord:
    """One request the server answered."""

    method: str
    path: str  # URL path as requested, e.g. "/102flowers.tgz"
    range: str | None  # the Range header, e.g. "bytes=1000-", or None
    status: int
    bytes_sent: int  # body bytes actually written to the socket


def _key(path: str) -> str:
    return "/" + path.lstrip("/")


class LoopbackServer:
    """Serve the files under ``root`` on http://127.0.0.1:<free port>/ from a background thread.

    Supports single-range ``Range: bytes=START-[END]`` / ``bytes=-SUFFIX`` requests (206 with
    Content-Range, 416 when unsatisfiable). Fault hooks apply to a path's next requests, in order:
    ``fail_next`` answers with an error status, ``truncate_next`` closes the connection after some
    body bytes while announcing the full Content-Length. Set ``honor_range = False`` to mimic a server
    that ignores Range and always sends the whole file with 200.
    """

    def __init__(self, root: Path | str, *, honor_range: bool = True):
        self.root = Path(root).resolve()
        self.honor_range = honor_range
        self._lock = threading.Lock()
        self._failures: dict[str, list[tuple[int, dict[str, str]]]] = {}
        self._truncations: dict[str, list[int]] = {}
        self._requests: list[_Entry] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> "LoopbackServer":
        handler = type("_BoundHandler", (_Handler,), {"server_ref": self})
        self._httpd = _QuietServer(("127.0.0.1", 0), handler)
        # A short poll interval keeps stop() (and so each test's teardown) fast.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="loopback-http", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> "LoopbackServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- addresses -----------------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("LoopbackServer is not running; use it as a context manager or call start()")
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """Base URL with a trailing slash, e.g. "http://127.0.0.1:41234/"."""
        return f"http://127.0.0.1:{self.port}/"

    def url_for(self, path: str) -> str:
        return self.url + urllib.parse.quote(path.lstrip("/"))

    # -- fault hooks ---------------------------------------------------------------------------
    def fail_next(self, path: str, status: int = 500, times: int = 1, headers: dict[str, str] | None = None) -> None:
        """Answer the next ``times`` requests for ``path`` with ``status`` (and a short text body), plus
        ``headers`` (e.g. the X-Error-Code a Hugging Face hub sends with a 404)."""
        with self._lock:
            self._failures.setdefault(_key(path), []).extend([(status, dict(headers or {}))] * times)

    def truncate_next(self, path: str, after_bytes: int, times: int = 1) -> None:
        """Close the connection of the next ``times`` requests for ``path`` after ``after_bytes`` body bytes."""
        with self._lock:
            self._truncations.setdefault(_key(path), []).extend([after_bytes] * times)

    # -- request log ---------------------------------------------------------------------------
    @property
    def requests(self) -> list[RequestRecord]:
        """A copy of the request log, oldest first."""
        with self._lock:
            return [entry.snapshot() for entry in self._requests]

    def requests_for(self, path: str) -> list[RequestRecord]:
        key = _key(path)
        return [r for r in self.requests if r.path == key]

    def bytes_served(self, path: str | None = None) -> int:
        """Body bytes sent in total, or for one path."""
        records = self.requests if path is None else self.requests_for(path)
        return sum(r.bytes_sent for r in records)

    def clear_log(self) -> None:
        with self._lock:
            self._requests.clear()

    # -- used by the handler -------------------------------------------------------------------
    def _pop(self, table: dict[str, list], key: str):
        with self._lock:
            queue = table.get(key)
            return queue.pop(0) if queue else None

    def _record(self, method: str, path: str, range_header: str | None, status: int) -> "_Entry":
        entry = _Entry(method, path, range_header, status)
        with self._lock:
            self._requests.append(entry)
        return entry


@dataclass
class _Entry:
    """A request being answered. It is logged before the response goes out and bytes_sent is raised
    before each write, so a client that has just read the last byte already finds it in the log."""

    method: str
    path: str
    range: str | None
    status: int
    bytes_sent: int = 0

    def snapshot(self) -> RequestRecord:
        return RequestRecord(self.method, self.path, self.range, self.status, self.bytes_sent)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # noqa: ANN001
        # Clients that hang up mid-body (as the download tests make them) are expected; report the rest.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server_ref: LoopbackServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # the request log replaces stderr chatter

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def _serve(self, send_body: bool) -> None:
        owner = self.server_ref
        key = _key(urllib.parse.unquote(urllib.parse.urlsplit(self.path).path))
        range_header = self.headers.get("Range")

        def record(status: int) -> _Entry:
            return owner._record(self.command, key, range_header, status)

        failure = owner._pop(owner._failures, key)
        if failure is not None:
            status, headers = failure
            self._send_text(record(status), f"injected failure {status}\n", send_body, headers)
            return
        relative = key.lstrip("/")
        target = (owner.root / relative).resolve()
        if ".." in Path(relative).parts or not target.is_relative_to(owner.root) or not target.is_file():
            self._send_text(record(404), "not found\n", send_body)
            return

        size = target.stat().st_size
        start, end = 0, size - 1
        status = 200
        if range_header and owner.honor_range:
            parsed = _parse_range(range_header, size)
            if parsed == "unsatisfiable":
                record(416)
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if parsed is not None:
                start, end = parsed
                status = 206
        length = end - start + 1
        entry = record(status)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(length))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if not send_body:
            return

        limit = owner._pop(owner._truncations, key)
        to_send = length if limit is None else min(length, limit)
        try:
            with open(target, "rb") as fh:
                fh.seek(start)
                while entry.bytes_sent < to_send:
                    chunk = fh.read(min(_COPY_CHUNK, to_send - entry.bytes_sent))
                    if not chunk:
                        break
                    entry.bytes_sent += len(chunk)
                    try:
                        self.wfile.write(chunk)
                    except OSError:
                        entry.bytes_sent -= len(chunk)  # the client hung up; those bytes never left
                        raise
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
        if entry.bytes_sent < length:
            self.close_connection = True  # the client sees EOF before Content-Length

    def _send_text(self, entry: _Entry, text: str, send_body: bool, headers: dict[str, str] | None = None) -> None:
        body = text.encode()
        self.send_response(entry.status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            entry.bytes_sent = len(body)
            self.wfile.write(body)


def _parse_range(header: str, size: int) -> tuple[int, int] | str | None:
    """(start, end) for one satisfiable byte range, "unsatisfiable", or None to ignore the header."""
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if match is None or match.group(1) == match.group(2) == "":
        return None  # multi-range or malformed: RFC 9110 lets a server ignore it
    first, last = match.group(1), match.group(2)
    if first == "":
        suffix = int(last)
        if suffix == 0 or size == 0:
            return "unsatisfiable"
        return max(size - suffix, 0), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or end < start:
        return "unsatisfiable"
    return start, end
