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


def training_layout(seq_len: int, block_len: int, kappa: int) -> PackedLayout:
    """The TiDAR training layout (``tidar-decoding.md`` §8) as a packed layout over ``[x_0..x_{N-1} | M×N]``.

    Positions ``[0..N-1 | 0..N-1]``. Clean rows attend causally to clean rows; mask rows of block β attend to
    the clean rows before the block start and bidirectionally inside their block. CCA: the clean half runs as
    in AR (cut into blocks whose history is the previous κ clean rows, which is the same conv), and mask
    block β is seeded with the clean history ``(u_{βB-κ}..u_{βB-1})`` and delayed value ``ω_{βB-1}`` — exactly
    what a draft after committing ``x_0..x_{βB-1}`` sees at inference.
    """
    N, B = seq_len, block_len
    if N <= 0 or N % B:
        raise ValueError(f"training length {N} must be a positive multiple of the block length {B}")
    pos = torch.arange(N)
    blk = pos // B
    clean_q, clean_k = torch.arange(2 * N)[:, None] < N, torch.arange(2 * N)[None, :] < N
    p2 = torch.cat([pos, pos])
    b2 = torch.cat([blk, blk])
    template = clean_q & clean_k & (p2[None, :] <= p2[:, None])  # C→C causal; C→D denied
    template |= ~clean_q & clean_k & (p2[None, :] < B * b2[:, None])  # D→C: before the block start
    template |= ~clean_q & ~clean_k & (b2[None, :] == b2[:, None])  # D→D: own block, bidirectional
    starts = torch.arange(0, N, B)
    own = torch.arange(B)
    # Extended conv rows: [zero history (κ) ; clean rows (N) ; mask rows (N)]; row r of the sequence is at κ+r.
    clean_conv = [torch.cat([s + torch.arange(kappa), kappa + s + own]) for s in starts]
    mask_conv = [torch.cat([s + torch.arange(kappa), kappa + N + s + own]) for s in starts]
    # Delayed-value rows: [ρ ; ω_0..ω_{2N-1}]; row t reads ω_{t-1} (ρ for t = 0), masks seed from ω_{βB-1}.
    clean_val = [s + own for s in starts]
    mask_val = [torch.cat([s.reshape(1), 1 + N + s + own[:-1]]) for s in starts]
    return PackedLayout(B, (), torch.cat([pos, pos]), template,
                        Segments(torch.stack(clean_conv + mask_conv), torch.stack(clean_val + mask_val)))
