"""A synthetic Oxford Flowers 102 release, written in the official layout, for offline demos and tests.

``make_demo_release`` draws simple flowers (demo_drawing.py) and writes ``102flowers.tgz``, ``imagelabels.mat``,
``setid.mat`` and ``md5sums`` exactly as the real download lays them out, so the same code reads both.
Run as ``python -m plant_pipeline.ml.data.demo_release OUT_DIR`` to write one.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import logging
import os
import shutil
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import scipy.io
from PIL import Image

from plant_pipeline.ml.data.categories import NUM_CLASSES
from plant_pipeline.ml.data.demo_drawing import DemoDataError, render_image
from plant_pipeline.ml.data.download import (
    MD5SUMS,
    RELEASE_FILES,
    md5sum,
    parse_md5sums,
)
from plant_pipeline.ml.data.manifest import SPLITS
from plant_pipeline.ml.data.oxford import SPLIT_VARS, image_relpath
from plant_pipeline.ml.files import replace_folder

logger = logging.getLogger(__name__)

ARCHIVE, LABELS_MAT, SETID_MAT = RELEASE_FILES
PARAMS_JSON = "demo_params.json"
OWN_FILES = (*RELEASE_FILES, MD5SUMS, PARAMS_JSON)  # everything a release writes; the marker last

# Bump when the drawing or the file format changes, so an old demo release is regenerated.
GENERATOR_VERSION = 1
JPEG_QUALITY = 90
MAX_IMAGES = 65535  # setid.mat stores 1-based ids as uint16


@dataclass(frozen=True)
class DemoRelease:
    """A synthetic release on disk: ``paths`` and ``md5`` are keyed by file name."""

    out_dir: Path
    paths: dict[str, Path]
    md5: dict[str, str]
    num_images: int


@dataclass(frozen=True)
class _Plan:
    labels: np.ndarray  # int, 0-based, indexed by image_id - 1
    splits: list[str]  # indexed by image_id - 1
    indices: list[int]  # index of the image within its (label, split)


def _plan_release(per_split: dict[str, int], seed: int) -> _Plan:
    items = [
        (label, split, k)
        for split in SPLITS
        for label in range(NUM_CLASSES)
        for k in range(per_split[split])
    ]
    # Ids are shuffled across classes and splits, as in the real release.
    order = np.random.default_rng([seed, 102]).permutation(len(items))
    shuffled = [items[i] for i in order]
    return _Plan(
        labels=np.array([item[0] for item in shuffled], dtype=np.int64),
        splits=[item[1] for item in shuffled],
        indices=[item[2] for item in shuffled],
    )


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _write_archive(path: Path, jpegs: Iterator[tuple[str, bytes]]) -> None:
    """A gzip tar whose bytes depend only on its members: no timestamps, owners or modes from here."""
    with open(path, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for name, data in jpegs:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    info.mtime = 0
                    info.mode = 0o644
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    info.type = tarfile.REGTYPE
                    tar.addfile(info, io.BytesIO(data))


# scipy stamps the creation time into the 116-byte text header; a fixed one keeps the file reproducible.
_MAT_HEADER = b"MATLAB 5.0 MAT-file, Platform: posix, Created by: plant_pipeline.ml.data.demo_release (synthetic)"


def _write_mat(path: Path, variables: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, variables, format="5", oned_as="row")
    data = bytearray(buffer.getvalue())
    data[:116] = _MAT_HEADER.ljust(116, b" ")
    path.write_bytes(bytes(data))


def _existing_release(out_dir: Path, params: dict) -> DemoRelease | None:
    """The release in ``out_dir`` if it is complete, intact and made with ``params``; else None."""
    params_path = out_dir / PARAMS_JSON
    try:
        recorded = json.loads(params_path.read_text())
    except (OSError, ValueError):
        return None
    if recorded.get("params") != params:
        return None
    try:
        sums = parse_md5sums((out_dir / MD5SUMS).read_text())
        if any(sums.get(name) != recorded["md5"].get(name) for name in RELEASE_FILES):
            return None
        if any(md5sum(out_dir / name) != sums[name] for name in RELEASE_FILES):
            return None
    except (OSError, ValueError, KeyError):
        return None
    return _release(out_dir, {name: sums[name] for name in RELEASE_FILES}, recorded["num_images"])


def _release(out_dir: Path, md5: dict[str, str], num_images: int) -> DemoRelease:
    paths = {name: out_dir / name for name in (*RELEASE_FILES, MD5SUMS)}
    return DemoRelease(out_dir=out_dir, paths=paths, md5=md5, num_images=num_images)


def make_demo_release(
    out_dir: Path,
    *,
    train_per_class: int = 10,
    validation_per_class: int = 2,
    test_per_class: int = 3,
    image_size: int = 96,
    seed: int = 0,
) -> DemoRelease:
    """Write a synthetic release in the official Oxford Flowers 102 layout into ``out_dir``.

    Idempotent: a complete, intact release made with the same parameters is returned as it is.
    Otherwise the files are generated in a temporary folder beside ``out_dir`` and moved in, with
    ``demo_params.json`` (the completion marker) last, so a crash never leaves a release that looks whole.
    """
    out_dir = Path(out_dir)
    per_split = {"train": train_per_class, "validation": validation_per_class, "test": test_per_class}
    for split, count in per_split.items():
        if count < 1:
            raise DemoDataError(
                f"{split}_per_class must be >= 1 so every class appears in every split, got {count}"
            )
    if image_size < 16:
        raise DemoDataError(f"image_size must be >= 16 pixels, got {image_size}")
    if seed < 0:
        raise DemoDataError(f"seed must be >= 0 (numpy seeds the per-image streams with it), got {seed}")
    num_images = NUM_CLASSES * sum(per_split.values())
    if num_images > MAX_IMAGES:
        raise DemoDataError(
            f"{num_images} images exceed the {MAX_IMAGES} that setid.mat's uint16 ids can number: "
            "lower the per-class counts"
        )
    params = {
        "generator_version": GENERATOR_VERSION,
        "train_per_class": train_per_class,
        "validation_per_class": validation_per_class,
        "test_per_class": test_per_class,
        "image_size": image_size,
        "seed": seed,
    }
    existing = _existing_release(out_dir, params)
    if existing is not None:
        logger.info("demo release in %s is complete and up to date; not regenerating", out_dir)
        return existing

    started = time.perf_counter()
    plan = _plan_release(per_split, seed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        tmp_dir.chmod(0o755)  # mkdtemp's 0o700 would otherwise become the release folder's mode
        def jpegs() -> Iterator[tuple[str, bytes]]:
            for i, (label, split, k) in enumerate(zip(plan.labels, plan.splits, plan.indices)):
                image = render_image(int(label), split, k, image_size=image_size, seed=seed)
                yield image_relpath(i + 1), _jpeg_bytes(image)

        _write_archive(tmp_dir / ARCHIVE, jpegs())
        _write_mat(tmp_dir / LABELS_MAT, {"labels": (plan.labels + 1).astype(np.uint8)[None, :]})
        ids = np.arange(1, num_images + 1)
        splits = np.array(plan.splits)
        _write_mat(
            tmp_dir / SETID_MAT,
            {SPLIT_VARS[s]: ids[splits == s].astype(np.uint16)[None, :] for s in SPLITS},
        )
        md5 = {name: md5sum(tmp_dir / name) for name in RELEASE_FILES}
        (tmp_dir / MD5SUMS).write_text("".join(f"{md5[name]}  {name}\n" for name in RELEASE_FILES))
        (tmp_dir / PARAMS_JSON).write_text(
            json.dumps({"params": params, "num_images": num_images, "md5": md5}, indent=2) + "\n"
        )
        _move_into_place(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    elapsed = time.perf_counter() - started
    logger.info("wrote a demo release of %d images to %s in %.1f s", num_images, out_dir, elapsed)
    return _release(out_dir, md5, num_images)


def _move_into_place(tmp_dir: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        replace_folder(tmp_dir, out_dir)  # the whole release at once: it appears whole or not at all
        return
    # out_dir may hold files that are not ours, so replace our files one by one instead of the folder.
    # The old marker goes first and the new one last, so a crash in between reads as incomplete.
    (out_dir / PARAMS_JSON).unlink(missing_ok=True)
    for name in OWN_FILES:
        os.replace(tmp_dir / name, out_dir / name)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m plant_pipeline.ml.data.demo_release",
        description="Write a synthetic Oxford Flowers 102 release (official layout) into OUT_DIR.",
    )
    parser.add_argument("out_dir", type=Path, help="folder to write 102flowers.tgz, *.mat and md5sums into")
    parser.add_argument("--train-per-class", type=int, default=10)
    parser.add_argument("--validation-per-class", type=int, default=2)
    parser.add_argument("--test-per-class", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=96, help="the shorter-or-equal side is near this")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    try:
        release = make_demo_release(
            args.out_dir,
            train_per_class=args.train_per_class,
            validation_per_class=args.validation_per_class,
            test_per_class=args.test_per_class,
            image_size=args.image_size,
            seed=args.seed,
        )
    except DemoDataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started
    print(f"demo release: {release.num_images} images in {release.out_dir} ({elapsed:.1f} s)")
    for name, path in release.paths.items():
        digest = release.md5.get(name, "")
        print(f"  {name:<16} {path.stat().st_size:>10,} bytes  {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
