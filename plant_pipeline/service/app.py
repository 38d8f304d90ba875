"""The identify web service: ``POST /v1/identify`` (photos in, top-k plants out), the page at ``/``, ``/healthz``.

Uploads are checked before any model work (body size, each file's size, each image's pixel count), so a bad one
gets a 4xx naming it and costs nothing. Good photos go through the Batcher, which scores concurrent requests in one
forward. A watcher follows the production pointer and swaps in a newly promoted model between batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
from importlib import resources
from typing import Annotated, Any

from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import HTMLResponse
from PIL import Image

from plant_pipeline.ml.errors import UsageError
from plant_pipeline.ml.serving.identifier import Identification, Identifier
from plant_pipeline.ml.serving.photos import MAX_PHOTO_BYTES, MAX_PIXELS, PhotoError, PhotoTooLarge, read_photo
from plant_pipeline.ml.serving.registry import PRODUCTION, ModelInfo, read_pointer
from plant_pipeline.service.batcher import Batcher, BatcherClosed, QueueFull
from plant_pipeline.service.body_limit import BodyLimit

logger = logging.getLogger(__name__)

IDENTIFY_PATH = "/v1/identify"
DEFAULT_TOP_K = 5
# The page may load nothing from elsewhere and evaluates no strings; the photo preview is a blob: URL of the picked
# file. (A browser-automation script that evaluates strings runs with the policy bypassed, not loosened for it.)
PAGE_POLICY = ("default-src 'self'; img-src 'self' blob: data:; style-src 'unsafe-inline'; "
               "script-src 'unsafe-inline'; connect-src 'self'; form-action 'none'; base-uri 'none'")


class ModelInService:
    """The Identifier that scores the next batch. swap() replaces it at once; a batch in flight keeps the one it
    started with, so no request is dropped or answered by a half-switched model."""

    def __init__(self, identifier: Identifier, max_batch: int, max_pixels: int = MAX_PIXELS) -> None:
        self.max_batch, self.max_pixels = max_batch, max_pixels
        self.infos: dict[str, ModelInfo] = {}  # model_id -> info, to report the model that answered each request
        self.identifier = identifier
        self.swap(identifier)

    def swap(self, identifier: Identifier) -> None:
        # One forward per batch: the Identifier splits its input into chunks of its max_batch.
        identifier.max_batch = max(identifier.max_batch, self.max_batch)
        self.infos[identifier.info.model_id] = identifier.info
        previous, self.identifier = self.identifier, identifier
        if previous is not identifier:
            logger.info("model in service: %s (was %s)", identifier.info.model_id, previous.info.model_id)

    def score(self, images: list[Image.Image], top_k: int) -> list[Identification]:
        identifier = self.identifier  # read once: this whole batch is scored by one model
        # The uploads passed the service's pixel limit already; the Identifier's own default must not differ.
        return identifier.identify(images, top_k=min(top_k, len(identifier.categories)), max_pixels=self.max_pixels)


def create_app(
    identifier: Identifier | None = None,
    *,
    model: str | os.PathLike = PRODUCTION,
    data_dir: str | os.PathLike | None = None,
    device: str = "auto",
    max_batch: int = 16,
    window_ms: float = 10.0,
    max_queue: int = 64,
    max_upload_bytes: int = MAX_PHOTO_BYTES,
    max_pixels: int = MAX_PIXELS,
    watch_interval_s: float | None = 2.0,
    max_request_bytes: int | None = None,
) -> FastAPI:
    """The service for ``identifier``, or for the Identifier loaded from ``model`` ("production" or a folder).

    With the production model (``model="production"``) the pointer is read every ``watch_interval_s`` seconds
    (None or 0: never) and a newly promoted model replaces the one in service. Each photo may have at most
    ``max_upload_bytes`` bytes and ``max_pixels`` pixels, and a whole request at most ``max_request_bytes`` (default:
    8 photos of the largest size). Raises UsageError (e.g. NoProductionModel) when no model can be loaded.
    """
    if identifier is None:
        identifier = Identifier.load(model, device=device, data_dir=data_dir)
    serving = ModelInService(identifier, max_batch, max_pixels)
    batcher = Batcher(serving.score, max_batch=max_batch, window_ms=window_ms, max_queue=max_queue)
    follow_production = str(model) == PRODUCTION and bool(watch_interval_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        watcher = (asyncio.create_task(_follow_production(serving, data_dir, device, watch_interval_s))
                   if follow_production else None)
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            await batcher.stop()  # answers the requests already queued

    app = FastAPI(title="plant_pipeline", summary="Identify a plant from a photo", lifespan=lifespan)
    # Checked before multipart parsing spools the body to disk, so a huge request costs neither memory nor disk.
    if max_request_bytes is None:
        max_request_bytes = 8 * max_upload_bytes + 65536  # multipart framing is a few hundred bytes per file
    app.add_middleware(BodyLimit, path=IDENTIFY_PATH, max_bytes=max_request_bytes,
                       what=f"photos of at most {max_upload_bytes:,} bytes each")
    app.state.serving = serving
    app.state.batcher = batcher
    app.state.swap = serving.swap

    @app.post(IDENTIFY_PATH, summary="Identify the plants in one or more photos")
    async def identify(
        files: Annotated[list[UploadFile] | None, File(description="One or more photos (any format Pillow reads).")]
        = None,
        top_k: Annotated[int | None, Query(description=f"Guesses per photo, 1 to the number of categories (default "
                                                       f"{DEFAULT_TOP_K}, or all when there are fewer).")] = None,
    ) -> dict[str, Any]:
        if not files:
            raise HTTPException(400, "no photos: send one or more image files in the multipart field 'files'")
        if len(files) > max_queue:
            raise HTTPException(413, f"{len(files)} photos in one request; at most {max_queue}: send fewer at a time")
        categories = len(serving.identifier.categories)
        if top_k is None:
            top_k = min(DEFAULT_TOP_K, categories)
        elif not 1 <= top_k <= categories:
            raise HTTPException(400, f"top_k must be between 1 and {categories} (the model's categories); got {top_k}")
        names = [upload.filename or f"photo {i + 1}" for i, upload in enumerate(files)]
        try:
            batcher.check_room(len(files))  # a busy service refuses before spending CPU on decoding
            images = [await _read_upload(upload, name, max_upload_bytes, max_pixels)
                      for upload, name in zip(files, names)]
            results = await batcher.submit(images, top_k)
        except QueueFull as error:
            raise HTTPException(503, str(error), headers={"Retry-After": str(math.ceil(error.retry_after))}) from None
        except BatcherClosed as error:
            raise HTTPException(503, str(error), headers={"Retry-After": "1"}) from None
        # The scorer saw bare images: give each answer its upload's name.
        results = [dataclasses.replace(result, photo=name) for result, name in zip(results, names)]
        info = serving.infos[results[0].model_id]
        return {"model": info.to_json(), "results": [result.to_json() for result in results]}

    @app.get("/healthz", summary="The model in service, and how the batching goes")
    async def healthz() -> dict[str, Any]:
        stats = batcher.stats
        return {"status": "ok", "model": serving.identifier.info.to_json(),
                "batching": {"waiting": batcher.waiting, "batches": stats.batches, "photos": stats.photos,
                             "largest_batch": stats.largest_batch}}

    page = resources.files("plant_pipeline.service").joinpath("index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_POLICY})

    return app


async def _read_upload(upload: UploadFile, name: str, max_bytes: int, max_pixels: int) -> Image.Image:
    """One upload as an RGB image, or an HTTPException naming it: 413 too large, 400 anything else."""
    data = await upload.read(max_bytes + 1)  # never more than the limit into memory
    if len(data) > max_bytes:
        raise HTTPException(413, f"{name}: over the limit of {max_bytes:,} bytes per photo; send a smaller photo")
    try:
        # Decoding is CPU work: off the event loop.
        return await asyncio.to_thread(read_photo, data, name=name, max_bytes=max_bytes, max_pixels=max_pixels)
    except PhotoTooLarge as error:
        raise HTTPException(413, str(error)) from None
    except PhotoError as error:
        raise HTTPException(400, str(error)) from None


async def _follow_production(serving: ModelInService, data_dir: str | os.PathLike | None, device: str,
                             interval_s: float) -> None:
    """Poll the production pointer; when it names another model, load it (in a thread) and swap it in."""
    tried: str | None = None  # the pointer's model_id last acted on: a model that would not load is not retried
    while True:
        await asyncio.sleep(interval_s)
        try:
            info = await asyncio.to_thread(read_pointer, data_dir)
        except UsageError as error:
            logger.warning("production pointer unreadable, keeping %s: %s", serving.identifier.info.model_id, error)
            continue
        if info is None or info.model_id in (serving.identifier.info.model_id, tried):
            continue
        tried = info.model_id
        try:
            new = await asyncio.to_thread(Identifier.load, info.model_path, device=device, data_dir=data_dir)
        except Exception:  # a broken promotion must not take the service down: keep serving the current model
            logger.exception("could not load the newly promoted model %s from %s; keeping %s", info.model_id,
                             info.model_path, serving.identifier.info.model_id)
            continue
        serving.swap(new)
