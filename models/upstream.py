"""Where upstream ``transformers`` (5.23) computes something else than the checkpoint file says, named here so
that the tool can warn about it and ``validate --reference hf`` can account for it instead of hiding it."""

from __future__ import annotations

from .zaya import ZayaForCausalLM

UPSTREAM_SKIP_BIAS = -1.0  # what upstream's from_pretrained writes into every router's skip-class bias


def skip_bias_layers(model: ZayaForCausalLM) -> list[tuple[int, float]]:
    """(layer, stored skip-class balancing bias) of every router whose stored value is not the -1.0 that
    upstream 5.23 resets it to when it loads a checkpoint. This tool computes with the stored value."""
    out = []
    for i, layer in enumerate(model.model.layers):
        value = float(layer.mlp.gate.balancing_biases[-1])
        if value != UPSTREAM_SKIP_BIAS:
            out.append((i, value))
    return out


def skip_bias_warning(model: ZayaForCausalLM) -> str | None:
    """The warning to show when loading ``model``, or None when upstream and the file agree."""
    odd = skip_bias_layers(model)
    if not odd:
        return None
    shown = ", ".join(f"layer {i}: {v:g}" for i, v in odd[:3]) + (f" and {len(odd) - 3} more" if len(odd) > 3 else "")
    return (f"{len(odd)} router(s) store a skip-class balancing bias other than -1.0 ({shown}); this tool uses "
            "the stored values, while upstream transformers 5.23 resets them to -1.0 when it loads the checkpoint, "
            "so the two differ wherever that moves a token into or out of the skip class "
            "(validate --reference hf reports by how much)")
