"""Checkpoint I/O: round trips (single, sharded, legacy layout, dtypes) and a one-line error for every bad input."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest

from zaya_export.output_dir import OutputError
import torch
from safetensors.torch import save_file

from conftest import random_model, small_config
from zaya_export.models import legacy
from zaya_export.models.checkpoint import expected_tensors, load_checkpoint, save_checkpoint
from zaya_export.errors import CheckpointError


@pytest.fixture(scope="module")
def model():
    return random_model(small_config(), seed=3)


@pytest.fixture
def ckpt(tmp_path, model):
    return save_checkpoint(model, tmp_path / "ckpt")


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


def test_round_trip(model, ckpt):
    loaded = load_checkpoint(ckpt)
    assert _same(model, loaded)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied, stored once
    from zaya_export.models.safetensors_header import read_header

    assert "lm_head.weight" not in read_header(ckpt / "model.safetensors")
    ids = torch.randint(0, 1000, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # mmapped weights may be unaligned, so BLAS may round differently: not bit-exact
        assert (model(ids) - loaded(ids)).abs().max().item() <= 1e-5


def test_sharded_round_trip(tmp_path, model):
    out = save_checkpoint(model, tmp_path / "sharded", max_shard_bytes=200_000)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").is_file()
    assert _same(model, load_checkpoint(out))


def test_dtypes_and_fp32_routing_biases(tmp_path, model):
    out = save_checkpoint(model, tmp_path / "bf16", dtype=torch.bfloat16)
    loaded = load_checkpoint(out)
    assert loaded.dtype == torch.bfloat16
    assert loaded.model.layers[1].mlp.gate.balancing_biases.dtype == torch.float32
    assert load_checkpoint(out, dtype="fp32").dtype == torch.float32
    assert load_checkpoint(out, dtype=torch.float16).dtype == torch.float16


def _to_legacy(model, out, block="zaya_block"):
    """Write ``model`` in the legacy 80-layer layout (the inverse of the loader's mapping)."""
    cfg = model.config
    sd = model.state_dict()
    tensors = {}
    for native, sources in legacy.legacy_sources(cfg.num_hidden_layers, cfg.num_experts, block).items():
        value = sd[native]
        if len(sources) == 1:
            tensors[sources[0]] = value.contiguous()
        else:
            tensors.update({s: value[i].contiguous() for i, s in enumerate(sources)})
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"))
    data = cfg.to_dict()
    data.update(num_hidden_layers=2 * cfg.num_hidden_layers, ffn_hidden_size=2 * cfg.moe_intermediate_size,
                norm_epsilon=data.pop("rms_norm_eps"), num_query_groups=data.pop("num_key_value_heads"),
                zaya_mlp_expansion=data.pop("router_hidden_size"), moe_router_topk=data.pop("num_experts_per_tok"),
                residual_in_fp32=True, zaya_use_eda=True, zaya_use_mod=True, mamba_cache_dtype="float32")
    for k in ("moe_intermediate_size", "layer_types"):
        data.pop(k)
    (out / "config.json").write_text(json.dumps(data))
    return len(tensors)


@pytest.mark.parametrize("block", ["zaya_block", "smoe_block"])
def test_legacy_layout_maps_to_native(tmp_path, block):
    model = random_model(small_config(num_hidden_layers=3, sliding_window=None), seed=5)
    n = _to_legacy(model, tmp_path / "legacy", block)
    cfg = model.config
    assert n == len(expected_tensors(cfg)) - 2 * cfg.num_hidden_layers + 2 * cfg.num_hidden_layers * cfg.num_experts
    loaded = load_checkpoint(tmp_path / "legacy")
    assert loaded.config.num_hidden_layers == 3 and loaded.config.moe_intermediate_size == cfg.moe_intermediate_size
    assert _same(model, loaded)


def test_8b_legacy_tensor_count():
    # 2,483 legacy tensors for the 40-layer, 16-expert model (zaya1-model.md §5)
    names = {s for srcs in legacy.legacy_sources(40, 16).values() for s in srcs}
    assert len(names) == 2483


# ---------------------------------------------------------------- bad inputs


def _corrupt(path, fn):
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(fn(data)))


def _rewrite_tensors(ckpt, fn):
    from safetensors.torch import load_file
    tensors = fn(load_file(str(ckpt / "model.safetensors")))
    save_file(tensors, str(ckpt / "model.safetensors"))


def _header_len(data):
    return struct.unpack("<Q", bytes(data[:8]))[0]


def _bad_header(data):
    n = _header_len(data)
    return data[:8] + b"{" * n + data[8 + n:]


BAD = {
    "not a directory": (lambda c: c / "config.json", "not a checkpoint directory"),
    "missing config": (lambda c: (c / "config.json").unlink(), "config.json: missing"),
    "config not json": (lambda c: (c / "config.json").write_text("{oops"), "not valid JSON"),
    "invalid config": (lambda c: (c / "config.json").write_text(json.dumps({"num_experts_per_tok": 2})),
                       "invalid config: .*num_experts_per_tok"),
    "no weights": (lambda c: (c / "model.safetensors").unlink(), "no \\*.safetensors weights"),
    "truncated": (lambda c: _corrupt(c / "model.safetensors", lambda d: d[: len(d) - 1000]), "truncated"),
    "truncated header": (lambda c: _corrupt(c / "model.safetensors", lambda d: d[:100]), "header length .* exceeds"),
    "tiny file": (lambda c: _corrupt(c / "model.safetensors", lambda d: d[:5]), "truncated safetensors file"),
    "corrupt header": (lambda c: _corrupt(c / "model.safetensors", _bad_header), "corrupt safetensors header"),
    "trailing bytes": (lambda c: _corrupt(c / "model.safetensors", lambda d: d + b"\0" * 64), "header/size mismatch"),
    "missing tensor": (lambda c: _rewrite_tensors(c, lambda t: {k: v for k, v in t.items()
                                                                if "o_proj" not in k}), "missing tensors: .*o_proj"),
    "extra tensor": (lambda c: _rewrite_tensors(c, lambda t: {**t, "model.layers.0.bogus": torch.zeros(2)}),
                     "unexpected tensors: model.layers.0.bogus"),
    "wrong shape": (lambda c: _rewrite_tensors(c, lambda t: {**t, "model.norm.weight": torch.zeros(7)}),
                    "model.norm.weight.* shape \\[7\\], expected \\[128\\]"),
    "wrong dtype": (lambda c: _rewrite_tensors(c, lambda t: {**t, "model.norm.weight":
                                                             torch.zeros(128, dtype=torch.int32)}), "dtype I32"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoint_gives_one_line_error(ckpt, case):
    mutate, message = BAD[case]
    target = mutate(ckpt)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(target if isinstance(target, Path) else ckpt)
    assert "\n" not in str(info.value)


def test_sharded_index_errors(tmp_path, model):
    out = save_checkpoint(model, tmp_path / "sharded", max_shard_bytes=200_000)
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    wrong = next(s.name for s in shards if s.name != index["weight_map"]["model.norm.weight"])
    index["weight_map"]["model.norm.weight"] = wrong
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="maps 'model.norm.weight' to .* which does not hold it"):
        load_checkpoint(out)
    index_path.write_text("[]")
    with pytest.raises(CheckpointError, match="corrupt index"):
        load_checkpoint(out)
    index_path.unlink()
    with pytest.raises(CheckpointError, match="safetensors files but no model.safetensors.index.json"):
        load_checkpoint(out)
    index["weight_map"]["model.norm.weight"] = "model-99999-of-99999.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing shard"):
        load_checkpoint(out)


class _Boom:
    def __reduce__(self):
        return (open, ("/tmp/zaya_export_unpickled_marker", "w"))


def test_pickle_weights_are_refused_not_unpickled(tmp_path, ckpt):
    import os
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom()))
    marker = "/tmp/zaya_export_unpickled_marker"
    if os.path.exists(marker):
        os.remove(marker)
    with pytest.raises(CheckpointError, match="pickle weights .* refused, never unpickled"):
        load_checkpoint(ckpt)
    assert not os.path.exists(marker)


def test_save_is_atomic_and_refuses_to_overwrite(tmp_path, model, ckpt, monkeypatch):
    with pytest.raises(OutputError, match="already exists"):
        save_checkpoint(model, ckpt)
    import zaya_export.models.checkpoint as io

    real = io.save_file
    calls = []

    def interrupted(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # interrupted half-way through the shards
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(io, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, tmp_path / "never", max_shard_bytes=200_000)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, ckpt, max_shard_bytes=200_000, overwrite=True)
    assert not (tmp_path / "never").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dir left behind
    assert _same(model, load_checkpoint(ckpt))  # the good checkpoint survived the failed overwrite
