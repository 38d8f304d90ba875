"""The UI preview of flower_shards: the first samples of a split as stored, each with its answer text."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image

from plant_pipeline.ml.shards.errors import ShardInputError
from plant_pipeline.ml.shards.format import INDEX_FILE, Sample, read_index
from plant_pipeline.ml.shards.prompts import answer_text
from plant_pipeline.ml.shards.reader import read_samples


def preview_grid(shards_dir: Path, split: str, n: int = 8, *, columns: int = 4, thumb: int = 160) -> bytes:
    """PNG bytes: the first ``n`` samples of ``split`` as stored (uint8 pixels), each with its answer text."""
    from PIL import ImageDraw

    shards_dir = Path(shards_dir)
    index = read_index(shards_dir)
    if split not in index["splits"]:
        raise ShardInputError(f"{shards_dir / INDEX_FILE} has no split {split!r}; it has {sorted(index['splits'])}")
    samples: list[Sample] = []
    for shard in index["splits"][split]["shards"]:
        for sample in read_samples(shards_dir / shard["file"]):
            samples.append(sample)
            if len(samples) == n:
                break
        if len(samples) == n:
            break
    if not samples:
        raise ShardInputError(f"split {split!r} in {shards_dir} has no samples to preview")
    columns = min(columns, len(samples))
    rows = math.ceil(len(samples) / columns)
    caption = 30
    grid = Image.new("RGB", (columns * thumb, rows * (thumb + caption)), "white")
    draw = ImageDraw.Draw(grid)
    for i, sample in enumerate(samples):
        x, y = (i % columns) * thumb, (i // columns) * (thumb + caption)
        image = Image.fromarray(np.ascontiguousarray(sample.pixels.transpose(1, 2, 0)))
        grid.paste(image.resize((thumb, thumb), Image.Resampling.BILINEAR), (x, y))
        text = answer_text(sample.meta.get("name", "?"))
        # Two short lines fit under a thumbnail in the default bitmap font.
        width = max(8, thumb // 6)
        lines = [text[:width], text[width:2 * width]]
        draw.text((x + 3, y + thumb + 2), "\n".join(line for line in lines if line), fill="black")
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    return buffer.getvalue()
