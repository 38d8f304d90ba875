"""Real photos for tests: members of the shared mini release's 102flowers.tgz, extracted by image id."""

from __future__ import annotations

import tarfile
from collections.abc import Iterable
from pathlib import Path

MINI = "oxford-flowers-102-mini"


def extract_photos(shared_datasets: Path, root: Path, ids: Iterable[int]) -> list[Path]:
    """``jpg/image_<id>.jpg`` of each id written under ``root``, as the release lays them out; the archive is read
    only as far as the last of them."""
    wanted = {f"jpg/image_{i:05d}.jpg" for i in ids}
    paths = sorted(Path(root) / name for name in wanted)
    with tarfile.open(Path(shared_datasets) / MINI / "102flowers.tgz", "r:gz") as archive:
        for member in archive:
            if member.name in wanted:
                (Path(root) / member.name).parent.mkdir(parents=True, exist_ok=True)
                (Path(root) / member.name).write_bytes(archive.extractfile(member).read())
                wanted.discard(member.name)
                if not wanted:
                    break
    return paths
