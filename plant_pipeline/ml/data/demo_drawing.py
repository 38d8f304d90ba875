"""Drawing the synthetic flowers of the demo release: 102 classes told apart by strong, low-frequency cues
(petal colour, centre colour, petal count and shape), each image reproducible from its label, split and index.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from plant_pipeline.ml.data.categories import CATEGORY_NAMES, NUM_CLASSES
from plant_pipeline.ml.data.manifest import SPLITS
from plant_pipeline.ml.errors import UsageError

SUPERSAMPLE = 2  # draw at 2x and average down: cheap antialiasing for PIL's aliased polygons


class DemoDataError(UsageError):
    """The demo release cannot be generated with the given parameters."""


# ---------------------------------------------------------------------------------------------
# The class design: 17 petal colours x 6 flower forms = 102 classes.
# Petal colour alone separates 17 groups and the form (whose centre colour is unique to it) the
# other 6, so a model that reads colour only can still tell all 102 apart; petal count and shape
# are redundant, visible extras. Colours are (hue degrees, saturation, value), spaced so that the
# jitter below never reaches a neighbour: the 12 vivid hues sit 30 degrees apart, the 5 others
# differ from every vivid hue in saturation or value.
# ---------------------------------------------------------------------------------------------

PETAL_COLOURS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("red", (0.0, 0.92, 0.95)),
    ("orange", (28.0, 0.95, 1.0)),
    ("yellow", (55.0, 0.95, 1.0)),
    ("chartreuse", (85.0, 0.9, 0.95)),
    ("green", (125.0, 0.85, 0.85)),
    ("spring green", (155.0, 0.9, 0.9)),
    ("cyan", (185.0, 0.9, 0.95)),
    ("azure", (210.0, 0.9, 1.0)),
    ("blue", (238.0, 0.85, 1.0)),
    ("violet", (270.0, 0.8, 1.0)),
    ("magenta", (300.0, 0.85, 0.95)),
    ("rose", (330.0, 0.85, 1.0)),
    ("white", (0.0, 0.03, 0.97)),
    ("pastel pink", (340.0, 0.35, 1.0)),
    ("lavender", (265.0, 0.35, 1.0)),
    ("maroon", (350.0, 0.9, 0.5)),
    ("indigo", (255.0, 0.9, 0.5)),
)


@dataclass(frozen=True)
class FlowerForm:
    """One of the six flower shapes; its centre colour is unique among the forms."""

    petal_count: int
    petal_shape: str  # "round" | "pointed" | "narrow"
    width_ratio: float  # petal width / petal length
    centre_colour: str
    centre_rgb: tuple[int, int, int]
    centre_size: float  # centre disc radius / flower radius


FLOWER_FORMS: tuple[FlowerForm, ...] = (
    FlowerForm(3, "round", 1.0, "black", (30, 22, 18), 0.32),
    FlowerForm(4, "pointed", 0.75, "white", (245, 242, 230), 0.22),
    FlowerForm(5, "round", 0.8, "golden yellow", (250, 200, 10), 0.26),
    FlowerForm(6, "pointed", 0.45, "dark purple", (75, 10, 95), 0.22),
    FlowerForm(8, "narrow", 0.36, "bright green", (60, 200, 50), 0.28),
    FlowerForm(12, "narrow", 0.22, "rust brown", (165, 70, 15), 0.4),
)


@dataclass(frozen=True)
class ClassDesign:
    """What a synthetic class looks like; ``label`` is 0-based, as everywhere in the core."""

    label: int
    category_name: str
    petal_colour: str
    petal_hsv: tuple[float, float, float]
    petal_count: int
    petal_shape: str
    petal_width_ratio: float
    centre_colour: str
    centre_rgb: tuple[int, int, int]
    centre_size: float


def _build_designs() -> tuple[ClassDesign, ...]:
    designs = []
    for colour_index, (colour_name, hsv) in enumerate(PETAL_COLOURS):
        for form_index, form in enumerate(FLOWER_FORMS):
            label = colour_index * len(FLOWER_FORMS) + form_index
            designs.append(
                ClassDesign(
                    label=label,
                    category_name=CATEGORY_NAMES[label],
                    petal_colour=colour_name,
                    petal_hsv=hsv,
                    petal_count=form.petal_count,
                    petal_shape=form.petal_shape,
                    petal_width_ratio=form.width_ratio,
                    centre_colour=form.centre_colour,
                    centre_rgb=form.centre_rgb,
                    centre_size=form.centre_size,
                )
            )
    return tuple(designs)


CLASS_DESIGNS: tuple[ClassDesign, ...] = _build_designs()
assert len(CLASS_DESIGNS) == NUM_CLASSES, "17 colours x 6 forms must cover the 102 categories"


def describe_class(label: int) -> dict:
    """The factors that make up synthetic class ``label`` (0-based), as a plain dict."""
    if not 0 <= label < NUM_CLASSES:
        raise DemoDataError(f"label must be in 0..{NUM_CLASSES - 1}, got {label}")
    return asdict(CLASS_DESIGNS[label])


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------


def _hsv_to_rgb(h_deg: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((h_deg % 360.0) / 360.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return (round(r * 255), round(g * 255), round(b * 255))


def _shade(rgb: Sequence[int], factor: float) -> tuple[int, int, int]:
    """Scale towards black (factor < 1) or towards white (factor > 1)."""
    if factor <= 1.0:
        return tuple(round(c * factor) for c in rgb)  # type: ignore[return-value]
    t = min(factor - 1.0, 1.0)
    return tuple(round(c + (255 - c) * t) for c in rgb)  # type: ignore[return-value]


def _jitter_petal_colour(rng: np.random.Generator, hsv: tuple[float, float, float]) -> tuple[int, int, int]:
    h, s, v = hsv
    # At most +-6 degrees of hue and +-0.06 of s/v: half the gap to the nearest other class colour.
    h += rng.uniform(-6.0, 6.0)
    if s < 0.1:  # white: keep it white
        s = rng.uniform(0.0, 0.07)
    else:
        s += rng.uniform(-0.06, 0.05)
    v += rng.uniform(-0.06, 0.03)
    return _hsv_to_rgb(h, s, v)


def _petal_profile(shape: str, n: int = 10) -> np.ndarray:
    """Half-width along a petal of unit length and unit maximum width, sampled at s = i / n."""
    s = np.linspace(0.0, 1.0, n + 1)
    if shape == "round":
        w = np.sin(np.pi * s) ** 0.6 * (1.0 - 0.35 * s)
        w[-1] = 0.0
    elif shape == "pointed":
        w = np.sin(np.pi * s**0.75) ** 1.1
    elif shape == "narrow":
        w = np.sin(np.pi * s) ** 0.45
    else:
        raise DemoDataError(f"unknown petal shape {shape!r}: expected round, pointed or narrow")
    return w / w.max() * 0.5


_PROFILES = {shape: _petal_profile(shape) for shape in ("round", "pointed", "narrow")}


def _petal_polygon(
    cx: float, cy: float, angle: float, length: float, width: float, profile: np.ndarray
) -> list[tuple[float, float]]:
    """A petal (or leaf) outline from (cx, cy) outwards along ``angle``."""
    u = np.linspace(0.0, length, len(profile))
    v = profile * width
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    upper = [(cx + ui * cos_a - vi * sin_a, cy + ui * sin_a + vi * cos_a) for ui, vi in zip(u, v)]
    lower = [(cx + ui * cos_a + vi * sin_a, cy + ui * sin_a - vi * cos_a) for ui, vi in zip(u, v)]
    return upper + lower[::-1]


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A muted (low saturation) flat, gradient or blotchy backdrop that never rivals a petal hue."""
    kind = rng.integers(0, 3)
    grid = (1, 1) if kind == 0 else ((2, 1) if rng.random() < 0.5 else (1, 2)) if kind == 1 else (4, 4)
    base_h = rng.uniform(0.0, 360.0) if rng.random() < 0.5 else rng.uniform(70.0, 140.0)  # often foliage
    cells = np.empty((grid[1], grid[0], 3), dtype=np.uint8)
    for y in range(grid[1]):
        for x in range(grid[0]):
            cells[y, x] = _hsv_to_rgb(
                base_h + rng.uniform(-25.0, 25.0), rng.uniform(0.05, 0.28), rng.uniform(0.25, 0.75)
            )
    image = Image.fromarray(cells, "RGB").resize((width, height), Image.Resampling.BICUBIC)
    # Mild fine grain, so the backdrop is not a perfectly flat JPEG block.
    grain = rng.normal(0.0, 4.0, size=(height // 4 + 1, width // 4 + 1, 1))
    grain_img = Image.fromarray(np.clip(grain + 128.0, 0, 255).astype(np.uint8)[:, :, 0], "L")
    grain_up = np.asarray(grain_img.resize((width, height), Image.Resampling.BILINEAR), dtype=np.int16) - 128
    pixels = np.clip(np.asarray(image, dtype=np.int16) + grain_up[:, :, None], 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def draw_flower(design: ClassDesign, rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """One photograph-like RGB image of a flower of ``design``, ``width`` x ``height`` pixels."""
    big_w, big_h = width * SUPERSAMPLE, height * SUPERSAMPLE
    image = _background(rng, big_w, big_h)
    draw = ImageDraw.Draw(image)
    side = min(big_w, big_h)

    radius = 0.5 * side * rng.uniform(0.7, 1.0)
    # Stay near the middle: the processor centre-crops non-square images.
    cx = big_w / 2 + rng.uniform(-0.07, 0.07) * side
    cy = big_h / 2 + rng.uniform(-0.07, 0.07) * side

    if rng.random() < 0.65:  # a stem and a leaf, drawn first so the flower covers their top
        green = _hsv_to_rgb(rng.uniform(95.0, 135.0), rng.uniform(0.5, 0.75), rng.uniform(0.3, 0.5))
        stem_w = max(2, round(side * 0.025))
        foot_x = cx + rng.uniform(-0.15, 0.15) * side
        draw.line([(cx, cy), (foot_x, big_h)], fill=green, width=stem_w)
        t = rng.uniform(0.55, 0.8)
        lx, ly = cx + (foot_x - cx) * t, cy + (big_h - cy) * t
        leaf_angle = math.radians(-90.0 + rng.choice([-1.0, 1.0]) * rng.uniform(35.0, 75.0))  # up and out
        leaf_len = radius * rng.uniform(0.5, 0.8)
        draw.polygon(
            _petal_polygon(lx, ly, leaf_angle, leaf_len, leaf_len * 0.35, _PROFILES["pointed"]),
            fill=_shade(green, 1.1),
        )

    petal_rgb = _jitter_petal_colour(rng, design.petal_hsv)
    profile = _PROFILES[design.petal_shape]
    n = design.petal_count
    rotation = rng.uniform(0.0, 2.0 * math.pi)
    outline_w = max(1, SUPERSAMPLE // 2)
    for i in range(n):
        angle = rotation + 2.0 * math.pi * i / n + rng.uniform(-0.06, 0.06)
        length = radius * rng.uniform(0.92, 1.0)
        petal_width = length * design.petal_width_ratio * rng.uniform(0.92, 1.08)
        colour = _shade(petal_rgb, rng.uniform(0.94, 1.04))
        draw.polygon(
            _petal_polygon(cx, cy, angle, length, petal_width, profile),
            fill=colour,
            outline=_shade(colour, 0.72),
            width=outline_w,
        )
        # A deeper-toned throat and a midrib give the petal some depth.
        draw.polygon(
            _petal_polygon(cx, cy, angle, length * 0.55, petal_width * 0.55, profile),
            fill=_shade(colour, 0.84),
        )
        tip = (cx + 0.8 * length * math.cos(angle), cy + 0.8 * length * math.sin(angle))
        draw.line([(cx, cy), tip], fill=_shade(colour, 0.8), width=outline_w)

    centre_r = radius * design.centre_size * rng.uniform(0.93, 1.07)
    centre_rgb = design.centre_rgb
    draw.ellipse([cx - centre_r, cy - centre_r, cx + centre_r, cy + centre_r], fill=centre_rgb)
    # Stamen dots: lighter on dark centres, darker on light ones.
    dot_rgb = _shade(centre_rgb, 1.35) if sum(centre_rgb) < 360 else _shade(centre_rgb, 0.7)
    dot_r = max(1.0, centre_r * 0.12)
    for _ in range(int(rng.integers(7, 12))):
        a = rng.uniform(0.0, 2.0 * math.pi)
        d = centre_r * math.sqrt(rng.uniform(0.05, 0.6))
        x, y = cx + d * math.cos(a), cy + d * math.sin(a)
        draw.ellipse([x - dot_r, y - dot_r, x + dot_r, y + dot_r], fill=dot_rgb)

    small = image.reduce(SUPERSAMPLE)
    # A global exposure change, like a photo taken in other light: small enough to keep classes apart.
    gain = rng.uniform(0.93, 1.05)
    pixels = np.clip(np.asarray(small, dtype=np.float32) * gain, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _image_size(rng: np.random.Generator, image_size: int) -> tuple[int, int]:
    """(width, height): square a third of the time, otherwise up to 5:4 either way, like photos."""
    if rng.random() < 1 / 3:
        return image_size, image_size
    other = round(image_size * rng.uniform(0.83, 1.25))
    return (image_size, other) if rng.random() < 0.5 else (other, image_size)


def render_image(
    label: int, split: str, index: int, *, image_size: int = 96, seed: int = 0
) -> Image.Image:
    """The ``index``-th image of class ``label`` in ``split``; the same arguments give the same pixels.

    Each image has its own random stream, so it does not change when the per-class counts do.
    """
    rng = np.random.default_rng([seed, label, SPLITS.index(split), index])
    width, height = _image_size(rng, image_size)
    return draw_flower(CLASS_DESIGNS[label], rng, width, height)


def preview_grid(*, image_size: int = 96, seed: int = 0, cell: int = 64) -> Image.Image:
    """One training image per class on a grid: a column per petal colour, a row per flower form.

    These are the first training images of each class, exactly as the release holds them (before JPEG).
    """
    cols, rows = len(PETAL_COLOURS), len(FLOWER_FORMS)
    sheet = Image.new("RGB", (cols * cell, rows * cell), (255, 255, 255))
    for design in CLASS_DESIGNS:
        image = render_image(design.label, "train", 0, image_size=image_size, seed=seed)
        image.thumbnail((cell - 2, cell - 2), Image.Resampling.LANCZOS)
        col, row = divmod(design.label, rows)
        sheet.paste(image, (col * cell + 1, row * cell + 1))
    return sheet
