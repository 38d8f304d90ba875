"""Adding photos to built shards: the incremental update against a full rebuild of every photo.

Real photos (the Oxford Flowers mini mirror, all of them) through the LLaVA-1.5-shaped tiny processor that
bench/preprocess.py uses. Shards are built without --new photos (not timed); then the full manifest is built
twice from there: incrementally (ours) and with incremental=False (the full rebuild). Prints one table, then one
line of JSON with every figure. Usage:
    python bench/incremental.py [--data /work/shared/datasets] [--new 30] [--workers W]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.preprocess import measure, prepare  # noqa: E402
from plant_pipeline.ml.data.categories import oxford_map  # noqa: E402
from plant_pipeline.ml.model import TinyLlavaSpec, build_tiny_llava  # noqa: E402
from plant_pipeline.ml.shards import ShardConfig, build_shards  # noqa: E402
from plant_pipeline.ml.shards.format import read_index  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("PLANT_PIPELINE_SHARED_DATASETS",
                                                                         "/work/shared/datasets")))
    parser.add_argument("--new", type=int, default=30, help="photos added after the first build")
    parser.add_argument("--workers", type=int, default=ShardConfig().workers())
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-incremental-"))
    try:
        root, manifest = prepare(args.data, work, None)
        model_dir = build_tiny_llava(work / "llava-336", TinyLlavaSpec(image_size=336, patch_size=14))
        held = manifest.sample(n=args.new, random_state=0)  # spread over splits and classes
        config = ShardConfig(num_workers=args.workers)

        def build(out: Path, rows, incremental: bool = True):
            return build_shards(rows, root, str(model_dir), out, config=config, categories=oxford_map(),
                                incremental=incremental)

        ours_dir, full_dir = work / "ours", work / "full"
        build(ours_dir, manifest.drop(held.index))  # the current shards (not timed)
        shutil.copytree(ours_dir, full_dir)
        old = {s["file"]: s["sha256"] for e in read_index(ours_dir)["splits"].values() for s in e["shards"]}
        ours_wall, ours_cpu, ours = measure(lambda: build(ours_dir, manifest))
        full_wall, full_cpu, full = measure(lambda: build(full_dir, manifest, incremental=False))
        now = {s["file"]: s["sha256"] for e in read_index(ours_dir)["splits"].values() for s in e["shards"]}
        untouched = all(now.get(file) == sha for file, sha in old.items())

        print(f"{len(manifest)} photos, {args.new} added, {args.workers} workers, pixels {ours.index['pixel_shape']}")
        print(f"{'':28}{'incremental (ours)':>20}{'full rebuild':>16}{'ratio':>8}")
        print(f"{'wall seconds':28}{ours_wall:>20.2f}{full_wall:>16.2f}{full_wall / ours_wall:>7.1f}x")
        print(f"{'CPU seconds':28}{ours_cpu:>20.2f}{full_cpu:>16.2f}{full_cpu / max(ours_cpu, 1e-9):>7.1f}x")
        print(f"{'photos preprocessed':28}{sum(ours.new_samples.values()):>20}{sum(full.new_samples.values()):>16}")
        print(f"{'mode':28}{ours.mode:>20}{full.mode:>16}")
        print(f"old shards reused untouched: {ours.reused_shards} ({'same sha256' if untouched else 'CHANGED'})")
        print(json.dumps({
            "photos": len(manifest), "new": args.new, "workers": args.workers, "mode": ours.mode,
            "reason": ours.reason, "incremental_wall_s": round(ours_wall, 3), "full_wall_s": round(full_wall, 3),
            "incremental_cpu_s": round(ours_cpu, 3), "full_cpu_s": round(full_cpu, 3),
            "speedup_wall": round(full_wall / ours_wall, 2), "reused_shards": ours.reused_shards,
            "old_shards_untouched": untouched, "samples": ours.samples, "load_average": round(os.getloadavg()[0], 2),
        }))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
