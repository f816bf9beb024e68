"""Grow a trained demo checkpoint deeper without changing what it computes (``train-demo --grow-layers``).

The self-distilled drafter shares every weight with the AR path, so past a point each round that teaches the
drafter more costs AR perplexity (the card's stage-2 record). More depth could give both room. Training a
deeper model from scratch would throw away hours of CPU training; instead a stage-2 pass may start by
appending layers after the last one with their sub-layer output scales (``hidden_states_scale`` of both
residual scalings) at zero: each new layer adds ``0 · sublayer + residual``, so the grown model's logits equal
the source's exactly (ReZero-style). The scales get gradients at once, and the new attention/MoE weights once
their scale moves off zero.

Appending (not interleaving) keeps every existing layer's inputs unchanged, the router state chain (EDA reads
the previous layer's router state) included: the first new layer reads the old last layer's state. New layers
repeat the source's layer-type pattern.
"""

from __future__ import annotations

from zaya_export.models import ZayaConfig, ZayaForCausalLM, init_weights


def grown(model: ZayaForCausalLM, add_layers: int, init_seed: int) -> ZayaForCausalLM:
    """A copy of ``model`` with ``add_layers`` layers appended that computes exactly what ``model`` computes."""
    if add_layers < 1:
        raise ValueError(f"add at least one layer, got {add_layers}")
    cfg = model.config.to_dict()
    n = cfg["num_hidden_layers"]
    cfg["num_hidden_layers"] = n + add_layers
    cfg["layer_types"] = list(cfg["layer_types"]) + [cfg["layer_types"][i % n] for i in range(add_layers)]
    cfg.pop("dtype", None)
    big = ZayaForCausalLM(ZayaConfig.from_dict(cfg, warn_unknown=False))
    init_weights(big, init_seed)
    state = big.state_dict()
    for name, tensor in model.state_dict().items():
        state[name] = tensor.detach().clone().to(state[name].dtype)
    for i in range(n, n + add_layers):
        for scaling in ("post_attention_residual_scale", "post_mlp_residual_scale"):
            state[f"model.layers.{i}.{scaling}.hidden_states_scale"].zero_()
    big.load_state_dict(state)
    return big.eval()
