"""Decode state of ZAYA1 as explicit tensors, so a traced program takes it as inputs and returns its update.

A forward never mutates state. It reads a :class:`Past` (what is committed) and returns a :class:`Update`
(what this forward computed for every new token). :class:`DecodeState` owns preallocated buffers and commits
the first ``n`` new tokens of an update in place: ``n = T`` for prefill and AR decode, ``n = ℓ + 1`` after a
TiDAR verify. Rollback therefore needs no undo: an uncommitted update is simply dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import ZayaConfig


@dataclass
class Past:
    """Committed state a forward reads. ``S`` is the number of cached slots (may be 0)."""

    k: Tensor  # [L, B, n_kv, S, d]   keys after QK norm, temperature and RoPE
    v: Tensor  # [L, B, n_kv, S, d]   values: head 0..n_kv/2-1 current, the rest delayed
    valid: Tensor  # [B, S] bool       slot holds a real token (False for left padding)
    conv: Tensor  # [L, B, C, κ]        raw pre-conv q|k rows of the last κ tokens, oldest first
    rho: Tensor  # [L, B, dv]           delayed-value projection of the last token


@dataclass
class Update:
    """What one forward over T new tokens computed; nothing is committed yet."""

    k: Tensor  # [L, B, n_kv, T, d]
    v: Tensor  # [L, B, n_kv, T, d]
    conv_rows: Tensor  # [L, B, C, κ+T]  committed κ rows followed by the T new pre-conv rows
    omega: Tensor  # [L, B, T, dv]       delayed-value projection of each new token

    def committed(self, counts: Tensor, rho: Tensor | None) -> tuple[Tensor, Tensor]:
        """Conv window and ρ after committing the first ``counts[b]`` new tokens of row b (:func:`committed_window`)."""
        return committed_window(self.conv_rows, self.omega, counts, rho)


# ---------------------------------------------------------------------------------------------- the commit rule
# Every cache (DecodeState here, the runtime's numpy KVCache, the IREE in-place commit entries, the in-graph TiDAR
# step) commits through these two functions; nothing else writes decode state.


def committed_window(conv_rows: Tensor, omega: Tensor, counts: Tensor, rho: Tensor | None = None
                     ) -> tuple[Tensor, Tensor]:
    """The CCA state after committing the first ``counts[b]`` of T new tokens of row b.

    conv_rows [L, B, C, κ+T] (κ committed rows, then the T new pre-conv rows), omega [L, B, T, dv], counts [B]
    int64, rho [L, B, dv] the committed ρ (read where counts[b] = 0; may be None when every count is ≥ 1)
    → conv window [L, B, C, κ] = rows n..n+κ−1, and ρ [L, B, dv] = ω_{n−1} (ρ itself for n = 0)."""
    L, B, C, W = conv_rows.shape
    kappa = W - omega.shape[2]
    window = counts[:, None] + torch.arange(kappa, device=counts.device)[None]  # [B, κ]
    conv = conv_rows.gather(3, window[None, :, None, :].expand(L, B, C, kappa))
    dv = omega.shape[-1]
    if rho is None:
        return conv, omega.gather(2, (counts - 1)[None, :, None, None].expand(L, B, 1, dv)).squeeze(2)
    ext = torch.cat([rho[:, :, None], omega], 2)  # [L, B, T+1, dv]: ρ, ω_0..ω_{T−1}
    return conv, ext.gather(2, counts[None, :, None, None].expand(L, B, 1, dv)).squeeze(2)


def write_rows(past_k: Tensor, past_v: Tensor, past_valid: Tensor, lengths: Tensor, counts: Tensor,
               new_valid: Tensor, new_k: Tensor, new_v: Tensor) -> None:
    """Scatter the T new key/value rows of each batch row b to slots lengths[b].. of the buffers, in place; a
    slot becomes valid only for t < counts[b] (and where ``new_valid``: left padding stays invalid).
    past_k/v [L, B, n_kv, S, d], past_valid [B, S], lengths/counts [B] int64, new_valid [B, T] bool,
    new_k/v [L, B, n_kv, T, d]; the caller guarantees lengths[b] + T <= S."""
    L, B, nkv, T, d = new_k.shape
    slots = lengths[:, None] + torch.arange(T, device=lengths.device)  # [B, T]
    index = slots[None, :, None, :, None].expand(L, B, nkv, T, d)
    past_k.scatter_(3, index, new_k)
    past_v.scatter_(3, index, new_v)
    keep = torch.logical_and(new_valid, torch.arange(T, device=counts.device)[None] < counts[:, None])  # [B, T]
    past_valid.scatter_(1, slots, keep)


def empty_past(config: ZayaConfig, batch: int, dtype: torch.dtype, device: torch.device | str = "cpu",
               rho_init: Tensor | None = None) -> Past:
    """The state of a fresh sequence: no cached slots, zero conv history, ρ = v_proj_delayed(0)."""
    L, nkv, d = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    kv = torch.zeros(L, batch, nkv, 0, d, dtype=dtype, device=device)
    rho = torch.zeros(L, batch, config.value_half, dtype=dtype, device=device)
    if rho_init is not None:  # only non-zero with attention_bias: upstream seeds ρ with v_proj_delayed(0)
        rho = rho + rho_init[:, None, :].to(dtype)
    return Past(
        k=kv, v=kv.clone(), valid=torch.zeros(batch, 0, dtype=torch.bool, device=device),
        conv=torch.zeros(L, batch, config.conv_channels, config.conv_history, dtype=dtype, device=device),
        rho=rho,
    )


class DecodeState:
    """Preallocated KV buffers of fixed capacity plus the constant-size CCA state, committed in place."""

    def __init__(self, config: ZayaConfig, batch: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", rho_init: Tensor | None = None) -> None:
        L, nkv, d = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
        self.capacity = capacity
        self.length = 0
        self.k = torch.zeros(L, batch, nkv, capacity, d, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        fresh = empty_past(config, batch, dtype, device, rho_init)
        self.conv, self.rho = fresh.conv, fresh.rho

    def past(self) -> Past:
        """Views of the committed slots (no copy)."""
        n = self.length
        return Past(self.k[:, :, :, :n], self.v[:, :, :, :n], self.valid[:, :n], self.conv, self.rho)

    def commit(self, update: Update, n: int | None = None, new_valid: Tensor | None = None) -> None:
        """Write the first ``n`` new tokens (all by default) into the buffers."""
        T = update.k.shape[3]
        n = T if n is None else n
        if not 0 <= n <= T:
            raise ValueError(f"cannot commit {n} of {T} new tokens")
        if self.length + n > self.capacity:
            raise ValueError(f"decode state is full: {self.length} + {n} tokens exceed capacity {self.capacity}")
        B = self.valid.shape[0]
        lengths = torch.full((B,), self.length, dtype=torch.long, device=self.valid.device)
        counts = torch.full((B,), n, dtype=torch.long, device=self.valid.device)
        valid = torch.ones(B, n, dtype=torch.bool, device=self.valid.device) if new_valid is None else new_valid[:, :n]
        write_rows(self.k, self.v, self.valid, lengths, counts, valid, update.k[:, :, :, :n], update.v[:, :, :, :n])
        self.conv, self.rho = update.committed(counts, self.rho)
        self.length += n
