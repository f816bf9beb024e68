"""Checks that two computations of one model agree: scale-aware numbers, routing compared on its own.

A probe check must never refuse a correct rewrite and must still catch a wrong one, on any checkpoint. Two
things make a fixed absolute tolerance wrong for that:

* **Scale.** float32 rounding grows with the magnitude of what is computed: a model whose logits reach
  |z| ≈ 90 differs from itself by ~1e-3 after reordering a sum. Every output tensor is therefore compared
  relative to its own scale (its largest magnitude), with a tolerance keyed by the compute dtype.
* **Routing.** The top-1 expert choice is an argmax; at a near tie, rounding picks either class and the
  token's output moves far more than rounding. The candidate is therefore run with the reference's routing
  decisions replayed (``kernels.routing``), so the numbers stay comparable, and the decisions it would
  have made are compared separately: a flip whose reference margin is within the dtype's tie tolerance is
  reported as a near tie; a flip with a clear margin is an error (a wrong expert).

Non-finite values never compare equal to anything (a NaN in either side fails the check).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from zaya_export.kernels.routing import Flip, Route, RoutingTape, routing_flips, routing_tape


@dataclass(frozen=True)
class ProbeTolerance:
    """``rtol``: max |got − want| allowed per output, as a fraction of that output's largest |want|;
    ``tie``: a routing flip whose reference margin (biased probability of the winner minus the runner-up)
    is at most this is a near tie, not an error."""

    rtol: float
    tie: float


# Compute dtype → tolerance. fp32: 5e-4 of the output's scale, 50x above reordering noise (≲1e-5 measured on
# models with |logits| ≈ 100) and 300x below the smallest real rewrite error the tests plant (one wrong row
# of the packed mask template: 0.15).
PROBE_TOLERANCE = {
    torch.float32: ProbeTolerance(rtol=5e-4, tie=1e-4),
    torch.float16: ProbeTolerance(rtol=2e-2, tie=1e-2),
    torch.bfloat16: ProbeTolerance(rtol=5e-2, tie=4e-2),
}


def tolerance_for(dtype: torch.dtype) -> ProbeTolerance:
    return PROBE_TOLERANCE.get(dtype, PROBE_TOLERANCE[torch.float32])


@dataclass
class Comparison:
    """How far ``got`` is from ``want``: per output, the max abs error and that error relative to the
    output's scale; and the routing flips of the replayed run."""

    max_abs: float = 0.0
    max_rel: float = 0.0
    worst: str = ""  # name (or index) of the output with the largest relative error
    flips: list[Flip] = field(default_factory=list)

    def near_ties(self, tol: ProbeTolerance) -> list[Flip]:
        return [f for f in self.flips if f.margin <= tol.tie]

    def wrong_routes(self, tol: ProbeTolerance) -> list[Flip]:
        return [f for f in self.flips if not f.margin <= tol.tie]

    def ok(self, tol: ProbeTolerance) -> bool:
        return self.max_rel <= tol.rtol and not self.wrong_routes(tol)

    def describe(self, tol: ProbeTolerance) -> str:
        """One line naming what failed (or what was tolerated)."""
        parts = []
        if not self.max_rel <= tol.rtol:
            parts.append(f"output {self.worst} differs by {self.max_rel:.3g} of its scale (max abs "
                         f"{self.max_abs:.3g}) > {tol.rtol:g}")
        wrong = self.wrong_routes(tol)
        if wrong:
            f = wrong[0]
            parts.append(f"{len(wrong)} token(s) chose another expert with a clear routing margin (first: MoE call "
                         f"{f.call}, token {f.token}: expert {f.own} instead of {f.forced}, margin {f.margin:.3g} "
                         f"> tie tolerance {tol.tie:g})")
        ties = self.near_ties(tol)
        if ties and not parts:
            parts.append(f"{len(ties)} near-tie routing flip(s) tolerated (margin ≤ {max(f.margin for f in ties):.2g})")
        return "; ".join(parts) or "equal within tolerance"

    def to_json(self) -> dict[str, Any]:
        return {"max_abs_diff": _finite(self.max_abs), "max_rel_diff": _finite(self.max_rel),
                "routing_flips": len(self.flips),
                "max_flip_margin": max((f.margin for f in self.flips), default=None)}

    def merge(self, other: "Comparison", offset: int = 0) -> "Comparison":
        """The worse of two comparisons (e.g. of two probe inputs), flips of both."""
        worst = self if self.max_rel >= other.max_rel else other
        return Comparison(max(self.max_abs, other.max_abs), max(self.max_rel, other.max_rel), worst.worst,
                          self.flips + other.flips)


def _finite(x: float) -> float | str:
    return x if np.isfinite(x) else str(x)  # JSON has no inf/nan


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach()
        x = x.float() if x.is_floating_point() else x
        return x.cpu().numpy()
    return np.asarray(x)


def compare_outputs(got: Sequence[Any], want: Sequence[Any], names: Sequence[str] | None = None) -> Comparison:
    """Relative error of each output against its own scale; integer/bool outputs must be equal exactly."""
    if len(got) != len(want):
        raise ValueError(f"the program now has {len(got)} outputs instead of {len(want)}")
    out = Comparison()
    for i, (g, w) in enumerate(zip(got, want)):
        name = names[i] if names else str(i)
        a, b = _to_numpy(g), _to_numpy(w)
        if a.shape != b.shape:
            raise ValueError(f"output {name} changed shape: {a.shape} vs {b.shape}")
        if not a.size:
            continue
        if a.dtype.kind in "iub" or b.dtype.kind in "iub":
            abs_err = rel = 0.0 if np.array_equal(a, b) else float("inf")
        else:
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            if not (np.isfinite(a64).all() and np.isfinite(b64).all()):
                abs_err = rel = float("inf")  # a NaN never hides behind max()
            else:
                abs_err = float(np.abs(a64 - b64).max())
                scale = float(np.abs(b64).max())
                rel = abs_err / scale if scale > 0 else (0.0 if abs_err == 0 else float("inf"))
        out.max_abs = max(out.max_abs, abs_err)
        if rel >= out.max_rel:
            out.max_rel, out.worst = rel, name
    return out


@dataclass
class Recorded:
    """A reference run: its outputs and the routing decisions it made, call by call."""

    outputs: list[Any]
    routes: list[Route]


def record(run: Callable[[], list[Any]]) -> Recorded:
    """Run ``run`` while recording every routing decision."""
    with torch.no_grad(), routing_tape(RoutingTape("record")) as tape:
        outputs = run()
    return Recorded(list(outputs), tape.routes)


def replay(run: Callable[[], list[Any]], reference: Recorded | None = None, forced: list[torch.Tensor] | None = None,
           reference_routes: list[Route] | None = None, names: Sequence[str] | None = None,
           want: list[Any] | None = None) -> Comparison:
    """Run ``run`` with the reference's routing forced on it; compare its outputs with the reference's and
    its own routing decisions with the forced ones. ``forced``/``reference_routes``/``want`` override the
    reference's, for a candidate whose MoE calls are arranged differently (the packed TiDAR step)."""
    forced = forced if forced is not None else [r.choice for r in reference.routes]
    reference_routes = reference_routes if reference_routes is not None else reference.routes
    want = want if want is not None else reference.outputs
    with torch.no_grad(), routing_tape(RoutingTape("replay", forced)) as tape:
        got = run()
    if len(tape.routes) != len(forced):
        raise ValueError(f"the candidate made {len(tape.routes)} routing decisions, the reference {len(forced)}")
    result = compare_outputs(got, want, names)
    result.flips = routing_flips(reference_routes, tape.routes, forced)
    return result


def stack_routes(parts: list[Route], batch: int) -> Route:
    """Routes of several calls over [B, T_i] tokens as one call over [B, ΣT_i] tokens (segments side by side,
    each batch row's segments in order), for a packed forward that routes them all at once."""
    def cat(field_name: str) -> torch.Tensor:
        return torch.cat([getattr(r, field_name).view(batch, -1) for r in parts], dim=1).reshape(-1)

    return Route(cat("choice"), cat("runner_up"), cat("margin"))
