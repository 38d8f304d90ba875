"""Debian's headless Chromium for the browser tests (the Dagster UI, the identify page), driven by Playwright.

One setup for the suite: where Chromium is, how it is launched (never Playwright's own browser download), and
which addresses a page may reach (127.0.0.1 only). ``require_browser()`` skips the calling test module, saying
why, where Playwright or Chromium is missing.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest

CHROMIUM = Path(os.environ.get("PLANT_PIPELINE_CHROMIUM", "/usr/bin/chromium"))
# Playwright adds --headless itself. No download of a browser of its own: Debian's is used.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync",
                  # Even a request the page guard missed cannot resolve a host other than 127.0.0.1.
                  "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"]


def require_browser():
    """Playwright's sync API; skips the calling module where Playwright or Chromium is missing."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                                   "(it comes with pip install -e '.[test]')")
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium (apt-get install chromium; .ci/run does) "
                    "or point PLANT_PIPELINE_CHROMIUM at one", allow_module_level=True)
    return sync_api


def is_local(url: str) -> bool:
    """Whether a page may load ``url``: 127.0.0.1, or data that never leaves the page."""
    parts = urlsplit(url)
    return parts.scheme in ("data", "blob", "about") or parts.hostname == "127.0.0.1"
