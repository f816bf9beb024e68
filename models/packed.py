"""The packed single-forward TiDAR layout (``shared/docs/tidar-decoding.md`` §4): one verify segment
``[a, d_1..d_K]`` followed by P proposal segments of K+1 masks, proposal p assuming λ_p accepted drafts.

Everything here is static for a given (K, Λ, κ): position offsets, the N×N attention template among step
tokens, and the gather tables that give every segment its own CCA conv history and delayed-value seed. With
them one ``model.step`` computes verify rows that equal AR decoding and proposal rows that equal a draft made
after committing ``a, d_1..d_λp``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Segments:
    """Per-segment CCA seeding: gather tables into ``[conv history ; U]`` and ``[ρ ; Ω]``."""

    conv_index: Tensor  # [G, κ+T_seg] int64 into the κ+N extended conv rows
    value_index: Tensor  # [G, T_seg] int64 into the 1+N delayed-value rows


@dataclass(frozen=True)
class PackedLayout:
    block_len: int  # K
    levels: tuple[int, ...]  # Λ, λ_1 = 0 < ... ≤ K
    offsets: Tensor  # [N] position of each step token relative to the committed length b
    template: Tensor  # [N, N] bool: may step token s attend to step token t
    segments: Segments

    @property
    def size(self) -> int:
        return self.offsets.shape[0]


def packed_layout(block_len: int, levels: tuple[int, ...], kappa: int, causal_proposals: bool = False
                  ) -> PackedLayout:
    K, K1 = block_len, block_len + 1
    levels = tuple(levels)
    if not levels or levels[0] != 0 or list(levels) != sorted(set(levels)) or levels[-1] > K:
        raise ValueError(f"acceptance levels must start at 0, increase strictly and stay <= K={K}: {levels}")
    P = len(levels)
    N = K1 * (1 + P)
    offsets = torch.cat([torch.arange(K1)] + [lam + 1 + torch.arange(K1) for lam in levels])
    seg = torch.arange(N) // K1  # 0 = verify, p = proposal p
    idx = torch.arange(N) % K1  # index within the segment
    same = seg[:, None] == seg[None, :]
    verify_q, verify_k = seg[:, None] == 0, seg[None, :] == 0
    lam = torch.tensor((0,) + levels)[seg]  # λ of the query's segment (unused for verify)
    template = verify_q & verify_k & (idx[None, :] <= idx[:, None])  # verify: causal among itself
    template |= ~verify_q & verify_k & (idx[None, :] <= lam[:, None])  # proposal → anchor + λ_p drafts
    inside = ~verify_q & same
    template |= inside & (idx[None, :] <= idx[:, None]) if causal_proposals else inside
    ext = torch.arange(kappa + K1)  # verify: [history ; own rows]
    conv_rows = [ext] + [torch.cat([torch.arange(l + 1, l + 1 + kappa), kappa + K1 * p + torch.arange(K1)])
                         for p, l in enumerate(levels, 1)]
    value_rows = [torch.arange(K1)] + [torch.cat([torch.tensor([1 + l]), 1 + K1 * p + torch.arange(K)])
                                       for p, l in enumerate(levels, 1)]
    return PackedLayout(K, levels, offsets, template,
                        Segments(torch.stack(conv_rows), torch.stack(value_rows)))
