"""The error budget of a quantized artifact: how far its outputs are from the unquantized source model.

``validate`` checks a quantized artifact twice. Against its own weights (dequantized), the graphs must compute
what the codes say (``validate.TOLERANCES["quant"]``). Against the unquantized source, quantization is allowed
an error, but a bounded one, measured as a user would feel it:

- teacher-forced on held-out text (the stdlib's held-out files, the demo corpus's held-out split, read through
  the artifact's tokenizer; without a tokenizer, the source model's own greedy continuations of random
  prompts), every position of ``windows`` windows of ``length`` tokens through the ``layers`` entry (logits
  of every row): mean KL(source ‖ artifact), top-1 agreement, and perplexity of both on the next tokens;
- greedy generation: how many tokens the artifact produces before its first difference from the source.

Budgets (:data:`BUDGETS`), per bits of the scheme:

- int8: mean KL ≤ 1e-3, top-1 ≥ 99%, perplexity within +1%. An int8 grid with 32-value groups rounds a weight
  by ≤ 0.4% of its group's largest value; with the activations quantized to int8 as well (MatMulNBits'
  fast path) the logits move by about 1% of their scale, far inside these limits on every model we measured.
- int4: mean KL ≤ 0.02, top-1 ≥ 95%, perplexity within +5%. Sixteen levels per group is a real
  approximation: published int4 (group 32-128) results on LLMs lose 1-5% perplexity; the demo model measures
  KL 7e-3, top-1 99.4% and +0.3% perplexity at g32 (int8 head). Past these limits generations visibly degrade
  (greedy output drifts within a few tokens on most prompts).

Top-1 agreement leaves out near ties: positions where the source's top-2 log-probabilities are closer than
√(2·KL budget) nats, the logit move the KL budget itself admits (½δ² = KL); the rate over all positions is
reported next to it. Greedy agreement lengths are reported, not gated: one near-tie at the top sends the rest of a sequence
elsewhere, which says little about the distribution.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from zaya_export.models.entries import example_feed
from zaya_export.models.io_table import Name
from zaya_export.models.quantization import QuantScheme
from zaya_export.runtime.generate import generate
from zaya_export.runtime.session import Session

from .eager_reference import EagerReference


@dataclass(frozen=True)
class Budget:
    kl_mean: float  # mean KL(source ‖ artifact) per position, nats
    top1: float  # top-1 agreement over positions
    ppl_ratio: float  # artifact perplexity / source perplexity


BUDGETS = {8: Budget(kl_mean=1e-3, top1=0.99, ppl_ratio=1.01), 4: Budget(kl_mean=2e-2, top1=0.95, ppl_ratio=1.05)}


def heldout_windows(model: Any, tokenizer_path: Any, windows: int, length: int, seed: int = 0  # noqa: ANN401
                    ) -> tuple[np.ndarray, str]:
    """``[windows, length]`` int64 token windows and where they come from (module docstring)."""
    if tokenizer_path is not None:
        from zaya_export.runtime.tokenizer import load_tokenizer

        from .corpus import encode_files, stdlib_corpus

        stream = encode_files(load_tokenizer(tokenizer_path), stdlib_corpus().heldout, model.config.eos_token_ids[0])
        stream = stream[stream < model.config.vocab_size]
        if len(stream) >= windows * length:
            starts = np.linspace(0, len(stream) - length, windows).astype(int)
            return np.stack([stream[s:s + length] for s in starts]).astype(np.int64), "stdlib held-out files"
    from zaya_export.runtime.generate import generate_greedy

    rng = np.random.default_rng(seed)
    prompts = [rng.integers(5, model.config.vocab_size, 4).tolist() for _ in range(windows)]
    out = generate_greedy(model, prompts, length - 4, None).tokens
    return np.array([p + t for p, t in zip(prompts, out)], dtype=np.int64), "the source model's greedy continuations"


def layers_feed(model: Any, ids: np.ndarray) -> dict[str, np.ndarray]:  # noqa: ANN401
    """The ``layers`` entry's inputs for teacher-forcing ``ids [B, T]`` over an empty cache."""
    feed = example_feed(model, ids.shape[0], ids.shape[1], 0)
    feed[Name.INPUT_IDS] = ids
    feed[Name.INPUT_MASK] = np.ones(ids.shape, dtype=bool)
    return feed


def _layers_logits(run: Any, model: Any, ids: np.ndarray) -> np.ndarray:  # noqa: ANN401
    """Logits of every position ``[B, T, V]`` from the ``layers`` entry on ``ids`` (empty cache)."""
    return run("layers", layers_feed(model, ids))[Name.LOGITS]


def _log_softmax(z: np.ndarray) -> np.ndarray:
    return z - np.logaddexp.reduce(z, -1, keepdims=True)


def error_budget(session: Session, source: Any, scheme: QuantScheme, tokenizer_path: Any,  # noqa: ANN401
                 prompts: list[list[int]], windows: int = 8, length: int = 128, new_tokens: int = 32
                 ) -> dict[str, Any]:
    """The artifact (``session``) against the unquantized ``source`` model: metrics, budget and verdict."""
    length = min(length, source.config.max_position_embeddings)
    ids, origin = heldout_windows(source, tokenizer_path, windows, length)
    ref = EagerReference(source, session.block_len, session.levels or None)
    with torch.no_grad():
        want = _layers_logits(ref.run, source, ids)  # [B, T, V]
    metrics = distribution_metrics(_layers_logits(session.run, source, ids), want, ids, BUDGETS[scheme.bits])
    stop = source.config.eos_token_ids
    agree = []
    for p in prompts:
        a, b = generate(session, [p], new_tokens, stop).tokens[0], ref.greedy(p, new_tokens, stop)
        agree.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))))
    return {"scheme": scheme.name, "text": origin, "windows": int(ids.shape[0]), "window_tokens": int(ids.shape[1]),
            **metrics, "greedy_agreement": agree, "greedy_tokens": new_tokens}


def distribution_metrics(got: np.ndarray, want: np.ndarray, ids: np.ndarray, budget: Budget) -> dict[str, Any]:
    """Artifact logits ``got`` against source logits ``want`` (``[B, T, V]``, teacher-forced on ``ids``): mean
    KL(source ‖ artifact), top-1 agreement without near ties and over all positions, both perplexities, and
    the verdict under ``budget``."""
    got, want = _log_softmax(got.astype(np.float64)), _log_softmax(want.astype(np.float64))
    tie = float(np.sqrt(2 * budget.kl_mean))  # the logit move the KL budget admits (½δ² = KL)
    if not (np.isfinite(got).all() and np.isfinite(want).all()):
        kl, top1, top1_all, ties, ratio = float("inf"), 0.0, 0.0, 0, float("inf")
        ppl_src = ppl_art = float("inf")
    else:
        kl = float((np.exp(want) * (want - got)).sum(-1).mean())
        agree = got.argmax(-1) == want.argmax(-1)
        top2 = np.sort(want, -1)[..., -2:]
        near = (top2[..., 1] - top2[..., 0]) <= tie
        top1 = float(agree[~near].mean()) if (~near).any() else 1.0
        top1_all, ties = float(agree.mean()), int(near.sum())
        targets = ids[:, 1:, None]
        ppl_src = float(np.exp(-np.take_along_axis(want[:, :-1], targets, -1).mean()))
        ppl_art = float(np.exp(-np.take_along_axis(got[:, :-1], targets, -1).mean()))
        ratio = ppl_art / ppl_src
    return {"kl_mean": kl, "top1": top1, "top1_all": top1_all, "near_ties": ties, "tie_nats": tie,
            "ppl_source": ppl_src, "ppl_artifact": ppl_art, "ppl_ratio": ratio, "budget": asdict(budget),
            "ok": bool(kl <= budget.kl_mean and top1 >= budget.top1 and ratio <= budget.ppl_ratio)}


def budget_markdown(b: dict[str, Any]) -> list[str]:
    """The budget as report lines."""
    lim = b["budget"]
    return ["", f"Quantization error budget ({b['scheme']}) against the unquantized source, teacher-forced on "
            f"{b['windows']}×{b['window_tokens']} tokens of {b['text']}:", "",
            "| metric | measured | budget | ok |", "|---|---|---|---|",
            f"| mean KL(source ‖ artifact) | {b['kl_mean']:.2e} | ≤ {lim['kl_mean']:.0e} | "
            f"{'✓' if b['kl_mean'] <= lim['kl_mean'] else '✗'} |",
            f"| top-1 agreement (all positions: {b['top1_all']:.4f}; {b['near_ties']} near ties, source top-2 within "
            f"{b['tie_nats']:.3f} nats, left out) | {b['top1']:.4f} | ≥ {lim['top1']} | "
            f"{'✓' if b['top1'] >= lim['top1'] else '✗'} |",
            f"| perplexity artifact / source | {b['ppl_artifact']:.3f} / {b['ppl_source']:.3f} = {b['ppl_ratio']:.4f}"
            f" | ≤ {lim['ppl_ratio']} | {'✓' if b['ppl_ratio'] <= lim['ppl_ratio'] else '✗'} |",
            "", f"Greedy tokens before the first difference (of {b['greedy_tokens']}): {b['greedy_agreement']}"]
