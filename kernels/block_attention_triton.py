"""Triton kernel of ``zaya.block_attention``: GQA attention of T new rows over [KV cache ; new keys], with the
mask generated in the kernel from the layout, never read as a ``[T, S]`` tensor.

One program owns one KV head of one batch row, a tile of its query rows (the G query heads of the group times
the T tokens, so the cache tile is read once for all G heads) and one split of the key slots. Decode (T = 1)
is bound by reading the cache, so the slots are split over several programs (split-K, "flash decoding") and
the partial softmax states (max, sum, weighted values) are merged afterwards; a long prefill uses one split.

Masks (``MODE``): 0 causal in slot order (AR decode, prefill, TiDAR verify), 1 bidirectional new block (TiDAR
draft), 2 the packed TiDAR step's static ``[T, T]`` template among the new rows (every row sees the valid
cache). Key validity (left padding) and an optional sliding window on token positions apply as in the
reference. Masked scores get the reference's finite fill (fp32 min), not -inf, so a row with no visible key
averages all values exactly as the reference does, instead of producing NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_dot import dot, f32_dot
from .triton_support import check_device

CAUSAL, BIDIRECTIONAL, TEMPLATE = 0, 1, 2


def key_block(head_dim: int) -> int:
    """Key slots per tile: 32 at head_dim 128 (64 there runs out of registers: 256 VGPRs and spills on
    gfx942/sm_90 in the AOT reports), 64 below."""
    return 32 if head_dim >= 128 else 64
FILL = float(torch.finfo(torch.float32).min)


@triton.jit
def _attention_split(q_ptr, pk_ptr, pv_ptr, k_ptr, v_ptr, pvalid_ptr, nvalid_ptr, pos_ptr, tmpl_ptr,
                     m_out, l_out, acc_out,
                     S, T, G, n_kv, window, slots_per_split, scale,
                     sq_b, sq_h, sq_t, spk_b, spk_h, spk_s, spv_b, spv_h, spv_s,
                     sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
                     MODE: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     F32: tl.constexpr, FILL_VALUE: tl.constexpr):
    """Partial softmax state of rows (g, t) of one KV head over one split of the S+T slots.
    grid (B·n_kv, cdiv(G·T, BLOCK_M), splits); outputs m, l [B·n_kv, splits, G·T], acc [..., G·T, D]."""
    bh = tl.program_id(0)
    b = bh // n_kv
    h = bh % n_kv
    split = tl.program_id(2)
    splits = tl.num_programs(2)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] query rows r = g·T + t
    rmask = rows < G * T
    g = rows // T
    t = rows % T
    dd = tl.arange(0, D)
    q = tl.load(q_ptr + b * sq_b + (h * G + g)[:, None] * sq_h + t[:, None] * sq_t + dd[None, :],
                mask=rmask[:, None], other=0.0)  # [BM, D]
    q_pos = tl.load(pos_ptr + b * (S + T) + S + t, mask=rmask, other=0)  # [BM]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    lo = split * slots_per_split  # a multiple of BLOCK_N: the blocks of a split never cross into the next
    for s0 in range(lo, lo + slots_per_split, BLOCK_N):
        s = s0 + tl.arange(0, BLOCK_N)  # [BN] slots of [cache ; new]
        live = s < S + T
        past = live & (s < S)
        new = live & (s >= S)
        j = s - S  # index among the new rows
        pvalid = tl.load(pvalid_ptr + b * S + s, mask=past, other=0) != 0
        used = pvalid & past  # empty cache slots (a fixed-capacity buffer) are never read
        kp = tl.load(pk_ptr + b * spk_b + h * spk_h + s[:, None] * spk_s + dd[None, :], mask=used[:, None], other=0.0)
        kn = tl.load(k_ptr + b * sk_b + h * sk_h + j[:, None] * sk_t + dd[None, :], mask=new[:, None], other=0.0)
        vp = tl.load(pv_ptr + b * spv_b + h * spv_h + s[:, None] * spv_s + dd[None, :], mask=used[:, None], other=0.0)
        vn = tl.load(v_ptr + b * sv_b + h * sv_h + j[:, None] * sv_t + dd[None, :], mask=new[:, None], other=0.0)
        keys = tl.where(past[:, None], kp, kn)  # [BN, D]: masked loads, so each slot is read from one source
        values = tl.where(past[:, None], vp, vn)
        scores = dot(q, tl.trans(keys), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), F32) * scale  # [BM, BN]
        if MODE == 2:
            tmpl = tl.load(tmpl_ptr + t[:, None] * T + j[None, :], mask=rmask[:, None] & new[None, :], other=0) != 0
            allowed = (pvalid[None, :] & past[None, :]) | tmpl
        else:
            nvalid = tl.load(nvalid_ptr + b * T + j, mask=new, other=0) != 0
            allowed = tl.broadcast_to((pvalid | nvalid)[None, :] & live[None, :], [BLOCK_M, BLOCK_N])
            if MODE == 0:
                allowed = allowed & (s[None, :] <= S + t[:, None])
        if window > 0:
            k_pos = tl.load(pos_ptr + b * (S + T) + s, mask=live, other=0)
            allowed = allowed & ((q_pos[:, None] - k_pos[None, :]) < window)
        scores = tl.where(allowed, scores, FILL_VALUE)
        scores = tl.where(live[None, :], scores, float("-inf"))  # slots past this split do not exist
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # probabilities in the value dtype, as the reference casts them before the value product
        acc = dot(p.to(values.dtype), values, acc * alpha[:, None], F32)
        m_i = m_new
    out = (bh * splits + split) * (G * T) + rows
    tl.store(m_out + out, m_i, mask=rmask)
    tl.store(l_out + out, l_i, mask=rmask)
    tl.store(acc_out + out[:, None] * D + dd[None, :], acc, mask=rmask[:, None])


def _positions(past_valid: Tensor, new_valid: Tensor, template_offsets: Tensor | None) -> Tensor:
    """Token positions [B, S+T] (int32) the window compares: ``cumsum(valid) − 1``, or for the packed step
    the cache count plus each step token's static offset."""
    valid = torch.cat([past_valid, new_valid], 1)
    pos = valid.long().cumsum(-1) - 1
    if template_offsets is not None:
        S = past_valid.shape[1]
        step = past_valid.long().sum(-1, keepdim=True) + template_offsets.to(pos.device)[None]
        pos = torch.cat([pos[:, :S], step], 1)
    return pos.to(torch.int32).contiguous()


def block_attention_triton(q: Tensor, past_k: Tensor, past_v: Tensor, k: Tensor, v: Tensor, past_valid: Tensor,
                           new_valid: Tensor, window: int, causal: bool = True, template: Tensor | None = None,
                           template_offsets: Tensor | None = None, splits: int | None = None) -> Tensor:
    """``zaya.block_attention`` in Triton: q [B, n_q, T, d], past_k/v [B, n_kv, S, d], k/v [B, n_kv, T, d],
    past_valid [B, S], new_valid [B, T] → [B, T, n_q·d]. ``template`` [T, T] bool (with ``template_offsets``
    [T], the step tokens' positions after the cache) selects the packed-step mask. ``splits``: key splits
    (None: enough to fill the GPU at T = 1, one otherwise)."""
    check_device(q, past_k, k)
    B, n_q, T, d = q.shape
    n_kv, S = k.shape[1], past_k.shape[2]
    G = n_q // n_kv
    if d & (d - 1) or d < 16:
        raise ValueError(f"the Triton attention kernel needs a power-of-two head_dim >= 16, got {d}")
    q, past_k, past_v, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, past_k, past_v, k, v))
    mode = TEMPLATE if template is not None else (CAUSAL if causal else BIDIRECTIONAL)
    pos = _positions(past_valid, new_valid, template_offsets if template is not None else None)
    # created on the device (no host copy, so a CUDA/HIP graph can capture the call)
    tmpl = template.to(q.device, torch.int8) if template is not None else torch.zeros(1, dtype=torch.int8,
                                                                                          device=q.device)
    rows = G * T
    block_m = max(16, min(64, triton.next_power_of_2(rows)))
    block_n = min(key_block(d), max(16, triton.next_power_of_2(S + T)))
    if splits is None:
        splits = max(1, min(16, (S + T) // 256)) if T == 1 else 1
    per_split = triton.cdiv(triton.cdiv(S + T, splits), block_n) * block_n
    splits = triton.cdiv(S + T, per_split)
    grid = (B * n_kv, triton.cdiv(rows, block_m), splits)
    m = torch.empty(B * n_kv, splits, rows, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(B * n_kv, splits, rows, d, dtype=torch.float32, device=q.device)
    pk, pv = past_k, past_v
    _attention_split[grid](
        q, pk, pv, k, v, past_valid.to(torch.int8).contiguous(), new_valid.to(torch.int8).contiguous(), pos,
        tmpl.contiguous(), m, l, acc, S, T, G, n_kv, int(window), per_split, d**-0.5,
        q.stride(0), q.stride(1), q.stride(2), pk.stride(0), pk.stride(1), pk.stride(2),
        pv.stride(0), pv.stride(1), pv.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        MODE=mode, D=d, BLOCK_M=block_m, BLOCK_N=block_n, F32=f32_dot(q.dtype), FILL_VALUE=FILL)
    # merge the splits: [B·n_kv, splits, G·T] partial states → [B, T, n_q·d]
    top = m.amax(1, keepdim=True)
    w = torch.exp(m - top)  # [B·n_kv, splits, rows]
    out = (acc * w[..., None]).sum(1) / (l * w).sum(1)[..., None]  # [B·n_kv, G·T, d]
    out = out.view(B, n_kv, G, T, d).reshape(B, n_q, T, d).transpose(1, 2).reshape(B, T, n_q * d)
    return out.to(q.dtype)
