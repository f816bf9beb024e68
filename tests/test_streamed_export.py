"""Streamed export and streamed init (issue 17): graphs and weights equal to the loaded export's, the pass
checks on the truncated model, bad weights refused without a half-written artifact."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import random_model, small_config
from zaya_export.cli import main
from zaya_export.exporter import export_artifact
from zaya_export.models import ZayaForCausalLM, init_weights, preset
from zaya_export.models.checkpoint import load_checkpoint, save_checkpoint, save_streamed_checkpoint
from zaya_export.models.entries import example_feed
from zaya_export.models.safetensors_header import read_header
from zaya_export.models.checkpoint import count_nonfinite
from zaya_export.models.streaming import PROBE_VOCAB, StreamedCheckpoint, probe_layers, probe_vocab, random_slots
from zaya_export.runtime.artifact import open_artifact
from zaya_export.runtime.session import Session


@pytest.fixture(scope="module")
def model():
    return random_model(small_config(num_hidden_layers=3, layer_types=["hybrid", "hybrid_sliding", "hybrid"],
                                     sliding_window=8), seed=5)


@pytest.fixture(scope="module")
def exports(model, tmp_path_factory):
    """The same checkpoint exported loaded and streamed (AR entries, bf16 storage)."""
    root = tmp_path_factory.mktemp("stream")
    ckpt = save_checkpoint(model, root / "ckpt")
    arts = {mode: root / f"art-{mode}" for mode in ("off", "on")}
    for mode, out in arts.items():
        export_artifact(ckpt, out, stream=mode, tidar="off", dtype="bf16")
    return ckpt, arts


def _graph_bytes(path) -> bytes:
    """The graph without its external-data references (the two weight files order tensors differently)."""
    proto = onnx.load(str(path), load_external_data=False)
    for t in proto.graph.initializer:
        del t.external_data[:]
    return proto.SerializeToString()


def test_streamed_export_writes_the_loaded_exports_graphs_and_weights(exports):
    _, arts = exports
    loaded, streamed = (open_artifact(arts[m]).manifest for m in ("off", "on"))
    assert set(loaded.entry_points) == set(streamed.entry_points) == {"prefill", "decode", "layers"}
    for name in loaded.entry_points:
        assert _graph_bytes(arts["off"] / f"onnx/{name}.onnx") == _graph_bytes(arts["on"] / f"onnx/{name}.onnx")
    a, b = (load_file(arts[m] / "onnx/weights.safetensors") for m in ("off", "on"))
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert b["model.layers.0.mlp.gate.balancing_biases"].dtype == torch.float32  # routing biases stay fp32
    # the fusion log: whole-model rewrites, probe checked on the first two layers (both layer types)
    assert [(r.name, r.rewrites, r.probe_layers) for r in streamed.pass_log.model] == [
        ("fuse_cca", 3, 2), ("fuse_attention", 3, 2), ("fuse_moe", 3, 2)]
    assert all(r.probe_layers is None for r in loaded.pass_log.model)
    assert "probe_layers" not in json.loads((arts["off"] / "manifest.json").read_text())["pass_log"]["model"][0]


def test_streamed_artifact_runs_like_the_loaded_one(exports, model):
    _, arts = exports
    feed = example_feed(model, 2, 5, 3, seed=4)
    outs = [Session.from_artifact(open_artifact(arts[m]), backend="ort").run("prefill", feed) for m in ("off", "on")]
    assert outs[0].keys() == outs[1].keys()
    for name in outs[0]:
        np.testing.assert_array_equal(outs[0][name], outs[1][name])


def test_streamed_export_refuses_nan_weights_late_without_an_artifact(model, tmp_path):
    bad = ZayaForCausalLM(model.config)
    bad.load_state_dict(model.state_dict())
    with torch.no_grad():  # in the last layer: past the truncated model, found while the weights are written
        bad.model.layers[2].mlp.experts.down_proj[1, 3, 5] = float("nan")
    ckpt = save_checkpoint(bad, tmp_path / "ckpt")
    result = CliRunner().invoke(main, ["export", str(ckpt), "-o", str(tmp_path / "art"), "--stream", "on",
                                       "--tidar", "off"])
    assert result.exit_code == 2 and result.output.count("error:") == 1, result.output
    assert "NaN/Inf" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "art").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_streamed_init_matches_init_weights_and_shards(tmp_path):
    config = preset("tiny")
    reference = ZayaForCausalLM(config)
    init_weights(reference, 3)
    slots, produce = random_slots(config, 3, torch.bfloat16)
    out = save_streamed_checkpoint(config, tmp_path / "ck", slots, produce, max_shard_bytes=400_000)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) >= math.ceil(sum(s.nbytes for s in slots) / 400_000) and (out / "model.safetensors.index.json").is_file()
    for shard in shards:  # every tensor aligned to its element size
        assert all(info.start % (2 if info.dtype == "BF16" else 4) == 0 for info in read_header(shard).values())
    loaded = load_checkpoint(out, dtype="fp32")
    for name, want in reference.state_dict().items():
        stored = torch.float32 if name.endswith("balancing_biases") else torch.bfloat16
        assert torch.equal(loaded.state_dict()[name], want.to(stored).float()), name
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_truncated_model_and_probe_layers(model, tmp_path):
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    source = StreamedCheckpoint(ckpt)
    assert probe_layers(source.config) == 2
    assert probe_layers(small_config(num_hidden_layers=4, layer_types=["hybrid"] * 3 + ["hybrid_sliding"],
                                     sliding_window=8)) == 4
    truncated = source.truncated(2, torch.float32)
    assert truncated.config.num_hidden_layers == 2
    for name, t in truncated.state_dict().items():
        assert torch.equal(t, model.state_dict()[name]), name
    small = source.truncated(2, torch.bfloat16, vocab=100)  # the first rows of the tied embedding/head
    emb = model.model.embed_tokens.weight
    assert small.config.vocab_size == 100 and small.lm_head.weight is small.model.embed_tokens.weight
    assert torch.equal(small.model.embed_tokens.weight, emb[:100].to(torch.bfloat16).float())
    assert small(torch.tensor([[5, 99]])).shape == (1, 2, 100)
    stand_in = source.stand_in(torch.float32)
    big = stand_in.model.layers[0].mlp.experts.gate_up_proj
    assert big.stride() == (0,) * big.dim() and not big.any()  # shapes only: one zero broadcast
    assert torch.equal(stand_in.model.layers[1].self_attn.qk_norm.temp,
                       model.model.layers[1].self_attn.qk_norm.temp)  # small tensors are real


def test_probe_vocab_keeps_every_special_token():
    cfg = preset("8b")
    assert probe_vocab(cfg) == PROBE_VOCAB < cfg.vocab_size
    far = small_config(vocab_size=300_000, eos_token_id=[1, 299_000], mask_token_id=4)
    assert probe_vocab(far) == 299_001
    assert probe_vocab(small_config(vocab_size=1000)) == 1000  # never more than the model has


def test_nonfinite_count_in_chunks(monkeypatch):
    import zaya_export.models.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "_FINITE_CHUNK", 7)  # values on both sides of several chunk borders
    t = torch.zeros(5, 9, dtype=torch.bfloat16)
    t[0, 6], t[0, 7], t[4, 8] = float("nan"), float("inf"), float("-inf")
    assert count_nonfinite(t) == 3 and count_nonfinite(t[1:4]) == 0
