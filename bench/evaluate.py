"""Benchmark: images/s of `rank` evaluation with the shared-prefix scorer against one forward per candidate.

Both scorers rank all 102 category names for the same toy test images through evaluate_shards (shard
reading included) and must pick the same labels. Default: the tiny random LLaVA on the CPU, goal >= 20x.
`--shape interleave-0.5b --device cuda` builds a random model of llava-interleave-qwen-0.5b's shape
(729 image tokens, Qwen2-0.5B text) to size a GPU run. Prints one table, then one JSON line.

    python bench/evaluate.py [--images 24] [--device cpu] [--threads N] [--shape tiny]
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

from plant_pipeline.ml.evaluation import evaluate_shards  # noqa: E402
from plant_pipeline.ml.model import TinyLlavaSpec, build_tiny_llava, build_tiny_processor  # noqa: E402
from plant_pipeline.ml.testing import write_toy_shards  # noqa: E402

GOAL = 20.0


def load_tiny(folder: Path, device: torch.device, dtype: torch.dtype):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = build_tiny_llava(folder / "tiny-random-llava")
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device)
    return model, AutoProcessor.from_pretrained(path)


def build_interleave_shaped(device: torch.device, dtype: torch.dtype):
    """Random weights in llava-interleave-qwen-0.5b's shape: 384 px / patch 14 (729 image tokens), a ViT-L-sized
    vision tower, Qwen2-0.5B text (24 layers, 896 hidden, 2 KV heads, 151,936-token vocabulary)."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

    processor = build_tiny_processor(TinyLlavaSpec(image_size=384, patch_size=14))
    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=384, patch_size=14, projection_dim=1024)
    text = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    config = LlavaConfig(vision_config=vision, text_config=text, image_seq_length=(384 // 14) ** 2,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config)
    return model.to(dtype), processor


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=24, help="test images (8 colour classes x images/8)")
    parser.add_argument("--naive-images", type=int, default=None, help="score only this many with the naive scorer")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--shape", default="tiny", choices=["tiny", "interleave-0.5b"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--candidate-batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the fast methods (best kept)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    with tempfile.TemporaryDirectory(prefix="bench_evaluate_") as tmp:
        tmp = Path(tmp)
        if args.shape == "tiny":
            model, processor = load_tiny(tmp, device, dtype)
        else:
            model, processor = build_interleave_shaped(device, dtype)
        per_class = max(1, args.images // 8)
        shards = write_toy_shards(tmp / "shards", processor, classes=8, per_class={"test": per_class},
                                  samples_per_shard=16)
        common = dict(batch_size=args.batch_size, candidate_batch=args.candidate_batch, normalize="mean")
        peaks = {}

        def timed(name: str, **kwargs):
            # A short warm-up run first (first-call allocations, kernels), then the timed one.
            evaluate_shards(model, processor, shards, **{**common, **kwargs,
                                                          "max_samples": 1 if kwargs.get("scorer") else args.batch_size})
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            # The fast runs are repeated and the quickest kept: on a shared machine the minimum is the least noisy.
            runs = []
            for _ in range(1 if kwargs.get("scorer") else args.repeats):
                runs.append(evaluate_shards(model, processor, shards, **{**common, **kwargs}))
                sync(device)
            result = min(runs, key=lambda r: r.seconds)
            peaks[name] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None
            return result

        shared = timed("shared")
        # The fallback layout (cache repeated per image x candidate, for flash attention), for the record.
        expanded = timed("expanded", layout="expanded")
        generated = timed("generate", method="generate")
        naive = timed("naive", scorer="naive", max_samples=args.naive_images)

    n = naive.num_images
    same = shared.predictions.head(n)
    agree = bool((same["predicted_label"].to_numpy() == naive.predictions["predicted_label"].to_numpy()).all())
    score_diff = float(np.abs(same["score"].to_numpy() - naive.predictions["score"].to_numpy()).max())
    acc_shared = float(shared.predictions["correct"].mean())
    acc_shared_same = float(same["correct"].mean())
    acc_naive = float(naive.predictions["correct"].mean())
    ratio = shared.images_per_second / naive.images_per_second
    expanded_ratio = expanded.images_per_second / naive.images_per_second
    expanded_agree = bool((expanded.predictions["predicted_label"] == shared.predictions["predicted_label"]).all())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    print(f"rank evaluation, 102 candidates, model {args.shape}, {device} {args.dtype}, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}, load average {load:.2f}")
    rows = [("figure", "shared prefix", "naive (baseline)", "ratio"),
            ("images", str(shared.num_images), str(n), ""),
            ("seconds", f"{shared.seconds:.2f}", f"{naive.seconds:.2f}", ""),
            ("images/s", f"{shared.images_per_second:.2f}", f"{naive.images_per_second:.3f}", f"{ratio:.1f}x"),
            ("images/s, expanded layout", f"{expanded.images_per_second:.2f}", f"{naive.images_per_second:.3f}",
             f"{expanded_ratio:.1f}x"),
            ("images/s, generate (16 new tokens)", f"{generated.images_per_second:.2f}", "", ""),
            ("peak GPU memory GiB", str(peaks["shared"]), str(peaks["naive"]), ""),
            ("peak GPU memory GiB, expanded layout", str(peaks["expanded"]), "", ""),
            ("top-1 accuracy (all)", f"{acc_shared:.4f}", "", ""),
            (f"top-1 accuracy (first {n})", f"{acc_shared_same:.4f}", f"{acc_naive:.4f}", ""),
            ("same predictions", str(agree), "", ""),
            ("same predictions, expanded layout", str(expanded_agree), "", ""),
            ("max |score difference|", f"{score_diff:.2e}", "", "")]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(json.dumps({
        "bench": "evaluate_rank", "shape": args.shape, "device": str(device), "dtype": args.dtype,
        "threads": torch.get_num_threads(), "load_average": round(load, 2), "candidates": 102,
        "images_shared": shared.num_images, "images_naive": n, "batch_size": args.batch_size,
        "candidate_batch": args.candidate_batch, "repeats": args.repeats,
        "shared_images_per_second": round(shared.images_per_second, 3),
        "naive_images_per_second": round(naive.images_per_second, 4),
        "speedup": round(ratio, 1), "goal": GOAL, "meets_goal": ratio >= GOAL,
        "expanded_images_per_second": round(expanded.images_per_second, 3), "expanded_speedup": round(expanded_ratio, 1),
        "expanded_same_predictions": expanded_agree,
        "same_predictions": agree, "max_score_diff": score_diff,
        "accuracy_shared": acc_shared_same, "accuracy_naive": acc_naive,
        "generate_images_per_second": round(generated.images_per_second, 3), "peak_gpu_memory_gib": peaks,
    }))


if __name__ == "__main__":
    main()
