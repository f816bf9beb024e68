"""Token choice from logits: greedy, or temperature / top-k / top-p sampling driven by explicit uniforms.

Randomness never comes from inside a graph or a backend: the runtime draws one uniform per row and step from
a seeded generator and samples by inverse CDF, so every backend makes the same choice for the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplerConfig:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def warp(logits: np.ndarray, cfg: SamplerConfig) -> np.ndarray:
    """Probabilities ``[B, V]`` after temperature, top-k and top-p (ties at the cut are kept)."""
    z = logits.astype(np.float64) / cfg.temperature
    if cfg.top_k and cfg.top_k < z.shape[-1]:
        kth = np.partition(z, -cfg.top_k, axis=-1)[:, -cfg.top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if cfg.top_p < 1.0:
        sorted_p = -np.sort(-p, axis=-1)
        kept = (np.cumsum(sorted_p, -1) - sorted_p < cfg.top_p).sum(-1, keepdims=True)  # until the mass reaches top_p
        cutoff = np.take_along_axis(sorted_p, kept - 1, -1)  # the last kept probability: ties with it stay too
        p = np.where(p >= cutoff, p, 0.0)
        p /= p.sum(-1, keepdims=True)
    return p


def sample(probs: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Inverse-CDF draw per row: the first token whose cumulative probability exceeds u."""
    cdf = np.cumsum(probs, -1)
    idx = (cdf < (uniforms[:, None] * cdf[:, -1:])).sum(-1)
    return np.minimum(idx, probs.shape[-1] - 1)


class Sampler:
    def __init__(self, cfg: SamplerConfig) -> None:
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        if self.cfg.greedy:
            return logits.argmax(-1)
        return sample(warp(logits, self.cfg), self.rng.random(logits.shape[0]))
