"""TiDAR decoding, two-forward mode (``shared/docs/tidar-decoding.md`` §3, §5–§7).

Each step verifies the previous K drafts with one causal forward over ``[a, d_1..d_K]`` (the AR rows decide
what is emitted) and drafts the next K with one bidirectional forward over ``[a', MASK×K]``. Acceptance runs
on the host with explicit uniforms from the seeded generator, so every backend makes the same decisions.

Samplers (all with Dirac drafts, d_i = argmax of the draft logits ζ_i):

* greedy lossless (temperature 0): accept while d_i = argmax z_{i−1}; then a' = argmax z_ℓ. Output equals
  greedy AR token for token.
* stochastic lossless (temperature > 0): accept d_i with probability p_{i−1}(d_i); at the first rejection
  sample a' from p_ℓ with d_{ℓ+1} removed and renormalised; bonus a' ~ p_K when all K are accepted. Output is
  distributed exactly as AR sampling from warp(z).
* logit mixing (``w`` < 1): the K draft rows use z̃_{i−1} = w·z_{i−1} + (1−w)·ζ_i before warping (the bonus
  row stays pure AR); w = 1 is exactly lossless, lower w accepts more and is lossy.

State commit: the verify forward returns every candidate row; committing ℓ+1 of them (anchor + accepted
drafts) leaves the KV cache, conv window and delayed value exactly as AR decoding of those tokens would.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from zaya_export.models.io_table import Name

from .generate import GenerationResult, _Stopper, left_pad
from .lookup import with_lookup
from .sampling import Sampler, SamplerConfig, sample, warp
from .session import Session


@dataclass
class TidarResult(GenerationResult):
    steps: int = 0  # verify forwards
    acceptance: list[int] = field(default_factory=list)  # histogram: acceptance[ℓ] = steps that accepted ℓ drafts
    lengths: list[list[int]] = field(default_factory=list)  # per row, ℓ of each step in order

    @property
    def mean_accepted(self) -> float:
        total = sum(self.acceptance)
        return sum(i * n for i, n in enumerate(self.acceptance)) / total if total else 0.0


def mixed_targets(z: np.ndarray, zeta: np.ndarray, w: float) -> np.ndarray:
    """z̃ [B, K+1, V]: rows 0..K−1 mixed with the draft logits of the token they judge, row K pure AR."""
    if w == 1.0:
        return z
    out = z.astype(np.float64).copy()
    out[:, :-1] = w * z[:, :-1] + (1.0 - w) * zeta
    return out


def accept(z: np.ndarray, drafts: np.ndarray, zeta: np.ndarray, cfg: SamplerConfig, w: float,
           rng: np.random.Generator, valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Accepted count ℓ [B] and the correction/bonus token a' [B] for verify logits z [B, K+1, V].

    ``valid`` [B, K] marks drafts that exist (the packed step may lack a tail, §4.4): an invalid draft is
    rejected and, having probability 0 under its drafter, leaves the residual equal to p itself (exact)."""
    B, K1, V = z.shape
    K = K1 - 1
    valid = np.ones((B, K), bool) if valid is None else valid
    target = mixed_targets(z, zeta, w)
    if cfg.greedy:
        best = target.argmax(-1)  # [B, K+1]
        ok = (drafts == best[:, :K]) & valid
        ell = np.cumprod(ok, axis=1).sum(1)
        return ell, best[np.arange(B), ell]
    p = warp(target.reshape(B * K1, V), cfg).reshape(B, K1, V)
    u = rng.random((B, K))
    ok = (u <= np.take_along_axis(p[:, :K], drafts[..., None], -1)[..., 0]) & valid
    ell = np.cumprod(ok, axis=1).sum(1)
    row = p[np.arange(B), ell].copy()  # p_ℓ
    rejected = np.flatnonzero(ell < K)
    rejected = rejected[valid[rejected, ell[rejected]]]
    row[rejected, drafts[rejected, ell[rejected]]] = 0.0  # residual of a Dirac draft: p_ℓ without d_{ℓ+1}
    total = row.sum(-1, keepdims=True)
    row = np.where(total > 0, row / np.where(total > 0, total, 1.0), p[np.arange(B), ell])
    return ell, sample(row, rng.random(B))


def _draft(session: Session, cache, anchor: np.ndarray, K: int, mask_id: int):  # noqa: ANN001
    ids = np.concatenate([anchor[:, None], np.full((len(anchor), K), mask_id)], 1)
    logits = session.run("draft", cache.inputs(ids))[Name.LOGITS][:, 1:]  # [B, K, V]; slot 0 is discarded
    return logits.argmax(-1), logits


def _select_proposals(logits: np.ndarray, ell: np.ndarray, levels: tuple[int, ...], K: int):  # noqa: ANN202
    """Next drafts from a packed step (§4.4): proposal p* = max{p : λ_p ≤ ℓ}, realigned by s = ℓ − λ_p* so
    draft i comes from slot s+i (position b'+i); slots past K do not exist and are marked invalid."""
    lam = np.asarray(levels)
    p_star = (lam[None, :] <= ell[:, None]).sum(1)  # 1-based proposal index
    slot = (ell - lam[p_star - 1])[:, None] + np.arange(1, K + 1)[None]  # [B, K]
    valid = slot <= K
    rows = (K + 1) * p_star[:, None] + np.minimum(slot, K)
    zeta = np.take_along_axis(logits, rows[..., None], 1)  # [B, K, V]
    return zeta.argmax(-1), zeta, valid


def generate_tidar(session: Session, prompts: list[list[int]], max_new_tokens: int,
                   stop_ids: list[int] | None = None, sampler: SamplerConfig = SamplerConfig(),
                   w: float = 1.0, fused: bool = False, lookup: bool = True) -> TidarResult:
    """TiDAR decoding with ``session``'s entries: two forwards per step (``verify`` + ``draft``), or with
    ``fused`` one packed ``step`` forward that verifies and proposes drafts for every acceptance level.

    ``lookup`` (lossless samplers only, w = 1): where the context holds an earlier occurrence of its last
    tokens, the drafts are what followed it (:mod:`.lookup`); the output is the same, only acceptance changes.
    Mixing (w < 1) blends each target with the drafter's own logits, so it keeps the drafter's drafts."""
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"the mixing weight w must be in [0, 1], got {w}")
    lookup = lookup and w == 1.0
    start = time.perf_counter()
    K, mask_id = session.block_len, session.config.mask_token_id
    levels = session.levels
    rng = np.random.default_rng(sampler.seed)
    ids, mask = left_pad(prompts, session.config.pad_token_id or 0)
    padded = bool((mask == 0).any())
    # committed ≤ prompt + emitted + K accepted-but-truncated drafts, and a verify writes K+1 more
    cache = session.new_cache(len(prompts), ids.shape[1] + max_new_tokens + 2 * (K + 1))
    out = session.run("prefill", cache.inputs(ids, mask if padded else None))
    cache.commit(out, mask=mask.astype(bool) if padded else None)
    anchor = Sampler(sampler)(out[Name.LOGITS]) if sampler.greedy else sample(warp(out[Name.LOGITS], sampler),
                                                                              rng.random(len(prompts)))
    first = time.perf_counter() - start
    stopper = _Stopper(len(prompts), stop_ids)
    hist = [0] * (K + 1)
    lengths: list[list[int]] = [[] for _ in prompts]
    forwards, steps = 1, 0
    live = stopper.emit(anchor) and max_new_tokens > 1
    drafts, zeta = _draft(session, cache, anchor, K, mask_id)
    valid = np.ones(drafts.shape, bool)
    forwards += 1
    # per row: prompt, then what it emitted (a buffer, so a lookup does not convert a list every step)
    history = np.zeros((len(prompts), max(map(len, prompts)) + max_new_tokens), np.int64)
    filled = np.zeros(len(prompts), np.int64)
    for b, row in enumerate([*p, *out] for p, out in zip(prompts, stopper.out)):
        history[b, : len(row)], filled[b] = row, len(row)
    if lookup:
        drafts, valid = with_lookup(drafts, valid, [history[b, : filled[b]] for b in range(len(prompts))])
    # Fused steps run acceptance, commit and draft selection inside the graph: greedy lossless in
    # `step_greedy`; sampling (lossless or mixed) in `step_sample`, fed the same uniforms `accept` would draw.
    in_graph = fused and ((sampler.greedy and w == 1.0 and session.has("step_greedy"))
                          or (not sampler.greedy and session.has("step_sample")))
    params = np.array([sampler.temperature, sampler.top_k, sampler.top_p, w], np.float32)
    while live:
        block = np.concatenate([anchor[:, None], drafts], 1)
        if fused:
            block = np.concatenate([block, np.full((len(block), (K + 1) * len(levels)), mask_id)], 1)
        forwards, steps = forwards + 1, steps + 1
        if in_graph and sampler.greedy:
            out = session.run("step_greedy", {**cache.inputs(block), Name.DRAFT_VALID: valid})
        elif in_graph:
            uniforms = np.concatenate([rng.random((len(block), K)), rng.random(len(block))[:, None]], 1)
            out = session.run("step_sample", {**cache.inputs(block), Name.DRAFT_VALID: valid,
                                              Name.DRAFT_LOGITS: zeta.astype(np.float32),
                                              Name.UNIFORMS: uniforms.astype(np.float32), Name.SAMPLER: params})
        else:
            out = session.run("step" if fused else "verify", cache.inputs(block))
            ell, anchor = accept(out[Name.LOGITS][:, : K + 1], drafts, zeta, sampler, w, rng, valid)
        if in_graph:
            ell = out[Name.COUNT] - 1
            anchor = out[Name.TOKENS][np.arange(len(ell)), ell]
        active = stopper.active.copy()
        cache.commit(out, counts=np.where(active, ell + 1, 0))
        for b in np.flatnonzero(active):
            hist[ell[b]] += 1
            lengths[b].append(int(ell[b]))
            for token in [*drafts[b, : ell[b]].tolist(), int(anchor[b])]:
                if not stopper.active[b] or len(stopper.out[b]) >= max_new_tokens:
                    break
                stopper.emit_row(b, token)
                history[b, filled[b]], filled[b] = token, filled[b] + 1
        stopper.active &= np.array([len(t) < max_new_tokens for t in stopper.out])
        live = bool(stopper.active.any())
        if live and in_graph:
            drafts, valid = out[Name.NEXT_DRAFTS], out[Name.NEXT_VALID]
            zeta = out.get(Name.NEXT_DRAFT_LOGITS, zeta)
        elif live and fused:
            drafts, zeta, valid = _select_proposals(out[Name.LOGITS], ell, levels, K)
        elif live:
            drafts, zeta = _draft(session, cache, anchor, K, mask_id)
            forwards += 1
        if live and lookup:
            drafts, valid = with_lookup(drafts, valid, [history[b, : filled[b]] for b in range(len(prompts))],
                                        np.flatnonzero(stopper.active))
    return TidarResult(stopper.out, forwards, time.perf_counter() - start, first, steps=steps, acceptance=hist,
                       lengths=lengths)
