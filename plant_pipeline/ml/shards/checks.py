"""The data-quality checks flower_shards runs: each re-reads what build_shards wrote.

Each returns a CheckOutcome, which the Dagster layer turns into an AssetCheckResult; a shard or index that
cannot be read fails the check, naming it, and never raises.
"""

from __future__ import annotations

import functools
import hashlib
import io
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
from PIL import Image

from plant_pipeline.ml.data.oxford import SOURCE as DEFAULT_SOURCE
from plant_pipeline.ml.files import sha256_file
from plant_pipeline.ml.images import to_rgb
from plant_pipeline.ml.shards.format import FIELDS, ShardFormatError, ShardIndex, read_categories, read_index
from plant_pipeline.ml.shards.pixels import PixelNormalizer
from plant_pipeline.ml.shards.prompts import PromptEncoder, answer_text, conversation, load_processor
from plant_pipeline.ml.shards.reader import READ_ERRORS, all_metas, iter_shard, read_problem, read_samples
from plant_pipeline.ml.shards.rows import sample_key

_MAX_LISTED = 20  # problems listed in check metadata; the count says how many there were


@dataclass
class CheckOutcome:
    """Result of one data-quality check; the Dagster layer turns it into an AssetCheckResult."""

    passed: bool
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)


def _unreadable_outcome(description: str, unreadable: list[str], metadata: dict[str, Any]) -> CheckOutcome:
    """A failed check over shards some of which could not be read: says which, whatever else it found."""
    return CheckOutcome(
        passed=False,
        description=f"{len(unreadable)} shards cannot be read ({'; '.join(unreadable[:3])}), so {description}; "
                    "rebuild flower_shards",
        metadata={**metadata, "unreadable_shards": unreadable[:_MAX_LISTED], "num_unreadable_shards": len(unreadable)},
    )


class _IndexUnreadable(Exception):
    """index.json is missing or malformed: every check fails on it, naming it."""


def _read_index(shards_dir: Path) -> ShardIndex:
    try:
        return read_index(shards_dir)
    except (OSError, ValueError, ShardFormatError) as err:  # JSONDecodeError is a ValueError
        raise _IndexUnreadable(str(err)) from err


def _failing_without_index(check: Callable[..., CheckOutcome]) -> Callable[..., CheckOutcome]:
    """A check that reports a missing or malformed index as a failed check instead of raising."""

    @functools.wraps(check)
    def wrapper(*args, **kwargs) -> CheckOutcome:
        try:
            return check(*args, **kwargs)
        except _IndexUnreadable as err:
            return CheckOutcome(False, f"cannot read the shard index: {err}", {"problems": [str(err)]})

    return wrapper


@_failing_without_index
def check_integrity(shards_dir: Path, manifest: pd.DataFrame) -> CheckOutcome:
    """Every shard re-read: size, sha256 and sample count match the index; each split holds exactly the
    manifest's rows minus the quarantined ones, each sample complete."""
    shards_dir = Path(shards_dir)
    index = _read_index(shards_dir)
    problems: list[str] = []
    expected: dict[str, dict[str, tuple[int, str]]] = defaultdict(dict)  # split -> key -> (image_id, path)
    source = manifest["source"] if "source" in manifest.columns else [DEFAULT_SOURCE] * len(manifest)
    for image_id, path, split, src in zip(manifest["image_id"], manifest["path"], manifest["split"], source):
        expected[str(split)][sample_key(int(image_id), str(src))] = (int(image_id), str(path))
    quarantined = {split: {(int(q["image_id"]), q["path"]) for q in info.get("quarantined", [])}
                   for split, info in index["splits"].items()}
    for split in sorted(set(expected) - set(index["splits"])):
        problems.append(f"split {split!r} has {len(expected[split])} manifest rows but no shards")
    shards_checked = 0
    unreadable: list[str] = []  # shard files, for the description
    for split, info in index["splits"].items():
        keys: Counter = Counter()
        for shard in info["shards"]:
            path = shards_dir / shard["file"]
            shards_checked += 1
            if not path.is_file():
                problems.append(f"{shard['file']}: missing")
                unreadable.append(shard["file"])
                continue
            size = path.stat().st_size
            if size != shard["bytes"]:
                problems.append(f"{shard['file']}: {size} bytes, index says {shard['bytes']}")
            digest = sha256_file(path)
            if digest != shard["sha256"]:
                problems.append(f"{shard['file']}: sha256 {digest[:12]}..., index says {shard['sha256'][:12]}...")
            members: dict[str, set[str]] = defaultdict(set)
            try:
                for key, member, _ in iter_shard(path, lambda _k, _m: False):
                    members[key].add(member)
            except READ_ERRORS as err:
                problems.append(read_problem(shard["file"], err))
                unreadable.append(shard["file"])
                continue
            incomplete = [k for k, m in members.items() if m != set(FIELDS)]
            if incomplete:
                problems.append(f"{shard['file']}: {len(incomplete)} samples lack members, e.g. {incomplete[0]!r}")
            if len(members) != shard["samples"]:
                problems.append(f"{shard['file']}: {len(members)} samples, index says {shard['samples']}")
            keys.update(members.keys())
        duplicates = [k for k, c in keys.items() if c > 1]
        if duplicates:
            problems.append(f"{split}: {len(duplicates)} keys stored twice, e.g. {duplicates[0]!r}")
        if sum(keys.values()) != info["samples"]:
            problems.append(f"{split}: {sum(keys.values())} samples in shards, index says {info['samples']}")
        rows = expected.get(split, {})
        want = {key for key, row in rows.items() if row not in quarantined[split]}
        if set(keys) != want:
            missing, extra = sorted(want - set(keys)), sorted(set(keys) - want)
            problems.append(f"{split}: expected {len(want)} samples (manifest {len(rows)} - quarantined "
                            f"{len(rows) - len(want)}), stored {len(keys)}; missing {missing[:3]}, extra {extra[:3]}")
    passed = not problems
    return CheckOutcome(
        passed=passed,
        description=(f"{shards_checked} shards match the index and the manifest" if passed
                     else f"{len(problems)} integrity problems, e.g. {problems[0]}"
                     + (f"; shards missing or unreadable: {', '.join(unreadable[:3])}" if unreadable else "")
                     + "; rebuild flower_shards"),
        metadata={"shards_checked": shards_checked, "problems": problems[:_MAX_LISTED], "num_problems": len(problems),
                  "unreadable_shards": unreadable[:_MAX_LISTED],
                  "samples": {s: i["samples"] for s, i in index["splits"].items()}},
    )


@_failing_without_index
def check_class_coverage(shards_dir: Path, num_classes: int | None = None) -> CheckOutcome:
    """Every class 0..num_classes-1 has at least one sample in every split; by default as many classes as the
    index's categories (Oxford's 102 for an index without them)."""
    shards_dir = Path(shards_dir)
    index = _read_index(shards_dir)
    if num_classes is None:
        num_classes = len(read_categories(shards_dir))
    missing: dict[str, list[int]] = {}
    counts: dict[str, dict[str, int]] = {}
    metas_by_split, unreadable = all_metas(shards_dir, index)
    for split, metas in metas_by_split.items():
        per_class = Counter(int(meta["label"]) for _, _, meta in metas)
        counts[split] = {"classes": len(per_class), "min_per_class": min(per_class.values(), default=0)}
        absent = [c for c in range(num_classes) if per_class[c] == 0]
        if absent:
            missing[split] = absent
    metadata = {"missing": missing, "per_split": counts}
    if unreadable:
        return _unreadable_outcome("classes cannot be counted", unreadable, metadata)
    passed = not missing
    return CheckOutcome(
        passed=passed,
        description=(f"all {num_classes} classes present in {sorted(counts)}" if passed else
                     "classes missing: " + "; ".join(f"{s}: {len(m)} (e.g. {m[:5]})" for s, m in missing.items())),
        metadata=metadata,
    )


@_failing_without_index
def check_no_leakage(shards_dir: Path) -> CheckOutcome:
    """No source image (by the sha256 of its file) is stored in two splits."""
    shards_dir = Path(shards_dir)
    index = _read_index(shards_dir)
    where: dict[str, dict[str, str]] = defaultdict(dict)  # sha256 -> split -> key
    metas_by_split, unreadable = all_metas(shards_dir, index)
    for split, metas in metas_by_split.items():
        for _, key, meta in metas:
            where[meta["sha256"]][split] = key
    leaks = [{"sha256": digest, "samples": splits} for digest, splits in where.items() if len(splits) > 1]
    metadata = {"leaks": leaks[:_MAX_LISTED], "num_leaks": len(leaks), "images": len(where)}
    if unreadable:
        return _unreadable_outcome("leakage cannot be ruled out", unreadable, metadata)
    passed = not leaks
    return CheckOutcome(
        passed=passed,
        description=("no image appears in two splits" if passed
                     else f"{len(leaks)} images appear in more than one split, e.g. {leaks[0]['samples']}"),
        metadata=metadata,
    )


@_failing_without_index
def check_quarantine_rate(shards_dir: Path, max_fraction: float = 0.01) -> CheckOutcome:
    """At most ``max_fraction`` of each split's images were quarantined (read from the index alone)."""
    if not 0 <= max_fraction <= 1:
        raise ValueError(f"max_fraction must be between 0 and 1 (a fraction of each split's images); "
                         f"got {max_fraction!r}")
    index = _read_index(Path(shards_dir))
    rates, counts, examples = {}, {}, []
    for split, info in index["splits"].items():
        quarantined = info.get("quarantined", [])
        counts[split] = len(quarantined)
        rates[split] = len(quarantined) / max(1, len(quarantined) + info["samples"])
        examples += [{"split": split, **q} for q in quarantined]
    over = {s: r for s, r in rates.items() if r > max_fraction}
    return CheckOutcome(
        passed=not over,
        description=(f"quarantined fraction <= {max_fraction:.1%} in every split" if not over
                     else f"too many quarantined images (over {max_fraction:.1%}): "
                     + ", ".join(f"{s} {r:.1%}" for s, r in over.items()) + "; see quarantine.json for why"),
        metadata={"quarantined_fraction": rates, "quarantined": counts, "max_fraction": max_fraction,
                  "examples": examples[:_MAX_LISTED]},
    )


@_failing_without_index
def check_exactness(
    shards_dir: Path,
    dataset_root: Path,
    model_source: str,
    sample_size: int = 16,
    seed: int = 0,
    *,
    local_files_only: bool = True,
    revision: str | None = None,
) -> CheckOutcome:
    """Random stored samples equal what the full processor makes from the source image today.

    pixel_values: the processor on the source file vs PixelNormalizer(stored uint8), max abs diff 0;
    input_ids and labels: the same call's ids and a fresh PromptEncoder.
    """
    import torch

    shards_dir, dataset_root = Path(shards_dir), Path(dataset_root)
    index = _read_index(shards_dir)
    metas_by_split, unreadable = all_metas(shards_dir, index)
    population = [item for metas in metas_by_split.values() for item in metas]
    if not population:
        if unreadable:
            return _unreadable_outcome("no sample could be compared", unreadable, {"samples_checked": 0})
        return CheckOutcome(False, "no samples stored; nothing to compare", {"samples_checked": 0})
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(population), size=min(sample_size, len(population)), replace=False).tolist())
    wanted: dict[Path, set[str]] = defaultdict(set)
    for i in chosen:
        path, key, _ = population[i]
        wanted[path].add(key)

    processor = load_processor(str(model_source), revision, local_files_only)
    normalizer = PixelNormalizer.from_processor(processor.image_processor)
    encoder = PromptEncoder(processor, question=read_categories(shards_dir).question)
    problems: list[str] = []
    max_diff = 0.0
    checked = 0
    for path, keys in wanted.items():
        try:
            samples = list(read_samples(path, keys))
        except READ_ERRORS as err:  # its metadata was read a moment ago: the file changed since
            unreadable.append(read_problem(str(path.relative_to(shards_dir)), err))
            continue
        for sample in samples:
            checked += 1
            meta = sample.meta
            source = dataset_root / meta["path"]
            try:
                data = source.read_bytes()
            except OSError as err:
                problems.append(f"{sample.key}: cannot read source {meta['path']} ({err})")
                continue
            if hashlib.sha256(data).hexdigest() != meta["sha256"]:
                problems.append(f"{sample.key}: source {meta['path']} changed since the shards were built")
                continue
            with Image.open(io.BytesIO(data)) as image:
                rgb = to_rgb(image)
                rgb.load()
            text = processor.apply_chat_template(conversation(encoder.question, answer_text(meta["name"])),
                                                 tokenize=False)
            full = processor(text=[text], images=[rgb], return_tensors="np")
            expected = torch.from_numpy(np.asarray(full["pixel_values"], dtype=np.float32))
            stored = normalizer(torch.from_numpy(sample.pixels)[None])
            if expected.shape != stored.shape:
                problems.append(f"{sample.key}: pixel_values shape {tuple(stored.shape)}, processor gives "
                                f"{tuple(expected.shape)}")
                continue
            diff = float((expected - stored).abs().max())
            max_diff = max(max_diff, diff)
            if diff != 0:
                problems.append(f"{sample.key}: pixel_values differ from the processor's by up to {diff:.3g}")
            input_ids, labels = encoder.encode_category(meta["name"])
            processor_ids = np.asarray(full["input_ids"][0], dtype=np.int32)
            if not (np.array_equal(sample.input_ids, input_ids) and np.array_equal(sample.input_ids, processor_ids)):
                problems.append(f"{sample.key}: input_ids differ from a fresh encoding of {meta['name']!r}")
            if not np.array_equal(sample.labels, labels):
                problems.append(f"{sample.key}: labels differ from a fresh encoding of {meta['name']!r}")
    metadata = {"samples_checked": checked, "max_abs_diff": max_diff, "problems": problems[:_MAX_LISTED]}
    if unreadable:
        return _unreadable_outcome(f"only {checked} samples were compared ({len(problems)} differ)", unreadable,
                                   metadata)
    passed = not problems and checked == len(chosen)
    return CheckOutcome(
        passed=passed,
        description=(f"{checked} random samples equal the processor's output exactly" if passed
                     else f"{len(problems)} of {len(chosen)} samples differ from the processor: {problems[:2]}"),
        metadata=metadata,
    )
