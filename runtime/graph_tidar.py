"""Greedy lossless fused TiDAR on a GPU, one packed step (verify + proposals, acceptance, commit, next drafts)
per CUDA/HIP graph launch.

The same static-buffer idea as ``graph_decode.py``: every step reads the whole fixed-capacity cache (empty slots
invalid) and runs the packed forward of (K+1)(1+P) tokens with the in-graph greedy acceptance
(``models.ingraph_step.greedy_step``), commits ℓ+1 tokens through the one commit rule at lengths held on the
device, and writes the next anchor and drafts into its own input buffers. What each step emitted goes into a
device buffer indexed by a device step counter, so the host reads the tokens once, at the end. Greedy lossless
acceptance makes the output exactly greedy AR's (the tests check it on the CPU with the reference ops and, under
Triton's interpreter, with the Triton MoE, CCA, attention and residual+norm kernels in the packed step).
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import ExitStack

import torch
from torch import Tensor

from zaya_export.models import ZayaForCausalLM
from zaya_export.models.decoding import prefill
from zaya_export.models.entries import default_levels
from zaya_export.models.ingraph_step import greedy_step
from zaya_export.models.layout import BIDIRECTIONAL, Readout
from zaya_export.models.packed import PackedLayout, Segments, packed_layout
from zaya_export.models.state import Past, write_rows

from .graph_decode import capture_step, kernel_scope
from .tidar import TidarResult


def _on(packed: PackedLayout, device: torch.device) -> PackedLayout:
    """The layout with its static tensors on ``device`` (no host copy inside a captured step)."""
    seg = packed.segments
    return dataclasses.replace(packed, offsets=packed.offsets.to(device), template=packed.template.to(device),
                               segments=Segments(seg.conv_index.to(device), seg.value_index.to(device)))


class GraphTidar:
    """Prefill and first draft eagerly, then :meth:`step` runs one fused greedy TiDAR step (a graph replay on
    a GPU); :meth:`tokens` reads what was emitted."""

    def __init__(self, model: ZayaForCausalLM, block_len: int | None = None, levels: tuple[int, ...] | None = None,
                 kernels_on: bool = True, graph: bool | None = None) -> None:
        self.model, self.kernels_on = model, kernels_on
        cfg = model.config
        self.K = block_len or cfg.diffusion_block_len
        self.device = next(model.parameters()).device
        self.packed = _on(packed_layout(self.K, tuple(levels or default_levels(self.K)), cfg.conv_history),
                          self.device)
        self.levels = torch.tensor(self.packed.levels, device=self.device)
        self.graph_on = self.device.type == "cuda" if graph is None else graph
        self.graph: torch.cuda.CUDAGraph | None = None

    def _scope(self) -> ExitStack:
        return kernel_scope(self.model, self.kernels_on)

    @torch.no_grad()
    def prefill(self, ids: Tensor, mask: Tensor | None, max_new_tokens: int) -> None:
        """Prompt ``[B, T]`` → the first token (anchor) and the first K drafts; buffers for the steps."""
        B, T, K = *ids.shape, self.K
        mask_id = self.model.config.mask_token_id
        max_steps = max_new_tokens  # every step emits at least one token
        with self._scope():
            logits, self.state = prefill(self.model, ids, mask, capacity=T + max_new_tokens + 2 * (K + 1))
            self.anchor = logits.argmax(-1)  # [B]
            block = torch.cat([self.anchor[:, None], torch.full((B, K), mask_id, device=self.device)], 1)
            draft, _ = self.model.step(block, self.state.past(), layout=BIDIRECTIONAL)
        self.drafts = draft[:, 1:].argmax(-1)  # [B, K]
        self.valid = torch.ones(B, K, dtype=torch.bool, device=self.device)
        self.masks = torch.full((B, (K + 1) * len(self.packed.levels)), mask_id, device=self.device)
        self.lengths = torch.full((B,), self.state.length, dtype=torch.long, device=self.device)
        self.fresh = torch.ones(B, K + 1, dtype=torch.bool, device=self.device)
        self.emitted = torch.full((B, max_steps, K + 1), -1, dtype=torch.long, device=self.device)
        self.step_index = torch.zeros(1, dtype=torch.long, device=self.device)
        self.produced = torch.ones(B, dtype=torch.long, device=self.device)  # tokens emitted per row so far
        self.limit = max_new_tokens
        self.first = self.anchor.clone()
        self.steps = 0
        self.graph = None
        if self.graph_on:
            self.graph = capture_step(self._step, self._buffers, self._scope)

    def _buffers(self) -> list[Tensor]:
        s = self.state
        return [s.k, s.v, s.valid, s.conv, s.rho, self.anchor, self.drafts, self.valid, self.lengths, self.emitted,
                self.step_index, self.produced]

    def _step(self) -> None:
        s = self.state
        ids = torch.cat([self.anchor[:, None], self.drafts, self.masks], 1)  # [B, (K+1)(1+P)]
        hidden, u = self.model.step(ids, Past(s.k, s.v, s.valid, s.conv, s.rho), layout=self.packed,
                                    readout=Readout.HIDDEN)
        count, tokens, drafts, valid, k, v, conv, rho = greedy_step(ids, hidden, self.model.lm_head, u, self.valid,
                                                                    self.packed, self.levels)
        # a row that has all its tokens commits nothing more (as the host loop's stopper), so no row can outgrow
        # the buffers while another still decodes
        active = self.produced < self.limit  # [B]
        count = torch.where(active, count, torch.zeros_like(count))
        write_rows(s.k, s.v, s.valid, self.lengths, count, self.fresh, k, v)
        s.conv.copy_(torch.where(active[None, :, None, None], conv, s.conv))
        s.rho.copy_(torch.where(active[None, :, None], rho, s.rho))
        self.lengths.add_(count)
        self.produced.add_(count)
        self.anchor.copy_(tokens.gather(1, (count - 1).clamp(min=0)[:, None]).squeeze(1))
        self.drafts.copy_(drafts)
        self.valid.copy_(valid)
        tokens = torch.where(active[:, None], tokens, torch.full_like(tokens, -1))
        self.emitted.index_copy_(1, self.step_index, tokens[:, None])
        self.step_index.add_(1)

    @torch.no_grad()
    def step(self) -> None:
        """One fused TiDAR step (no host synchronisation)."""
        if self.steps >= self.emitted.shape[1]:
            raise ValueError(f"no room for step {self.steps + 1} (sized for {self.emitted.shape[1]})")
        if self.graph is not None:
            self.graph.replay()
        else:
            with self._scope():
                self._step()
        self.steps += 1

    def tokens(self, max_new_tokens: int) -> list[list[int]]:
        """Per row: the first token then every step's emitted tokens, cut at ``max_new_tokens``."""
        emitted = self.emitted[:, : self.steps].reshape(len(self.first), -1).tolist()
        return [[first, *(t for t in row if t >= 0)][:max_new_tokens] for first, row in zip(self.first.tolist(),
                                                                                            emitted)]


def generate_tidar_static(model: ZayaForCausalLM, ids: Tensor, max_new_tokens: int, mask: Tensor | None = None,
                          kernels_on: bool = True, graph: bool | None = None, block_len: int | None = None,
                          levels: tuple[int, ...] | None = None, stop_ids: list[int] | None = None) -> TidarResult:
    """Greedy fused TiDAR (forwards: prefill, first draft, one per step). Steps run until every row has
    ``max_new_tokens`` (the host checks every few launches); rows are cut after their first stop token."""
    start = time.perf_counter()
    run = GraphTidar(model, block_len, levels, kernels_on, graph)
    run.prefill(ids, mask, max_new_tokens)
    sync = torch.cuda.synchronize if run.device.type == "cuda" else (lambda: None)
    sync()
    first_seconds = time.perf_counter() - start
    while run.steps < max_new_tokens - 1 and int(run.produced.min()) < max_new_tokens:
        for _ in range(min(4, max_new_tokens - 1 - run.steps)):  # a few launches per host check
            run.step()
    tokens = run.tokens(max_new_tokens)
    seconds = time.perf_counter() - start
    per_step = (run.emitted[:, : run.steps] >= 0).sum(-1).tolist()  # [B, steps] tokens emitted = ℓ + 1
    lengths = [[n - 1 for n in row if n > 0] for row in per_step]
    hist = [0] * (run.K + 1)
    for row in lengths:
        for ell in row:
            hist[ell] += 1
    stops = set(stop_ids or ())
    tokens = [row[: next((i + 1 for i, t in enumerate(row) if t in stops), len(row))] for row in tokens]
    return TidarResult(tokens, 2 + run.steps, seconds, first_seconds, steps=run.steps, acceptance=hist,
                       lengths=lengths)
