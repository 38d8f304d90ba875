"""``dagster dev`` for tests: started on 127.0.0.1 at a free port, stopped with every process it spawned.

    with DagsterDev(repo_root, dagster_home, env={"PLANT_PIPELINE_DATA_DIR": ...}, log_path=...) as ui:
        page.goto(ui.url)

``env --default-signal=INT`` undoes an inherited ignored SIGINT (a shell's ``&``), to which dagster dev maps
SIGTERM; ``kill -TERM PID`` then stops the webserver, the daemon and the code server. Whatever is still alive
after that (by the PIDs recorded while it ran) is killed, so a failing test leaves no process behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from plant_pipeline_tests.http_server import free_port

_WORKSPACE_QUERY = "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus } } } }"


class DagsterDev:
    """``dagster dev -w workspace.yaml`` run from ``repo_root``, with ``dagster_home`` as its instance."""

    def __init__(self, repo_root: Path, dagster_home: Path, *, env: dict[str, str] | None = None,
                 log_path: Path, startup_timeout: float = 120.0, stop_timeout: float = 20.0):
        self.repo_root = Path(repo_root)
        self.dagster_home = Path(dagster_home)
        self.extra_env = dict(env or {})
        self.log_path = Path(log_path)
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen | None = None
        self._log = None
        self._spawned: dict[int, psutil.Process] = {}

    def start(self) -> DagsterDev:
        dagster = Path(sys.executable).with_name("dagster")
        command = [shutil.which("env") or "env", "--default-signal=INT", str(dagster), "dev",
                   "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(self.port), "--live-data-poll-rate", "500"]
        env = {**os.environ, "DAGSTER_HOME": str(self.dagster_home), **self.extra_env}
        self._log = self.log_path.open("wb")
        self._process = subprocess.Popen(command, cwd=self.repo_root, env=env, stdin=subprocess.DEVNULL,
                                         stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._wait_until_loaded()
        except BaseException:
            self.stop()
            raise
        return self

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        request = urllib.request.Request(f"{self.url}/graphql", data=json.dumps(
            {"query": query, "variables": variables or {}}).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def _remember_children(self) -> None:
        try:
            for child in psutil.Process(self._process.pid).children(recursive=True):
                self._spawned.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass

    def _wait_until_loaded(self) -> None:
        """Until the webserver answers and the code location has loaded."""
        deadline = time.monotonic() + self.startup_timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            self._remember_children()
            if self._process.poll() is not None:
                raise RuntimeError(f"dagster dev exited with {self._process.returncode} while starting; "
                                   f"see {self.log_path}:\n{self.log_tail()}")
            try:
                entries = self.graphql(_WORKSPACE_QUERY)["data"]["workspaceOrError"]["locationEntries"]
                last = str(entries)
                if entries and all(entry["loadStatus"] == "LOADED" for entry in entries):
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError, KeyError, TypeError) as error:
                last = repr(error)
            time.sleep(0.5)
        raise TimeoutError(f"dagster dev on {self.url} not ready after {self.startup_timeout:.0f} s ({last}); "
                           f"see {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM to dagster dev, which stops its children; anything left after the timeout is killed."""
        if self._process is None:
            return
        self._remember_children()
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        leftovers = [p for p in self._spawned.values() if p.is_running()]
        for process in leftovers:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(leftovers, timeout=5)
        self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> DagsterDev:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
