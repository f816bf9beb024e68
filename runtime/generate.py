"""Autoregressive generation: the runtime loop over any :class:`Session` backend, and the eager reference
loop over the model's own stateful prefill/decode (the baseline every backend is compared with)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from zaya_export.models import ZayaForCausalLM, decode, prefill
from zaya_export.models.io_table import Name

from .sampling import Sampler, SamplerConfig
from .session import Session


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per row, the stop token included when one was hit
    forwards: int  # model invocations (prefill counts as one)
    seconds: float  # wall time of the whole loop
    first_token_seconds: float  # prefill alone

    @property
    def tokens_per_forward(self) -> float:
        return max(len(t) for t in self.tokens) / self.forwards if self.forwards else 0.0

    @property
    def decode_tok_per_s(self) -> float:
        """Tokens per second after the first (prefill) token, per row."""
        n = max(len(t) for t in self.tokens) - 1
        return n / (self.seconds - self.first_token_seconds) if n > 0 else 0.0


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """ids ``[B, T]`` and mask ``[B, T]`` (1 = token) with every prompt right-aligned."""
    T = max(len(p) for p in prompts)
    ids = np.full((len(prompts), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), T), dtype=np.int64)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = p
        mask[i, T - len(p) :] = 1
    return ids, mask


class _Stopper:
    """Collects emitted tokens per row and deactivates a row after its stop token."""

    def __init__(self, batch: int, stop_ids: list[int] | None) -> None:
        self.stop = np.array(stop_ids or [], dtype=np.int64)
        self.out: list[list[int]] = [[] for _ in range(batch)]
        self.active = np.ones(batch, bool)

    def emit_row(self, b: int, token: int) -> None:
        self.out[b].append(token)
        if token in self.stop:
            self.active[b] = False

    def emit(self, tokens: np.ndarray) -> bool:
        """Record one token per active row; True while any row is still active."""
        for i in np.flatnonzero(self.active):
            self.emit_row(i, int(tokens[i]))
        return bool(self.active.any())


def generate(session: Session, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int] | None = None,
             sampler: SamplerConfig = SamplerConfig()) -> GenerationResult:
    """Generate with ``session``'s backend: one prefill, then one decode per token."""
    start = time.perf_counter()
    choose = Sampler(sampler)
    ids, mask = left_pad(prompts, session.config.pad_token_id or 0)
    padded = bool((mask == 0).any())
    cache = session.new_cache(len(prompts), ids.shape[1] + max_new_tokens)
    out = session.run("prefill", cache.inputs(ids, mask if padded else None))
    cache.commit(out, mask=mask.astype(bool) if padded else None)
    first = time.perf_counter() - start
    forwards, stopper = 1, _Stopper(len(prompts), stop_ids)
    for step in range(max_new_tokens):
        token = choose(out[Name.LOGITS])
        if not stopper.emit(token) or step == max_new_tokens - 1:
            break
        out = session.run("decode", cache.inputs(token[:, None]))
        cache.commit(out)
        forwards += 1
    return GenerationResult(stopper.out, forwards, time.perf_counter() - start, first)


@torch.no_grad()
def generate_greedy(model: ZayaForCausalLM, prompts: list[list[int]], max_new_tokens: int,
                    stop_ids: list[int] | None = None) -> GenerationResult:
    """The eager reference: greedy decoding with the model's own prefill/decode over a DecodeState."""
    start = time.perf_counter()
    ids, mask = (torch.from_numpy(a) for a in left_pad(prompts, model.config.pad_token_id or 0))
    padded = bool((mask == 0).any())
    logits, state = prefill(model, ids, mask if padded else None, capacity=ids.shape[1] + max_new_tokens)
    first = time.perf_counter() - start
    forwards, stopper = 1, _Stopper(len(prompts), stop_ids)
    for step in range(max_new_tokens):
        token = logits.argmax(-1)
        if not stopper.emit(token.numpy()) or step == max_new_tokens - 1:
            break
        logits = decode(model, token, state)
        forwards += 1
    return GenerationResult(stopper.out, forwards, time.perf_counter() - start, first)
