"""The PyTorch ZAYA1 reference model, its config and presets, and stateful prefill/decode."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .config import ConfigError, ZayaConfig
from .decode import decode, prefill
from .presets import PRESETS, preset
from .state import DecodeState, Past, Update, empty_past
from .zaya import ZayaForCausalLM, init_weights

if TYPE_CHECKING:
    import torch


def load_checkpoint(path: str | Path, dtype: "torch.dtype | str | None" = None) -> ZayaForCausalLM:
    """Load a Hugging Face style checkpoint directory (see :mod:`zaya_export.checkpoint`)."""
    from zaya_export.checkpoint import load_checkpoint as _load  # checkpoint I/O lives in the tool package

    return _load(path, dtype=dtype)


__all__ = [
    "ConfigError", "DecodeState", "PRESETS", "Past", "Update", "ZayaConfig", "ZayaForCausalLM", "decode",
    "empty_past", "init_weights", "load_checkpoint", "prefill", "preset",
]
