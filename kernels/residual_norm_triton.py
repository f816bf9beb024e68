"""Triton kernel of the residual scaling + RMSNorm pair (reference: ``residual_norm.py``): one program per
row reads the sublayer output and the fp32 residual once and writes the new residual and the normed row,
so the residual never makes a second trip through memory between the two modules."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_support import check_device


@triton.jit
def _residual_rmsnorm(sub_ptr, res_ptr, hb_ptr, hs_ptr, rb_ptr, rs_ptr, w_ptr, h_out, n_out, H, eps,
                      stride_s, stride_r, stride_h, stride_n, BLOCK_H: tl.constexpr):
    """grid (N,): row n of h' (fp32) and of the normed output (activation dtype)."""
    n = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    m = cols < H
    act = n_out.dtype.element_ty
    # the reference adds the bias and scales in the activation dtype (two roundings), then adds the fp32
    # residual; arithmetic is done in fp32 and rounded where the reference rounds
    sub = tl.load(sub_ptr + n * stride_s + cols, mask=m, other=0.0).to(tl.float32)
    hidden = (sub + tl.load(hb_ptr + cols, mask=m, other=0.0).to(tl.float32)).to(act).to(tl.float32)
    hidden = (hidden * tl.load(hs_ptr + cols, mask=m, other=0.0).to(tl.float32)).to(act).to(tl.float32)
    res = tl.load(res_ptr + n * stride_r + cols, mask=m, other=0.0).to(tl.float32)
    res = (res + tl.load(rb_ptr + cols, mask=m, other=0.0).to(tl.float32)) * tl.load(rs_ptr + cols, mask=m,
                                                                                     other=0.0).to(tl.float32)
    h = hidden + res
    tl.store(h_out + n * stride_h + cols, h, mask=m)
    x = h.to(act).to(tl.float32)  # the norm reads h' rounded to the activation dtype
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
    y = (x * inv).to(act).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(n_out + n * stride_n + cols, (w * y).to(act), mask=m)


def residual_rmsnorm_triton(sub: Tensor, res: Tensor, hidden_bias: Tensor, hidden_scale: Tensor,
                            residual_bias: Tensor, residual_scale: Tensor, norm_w: Tensor, eps: float
                            ) -> tuple[Tensor, Tensor]:
    """Same inputs and outputs as ``residual_rmsnorm_reference``; leading dims are flattened to rows."""
    check_device(sub, res)
    shape = res.shape
    H = shape[-1]
    sub2, res2 = sub.reshape(-1, H).contiguous(), res.reshape(-1, H).contiguous()
    N = res2.shape[0]
    h = torch.empty(N, H, dtype=torch.float32, device=res.device)
    normed = torch.empty(N, H, dtype=norm_w.dtype, device=res.device)
    if N:
        _residual_rmsnorm[(N,)](sub2, res2, hidden_bias, hidden_scale, residual_bias, residual_scale, norm_w, h,
                                normed, H, float(eps), sub2.stride(0), res2.stride(0), h.stride(0),
                                normed.stride(0), BLOCK_H=triton.next_power_of_2(H))
    return h.view(shape), normed.view(shape)
