"""``zaya-export bench``: AR decode speed of a backend against the eager torch model, in one process.

Both run the same weights, prompt and token count; the eager side is the reference model's own
prefill/decode (what a PyTorch user would run). Figures are printed, never asserted: timing belongs in
benchmarks, not in tests that flake.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from zaya_export.runtime.generate import generate, generate_greedy
from zaya_export.runtime.session import Session, _model_from_artifact

from .artifact import Artifact


def bench_artifact(artifact: Artifact, backend: str = "ort", prompt_len: int = 128, new_tokens: int = 128,
                   repeats: int = 3, threads: int | None = None) -> dict[str, Any]:
    model = _model_from_artifact(artifact, artifact.manifest.get("compute_dtype"))
    session = Session(artifact.root, backend=backend, threads=threads)
    prompt = np.random.default_rng(0).integers(5, artifact.config.vocab_size, prompt_len).tolist()
    runs: dict[str, list[float]] = {"eager": [], backend: []}
    ttft: dict[str, list[float]] = {"eager": [], backend: []}
    tokens = {}
    generate(session, [prompt], 4)  # warm-up both sides (ORT allocators, torch kernels)
    generate_greedy(model, [prompt], 4)
    for _ in range(repeats):
        for name in runs:
            result = (generate_greedy(model, [prompt], new_tokens) if name == "eager"
                      else generate(session, [prompt], new_tokens))
            runs[name].append(result.decode_tok_per_s)
            ttft[name].append(result.first_token_seconds)
            tokens[name] = result.tokens[0]
    best = {k: max(v) for k, v in runs.items()}
    return {"backend": backend, "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
            "decode_tok_per_s": {k: round(v, 2) for k, v in best.items()},
            "prefill_seconds": {k: round(min(v), 4) for k, v in ttft.items()},
            "speedup": round(best[backend] / best["eager"], 3), "same_tokens": tokens["eager"] == tokens[backend]}
