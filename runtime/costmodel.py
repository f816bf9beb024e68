"""Which decode mode is fastest here: tokens/s of AR, two-forward TiDAR and the fused step, predicted from the
measured cost curve (:mod:`.cost_curve`) and acceptance-length histograms measured on calibration prompts.

A TiDAR step costs its forwards plus the state commit and emits ``ℓ + 1`` tokens, ℓ the accepted drafts; AR
costs one ``decode`` and a commit per token. A generation of n tokens costs the prefill, the first draft (TiDAR
modes) and ``(n − 1) / E[ℓ + 1]`` steps. Every lossless mode emits the same tokens (greedy) or the same
distribution (sampling), so the fastest one is chosen on speed alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .cost_curve import CostCurve

MODES = ("ar", "tidar", "tidar-fused")


@dataclass(frozen=True)
class Prediction:
    mode: str
    step_ms: float  # one step: its forwards and its commit
    tokens_per_step: float
    tokens_per_forward: float
    tok_per_s: float  # over the whole generation, prefill included (as ``bench --modes`` measures it)

    def to_json(self) -> dict:
        return {"mode": self.mode, "step_ms": round(self.step_ms, 4), "tokens_per_step": round(self.tokens_per_step, 3),
                "tokens_per_forward": round(self.tokens_per_forward, 3), "tok_per_s": round(self.tok_per_s, 2)}


def mean_accepted(hist: list[int] | np.ndarray) -> float:
    """E[ℓ] of a histogram ``hist[ℓ]`` = number of steps that accepted ℓ drafts."""
    h = np.asarray(hist, np.float64)
    return float((np.arange(len(h)) * h).sum() / h.sum()) if h.sum() > 0 else 0.0


def _prefill_ms(curve: CostCurve, tokens: int) -> float:
    """Prefill time for ``tokens``: interpolated on the measured curve, extended linearly past its end."""
    xs = sorted(curve.prefill)
    ys = [curve.prefill[x] for x in xs]
    if not xs:  # not measured (choosing a mode: prefill costs every mode the same)
        return 0.0
    if tokens <= xs[-1] or len(xs) < 2:
        return float(np.interp(tokens, xs, ys))
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return ys[-1] + slope * (tokens - xs[-1])


def step_entry(curve: CostCurve, greedy: bool, w: float = 1.0) -> str:
    """The entry the fused loop runs (``runtime.tidar.generate_tidar``): acceptance in the graph where the
    artifact has it for this sampler, else the plain packed ``step`` with acceptance on the host."""
    wanted = "step_greedy" if greedy and w == 1.0 else "step_sample" if not greedy else "step"
    return wanted if wanted in curve.entries else "step"


def predict(curve: CostCurve, acceptance: dict[str, list[int]], prompt_len: int, new_tokens: int,
            greedy: bool = True, w: float = 1.0) -> dict[str, Prediction]:
    """Predicted figures per mode that the curve and the histograms allow (AR always; a TiDAR mode when its
    entries were measured and its histogram is given)."""
    prefill = _prefill_ms(curve, prompt_len)
    steps: dict[str, tuple[float, float, int, float]] = {  # mode: (step ms, tokens/step, forwards/step, setup ms)
        "ar": (curve.ms("decode") + curve.commit_ms(1), 1.0, 1, 0.0)}
    if "tidar" in acceptance and {"verify", "draft"} <= set(curve.entries):
        ell = mean_accepted(acceptance["tidar"])
        steps["tidar"] = (curve.ms("verify") + curve.ms("draft") + curve.commit_ms(ell + 1), ell + 1, 2,
                          curve.ms("draft"))
    if "tidar-fused" in acceptance and "step" in curve.entries and "draft" in curve.entries:
        ell = mean_accepted(acceptance["tidar-fused"])
        entry = step_entry(curve, greedy, w)
        steps["tidar-fused"] = (curve.ms(entry) + curve.commit_ms(ell + 1), ell + 1, 1, curve.ms("draft"))
    out = {}
    for mode, (step_ms, per_step, forwards, setup) in steps.items():
        n_steps = max(new_tokens - 1, 0) / per_step
        total_ms = prefill + setup + n_steps * step_ms
        forwards_total = 1 + (1 if mode != "ar" else 0) + n_steps * forwards
        out[mode] = Prediction(mode, step_ms, per_step, new_tokens / forwards_total, new_tokens / total_ms * 1e3)
    return out


def choose(predictions: dict[str, Prediction]) -> Prediction:
    """The fastest mode (AR on a tie: it needs no drafts and no calibration to be right)."""
    return max(predictions.values(), key=lambda p: (round(p.tok_per_s, 6), p.mode == "ar"))



def needed_entries(greedy: bool, w: float) -> tuple[str, ...]:
    """The entries whose cost decides between the modes for this sampler (prefill is common to all)."""
    fused = "step_greedy" if greedy and w == 1.0 else "step_sample" if not greedy else "step"
    return ("decode", "verify", "draft", fused, "step")


def auto_mode(session, calibration, prompt_len: int, new_tokens: int, greedy: bool,  # noqa: ANN001
              w: float = 1.0, curve: CostCurve | None = None) -> tuple[str, dict[str, Prediction], str]:
    """``run --mode auto``: the mode the cost model predicts fastest for this session, its predictions, and
    why. AR where the artifact has no TiDAR entries or no calibration; a TiDAR mode only for ``w`` < 1 (logit
    mixing is a TiDAR sampler). ``curve`` replaces the timing of the session's entries (a curve measured
    earlier, or a fixed one in tests, where timings on a loaded machine decide nothing reproducibly)."""
    from .cost_curve import measure

    if not session.has("verify"):
        return "ar", {}, "no TiDAR entry points"
    if calibration is None:
        why = ("no calibration (re-export the artifact to add one)" if session.artifact is not None
               else "no calibration (a checkpoint: export it to calibrate)")
        return ("tidar" if w < 1.0 else "ar"), {}, why
    if curve is None:
        curve = measure(session, context=prompt_len, repeats=5, prefill_counts=(), entries=needed_entries(greedy, w))
    predictions = predict(curve, calibration.acceptance, prompt_len, new_tokens, greedy, w)
    if w < 1.0:
        predictions.pop("ar", None)
    best = choose(predictions)
    return best.mode, predictions, "cost model"
