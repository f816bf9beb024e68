"""The legacy 80-layer (Megatron-style) ZAYA1 layout and its mapping to the native 40-layer one.

Legacy checkpoints (``ZAYA1-base``, ``ZAYA1-8B-legacy``, Zyphra's ``smoe`` diffusion checkpoints) store
attention in even layers and the MoE in odd layers, one tensor per expert, and attach each residual scaling
to the layer that *consumes* the previous mixer's output. The mapping is renames plus stacking the experts
(``shared/docs/zaya1-model.md`` §5); no tensor is permuted.
"""

from __future__ import annotations

from typing import Any

_RES = ("hidden_states_scale", "hidden_states_bias", "residual_scale", "residual_bias")
_CONFIG_RENAMES = {
    "moe_router_topk": "num_experts_per_tok",
    "zaya_mlp_expansion": "router_hidden_size",
    "norm_epsilon": "rms_norm_eps",
    "num_query_groups": "num_key_value_heads",
}
# Flags of the legacy config that the native model always implies; dropped on conversion.
_IMPLIED = {"residual_in_fp32": True, "zaya_use_eda": True, "zaya_use_mod": True, "clamp_temp": False}
_DROPPED = ("mamba_cache_dtype", "ffn_hidden_size", "rope_theta", "layer_types")


def is_legacy_config(data: dict[str, Any]) -> bool:
    return data.get("model_type") == "smoe" or any(k in data for k in ("ffn_hidden_size", *_CONFIG_RENAMES))


def convert_legacy_config(data: dict[str, Any]) -> dict[str, Any]:
    """A native config dict from a legacy one (80 → 40 layers, renamed fields, I = ffn_hidden_size / 2)."""
    out = {k: v for k, v in data.items() if k not in _CONFIG_RENAMES and k not in _IMPLIED and k not in _DROPPED}
    for key, implied in _IMPLIED.items():
        if key in data and data[key] != implied:
            raise ValueError(f"legacy option {key}={data[key]!r} is not supported (ZAYA1 uses {implied!r})")
    for old, new in _CONFIG_RENAMES.items():
        if old in data:
            out[new] = data[old]
    out["model_type"] = "zaya"
    out["architectures"] = ["ZayaForCausalLM"]
    if "ffn_hidden_size" in data:
        out["moe_intermediate_size"] = data["ffn_hidden_size"] // 2
    if "num_hidden_layers" in data:
        if data["num_hidden_layers"] % 2:
            raise ValueError(f"legacy num_hidden_layers must be even (attention + MoE pairs), got {data['num_hidden_layers']}")
        out["num_hidden_layers"] = data["num_hidden_layers"] // 2
    if "rope_theta" in data:
        rope = dict(out.get("rope_parameters") or {})
        rope["hybrid"] = {"rope_type": "default", "rope_theta": float(data["rope_theta"]),
                          "partial_rotary_factor": data.get("partial_rotary_factor", 0.5)}
        out["rope_parameters"] = rope
    return out


def is_legacy_layout(names: set[str]) -> bool:
    return "model.final_norm.weight" in names


def legacy_sources(num_layers: int, num_experts: int, block: str = "zaya_block") -> dict[str, list[str]]:
    """native tensor name → the legacy tensor names it is made of (several = stacked along a new dim 0)."""
    m: dict[str, list[str]] = {
        "model.embed_tokens.weight": ["model.embed_tokens.weight"],
        "model.norm.weight": ["model.final_norm.weight"],
        "model.input_hidden_states_scale": ["model.layers.0.res_scale.hidden_states_scale"],
        "model.input_hidden_states_bias": ["model.layers.0.res_scale.hidden_states_bias"],
    }
    for layer in range(num_layers):
        n, a, f = f"model.layers.{layer}.", f"model.layers.{2 * layer}.", f"model.layers.{2 * layer + 1}."
        nxt = f"model.layers.{2 * layer + 2}.res_scale." if layer < num_layers - 1 else "model.res_scale."
        qkv, router = a + "self_attn.qkv.", f + f"{block}.router."
        pairs = {
            "input_layernorm.weight": a + "input_norm.weight",
            "self_attn.qkv_proj.q_proj.weight": qkv + "linear_q.weight",
            "self_attn.qkv_proj.k_proj.weight": qkv + "linear_k.weight",
            "self_attn.qkv_proj.v_proj_current.weight": qkv + "val_proj1.weight",
            "self_attn.qkv_proj.v_proj_delayed.weight": qkv + "val_proj2.weight",
            "self_attn.qkv_proj.conv_qk_depthwise.weight": qkv + "conv_qk.0.weight",
            "self_attn.qkv_proj.conv_qk_depthwise.bias": qkv + "conv_qk.0.bias",
            "self_attn.qkv_proj.conv_qk_grouped.weight": qkv + "conv_qk.1.weight",
            "self_attn.qkv_proj.conv_qk_grouped.bias": qkv + "conv_qk.1.bias",
            "self_attn.qk_norm.temp": qkv + "temp",
            "self_attn.o_proj.weight": a + "self_attn.o_proj.weight",
            "post_attention_layernorm.weight": f + "input_norm.weight",
            "mlp.gate.down_proj.weight": router + "down_proj.weight",
            "mlp.gate.down_proj.bias": router + "down_proj.bias",
            "mlp.gate.router_mlp.norm.weight": router + "rmsnorm_eda.weight",
            "mlp.gate.router_mlp.fc1.weight": router + "router_mlp.0.weight",
            "mlp.gate.router_mlp.fc1.bias": router + "router_mlp.0.bias",
            "mlp.gate.router_mlp.fc2.weight": router + "router_mlp.2.weight",
            "mlp.gate.router_mlp.fc2.bias": router + "router_mlp.2.bias",
            "mlp.gate.router_mlp.out_proj.weight": router + "router_mlp.4.weight",
            "mlp.gate.balancing_biases": router + "balancing_biases",
        }
        if layer > 0:
            pairs["mlp.gate.router_states_scale"] = router + "router_states_scale"
        for r in _RES:
            pairs[f"post_attention_residual_scale.{r}"] = f + f"res_scale.{r}"
            pairs[f"post_mlp_residual_scale.{r}"] = nxt + r
        m.update({n + k: [v] for k, v in pairs.items()})
        experts = f + f"{block}.experts.local_experts."
        m[n + "mlp.experts.gate_up_proj"] = [experts + f"{e}.linear_fc1.weight" for e in range(num_experts)]
        m[n + "mlp.experts.down_proj"] = [experts + f"{e}.linear_fc2.weight" for e in range(num_experts)]
    return m


def legacy_block_name(names: set[str]) -> str:
    """``zaya_block`` (ZAYA1 legacy) or ``smoe_block`` (Zyphra's internal diffusion checkpoints)."""
    return "smoe_block" if any(".smoe_block." in n for n in names) else "zaya_block"
