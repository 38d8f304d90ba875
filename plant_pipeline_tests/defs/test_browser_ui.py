"""The Dagster UI in a real browser: ``dagster dev`` on 127.0.0.1 and Debian's headless Chromium (Playwright).

Before the UI starts, the whole graph is materialised once on tiny synthetic data (as in test_assets_pipeline.py)
into the instance ``dagster dev`` then serves. Each test leaves a screenshot of its last page in artifacts/ui/
(git-ignored), beside dagster dev's log. Requests to anything but 127.0.0.1 are blocked and reported.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
from dagster import AssetKey, DagsterInstance, DagsterRunStatus, MarkdownMetadataValue

from plant_pipeline import definitions
from plant_pipeline.ml.data.demo_release import make_demo_release
from plant_pipeline_tests.browser import CHROMIUM, CHROMIUM_FLAGS, is_local, require_browser
from plant_pipeline_tests.defs.test_assets_pipeline import Pipeline
from plant_pipeline_tests.ui_server import DagsterDev

sync_api = require_browser()

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO_ROOT / "artifacts" / "ui"
# The quickest whole-graph run that still scores every class: two training steps, no base-model comparison.
TRAIN = {"max_steps": 2, "save_steps": 2, "eval_steps": 2, "logging_steps": 1, "max_eval_samples": 8}
EVALUATION = {"compare_with_base": False, "batch_size": 64}
RUN_TIMEOUT_MS = 120_000

# Asset nodes and lineage edges of the graph as drawn: nodes are <foreignObject>s, edges are paths with an
# arrow marker that start on the right side of the upstream node and end at the left side of the downstream one.
_NODES_JS = """() => Array.from(document.querySelectorAll('svg foreignObject:not(.group)')).map(e => ({
    text: e.textContent.trim(), x: +e.getAttribute('x'), y: +e.getAttribute('y'),
    w: +e.getAttribute('width'), h: +e.getAttribute('height')}))"""
_EDGES_JS = "() => Array.from(document.querySelectorAll('svg path[marker-end]')).map(e => e.getAttribute('d'))"


@dataclass
class UI:
    server: DagsterDev
    dagster_home: Path
    setup_run_id: str

    @property
    def url(self) -> str:
        return self.server.url


@dataclass
class Browser:
    context: object
    outside_requests: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """dagster dev over an instance that already holds a whole-graph run on tiny data."""
    root = tmp_path_factory.mktemp("ui")
    home = root / "dagster_home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "config" / "dagster.yaml", home / "dagster.yaml")
    data_dir = root / "data"
    release = make_demo_release(root / "release", train_per_class=1, validation_per_class=1, test_per_class=1,
                                image_size=32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only cost synchronisation
    try:
        with pytest.MonkeyPatch.context() as env, DagsterInstance.from_config(str(home)) as instance:
            env.setenv("OMP_NUM_THREADS", "1")  # reaches the training child process
            result = Pipeline(data_dir, release.out_dir, instance).materialize(train=TRAIN, evaluation=EVALUATION)
    finally:
        torch.set_num_threads(threads)
    assert result.success, "the setup run of the whole graph failed"

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    env = {"PLANT_PIPELINE_DATA_DIR": str(data_dir), "PLANT_PIPELINE_MODEL": "tiny-random-llava",
           "HF_HUB_OFFLINE": "1"}
    with DagsterDev(REPO_ROOT, home, env=env, log_path=ARTIFACTS / "dagster_dev.log") as server:
        # What "Skip" on Dagster's one-time welcome dialog does, so that it never covers a page mid-test.
        assert server.graphql("mutation { setNuxSeen }")["data"]["setNuxSeen"]
        yield UI(server, home, result.run_id)


@pytest.fixture(scope="module")
def browser(ui):
    """Headless Chromium whose pages may reach 127.0.0.1 only; anything else is aborted and recorded."""
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            context = chromium.new_context(viewport={"width": 1600, "height": 1000})
            session = Browser(context)

            def guard(route):
                if is_local(route.request.url):
                    route.continue_()
                else:
                    session.outside_requests.append(route.request.url)
                    route.abort("blockedbyclient")

            def watch_websockets(page):
                page.on("websocket", lambda ws: None if is_local(ws.url) else session.outside_requests.append(ws.url))

            context.route("**/*", guard)
            context.on("page", watch_websockets)
            yield session
        finally:
            chromium.close()


@pytest.fixture
def page(browser, request):
    """A fresh page; its last state is saved as artifacts/ui/<test name>.png, pass or fail."""
    page = browser.context.new_page()
    yield page
    page.screenshot(path=ARTIFACTS / f"{request.node.name}.png")
    page.close()
    assert not browser.outside_requests, f"the UI tried to reach beyond 127.0.0.1: {browser.outside_requests}"


def _drawn_graph(page) -> tuple[set[str], set[tuple[str, str]]]:
    """The asset names and (upstream, downstream) edges drawn in the lineage graph, read from the SVG."""
    names = {key.to_user_string() for key in definitions.defs().resolve_asset_graph().get_all_asset_keys()}
    nodes = {}
    for node in page.evaluate(_NODES_JS):
        # Zoomed out a node shows its name only; zoomed in, its name and then its status rows.
        matches = [name for name in names if node["text"].startswith(name)]
        if matches:
            nodes[max(matches, key=len)] = node

    def node_at(x: float, y: float, side: str) -> str | None:
        for name, n in nodes.items():
            edge_x = n["x"] + n["w"] if side == "right" else n["x"]
            if abs(x - edge_x) <= 12 and n["y"] <= y <= n["y"] + n["h"]:
                return name
        return None

    edges = set()
    for path in page.evaluate(_EDGES_JS):
        numbers = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", path or "")]
        if len(numbers) >= 4:
            edges.add((node_at(numbers[0], numbers[1], "right"), node_at(numbers[-2], numbers[-1], "left")))
    return set(nodes), edges


def test_requests_beyond_localhost_are_blocked_and_recorded(page, ui, browser):
    """The guard the other tests rely on: a page's request to another address never leaves."""
    page.goto(f"{ui.url}/server_info")
    outcome = page.evaluate("url => fetch(url).then(() => 'answered', () => 'blocked')", "http://198.51.100.7/")
    assert outcome == "blocked"
    assert browser.outside_requests == ["http://198.51.100.7/"]
    browser.outside_requests.clear()


def test_asset_graph_shows_every_asset_and_its_lineage(page, ui):
    graph = definitions.defs().resolve_asset_graph()
    expected_nodes = {key.to_user_string() for key in graph.get_all_asset_keys()}
    expected_edges = {(parent.to_user_string(), key.to_user_string())
                      for key in graph.get_all_asset_keys() for parent in graph.get(key).parent_keys}
    assert {"oxford_flowers", "category_map", "flower_shards", "trained_model", "model_evaluation"} <= expected_nodes

    page.goto(f"{ui.url}/asset-groups")
    page.locator("svg foreignObject").first.wait_for()
    # Groups start collapsed; "Expand all groups" (Alt+E) draws every asset.
    page.keyboard.press("Alt+e")
    deadline = time.monotonic() + 30
    while True:  # the graph lays out and draws asynchronously
        nodes, edges = _drawn_graph(page)
        if (nodes, edges) == (expected_nodes, expected_edges) or time.monotonic() > deadline:
            break
        page.wait_for_timeout(250)
    assert nodes == expected_nodes
    assert edges == expected_edges


def test_materialize_category_map_from_the_ui(page, ui):
    page.goto(f"{ui.url}/assets/category_map")
    page.get_by_role("button").filter(has_text=re.compile(r"^Materialize$")).click()
    # The toast "Launched run <id>" links to the run.
    view = page.locator("a[href^='/runs/']").filter(has_text="View")
    view.wait_for()
    run_id = urlsplit(view.get_attribute("href")).path.rsplit("/", 1)[-1]
    view.click()
    status = page.get_by_text(re.compile(r"^(Success|Failure|Canceled)$"))
    status.first.wait_for(timeout=RUN_TIMEOUT_MS)
    assert status.first.inner_text() == "Success", f"the run's log is in {ui.server.log_path}"

    with DagsterInstance.from_config(str(ui.dagster_home)) as instance:
        run = instance.get_run_by_id(run_id)
        assert run.status == DagsterRunStatus.SUCCESS
        assert run.tags.get("dagster/from_ui") == "true"
        assert run.asset_selection == {AssetKey("category_map")}
        latest = instance.get_latest_materialization_event(AssetKey("category_map"))
        assert latest.run_id == run_id


def test_model_evaluation_latest_materialisation_shows_the_per_class_table(page, ui):
    with DagsterInstance.from_config(str(ui.dagster_home)) as instance:
        event = instance.get_latest_materialization_event(AssetKey("model_evaluation"))
    assert event.run_id == ui.setup_run_id
    per_class = event.asset_materialization.metadata["per_class"]
    columns = [column.name for column in per_class.schema.columns]

    page.goto(f"{ui.url}/assets/model_evaluation?view=events")
    # The events view opens on the latest materialisation.
    page.get_by_text(f"Materialized in run {ui.setup_run_id[:8]}").wait_for()
    key_cell = page.get_by_role("cell", name="per_class", exact=True)
    table = page.locator("tr").filter(has=key_cell).locator("table")
    table.wait_for()
    key_cell.scroll_into_view_if_needed()
    assert table.locator("thead th").all_inner_texts() == columns
    rows = table.locator("tbody tr")
    assert rows.count() == len(per_class.records) == 102
    names = rows.locator("td:nth-child(2)").all_inner_texts()
    assert names == [record.data["name"] for record in per_class.records]


# Every <img> of the open dialog once loaded: [start of src, natural width]; a broken picture has width 0.
_DIALOG_IMAGES_JS = """() => Array.from(document.querySelectorAll('[role=dialog] img')).map(
    i => [i.getAttribute('src').slice(0, 40), i.naturalWidth])"""
_DIALOG_IMAGES_LOADED_JS = "() => Array.from(document.querySelectorAll('[role=dialog] img')).every(i => i.complete)"


def test_model_evaluation_markdown_shows_no_broken_picture(page, ui):
    """Each Markdown entry (the report, the figures) opened in its dialog: every picture loads and fits the
    dialog, and the report links to no file beside it (relative links lead nowhere in the UI)."""
    with DagsterInstance.from_config(str(ui.dagster_home)) as instance:
        event = instance.get_latest_materialization_event(AssetKey("model_evaluation"))
    metadata = event.asset_materialization.metadata
    markdown = [key for key, value in metadata.items() if isinstance(value, MarkdownMetadataValue)]
    assert {"report", "confusion_matrix", "per_class_accuracy"} <= set(markdown)

    page.goto(f"{ui.url}/assets/model_evaluation?view=events")
    page.get_by_text(f"Materialized in run {ui.setup_run_id[:8]}").wait_for()
    pictures = {}
    for key in markdown:
        row = page.locator("tr").filter(has=page.get_by_role("cell", name=key, exact=True))
        row.get_by_text("[Show Markdown]").click()
        dialog = page.get_by_role("dialog")
        dialog.wait_for()
        page.wait_for_function(_DIALOG_IMAGES_LOADED_JS)
        pictures[key] = page.evaluate(_DIALOG_IMAGES_JS)
        width = dialog.evaluate("d => d.clientWidth")
        assert all(0 < natural <= width for _, natural in pictures[key]), (key, pictures[key], width)
        if key == "report":
            hrefs = dialog.locator("a[href]").evaluate_all("links => links.map(a => a.getAttribute('href'))")
            assert all(re.match(r"https?://", href) for href in hrefs), hrefs
            assert dialog.get_by_text(f"Evaluation of {Path(metadata['model_path'].value).name}").is_visible()
        page.keyboard.press("Escape")
        dialog.wait_for(state="hidden")
    assert pictures["confusion_matrix"] and pictures["per_class_accuracy"], pictures
