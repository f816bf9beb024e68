"""Decode state in host (numpy) buffers: what every backend but IREE with device state reads and commits.

Preallocated buffers of a fixed capacity are handed to the graph whole, with a validity mask marking unfilled
slots, so no step copies the cache; after each forward only the new rows are written. The IREE twin that keeps
the same buffers on the device is ``device_cache.DeviceKVCache``.
"""

from __future__ import annotations

import numpy as np

from zaya_export.models import ZayaConfig
from zaya_export.models.io_table import Name, state_buffers


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
        """Keep the first ``counts[b]`` new tokens of row b (all T by default); ``mask`` marks left padding.

        The commit rule of ``models.state`` (``write_rows``, ``committed_window``: the one every device path and
        the in-graph commits apply), written with numpy slices: each row's slots are contiguous, so the rule is
        a copy per buffer and row. Through torch's scatter/gather it cost 0.3–0.4 ms per decode step, a quarter of
        the demo's onnxruntime decode; the tests hold the two to the same state."""
        T = out[Name.NEW_K].shape[3]
        counts = np.full(len(self.lengths), T) if counts is None else np.asarray(counts)
        if (self.lengths + counts).max() > self.capacity:
            raise ValueError(f"cache full: committing {counts.max()} more tokens exceeds capacity {self.capacity}")
        valid = np.ones((len(counts), T), bool) if mask is None else np.asarray(mask, bool)
        new_k, new_v = out[Name.NEW_K], out[Name.NEW_V]  # [L, B, n_kv, T, d]
        accepted = Name.CONV_STATE_OUT in out  # the window was committed in-graph (step_greedy, step_sample)
        kappa = self.conv.shape[-1]
        for b, n in enumerate(counts.tolist()):
            start = int(self.lengths[b])
            slots = slice(start, start + n)  # the row's next n slots; only its n kept rows are written
            self.k[:, b, :, slots] = new_k[:, b, :, :n]
            self.v[:, b, :, slots] = new_v[:, b, :, :n]
            self.valid[b, slots] = valid[b, :n]
            if accepted:
                if n > 0:
                    self.conv[:, b], self.rho[:, b] = out[Name.CONV_STATE_OUT][:, b], out[Name.RHO_STATE_OUT][:, b]
            else:  # conv window = pre-conv rows n..n+κ−1 of [history ; new]; ρ = ω_{n−1}, kept at n = 0
                self.conv[:, b] = out[Name.CONV_ROWS][:, b, :, n:n + kappa]
                if n > 0:
                    self.rho[:, b] = out[Name.OMEGA][:, b, n - 1]
            self.lengths[b] += n

    def flush(self) -> None:
        """Nothing to do: the host commits at once (``DeviceKVCache`` may hold one back for the next forward)."""
