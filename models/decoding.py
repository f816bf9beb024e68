"""Stateful prefill and decode over :class:`DecodeState`: the eager building blocks of every generation loop."""

from __future__ import annotations

import torch
from torch import Tensor

from .layout import Readout
from .state import DecodeState
from .zaya import ZayaForCausalLM


@torch.no_grad()
def prefill(model: ZayaForCausalLM, input_ids: Tensor, attention_mask: Tensor | None = None,
            capacity: int | None = None) -> tuple[Tensor, DecodeState]:
    """Run the prompt ``[B, T]`` (left-padded where ``attention_mask`` is 0) into a fresh state of
    ``capacity`` slots (default: T). Returns the last-position logits ``[B, V]`` and the state."""
    B, T = input_ids.shape
    capacity = T if capacity is None else capacity
    state = DecodeState(model.config, B, capacity, model.dtype, input_ids.device, model.rho_init())
    mask = None if attention_mask is None else attention_mask.bool()
    logits, update = model.step(input_ids, state.past(), mask, readout=Readout.LAST)
    state.commit(update, new_valid=mask)
    return logits[:, -1], state


@torch.no_grad()
def decode(model: ZayaForCausalLM, tokens: Tensor, state: DecodeState) -> Tensor:
    """Feed one token per row (``[B]`` or ``[B, 1]``), commit it, and return the next logits ``[B, V]``."""
    logits, update = model.step(tokens.reshape(-1, 1), state.past(), readout=Readout.LAST)
    state.commit(update)
    return logits[:, -1]
