"""The study scripts' shared pieces: README blocks spliced in place, intervals across seeds, and paired
tests that refuse evaluations of other samples."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from readme_block import splice  # noqa: E402
from studylib import pooled_test, t_interval  # noqa: E402


def test_splice_replaces_only_its_block_and_names_missing_markers():
    text = "a\n<!-- x:start -->\nold\n<!-- x:end -->\nb\n<!-- y:start -->\nkeep\n<!-- y:end -->\n"
    out = splice(text, "x", "new\n")
    assert out == text.replace("old", "new") and splice(out, "x", "new") == out
    with pytest.raises(SystemExit, match="<!-- z:start -->"):
        splice(text, "z", "new")


def test_t_interval_is_students_across_seeds():
    values = [0.6, 0.65, 0.7]
    mean, lo, hi = t_interval(values)
    want = stats.t.interval(0.95, 2, loc=np.mean(values), scale=stats.sem(values))
    assert mean == pytest.approx(0.65) and (lo, hi) == pytest.approx(want)
    assert t_interval([0.5]) == (0.5, 0.5, 0.5)


def write(ev: Path, indices: list[int], correct: list[int]) -> Path:
    ev.mkdir(parents=True)
    (ev / "outcomes.json").write_text(json.dumps({"indices": indices, "correct": {"worst_image": correct}}))
    return ev


def test_pooled_test_pairs_the_same_samples_only(tmp_path):
    a0, b0 = write(tmp_path / "a0", [1, 2, 3, 4], [1, 1, 1, 1]), write(tmp_path / "b0", [1, 2, 3, 4], [0, 0, 0, 1])
    a1, b1 = write(tmp_path / "a1", [1, 2, 3, 4], [1, 1, 0, 1]), write(tmp_path / "b1", [1, 2, 3, 4], [0, 0, 0, 1])
    test = pooled_test([(a0, b0), (a1, b1)], "worst_image")
    assert test.diff == pytest.approx((7 - 2) / 8)
    other = write(tmp_path / "c", [1, 2, 3, 5], [1, 1, 1, 1])
    with pytest.raises(SystemExit, match="other samples"):
        pooled_test([(a0, other)], "worst_image")
