"""One ``tl.dot`` spelling for every kernel: the tile product in the inputs' dtype (bf16/fp16 on the matrix
cores: MFMA, WMMA, wgmma/mma), or in exact fp32 (``input_precision="ieee"``, no tf32) when ``F32`` is set.

``F32`` is set for fp32 inputs (parity with the fp32 reference) and under the CPU interpreter for every dtype:
Triton's interpreter multiplies bf16 tiles as their raw uint16 storage (wrong numbers), while the product of
bf16 values accumulated in fp32, which the upcast computes, is exactly what the matrix cores compute."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_support import interpreting


@triton.jit
def dot(a, b, acc, F32: tl.constexpr):
    """acc + a @ b (a [M, K], b [K, N], acc [M, N] fp32)."""
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


def f32_dot(dtype: torch.dtype) -> bool:
    """The ``F32`` flag for tiles of ``dtype`` on this run (interpreted or compiled)."""
    return dtype == torch.float32 or interpreting()
