"""``export --block-len auto``: the draft length the cost model predicts fastest (histogram truncation, the
candidates' arithmetic, the choice and its margin, the robust line through the timed forwards), end to end on
a small TiDAR checkpoint, and the refusals of a bad value."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import random_model, small_config
from zaya_export.block_choice import theil_sen
from zaya_export.cli import main
from zaya_export.exporter import ExportError, ExportOptions, export_artifact
from zaya_export.models.checkpoint import save_checkpoint
from zaya_export.runtime.artifact import open_artifact
from zaya_export.runtime.calibration import CALIBRATION_FILE
from zaya_export.runtime.costmodel import BlockCandidate, block_candidates, choose_block, mean_accepted, truncated


def test_truncation_caps_acceptance_and_keeps_every_step():
    hist = [6, 17, 10, 7, 16, 3, 3, 3, 2] + [0] * 8
    for k in (1, 4, 8, 16):
        cut = truncated(hist, k)
        assert len(cut) == k + 1 and cut.sum() == sum(hist)
        assert list(cut[:k]) == hist[:k] and cut[k] == sum(hist[k:])
    assert mean_accepted(truncated(hist, 16)) == mean_accepted(hist)
    assert mean_accepted(truncated(hist, 1)) == pytest.approx(61 / 67)


def test_candidates_follow_the_step_arithmetic():
    """Two forwards of K′+1 tokens per step, E[min(ℓ, K′)] + 1 tokens per step."""
    hist = [2, 2, 0, 0, 4]  # measured at K = 4
    cands = block_candidates(lambda t: 1.0 + 0.5 * t, hist, 4)
    assert [c.block_len for c in cands] == [1, 2, 3, 4]
    assert cands[0].step_ms == pytest.approx(2 * 2.0) and cands[0].tokens_per_step == pytest.approx(1 + 6 / 8)
    assert cands[3].step_ms == pytest.approx(2 * 3.5) and cands[3].tokens_per_step == pytest.approx(1 + 18 / 8)
    assert cands[1].tok_per_s == pytest.approx((1 + 10 / 8) / 5.0 * 1e3)


@pytest.mark.parametrize("slope, want", [
    (0.0, 4),  # a flat cost (a memory-bound GPU): the whole block
    (10.0, 1),  # every token costs as much as the forward itself: the shortest block
])
def test_choice_follows_the_cost_slope(slope, want):
    hist = [2, 2, 2, 2, 2]
    assert choose_block(block_candidates(lambda t: 1.0 + slope * t, hist, 4)).block_len == want


def test_choice_keeps_the_longest_within_the_margin():
    cands = [BlockCandidate(1, 2.0, 1.0), BlockCandidate(2, 1.97, 1.0), BlockCandidate(3, 1.5, 1.0)]
    assert choose_block(cands).block_len == 2
    assert choose_block(cands, margin=0.0).block_len == 1


def test_tiled_rows_price_a_forward_by_whole_tiles():
    hist = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]  # measured at K = 9
    plain = block_candidates(lambda t: float(t), hist, 9)
    tiled = block_candidates(lambda t: float(t), hist, 9, row_tile=8)
    assert [c.step_ms for c in tiled] == [16.0] * 7 + [32.0] * 2  # K′+1 = 2..8 → 8 rows, 9..10 → 16
    assert [c.tokens_per_step for c in tiled] == [c.tokens_per_step for c in plain]


def test_one_length_for_every_backend_scores_its_worst_share():
    """onnxruntime's costs grow row by row, so it slightly prefers K′ = 8 (9-token forwards); IREE's data-tiled
    module pays 9 rows as 16, where K′ = 7 fills its tile exactly. The joint choice is 7, and on onnxruntime
    alone it stays 8."""
    hist = [30, 20, 12, 8, 6, 5, 4, 4, 4]  # measured at K = 8
    line = lambda t: 1.0 + 0.02 * t  # noqa: E731 - a nearly flat CPU cost: every draft pays
    ort = block_candidates(line, hist, 8)
    iree = block_candidates(line, hist, 8, row_tile=8)
    assert choose_block(ort).block_len == 8
    assert choose_block(ort, others=[iree]).block_len == 7
    assert choose_block(ort, others=[ort]).block_len == 8  # a second identical backend changes nothing


@pytest.mark.parametrize("options, tiled", [
    (dict(formats=("onnx", "mlir")), True),  # cpu by default, fp32
    (dict(formats=("onnx", "mlir"), targets=("cpu", "gfx942")), True),
    (dict(formats=("onnx", "mlir"), targets=("gfx942",)), False),  # no CPU module
    (dict(formats=("onnx", "mlir"), dtype="bf16"), False),  # narrower parameters: no data tiling
    (dict(formats=("onnx", "mlir"), quant="int8"), False),
    (dict(formats=("onnx",)), False),
])
def test_the_tiled_cpu_module_is_priced_only_when_built(options, tiled):
    from zaya_export.exporter import _data_tiled_cpu

    assert _data_tiled_cpu(ExportOptions(**options).checked()) is tiled


def test_the_fitted_line_ignores_a_slow_outlier():
    points = {t: 1.0 + 0.05 * t for t in range(2, 18)}
    points[14] = 5.8  # one call caught behind another process
    line = theil_sen(points)
    assert line(2) == pytest.approx(1.1, rel=1e-6) and line(17) == pytest.approx(1.85, rel=1e-6)


def test_auto_block_len_exports_the_chosen_length_and_calibrates_it(tmp_path):
    """The export times a forward per candidate length, picks one of 1..K, and everything it writes (the
    TiDAR entries, the manifest, calibration.json) is at that length; the artifact runs and validates."""
    K = 6
    model = random_model(small_config(diffusion_block_len=K), seed=3)
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    out = tmp_path / "artifact"
    messages: list[str] = []
    manifest = export_artifact(ckpt, out, block_len="auto", calibrate=2, status=messages.append,
                               dump_after=("block",))
    chosen = json.loads(next((tmp_path / "artifact.dump").glob("*block_choice*")).read_text())
    k = chosen["chosen"]
    assert 1 <= k <= K and manifest.tidar.block_len == k
    assert [c["block_len"] for c in chosen["candidates"]] == list(range(1, K + 1))
    assert set(chosen["forward_ms"]) == {str(t) for t in range(2, K + 2)}
    assert all(ms > 0 for ms in chosen["forward_ms"].values())
    assert any(m.startswith(f"--block-len auto: K = {k}") for m in messages)
    art = open_artifact(out)
    assert art.entry_points["verify"].tokens == art.entry_points["draft"].tokens == k + 1
    calibration = json.loads((out / CALIBRATION_FILE).read_text())
    assert all(len(h) == k + 1 for h in calibration["acceptance"].values())
    result = CliRunner().invoke(main, ["validate", str(out), "--backend", "ort", "--json"])
    assert result.exit_code == 0, result.output
    assert not (out / "cost_probe").exists()


def test_auto_block_len_without_calibration_keeps_the_config_length(tmp_path):
    model = random_model(small_config(diffusion_block_len=4), seed=4)
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    messages: list[str] = []
    manifest = export_artifact(ckpt, tmp_path / "a", block_len="auto", calibrate=0, status=messages.append)
    assert manifest.tidar.block_len == 4
    assert "--block-len auto: no calibration to choose from, keeping 4" in messages


@pytest.mark.parametrize("value, message", [
    ("x", "--block-len must be an integer or auto"),
    ("4,5", "--block-len must be one integer or auto"),
    ("0", "--block-len must be in [1, "),
])
def test_bad_block_len_is_refused(tmp_path, value, message):
    model = random_model(small_config(diffusion_block_len=4), seed=4)
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    result = CliRunner().invoke(main, ["export", str(ckpt), "-o", str(tmp_path / "a"), "--block-len", value])
    assert result.exit_code != 0 and message in result.output + (result.stderr or "")
    assert "Traceback" not in result.output and not (tmp_path / "a").exists()
    with pytest.raises(ExportError, match="--block-len must be an integer or auto"):
        ExportOptions(block_len="most").checked()


def test_sessions_share_one_pool():
    """Every onnxruntime session of the process runs on the one shared pool (``backends.shared_pool``)."""
    import onnxruntime as ort

    from zaya_export.runtime.backends import shared_pool

    from onnx import TensorProto, helper

    from zaya_export.runtime.backends import ort_session

    size = shared_pool(ort)
    assert size >= 1 and shared_pool(ort, size + 3) == size  # the first request sized it
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "g", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]).SerializeToString()
    first, second = ort_session(model), ort_session(model)  # both on the pool: neither refused
    for session in (first, second):
        np.testing.assert_array_equal(session.run(None, {"x": np.array([1.0, 2.0], np.float32)})[0], [2.0, 4.0])
