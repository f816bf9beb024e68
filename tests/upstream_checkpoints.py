"""Checkpoints written the way users bring them: upstream transformers' ``ZayaForCausalLM.save_pretrained``,
with every weight perturbed by N(0, 1) so logits reach |z| ≈ 50–100 and routers sit near ties."""

from __future__ import annotations

from pathlib import Path

import torch

BASE = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, moe_intermediate_size=32, num_experts=4, router_hidden_size=32, max_position_embeddings=512)

GEOMETRIES = {
    # hidden 160, a sliding layer of window 6, κ = 3 (cca_time0 = 3), 5 experts, the skip class firing
    "sliding_skip": dict(hidden_size=160, layer_types=["hybrid_sliding", "hybrid"], sliding_window=6, cca_time0=3,
                         num_experts=5),
    # 8 q + 2 kv heads of 128, untied head with a bias, 16 experts
    "gqa128_untied": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=128, tie_word_embeddings=False,
                          lm_head_bias=True, num_experts=16),
}


def write_upstream_checkpoint(out: Path, geometry: str, seed: int = 0, skip_fires: bool = False,
                              stored_skip_bias: float | None = None) -> Path:
    """save_pretrained of a perturbed random upstream model. ``skip_fires``: balancing biases that make the
    skip class win for many tokens even after upstream's reset of its bias to -1.0. ``stored_skip_bias``:
    write this skip-class bias into the file (upstream resets it on load; this tool keeps it)."""
    import transformers

    config = transformers.ZayaConfig(**{**BASE, **GEOMETRIES[geometry]})
    torch.manual_seed(seed)
    model = transformers.ZayaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen))
        for layer in model.model.layers:
            biases = layer.mlp.gate.balancing_biases
            biases[:-1] = 0.05 * torch.randn(biases.numel() - 1, generator=gen) - (1.3 if skip_fires else 0.0)
            if stored_skip_bias is not None:
                biases[-1] = stored_skip_bias
    model.save_pretrained(out)
    return out


def upstream_as_loaded(ckpt: Path):  # noqa: ANN201
    """The checkpoint as upstream loads it (``from_pretrained``: skip-class biases reset to -1.0)."""
    import transformers

    return transformers.ZayaForCausalLM.from_pretrained(ckpt).eval()


def upstream_greedy(hf, prompts: list[list[int]], n: int) -> list[list[int]]:  # noqa: ANN001
    from zaya_export.runtime.generate import left_pad

    ids, mask = map(torch.from_numpy, left_pad(prompts, 0))
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=0, eos_token_id=None)
    return out[:, ids.shape[1]:].tolist()
