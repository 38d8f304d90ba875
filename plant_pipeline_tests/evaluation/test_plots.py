"""Tests of plots.py: figures that fit Dagster's metadata dialog (at most WIDTH_PX wide) at 4 and 102 classes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from plant_pipeline.ml.data.categories import CATEGORY_NAMES, NUM_CLASSES
from plant_pipeline.ml.evaluation.metrics import confusion_matrix, per_class_table
from plant_pipeline.ml.evaluation.plots import (
    WIDTH_PX,
    _id_ticks,
    _most_confused_cells,
    evaluation_figures,
    plot_confusion_matrix,
    plot_per_class_accuracy,
)
from plant_pipeline_tests.evaluation.test_metrics import NAMES, hand_made_predictions, predictions_frame

# Dagster's dialog is about 80% of the window wide and as tall as the window: a picture taller than this would
# need scrolling in a window of 1000 px.
MAX_HEIGHT_PX = 1000


def _png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        image.verify()
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return image.size


@pytest.fixture(scope="module")
def flowers_102():
    """Five test images per Oxford class, 70% right, the rest spread at random."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(NUM_CLASSES), 5)
    predicted = np.where(rng.random(len(labels)) < 0.7, labels, rng.integers(0, NUM_CLASSES, len(labels)))
    return predictions_frame(list(zip(labels.tolist(), predicted.tolist())))


def test_figures_of_102_classes_fit_the_dialog(flowers_102):
    figures = evaluation_figures(flowers_102, per_class_table(flowers_102, CATEGORY_NAMES), CATEGORY_NAMES)
    assert set(figures) == {"confusion_matrix.png", "per_class_accuracy.png"}
    for name, data in figures.items():
        width, height = _png_size(data)
        assert width == WIDTH_PX and height <= MAX_HEIGHT_PX, (name, width, height)


def test_figures_of_four_classes_fit_the_dialog(tmp_path):
    frame = hand_made_predictions()
    data = plot_per_class_accuracy(per_class_table(frame, NAMES), tmp_path / "acc.png")
    assert (tmp_path / "acc.png").read_bytes() == data
    width, height = _png_size(data)
    assert width == WIDTH_PX and 200 <= height <= MAX_HEIGHT_PX
    width, height = _png_size(plot_confusion_matrix(confusion_matrix(frame, len(NAMES)), NAMES, tmp_path / "cm.png"))
    assert width == WIDTH_PX and height <= MAX_HEIGHT_PX
    assert not list(tmp_path.glob("*.partial"))
    with pytest.raises(ValueError, match="does not match"):
        plot_confusion_matrix(np.zeros((3, 3)), NAMES)


def test_the_matrix_of_many_classes_ticks_every_few_ids_and_names_the_worst_pairs():
    assert _id_ticks(102) == list(range(0, 102, 10))
    assert _id_ticks(35) == list(range(0, 35, 5))  # 3.5 rounds up to the next of 1, 2, 5 x 10^k
    assert _id_ticks(1000)[:3] == [0, 100, 200]
    cm = np.array([[5, 2, 0], [3, 1, 3], [0, 0, 4]])
    # The diagonal is no confusion; ties (3, 3) go to the lower true then predicted id; empty cells never listed.
    assert _most_confused_cells(cm, 3) == [(1, 0, 3), (1, 2, 3), (0, 1, 2)]
    assert _most_confused_cells(np.eye(3, dtype=int), 5) == []
