"""Benchmark: photos/s and latency of the identify web service, 8 concurrent clients against one at a time.

The service runs as a user starts it (``plant-pipeline serve`` in a subprocess, uvicorn on 127.0.0.1) with the tiny
model, untrained (speed does not depend on the weights) and the 102 Oxford category names. (a), the baseline: one
client sends one photo per request and waits for each answer. (b), ours: 8 clients (threads, one HTTP connection
each) send one photo per request at the same time, so the server's batcher scores them together. Photos are real
(the mini mirror's first JPEGs) when PLANT_PIPELINE_SHARED_DATASETS is set, else synthetic demo flowers. Both runs
follow a warm-up. For reference the Identifier is also timed in this process at batch 1 and batched: the most that
batching can gain on this machine, HTTP aside.

With a GPU (``--gpu``, the default when CUDA is available) it also times the Identifier on a random model of
llava-interleave-qwen-0.5b's shape (bench/evaluate.py builds it; nothing is downloaded): photos/s at batch 1 and
batched. Prints one table per part, then one JSON line.

    python bench/identify.py [--requests 64] [--clients 8] [--max-batch 16] [--window-ms 10] [--server-threads N]
                             [--gpu | --no-gpu] [--gpu-photos 64] [--gpu-batch 16]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from plant_pipeline.ml.data.categories import CATEGORY_NAMES, OXFORD_QUESTION, CategoryMap, oxford_map  # noqa: E402
from plant_pipeline.ml.data.demo_drawing import render_image  # noqa: E402
from plant_pipeline.ml.serving.identifier import Identifier  # noqa: E402
from plant_pipeline.ml.serving.registry import ModelInfo  # noqa: E402
from plant_pipeline.ml.testing import make_model_folder  # noqa: E402

GOAL_RATIO = 3.0
GOAL_P95_S = 1.0
SHARED_DATASETS_ENV = "PLANT_PIPELINE_SHARED_DATASETS"
STARTUP_TIMEOUT_S = 120


def load_photos(count: int) -> tuple[list[tuple[str, bytes]], str]:
    """``count`` photos as (name, JPEG bytes): the mini mirror's first ones where it is available, else demo ones."""
    shared = os.environ.get(SHARED_DATASETS_ENV)
    archive = Path(shared or "-") / "oxford-flowers-102-mini" / "102flowers.tgz"
    if shared and archive.is_file():
        photos = []
        with tarfile.open(archive) as tar:  # streamed: only the first members are read
            for member in tar:
                if member.isfile() and member.name.endswith(".jpg"):
                    photos.append((Path(member.name).name, tar.extractfile(member).read()))
                    if len(photos) == count:
                        break
        return photos, f"real photos ({archive})"
    photos = []
    for i in range(count):
        buffer = io.BytesIO()
        render_image(i % 102, "test", i // 102, image_size=96).save(buffer, format="JPEG", quality=90)
        photos.append((f"demo_{i:03d}.jpg", buffer.getvalue()))
    return photos, f"synthetic demo photos (set {SHARED_DATASETS_ENV} for real ones)"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command() -> list[str]:
    """``plant-pipeline`` beside this interpreter (the console script), else the same code as a module."""
    script = Path(sys.executable).with_name("plant-pipeline")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "plant_pipeline.cli"]


class Service:
    """``plant-pipeline serve`` on 127.0.0.1 in a subprocess, stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, model: Path, *, max_batch: int, window_ms: float, threads: int | None, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [*serve_command(), "serve", "--model", str(model), "--device", "cpu", "--port",
                        str(self.port), "--max-batch", str(max_batch), "--window-ms", str(window_ms),
                        "--max-queue", "256", "--watch-interval", "3600"]
        self.env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        self.log = log

    def __enter__(self) -> Service:
        self._log = open(self.log, "wb")
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited with {self.process.returncode}; its log: "
                                   f"{self.log.read_text(errors='replace')[-2000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the service did not answer /healthz within {STARTUP_TIMEOUT_S} s; see {self.log}")
            time.sleep(0.2)

    def __exit__(self, *_) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()

    def batching(self) -> dict:
        return httpx.get(f"{self.url}/healthz", timeout=10).json().get("batching", {})


def run_clients(url: str, photos: list[tuple[str, bytes]], *, clients: int, requests: int) -> dict:
    """``requests`` one-photo requests from ``clients`` threads at once; photos/s over the wall time and latencies."""
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))
    start = threading.Barrier(clients + 1)

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            start.wait()
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                name, data = photos[i % len(photos)]
                began = time.perf_counter()
                reply = http.post("/v1/identify", files={"files": (name, data, "image/jpeg")})
                took = time.perf_counter() - began
                with lock:
                    if reply.status_code == 200 and len(reply.json()["results"]) == 1:
                        latencies.append(took)
                    else:
                        failures.append(f"{name}: {reply.status_code} {reply.text[:200]}")

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    if failures:
        raise RuntimeError(f"{len(failures)} of {requests} requests failed, e.g. {failures[0]}")
    return {"clients": clients, "requests": requests, "seconds": round(wall, 3),
            "photos_per_second": round(requests / wall, 3),
            "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 1),
            "p95_ms": round(1000 * float(np.percentile(latencies, 95)), 1)}


def in_process(identifier: Identifier, images: list, batch: int, repeats: int = 1) -> float:
    """Photos/s of identify() in this process when ``batch`` photos go in one call (one forward)."""
    identifier.identify(images[:batch])  # warm-up at this shape
    began = time.perf_counter()
    done = 0
    for _ in range(repeats):
        for start in range(0, len(images), batch):
            done += len(identifier.identify(images[start:start + batch]))
    return done / (time.perf_counter() - began)


def print_table(title: str, rows: list[tuple[str, ...]]) -> None:
    print(title)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def categories_of(count: int) -> CategoryMap:
    """Oxford's categories (the demo's), or the first ``count`` of them: scoring cost grows with their number."""
    if not 2 <= count <= len(CATEGORY_NAMES):
        raise SystemExit(f"--categories must be between 2 and {len(CATEGORY_NAMES)}; got {count}")
    return oxford_map() if count == len(CATEGORY_NAMES) else CategoryMap(CATEGORY_NAMES[:count], OXFORD_QUESTION)


def cpu_service(args, tmp: Path) -> dict:
    photos, photo_source = load_photos(args.photos)
    model = make_model_folder(tmp / "model", categories_of(args.categories), models_dir=tmp / "models")
    # The same model in this process, HTTP aside: what one forward of a batch gains over one photo at a time.
    # Timed before the service starts, so that neither slows the other.
    threads = torch.get_num_threads()
    if args.server_threads:
        torch.set_num_threads(args.server_threads)  # as the service's OMP_NUM_THREADS
    identifier = Identifier.load(model, device="cpu", max_batch=args.max_batch)
    images = [data for _, data in photos]
    direct = {"batch_1": round(in_process(identifier, images, 1, repeats=2), 3),
              f"batch_{args.max_batch}": round(in_process(identifier, images, args.max_batch, repeats=2), 3)}
    del identifier
    torch.set_num_threads(threads)

    with Service(model, max_batch=args.max_batch, window_ms=args.window_ms, threads=args.server_threads,
                 log=tmp / "serve.log") as service:
        run_clients(service.url, photos, clients=1, requests=4)  # warm-up: first requests, first shapes
        run_clients(service.url, photos, clients=args.clients, requests=2 * args.clients)
        before = service.batching()
        single = run_clients(service.url, photos, clients=1, requests=args.requests)
        middle = service.batching()
        concurrent = run_clients(service.url, photos, clients=args.clients, requests=args.requests)
        after = service.batching()
    for record, (a, b) in ((single, (before, middle)), (concurrent, (middle, after))):
        batches = b.get("batches", 0) - a.get("batches", 0)
        record["mean_batch"] = round((b.get("photos", 0) - a.get("photos", 0)) / batches, 2) if batches else None


    ratio = concurrent["photos_per_second"] / single["photos_per_second"]
    met = ratio >= GOAL_RATIO and concurrent["p95_ms"] < 1000 * GOAL_P95_S
    print_table(
        f"identify web service, tiny model (untrained), {args.categories} categories, cpu x{os.cpu_count()}, "
        f"{photo_source}; max_batch {args.max_batch}, window {args.window_ms:g} ms, server torch threads "
        f"{args.server_threads or 'default'}; {args.requests} one-photo requests each",
        [("", f"ours: {args.clients} concurrent clients", "baseline: 1 client at a time", "ratio"),
         ("photos/s", f"{concurrent['photos_per_second']:.2f}", f"{single['photos_per_second']:.2f}", f"{ratio:.2f}x"),
         ("latency p50", f"{concurrent['p50_ms']:.0f} ms", f"{single['p50_ms']:.0f} ms",
          f"{concurrent['p50_ms'] / single['p50_ms']:.2f}x"),
         ("latency p95", f"{concurrent['p95_ms']:.0f} ms", f"{single['p95_ms']:.0f} ms",
          f"{concurrent['p95_ms'] / single['p95_ms']:.2f}x"),
         ("photos per forward (mean)", str(concurrent["mean_batch"]), str(single["mean_batch"]), "")])
    print(f"goal: ratio >= {GOAL_RATIO:g}x with p95 < {GOAL_P95_S * 1000:.0f} ms: {'met' if met else 'NOT met'}; "
          f"Identifier in this process: {direct['batch_1']:.2f} photos/s at batch 1, "
          f"{direct[f'batch_{args.max_batch}']:.2f} at batch {args.max_batch}")
    return {"photos": photo_source, "categories": args.categories, "max_batch": args.max_batch,
            "window_ms": args.window_ms, "server_threads": args.server_threads, "concurrent": concurrent,
            "single": single, "ratio": round(ratio, 2), "goal_met": met, "in_process_photos_per_second": direct}


def gpu_identifier(args) -> dict:
    """Photos/s of the Identifier on a random llava-interleave-qwen-0.5b-shaped model on the GPU."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from evaluate import build_interleave_shaped  # one way to build that shape for every benchmark

    device = torch.device(args.gpu_device)
    cuda = device.type == "cuda"
    dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
    model, processor = build_interleave_shaped(device, dtype)
    info = ModelInfo(model_id="interleave-0.5b-shape-random", base_model="llava-interleave-qwen-0.5b (shape only)",
                     data_version="none")
    identifier = Identifier(model, processor, categories_of(args.categories), info, max_batch=args.gpu_batch)
    photos, photo_source = load_photos(args.gpu_photos)
    images = [data for _, data in photos]

    def rate(batch: int) -> float:
        identifier.identify(images[:batch])  # warm-up at this shape
        if cuda:
            torch.cuda.synchronize()
        began = time.perf_counter()
        for start in range(0, len(images), batch):
            identifier.identify(images[start:start + batch])  # returns Python floats: the GPU has finished
        return len(images) / (time.perf_counter() - began)

    single, batched = rate(1), rate(args.gpu_batch)
    name = torch.cuda.get_device_name(device) if cuda else str(device)
    print_table(f"Identifier on {name}, random llava-interleave-qwen-0.5b shape (729 image tokens), "
                f"{str(dtype).removeprefix('torch.')}, "
                f"{args.categories} categories, {len(images)} {photo_source}",
                [("", f"ours: batch {args.gpu_batch}", "baseline: batch 1", "ratio"),
                 ("photos/s", f"{batched:.2f}", f"{single:.2f}", f"{batched / single:.2f}x")])
    return {"device": name, "dtype": str(dtype).removeprefix("torch."), "photos": len(images),
            "batch": args.gpu_batch, "batched_photos_per_second": round(batched, 2),
            "single_photos_per_second": round(single, 2), "ratio": round(batched / single, 2),
            "categories": args.categories,
            "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64, help="one-photo requests per run (each of a and b)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--photos", type=int, default=32, help="distinct photos the requests cycle through")
    parser.add_argument("--categories", type=int, default=102,
                        help="the first N Oxford names (102: the demo's); each photo scores every category")
    parser.add_argument("--max-batch", type=int, default=16, help="the service's --max-batch")
    parser.add_argument("--window-ms", type=float, default=10.0, help="the service's --window-ms")
    parser.add_argument("--server-threads", type=int, default=None,
                        help="OMP_NUM_THREADS of the service (torch's threads); default: torch's own choice")
    parser.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the interleave-0.5b shape on CUDA (default: when CUDA is available)")
    parser.add_argument("--no-cpu", dest="cpu", action="store_false", help="skip the web service part")
    parser.add_argument("--gpu-device", default="cuda", help="where the interleave shape runs (cpu: a dry run)")
    parser.add_argument("--gpu-photos", type=int, default=64)
    parser.add_argument("--gpu-batch", type=int, default=16)
    args = parser.parse_args()
    gpu = torch.cuda.is_available() if args.gpu is None else args.gpu
    if gpu and args.gpu_device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA GPU; none is visible")
    record: dict = {"bench": "identify", "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench_identify_") as tmp:
        if args.cpu:
            record["service"] = cpu_service(args, Path(tmp))
    if gpu:
        record["gpu"] = gpu_identifier(args)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
