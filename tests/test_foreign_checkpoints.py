"""End to end on checkpoints written by upstream ``save_pretrained`` (not by this tool), with large logits,
the skip class firing, a sliding layer, κ = 3, head dim 128 and an untied head with a bias: they export, run
and validate; ORT greedy and greedy TiDAR (both modes) equal upstream's greedy generation, and so does IREE."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from upstream_checkpoints import upstream_as_loaded, upstream_greedy, write_upstream_checkpoint
from zaya_export.runtime.artifact import open_artifact
from zaya_export.models.checkpoint import load_checkpoint
from zaya_export.cli import main
from zaya_export.exporter import export_artifact
from zaya_export.mlir_export import TARGETS
from zaya_export.runtime.generate import generate
from zaya_export.sources import open_session
from zaya_export.runtime.tidar import generate_tidar
from zaya_export.validate import validate_artifact

N_NEW = 24


def _prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(5)
    return [rng.integers(5, vocab, n).tolist() for n in (9, 3, 14)]


@pytest.fixture(scope="module")
def sliding(tmp_path_factory):
    """TiDAR on (the checkpoint is an AR one), so every entry point is exported and checked."""
    ckpt = write_upstream_checkpoint(tmp_path_factory.mktemp("foreign") / "sliding", "sliding_skip", seed=1,
                                     skip_fires=True)
    out = ckpt.parent / "art"
    export_artifact(ckpt, out, tidar="on")
    return ckpt, out


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    """AR-only (auto) export to ONNX and MLIR, compiled for the CPU."""
    ckpt = write_upstream_checkpoint(tmp_path_factory.mktemp("foreign") / "gqa", "gqa128_untied", seed=2)
    out = ckpt.parent / "art"
    export_artifact(ckpt, out, formats=("onnx", "mlir"), targets=(TARGETS["cpu"],))
    return ckpt, out


def test_the_regime_is_the_hard_one(sliding):
    ckpt, _ = sliding
    model = load_checkpoint(ckpt)
    ids = torch.tensor(_prompts(model.config.vocab_size)[0])[None]
    with torch.no_grad():
        assert model(ids).abs().max() > 40
        chosen = []
        handles = [layer.mlp.gate.register_forward_hook(lambda m, a, out: chosen.append(out[0]))
                   for layer in model.model.layers]
        model(torch.tensor(_prompts(model.config.vocab_size)[2])[None])
        for h in handles:
            h.remove()
    assert any((c == model.config.num_experts).any() for c in chosen)  # the skip class fires


@pytest.mark.parametrize("fixture", ["sliding", "gqa"])
def test_ort_greedy_equals_upstream_greedy(fixture, request):
    ckpt, art = request.getfixturevalue(fixture)
    hf = upstream_as_loaded(ckpt)
    prompts = _prompts(hf.config.vocab_size)
    session = open_session(art, backend="ort")
    want = upstream_greedy(hf, prompts, N_NEW)
    assert generate(session, prompts, N_NEW).tokens == want  # batched, left padded
    for p, w in zip(prompts, want):
        assert generate(session, [p], N_NEW).tokens[0] == w


@pytest.mark.parametrize("fused", [False, True], ids=["tidar", "tidar-fused"])
def test_greedy_tidar_equals_upstream_greedy_ar(sliding, fused):
    ckpt, art = sliding
    hf = upstream_as_loaded(ckpt)
    prompts = _prompts(hf.config.vocab_size)
    session = open_session(art, backend="ort")
    for p, w in zip(prompts, upstream_greedy(hf, prompts, N_NEW)):
        assert generate_tidar(session, [p], N_NEW, fused=fused).tokens[0] == w


def test_iree_greedy_equals_upstream_greedy(gqa):
    ckpt, art = gqa
    hf = upstream_as_loaded(ckpt)
    prompts = _prompts(hf.config.vocab_size)
    session = open_session(art, backend="iree")
    for p, w in zip(prompts, upstream_greedy(hf, prompts, N_NEW)):
        assert generate(session, [p], N_NEW).tokens[0] == w


@pytest.mark.parametrize("fixture, backend", [("sliding", "ort"), ("gqa", "iree")])
def test_validate_passes_with_scale_aware_tolerances(fixture, backend, request):
    _, art = request.getfixturevalue(fixture)
    report = validate_artifact(open_artifact(art), backend=backend, reference="hf")
    assert report["ok"], [c for c in report["entries"] + report["greedy"] + report["tidar"] if not c["ok"]]
    assert max(c["max_abs"] for c in report["entries"]) > 1e-5  # large logits: errors an absolute limit refused


def test_ar_checkpoint_exports_ar_entries_only_and_refuses_tidar_runs(gqa):
    ckpt, art = gqa
    manifest = open_artifact(art).manifest
    assert sorted(manifest.entry_points) == ["decode", "layers", "prefill"] and manifest.tidar is None
    runner = CliRunner()
    result = runner.invoke(main, ["run", str(art), "--prompt-ids", "5,6,7", "--mode", "tidar"])
    assert result.exit_code == 2 and "exported from an AR checkpoint" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(main, ["export", str(ckpt), "-o", str(art.parent / "x"), "--block-len", "4"])
    assert result.exit_code == 2 and "--tidar on" in result.output


def test_stored_skip_bias_warns_and_validate_reports_the_upstream_reset(tmp_path):
    ckpt = write_upstream_checkpoint(tmp_path / "quirk", "sliding_skip", seed=3, skip_fires=True,
                                     stored_skip_bias=-0.6)
    with pytest.warns(UserWarning, match="resets them to -1.0"):
        load_checkpoint(ckpt)
    out = tmp_path / "art"
    with warnings.catch_warnings():  # as in a fresh CLI process: the suite's filters would hide it
        warnings.simplefilter("always")
        result = CliRunner().invoke(main, ["export", str(ckpt), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "skip-class balancing bias" in result.output
    assert json.loads(result.output.splitlines()[-1])["entry_points"] == ["decode", "layers", "prefill"]
    report = validate_artifact(open_artifact(out), reference="hf")
    assert report["ok"]
    quirk = report["upstream_skip_bias_reset"]
    assert [q["stored"] for q in quirk["layers"]] == pytest.approx([-0.6, -0.6])
    assert quirk["max_abs_vs_as_loaded"] > 100 * quirk["max_abs_vs_stored"]  # the reset explains the difference


def test_validate_still_fails_a_wrong_artifact(gqa, tmp_path):
    """Scale-aware limits are not loose ones: the artifact checked against a checkpoint whose experts of one
    layer are 10% off fails."""
    import shutil

    from safetensors.torch import load_file, save_file

    ckpt, art = gqa
    other = shutil.copytree(ckpt, tmp_path / "other")
    tensors = load_file(str(other / "model.safetensors"))
    name = "model.layers.1.mlp.experts.down_proj"
    tensors[name] = tensors[name] * 1.1
    save_file(tensors, str(other / "model.safetensors"), metadata={"format": "pt"})
    report = validate_artifact(open_artifact(art), checkpoint=other)
    assert not report["ok"]
    assert not all(c["ok"] for c in report["entries"])
    runner = CliRunner()
    result = runner.invoke(main, ["bench", str(art), "--modes", "ar,tidar"])
    assert result.exit_code == 2 and "no TiDAR entry points" in result.output
