"""Splits from content: where a source gives no train/validation/test split, each photo's split follows from its
sha256 alone, so adding photos never moves one already placed, and the same photo under two names (or two paths)
lands in one split. Fractions hold per category in expectation (the hash is uniform, whatever the category)."""

from __future__ import annotations

import math
from typing import Sequence

from plant_pipeline.ml.data.manifest import SPLITS
from plant_pipeline.ml.errors import UsageError

DEFAULT_FRACTIONS: tuple[float, float, float] = (0.8, 0.1, 0.1)


class SplitFractionsError(UsageError):
    """Split fractions that are not three non-negative numbers adding up to 1."""


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(f) for f in fractions)
    if len(values) != len(SPLITS) or not all(math.isfinite(f) and f >= 0 for f in values):
        raise SplitFractionsError(f"split fractions must be {len(SPLITS)} numbers >= 0 for {list(SPLITS)}; "
                                  f"got {list(fractions)!r}")
    if abs(sum(values) - 1.0) > 1e-6 or values[0] <= 0:
        raise SplitFractionsError(f"split fractions must add up to 1 with train > 0, e.g. {list(DEFAULT_FRACTIONS)}; "
                                  f"got {list(values)} (sum {sum(values):g})")
    return values  # type: ignore[return-value]


def content_split(sha256_hex: str, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> str:
    """The split of the photo whose bytes hash to ``sha256_hex``: its first 64 bits as a number in [0, 1),
    compared with the cumulative fractions."""
    fractions = check_fractions(fractions)
    if len(sha256_hex) < 16:
        raise ValueError(f"expected a sha256 hex digest; got {sha256_hex!r}")
    point = int(sha256_hex[:16], 16) / 2**64
    edge = 0.0
    for split, fraction in zip(SPLITS, fractions):
        edge += fraction
        if point < edge:
            return split
    return [split for split, fraction in zip(SPLITS, fractions) if fraction > 0][-1]  # rounding of the last edge
