"""What one ``ZayaForCausalLM.step`` computes: how its T new tokens attend (the layout) and what it returns
(the readout). Both are static descriptors, decided when an entry point is defined, never tensors.

Layouts (``StepLayout``):

* ``CAUSAL``: each new token sees the valid cache and the new tokens up to itself (prefill, decode, verify).
* ``BIDIRECTIONAL``: the TiDAR draft block: every new token sees the valid cache and every other new token;
  the CCA conv and delayed value still continue from the committed state (they are sequence-local, not
  mask-driven).
* a :class:`~zaya_export.models.packed.PackedLayout`: the single-forward TiDAR step (verify + proposals) or
  the training layout; T must be its ``size``.

Readouts (``Readout``): ``LOGITS`` every row ``[B, T, V]``, ``LAST`` the last row ``[B, 1, V]``, ``HIDDEN`` the
final-normed hidden states ``[B, T, H]`` (the caller applies the LM head to the rows it needs).
"""

from __future__ import annotations

from enum import Enum
from typing import TypeAlias

from .packed import PackedLayout


class BlockLayout(Enum):
    """An unpacked step's attention among its new tokens."""

    CAUSAL = "causal"
    BIDIRECTIONAL = "bidirectional"


CAUSAL = BlockLayout.CAUSAL
BIDIRECTIONAL = BlockLayout.BIDIRECTIONAL

StepLayout: TypeAlias = BlockLayout | PackedLayout


class Readout(Enum):
    """What ``step`` returns in place of the logits."""

    LOGITS = "logits"  # [B, T, V]
    LAST = "last"  # [B, 1, V]
    HIDDEN = "hidden"  # [B, T, H], final-normed, no LM head


def packed_of(layout: StepLayout) -> PackedLayout | None:
    """The packed layout, or None for an unpacked (causal / bidirectional) one."""
    return layout if isinstance(layout, PackedLayout) else None

