"""Residual scaling followed by the next RMSNorm, the pair every decoder layer runs twice (after attention
and after the MoE): ``h' = (sub + b_h) ⊙ s_h + (h + b_r) ⊙ s_r`` (fp32 residual stream), then
``w ⊙ cast(x · rsqrt(mean(x²) + eps))`` with ``x = h'`` rounded to the activation dtype, as the model does.

This is the eager reference of the fused Triton kernel (``residual_norm_triton``), which reads ``sub`` and
``h`` once and writes both ``h'`` and the normed row, where the two modules make a round trip to memory
in between. Written here, not imported from ``models``, because kernels sit below models; the tests check it
against the model's ``ResidualScaling`` and ``RMSNorm``.

Shapes: sub [N, H] (activation dtype), res [N, H] fp32, the four scaling vectors and norm_w [H]
→ h' [N, H] fp32, normed [N, H] (activation dtype).
"""

from __future__ import annotations

import torch
from torch import Tensor


def residual_rmsnorm_reference(sub: Tensor, res: Tensor, hidden_bias: Tensor, hidden_scale: Tensor,
                               residual_bias: Tensor, residual_scale: Tensor, norm_w: Tensor, eps: float
                               ) -> tuple[Tensor, Tensor]:
    """Eager reference (plain torch): the model's ``ResidualScaling`` then ``RMSNorm(h'.to(dtype))``."""
    h = (sub + hidden_bias) * hidden_scale + (res + residual_bias) * residual_scale  # fp32: res is fp32
    x = h.to(norm_w.dtype)
    xf = x.float()
    return h, norm_w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
