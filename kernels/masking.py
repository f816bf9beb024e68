"""Masked attention scores that make neither the softmax compute a denormal nor onnxruntime broadcast a Where.

The usual mask puts the dtype's minimum in every hidden slot, so the softmax takes ``exp`` of about −3.4e38.
CPU exp kernels clamp that input and return a denormal (onnxruntime's MLAS clamps at −104 nats), and on x86
each denormal result costs a microcode assist: onnxruntime's Softmax was 6–9× slower on masked rows
([1, 2, 2, 36, 262], 162 slots masked: 0.146 ms, against 0.024 ms unmasked or with flush-to-zero set on the
thread; the worker threads of onnxruntime's shared pool cannot be given flush-to-zero from Python). And
onnxruntime's Where broadcasting the mask over the heads costs 60 µs on that shape where an Add costs 3.

So the mask is an additive fp32 bias (0 or the fp32 minimum, which absorbs any score under 1e31), and the scores
are then floored at :data:`MASK_DEPTH` nats below the row's best: a hidden slot gets weight e^−64 ≈ 1.6e−28
of the best key's, a normal float that the fp32 sum of exps (≥ 1) absorbs for any row shorter than 10^20
keys, so probabilities and output are those of the exact mask to fp32 rounding. The floor also lifts the
allowed scores more than 64 nats below the best, whose weights were already under that resolution. A row with
nothing allowed (left padding) stays at the fp32 minimum everywhere: uniform, as the minimum-fill mask gives.
"""

from __future__ import annotations

import torch
from torch import Tensor

MASK_DEPTH = 64.0  # nats below the row's best score; e^-64 / 2^24 keys is still a normal fp32
LOWEST = float(torch.finfo(torch.float32).min)


def mask_scores(scores: Tensor, allowed: Tensor) -> Tensor:
    """fp32 scores [..., S] for the softmax: hidden slots (``allowed`` [..., S] False, broadcast) and every score
    more than :data:`MASK_DEPTH` below the row's best allowed score sit at that floor."""
    biased = mask_bias(scores, allowed)
    return torch.maximum(biased, biased.amax(-1, keepdim=True) - MASK_DEPTH)


def mask_bias(scores: Tensor, allowed: Tensor) -> Tensor:
    """fp32 ``scores`` with :data:`LOWEST` added where ``allowed`` is False (no floor: for a softmax whose row
    max is taken over more than these scores, as ``block_attention.attend_apart`` does over two parts)."""
    return scores.float() + torch.where(allowed, 0.0, LOWEST)
