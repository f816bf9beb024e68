"""The demo checkpoint's training: the TiDAR training layout is exactly the inference layouts, the corpus split
is fixed and disjoint, and a short training run writes a loadable checkpoint with its logs and plot."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import random_model, small_config
from zaya_export.models.checkpoint import load_checkpoint
from zaya_export.corpus import stdlib_corpus
from zaya_export.models import Past
from zaya_export.models.layout import BIDIRECTIONAL
from zaya_export.models.packed import training_layout
from zaya_export.train_demo import TrainSettings, tidar_loss, train


@pytest.mark.parametrize("window", [0, 8])
def test_training_layout_is_ar_then_draft_after_each_block(window):
    """Clean rows equal the plain causal forward; mask block β equals a bidirectional draft of B masks made
    after committing x_0..x_{βB-1} (CCA conv/value seeded from the clean history), with sliding windows too."""
    cfg = small_config(num_hidden_layers=2, layer_types=["hybrid", "hybrid_sliding"], sliding_window=window or 64)
    model = random_model(cfg, seed=2)
    N, B, M = 32, 8, cfg.mask_token_id
    layout = training_layout(N, B, cfg.conv_history)
    x = torch.randint(5, cfg.vocab_size, (2, N), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, _ = model.step(torch.cat([x, torch.full_like(x, M)], 1), model.empty_past(2), layout=layout)
        assert (logits[:, :N] - model(x)).abs().max().item() <= 1e-4
        for beta in range(N // B):
            s, past = beta * B, model.empty_past(2)
            if s:
                _, up = model.step(x[:, :s], past)
                past = Past(up.k, up.v, torch.ones(2, s, dtype=torch.bool), *up.committed(torch.full((2,), s), past.rho))
            draft, _ = model.step(torch.full((2, B), M), past, layout=BIDIRECTIONAL)
            assert (logits[:, N + s : N + s + B] - draft).abs().max().item() <= 1e-4, beta
    with pytest.raises(ValueError, match="multiple of the block length"):
        training_layout(30, 8, 2)


def test_tidar_loss_trains_both_halves():
    model = random_model(small_config(), seed=3).train()
    layout = training_layout(16, 8, model.config.conv_history)
    x = torch.randint(5, 64, (4, 17), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = tidar_loss(model, layout, x, 1.0)
    for _ in range(15):
        loss, _, _ = tidar_loss(model, layout, x, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, ar, diff = tidar_loss(model, layout, x, 1.0)
    assert ar < first[1] - 0.5 and diff < first[2] - 0.5, (first, ar, diff)


def test_corpus_split_is_fixed_and_disjoint():
    a, b = stdlib_corpus(), stdlib_corpus()
    assert a.train == b.train and a.heldout == b.heldout and not set(a.train) & set(a.heldout)
    assert len(a.heldout) >= 10 and len(a.train) > 10 * len(a.heldout)
    assert not any("test" in p.relative_to(a.root).parts for p in a.train)


def test_short_training_run_writes_a_loadable_checkpoint(tmp_path):
    model_cfg = dict(TrainSettings().model, hidden_size=64, head_dim=16, moe_intermediate_size=64,
                     router_hidden_size=16, num_hidden_layers=2, layer_types=["hybrid", "hybrid_sliding"])
    settings = TrainSettings(steps=3, batch=2, seq_len=32, vocab_size=512, eval_every=2, model=model_cfg)
    out = tmp_path / "demo"
    metrics = train(out, settings, log=lambda msg: None)
    assert metrics["steps_run"] == 3 and metrics["unigram_nats"] > 0
    model = load_checkpoint(out, dtype="fp32")
    assert model.config.mask_token_id == 4 and model.config.diffusion_block_len == 16
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = json.loads((out / "train_log.json").read_text())["history"]
    assert len(history["ar"]) == 3 and history["eval_step"] == [0, 2]
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()


def test_model_card_shows_both_stages_and_the_histograms(tmp_path):
    """The card of a self-distilled checkpoint: foreign-code figures, the stage-2 command and per-round table,
    the AR perplexity after stage 2, and the acceptance-histogram plot."""
    import shutil
    from pathlib import Path

    from zaya_export.demo_card import write_card
    from zaya_export.self_distill import DistillSettings, settings_dict

    demo = Path(__file__).resolve().parent.parent / "models" / "zaya1-demo"
    shutil.copy(demo / "train_log.json", tmp_path / "train_log.json")
    shutil.copy(demo / "config.json", tmp_path / "config.json")
    log = json.loads((tmp_path / "train_log.json").read_text())
    log.pop("distill", None)
    log.pop("distill_passes", None)
    row = lambda tf, ff, ppl: {"heldout_ar_ppl": ppl, "equals_ar": "10/10",  # noqa: E731
                               "foreign": {"tidar": {"tokens_per_forward": tf}, "tidar-fused": {"tokens_per_forward": ff}}}
    log["distill"] = {"settings": settings_dict(DistillSettings(rounds=2)), "stage1": row(1.1, 1.38, 21.3),
                      "rounds": [{"round": 0, "seconds": 60.0, **row(1.39, 1.75, 21.9)},
                                 {"round": 1, "seconds": 60.0, **row(1.55, 1.84, 22.2)}]}
    (tmp_path / "train_log.json").write_text(json.dumps(log))
    hist = [3, 2, 1] + [0] * 14
    mode = lambda tpf: {"tokens_per_forward": tpf, "mean_accepted": 0.5, "acceptance": hist}  # noqa: E731
    runs = ("tidar (lossless)", "tidar-fused (lossless)", "tidar (mix w=0.5)", "tidar-fused (mix w=0.5)")
    figures = {"prompts": 8, "new_tokens": 96, "modes": {r: mode(1.5) for r in runs},
               "foreign": {r: mode(1.6) for r in runs}, "greedy_tidar_equals_ar": "26/26",
               "sample_prompt": "def f():", "sample_output": "    return 1", "heldout_ar_ppl": 24.0}
    card = write_card(tmp_path, figures).read_text()
    assert "--stage distill --distill-rounds 2" in card
    assert "| round 1 | 1.55 | 1.84 | 22.2 | 10/10 |" in card and "| stage 1 | 1.1 | 1.38 | 21.3 | 10/10 |" in card
    assert "AR perplexity after stage 2 (4 held-out batches) | 22.2 (stage 1 on the same batches: 21.3)" in card
    assert "foreign code" in card and "| tidar-fused (lossless) | 1.6 |" in card
    stage1 = log["metrics"]["heldout_ar_ppl"]
    assert f"| AR perplexity of these weights (the same 8 batches) | 24.0 ({100 * (24.0 / stage1 - 1):+.1f}% vs stage 1) |" in card
    assert (tmp_path / "acceptance.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "figures.json").read_text())["foreign"]["tidar (lossless)"]["acceptance"] == hist
    # a further pass on the distilled checkpoint keeps the first pass's record and table rows
    log["distill_passes"] = [log["distill"]]
    log["distill"] = {"settings": settings_dict(DistillSettings(rounds=1)), "stage1": row(1.6, 1.9, 22.5),
                      "rounds": [{"round": 0, "seconds": 60.0, **row(1.85, 2.2, 23.2)}]}
    (tmp_path / "train_log.json").write_text(json.dumps(log))
    card = write_card(tmp_path, figures).read_text()
    assert "| pass 1, round 1 | 1.55 | 1.84 | 22.2 | 10/10 |" in card and "| pass 2, round 0 | 1.85 | 2.2 | 23.2 |" in card
    assert "--stage distill --distill-rounds 2   # pass 1" in card
    assert "--stage distill --distill-rounds 1   # pass 2" in card
    assert "| 23.2 (stage 1 on the same batches: 21.3)" in card  # against the first pass's starting model
    # a third pass held to the stage-1 model with other options: its command names them, and the stage-1 model is
    # moved out of the first pass's folder before that folder is cleared
    log["distill_passes"].append(log["distill"])
    third = DistillSettings(rounds=1, teacher="/somewhere/stage1", real_rows=8, distilled_rows=8, kl_weight=1.5)
    log["distill"] = {"settings": settings_dict(third), "stage1": row(1.85, 2.2, 23.2),
                      "rounds": [{"round": 0, "seconds": 60.0, **row(1.99, 2.29, 22.3)}]}
    (tmp_path / "train_log.json").write_text(json.dumps(log))
    card = write_card(tmp_path, figures).read_text()
    commands = card.split("```\n")[3]  # the stage-2 block (after the training command's)
    assert commands.splitlines() == [
        "zaya-export train-demo models/zaya1-demo --stage distill --distill-rounds 2   # pass 1",
        "mv models/zaya1-demo/distill/stage1 STAGE1 && rm -rf models/zaya1-demo/distill",
        "zaya-export train-demo models/zaya1-demo --stage distill --distill-rounds 1   # pass 2",
        "rm -rf models/zaya1-demo/distill",
        "zaya-export train-demo models/zaya1-demo --stage distill --distill-rounds 1 --teacher STAGE1 --kl-weight 1.5 "
        "--real-rows 8   # pass 3"]
    assert "| pass 3, round 0 | 1.99 | 2.29 | 22.3 |" in card
