"""``export --levels auto``: the packed step's acceptance levels chosen from the calibration's fused histogram."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from zaya_export import exporter
from zaya_export.calibrate import levels_from_histogram, measure_acceptance
from zaya_export.cli import main
from zaya_export.exporter import ExportError, ExportOptions, ExportRun
from zaya_export.models.checkpoint import load_checkpoint
from zaya_export.runtime.tokenizer import load_tokenizer

DEMO = Path(__file__).resolve().parent.parent / "models" / "zaya1-demo"
DEFAULT = (0, 6, 16)


@pytest.mark.parametrize("hist, want", [
    ([181, 128, 47, 25, 5, 7, 1, 1, 1] + [0] * 8, (0, 1, 2)),  # the demo checkpoint's fused run
    ([10, 3, 3, 9] + [0] * 13, (0, 1, 3)),  # most frequent first; a tie goes to the smaller length
    ([50] + [0] * 16, DEFAULT),  # nothing but rejections (an untrained drafter): no evidence, the default
    ([50, 0, 0, 0, 4] + [0] * 12, (0, 4, 6)),  # one length seen: the rest from the default
    ([1] * 17, (0, 1, 2)),
])
def test_levels_follow_the_histogram(hist, want):
    assert levels_from_histogram(hist, 3, DEFAULT) == want


def test_auto_levels_are_calibrated_and_the_calibration_matches_them(tmp_path):
    """The calibrate phase replaces the default levels by the histogram's and measures the acceptance again
    with them, so calibration.json describes the step that is exported."""
    model = load_checkpoint(DEMO, dtype="fp32")
    run = ExportRun(checkpoint=DEMO, out=tmp_path / "out", options=ExportOptions(levels="auto", calibrate=2).checked(),
                    tmp=tmp_path, status=lambda msg: None, model=model, with_tidar=True, block_len=16,
                    levels=DEFAULT)
    first = measure_acceptance(model, load_tokenizer(DEMO / "tokenizer.json"), 16, DEFAULT, 2)
    exporter._calibrate(run)
    assert run.levels == levels_from_histogram(first.acceptance["tidar-fused"], 3, DEFAULT) != DEFAULT
    written = json.loads((tmp_path / exporter.CALIBRATION_FILE).read_text())
    again = measure_acceptance(model, load_tokenizer(DEMO / "tokenizer.json"), 16, run.levels, 2)
    assert written["acceptance"] == again.acceptance
    assert sum(written["acceptance"]["tidar-fused"]) < sum(first.acceptance["tidar-fused"])  # fewer, longer steps


def test_bad_levels_are_refused(tmp_path):
    with pytest.raises(ExportError, match="--levels must be comma-separated integers or auto"):
        ExportOptions(levels="most").checked()
    result = CliRunner().invoke(main, ["export", str(DEMO), "-o", str(tmp_path / "a"), "--levels", "0,x"])
    assert result.exit_code == 2 and "--levels must be comma-separated integers or auto" in result.stderr
