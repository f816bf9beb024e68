"""``validate`` for artifacts whose eager reference does not fit in memory (the 8B: 37 GB in fp32).

What is compared: the artifact's ``layers`` entry (the residual stream after every attention and MoE, and
the logits of every position) against the unquantized source checkpoint's eager model run with one layer's
matrices in memory at a time (``models/layer_streaming``), on ``windows`` windows of held-out text (empty
cache). Reported: each residual-stream point's error relative to its own scale (where an error starts, and
how it grows with depth) and the logit distribution metrics of ``quant_budget`` (mean KL, top-1 without and
with near ties, perplexity ratio), gated by the scheme's budget (or, for float weights, by the dtype's
tolerance). Greedy generation and the per-shape entry checks of the ordinary ``validate`` are left out: they
need the eager model resident, and the ``layers`` entry shares the graphs' code paths (fused ops, MoE
dispatch, quantized matmuls) with prefill.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from zaya_export.errors import ZayaError
from zaya_export.models.io_table import Name
from zaya_export.models.layer_streaming import layer_streamed_model
from zaya_export.models.streaming import StreamedCheckpoint
from zaya_export.runtime.artifact import Artifact
from zaya_export.runtime.session import Session

from .eager_reference import EagerReference
from .quant_budget import BUDGETS, Budget, distribution_metrics, heldout_windows, layers_feed


def validate_layerwise(artifact: Artifact, checkpoint: Path | None = None, backend: str = "ort",
                       windows: int = 2, length: int = 64, tolerances: dict | None = None) -> dict[str, Any]:
    """The module docstring's comparison; returns a report with ``ok``."""
    source_path = checkpoint or Path(artifact.manifest.source)
    if not (source_path / "config.json").is_file():
        raise ZayaError(f"{artifact.root}: the layer-by-layer check compares with the source checkpoint, which is "
                        f"not at {source_path}; pass --checkpoint")
    session = Session.from_artifact(artifact, backend)
    if not session.has("layers"):
        raise ZayaError(f"{artifact.root}: no `layers` entry for {backend}, which the layer-by-layer check runs")
    model = layer_streamed_model(StreamedCheckpoint(source_path))
    ids, origin = heldout_windows(model, artifact.tokenizer, windows,
                                  min(length, model.config.max_position_embeddings))
    feed = layers_feed(model, ids)
    got = session.run("layers", feed)
    with torch.no_grad():
        want = EagerReference(model).run("layers", feed)
    scheme = artifact.manifest.scheme
    if scheme is not None:
        budget = BUDGETS[scheme.bits]
    else:
        tol = (tolerances or {})[artifact.manifest.dtype]
        budget = Budget(kl_mean=tol.kl, top1=tol.top1, ppl_ratio=1.0 + tol.logits_rtol)
    points = []
    for j, (a, b) in enumerate(zip(got[Name.HIDDEN].astype(np.float64), want[Name.HIDDEN].astype(np.float64))):
        scale = float(np.abs(b).max())
        err = float(np.abs(a - b).max()) if np.isfinite(a).all() else float("inf")
        points.append({"layer": j // 2, "after": "attention" if j % 2 == 0 else "moe",
                       "max_rel": err / scale if scale else err})
    metrics = distribution_metrics(got[Name.LOGITS], want[Name.LOGITS], ids, budget)
    return {"backend": backend, "reference": "eager, one layer at a time", "mode": "layerwise",
            "scheme": scheme.name if scheme else None, "dtype": artifact.manifest.dtype,
            "checkpoint": str(source_path), "text": origin, "windows": int(ids.shape[0]),
            "window_tokens": int(ids.shape[1]), "residual_stream": points, **metrics}


def layerwise_markdown(r: dict[str, Any]) -> str:
    lim = r["budget"]
    worst = max(r["residual_stream"], key=lambda p: p["max_rel"])
    lines = [f"# Validation (layer by layer): {r['backend']} vs the source's eager model, one layer in memory at a "
             f"time ({r['scheme'] or r['dtype']})", "", f"Result: **{'PASS' if r['ok'] else 'FAIL'}**", "",
             f"Teacher-forced on {r['windows']}×{r['window_tokens']} tokens of {r['text']}.", "",
             "| metric | measured | limit |", "|---|---|---|",
             f"| mean KL(source ‖ artifact) | {r['kl_mean']:.2e} | ≤ {lim['kl_mean']:.0e} |",
             f"| top-1 (all positions {r['top1_all']:.4f}, {r['near_ties']} near ties left out) | {r['top1']:.4f} | "
             f"≥ {lim['top1']} |",
             f"| perplexity ratio | {r['ppl_ratio']:.4f} | ≤ {lim['ppl_ratio']} |", "",
             f"Residual stream, error relative to its scale: first layer {r['residual_stream'][0]['max_rel']:.2e}, "
             f"last {r['residual_stream'][-1]['max_rel']:.2e}, worst {worst['max_rel']:.2e} (layer {worst['layer']} "
             f"after {worst['after']})."]
    return "\n".join(lines) + "\n"
