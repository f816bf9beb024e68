"""Context-lookup drafts: continue the text the way it went the last time it looked like this.

Greedy lossless verification accepts a draft exactly when it is the model's own greedy continuation, whoever
proposed it; so any proposal that is a deterministic function of the tokens so far keeps TiDAR lossless
(a Dirac draft, ``shared/docs/tidar-decoding.md`` §5, under greedy and stochastic verification alike). Text,
and code most of all, repeats itself: names, call patterns, and, from a small model, whole loops. Where the
last tokens occurred before, the tokens that followed them then are a proposal the drafter cannot make once
its draft collapses towards the marginal (the demo's drafter gets 5–8 positions of a loop right and then
repeats its most likely token). This is prompt-lookup / n-gram drafting (as in ``transformers``'
``prompt_lookup_num_tokens`` and vLLM's n-gram speculator), applied to TiDAR's draft block: when the context
holds an earlier occurrence of its last ``min_match``..``max_match`` tokens, the block's drafts are that
occurrence's continuation, otherwise the drafter's. A continuation that runs into the present (a loop whose
period is shorter than the block) is copied with overlap, the way LZ77 copies a run, so a loop of period P
proposes the loop, not just P tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MIN_MATCH = 2  # tokens of suffix that must have occurred before (1 matches almost anything)
MAX_MATCH = 8  # longer matches are preferred up to this length


def continuation(context: np.ndarray, length: int, min_match: int = MIN_MATCH,
                 max_match: int = MAX_MATCH) -> np.ndarray | None:
    """The ``length`` tokens that followed the most recent earlier occurrence of the longest suffix of
    ``context`` [L] (``min_match`` ≤ n ≤ ``max_match``), or None when no such occurrence exists.

    Candidates are the end positions e < L−1 with context[e] = context[L−1]; each round keeps those whose
    match extends one token further back, so the survivors of the last non-empty round share the longest
    suffix; the most recent of them wins (the text's latest habit)."""
    L = len(context)
    if L < min_match + 1 or length <= 0:
        return None
    ends = np.flatnonzero(context[: L - 1] == context[L - 1])  # [C] candidate end positions
    n = 1
    while len(ends) and n < max_match:
        longer = ends[ends >= n]
        longer = longer[context[longer - n] == context[L - 1 - n]]
        if not len(longer):
            break
        ends, n = longer, n + 1
    if n < min_match or not len(ends):
        return None
    start = int(ends[-1]) + 1  # first token after the occurrence
    period = L - start  # ≥ 1; a continuation longer than this re-reads what it copied
    return context[start + np.arange(length) % period]


def with_lookup(drafts: np.ndarray, valid: np.ndarray, contexts: Sequence[Sequence[int]],
                rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Drafts [B, K] and their validity [B, K] with each row in ``rows`` (default: all) replaced by its
    context's continuation where one exists. ``contexts[b]`` is row b's tokens so far, the anchor last."""
    K = drafts.shape[1]
    drafts, valid = drafts.copy(), valid.copy()
    for b in range(len(drafts)) if rows is None else rows:
        found = continuation(np.asarray(contexts[b]), K)
        if found is not None:
            drafts[b], valid[b] = found, True
    return drafts, valid
