"""Categories are data: a ``CategoryMap`` (names indexed by id, the question asked, the source) read from each
source, and the Oxford Flowers 102 names, the default source's.

Ids are append-only within a source: a category keeps its id when others are added (``extended``), so older
models and reports stay readable. Names are compared after ``normalise_name`` (case, spaces, ``_`` and ``-``),
so ``Sweet_Pea`` and ``sweet pea`` are one category and two folders that normalise alike are an error.

The Oxford names are the list commonly published with the dataset (``cat_to_name.json``), whose keys are the
1-based label values of ``imagelabels.mat``, kept verbatim, quirks included ("lotus lotus").
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

from plant_pipeline.ml.errors import UsageError
from plant_pipeline.ml.files import atomic_write_json

CATEGORY_NAMES: tuple[str, ...] = (
    "pink primrose",
    "hard-leaved pocket orchid",
    "canterbury bells",
    "sweet pea",
    "english marigold",
    "tiger lily",
    "moon orchid",
    "bird of paradise",
    "monkshood",
    "globe thistle",
    "snapdragon",
    "colt's foot",
    "king protea",
    "spear thistle",
    "yellow iris",
    "globe-flower",
    "purple coneflower",
    "peruvian lily",
    "balloon flower",
    "giant white arum lily",
    "fire lily",
    "pincushion flower",
    "fritillary",
    "red ginger",
    "grape hyacinth",
    "corn poppy",
    "prince of wales feathers",
    "stemless gentian",
    "artichoke",
    "sweet william",
    "carnation",
    "garden phlox",
    "love in the mist",
    "mexican aster",
    "alpine sea holly",
    "ruby-lipped cattleya",
    "cape flower",
    "great masterwort",
    "siam tulip",
    "lenten rose",
    "barbeton daisy",
    "daffodil",
    "sword lily",
    "poinsettia",
    "bolero deep blue",
    "wallflower",
    "marigold",
    "buttercup",
    "oxeye daisy",
    "common dandelion",
    "petunia",
    "wild pansy",
    "primula",
    "sunflower",
    "pelargonium",
    "bishop of llandaff",
    "gaura",
    "geranium",
    "orange dahlia",
    "pink-yellow dahlia",
    "cautleya spicata",
    "japanese anemone",
    "black-eyed susan",
    "silverbush",
    "californian poppy",
    "osteospermum",
    "spring crocus",
    "bearded iris",
    "windflower",
    "tree poppy",
    "gazania",
    "azalea",
    "water lily",
    "rose",
    "thorn apple",
    "morning glory",
    "passion flower",
    "lotus lotus",
    "toad lily",
    "anthurium",
    "frangipani",
    "clematis",
    "hibiscus",
    "columbine",
    "desert-rose",
    "tree mallow",
    "magnolia",
    "cyclamen",
    "watercress",
    "canna lily",
    "hippeastrum",
    "bee balm",
    "ball moss",
    "foxglove",
    "bougainvillea",
    "camellia",
    "mallow",
    "mexican petunia",
    "bromelia",
    "blanket flower",
    "trumpet creeper",
    "blackberry lily",
)

NUM_CLASSES = len(CATEGORY_NAMES)  # Oxford's 102; other sources have as many as their data
OXFORD_SOURCE = "oxford_flowers"
OXFORD_QUESTION = "What flower is this?"
DEFAULT_QUESTION = "What plant is this?"
CATEGORY_MAP_FORMAT = 2


class CategoryError(UsageError):
    """Category names or a category map that cannot be used: too few, colliding, malformed."""


def normalise_name(name: str) -> str:
    """The form names are compared in: Unicode NFC, case-folded, runs of spaces, ``_`` and ``-`` as one space."""
    return re.sub(r"[\s_-]+", " ", unicodedata.normalize("NFC", name).casefold()).strip()


def check_names(names: Iterable[str], where: str) -> tuple[str, ...]:
    """``names`` as a tuple, or CategoryError naming every group of names that normalise alike, and empty names."""
    names = tuple(names)
    empty = [name for name in names if not normalise_name(name)]
    if empty:
        raise CategoryError(f"{where}: empty category name(s) {empty!r}; every category needs a name")
    groups: dict[str, list[str]] = defaultdict(list)
    for name in names:
        groups[normalise_name(name)].append(name)
    clashes = [group for group in groups.values() if len(group) > 1]
    if clashes:
        listed = "; ".join(" / ".join(repr(n) for n in group) for group in clashes)
        raise CategoryError(
            f"{where}: {len(clashes)} group(s) of category names are the same once case, spaces, '_' and '-' are "
            f"ignored: {listed}. Rename or merge them so that each category has one name."
        )
    return names


@dataclass(frozen=True)
class CategoryMap:
    """The categories of a dataset: ``names[id]``, the question the prompts ask, the source they came from,
    whether photos in incoming/ may create new categories, and optional display names (name -> shown name)."""

    names: tuple[str, ...]
    question: str = DEFAULT_QUESTION
    source: str = OXFORD_SOURCE
    allow_new: bool = False
    display_names: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", check_names(self.names, f"categories of source {self.source!r}"))
        if not self.question.strip():
            raise CategoryError("the question is empty; set a question such as "
                                f"{DEFAULT_QUESTION!r}")
        unknown = sorted(set(self.display_names) - set(self.names))
        if unknown:
            raise CategoryError(f"display names given for {len(unknown)} unknown categories, e.g. "
                                f"{unknown[:5]!r}; keys must be category names of the data")

    def __len__(self) -> int:
        return len(self.names)

    def id_of(self, name: str) -> int | None:
        """The id of ``name`` (compared normalised), or None when it is not a category."""
        return self._ids().get(normalise_name(name))

    def _ids(self) -> dict[str, int]:
        ids = self.__dict__.get("_ids_cache")
        if ids is None:
            ids = {normalise_name(name): i for i, name in enumerate(self.names)}
            object.__setattr__(self, "_ids_cache", ids)
        return ids

    def display(self, category_id: int) -> str:
        name = self.names[category_id]
        return self.display_names.get(name, name)

    def extended(self, names: Iterable[str]) -> CategoryMap:
        """This map with the ``names`` it lacks appended in the order given; every existing id is kept."""
        new: list[str] = []
        seen = set(self._ids())
        for name in names:
            key = normalise_name(name)
            if key not in seen:
                seen.add(key)
                new.append(name)
        return self if not new else replace(self, names=self.names + tuple(new))

    def new_names(self, previous: CategoryMap | None) -> list[str]:
        """The names this map has that ``previous`` (same source) did not."""
        if previous is None or previous.source != self.source:
            return list(self.names)
        return [name for name in self.names if previous.id_of(name) is None]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": CATEGORY_MAP_FORMAT,
            "source": self.source,
            "question": self.question,
            "allow_new_categories": self.allow_new,
            "id_to_name": {str(i): name for i, name in enumerate(self.names)},
            "name_to_id": {name: i for i, name in enumerate(self.names)},
            "display_names": dict(self.display_names),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "category map") -> CategoryMap:
        """Read ``to_json``'s layout; a format-1 file (Oxford's names only) reads as the Oxford map."""
        try:
            id_to_name = data["id_to_name"]
            ids = sorted(int(key) for key in id_to_name)
        except (KeyError, TypeError, ValueError) as err:
            raise CategoryError(f"{where}: expected an object with 'id_to_name' (id -> name); {err!r}") from err
        if ids != list(range(len(ids))):
            raise CategoryError(f"{where}: ids must be 0..{len(ids) - 1} without gaps; got {ids[:10]}...")
        names = tuple(id_to_name[str(i)] for i in ids)
        if data.get("format", 1) == 1:
            return oxford_map() if names == CATEGORY_NAMES else cls(names, OXFORD_QUESTION)
        return cls(names, question=data.get("question", DEFAULT_QUESTION), source=data.get("source", OXFORD_SOURCE),
                   allow_new=bool(data.get("allow_new_categories", False)),
                   display_names=dict(data.get("display_names", {})))


def oxford_map() -> CategoryMap:
    """The default source's categories: Oxford's 102 names, its question, no new categories from incoming/."""
    return CategoryMap(CATEGORY_NAMES, question=OXFORD_QUESTION, source=OXFORD_SOURCE, allow_new=False)


def merge_category_map(previous: CategoryMap | None, current: CategoryMap) -> CategoryMap:
    """The map to write now: ``current``'s names appended to ``previous``'s when both come from the same source
    (ids are append-only, and categories added through incoming/ are kept), else ``current`` alone."""
    if previous is None or previous.source != current.source:
        return current
    merged = previous.extended(current.names)
    display = {**previous.display_names, **current.display_names}
    return replace(merged, question=current.question, allow_new=current.allow_new, display_names=display)


def read_category_map(path: str | Path) -> CategoryMap:
    path = Path(path)
    if not path.is_file():
        raise CategoryError(f"{path} does not exist; materialise category_map first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CategoryError(f"{path} is not valid JSON ({err}); materialise category_map again") from err
    return CategoryMap.from_json(data, str(path))


def write_category_map(path: str | Path, categories: CategoryMap) -> Path:
    """Write atomically (a reader sees the old or the new map, never half of one)."""
    return atomic_write_json(path, categories.to_json())


def read_display_names(path: str | Path) -> dict[str, str]:
    """A JSON object {category name: display name}, e.g. {"rosa canina": "Dog rose"}."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CategoryError(f"display names file {path}: {err}; expected a JSON object of name -> display name") from err
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise CategoryError(f"display names file {path}: expected a JSON object of name -> display name "
                            f"(strings); got {type(data).__name__}")
    return data


def category_map() -> dict[int, str]:
    """Map 0-based label -> Oxford category name."""
    return dict(enumerate(CATEGORY_NAMES))


def name_to_label() -> dict[str, int]:
    """Map Oxford category name -> 0-based label."""
    return {name: label for label, name in enumerate(CATEGORY_NAMES)}


@dataclass
class CountReport:
    """What ``check_category_counts`` found: errors stop the pipeline, warnings are shown; each names categories."""

    errors: list[str]
    warnings: list[str]
    per_category: list[dict[str, Any]]  # id, name and photos per split, for the asset's table


def check_category_counts(labels_and_splits: Iterable[tuple[int, str]], categories: CategoryMap, *,
                          min_train: int = 1, min_test: int = 1) -> CountReport:
    """Check a dataset's photos per category: at least two categories with photos; every category with at least
    ``min_train`` training photos (an error: the model cannot learn it) and ``min_test`` test photos (a warning:
    it cannot be evaluated). Categories of the map without any photo (kept for their ids) are a warning."""
    counts: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for label, split in labels_and_splits:
        counts[int(label)][split] += 1
    errors: list[str] = []
    warnings: list[str] = []
    unknown = sorted(label for label in counts if not 0 <= label < len(categories))
    if unknown:
        errors.append(f"labels {unknown[:10]} have no category (the map has ids 0..{len(categories) - 1})")
    present = [i for i in range(len(categories)) if i in counts]
    if len(present) < 2:
        errors.append(f"{len(present)} categor{'y has' if len(present) == 1 else 'ies have'} photos; a classifier "
                      "needs at least two")

    def named(ids: list[int]) -> str:
        shown = ", ".join(f"{categories.names[i]!r} ({counts[i]['train']} train, {counts[i]['test']} test)"
                          for i in ids[:20])
        return shown + (f" and {len(ids) - 20} more" if len(ids) > 20 else "")

    few_train = [i for i in present if counts[i]["train"] < min_train]
    if few_train:
        errors.append(f"{len(few_train)} categories have fewer than {min_train} training photos: {named(few_train)}; "
                      "add photos, or lower min_train_photos")
    few_test = [i for i in present if counts[i]["test"] < min_test]
    if few_test:
        warnings.append(f"{len(few_test)} categories have fewer than {min_test} test photos and cannot be fully "
                        f"evaluated: {named(few_test)}")
    empty = [i for i in range(len(categories)) if i not in present]
    if empty:
        warnings.append(f"{len(empty)} categories have no photos now (kept so that ids stay stable): "
                        + ", ".join(repr(categories.names[i]) for i in empty[:20]))
    table = [{"category_id": i, "name": categories.names[i], **{s: counts[i][s] for s in ("train", "validation", "test")}}
             for i in range(len(categories))]
    return CountReport(errors, warnings, table)


def relabel(labels: Iterable[int], from_names: tuple[str, ...] | list[str], to: CategoryMap) -> list[int]:
    """Labels that index ``from_names`` as ids of ``to`` (matched by normalised name); every name must be in ``to``."""
    mapping = {}
    for label, name in enumerate(from_names):
        category_id = to.id_of(name)
        if category_id is None:
            raise CategoryError(f"category {name!r} is not in the category map of source {to.source!r}")
        mapping[label] = category_id
    return [mapping[int(label)] for label in labels]
