"""The measured cost of each entry point on this machine: time per call versus tokens in the call.

What decides whether TiDAR pays is how a forward's cost grows with its token count (a 17-token ``verify``
against a 1-token ``decode``), and that is a property of the machine, the backend and the model, not something
to assume. :func:`measure` times every entry of a session at the state size of a real run: ``prefill`` at
1, 2, 4, … tokens (the curve of one graph over token counts) and each fixed-size entry at its own count (as the
decoding loops call it: on IREE, AR's decode and TiDAR's draft with the previous forward's commit folded in),
plus the state commit a decode loop pays after each forward. :mod:`.costmodel` turns it into predictions.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from zaya_export.models.io_table import Name

from .device_cache import PENDING, DeviceKVCache
from .loop_cost import HOST_TOKENS, host_ms_per_step
from .session import Session

DECODING_ENTRIES = ("decode", "verify", "draft", "step", "step_greedy", "step_sample")
MODES = ("ar", "tidar", "tidar-fused")
MODE_ENTRIES = {"ar": ("decode",), "tidar": ("verify", "draft"), "tidar-fused": ("draft", "step")}


@dataclass
class CostCurve:
    """Milliseconds per call (mean of the timed calls, :func:`_mean_ms`) on one backend: ``prefill`` by token
    count, the fixed entries by name (``tokens`` holds their token counts), ``commit`` by committed token count."""

    backend: str
    threads: dict[str, int]
    prefill: dict[int, float] = field(default_factory=dict)
    entries: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    commit: dict[int, float] = field(default_factory=dict)
    host: dict[str, float] = field(default_factory=dict)  # mode: ms per step outside its forwards (loop_cost)
    commit_folded: bool = False  # the loops run the commit inside the next forward: ``commit`` times it alone

    def ms(self, entry: str) -> float:
        return self.entries[entry]

    def commit_ms(self, count: float) -> float:
        """Host/device commit time for ``count`` tokens, interpolated over the measured counts."""
        xs = sorted(self.commit)
        return float(np.interp(count, xs, [self.commit[x] for x in xs])) if xs else 0.0

    def rows(self) -> list[dict]:
        """One table row per measured call: entry, tokens, ms and the ratio to ``decode``."""
        base = self.entries.get("decode")
        out = [{"entry": "prefill", "tokens": t, "ms": ms} for t, ms in sorted(self.prefill.items())]
        out += [{"entry": e, "tokens": self.tokens[e], "ms": ms} for e, ms in self.entries.items()]
        out += [{"entry": "commit", "tokens": t, "ms": ms} for t, ms in sorted(self.commit.items())]
        for row in out:
            row["vs_decode"] = round(row["ms"] / base, 3) if base else None
        return out

    def step_overhead_ms(self, mode: str, count: float) -> float:
        """What a step of ``mode`` committing ``count`` tokens pays outside its forwards: the loop's measured
        host time per step where it was measured (it includes the commit), else the commit alone."""
        return self.host[mode] if mode in self.host else self.commit_ms(count)

    def to_json(self) -> dict:
        return {"backend": self.backend, "threads": self.threads, "rows": self.rows(),
                "host_ms_per_step": {m: round(ms, 4) for m, ms in self.host.items()},
                "commit_folded": self.commit_folded}


def token_counts(largest: int) -> list[int]:
    """1, 2, 4, … up to ``largest``, and ``largest`` itself."""
    counts = [1]
    while counts[-1] * 2 < largest:
        counts.append(counts[-1] * 2)
    return sorted(set(counts + [largest]))


MIN_SECONDS = 0.15  # per timed quantity: enough calls that a 1-in-5 slow call shows in the mean


def _mean_ms(call, repeats: int, before=tuple, min_seconds: float = MIN_SECONDS) -> float:  # noqa: ANN001
    """Mean ms of ``call`` after one warm-up (allocators, lazily created sessions, kernels), over at least
    ``repeats`` calls and until ``min_seconds`` have passed. Each call is ``call(*before())``; only ``call`` is
    timed.

    The mean, not the median: a decode loop pays every call, slow ones included, and on a shared CPU the
    calls are bimodal (IREE's demo decode: median 2.9 ms, but one call in five ~7.7 ms while a worker thread
    waits for its core, so the loop paid 4.1 ms a call and a median-based prediction was 24-36% fast)."""
    times: list[float] = []
    began = None
    while len(times) <= repeats or time.perf_counter() - began < min_seconds:
        args = before()
        start = time.perf_counter()
        call(*args)
        times.append(time.perf_counter() - start)
        began = began or time.perf_counter()  # after the warm-up
    return round(float(np.mean(times[1:])) * 1e3, 4)


def entry_inputs(session: Session, cache, entry: str, tokens: int) -> dict:  # noqa: ANN001
    """Inputs for one timed call: ``tokens`` ids over the cache, and the step's sampler inputs."""
    B, K, V = len(cache.lengths), session.block_len or 0, session.config.vocab_size
    rng = np.random.default_rng(0)
    ids = rng.integers(5, V, (B, tokens))
    inputs = cache.inputs(ids)
    if entry in ("step_greedy", "step_sample"):
        inputs[Name.DRAFT_VALID] = np.ones((B, K), bool)
    if entry == "step_sample":
        inputs[Name.DRAFT_LOGITS] = rng.standard_normal((B, K, V)).astype(np.float32)
        inputs[Name.UNIFORMS] = rng.random((B, K + 1)).astype(np.float32)
        inputs[Name.SAMPLER] = np.array([1.0, 0.0, 1.0, 1.0], np.float32)
    return inputs


# entry → the forward whose commit a decoding loop hands it (``DeviceKVCache``), and how many tokens it commits
TAKES_COMMIT_OF = {"decode": ("decode", lambda K: 1), "draft": ("verify", lambda K: K // 2 + 1)}


def _entry_ms(session: Session, cache, entry: str, sizes: dict, repeats: int) -> float:  # noqa: ANN001
    """Mean ms of one ``entry`` call as the decoding loops make it: where a commit waits for the next forward
    (IREE modules with ``commit_then_*`` functions) AR's ``decode`` and TiDAR's ``draft`` run the previous
    forward's commit inside them, so they are timed with one (a fresh copy of the same commit every call:
    commits are idempotent; lengths restored after)."""
    inputs = entry_inputs(session, cache, entry, sizes[entry])
    source = TAKES_COMMIT_OF.get(entry)
    if source is None or source[0] not in sizes or not isinstance(cache, DeviceKVCache) \
            or not session.backend.folds("commit"):
        return _mean_ms(lambda: session.run(entry, inputs), repeats)
    lengths = cache.lengths.copy()
    out = session.run(source[0], entry_inputs(session, cache, source[0], sizes[source[0]]))
    cache.commit(out, counts=np.full(len(lengths), source[1](session.block_len or 0)))
    pending, cache.pending, cache.lengths = cache.pending, None, lengths
    fresh = lambda: ({**inputs, PENDING: dataclasses.replace(pending, done=False)},)  # noqa: E731
    return _mean_ms(lambda feed: session.run(entry, feed), repeats, before=fresh)


def _commit_ms(session: Session, cache, entry: str, tokens: int, count: int, repeats: int) -> float:  # noqa: ANN001
    """Median time to commit ``count`` tokens of a fresh ``entry`` output, as a decode loop does: each commit
    follows its forward, whose work has just gone through the caches (committing one output over and over
    measured 0.08 ms on the demo checkpoint where the loop pays ~0.25 ms). Lengths are restored after each."""
    inputs, lengths = entry_inputs(session, cache, entry, tokens), cache.lengths.copy()

    def commit(fresh: dict) -> None:
        cache.commit(fresh, counts=np.full(len(lengths), count))
        cache.lengths = lengths.copy()

    return _mean_ms(commit, repeats, before=lambda: (session.run(entry, inputs),))


def measure(session: Session, context: int = 64, repeats: int = 10, prefill_counts: Sequence[int] | None = None,
            entries: tuple[str, ...] = DECODING_ENTRIES, modes: tuple[str, ...] = MODES,
            host_tokens: int = HOST_TOKENS) -> CostCurve:
    """Time ``session``'s entries (batch 1) with ``context`` tokens already in the cache; ``prefill`` at
    ``prefill_counts`` tokens (default: 1, 2, 4, … up to the largest entry's; empty: not at all); and the host
    loop's time per step of each of ``modes`` whose entries the session has (``loop_cost``, over a generation
    of ``host_tokens``).

    The cache is sized as a generation of ``context`` prompt tokens would size it, so attention reads what it
    reads in use. Nothing timed is committed, except the commit timings themselves, which are undone (lengths
    restored) so every call sees the same state size."""
    points = session.artifact.entry_points if session.artifact is not None else {}
    wanted = [e for e in dict.fromkeys(entries) if session.has(e)]
    sizes = {e: (points[e].tokens if e in points else None) for e in wanted}
    if session.artifact is None:  # eager session: the specs of the model's own entries
        sizes = {e: session.backend.entries[e].spec.tokens for e in wanted}
    largest = max([t for t in sizes.values() if t] + [1])
    K = session.block_len or 0
    cache = session.new_cache(1, context + 4 * largest + 2 * (K + 1))
    out = session.run("prefill", cache.inputs(np.random.default_rng(1).integers(5, session.config.vocab_size,
                                                                                 (1, context))))
    cache.commit(out)
    cache.flush()  # a commit waiting for the next forward (IREE) would be timed with it
    threads = getattr(session.backend, "entry_threads", None)
    curve = CostCurve(session.backend.name, {e: threads(e) for e in ["prefill", *wanted]} if threads else {},
                      commit_folded=session.backend.folds("commit"))
    for t in token_counts(largest) if prefill_counts is None else prefill_counts:
        inputs = entry_inputs(session, cache, "prefill", t)
        curve.prefill[t] = _mean_ms(lambda: session.run("prefill", inputs), repeats)
    for entry in wanted:
        curve.entries[entry] = _entry_ms(session, cache, entry, sizes, repeats)
        curve.tokens[entry] = sizes[entry]
    for entry, count in (("decode", 1), ("verify", K // 2 + 1), ("verify", K + 1)):
        if entry in wanted:
            curve.commit[count] = _commit_ms(session, cache, entry, sizes[entry], count, repeats)
    prompt = np.random.default_rng(2).integers(5, session.config.vocab_size, context).tolist()
    for mode in modes:
        if all(session.has(e) for e in MODE_ENTRIES[mode]):
            curve.host[mode] = host_ms_per_step(session, mode, prompt, host_tokens)
    return curve
