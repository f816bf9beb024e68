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

    def conv_after(self, n: int | Tensor) -> Tensor:
        """Conv state after committing the first ``n`` new tokens: rows n..n+κ-1 of ``conv_rows``."""
        kappa = self.conv_rows.shape[-1] - self.k.shape[3]
        if isinstance(n, int):
            return self.conv_rows[..., n : n + kappa]
        idx = n + torch.arange(kappa, device=self.conv_rows.device)
        return self.conv_rows.index_select(-1, idx)

    def rho_after(self, n: int | Tensor, rho: Tensor) -> Tensor:
        """Delayed-value state after committing ``n`` new tokens (``rho`` itself when n = 0)."""
        if isinstance(n, int):
            return rho if n == 0 else self.omega[:, :, n - 1]
        ext = torch.cat([rho[:, :, None], self.omega], dim=2)  # [L, B, T+1, dv]
        return ext.index_select(2, n.reshape(1)).squeeze(2)


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
        end = self.length + n
        self.k[:, :, :, self.length : end] = update.k[:, :, :, :n]
        self.v[:, :, :, self.length : end] = update.v[:, :, :, :n]
        self.valid[:, self.length : end] = True if new_valid is None else new_valid[:, :n]
        self.conv = update.conv_after(n).clone()
        self.rho = update.rho_after(n, self.rho).clone()
        self.length = end
