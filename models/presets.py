"""Named model sizes: ``tiny`` for tests (runs in milliseconds), ``small`` (~0.5B, the real head geometry) for
benchmarks, and ``8b``, the real ZAYA1-8B configuration (the upstream defaults)."""

from __future__ import annotations

from .config import ZayaConfig


def _tiny() -> ZayaConfig:
    # Both layer types, GQA with 2 q heads per KV head, 4 experts: every code path in a few M params.
    return ZayaConfig(
        vocab_size=1024, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, moe_intermediate_size=256, num_experts=4, router_hidden_size=64,
        max_position_embeddings=4096, layer_types=["hybrid", "hybrid_sliding"], sliding_window=32,
        pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )


def _small() -> ZayaConfig:
    # 8 q / 2 kv heads of 128 as in the 8B; ~0.49B parameters.
    return ZayaConfig(
        vocab_size=32768, hidden_size=1024, num_hidden_layers=8, moe_intermediate_size=1024,
        max_position_embeddings=32768, pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )


PRESETS = {"tiny": _tiny, "small": _small, "8b": ZayaConfig}


def preset(name: str) -> ZayaConfig:
    """A fresh config for a preset name (``tiny``, ``small`` or ``8b``)."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
