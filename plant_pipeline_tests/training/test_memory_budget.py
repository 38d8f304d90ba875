"""bench/memory_budget.py at toy sizes (--quick): both sides train in their own process and the figures add up."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

# Two child processes building and training the full-size recipe's toy twin (~20 s): run with `pytest -m slow`.
pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[2] / "bench" / "memory_budget.py"


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    work = tmp_path_factory.mktemp("memory-budget")
    out = subprocess.run([sys.executable, str(BENCH), "--quick", "--steps", "2", "--work", str(work)],
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_both_sides_run_the_laptop_recipe(figures):
    for side in ("ours", "plain"):
        assert figures[side]["side"] == side
        assert figures[side]["steps"] == 2
        assert figures[side]["dtype"] == "bfloat16"
        assert figures[side]["step_s"] > 0
    # Ours streams with the device policy's loader workers; the plain Trainer reads in its own process.
    assert figures["ours"]["workers"] == 2
    assert figures["plain"]["workers"] == 0


def test_parts_add_up(figures):
    for side in ("ours", "plain"):
        run = figures[side]
        # AdamW keeps two fp32 moments per trainable (fp32) parameter (and a 4-byte step count per tensor), and
        # nothing for the frozen base.
        assert run["optimizer_state_gib"] >= 2 * run["trainable_gib"]
        assert run["optimizer_state_gib"] == pytest.approx(2 * run["trainable_gib"], rel=0.01)
        assert 0 < run["trainable_gib"] < run["weights_gib"]
        assert run["peak_rss_gib"] >= run["rss_gib"]["first_step"] - 1e-3
    assert figures["ours_peak_gib"] == pytest.approx(
        max(figures["ours"]["peak_rss_gib"], figures["ours"]["peak_pss_with_workers_gib"]))
    assert figures["peak_ratio"] == pytest.approx(figures["ours_peak_gib"] / figures["plain_peak_gib"])
