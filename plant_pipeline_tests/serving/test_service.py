"""The identify web service with a real Identifier on the untrained tiny model: uploads, every bad upload, the
bounded queue, switching models under load, the production watcher, /healthz and the page."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from plant_pipeline.ml.data.categories import CategoryMap
from plant_pipeline.ml.serving.identifier import Identifier
from plant_pipeline.ml.serving.registry import ModelInfo, write_pointer
from plant_pipeline.ml.testing import make_model_folder
from plant_pipeline.service.app import create_app

CATEGORIES = CategoryMap(names=("pink primrose", "rose", "sunflower", "daisy"), display_names={"rose": "Garden rose"})


def png(color=(200, 30, 40), size=(32, 32), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("service_models")
    # Raw model folders: the Identifier names each by its folder (model-a, model-b).
    return {name: make_model_folder(root / name, CATEGORIES, models_dir=tiny_model_dir.parent)
            for name in ("model-a", "model-b")}


@pytest.fixture(scope="module")
def identifiers(model_folders):
    return {name: Identifier.load(folder, device="cpu") for name, folder in model_folders.items()}


class Gated:
    """An Identifier whose identify() waits until the test opens the gate: holds a batch in flight on demand."""

    def __init__(self, identifier: Identifier) -> None:
        self.inner, self.gate, self.entered = identifier, threading.Event(), threading.Event()
        self.info, self.categories, self.max_batch = identifier.info, identifier.categories, identifier.max_batch

    def identify(self, images, top_k=5, **kwargs):
        self.entered.set()
        assert self.gate.wait(30), "the test never opened the gate"
        return self.inner.identify(images, top_k, **kwargs)


def upload(*files: tuple[str, bytes]) -> list:
    return [("files", (name, data, "application/octet-stream")) for name, data in files]


def test_one_photo_and_several_photos(identifiers):
    app = create_app(identifiers["model-a"], watch_interval_s=None)
    with TestClient(app) as client:
        one = client.post("/v1/identify", files=upload(("red.png", png())))
        several = client.post("/v1/identify", params={"top_k": 4},
                              files=upload(("a.png", png((250, 0, 0))), ("b.jpg", png((0, 250, 0), fmt="JPEG")),
                                           ("c.webp", png((0, 0, 250), fmt="WEBP"))))
    assert one.status_code == 200, one.text
    body = one.json()
    assert body["model"]["model_id"] == "model-a"
    [result] = body["results"]
    assert result["photo"] == "red.png" and len(result["top"]) == 4  # default top 5, but only 4 categories
    assert several.status_code == 200, several.text
    results = several.json()["results"]
    assert [r["photo"] for r in results] == ["a.png", "b.jpg", "c.webp"]
    for r in results:  # all 4 categories asked for: a softmax over them sums to 1
        assert sum(g["score"] for g in r["top"]) == pytest.approx(1.0, abs=1e-4)
        assert {g["name"] for g in r["top"]} == set(CATEGORIES.names)
        assert {g["display_name"] for g in r["top"]} >= {"Garden rose"}


def test_every_bad_upload_gets_its_4xx_and_the_service_stays_up(identifiers):
    app = create_app(identifiers["model-a"], max_upload_bytes=20_000, max_pixels=64 * 64, max_queue=4,
                     watch_interval_s=None)
    noise = bytes(range(256)) * 100  # 25,600 bytes: over the 20,000-byte limit per photo
    bad = {
        "not an image": (upload(("leaf.txt", b"this is not a photo")), 400, "leaf.txt: not an image"),
        "empty": (upload(("empty.jpg", b"")), 400, "empty.jpg: the file is empty"),
        "over the byte limit": (upload(("big.png", noise)), 413, "big.png: over the limit of 20,000 bytes"),
        "over the pixel limit": (upload(("wide.png", png(size=(65, 64)))), 413, "wide.png: 65x64 is 4,160 pixels"),
        "bad among good": (upload(("ok.png", png()), ("leaf.txt", b"nope")), 400, "leaf.txt"),
        "too many photos": (upload(*[(f"{i}.png", png()) for i in range(5)]), 413, "5 photos in one request"),
    }
    with TestClient(app) as client:
        for case, (files, status, detail) in bad.items():
            response = client.post("/v1/identify", files=files)
            assert response.status_code == status, (case, response.text)
            assert response.json()["detail"].startswith(detail), (case, response.text)
        no_files = client.post("/v1/identify", data={"comment": "forgot the photo"})
        top_k = client.post("/v1/identify", params={"top_k": 5}, files=upload(("ok.png", png())))
        whole_body = client.post("/v1/identify", files=upload(*[(f"{i}.bin", noise * 3) for i in range(4)]))
        chunked = client.post("/v1/identify", content=(noise for _ in range(20)),
                              headers={"Content-Type": "multipart/form-data; boundary=x"})
        good = client.post("/v1/identify", files=upload(("ok.png", png())))
    assert no_files.status_code == 400 and "no photos" in no_files.json()["detail"]
    assert top_k.status_code == 400 and "between 1 and 4" in top_k.json()["detail"]
    # Over the whole-body limit: refused from Content-Length before parsing, and, without one, while streaming.
    assert whole_body.status_code == 413 and "request body of" in whole_body.json()["detail"]
    assert chunked.status_code == 413 and "over the limit" in chunked.json()["detail"]
    assert good.status_code == 200 and good.json()["results"][0]["photo"] == "ok.png"


async def _lifespan_client(app):
    """An httpx client on the app in this event loop (concurrent requests), with the app's lifespan running."""
    lifespan = app.router.lifespan_context(app)
    await lifespan.__aenter__()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    return lifespan, client


async def _wait_for(predicate, seconds=20.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_a_full_queue_answers_503_with_retry_after(identifiers):
    gated = Gated(identifiers["model-a"])
    app = create_app(gated, max_batch=1, window_ms=0, max_queue=2, watch_interval_s=None)

    async def main():
        lifespan, client = await _lifespan_client(app)
        try:
            def post(name):
                return client.post("/v1/identify", files=upload((name, png())))

            first = asyncio.create_task(post("1.png"))
            await _wait_for(gated.entered.is_set)  # 1.png is being scored
            queued = [asyncio.create_task(post("2.png")), asyncio.create_task(post("3.png"))]
            await _wait_for(lambda: app.state.batcher.waiting == 2)
            refused = await post("4.png")
            gated.gate.set()
            answered = await asyncio.gather(first, *queued)
            later = await post("5.png")
            return refused, answered, later
        finally:
            gated.gate.set()
            await client.aclose()
            await lifespan.__aexit__(None, None, None)

    refused, answered, later = asyncio.run(main())
    assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
    assert "busy" in refused.json()["detail"]
    assert [r.status_code for r in answered] == [200, 200, 200]
    assert later.status_code == 200


def test_switching_models_under_load_drops_no_request(identifiers):
    gated = Gated(identifiers["model-a"])
    app = create_app(gated, max_batch=2, window_ms=5, max_queue=32, watch_interval_s=None)

    async def main():
        lifespan, client = await _lifespan_client(app)
        try:
            def post(i):
                return client.post("/v1/identify", files=upload((f"{i}.png", png((i * 20, 0, 0)))))

            before = [asyncio.create_task(post(0))]
            await _wait_for(gated.entered.is_set)  # model-a's batch is in flight ...
            waiting = [asyncio.create_task(post(i)) for i in range(1, 8)]
            await _wait_for(lambda: app.state.batcher.waiting == 7)
            app.state.swap(identifiers["model-b"])  # ... when the switch happens
            gated.gate.set()
            answered = await asyncio.gather(*before, *waiting)
            after = await post(9)
            health = await client.get("/healthz")
            return answered, after, health
        finally:
            gated.gate.set()
            await client.aclose()
            await lifespan.__aexit__(None, None, None)

    answered, after, health = asyncio.run(main())
    assert [r.status_code for r in answered] == [200] * 8
    models = [r.json()["model"]["model_id"] for r in answered]
    assert models == ["model-a"] + ["model-b"] * 7  # the batch in flight finished on the old model
    for r in answered:  # each answer reports the model that actually scored it
        assert r.json()["results"][0]["model_id"] == r.json()["model"]["model_id"]
    assert after.json()["model"]["model_id"] == "model-b"
    health = health.json()
    assert health["status"] == "ok" and health["model"] == identifiers["model-b"].info.to_json()
    # 9 photos: 1 alone (in flight while the rest queued), then the 7 queued in batches of at most 2, then 1
    assert health["batching"] == {"waiting": 0, "batches": 6, "photos": 9, "largest_batch": 2}


def test_the_service_follows_the_production_pointer(identifiers, model_folders, tmp_path):
    def point_at(name: str) -> None:
        write_pointer(ModelInfo(model_id=name, base_model="tiny-random-llava", data_version="test",
                                model_path=str(model_folders[name])), tmp_path)

    point_at("model-a")
    app = create_app(identifiers["model-a"], model="production", data_dir=tmp_path, device="cpu",
                     watch_interval_s=0.05)
    with TestClient(app) as client:
        assert client.get("/healthz").json()["model"]["model_id"] == "model-a"
        point_at("model-b")
        deadline = time.monotonic() + 30
        while client.get("/healthz").json()["model"]["model_id"] != "model-b":
            assert time.monotonic() < deadline, "the service never switched to the promoted model"
            time.sleep(0.05)
        answer = client.post("/v1/identify", files=upload(("x.png", png())))
    assert answer.status_code == 200 and answer.json()["model"]["model_id"] == "model-b"


def test_the_page_has_its_parts_and_loads_nothing_from_elsewhere(identifiers):
    with TestClient(create_app(identifiers["model-a"], watch_interval_s=None)) as client:
        page = client.get("/")
        docs = client.get("/openapi.json")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    for part in ('id="photo"', 'type="file"', 'id="preview"', 'id="results"', 'id="model"', 'id="error"',
                 '"result"', '"name"', '"score"', '"bar"', "/v1/identify"):
        assert part in html, part
    assert "http://" not in html and "https://" not in html and "//cdn" not in html
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "/v1/identify" in docs.json()["paths"]
