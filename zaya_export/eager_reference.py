"""The eager model's side of ``validate``, computed once per run and shared by every backend checked.

The eager model is the slow side of every comparison (plain torch ops, one Python call per layer), and what
it computes depends only on the weights and the inputs, never on the backend under test. ``validate
--backend ort,iree`` used to run it once per backend; with one :class:`EagerReference` the second backend
reuses every entry output, greedy sequence and seeded TiDAR run of the first.

Only deterministic runs are kept: entry outputs keyed by the exact input bytes, generations keyed by prompt,
length, stop ids and sampler. Runs under a routing tape (``_explain_by_flip`` forces decisions) go to
:attr:`backend` directly and are never stored.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from zaya_export.runtime.generate import generate_greedy
from zaya_export.runtime.sampling import SamplerConfig
from zaya_export.runtime.session import Session, TorchBackend
from zaya_export.runtime.tidar import TidarResult, generate_tidar


def _key(inputs: dict[str, np.ndarray]) -> tuple:
    """Inputs by name, shape, dtype and a digest of their bytes (arrays are not hashable)."""
    return tuple((n, a.shape, a.dtype.str, hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16)
                  .hexdigest()) for n, a in sorted(inputs.items()))


class EagerReference:
    """Memoized eager runs of ``model`` (the reference every backend is compared with)."""

    def __init__(self, model: Any, block_len: int | None = None,  # ZayaForCausalLM
                 levels: tuple[int, ...] | None = None) -> None:
        """``block_len``/``levels``: the packed step of the artifact being checked (an export with ``--levels``
        has other proposal segments than the default step; default: the model's own)."""
        self.model, self.levels = model, levels
        self.backend = TorchBackend(model, block_len, levels)
        self._sessions: dict[int, Session] = {}
        self._runs: dict[tuple, dict[str, np.ndarray]] = {}
        self._greedy: dict[tuple, list[int]] = {}
        self._tidar: dict[tuple, TidarResult] = {}

    def run(self, entry: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One entry point's outputs on ``inputs``. Callers must not modify the returned arrays."""
        key = (entry, _key(inputs))
        if key not in self._runs:
            self._runs[key] = self.backend.run(entry, inputs)
        return self._runs[key]

    def greedy(self, prompt: list[int], max_new_tokens: int, stop: list[int] | None) -> list[int]:
        """Greedy AR tokens after ``prompt`` (a copy: the caller may keep or change it)."""
        key = (tuple(prompt), max_new_tokens, tuple(stop or ()))
        if key not in self._greedy:
            self._greedy[key] = generate_greedy(self.model, [prompt], max_new_tokens, stop).tokens[0]
        return list(self._greedy[key])

    def tidar(self, block_len: int, prompt: list[int], max_new_tokens: int, stop: list[int] | None,
              sampler: SamplerConfig, fused: bool) -> TidarResult:
        """A seeded TiDAR generation of the eager model with ``block_len`` drafts per step."""
        key = (block_len, tuple(prompt), max_new_tokens, tuple(stop or ()), sampler, fused)
        if key not in self._tidar:
            if block_len not in self._sessions:
                self._sessions[block_len] = Session.from_model(self.model, block_len, self.levels)
            self._tidar[key] = generate_tidar(self._sessions[block_len], [prompt], max_new_tokens, stop, sampler,
                                              fused=fused)
        return self._tidar[key]
