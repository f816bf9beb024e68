"""``export --block-len auto``: the TiDAR draft length K′ the cost model predicts fastest on this machine.

How many drafts a step should carry is a trade: each draft is a token more in every TiDAR forward, and only
pays when it is accepted. Where a forward's cost grows steeply with its tokens (a CPU, which computes them)
and the drafter's acceptance falls fast along the block, short blocks win; on a memory-bound GPU, where 17
tokens cost about what 1 does, the full block does. So the choice is measured, not assumed:

1. the calibration's acceptance histograms (measured at the config's K) give each K′ ≤ K its expected tokens
   per step (``runtime.costmodel.truncated``);
2. one all-rows causal forward of the fused model, lowered to ONNX beside the artifact being written, is timed
   with onnxruntime over the token counts the candidates need, and a line fitted to it prices every
   candidate's verify and draft (``forward_cost``);
3. ``runtime.costmodel.choose_block`` keeps the fastest two-forward TiDAR (the longest within 3% of it).

The export then calibrates again at K′, so ``calibration.json`` describes the entries it writes.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from zaya_export.models import ZayaForCausalLM
from zaya_export.models.entries import EntrySpec, example_feed, export_entry
from zaya_export.runtime.backends import ort_session

from .onnx_export import bind_external_weights, lower_entry, save_entry, unroll_entry, write_weights

COST_PROBE = EntrySpec(name="cost_probe", tokens=None, all_rows=True, state=True)
CONTEXT = 64  # cached tokens under each timed forward, as in `bench --entries`


def forward_cost(model: ZayaForCausalLM, expected_ops: dict[str, int], folder: Path, tokens: list[int],
                 dtype: torch.dtype, repeats: int = 9) -> tuple[Callable[[int], float], dict[int, float]]:
    """A line ``ms(T) = a + b·T`` fitted to onnxruntime's time for one all-rows forward of ``model`` over T
    tokens (batch 1, ``CONTEXT`` cached), and the times it was fitted to. Each time is the fastest of
    ``repeats`` calls, and the line is the Theil–Sen one (median of the pairwise slopes): a busy machine
    slows some calls several-fold (measured: 5.8 ms among 1.3–1.9 ms neighbours), which would tilt a mean or a
    least-squares fit. ``folder`` holds the lowered graph and its weights while they are timed; it is removed
    afterwards."""
    folder.mkdir(parents=True)
    try:
        onnx_model, _ = lower_entry(export_entry(model, COST_PROBE), expected_ops, COST_PROBE.outputs,
                                    COST_PROBE.inputs)
        bind_external_weights(onnx_model, write_weights(model, folder / "weights.safetensors", dtype), folder)
        unroll_entry(onnx_model)
        save_entry(onnx_model, folder / "probe.onnx")
        session = ort_session(str(folder / "probe.onnx"))
        names = [i.name for i in session.get_inputs()]
        fastest = {}
        for t in sorted(set(tokens)):
            feed = dict(zip(names, example_feed(model, 1, t, CONTEXT).values()))
            session.run(None, feed)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                session.run(None, feed)
                times.append(time.perf_counter() - start)
            fastest[t] = min(times) * 1e3
        del session
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return theil_sen(fastest), fastest


def theil_sen(points: dict[int, float]) -> Callable[[int], float]:
    """The line through ``points`` (x → y) with the median pairwise slope and the median intercept."""
    xs = sorted(points)
    slopes = [(points[b] - points[a]) / (b - a) for i, a in enumerate(xs) for b in xs[i + 1:]]
    slope = float(np.median(slopes)) if slopes else 0.0
    intercept = float(np.median([points[x] - slope * x for x in xs]))
    return lambda t: intercept + slope * t
