"""``zaya-export bench``: AR decode speed of a backend against the eager torch model, in one process.

Both run the same weights, prompt and token count; the eager side is the reference model's own
prefill/decode (what a PyTorch user would run). Figures are printed, never asserted: timing belongs in
benchmarks, not in tests that flake.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from zaya_export.runtime.cost_curve import measure
from zaya_export.runtime.costmodel import auto_mode, needed_entries, predict
from zaya_export.runtime.roofline import roofline

from zaya_export.runtime.generate import generate, generate_greedy
from zaya_export.runtime.session import Session, artifact_model
from zaya_export.runtime.tidar import generate_tidar

from zaya_export.runtime.artifact import Artifact


def bench_prompt(artifact: Artifact, prompt_len: int) -> list[int]:
    """Real text when the artifact has a tokenizer (the start of a held-out stdlib file, so a trained model's
    drafts behave as in use), random ids otherwise."""
    if artifact.tokenizer is not None:
        from .corpus import Corpus, stdlib_corpus
        from zaya_export.runtime.tokenizer import load_tokenizer

        # the held-out file richest in methods: ordinary code, not a data table or a license header
        text = max((Corpus.read(f) for f in stdlib_corpus().heldout), key=lambda t: t.count("\n    def "))
        ids = load_tokenizer(artifact.tokenizer).encode(text).ids
        start = len(ids) // 2
        if len(ids) >= start + prompt_len and max(ids) < artifact.config.vocab_size:
            return ids[start : start + prompt_len]
    return np.random.default_rng(0).integers(5, artifact.config.vocab_size, prompt_len).tolist()


BACKENDS = ("ort", "iree", "iree-host", "torch")  # the CLI keeps a copy (cli.BENCH_BACKENDS), tested equal


def _session(artifact: Artifact, name: str, threads: int | None = None) -> Session:
    """``iree-host`` is IREE with the decode state in host buffers, copied in on every call: the baseline for
    keeping it on the device (``iree``)."""
    return Session.from_artifact(artifact, name.removesuffix("-host"), threads=threads,
                                 state_on_device=not name.endswith("-host"))


def eager_fits(artifact: Artifact) -> bool:
    """Whether the eager fp32 model fits beside the backends: a quarter of this machine's memory at most (the
    8B is 37 GB in fp32; its bench runs the artifact alone)."""
    import os

    import torch

    from zaya_export.models import ZayaForCausalLM

    with torch.device("meta"):
        params = sum(p.numel() for p in ZayaForCausalLM(artifact.config).parameters())
    return params * 4 <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 4


def bench_artifact(artifact: Artifact, backends: tuple[str, ...] = ("ort",), prompt_len: int = 128,
                   new_tokens: int = 128, repeats: int = 3, threads: int | None = None) -> dict[str, Any]:
    """Greedy AR decode of each backend and of the eager model (when it fits in memory), interleaved per
    repeat; best of ``repeats``; each rate also as a share of the machine's memory-bandwidth roofline."""
    eager = eager_fits(artifact)
    model = artifact_model(artifact, artifact.manifest.compute_dtype) if eager else None
    sessions = {b: _session(artifact, b, threads) for b in backends}
    prompt = bench_prompt(artifact, prompt_len)
    runs: dict[str, list[float]] = {**({"eager": []} if eager else {}), **{b: [] for b in backends}}
    ttft: dict[str, list[float]] = {name: [] for name in runs}
    tokens = {}
    if eager:
        generate_greedy(model, [prompt], 4)  # warm-up every side (allocators, kernels, IREE executables)
    for session in sessions.values():
        generate(session, [prompt], 4)
    for _ in range(repeats):
        for name in runs:
            result = (generate_greedy(model, [prompt], new_tokens) if name == "eager"
                      else generate(sessions[name], [prompt], new_tokens))
            runs[name].append(result.decode_tok_per_s)
            ttft[name].append(result.first_token_seconds)
            tokens[name] = result.tokens[0]
    best = {k: max(v) for k, v in runs.items()}
    reference = "eager" if eager else backends[0]
    return {"backends": list(backends), "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
            "decode_tok_per_s": {k: round(v, 2) for k, v in best.items()},
            "prefill_seconds": {k: round(min(v), 4) for k, v in ttft.items()},
            "speedup": {b: round(best[b] / best["eager"], 3) for b in backends} if eager else None,
            "eager": "measured" if eager else "skipped: the fp32 eager model needs over a quarter of this "
                                                "machine's memory",
            "same_tokens": all(tokens[b] == tokens[reference] for b in backends),
            "roofline": roofline(artifact, prompt_len + new_tokens // 2, best)}


def bench_matrix(artifact: Artifact, backends: tuple[str, ...], prompt_len: int = 128, new_tokens: int = 128,
                 repeats: int = 2, modes: tuple[str, ...] = ("ar", "tidar", "tidar-fused"), w: float = 1.0,
                 lookup: bool = True) -> dict[str, Any]:
    """Each mode on each backend in one process: tok/s, forwards, tokens per forward and the speedup over AR,
    greedy (w = 1 lossless, or logit mixing with w < 1), with the cost model's prediction; with ``torch`` (the
    eager model) among the backends every row also gets its speedup over eager AR. ``lookup``: TiDAR drafts
    with context-lookup continuations (``runtime.lookup``, what ``run`` does) or the drafter's alone.

    The runs are interleaved: each repeat runs every (backend, mode) once, and each row keeps its fastest repeat.
    A shared machine's speed drifts over seconds (this one ran the same ORT decode at 355 and at 1060 tok/s
    minutes apart); running one backend's modes, then the next backend's, would put that drift into the
    ratios, which interleaving spreads over every row alike."""
    sessions = {b: _session(artifact, b) for b in backends}
    prompt = bench_prompt(artifact, prompt_len)

    def once(backend: str, mode: str):  # noqa: ANN202
        if mode == "ar":
            return generate(sessions[backend], [prompt], new_tokens)
        return generate_tidar(sessions[backend], [prompt], new_tokens, w=w, fused=mode == "tidar-fused",
                              lookup=lookup)

    runs = {(b, m): [] for b in backends for m in modes}
    for key in runs:
        once(*key)  # warm-up: onnxruntime sessions, IREE executables, allocators
    for _ in range(repeats):
        for key in runs:
            runs[key].append(once(*key))
    result = {}
    for backend in backends:
        rows, acceptance = {}, {}
        for mode in modes:
            best = max(runs[backend, mode], key=lambda r: len(r.tokens[0]) / r.seconds)
            rows[mode] = {"tok_per_s": round(len(best.tokens[0]) / best.seconds, 2), "forwards": best.forwards,
                          "tokens_per_forward": round(best.tokens_per_forward, 3),
                          "mean_accepted": round(getattr(best, "mean_accepted", 0.0), 3)}
            if mode != "ar":
                acceptance[mode] = best.acceptance
        predicted = _with_predictions(artifact, sessions[backend], rows, acceptance, prompt_len, new_tokens, w)
        result[backend] = {"backend": backend, "lookup": lookup and w == 1.0, **predicted}
    eager_ar = result.get("torch", {}).get("modes", {}).get("ar", {}).get("tok_per_s")
    for res in result.values():
        for row in res["modes"].values():
            row["speedup_vs_eager_ar"] = round(row["tok_per_s"] / eager_ar, 3) if eager_ar else None
    return result


def _with_predictions(artifact: Artifact, session: Session, rows: dict[str, dict], acceptance: dict[str, list[int]],
                      prompt_len: int, new_tokens: int, w: float) -> dict[str, Any]:
    """One backend's result: its rows with the speedup over AR and the cost model's prediction from entry costs
    measured now and the acceptance measured in the rows' runs, and the mode ``run --mode auto`` would pick
    from the artifact's calibration."""
    base = rows.get("ar", {}).get("tok_per_s")
    for row in rows.values():
        row["speedup_vs_ar"] = round(row["tok_per_s"] / base, 3) if base else None
    curve = measure(session, context=prompt_len, repeats=10, prefill_counts=[prompt_len],
                    entries=needed_entries(True, w))
    predicted = predict(curve, acceptance, prompt_len, new_tokens, greedy=True, w=w)
    for mode, row in rows.items():
        if mode in predicted:
            row["predicted_tok_per_s"] = round(predicted[mode].tok_per_s, 2)
            row["prediction_error"] = round(predicted[mode].tok_per_s / row["tok_per_s"] - 1, 3)
    auto, _, why = auto_mode(session, artifact.calibration, prompt_len, new_tokens, True, w)
    return {"prompt_len": prompt_len, "new_tokens": new_tokens, "w": w,
            "levels": list(session.levels), "block_len": session.block_len, "modes": rows,
            "auto": {"chosen": auto, "reason": why}}


def bench_entries(artifact: Artifact, backends: tuple[str, ...], prompt_len: int = 64, repeats: int = 10
                  ) -> dict[str, Any]:
    """The measured cost curve of each backend: ms per call of every entry and of prefill at 1, 2, 4, … tokens,
    with ``prompt_len`` tokens in the cache (``runtime.cost_curve``)."""
    return {b: measure(_session(artifact, b), context=prompt_len, repeats=repeats).to_json() for b in backends}


def plot_entries(result: dict[str, Any], path: Path) -> None:
    """ms per call versus tokens in the call: prefill as a line per backend, the fixed entries as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (backend, curve) in enumerate(result.items()):
        color = f"C{i}"
        pre = [r for r in curve["rows"] if r["entry"] == "prefill"]
        ax.plot([r["tokens"] for r in pre], [r["ms"] for r in pre], "-", color=color, label=f"{backend} prefill")
        for r in curve["rows"]:
            if r["entry"] not in ("prefill", "commit"):
                ax.plot(r["tokens"], r["ms"], "o", color=color)
                ax.annotate(r["entry"], (r["tokens"], r["ms"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens in the call")
    ax.set_ylabel("ms per call (mean)")
    ax.set_title("Entry cost on this machine (batch 1)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)  # --plot may name a folder that does not exist yet
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    tmp.replace(path)
