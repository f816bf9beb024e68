"""The PyTorch ZAYA1 reference model: config and presets, checkpoint I/O, decode state, stateful prefill/decode,
and the entry-point contract (``entries``: specs, I/O names, example inputs) every export and backend shares."""

from __future__ import annotations

import importlib
from typing import Any

# Imported on first use (PEP 562), so that ``zaya_export.models.config`` and the safetensors header reader load
# without torch: the CLI checks a checkpoint's config and headers before paying for the heavy imports.
_HOME = {
    "ConfigError": "config", "ZayaConfig": "config", "decode": "decoding", "prefill": "decoding",
    "BIDIRECTIONAL": "layout", "CAUSAL": "layout", "Readout": "layout", "StepLayout": "layout",
    "PRESETS": "presets", "preset": "presets", "DecodeState": "state", "Past": "state", "Update": "state",
    "empty_past": "state", "ZayaForCausalLM": "zaya", "init_weights": "zaya", "load_checkpoint": "checkpoint",
}


def __getattr__(name: str) -> Any:  # noqa: ANN401
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)


__all__ = [
    "BIDIRECTIONAL", "CAUSAL", "ConfigError", "DecodeState", "PRESETS", "Past", "Readout", "StepLayout", "Update",
    "ZayaConfig", "ZayaForCausalLM", "decode", "empty_past", "init_weights", "load_checkpoint", "prefill", "preset",
]
