"""The memory-bandwidth roofline of AR decode: the best tok/s a machine could reach if every decode step only
had to stream, once, the bytes it must read.

A decode step of a top-1 MoE reads every non-expert tensor it uses (attention projections, norms, router,
the LM head), one expert per layer (the chosen one; none for the skip class, so this is an upper bound on
bytes), one embedding row, and the KV cache of the context. The artifact's weight file says how many bytes
each of those is, whatever the storage (fp32, bf16, int8/int4 codes with their scales). Dividing the
machine's measured read bandwidth by that byte count gives the roofline; ``bench`` reports measured tok/s as
a percentage of it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from zaya_export.models.safetensors_header import read_header

from .artifact import Artifact

_PARTS = (".qweight", ".scales", ".zero_points")


@dataclass(frozen=True)
class DecodeBytes:
    weights: int  # bytes of weights one decode step reads
    kv_cache: int  # bytes of K/V read at the given context
    context: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache


def decode_bytes(artifact: Artifact, context: int) -> DecodeBytes:
    """Bytes a one-token decode step reads with ``context`` tokens in the cache (module docstring)."""
    config = artifact.config
    header = read_header(artifact.weights)
    head_quantized = any(n.startswith("lm_head.weight.") for n in header)
    weights = 0
    for name, info in header.items():
        size = info.end - info.start
        base = next((name[: -len(p)] for p in _PARTS if name.endswith(p)), name)
        if ".mlp.experts." in base:
            size //= config.num_experts  # the one chosen expert
        elif base == "model.embed_tokens.weight" and (head_quantized or not config.tie_word_embeddings):
            size //= config.vocab_size  # one row (the head is a tensor of its own)
        weights += size
    window = [min(context, config.sliding_window) if t.endswith("sliding") and config.sliding_window else context
              for t in config.layer_types]
    kv = sum(window) * 2 * config.num_key_value_heads * config.head_dim * 4  # fp32 K and V
    return DecodeBytes(weights=weights, kv_cache=kv, context=context)


def read_bandwidth(mbytes: int = 512, repeats: int = 20) -> float:
    """Measured read bandwidth of this machine in bytes/s: the best of ``repeats`` sums over a ``mbytes`` MB
    fp32 tensor, with torch's intra-op threads (the cores onnxruntime decodes with on a large model). Twenty
    repeats, not five: six ``bench`` runs of the int4 8B config in one session read 49–55 GB/s with five, and
    once 32 (it runs right after onnxruntime, whose pool threads may still spin on the same cores)."""
    x = torch.ones(mbytes * 2**20 // 4)
    x.sum()  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def roofline(artifact: Artifact, context: int, tok_per_s: dict[str, float], bandwidth: float | None = None
             ) -> dict[str, object]:
    """The roofline and each measured rate as a share of it."""
    bandwidth = bandwidth or read_bandwidth()
    need = decode_bytes(artifact, context)
    ceiling = bandwidth / need.total
    return {"bandwidth_gb_s": round(bandwidth / 1e9, 2), "bytes_per_token": need.total,
            "weight_bytes_per_token": need.weights, "kv_bytes_per_token": need.kv_cache, "context": context,
            "roofline_tok_per_s": round(ceiling, 2),
            "percent_of_roofline": {k: round(100 * v / ceiling, 1) for k, v in tok_per_s.items()}}
