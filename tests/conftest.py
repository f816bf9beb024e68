"""Shared helpers: small random ZAYA1 models and the matching upstream transformers model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from zaya_export.models import ZayaConfig, ZayaForCausalLM, init_weights, preset


def small_config(**overrides) -> ZayaConfig:
    """A tiny config with overrides (kept small so every parity test runs in well under a second)."""
    base = dataclasses.asdict(preset("tiny"))
    base.pop("extra")
    base.update(overrides)
    if "num_hidden_layers" in overrides and "layer_types" not in overrides:
        base["layer_types"] = ["hybrid"] * overrides["num_hidden_layers"]
    return ZayaConfig(**base)


def random_model(config: ZayaConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> ZayaForCausalLM:
    model = ZayaForCausalLM(config)
    init_weights(model, seed, randomize_all=True)
    return model.to(dtype).eval()


def hf_model(model: ZayaForCausalLM, attn_implementation: str = "eager"):
    """Upstream ``transformers.ZayaForCausalLM`` holding exactly ``model``'s weights."""
    from zaya_export.validate import hf_model as build

    return build(model, attn_implementation)


@pytest.fixture
def tiny_model() -> ZayaForCausalLM:
    return random_model(preset("tiny"), seed=1)
