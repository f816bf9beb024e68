"""Which decode mode is fastest here: tokens/s of AR, two-forward TiDAR and the fused step, predicted from the
measured cost curve (:mod:`.cost_curve`) and acceptance-length histograms measured on calibration prompts.

A TiDAR step costs its forwards plus the state commit and emits ``ℓ + 1`` tokens, ℓ the accepted drafts; AR
costs one ``decode`` and a commit per token. A generation of n tokens costs the prefill, the first draft (TiDAR
modes) and ``(n − 1) / E[ℓ + 1]`` steps. Every lossless mode emits the same tokens (greedy) or the same
distribution (sampling), so the fastest one is chosen on speed alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .cost_curve import CostCurve

AUTO_HOST_TOKENS = 16  # run --mode auto: a shorter timed loop than bench's (it runs before every generation)


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
    decode, ar_host = curve.ms("decode"), curve.step_overhead_ms("ar", 1)

    def forward(entry: str) -> float:
        """A multi-token forward does at least a one-token forward's work (the same layers over more rows): a
        time measured below ``decode``'s is noise of a shared CPU, and would pick TiDAR where nothing is accepted."""
        return max(curve.ms(entry), decode)

    def host(mode: str, count: float) -> float:
        """A TiDAR step's host work includes an AR step's (emit and commit tokens), so it costs at least that."""
        return max(curve.step_overhead_ms(mode, count), ar_host)

    steps: dict[str, tuple[float, float, int, float]] = {  # mode: (step ms, tokens/step, forwards/step, setup ms)
        "ar": (decode + ar_host, 1.0, 1, 0.0)}
    if "tidar" in acceptance and {"verify", "draft"} <= set(curve.entries):
        ell = mean_accepted(acceptance["tidar"])
        steps["tidar"] = (forward("verify") + forward("draft") + host("tidar", ell + 1), ell + 1, 2, forward("draft"))
    if "tidar-fused" in acceptance and "step" in curve.entries and "draft" in curve.entries:
        ell = mean_accepted(acceptance["tidar-fused"])
        entry = step_entry(curve, greedy, w)
        steps["tidar-fused"] = (forward(entry) + host("tidar-fused", ell + 1), ell + 1, 1, forward("draft"))
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
        curve = measure(session, context=prompt_len, repeats=5, prefill_counts=(), entries=needed_entries(greedy, w),
                        host_tokens=AUTO_HOST_TOKENS)
    predictions = predict(curve, calibration.acceptance, prompt_len, new_tokens, greedy, w)
    if w < 1.0:
        predictions.pop("ar", None)
    best = choose(predictions)
    return best.mode, predictions, "cost model"


def truncated(hist: list[int] | np.ndarray, block_len: int) -> np.ndarray:
    """``hist[ℓ]`` measured with more drafts per step, as a step of ``block_len`` drafts sees it: a step that
    accepted more than K′ drafts accepts K′. An approximation (the drafter fills fewer masks, and shorter steps
    start elsewhere): on the demo checkpoint the mean accepted drafts measured at K′ = 8 and 4 are within 6%
    of the K = 16 histogram truncated."""
    h = np.asarray(hist, np.int64)
    out = h[: block_len + 1].copy()
    out[block_len] += h[block_len + 1:].sum()
    return out


@dataclass(frozen=True)
class BlockCandidate:
    """One draft length K′ and the predicted speed of two-forward TiDAR with it, per decoding step (prefill and
    host work left out: they cost every K′ about the same)."""

    block_len: int
    tokens_per_step: float
    step_ms: float

    @property
    def tok_per_s(self) -> float:
        return self.tokens_per_step / self.step_ms * 1e3

    def to_json(self) -> dict:
        return {"block_len": self.block_len, "tokens_per_step": round(self.tokens_per_step, 3),
                "step_ms": round(self.step_ms, 4), "tok_per_s": round(self.tok_per_s, 1)}


def block_candidates(forward_ms: Callable[[int], float], hist: list[int], block_len: int, row_tile: int = 1
                     ) -> list[BlockCandidate]:
    """Two-forward TiDAR for each draft length K′ = 1 … ``block_len``: a verify and a draft of K′+1 tokens per
    step (``forward_ms(T)``: one all-rows forward over T tokens on this machine), emitting E[min(ℓ, K′)] + 1
    tokens (``hist``: the two-forward histogram measured at ``block_len``). ``row_tile``: a backend whose
    products run rows in tiles of that many (IREE's data-tiled CPU matmuls: 8) pays for K′+1 rounded up.

    The packed step is not priced here: its in-graph acceptance adds a fixed cost of its own that a plain
    forward does not show (on the demo checkpoint a 4-token ``step_greedy`` costs about 2× a 4-token
    forward), so a forward-based price would favour it wrongly. ``run --mode auto`` compares every mode on the
    real entries of the exported K′."""
    def rows(t: int) -> int:  # t rounded up to whole tiles
        return -(-t // row_tile) * row_tile

    return [BlockCandidate(k, mean_accepted(truncated(hist, k)) + 1, 2 * forward_ms(rows(k + 1)))
            for k in range(1, block_len + 1)]


def choose_block(candidates: list[BlockCandidate], margin: float = 0.03,
                 others: Sequence[list[BlockCandidate]] = ()) -> BlockCandidate:
    """The longest draft among those within ``margin`` of the fastest: a longer block costs little where
    the prediction cannot tell them apart, and keeps the drafts a better drafter would get accepted.

    ``others``: the same draft lengths priced for other backends the artifact is built for. One K′ serves them
    all, so each K′ is scored by its worst share of a backend's own best rate, and the margin applies to that
    score (IREE's CPU module pays a 9-token forward as 16 rows: onnxruntime's best K′ can be IREE's worst)."""
    sets = [candidates, *others]
    best = [max(c.tok_per_s for c in cands) for cands in sets]
    score = [min(cands[i].tok_per_s / top for cands, top in zip(sets, best)) for i in range(len(candidates))]
    return max((c for c, sc in zip(candidates, score) if sc >= max(score) * (1 - margin)), key=lambda c: c.block_len)
