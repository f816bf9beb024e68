"""Triton kernel of ``zaya.cca``: everything after the q/k projections in one pass per head and row tile:
the two-stage causal conv over [conv history ; new rows] (read through a per-segment row table, so the packed
TiDAR step's segments each see their own history without a gathered copy), the q/k mean residuals, the L2
norm to √d with the per-KV-head temperature, and the partial RoPE. The projections themselves are dense GEMMs
(the vendor BLAS runs them) and the value halves are a GEMM and a shift, so they stay in torch.

The rotate-half RoPE needs, for output dim j, the value of dim j ± rot/2 of the same head, which another lane
holds. Instead of shuffling registers, the kernel computes that rotated copy directly: the same conv with the
weight rows (and the residual columns) read in rotated order and sign, which costs a second d×d product per
tap but keeps every head in registers from the conv input to the rotated, normalised output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .triton_dot import dot, f32_dot
from .triton_support import check_device


@triton.jit
def _conv_head(rows_ptr, idx_ptr, dww_ptr, dwb_ptr, gw_ptr, gb_ptr, b, c0, seg, local, tmask,
               out_cols, sign, stride_rb, stride_rc, W, C,
               K0: tl.constexpr, K1: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, F32: tl.constexpr):
    """z[t, out_cols] of head channels [c0, c0+D): depthwise taps K0, then the head's dense D×D taps K1.
    ``out_cols``/``sign`` pick (and negate) output channels: the identity, or the rotate-half order."""
    cin = tl.arange(0, D)
    z = tl.zeros([BLOCK_T, D], tl.float32)
    for j1 in tl.static_range(K1):
        y = tl.zeros([BLOCK_T, D], tl.float32) + tl.load(dwb_ptr + c0 + cin).to(tl.float32)[None, :]
        for j0 in tl.static_range(K0):
            slot = tl.load(idx_ptr + seg * W + local + j1 + j0, mask=tmask, other=0)  # [BT] row in conv_rows
            xin = tl.load(rows_ptr + b * stride_rb + (c0 + cin)[None, :] * stride_rc + slot[:, None],
                          mask=tmask[:, None], other=0.0).to(tl.float32)  # [BT, D]
            y += xin * tl.load(dww_ptr + (c0 + cin) * K0 + j0).to(tl.float32)[None, :]
        # the reference rounds the depthwise output to the activation dtype before the grouped conv
        y = y.to(rows_ptr.dtype.element_ty)
        w = tl.load(gw_ptr + (c0 + out_cols)[None, :] * (D * K1) + cin[:, None] * K1 + j1)  # [D_in, D_out]
        if BLOCK_T >= 16:
            z = dot(y, w, z, F32)
        else:  # decode: a GEMV, one row per program
            z += tl.sum(y.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    z += tl.load(gb_ptr + c0 + out_cols).to(tl.float32)[None, :]
    return z * sign[None, :]


@triton.jit
def _cca_heads(rows_ptr, idx_ptr, dww_ptr, dwb_ptr, gw_ptr, gb_ptr, temp_ptr, cos_ptr, sin_ptr, q_out, k_out,
               T, T_SEG, W, C, n_q, n_kv, eps, norm_scale,
               stride_rb, stride_rc, stride_cb, stride_ct, stride_qb, stride_qh, stride_qt,
               stride_kb, stride_kh, stride_kt,
               KAPPA: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, D: tl.constexpr, ROT: tl.constexpr,
               G: tl.constexpr, BLOCK_T: tl.constexpr, F32: tl.constexpr):
    """One head (q heads 0..n_q-1, then k heads) of one batch row over a tile of rows.
    grid (B, n_q + n_kv, cdiv(T, BLOCK_T))."""
    b = tl.program_id(0)
    head = tl.program_id(1)
    t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT] global row
    tmask = t < T
    seg = t // T_SEG
    local = t % T_SEG
    is_q = head < n_q
    kv = tl.where(is_q, head // G, head - n_q)
    c0 = head * D
    dd = tl.arange(0, D)
    rot_cols = tl.where(dd < ROT // 2, dd + ROT // 2, tl.where(dd < ROT, dd - ROT // 2, dd))
    rot_sign = tl.where(dd < ROT // 2, -1.0, tl.where(dd < ROT, 1.0, 0.0))
    one = tl.full([D], 1.0, tl.float32)
    z = _conv_head(rows_ptr, idx_ptr, dww_ptr, dwb_ptr, gw_ptr, gb_ptr, b, c0, seg, local, tmask, dd, one,
                   stride_rb, stride_rc, W, C, K0, K1, D, BLOCK_T, F32)
    zr = _conv_head(rows_ptr, idx_ptr, dww_ptr, dwb_ptr, gw_ptr, gb_ptr, b, c0, seg, local, tmask, rot_cols,
                    rot_sign, stride_rb, stride_rc, W, C, K0, K1, D, BLOCK_T, F32)
    # mean residual from the new rows' projections (conv_rows[:, κ + t]): q head h: (q̂_h + k̂_g)/2;
    # k head g: the mean of its group's q residuals = (mean_h q̂_h + k̂_g)/2
    new = rows_ptr + b * stride_rb + (KAPPA + t)[:, None]
    k_c = n_q * D + kv * D
    k_hat = tl.load(new + (k_c + dd)[None, :] * stride_rc, mask=tmask[:, None], other=0.0).to(tl.float32)
    k_hat_r = tl.load(new + (k_c + rot_cols)[None, :] * stride_rc, mask=tmask[:, None], other=0.0).to(tl.float32)
    q_sum = tl.zeros([BLOCK_T, D], tl.float32)
    q_sum_r = tl.zeros([BLOCK_T, D], tl.float32)
    for gi in tl.static_range(G):
        qc = (kv * G + gi) * D
        q_sum += tl.load(new + (qc + dd)[None, :] * stride_rc, mask=tmask[:, None], other=0.0).to(tl.float32)
        q_sum_r += tl.load(new + (qc + rot_cols)[None, :] * stride_rc, mask=tmask[:, None], other=0.0).to(tl.float32)
    own = new + (c0 + dd)[None, :] * stride_rc
    own_r = new + (c0 + rot_cols)[None, :] * stride_rc
    q_own = tl.load(own, mask=tmask[:, None] & is_q, other=0.0).to(tl.float32)
    q_own_r = tl.load(own_r, mask=tmask[:, None] & is_q, other=0.0).to(tl.float32)
    res = tl.where(is_q, (q_own + k_hat) * 0.5, (q_sum / G + k_hat) * 0.5)
    res_r = tl.where(is_q, (q_own_r + k_hat_r) * 0.5, (q_sum_r / G + k_hat_r) * 0.5) * rot_sign[None, :]
    x = z + res  # [BT, D] pre-norm q or k
    xr = zr + res_r  # its rotate-half copy (zeros past ROT)
    temp = tl.where(is_q, 1.0, tl.load(temp_ptr + kv).to(tl.float32))
    s = norm_scale / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), eps) * temp  # [BT]
    cs = cos_ptr + b * stride_cb + t[:, None] * stride_ct + dd[None, :]
    in_rot = tmask[:, None] & (dd < ROT)[None, :]
    cos = tl.load(cs, mask=in_rot, other=1.0).to(tl.float32)
    sin = tl.load(sin_ptr + b * stride_cb + t[:, None] * stride_ct + dd[None, :], mask=in_rot, other=0.0).to(tl.float32)
    y = (x * cos + xr * sin) * s[:, None]
    if head < n_q:
        tl.store(q_out + b * stride_qb + head * stride_qh + t[:, None] * stride_qt + dd[None, :],
                 y.to(q_out.dtype.element_ty), mask=tmask[:, None])
    else:
        tl.store(k_out + b * stride_kb + kv * stride_kh + t[:, None] * stride_kt + dd[None, :],
                 y.to(k_out.dtype.element_ty), mask=tmask[:, None])


def row_block(head_dim: int) -> int:
    """Rows per program for T > 1: 16 at head_dim 128 (32 needs 256 VGPRs + AGPRs on gfx942 and spills on
    sm_90 in the AOT reports; 16 fits in 225 VGPRs, two waves per SIMD), 32 below."""
    return 16 if head_dim >= 128 else 32


def cca_triton(x: Tensor, conv: Tensor, rho: Tensor, cos: Tensor, sin: Tensor, q_w: Tensor, k_w: Tensor,
               vc_w: Tensor, vd_w: Tensor, dw_w: Tensor, dw_b: Tensor, g_w: Tensor, g_b: Tensor, temp: Tensor,
               conv_index: Tensor | None = None, value_index: Tensor | None = None
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``zaya.cca`` with the conv/residual/norm/RoPE part in Triton; same inputs and outputs as
    ``cca_reference``. ``conv_index`` [G, κ+T/G] and ``value_index`` [G, T/G] (the packed step's
    ``Segments``) give each segment its own conv history and delayed-value seed."""
    check_device(x, conv, q_w)
    B, T, _ = x.shape
    d = g_w.shape[1]
    n_q, n_kv = q_w.shape[0] // d, k_w.shape[0] // d
    C, kappa = conv.shape[1], conv.shape[2]
    K0, K1, rot = dw_w.shape[2], g_w.shape[2], cos.shape[-1]
    if d & (d - 1) or d < 16 or kappa != K0 + K1 - 2 or rot % 2:
        raise ValueError(f"the Triton CCA kernel needs a power-of-two head_dim >= 16 (got {d}), a conv history "
                         f"of K0+K1-2 = {K0 + K1 - 2} rows (got {kappa}) and an even rotary width (got {rot})")
    q_hat, k_hat = x @ q_w.T, x @ k_w.T  # [B, T, n_q·d], [B, T, n_kv·d]
    conv_rows = torch.cat([conv, torch.cat([q_hat, k_hat], -1).transpose(1, 2)], -1).contiguous()  # [B, C, κ+T]
    if conv_index is None:
        conv_index = torch.arange(kappa + T, device=x.device)[None]
    segs, width = conv_index.shape
    q = torch.empty(B, n_q, T, d, dtype=x.dtype, device=x.device)
    k = torch.empty(B, n_kv, T, d, dtype=x.dtype, device=x.device)
    cos, sin = cos.contiguous(), sin.contiguous()
    block_t = 1 if T == 1 else max(16, min(row_block(d), triton.next_power_of_2(T)))
    grid = (B, n_q + n_kv, triton.cdiv(T, block_t))
    _cca_heads[grid](conv_rows, conv_index.to(torch.int32).contiguous(), dw_w.contiguous(), dw_b, g_w.contiguous(),
                     g_b, temp, cos, sin, q, k, T, width - kappa, width, C, n_q, n_kv,
                     float(torch.finfo(x.dtype).eps), d**0.5,
                     conv_rows.stride(0), conv_rows.stride(1), cos.stride(0), cos.stride(1),
                     q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                     KAPPA=kappa, K0=K0, K1=K1, D=d, ROT=rot, G=n_q // n_kv, BLOCK_T=block_t,
                     F32=f32_dot(x.dtype))
    omega = x @ vd_w.T  # [B, T, dv]
    v_ext = torch.cat([rho[:, None], omega], 1)  # [ρ, ω_0..ω_{T-1}]
    v_delayed = v_ext[:, :T] if value_index is None else v_ext[:, value_index.flatten()]
    v = torch.cat([F.linear(x, vc_w), v_delayed], -1).view(B, T, n_kv, d).transpose(1, 2).contiguous()
    return q, k, v, conv_rows, omega
