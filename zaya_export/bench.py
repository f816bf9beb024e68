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
from zaya_export.runtime.tidar import generate_tidar

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


def bench_modes(artifact: Artifact, backend: str = "ort", prompt_len: int = 128, new_tokens: int = 128,
                repeats: int = 2, modes: tuple[str, ...] = ("ar", "tidar", "tidar-fused"), w: float = 1.0
                ) -> dict[str, Any]:
    """AR vs TiDAR (two-forward) vs TiDAR fused on one backend: tok/s, forwards, tokens per forward and the
    speedup over AR, greedy (w = 1 lossless, or logit mixing with w < 1)."""
    session = Session(artifact.root, backend=backend)
    prompt = np.random.default_rng(0).integers(5, artifact.config.vocab_size, prompt_len).tolist()

    def once(mode: str):  # noqa: ANN202
        if mode == "ar":
            return generate(session, [prompt], new_tokens)
        return generate_tidar(session, [prompt], new_tokens, w=w, fused=mode == "tidar-fused")

    rows = {}
    for mode in modes:
        once(mode)  # warm-up
        best = max((once(mode) for _ in range(repeats)), key=lambda r: len(r.tokens[0]) / r.seconds)
        rows[mode] = {"tok_per_s": round(len(best.tokens[0]) / best.seconds, 2), "forwards": best.forwards,
                      "tokens_per_forward": round(best.tokens_per_forward, 3),
                      "mean_accepted": round(getattr(best, "mean_accepted", 0.0), 3)}
    base = rows.get("ar", {}).get("tok_per_s")
    for row in rows.values():
        row["speedup_vs_ar"] = round(row["tok_per_s"] / base, 3) if base else None
    return {"backend": backend, "prompt_len": prompt_len, "new_tokens": new_tokens, "w": w,
            "levels": list(session.levels), "block_len": session.block_len, "modes": rows}
