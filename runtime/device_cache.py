"""Decode state that stays on the IREE device between steps.

:class:`~zaya_export.runtime.session.KVCache` keeps the state in numpy buffers, so on IREE every call would
copy the whole preallocated cache host → device, and every update device → host. :class:`DeviceKVCache` holds
the same five buffers as IREE device arrays instead. A forward fed device state returns its state outputs as
device arrays too (``IreeBackend.run``), and :meth:`DeviceKVCache.commit` hands them to the module's in-place
``commit``/``commit_accepted`` entry (``zaya_export.models.commit_entry``). Only token ids, masks, lengths and logits
cross the host boundary.

The buffers have ``slack`` slots past the capacity: a commit scatters all T new rows at the row's offset
(only the first n become valid), so the largest forward must fit behind the longest row.

Where the module has a forward with the commit folded in (``commit_then_decode``, ``commit_then_draft``:
``models.folded_entry``), a commit is not run at once: it waits as a :class:`PendingCommit` in the next
forward's inputs, and ``IreeBackend.run`` calls the folded function (or, for a forward without one, the commit
and then the forward). A commit is idempotent (the same rows at the same offsets, the same window and ρ), so
inputs run more than once (a timing loop) leave the same state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from zaya_export.models import ZayaConfig
from zaya_export.models.commit_entry import COMMIT_SPECS
from zaya_export.models.io_table import Name, state_buffers

from .host_cache import KVCache


PENDING = "pending_commit"  # the inputs key of a commit that waits for the next forward


@dataclass
class PendingCommit:
    """A commit entry's name and its inputs besides the state; ``done`` once it has been run."""

    name: str
    args: dict
    done: bool = False


class DeviceKVCache:
    """The decode state of B rows as device arrays of ``capacity + slack`` slots; same interface as KVCache."""

    def __init__(self, backend, config: ZayaConfig, batch: int, capacity: int, slack: int) -> None:  # noqa: ANN001
        self.backend, self.capacity, self.slots = backend, capacity, capacity + slack
        self.lengths = np.zeros(batch, np.int64)
        self.state = {name: backend.to_device(a)
                      for name, a in state_buffers(config, batch, self.slots, np.float32, np.zeros).items()}
        self.pending: PendingCommit | None = None

    @property
    def length(self) -> int:
        return int(self.lengths.max())

    def inputs(self, ids: np.ndarray, mask: np.ndarray | None = None) -> dict:
        """Entry inputs for new tokens ``ids`` [B, T]: host ids and mask, the state as device arrays."""
        mask = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
        waiting = {PENDING: self.pending} if self.pending is not None and not self.pending.done else {}
        return {Name.INPUT_IDS: ids.astype(np.int64), Name.INPUT_MASK: mask, **self.state, **waiting}

    def commit(self, out: dict, counts: np.ndarray | None = None, mask: np.ndarray | None = None) -> None:
        """Keep the first ``counts[b]`` new tokens of row b (all T by default) of a forward's device-resident
        outputs ``out``; ``mask`` marks left padding."""
        T = out[Name.NEW_K].shape[3]
        counts = np.full(len(self.lengths), T, np.int64) if counts is None else np.asarray(counts, np.int64)
        if (self.lengths + counts).max() > self.capacity:
            raise ValueError(f"cache full: committing {counts.max()} more tokens exceeds capacity {self.capacity}")
        if self.lengths.max() + T > self.slots:
            raise ValueError(f"a forward of {T} tokens does not fit behind {self.length} committed slots "
                             f"({self.slots} allocated)")
        new_valid = np.ones((len(counts), T), bool) if mask is None else np.ascontiguousarray(mask[:, :T], bool)
        # the in-graph steps (step_greedy, step_sample) already gathered the committed conv window and ρ
        spec = COMMIT_SPECS["commit_accepted" if Name.CONV_STATE_OUT in out else "commit"]
        self.flush()
        pending = PendingCommit(spec.name, {Name.LENGTHS: self.lengths, Name.COUNTS: counts, Name.NEW_VALID: new_valid,
                                            **{name: out[name] for name in spec.update}})
        if self.backend.folds(spec.name):
            self.pending = pending
        else:
            self.backend.run(spec.name, {**self.state, **pending.args})
        self.lengths = self.lengths + counts

    def flush(self) -> None:
        """Run a commit that still waits for a forward."""
        if self.pending is not None and not self.pending.done:
            self.backend.run(self.pending.name, {**self.state, **self.pending.args})
        self.pending = None

    def to_host(self) -> KVCache:
        """A numpy copy (tests, debugging); the first ``capacity`` slots."""
        self.flush()
        host = {name: np.array(a.to_host(), copy=True) for name, a in self.state.items()}
        slots = {Name.PAST_K: np.s_[..., : self.capacity, :], Name.PAST_V: np.s_[..., : self.capacity, :],
                 Name.PAST_VALID: np.s_[:, : self.capacity]}
        return KVCache.from_buffers({n: a[slots.get(n, ...)] for n, a in host.items()}, self.lengths.copy())
