"""Self-distillation of the demo checkpoint's TiDAR drafter (the second stage of ``train-demo``).

With greedy lossless verification, a draft is accepted exactly when it equals the model's own greedy
continuation. So the drafter is trained on what the model itself generates, as Medusa/EAGLE drafters are
trained on their target's outputs:

1. **Generate** (each round, with the current model): prompts cut from the training corpus, optionally a few
   temperature-sampled tokens (to visit states off the greedy path), then a greedy continuation. In the greedy
   part every token is the argmax of the model given everything before it, so every draft target there is
   exactly what verification would accept.
2. **Train** one forward per batch over the TiDAR training layout ``[x | MASK×N]``:
   - distilled rows: the draft objective on the greedy part only, position-weighted by ``γ^k`` for draft
     position k of a block (a draft counts only if every earlier one was accepted), and the AR rows held to a
     frozen copy of the starting model by KL(teacher ‖ student), so greedy outputs (what is accepted) barely move;
   - real rows: the stage-1 TiDAR loss on real corpus windows, so AR quality on real text does not drop.
3. Repeat on-policy: the next round regenerates with the updated model.

Every round ends with a checkpoint (``distill_state.pt`` is *not* written: rounds resume from the saved
safetensors and a JSON log, never from a pickle).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from zaya_export.models import ZayaForCausalLM, decode, prefill
from zaya_export.models.packed import PackedLayout, training_layout

from .train_demo import adamw, tidar_loss, training_logits, windows


@dataclass
class DistillSettings:
    seed: int = 0
    rounds: int = 3  # the shipped demo checkpoint: rounds 0-2 (each ~17 min on a shared 2-core machine)
    steps_per_round: int = 250
    sequences_per_round: int = 3000  # fresh generations each round, about one epoch of them (384 reused over-fit)
    prompt_len: int = 32  # real-corpus tokens before the generated part (a multiple of the block length)
    sampled_lens: tuple[int, ...] = (0, 0, 16, 32)  # temperature-sampled tokens before the greedy part
    temperature: float = 0.8
    seq_len: int = 128  # clean tokens per training sequence (as stage 1)
    distilled_rows: int = 12  # per batch
    real_rows: int = 4  # per batch
    lr: float = 1e-3
    warmup: int = 20
    gamma: float = 0.8  # weight of draft position k is gamma**k
    kl_weight: float = 2.0  # 1.0 let the AR perplexity drift 13% in one round
    threads: int = 1  # as the recorded run (2 cores shared with other work)
    gen_batch: int = 64
    eval_prompts: int = 5  # foreign-code prompts measured after every round
    eval_tokens: int = 64
    teacher: str | None = None  # checkpoint the AR rows are held to (None: the model the pass starts from)
    grow_layers: int = 0  # append this many layers to the starting model first (``grow_demo.grown``: same outputs)
    grow_seed: int = 1  # the appended layers' random weights (silent until their output scales move off zero)


@torch.no_grad()
def generate_sequences(model: ZayaForCausalLM, stream: np.ndarray, settings: DistillSettings,
                       gen: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Distilled sequences ``x [S, N+1]`` and ``greedy [S, N+1]`` (bool: token x_t is the model's greedy choice
    given x_<t). Each is ``prompt_len`` corpus tokens, then ``s`` sampled tokens, then greedy tokens."""
    N1, P = settings.seq_len + 1, settings.prompt_len
    xs, greedy = [], []
    model.eval()
    todo = settings.sequences_per_round
    while todo > 0:
        b = min(settings.gen_batch, todo)
        starts = gen.integers(0, len(stream) - P - 1, size=b)
        prompt = torch.from_numpy(np.stack([stream[s : s + P] for s in starts]).astype(np.int64))  # [b, P]
        sampled = int(gen.choice(settings.sampled_lens))
        logits, state = prefill(model, prompt, capacity=N1)
        tokens = [prompt]
        for t in range(P, N1):
            if t - P < sampled:
                probs = torch.softmax(logits.float() / settings.temperature, -1)
                nxt = torch.multinomial(probs, 1, generator=None)[:, 0]
            else:
                nxt = logits.argmax(-1)
            tokens.append(nxt[:, None])
            if t < N1 - 1:
                logits = decode(model, nxt, state)
        x = torch.cat(tokens, 1)  # [b, N+1]
        g = torch.zeros_like(x, dtype=torch.bool)
        g[:, P + sampled :] = True
        xs.append(x)
        greedy.append(g)
        todo -= b
    return torch.cat(xs), torch.cat(greedy)


def position_weights(seq_len: int, block_len: int, gamma: float) -> torch.Tensor:
    """[N] weight of each mask row: gamma**(offset inside its block), normalised to mean 1 over a block."""
    k = torch.arange(seq_len) % block_len
    w = gamma ** k.double()
    return (w / w[:block_len].mean()).float()


def distill_loss(model: ZayaForCausalLM, teacher: ZayaForCausalLM, layout: PackedLayout, x: torch.Tensor,
                 greedy: torch.Tensor, weights: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, dict]:
    """x [B, N+1], greedy [B, N+1] → (loss, parts). Draft rows t are trained on x_t only where x_t is a
    greedy token; AR rows are pulled to the teacher's next-token distribution."""
    N = x.shape[1] - 1
    logits = training_logits(model, layout, x)  # [B, 2N, V]
    V = logits.shape[-1]
    with torch.no_grad():
        t_logits, _ = teacher.step(x[:, :N], teacher.empty_past(x.shape[0]))  # [B, N, V] causal
    ar_logp = F.log_softmax(logits[:, :N].float(), -1)
    t_logp = F.log_softmax(t_logits.float(), -1)
    kl = (t_logp.exp() * (t_logp - ar_logp)).sum(-1).mean()
    target = greedy[:, :N].float() * weights[None, :]  # [B, N]
    ce = F.cross_entropy(logits[:, N:].reshape(-1, V).float(), x[:, :N].reshape(-1), reduction="none")
    draft = (ce * target.reshape(-1)).sum() / target.sum().clamp_min(1.0)
    with torch.no_grad():
        hit = (logits[:, N:].argmax(-1) == x[:, :N]) & greedy[:, :N]
        first = greedy[:, :N] & (torch.arange(N) % layout.block_len == 0)
    parts = {"draft": draft.item(), "kl": kl.item(),
             "draft_top1": hit.sum().item() / max(1, int(greedy[:, :N].sum())),
             "draft_top1_first": (hit & first).sum().item() / max(1, int(first.sum()))}
    return draft + kl_weight * kl, parts


def distill(model: ZayaForCausalLM, teacher: ZayaForCausalLM, train_ids: np.ndarray, settings: DistillSettings,
            evaluate_round: Callable[[ZayaForCausalLM], dict], end_round: Callable[[ZayaForCausalLM, dict], None],
            log: Callable[[str], None] = print, start_round: int = 0) -> None:
    """Run rounds ``start_round .. settings.rounds-1``, each: generate, train, evaluate (``evaluate_round``
    returns a dict of figures), then ``end_round(model, record)`` (save it). ``teacher`` is the frozen stage-1
    model the AR rows are held to (the same one when resuming). Each round's randomness depends only on the
    seed and the round number, so a resumed run is the run that was cut."""
    torch.set_num_threads(settings.threads)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    config = model.config
    layout = training_layout(settings.seq_len, config.diffusion_block_len, config.conv_history)
    weights = position_weights(settings.seq_len, config.diffusion_block_len, settings.gamma)
    for rnd in range(start_round, settings.rounds):
        torch.manual_seed(settings.seed * 1000 + rnd)
        gen = np.random.default_rng(settings.seed * 1000 + rnd)
        t0 = time.time()
        x_all, g_all = generate_sequences(model, train_ids, settings, gen)
        log(f"round {rnd}: generated {len(x_all)} sequences in {time.time() - t0:.0f}s "
            f"({g_all.float().mean():.0%} greedy tokens)")
        opt = adamw(model, settings.lr, weight_decay=0.01)
        model.train()
        parts_log: list[dict] = []
        for step in range(settings.steps_per_round):
            frac = step / max(1, settings.steps_per_round - 1)
            lr = settings.lr * min(1.0, (step + 1) / settings.warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
            for group in opt.param_groups:
                group["lr"] = lr
            pick = torch.from_numpy(gen.integers(0, len(x_all), size=settings.distilled_rows))
            loss, parts = distill_loss(model, teacher, layout, x_all[pick], g_all[pick], weights, settings.kl_weight)
            if settings.real_rows:
                real, ar, diff = tidar_loss(model, layout, windows(train_ids, settings.seq_len, settings.real_rows,
                                                                    gen), 1.0)
                share = settings.real_rows / (settings.real_rows + settings.distilled_rows)
                loss = (1 - share) * loss + share * real
                parts.update(real_ar=ar, real_diff=diff)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            parts_log.append(parts)
            if step % 25 == 0 or step == settings.steps_per_round - 1:
                mean = {k: float(np.mean([p[k] for p in parts_log[-25:]])) for k in parts}
                log(f"round {rnd} step {step:4d}  " + "  ".join(f"{k} {v:.3f}" for k, v in mean.items())
                    + f"  {time.time() - t0:.0f}s")
        model.eval()
        figures = evaluate_round(model)
        record = {"round": rnd, "seconds": round(time.time() - t0, 1),
                  "train": {k: round(float(np.mean([p[k] for p in parts_log[-50:]])), 4) for k in parts_log[-1]},
                  **figures}
        log(f"round {rnd}: " + json.dumps(figures))
        end_round(model, record)


DISTILL_DIR = "distill"  # inside the checkpoint: stage-1 copy, one checkpoint per round, log.json
EVAL_RUNS = {"tidar": dict(fused=False), "tidar-fused": dict(fused=True)}


def round_evaluator(tokenizer, held_ids: np.ndarray, settings: DistillSettings  # noqa: ANN001
                    ) -> Callable[[ZayaForCausalLM], dict]:
    """Per-round figures: held-out AR perplexity (4 fixed batches) and greedy TiDAR tokens per forward on
    prompts from code the model never saw (``demo_card.foreign_prompts``)."""
    from .demo_card import foreign_prompts, tidar_figures
    from .train_demo import evaluate

    prompts = foreign_prompts(tokenizer, count=settings.eval_prompts, length=48)

    def run(model: ZayaForCausalLM) -> dict:
        layout = training_layout(settings.seq_len, model.config.diffusion_block_len, model.config.conv_history)
        ar, diff = evaluate(model, layout, held_ids, settings.seq_len, batches=4)
        rows, same = tidar_figures(model, prompts, settings.eval_tokens, EVAL_RUNS)
        return {"heldout_ar_ppl": round(math.exp(ar), 3), "heldout_diffusion_nats": round(diff, 4),
                "foreign": {k: {"tokens_per_forward": v["tokens_per_forward"],
                                "mean_accepted": v["mean_accepted"]} for k, v in rows.items()},
                "equals_ar": f"{sum(same)}/{len(same)}"}

    return run


def distill_checkpoint(checkpoint: Path, settings: DistillSettings, log: Callable[[str], None] = print) -> dict:
    """Stage 2 of ``train-demo`` on a trained ``checkpoint``, resumable per round.

    ``checkpoint/distill/stage1`` keeps the model it started from (the teacher, and what a rerun starts from:
    the stage-1 model on a first pass, the distilled one on a further pass, whose record ``train_log.json`` keeps
    in ``distill_passes`` beside the earlier ones);
    ``distill/round-N`` is the model after round N, ``distill/log.json`` the settings and per-round figures. A
    rerun with the same settings continues after the last finished round. At the end the last round's weights
    replace ``checkpoint``'s (same config, same file layout) and the stage-2 record goes into ``train_log.json``.
    Returns that record.
    """
    import os
    import shutil

    from zaya_export.models.checkpoint import load_checkpoint, save_checkpoint
    from zaya_export.runtime.tokenizer import load_tokenizer

    from .corpus import encode_files, stdlib_corpus

    work = checkpoint / DISTILL_DIR
    stage1, log_path = work / "stage1", work / "log.json"
    tokenizer = load_tokenizer(checkpoint / "tokenizer.json")
    if not stage1.is_dir():
        save_checkpoint(load_checkpoint(checkpoint), stage1, tokenizer_json=tokenizer.to_str(), dtype=torch.float16)
    record = json.loads(log_path.read_text()) if log_path.is_file() else {"settings": settings_dict(settings)}
    if record["settings"] != settings_dict(settings):
        raise ValueError(f"{log_path}: written with other settings; remove {work} to start over")
    record.setdefault("rounds", [])
    teacher = load_teacher(Path(settings.teacher) if settings.teacher else stage1, stage1)
    corpus = stdlib_corpus()
    eos = teacher.config.eos_token_ids[0]
    train_ids = encode_files(tokenizer, corpus.train, eos)
    held_ids = encode_files(tokenizer, corpus.heldout, eos)
    evaluate = round_evaluator(tokenizer, held_ids, settings)

    def write_log() -> None:
        tmp = log_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, log_path)

    if "stage1" not in record:
        record["stage1"] = evaluate(teacher)
        log("stage-1 model: " + json.dumps(record["stage1"]))
        write_log()

    def end_round(model: ZayaForCausalLM, rec: dict) -> None:
        save_checkpoint(model, work / f"round-{rec['round']}", tokenizer_json=tokenizer.to_str(),
                        dtype=torch.float16, overwrite=True)
        record["rounds"].append(rec)
        write_log()

    start = len(record["rounds"])
    model = load_checkpoint(work / f"round-{start - 1}" if start else stage1, dtype="fp32")
    if settings.grow_layers and not start:  # a resumed pass loads an already grown round
        from .grow_demo import grown

        model = grown(model, settings.grow_layers, settings.grow_seed)
        log(f"grown to {model.config.num_hidden_layers} layers "
            f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters)")
    distill(model, teacher, train_ids, settings, evaluate, end_round, log, start)
    last = work / f"round-{settings.rounds - 1}"
    names = ["model.safetensors"] + (["config.json", "generation_config.json"] if settings.grow_layers else [])
    for name in names:  # a grown model brings its config (more layers)
        tmp = checkpoint / f"{name}.tmp"
        shutil.copyfile(last / name, tmp)
        os.replace(tmp, checkpoint / name)
    train_log = json.loads((checkpoint / "train_log.json").read_text())
    if "distill" in train_log:  # a further pass on an already distilled checkpoint: keep the earlier record
        train_log.setdefault("distill_passes", []).append(train_log["distill"])
    train_log["distill"] = record
    (checkpoint / "train_log.json").write_text(json.dumps(train_log) + "\n")
    return record


def load_teacher(path: Path, start: Path) -> ZayaForCausalLM:
    """The frozen model the AR rows are held to: by default the model a pass starts from; a further pass may
    name an earlier one (e.g. the stage-1 model), so AR drift does not compound pass after pass. It must have
    the starting model's config (same tokenizer, same shapes) up to its depth: a pass that grows the student
    may hold it to a shallower teacher."""
    from zaya_export.models.checkpoint import load_checkpoint

    teacher = load_checkpoint(path, dtype="fp32")
    if path != start:
        ours = json.loads((start / "config.json").read_text())
        theirs = json.loads((path / "config.json").read_text())
        free = {"dtype", "num_hidden_layers", "layer_types"}
        differ = sorted(k for k in set(ours) | set(theirs) if k not in free and ours.get(k) != theirs.get(k))
        if differ:
            raise ValueError(f"teacher {path}: its config differs from the model being distilled in "
                             f"{', '.join(differ)}")
    return teacher


def settings_dict(settings: DistillSettings) -> dict:
    """The settings as JSON would give them back (tuples as lists), for comparing with a saved log."""
    return json.loads(json.dumps(asdict(settings)))
