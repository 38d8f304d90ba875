"""Benchmark: images/s of evaluation as the number of categories grows (100, 1,000, 10,000 made-up names).

Ours is evaluate_shards' default method ("auto": every name ranked from one shared prefix in candidate batches up
to 2,000 names, first-token pruning beyond); the baseline is greedy generation matched to the closest name
("generate"). At 10,000 names full ranking is timed too, so pruning's gain and agreement are on record. Names are
varied pseudo-Latin binomials from a seeded generator; images are the toy shards' solid colours, labelled with the
first 8 names. Peak memory is the process's PSS (loader included). Prints one table, then one JSON line.

    python bench/ranking.py [--images 8] [--sizes 100 1000 10000] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from plant_pipeline.ml.data.categories import DEFAULT_QUESTION, CategoryMap  # noqa: E402
from plant_pipeline.ml.evaluation import evaluate_shards  # noqa: E402
from plant_pipeline.ml.testing import PeakSampler, write_toy_shards  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate import load_tiny  # noqa: E402  (one way to build the tiny model for every benchmark)

SYLLABLES = ("ro", "sa", "bel", "lis", "per", "en", "nis", "ta", "rax", "cum", "vi", "o", "la", "me", "lia", "cal",
             "thus", "ni", "gra", "phyl", "um", "ac", "er", "qu", "us", "dra", "ge", "ran", "ium", "sal", "via")


def pseudo_latin(count: int, seed: int = 0) -> tuple[str, ...]:
    """``count`` distinct "Genus species" names, the same for a given seed."""
    rng = np.random.default_rng(seed)
    names: dict[str, None] = {}
    while len(names) < count:
        genus = "".join(rng.choice(SYLLABLES, rng.integers(2, 4))).capitalize()
        names[f"{genus} {''.join(rng.choice(SYLLABLES, rng.integers(2, 5)))}"] = None
    return tuple(names)


def timed(model, processor, shards, categories, **kwargs):
    sampler = PeakSampler(0.05)
    sampler.start()
    result = evaluate_shards(model, processor, shards, categories=categories, **kwargs)
    return result, sampler.stop() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8, help="test images (8 colour classes x images/8)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--candidate-batch", type=int, default=128)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    common = dict(batch_size=args.batch_size, candidate_batch=args.candidate_batch)
    records = []
    with tempfile.TemporaryDirectory(prefix="bench_ranking_") as tmp:
        tmp = Path(tmp)
        model, processor = load_tiny(tmp, torch.device("cpu"), torch.float32)
        shards = write_toy_shards(tmp / "shards", processor, classes=8, per_class={"test": max(1, args.images // 8)})
        evaluate_shards(model, processor, shards, categories=CategoryMap(pseudo_latin(8)), max_samples=1)  # warm-up
        for size in args.sizes:
            categories = CategoryMap(pseudo_latin(size), question=DEFAULT_QUESTION, source="bench")
            ours, ours_peak = timed(model, processor, shards, categories, **common)
            base, base_peak = timed(model, processor, shards, categories, method="generate", **common)
            record = {"categories": size, "method": ours.method, "images": ours.num_images,
                      "ours_images_per_second": round(ours.images_per_second, 3),
                      "generate_images_per_second": round(base.images_per_second, 3),
                      "ratio": round(ours.images_per_second / base.images_per_second, 2),
                      "ours_peak_pss_gib": round(ours_peak, 2), "generate_peak_pss_gib": round(base_peak, 2)}
            if ours.method == "prune":
                full, full_peak = timed(model, processor, shards, categories, method="rank", **common)
                same = (full.predictions["predicted_label"] == ours.predictions["predicted_label"]).mean()
                record.update(rank_images_per_second=round(full.images_per_second, 3),
                              rank_peak_pss_gib=round(full_peak, 2), prune_same_top1_as_rank=float(same))
            records.append(record)
            print(json.dumps(record), file=sys.stderr, flush=True)

    print(f"evaluation vs number of categories, tiny model, cpu, torch threads {torch.get_num_threads()}, "
          f"{records[0]['images']} images, batch {args.batch_size}, candidate batch {args.candidate_batch}")
    rows = [("categories", "ours (method)", "ours img/s", "generate img/s", "ratio", "peak GiB ours/gen",
             "full rank img/s", "prune = rank top-1")]
    for r in records:
        rows.append((str(r["categories"]), r["method"], f"{r['ours_images_per_second']:.2f}",
                     f"{r['generate_images_per_second']:.2f}", f"{r['ratio']:.2f}x",
                     f"{r['ours_peak_pss_gib']:.2f}/{r['generate_peak_pss_gib']:.2f}",
                     f"{r['rank_images_per_second']:.2f}" if "rank_images_per_second" in r else "",
                     f"{r['prune_same_top1_as_rank']:.0%}" if "prune_same_top1_as_rank" in r else ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(json.dumps({"bench": "ranking", "threads": torch.get_num_threads(), "batch_size": args.batch_size,
                      "candidate_batch": args.candidate_batch, "results": records}))


if __name__ == "__main__":
    main()
