"""ZayaConfig: upstream fields and defaults, validation, round trip, unknown fields, presets."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
import transformers

from zaya_export.models import PRESETS, ConfigError, ZayaConfig, ZayaForCausalLM, preset


def test_every_upstream_field_with_the_same_default():
    upstream = transformers.ZayaConfig()
    ours = ZayaConfig()
    own = {f.name for f in dataclasses.fields(ZayaConfig)}
    declared = set(transformers.ZayaConfig.__annotations__)
    assert declared <= own, declared - own
    for name in declared:
        assert getattr(ours, name) == getattr(upstream, name), name


def test_diffusion_fields_and_mask_token_resolution():
    assert ZayaConfig().mask_token_id == 4 and ZayaConfig().diffusion_block_len == 16
    cfg = ZayaConfig.from_dict({"draft_mask_token_id": 7, "mask_token_id": 9})
    assert cfg.mask_token_id == 7  # the first key in Zyphra's order wins
    assert ZayaConfig.from_dict({"tidar_mask_token_id": 5}).mask_token_id == 5


def test_round_trip_keeps_unknown_fields_with_a_warning(tmp_path):
    data = ZayaConfig().to_dict()
    data["my_custom_field"] = {"a": [1, 2]}
    data["transformers_version"] = "5.23.0"
    with pytest.warns(UserWarning, match="my_custom_field"):
        cfg = ZayaConfig.from_dict(data)
    cfg.to_json_file(tmp_path / "config.json")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = ZayaConfig.from_json_file(tmp_path / "config.json")
    assert again == cfg and again.extra["my_custom_field"] == {"a": [1, 2]}
    assert [str(w.message) for w in caught if "transformers_version" in str(w.message)] == []


def test_stray_top_level_rope_type_is_removed():
    data = ZayaConfig().to_dict()
    data["rope_parameters"]["rope_type"] = "default"  # as on the hub's 8B config
    cfg = ZayaConfig.from_dict(data)
    assert set(cfg.rope_parameters) == {"hybrid", "hybrid_sliding"}


@pytest.mark.parametrize("change, message", [
    ({"num_experts_per_tok": 2}, "num_experts_per_tok=1"),
    ({"num_attention_heads": 6, "num_key_value_heads": 4}, "multiple"),
    ({"layer_types": ["hybrid_sliding"] * 40}, "sliding_window"),
    ({"layer_types": ["hybrid"] * 3}, "one type per layer"),
    ({"layer_types": ["mamba"] * 40}, "unknown layer_types"),
    ({"hidden_size": "2048"}, "hidden_size must be an integer"),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be >= 1"),
    ({"eos_token_id": 10**9}, "eos_token_id"),
    ({"use_cache": "yes"}, "use_cache"),
    ({"model_type": "llama"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"hybrid": {"rope_type": "yarn", "rope_theta": 1.0}}}, "not supported"),
])
def test_invalid_configs_are_rejected(change, message):
    data = ZayaConfig().to_dict()
    data.update(change)
    with pytest.raises(ConfigError, match=message):
        ZayaConfig.from_dict(data)


def test_presets_are_valid_and_sized():
    with torch.device("meta"):
        sizes = {name: sum(p.numel() for p in ZayaForCausalLM(preset(name)).parameters()) for name in PRESETS}
    assert sizes["8b"] == 8_840_488_784  # zaya1-model.md §7
    assert 0.4e9 < sizes["small"] < 0.6e9
    assert sizes["tiny"] < 5e6
    small = preset("small")
    assert (small.num_attention_heads, small.num_key_value_heads, small.head_dim) == (8, 2, 128)
    json.dumps(preset("tiny").to_dict())


def test_only_a_config_naming_a_mask_token_or_block_length_is_a_tidar_one():
    upstream = {k: v for k, v in ZayaConfig().to_dict().items() if k not in ("mask_token_id", "diffusion_block_len")}
    ar = ZayaConfig.from_dict(upstream)
    assert not ar.declares_tidar
    assert "mask_token_id" not in ar.to_dict() and not ZayaConfig.from_dict(ar.to_dict()).declares_tidar
    assert ZayaConfig.from_dict({**upstream, "draft_mask_token_id": 7}).declares_tidar
    assert ZayaConfig.from_dict({**upstream, "diffusion_block_len": 8}).declares_tidar
    assert ZayaConfig.from_dict({**upstream, "mask_token_id": None}).declares_tidar is False
    assert ZayaConfig().declares_tidar and ZayaConfig.from_dict(ZayaConfig().to_dict()).declares_tidar
