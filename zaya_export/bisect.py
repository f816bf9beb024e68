"""``validate --bisect``: locate where two backends part ways.

Runs the artifact's debug entry ``layers`` (a causal forward that also returns the residual stream after every
layer's attention and MoE) on both backends with the same inputs, and reports the first point whose
difference exceeds the tolerance, named by layer and fused op. Differences grow through the stack, so the
first divergent point is where to look; relative error is used because the residual stream grows with depth.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from zaya_export.runtime.session import Session

from zaya_export.models.entries import PROBE, example_feed
from zaya_export.models.io_table import Name

_REGIONS = ("attention (zaya.cca + zaya.block_attention)", "MoE (zaya.moe_top1)")


def bisect(a: Session, b: Session, model, rtol: float = 1e-4, shapes: tuple = ((2, 9, 12), (1, 1, 0))  # noqa: ANN001
           ) -> dict[str, Any]:
    """Compare ``a`` and ``b`` point by point; ``model`` (the eager reference) only makes the random inputs."""
    if not (a.has(PROBE.name) and b.has(PROBE.name)):
        raise KeyError(f"both backends need the debug entry {PROBE.name!r} (re-export with this zaya-export)")
    points = []
    for B, T, S in shapes:
        inputs = example_feed(model, B, T, S, seed=99 + T + S)
        got, want = a.run(PROBE.name, inputs), b.run(PROBE.name, inputs)
        rows = inputs[Name.INPUT_MASK]  # real tokens only: padded rows carry no meaning
        for i in range(got[Name.HIDDEN].shape[0]):
            x, y = got[Name.HIDDEN][i][rows], want[Name.HIDDEN][i][rows]
            err = float(np.abs(x - y).max() / max(1.0, float(np.abs(y).max())))
            points.append({"shape": (B, T, S), "layer": i // 2, "region": _REGIONS[i % 2], "rel_err": err})
        x, y = got[Name.LOGITS][rows], want[Name.LOGITS][rows]
        points.append({"shape": (B, T, S), "layer": None, "region": "final norm + lm_head",
                       "rel_err": float(np.abs(x - y).max() / max(1.0, float(np.abs(y).max())))})
    first = next((p for p in points if p["rel_err"] > rtol), None)
    worst = max(points, key=lambda p: p["rel_err"])
    return {"backends": [a.backend.name, b.backend.name], "rtol": rtol, "diverged": first is not None,
            "first": first, "worst": worst, "points": points}


def describe(result: dict[str, Any]) -> str:
    a, b = result["backends"]
    if not result["diverged"]:
        w = result["worst"]
        return f"bisect {a} vs {b}: no divergence above {result['rtol']:.0e} (worst {w['rel_err']:.1e})"
    f = result["first"]
    where = f"layer {f['layer']} {f['region']}" if f["layer"] is not None else f["region"]
    return (f"bisect {a} vs {b}: first divergence at {where}, relative error {f['rel_err']:.2e} "
            f"(> {result['rtol']:.0e}) on batch/new/cached {f['shape']}")
