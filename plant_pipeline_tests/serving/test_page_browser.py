"""The identify page in a real browser: ``plant-pipeline serve`` on 127.0.0.1 and Debian's headless Chromium.

The service serves a model trained on demo flowers and promoted (conftest.py), as after ``make demo``; the browser
uploads a held-out demo photo as a person would and must find its category among the five names shown. The last
page is kept as artifacts/serving/identify_page.png (git-ignored), beside the service's log. Requests to anything
but 127.0.0.1 are blocked and fail the test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from plant_pipeline_tests.browser import CHROMIUM, CHROMIUM_FLAGS, is_local, require_browser
from plant_pipeline_tests.http_server import free_port

sync_api = require_browser()

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO_ROOT / "artifacts" / "serving"
STARTUP_TIMEOUT_S = 120
ANSWER_TIMEOUT_MS = 60_000


def _serve_command() -> list[str]:
    """The console script a user runs, where it is installed beside this interpreter; else the same code."""
    script = Path(sys.executable).with_name("plant-pipeline")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "plant_pipeline.cli"]


@pytest.fixture(scope="module")
def service_url(demo_model):
    """``plant-pipeline serve --data-dir <the demo model's> --port <free>``, stopped at the end of the module."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PLANT_PIPELINE_DATA_DIR", None)  # --data-dir alone says where the model is
    log_path = ARTIFACTS / "serve.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen([*_serve_command(), "serve", "--data-dir", str(demo_model.data_dir), "--port",
                                   str(port), "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while True:
                assert server.poll() is None, f"plant-pipeline serve exited with {server.returncode}; see {log_path}"
                try:
                    with urllib.request.urlopen(f"{url}/healthz", timeout=2) as reply:
                        if reply.status == 200:
                            break
                except OSError:
                    pass
                assert time.monotonic() < deadline, \
                    f"no answer from {url}/healthz in {STARTUP_TIMEOUT_S} s; see {log_path}"
                time.sleep(0.25)
            yield url
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


@pytest.fixture(scope="module")
def page(service_url):
    """A page of headless Chromium that may reach 127.0.0.1 only; a request elsewhere is aborted and fails."""
    outside: list[str] = []

    def guard(route):
        if is_local(route.request.url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort("blockedbyclient")

    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            context = chromium.new_context(viewport={"width": 1200, "height": 900})
            context.route("**/*", guard)
            page = context.new_page()
            page.goto(f"{service_url}/")
            yield page
        finally:
            chromium.close()
    assert not outside, f"the page tried to reach beyond 127.0.0.1: {outside}"


def test_a_held_out_demo_photo_is_identified_in_the_browser(page, demo_model):
    photo, category = demo_model.held_out[0]
    page.locator("#model").filter(has_text=demo_model.model_id).wait_for()  # the page asked /healthz
    page.set_input_files("input#photo", str(photo))
    results = page.locator("ol#results li.result")
    results.first.wait_for(timeout=ANSWER_TIMEOUT_MS)
    page.screenshot(path=ARTIFACTS / "identify_page.png", full_page=True)

    shown = [page_name.strip() for page_name in results.locator(".name").all_inner_texts()]
    assert len(shown) == 5
    assert category in shown, f"{photo.name} is a {category!r}; the page shows {shown}"
    scores = [float(text.strip().rstrip("%")) for text in results.locator(".score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 100.05, scores
    widths = results.locator(".bar > span").evaluate_all("spans => spans.map(s => s.getBoundingClientRect().width)")
    assert len(widths) == 5 and widths[0] > 0 and widths == sorted(widths, reverse=True), widths
    # The preview shows the photo itself, decoded by the browser.
    preview = page.locator("img#preview")
    assert preview.is_visible()
    natural = preview.evaluate("img => [img.complete, img.naturalWidth, img.naturalHeight]")
    assert natural[0] and natural[1] > 0 and natural[2] > 0, natural
    assert demo_model.model_id in page.locator("#model").inner_text()
    assert page.locator("#error").inner_text().strip() == ""


def test_a_non_image_shows_an_error_and_the_page_keeps_working(page, demo_model, tmp_path):
    note = tmp_path / "notes.txt"
    note.write_text("this is not a photo")
    page.set_input_files("input#photo", str(note))
    error = page.locator("#error")
    error.filter(has_text="notes.txt").wait_for(timeout=ANSWER_TIMEOUT_MS)
    assert page.locator("ol#results li.result").count() == 0

    photo, category = demo_model.held_out[-1]  # another class
    page.set_input_files("input#photo", str(photo))
    results = page.locator("ol#results li.result")
    results.first.wait_for(timeout=ANSWER_TIMEOUT_MS)
    assert error.inner_text().strip() == ""
    shown = [name.strip() for name in results.locator(".name").all_inner_texts()]
    assert category in shown, f"{photo.name} is a {category!r}; the page shows {shown}"
