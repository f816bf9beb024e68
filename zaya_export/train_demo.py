"""Train the shipped demo checkpoint: a small ZAYA1 (the same ``models/`` code, no special cases) trained with the
TiDAR objective of ``tidar-decoding.md`` §8 on the interpreter's standard-library source, on CPU.

One training sequence is ``[x_0..x_{N-1} | M×N]`` run as a packed layout (``models.packed.training_layout``):
the clean half is causal with next-token targets, mask block β sees the clean tokens before its start and its
own block, with fill-in targets ``x_t``. ``L = (α·L_AR + L_D) / (1 + α)``. Balancing biases are buffers, so they
stay frozen, as §8 proposes. Everything is seeded: the same command on the same interpreter gives the same
weights (up to the CPU's floating-point reduction order).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .corpus import Corpus, encode_files, stdlib_corpus
from .models import ZayaConfig, ZayaForCausalLM, init_weights
from zaya_export.models.packed import PackedLayout, training_layout
from zaya_export.runtime.tokenizer import build_tokenizer


@dataclass
class TrainSettings:
    seed: int = 0
    steps: int = 2400
    batch: int = 16
    seq_len: int = 128  # clean tokens per sequence; the model sees 2·seq_len
    lr: float = 3e-3
    warmup: int = 60
    weight_decay: float = 0.01
    alpha: float = 1.0  # weight of the AR term
    vocab_size: int = 4096
    eval_every: int = 100
    threads: int = 2
    max_minutes: float = 0.0  # 0 = no wall-clock cap; otherwise stop early (the card records the steps run)
    stop_after: int = 0  # run only the first N steps of the `steps`-long schedule (0 = all): replays a capped run
    model: dict = field(default_factory=lambda: dict(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        moe_intermediate_size=256, num_experts=4, router_hidden_size=64, max_position_embeddings=2048,
        layer_types=["hybrid", "hybrid_sliding", "hybrid", "hybrid_sliding"], sliding_window=128,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, mask_token_id=4, diffusion_block_len=16,
    ))


def demo_config(settings: TrainSettings) -> ZayaConfig:
    return ZayaConfig(vocab_size=settings.vocab_size, **settings.model)


def tidar_loss(model: ZayaForCausalLM, layout: PackedLayout, x: torch.Tensor, alpha: float
               ) -> tuple[torch.Tensor, float, float]:
    """x [B, N+1] clean tokens → (loss, AR cross-entropy, diffusion cross-entropy)."""
    N = x.shape[1] - 1
    logits = training_logits(model, layout, x)  # [B, 2N, V]
    V = logits.shape[-1]
    ar = F.cross_entropy(logits[:, :N].reshape(-1, V).float(), x[:, 1:].reshape(-1))  # next token
    diff = F.cross_entropy(logits[:, N:].reshape(-1, V).float(), x[:, :N].reshape(-1))  # fill-in x_t
    return (alpha * ar + diff) / (1 + alpha), ar.item(), diff.item()


def training_logits(model: ZayaForCausalLM, layout: PackedLayout, x: torch.Tensor) -> torch.Tensor:
    """x [B, N+1] clean tokens → logits [B, 2N, V] of one forward over the training layout ``[x_<N | MASK×N]``:
    rows < N the causal next-token half, rows ≥ N the fill-in (draft) half."""
    N = x.shape[1] - 1
    ids = torch.cat([x[:, :N], torch.full_like(x[:, :N], model.config.mask_token_id)], dim=1)  # [B, 2N]
    logits, _ = model.step(ids, model.empty_past(x.shape[0]), layout=layout)
    return logits


def adamw(model: ZayaForCausalLM, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices only (not on norms, biases and scales)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


def windows(stream: np.ndarray, n: int, count: int, gen: np.random.Generator) -> torch.Tensor:
    """``count`` random windows of n+1 tokens from ``stream`` → [count, n+1] int64."""
    starts = gen.integers(0, len(stream) - n - 1, size=count)
    return torch.from_numpy(np.stack([stream[s : s + n + 1] for s in starts]).astype(np.int64))


@torch.no_grad()
def evaluate(model: ZayaForCausalLM, layout: PackedLayout, stream: np.ndarray, n: int, batches: int = 8,
             batch: int = 16) -> tuple[float, float]:
    """Held-out (AR, diffusion) cross-entropy in nats on fixed windows (seed 1234)."""
    model.eval()
    gen = np.random.default_rng(1234)
    ars, diffs = [], []
    for _ in range(batches):
        _, ar, diff = tidar_loss(model, layout, windows(stream, n, batch, gen), 1.0)
        ars.append(ar)
        diffs.append(diff)
    model.train()
    return float(np.mean(ars)), float(np.mean(diffs))


def unigram_entropy(train: np.ndarray, heldout: np.ndarray, vocab: int) -> float:
    """Held-out cross-entropy (nats/token) of add-one-smoothed train unigram counts: the baseline to beat."""
    counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[heldout].mean())


def train(out: Path, settings: TrainSettings, log: Callable[[str], None] = print) -> dict:
    """Train, then write the checkpoint (fp16), ``tokenizer.json``, ``train_log.json`` and ``loss.png`` to
    ``out``. Returns the metrics dict (also in ``train_log.json``)."""
    from zaya_export.models.checkpoint import save_checkpoint
    from zaya_export.output_dir import check_replaceable

    check_replaceable(out, True, "checkpoint")  # before an hour of training, not after
    torch.manual_seed(settings.seed)
    torch.set_num_threads(settings.threads)
    corpus: Corpus = stdlib_corpus()
    tokenizer = build_tokenizer(settings.vocab_size, (Corpus.read(f) for f in corpus.train))
    config = demo_config(settings)
    train_ids = encode_files(tokenizer, corpus.train, config.eos_token_ids[0])
    held_ids = encode_files(tokenizer, corpus.heldout, config.eos_token_ids[0])
    log(f"corpus {corpus.root}: {len(corpus.train)} train files ({len(train_ids):,} tokens), "
        f"{len(corpus.heldout)} held-out ({len(held_ids):,} tokens)")

    model = ZayaForCausalLM(config)
    init_weights(model, settings.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters")
    layout = training_layout(settings.seq_len, config.diffusion_block_len, config.conv_history)
    opt = adamw(model, settings.lr, settings.weight_decay)

    def lr_at(step: int) -> float:
        if step < settings.warmup:
            return settings.lr * (step + 1) / settings.warmup
        frac = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return settings.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, frac))))

    gen = np.random.default_rng(settings.seed)
    history: dict[str, list] = {"step": [], "ar": [], "diff": [], "eval_step": [], "eval_ar": [], "eval_diff": []}
    start = time.time()
    model.train()
    steps_run = 0
    for step in range(settings.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss, ar, diff = tidar_loss(model, layout, windows(train_ids, settings.seq_len, settings.batch, gen),
                                    settings.alpha)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        steps_run = step + 1
        history["step"].append(step)
        history["ar"].append(ar)
        history["diff"].append(diff)
        last = step == settings.steps - 1
        over = bool(settings.max_minutes and (time.time() - start) > settings.max_minutes * 60) or (
            settings.stop_after > 0 and steps_run >= settings.stop_after and not last)
        if step % settings.eval_every == 0 or last or over:
            e_ar, e_diff = evaluate(model, layout, held_ids, settings.seq_len)
            history["eval_step"].append(step)
            history["eval_ar"].append(e_ar)
            history["eval_diff"].append(e_diff)
            log(f"step {step:5d}  train ar {ar:.3f} diff {diff:.3f}  held-out ar {e_ar:.3f} "
                f"(ppl {math.exp(e_ar):.1f}) diff {e_diff:.3f}  {time.time() - start:.0f}s")
        if over:
            log(f"stopping after {steps_run} of {settings.steps} steps (--max-minutes / --stop-after)")
            break

    model.eval()
    metrics = {
        "params": n_params,
        "steps_run": steps_run,
        "train_seconds": round(time.time() - start, 1),
        "train_tokens": len(train_ids),
        "heldout_tokens": len(held_ids),
        "heldout_ar_nats": history["eval_ar"][-1],
        "heldout_ar_ppl": math.exp(history["eval_ar"][-1]),
        "heldout_diffusion_nats": history["eval_diff"][-1],
        "unigram_nats": unigram_entropy(train_ids, held_ids, config.vocab_size),
        "settings": asdict(settings),
    }
    metrics["unigram_ppl"] = math.exp(metrics["unigram_nats"])
    save_checkpoint(model, out, tokenizer_json=tokenizer.to_str(), dtype=torch.float16, overwrite=True)
    (out / "train_log.json").write_text(json.dumps({"metrics": metrics, "history": history}) + "\n")
    plot_losses(history, out / "loss.png")
    return metrics


def plot_losses(history: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(history["step"], history["ar"], lw=0.6, alpha=0.5, label="train AR (next token)")
    ax.plot(history["step"], history["diff"], lw=0.6, alpha=0.5, label="train diffusion (fill-in)")
    ax.plot(history["eval_step"], history["eval_ar"], "o-", label="held-out AR")
    ax.plot(history["eval_step"], history["eval_diff"], "s-", label="held-out diffusion")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title("ZAYA1 demo: TiDAR training on stdlib source")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
