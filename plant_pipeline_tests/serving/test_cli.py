"""`plant-pipeline identify` and `serve`: tables and JSON lines, one stderr line per bad photo, exit statuses."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from plant_pipeline.cli import build_parser, main
from plant_pipeline.ml.data.categories import CategoryMap
from plant_pipeline.ml.testing import make_model_folder

CATEGORIES = CategoryMap(names=("pink primrose", "rose", "sunflower"), display_names={"rose": "Garden rose"})


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tiny_model_dir):
    return make_model_folder(tmp_path_factory.mktemp("cli_models") / "model-c", CATEGORIES,
                             models_dir=tiny_model_dir.parent)


@pytest.fixture
def photos(tmp_path):
    red, green = tmp_path / "red.png", tmp_path / "green.jpg"
    Image.new("RGB", (40, 30), (220, 20, 20)).save(red)
    Image.new("RGB", (30, 40), (20, 200, 20)).save(green)
    bad = tmp_path / "leaf.txt"
    bad.write_text("not a photo")
    return str(red), str(green), str(bad)


def test_identify_answers_the_good_photos_and_names_the_bad_one(model_folder, photos, capsys):
    red, green, bad = photos
    status = main(["identify", red, bad, green, "--model", str(model_folder), "--device", "cpu"])
    out, err = capsys.readouterr()
    assert status == 1  # some photos failed
    assert err.splitlines() == [err.strip()] and err.startswith(f"plant-pipeline: {bad}: not an image")
    tables = out.split("\n\n")
    assert len(tables) == 2 and tables[0].startswith(red) and tables[1].startswith(green)
    for table in tables:
        header, columns, *rows = table.splitlines()
        assert "model model-c" in header and columns.split() == ["#", "name", "score"]
        assert [row.split()[0] for row in rows] == ["1", "2", "3"]  # default top 5, but only 3 categories
        assert all(row.endswith("%") for row in rows)
        assert any("Garden rose" in row for row in rows)


def test_identify_json_lines(model_folder, photos, capsys):
    red, green, _ = photos
    status = main(["identify", red, green, "--json", "--top-k", "3", "--model", str(model_folder), "--device", "cpu"])
    out, err = capsys.readouterr()
    assert status == 0 and err == ""
    answers = [json.loads(line) for line in out.splitlines()]
    assert [answer["photo"] for answer in answers] == [red, green]
    for answer in answers:
        assert answer["model_id"] == "model-c" and len(answer["top"]) == 3
        assert sum(guess["score"] for guess in answer["top"]) == pytest.approx(1.0, abs=1e-4)


def test_usage_errors_exit_2_with_the_message_and_no_traceback(model_folder, photos, tmp_path, capsys):
    red, _, _ = photos
    no_model = main(["identify", red, "--data-dir", str(tmp_path / "empty")])
    _, no_model_err = capsys.readouterr()
    too_many = main(["identify", red, "--top-k", "4", "--model", str(model_folder), "--device", "cpu"])
    _, too_many_err = capsys.readouterr()
    serve_no_model = main(["serve", "--data-dir", str(tmp_path / "empty")])
    _, serve_err = capsys.readouterr()
    assert no_model == 2 and no_model_err.startswith("plant-pipeline: no production model")
    assert too_many == 2 and "--top-k 4 is more than the model's 3 categories" in too_many_err
    assert serve_no_model == 2 and "no production model" in serve_err
    assert "Traceback" not in no_model_err + too_many_err + serve_err


def test_serve_binds_this_machine_only_unless_told():
    parser = build_parser()
    assert parser.parse_args(["serve"]).host == "127.0.0.1"
    assert parser.parse_args(["serve", "--host", "0.0.0.0", "--port", "9000"]).port == 9000


def test_the_module_runs_as_a_command():
    done = subprocess.run([sys.executable, "-m", "plant_pipeline.cli", "identify", "--help"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0 and "--top-k" in done.stdout and "--json" in done.stdout


@pytest.mark.slow  # ~12 s: a fresh interpreter imports torch and transformers
def test_a_reader_that_stops_early_gets_no_traceback(model_folder, photos):
    # `plant-pipeline identify ... | head -1`: the reader is gone before the answers are written.
    red, green, _ = photos
    process = subprocess.Popen([sys.executable, "-m", "plant_pipeline.cli", "identify", red, green, "--json",
                                "--model", str(model_folder), "--device", "cpu"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()
    err = process.stderr.read()
    assert process.wait(timeout=120) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
