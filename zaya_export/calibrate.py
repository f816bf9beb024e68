"""The export's ``calibrate`` phase: acceptance-length histograms of greedy lossless TiDAR (two-forward and
fused) on held-out code, with the eager model, so that ``run --mode auto`` can predict each mode's speed.

Greedy acceptance is a property of the weights and the prompts, not of the machine or the backend (every
backend emits the same tokens), so it is measured once here and travels in the artifact
(``runtime.calibration``). Prompts come from installed packages' source, outside the demo corpus; without a
tokenizer they are random ids, which a trained drafter does not predict, so TiDAR then looks as poor as it is
on text the model does not know.
"""

from __future__ import annotations

import numpy as np

from zaya_export.models import ZayaForCausalLM
from zaya_export.runtime.calibration import Calibration
from zaya_export.runtime.sampling import SamplerConfig
from zaya_export.runtime.session import Session
from zaya_export.runtime.tidar import generate_tidar

PROMPT_LEN = 48


def calibration_prompts(tokenizer, vocab_size: int, count: int) -> tuple[list[list[int]], str]:  # noqa: ANN001
    """``count`` prompts and where they come from."""
    if tokenizer is not None:
        from .demo_card import foreign_prompts

        try:
            prompts = foreign_prompts(tokenizer, count=count, length=PROMPT_LEN)
        except (OSError, ValueError):  # no installed sources to cut from
            prompts = []
        if prompts and max(max(p) for p in prompts) < vocab_size:
            return prompts, "installed packages' Python source"
    rng = np.random.default_rng(0)
    return rng.integers(5, vocab_size, (count, PROMPT_LEN)).tolist(), "random ids"


MODES = {"tidar": False, "tidar-fused": True}  # TiDAR mode → whether it drafts in the verifying forward


def measure_acceptance(model: ZayaForCausalLM, tokenizer, block_len: int, levels: tuple[int, ...],  # noqa: ANN001
                       prompts: int = 4, new_tokens: int = 64, modes: tuple[str, ...] = tuple(MODES),
                       lookup: bool = True) -> Calibration:
    """Greedy histograms ``hist[ℓ]`` over ``prompts`` generations of ``new_tokens`` for each TiDAR mode of
    ``modes`` (only the fused mode depends on ``levels``), with the drafts ``run`` makes by default (the
    drafter's, replaced by context-lookup continuations where the context repeats itself, unless ``lookup``
    is off)."""
    session = Session.from_model(model, block_len, levels)
    ids, source = calibration_prompts(tokenizer, model.config.vocab_size, prompts)
    acceptance = {}
    for mode in modes:
        fused = MODES[mode]
        hist = np.zeros(block_len + 1, np.int64)
        for p in ids:
            hist += np.asarray(generate_tidar(session, [p], new_tokens, None, SamplerConfig(), fused=fused,
                                              lookup=lookup).acceptance)
        acceptance[mode] = [int(n) for n in hist]
    return Calibration(acceptance, len(ids), new_tokens, source, lookup)


def levels_from_histogram(hist: list[int], count: int, default: tuple[int, ...]) -> tuple[int, ...]:
    """``export --levels auto``: the packed step's acceptance levels from a fused acceptance histogram.

    Proposal p serves a step that accepted ℓ drafts when λ_p is the largest level ≤ ℓ, and it is exact (its
    draft rows sit where the next drafts go) only when λ_p = ℓ; any other ℓ takes the nearest level below,
    shifted. So the levels are 0 (always needed) and the ``count`` − 1 most frequent nonzero ℓ (ties: the
    smaller), keeping the step's size; where the histogram holds fewer nonzero ℓ than that, the rest come from
    ``default``. On the demo checkpoint (fused histogram 181, 128, 47, 25, 5, … for ℓ = 0, 1, 2, 3, 4, …) this
    gives (0, 1, 2): 2.21 → 2.44 tokens per forward on foreign code, 1.70 → 1.86 on held-out stdlib code,
    against the default (0, 6, 16), at the same step size."""
    seen = sorted((-n, ell) for ell, n in enumerate(hist) if ell > 0 and n > 0)
    chosen = {0, *(ell for _, ell in seen[: count - 1])}
    for level in default:
        if len(chosen) >= count:
            break
        chosen.add(level)
    return tuple(sorted(chosen))
