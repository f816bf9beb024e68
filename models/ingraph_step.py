"""The TiDAR step's decisions inside the graph (``shared/docs/tidar-decoding.md`` §5–§7, §9.3): acceptance,
state commit by gather and next-draft selection with fixed-shape ops only, so one step is one graph launch
and no logits cross to the host.

* ``greedy_step``: greedy lossless (accept while d_i = argmax z_{i−1}).
* ``sample_step``: stochastic lossless rejection sampling with Dirac drafts, and logit mixing (w < 1), driven
  by explicit uniforms and a sampler vector ``[temperature, top_k, top_p, w]`` given as inputs, so every
  backend makes the host's decisions for the same seed (``runtime.tidar.accept`` is the reference).

Both apply the LM head to the K+1 verify rows and then to the K proposal rows selected by ℓ: 2K+1 rows
instead of N (§4.4).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from zaya_export.kernels.registry import mlir_active

from .packed import PackedLayout

BISECTION_STEPS = 48  # fp32 midpoints stop moving after ~30 on any finite range: the cut is exact before that



def sampler_vector(temperature: float, top_k: int, top_p: float, w: float) -> Tensor:
    """The ``sampler`` input: [temperature, top_k (0 = all), top_p, w] as float32."""
    return torch.tensor([temperature, float(top_k), top_p, w], dtype=torch.float32)


def first_argmax(x: Tensor) -> Tensor:
    """``x.argmax(-1)`` (first index of the maximum) as max + masked min: IREE's ROCm code generation fails to
    distribute ``argmax`` over a large last dim ("failed to distribute"), and this form is the same index."""
    V = x.shape[-1]
    index = torch.arange(V, device=x.device)
    return torch.where(x == x.amax(-1, keepdim=True), index, V).amin(-1)


def _leading_run(ok: Tensor) -> Tensor:
    """ℓ [B] = length of the leading run of True in ``ok`` [B, K] (index of the first rejection; an argmax, not
    a cumprod, which has no ONNX translation)."""
    stop = torch.cat([~ok, torch.ones_like(ok[:, :1])], 1).int()
    return stop.argmax(1)


def _emitted(drafts: Tensor, ell: Tensor, nxt: Tensor) -> Tensor:
    """tokens [B, K+1]: d_1..d_ℓ, then a', then −1."""
    K1 = drafts.shape[1] + 1
    i = torch.arange(K1, device=drafts.device)[None]
    padded = torch.cat([drafts, torch.full_like(nxt, -1)], 1)
    return torch.where(i < ell[:, None], padded, torch.where(i == ell[:, None], nxt, torch.full_like(padded, -1)))


def _proposal_rows(hidden: Tensor, ell: Tensor, packed: PackedLayout, levels: Tensor | None = None
                   ) -> tuple[Tensor, Tensor]:
    """Hidden rows [B, K, H] of the next drafts (proposal p* = max{p : λ_p ≤ ℓ}, realigned by ℓ − λ_p*) and
    their validity [B, K]. ``levels``: Λ already on the device (a CUDA/HIP graph capture allows no host copy)."""
    K1 = packed.block_len + 1
    B, _, H = hidden.shape
    lam = torch.tensor(packed.levels, device=hidden.device) if levels is None else levels
    p_star = (lam[None] <= ell[:, None]).sum(1)  # [B] proposal index (1-based)
    slot = (ell - lam[p_star - 1])[:, None] + torch.arange(1, K1, device=hidden.device)[None]  # [B, K]
    rows = K1 * p_star[:, None] + slot.clamp(max=packed.block_len)
    return hidden.gather(1, rows[..., None].expand(B, K1 - 1, H)), slot <= packed.block_len


def _commit(u, ell: Tensor, K1: int) -> tuple[Tensor, ...]:  # noqa: ANN001 - models.Update
    """The verify rows' k/v, and the conv window / delayed value after committing ℓ+1 tokens (gathers)."""
    conv, rho = u.committed(ell + 1, None)  # the anchor is always committed: ρ = ω_ℓ
    return u.k[:, :, :, :K1], u.v[:, :, :, :K1], conv, rho


def greedy_step(ids: Tensor, hidden: Tensor, head: nn.Module, u, draft_valid: Tensor,  # noqa: ANN001
                packed: PackedLayout, levels: Tensor | None = None) -> tuple[Tensor, ...]:
    """ids [B, N] (anchor, K drafts, masks), hidden [B, N, H] final-normed → ``io_table.ACCEPT_OUTPUTS["greedy"]``."""
    K1 = packed.block_len + 1
    best = first_argmax(head(hidden[:, :K1]))  # [B, K+1] AR argmax of the verify rows
    drafts = ids[:, 1:K1]
    ell = _leading_run((drafts == best[:, :-1]) & draft_valid)
    nxt = best.gather(1, ell[:, None])  # [B, 1] correction or bonus token
    rows, valid = _proposal_rows(hidden, ell, packed, levels)
    return (ell + 1, _emitted(drafts, ell, nxt), first_argmax(head(rows)), valid, *_commit(u, ell, K1))


def warp(z: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Probabilities [..., V] after temperature, top-k (0 = all; ties at the cut kept) and top-p (keep tokens
    until the mass before them reaches top_p), as ``runtime.sampling.warp`` does on the host.

    Two forms of the same cuts: a sort (onnxruntime's TopK is fast), and for the MLIR face thresholds found by
    bisection (:func:`warp_by_bisection`), because IREE lowers a sort to a quadratic loop: 76% of the demo's
    sampling step, 170 ms for [17, 4096] on the CPU."""
    if mlir_active():
        return warp_by_bisection(z, temperature, top_k, top_p)
    V = z.shape[-1]
    z = z / temperature
    ordered, order = torch.sort(z, dim=-1, descending=True)  # ties (measure zero) may order either way
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V)).clamp(1, V).long() - 1
    kth = ordered.index_select(-1, k.reshape(1))  # [..., 1] the k-th largest
    z = torch.where(z < kth, torch.full_like(z, float("-inf")), z)
    p = torch.softmax(z, -1)
    sorted_p = p.gather(-1, order)  # p is monotone in z, so `order` also sorts p
    keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < top_p  # a prefix of the sorted order, never empty
    # keep p >= the last kept probability (a threshold, not a scatter back: IREE's scatter lowering runs out of
    # memory on [B, K+1, V])
    cutoff = sorted_p.gather(-1, keep_sorted.sum(-1, keepdim=True) - 1)
    # top_p = 1 keeps everything, as on the host: the fp32 running mass reaches 1 before the last tokens
    p = torch.where((p >= cutoff) | (top_p >= 1.0), p, torch.zeros_like(p))
    return p / p.sum(-1, keepdim=True)


def _bisect(lo: Tensor, hi: Tensor, goes_up) -> Tensor:  # noqa: ANN001 - Tensor -> bool Tensor
    """``lo`` after :data:`BISECTION_STEPS` halvings of [lo, hi] (each [..., 1]), moving ``lo`` up to the
    midpoint where ``goes_up(mid)`` holds and ``hi`` down to it elsewhere (``goes_up`` must be monotone)."""
    for _ in range(BISECTION_STEPS):
        mid = lo + (hi - lo) * 0.5
        up = goes_up(mid)
        lo, hi = torch.where(up, mid, lo), torch.where(up, hi, mid)
    return lo


def warp_by_bisection(z: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """:func:`warp` without a sort: each cut is a threshold, found by bisection on the values.

    top-k keeps z >= the k-th largest value v_k: with ``lo`` kept where at least k values are >= it, v_k is
    never below ``lo`` and never above ``hi``; once no other value lies in [lo, hi], z >= lo is z >= v_k.
    top-p keeps p whose strictly larger mass g(p) = sum(p' > p) is below top_p (the sorted rule with ties at
    the cut kept): g is non-increasing, so the kept set is p > lo for the last ``lo`` with g(lo) >= top_p."""
    V = z.shape[-1]
    z = z / temperature
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V)).clamp(1, V).long()
    kth = _bisect(z.amin(-1, keepdim=True), z.amax(-1, keepdim=True),
                  lambda t: (z >= t).long().sum(-1, keepdim=True) >= k)
    z = torch.where(z < kth, torch.full_like(z, float("-inf")), z)
    p = torch.softmax(z, -1)
    lo = _bisect(torch.full_like(p[..., :1], -1.0), p.amax(-1, keepdim=True),
                 lambda t: torch.where(p > t, p, torch.zeros_like(p)).sum(-1, keepdim=True) >= top_p)
    p = torch.where((p > lo) | (top_p >= 1.0), p, torch.zeros_like(p))
    return p / p.sum(-1, keepdim=True)


def sample_step(ids: Tensor, hidden: Tensor, head: nn.Module, u, draft_valid: Tensor,  # noqa: ANN001
                draft_logits: Tensor, uniforms: Tensor, sampler: Tensor, packed: PackedLayout) -> tuple[Tensor, ...]:
    """Stochastic lossless / mixing acceptance in-graph. draft_logits ζ [B, K, V] (the logits the drafts came
    from; used when w < 1), uniforms [B, K+1] (K acceptance tests, then the correction/bonus draw), sampler
    [4] → ``io_table.ACCEPT_OUTPUTS["sample"]``."""
    K = packed.block_len
    K1 = K + 1
    temperature, top_k, top_p, w = sampler[0], sampler[1], sampler[2], sampler[3]
    z = head(hidden[:, :K1]).float()  # [B, K+1, V]
    target = torch.cat([w * z[:, :K] + (1 - w) * draft_logits.float(), z[:, K:]], 1)  # bonus row stays AR
    p = warp(target, temperature, top_k, top_p)  # [B, K+1, V]
    drafts = ids[:, 1:K1]
    p_draft = p[:, :K].gather(-1, drafts[..., None]).squeeze(-1)  # [B, K] p_{i-1}(d_i)
    ell = _leading_run((uniforms[:, :K] <= p_draft) & draft_valid)
    B, V = p.shape[0], p.shape[-1]
    row = p.gather(1, ell[:, None, None].expand(B, 1, V)).squeeze(1)  # p_ℓ [B, V]
    # residual of a Dirac draft at the first rejection: p_ℓ without d_{ℓ+1} (only if that draft exists)
    next_draft = torch.cat([drafts, torch.zeros_like(drafts[:, :1])], 1).gather(1, ell[:, None])  # [B, 1]
    exists = torch.cat([draft_valid, torch.zeros_like(draft_valid[:, :1])], 1).gather(1, ell[:, None])
    hit = (torch.arange(V, device=p.device)[None] == next_draft) & exists
    residual = torch.where(hit, torch.zeros_like(row), row)
    total = residual.sum(-1, keepdim=True)
    row = torch.where(total > 0, residual / torch.where(total > 0, total, torch.ones_like(total)), row)
    cdf = row.cumsum(-1)
    nxt = (cdf < uniforms[:, K:] * cdf[:, -1:]).sum(-1, keepdim=True).clamp(max=V - 1)  # inverse CDF [B, 1]
    rows, valid = _proposal_rows(hidden, ell, packed)
    zeta = head(rows)  # [B, K, V] logits of the next drafts
    return (ell + 1, _emitted(drafts, ell, nxt), first_argmax(zeta), valid, zeta, *_commit(u, ell, K1))
