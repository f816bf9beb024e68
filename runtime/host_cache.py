"""Decode state in host (numpy) buffers: what every backend but IREE with device state reads and commits.

Preallocated buffers of a fixed capacity are handed to the graph whole, with a validity mask marking unfilled
slots, so no step copies the cache; after each forward only the new rows are written. The IREE twin that keeps
the same buffers on the device is ``device_cache.DeviceKVCache``.
"""

from __future__ import annotations

import numpy as np
import torch

from zaya_export.models import ZayaConfig
from zaya_export.models.io_table import Name, state_buffers
from zaya_export.models.state import committed_window, write_rows


class KVCache:
    """Decode state of B rows in preallocated numpy buffers of ``capacity`` slots.

    Each row has its own length (TiDAR accepts a different number of drafts per row). Rows are written at
    their own offsets; slots a row has not filled stay invalid, which the graphs mask, so the buffers can be
    handed over whole without copying or compacting them.
    """

    def __init__(self, config: ZayaConfig, batch: int, capacity: int, dtype: type = np.float32) -> None:
        self.capacity = capacity
        self.lengths = np.zeros(batch, np.int64)
        self.state = state_buffers(config, batch, capacity, dtype, np.zeros)  # every io_table.STATE buffer

    @classmethod
    def from_buffers(cls, state: dict[Name, np.ndarray], lengths: np.ndarray) -> "KVCache":
        """A cache over existing buffers (a device snapshot); capacity is their slot count."""
        self = cls.__new__(cls)
        self.state, self.lengths = dict(state), lengths
        self.capacity = state[Name.PAST_VALID].shape[1]
        return self

    k = property(lambda self: self.state[Name.PAST_K])  # [L, B, n_kv, S, d]
    v = property(lambda self: self.state[Name.PAST_V])
    valid = property(lambda self: self.state[Name.PAST_VALID])  # [B, S]
    conv = property(lambda self: self.state[Name.CONV_STATE])  # [L, B, C, κ]
    rho = property(lambda self: self.state[Name.RHO_STATE])  # [L, B, dv]

    @property
    def length(self) -> int:
        return int(self.lengths.max())

    def inputs(self, ids: np.ndarray, mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Entry inputs for new tokens ``ids`` [B, T]: the whole buffers, unfilled slots marked invalid."""
        mask = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
        return {Name.INPUT_IDS: ids.astype(np.int64), Name.INPUT_MASK: mask, **self.state}

    def commit(self, out: dict[str, np.ndarray], counts: np.ndarray | None = None,
               mask: np.ndarray | None = None) -> None:
        """Keep the first ``counts[b]`` new tokens of row b (all T by default); ``mask`` marks left padding."""
        T = out[Name.NEW_K].shape[3]
        counts = np.full(len(self.lengths), T) if counts is None else np.asarray(counts)
        if (self.lengths + counts).max() > self.capacity:
            raise ValueError(f"cache full: committing {counts.max()} more tokens exceeds capacity {self.capacity}")
        # The one commit rule (models.state), applied in place to the numpy buffers through torch views. Row by
        # row: each row's T new rows must fit behind its own length, which holds for its n, not always for T.
        t = torch.from_numpy
        valid = np.ones((len(counts), T), bool) if mask is None else np.asarray(mask, bool)
        accepted = Name.CONV_STATE_OUT in out  # the window was committed in-graph (step_greedy, step_sample)
        for b, n in enumerate(counts.tolist()):
            rows = slice(b, b + 1)
            lengths, count = torch.tensor([int(self.lengths[b])]), torch.tensor([n])
            write_rows(t(self.k[:, rows]), t(self.v[:, rows]), t(self.valid[rows]), lengths, count,
                       t(valid[rows, :n]), t(out[Name.NEW_K][:, rows, :, :n]), t(out[Name.NEW_V][:, rows, :, :n]))
            if accepted:
                if n > 0:
                    self.conv[:, b], self.rho[:, b] = out[Name.CONV_STATE_OUT][:, b], out[Name.RHO_STATE_OUT][:, b]
            else:
                conv, rho = committed_window(t(out[Name.CONV_ROWS][:, rows]), t(out[Name.OMEGA][:, rows]), count,
                                             t(self.rho[:, rows]))
                self.conv[:, rows], self.rho[:, rows] = conv.numpy(), rho.numpy()
            self.lengths[b] += n
