"""Shared helpers: small random ZAYA1 models and the matching upstream transformers model."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

# `python -m pytest` puts the repository root on sys.path, where `kernels/` (installed as zaya_export.kernels)
# would also import as a top-level `kernels` package: transformers probes for Hugging Face's `kernels`, and
# that second import re-registers every zaya.* custom op with a second copy of the code, silently replacing
# the implementations the model calls. Tests import the installed package only.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if (Path(p or ".").resolve() != _ROOT)]
# Triton reads TRITON_INTERPRET when it is first imported (its standard library is built then): set it before any
# test file imports it, so every worker runs the kernels in the CPU interpreter whichever file it loads first.
# The AOT compiles run in child processes with the variable removed (kernels/aot.py).
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from zaya_export.models import ZayaConfig, ZayaForCausalLM, init_weights, preset  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core: one torch thread each
    torch.set_num_threads(1)


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


def perturbed(model: ZayaForCausalLM, seed: int = 0, noise: float = 1.0) -> ZayaForCausalLM:
    """Add N(0, noise²) to every weight (as a fine-tune far from init would): logits reach |z| ≈ 100 and some
    routers sit near ties, which is where scale-blind checks break."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn(p.shape, generator=gen).to(p.dtype))
    return model
