"""Autoregressive generation over the eager reference model (greedy; batched with left padding)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from zaya_export.models import ZayaForCausalLM, decode, prefill


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per row, stop token included when one was hit
    forwards: int  # model invocations (prefill counts as one)
    seconds: float  # wall time of the whole loop
    first_token_seconds: float  # prefill alone
    stats: dict = field(default_factory=dict)

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_forward(self) -> float:
        return max(len(t) for t in self.tokens) / self.forwards if self.forwards else 0.0


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids ``[B, T]`` and mask ``[B, T]`` (1 = token) with every prompt right-aligned."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, T - len(p) :] = 1
    return ids, mask


@torch.no_grad()
def generate_greedy(model: ZayaForCausalLM, prompts: list[list[int]], max_new_tokens: int,
                    stop_ids: list[int] | None = None) -> GenerationResult:
    """Greedy decoding with the stateful eager model; a row stops after emitting a stop token."""
    stop = torch.tensor(stop_ids or [], dtype=torch.long)
    start = time.perf_counter()
    ids, mask = left_pad(prompts, model.config.pad_token_id or 0)
    padded = bool((mask == 0).any())
    logits, state = prefill(model, ids, mask if padded else None, capacity=ids.shape[1] + max_new_tokens)
    first = time.perf_counter() - start
    forwards = 1
    out: list[list[int]] = [[] for _ in prompts]
    active = torch.ones(len(prompts), dtype=torch.bool)
    for step in range(max_new_tokens):
        token = logits.argmax(-1)  # [B]
        for i in active.nonzero().flatten().tolist():
            out[i].append(int(token[i]))
        active &= ~torch.isin(token, stop)
        if step == max_new_tokens - 1 or not active.any():
            break
        logits = decode(model, token, state)
        forwards += 1
    return GenerationResult(out, forwards, time.perf_counter() - start, first)
