"""Triton kernels of ``zaya.moe_top1``: the chosen SwiGLU expert per token, never all E experts per token.

Two dispatches, picked by the number of tokens N (as the ONNX body picks):

* decode (N ≤ ``GEMV_MAX_TOKENS``, one token per row): a GEMV per token that reads only the rows of its chosen
  expert (``_swiglu_gemv`` then ``_down_gemv``); a skip-class token reads no weights at all (masked loads).
  Decode is bound by weight reads, so this reads each token's expert once and nothing else.
* many tokens (prefill, verify, the packed TiDAR step): tokens are sorted by expert on the device and one
  grouped GEMM runs over the expert segments (``_grouped_swiglu``, ``_grouped_down``, ``tl.dot`` tiles, so the
  matrix cores run it). The tile → expert table is built with plain tensor ops, no host sync, so the launch
  can be captured in a CUDA/HIP graph: the grid is the static bound ``cdiv(N, BLOCK_M) + E`` tiles and the
  tiles past the real count do nothing.

The router (three small dense layers on the R = 256 router state, then the biased top-1 with skip class) runs
as the reference's ``_route``, so the discrete choice is computed by the one ``top1`` every implementation
shares (and a routing tape records/replays it here too).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .moe_top1 import _route
from .triton_dot import dot, f32_dot
from .triton_support import check_device

GEMV_MAX_TOKENS = 8  # up to this many tokens the per-token GEMV reads less than grouped tiles of BLOCK_M rows


@triton.jit
def _swiglu_gemv(x_ptr, choice_ptr, gu_ptr, act_ptr, H, I, E,
                 stride_xn, stride_ge, stride_gr, stride_an,
                 BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr):
    """act[n, i-block] = silu(x_n · Wg_e) ⊙ (x_n · Wu_e), e = choice[n]; grid (N, cdiv(I, BLOCK_I))."""
    n = tl.program_id(0)
    e = tl.load(choice_ptr + n)
    live = e < E  # the skip class (e == E) reads no weights
    e = tl.where(live, e, 0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)  # [BI]
    rmask = (rows < I) & live
    acc_g = tl.zeros([BLOCK_I], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_I], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)  # [BH]
        cmask = cols < H
        xv = tl.load(x_ptr + n * stride_xn + cols, mask=cmask & live, other=0.0).to(tl.float32)
        w_off = gu_ptr + e * stride_ge + rows[:, None] * stride_gr + cols[None, :]  # [BI, BH]
        m2 = rmask[:, None] & cmask[None, :]
        wg = tl.load(w_off, mask=m2, other=0.0).to(tl.float32)
        wu = tl.load(w_off + I * stride_gr, mask=m2, other=0.0).to(tl.float32)
        acc_g += tl.sum(wg * xv[None, :], axis=1)
        acc_u += tl.sum(wu * xv[None, :], axis=1)
    # round like the reference: the two projections in the activation dtype, then silu(g)·u
    g = acc_g.to(act_ptr.dtype.element_ty).to(tl.float32)
    u = acc_u.to(act_ptr.dtype.element_ty).to(tl.float32)
    act = g * tl.sigmoid(g) * u
    tl.store(act_ptr + n * stride_an + rows, act.to(act_ptr.dtype.element_ty), mask=rows < I)


@triton.jit
def _down_gemv(act_ptr, choice_ptr, weight_ptr, down_ptr, out_ptr, H, I, E,
               stride_an, stride_de, stride_dr, stride_on,
               BLOCK_H: tl.constexpr, BLOCK_I: tl.constexpr):
    """out[n, h-block] = w_n · (act_n · W_down_e); zeros for the skip class; grid (N, cdiv(H, BLOCK_H))."""
    n = tl.program_id(0)
    e = tl.load(choice_ptr + n)
    live = e < E
    e = tl.where(live, e, 0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH]
    rmask = (rows < H) & live
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for i0 in range(0, I, BLOCK_I):
        cols = i0 + tl.arange(0, BLOCK_I)
        cmask = cols < I
        a = tl.load(act_ptr + n * stride_an + cols, mask=cmask & live, other=0.0).to(tl.float32)
        w = tl.load(down_ptr + e * stride_de + rows[:, None] * stride_dr + cols[None, :],
                    mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * a[None, :], axis=1)
    scale = tl.load(weight_ptr + n).to(tl.float32)
    y = acc.to(out_ptr.dtype.element_ty).to(tl.float32) * tl.where(live, scale, 0.0)
    tl.store(out_ptr + n * stride_on + rows, y.to(out_ptr.dtype.element_ty), mask=rows < H)


@triton.jit
def _tile_of(tile_start_ptr, seg_start_ptr, count_ptr, E, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """Which expert segment this program's row tile lies in, and the sorted rows it covers ([BM], mask)."""
    pid = tl.program_id(0)
    es = tl.arange(0, E_PAD)
    starts = tl.load(tile_start_ptr + es, mask=es < E, other=2**30)
    e = tl.sum((starts <= pid).to(tl.int32), axis=0) - 1  # last expert whose first tile is ≤ pid
    local = pid - tl.load(tile_start_ptr + e)
    seg0 = tl.load(seg_start_ptr + e)
    rows = seg0 + local * BLOCK_M + tl.arange(0, BLOCK_M)  # positions in the expert-sorted order
    return e.to(tl.int64), rows, rows < seg0 + tl.load(count_ptr + e)


@triton.jit
def _grouped_swiglu(x_ptr, order_ptr, tile_start_ptr, seg_start_ptr, count_ptr, gu_ptr, act_ptr, H, I, E,
                    stride_xn, stride_ge, stride_gr, stride_an,
                    E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    F32: tl.constexpr):
    """act_sorted[rows, n-block] of one expert's row tile: [BM, H] @ Wg/Wu[n-block, H]ᵀ.
    grid (tiles, cdiv(I, BN))."""
    e, rows, rmask = _tile_of(tile_start_ptr, seg_start_ptr, count_ptr, E, E_PAD, BLOCK_M)
    tok = tl.load(order_ptr + rows, mask=rmask, other=0)  # [BM] token of each sorted row
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] intermediate features
    nmask = cols < I
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < H
        a = tl.load(x_ptr + tok[:, None] * stride_xn + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        w_off = gu_ptr + e * stride_ge + cols[None, :] * stride_gr + ks[:, None]  # [BK, BN] = Wᵀ tile
        wmask = kmask[:, None] & nmask[None, :]
        wg = tl.load(w_off, mask=wmask, other=0.0)
        wu = tl.load(w_off + I * stride_gr, mask=wmask, other=0.0)
        acc_g = dot(a, wg, acc_g, F32)
        acc_u = dot(a, wu, acc_u, F32)
    g = acc_g.to(act_ptr.dtype.element_ty).to(tl.float32)
    u = acc_u.to(act_ptr.dtype.element_ty).to(tl.float32)
    act = g * tl.sigmoid(g) * u
    tl.store(act_ptr + rows[:, None] * stride_an + cols[None, :], act.to(act_ptr.dtype.element_ty),
             mask=rmask[:, None] & nmask[None, :])


@triton.jit
def _grouped_down(act_ptr, order_ptr, weight_ptr, tile_start_ptr, seg_start_ptr, count_ptr, down_ptr, out_ptr,
                  H, I, E, stride_an, stride_de, stride_dr, stride_on,
                  E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  F32: tl.constexpr):
    """out[tok, n-block] = w_tok · act_sorted[rows] @ W_down_e[n-block]ᵀ, scattered back to token order."""
    e, rows, rmask = _tile_of(tile_start_ptr, seg_start_ptr, count_ptr, E, E_PAD, BLOCK_M)
    tok = tl.load(order_ptr + rows, mask=rmask, other=0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] hidden features
    nmask = cols < H
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < I
        a = tl.load(act_ptr + rows[:, None] * stride_an + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(down_ptr + e * stride_de + cols[None, :] * stride_dr + ks[:, None],
                    mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc = dot(a, w, acc, F32)
    scale = tl.load(weight_ptr + tok, mask=rmask, other=0.0).to(tl.float32)  # [BM]
    y = acc.to(out_ptr.dtype.element_ty).to(tl.float32) * scale[:, None]
    tl.store(out_ptr + tok[:, None] * stride_on + cols[None, :], y.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & nmask[None, :])


def _block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(n)))


def expert_tiles(choice: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Token order sorted by expert (skip class last) and per expert: first row tile, first sorted row, row
    count. Tensor ops only (no ``bincount``/``nonzero``, which sync with the host), so it is graph-capturable."""
    experts = torch.arange(num_experts, device=choice.device)
    counts = (choice[None, :] == experts[:, None]).sum(1)  # [E]
    order = torch.argsort(choice, stable=True)  # [N]
    seg_start = torch.cumsum(counts, 0) - counts
    tiles = (counts + block_m - 1) // block_m
    tile_start = torch.cumsum(tiles, 0) - tiles
    i32 = torch.int32
    return order.to(i32), tile_start.to(i32), seg_start.to(i32), counts.to(i32)


def expert_swiglu(x: Tensor, choice: Tensor, weight: Tensor, gate_up: Tensor, down: Tensor,
                  grouped: bool | None = None) -> Tensor:
    """The chosen experts: x [N, H], choice [N] (E = skip), weight [N], gate_up [E, 2I, H], down [E, H, I]
    → out [N, H]. ``grouped`` forces a dispatch (None: GEMV for up to ``GEMV_MAX_TOKENS`` tokens)."""
    check_device(x, gate_up, down)
    N, H = x.shape
    E, two_i, _ = gate_up.shape
    I = two_i // 2
    x, gate_up, down = x.contiguous(), gate_up.contiguous(), down.contiguous()
    choice = choice.to(torch.int32).contiguous()
    weight = weight.contiguous()
    out = torch.zeros_like(x)
    if N == 0:
        return out
    if grouped is None:
        grouped = N > GEMV_MAX_TOKENS
    if not grouped:
        act = torch.empty(N, I, dtype=x.dtype, device=x.device)
        # few rows per program, long contiguous column runs: each thread streams its weights in wide loads
        rows, cols = 16, _block(H, 256)
        _swiglu_gemv[(N, triton.cdiv(I, rows))](x, choice, gate_up, act, H, I, E, x.stride(0), gate_up.stride(0),
                                                gate_up.stride(1), act.stride(0), BLOCK_I=rows, BLOCK_H=cols)
        cols = _block(I, 256)
        _down_gemv[(N, triton.cdiv(H, rows))](act, choice, weight, down, out, H, I, E, act.stride(0), down.stride(0),
                                              down.stride(1), out.stride(0), BLOCK_H=rows, BLOCK_I=cols)
        return out
    bm = 16 if N <= 256 else 64
    order, tile_start, seg_start, counts = expert_tiles(choice, E, bm)
    act = torch.empty(N, I, dtype=x.dtype, device=x.device)  # rows in expert-sorted order
    tiles = triton.cdiv(N, bm) + E  # static bound on Σ_e cdiv(count_e, bm)
    bn, bk = _block(I, 64), _block(H, 64)
    f32 = f32_dot(x.dtype)
    e_pad = triton.next_power_of_2(E)
    _grouped_swiglu[(tiles, triton.cdiv(I, bn))](x, order, tile_start, seg_start, counts, gate_up, act, H, I, E,
                                                 x.stride(0), gate_up.stride(0), gate_up.stride(1), act.stride(0),
                                                 E_PAD=e_pad, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, F32=f32)
    bn, bk = _block(H, 64), _block(I, 64)
    _grouped_down[(tiles, triton.cdiv(H, bn))](act, order, weight, tile_start, seg_start, counts, down, out,
                                               H, I, E, act.stride(0), down.stride(0), down.stride(1), out.stride(0),
                                               E_PAD=e_pad, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, F32=f32)
    return out


def moe_top1_triton(x: Tensor, prev: Tensor, down_w: Tensor, down_b: Tensor, eda_scale: Tensor, norm_w: Tensor,
                    fc1_w: Tensor, fc1_b: Tensor, fc2_w: Tensor, fc2_b: Tensor, out_w: Tensor, balancing: Tensor,
                    gate_up: Tensor, down: Tensor, eps: float, grouped: bool | None = None) -> tuple[Tensor, Tensor]:
    """``zaya.moe_top1`` with the expert part in Triton; same signature and outputs as the reference."""
    choice, weight, r = _route(x, prev, down_w, down_b, eda_scale, norm_w, fc1_w, fc1_b, fc2_w, fc2_b, out_w,
                               balancing, eps)
    return expert_swiglu(x, choice, weight.to(x.dtype), gate_up, down, grouped), r
