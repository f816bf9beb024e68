"""The PyTorch ZAYA1 reference model: config and presets, checkpoint I/O, decode state, stateful prefill/decode,
and the entry-point contract (``entries``: specs, I/O names, example inputs) every export and backend shares."""

from __future__ import annotations

from .config import ConfigError, ZayaConfig
from .decode import decode, prefill
from .layout import BIDIRECTIONAL, CAUSAL, Readout, StepLayout
from .presets import PRESETS, preset
from .state import DecodeState, Past, Update, empty_past
from .zaya import ZayaForCausalLM, init_weights
from .checkpoint import load_checkpoint  # noqa: E402 - needs the model above

__all__ = [
    "BIDIRECTIONAL", "CAUSAL", "ConfigError", "DecodeState", "PRESETS", "Past", "Readout", "StepLayout", "Update",
    "ZayaConfig", "ZayaForCausalLM", "decode", "empty_past", "init_weights", "load_checkpoint", "prefill", "preset",
]
