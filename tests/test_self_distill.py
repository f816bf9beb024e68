"""The self-distillation stage: its generated sequences mark exactly the tokens that are the model's greedy
choice, the draft loss weighs only those (position-weighted), and the AR half is held to the teacher by KL."""

from __future__ import annotations

import numpy as np
import torch

from conftest import random_model, small_config
from zaya_export.models.packed import training_layout
from zaya_export.self_distill import DistillSettings, distill_loss, generate_sequences, position_weights


def _model():
    cfg = small_config(num_hidden_layers=2, layer_types=["hybrid", "hybrid_sliding"], sliding_window=64)
    return random_model(cfg, seed=3)


def test_position_weights_decay_inside_each_block_with_mean_one():
    w = position_weights(32, 8, 0.5)
    assert torch.allclose(w[:8], w[8:16]) and torch.all(w[:7] > w[1:8])
    assert abs(float(w[:8].mean()) - 1.0) < 1e-6
    assert torch.allclose(position_weights(16, 8, 1.0), torch.ones(16))


def test_generated_greedy_tokens_are_the_models_argmax():
    model = _model()
    stream = np.random.default_rng(0).integers(5, model.config.vocab_size, 4000).astype(np.int32)
    settings = DistillSettings(sequences_per_round=5, prompt_len=8, seq_len=24, sampled_lens=(4,), gen_batch=3,
                               temperature=1.0)
    x, greedy = generate_sequences(model, stream, settings, np.random.default_rng(1))
    assert x.shape == greedy.shape == (5, 25)
    assert not greedy[:, :12].any() and greedy[:, 12:].all()  # prompt, 4 sampled, then greedy
    with torch.no_grad():
        logits, _ = model.step(x[:, :-1], model.empty_past(5))  # [5, 24, V] causal
    assert torch.equal(logits.argmax(-1)[:, 11:], x[:, 12:])  # every greedy token is argmax of its prefix


def test_distill_loss_weighs_greedy_tokens_only_and_kl_is_zero_against_itself():
    model = _model()
    cfg = model.config
    N, K = 16, cfg.diffusion_block_len
    layout = training_layout(N, K, cfg.conv_history)
    x = torch.randint(5, cfg.vocab_size, (2, N + 1), generator=torch.Generator().manual_seed(0))
    weights = position_weights(N, K, 0.8)
    none = torch.zeros_like(x, dtype=torch.bool)
    loss, parts = distill_loss(model, model, layout, x, none, weights, kl_weight=1.0)
    assert parts["draft"] == 0.0 and abs(parts["kl"]) < 1e-5 and abs(float(loss.detach())) < 1e-5
    everything = torch.ones_like(none)
    _, parts = distill_loss(model, model, layout, x, everything, weights, kl_weight=1.0)
    assert parts["draft"] > 1.0  # a random model's drafts are far from x
    one = none.clone()
    one[0, 3] = True  # a single greedy token: the draft loss is its cross-entropy, whatever its weight
    _, single = distill_loss(model, model, layout, x, one, weights, kl_weight=1.0)
    with torch.no_grad():
        from zaya_export.train_demo import training_logits

        logits = training_logits(model, layout, x)
    ce = torch.nn.functional.cross_entropy(logits[0, N + 3].float()[None], x[0, 3][None])
    assert abs(single["draft"] - float(ce)) < 1e-4 * max(1.0, float(ce))


def test_teacher_must_share_the_students_config(tmp_path):
    """A pass may hold the AR rows to an earlier model (``--teacher``), but only one of the same shapes."""
    import pytest

    from zaya_export.models.checkpoint import save_checkpoint
    from zaya_export.self_distill import load_teacher

    student = save_checkpoint(_model(), tmp_path / "student")
    same = save_checkpoint(random_model(_model().config, seed=9), tmp_path / "same")
    other_cfg = small_config(num_hidden_layers=2, layer_types=["hybrid", "hybrid_sliding"], sliding_window=32)
    other = save_checkpoint(random_model(other_cfg, seed=3), tmp_path / "other")
    teacher = load_teacher(same, student)
    assert not torch.equal(next(teacher.parameters()), next(_model().parameters()))
    with pytest.raises(ValueError, match="sliding_window"):
        load_teacher(other, student)


def test_train_demo_options_reach_the_distill_settings(tmp_path, monkeypatch):
    """``--teacher``, ``--kl-weight``, ``--real-rows``, ``--gamma``, ``--grow-layers`` and ``--threads`` set the
    pass's recipe (the batch keeps its 16 rows: what real windows take, the distilled rows give up); an
    out-of-range row count or γ is a usage error."""
    from click.testing import CliRunner

    import zaya_export.demo_card as demo_card
    import zaya_export.self_distill as self_distill
    from zaya_export.cli import main

    seen = []
    monkeypatch.setattr(self_distill, "distill_checkpoint", lambda out, settings, log: seen.append(settings))
    monkeypatch.setattr(demo_card, "measure", lambda out: {"modes": {}})
    monkeypatch.setattr(demo_card, "write_card", lambda out, figures: out / "README.md")
    (tmp_path / "train_log.json").write_text("{}")
    (tmp_path / "teacher").mkdir()
    args = ["train-demo", str(tmp_path), "--stage", "distill", "--distill-rounds", "1",
            "--teacher", str(tmp_path / "teacher"), "--kl-weight", "1.5", "--real-rows", "8", "--gamma", "0.9",
            "--grow-layers", "2", "--threads", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    default = DistillSettings()
    (settings,) = seen
    assert (settings.rounds, settings.teacher, settings.kl_weight) == (1, str((tmp_path / "teacher").resolve()), 1.5)
    assert (settings.real_rows, settings.distilled_rows) == (8, default.real_rows + default.distilled_rows - 8)
    assert (settings.gamma, settings.grow_layers, settings.threads) == (0.9, 2, 2)
    bad = CliRunner().invoke(main, ["train-demo", str(tmp_path), "--stage", "distill", "--real-rows", "16"])
    assert bad.exit_code == 2 and "--real-rows" in bad.output
    bad = CliRunner().invoke(main, ["train-demo", str(tmp_path), "--stage", "distill", "--gamma", "1.5"])
    assert bad.exit_code == 2 and "--gamma" in bad.output


def test_a_growing_pass_distills_a_deeper_model_and_records_how(tmp_path):
    """``--grow-layers``: the pass appends silent layers to the model it starts from (the first round only; a
    resumed pass loads the grown round), the checkpoint gets the deeper config, the shallower stage-1 copy stays
    the teacher, and the card's command replays it."""
    import json

    from zaya_export.demo_card import _pass_commands
    from zaya_export.models.checkpoint import load_checkpoint
    from zaya_export.self_distill import distill_checkpoint, settings_dict
    from zaya_export.train_demo import TrainSettings, train

    model_cfg = dict(TrainSettings().model, hidden_size=64, head_dim=16, moe_intermediate_size=64,
                     router_hidden_size=16, num_hidden_layers=2, layer_types=["hybrid", "hybrid_sliding"])
    out = tmp_path / "demo"
    train(out, TrainSettings(steps=2, batch=2, seq_len=32, vocab_size=512, eval_every=2, model=model_cfg),
          log=lambda msg: None)
    settings = DistillSettings(rounds=1, steps_per_round=2, sequences_per_round=4, gen_batch=4, seq_len=32,
                               prompt_len=16, sampled_lens=(0,), distilled_rows=2, real_rows=1, eval_prompts=1,
                               eval_tokens=4, grow_layers=1, threads=2)
    lines: list[str] = []
    record = distill_checkpoint(out, settings, log=lines.append)
    assert any("grown to 3 layers" in line for line in lines)
    model = load_checkpoint(out, dtype="fp32")
    assert model.config.num_hidden_layers == 3 and model.config.layer_types[-1] == "hybrid"
    assert load_checkpoint(out / "distill" / "stage1").config.num_hidden_layers == 2
    assert load_checkpoint(out / "distill" / "round-0").config.num_hidden_layers == 3
    assert record["settings"] == settings_dict(settings) and len(record["rounds"]) == 1
    assert json.loads((out / "train_log.json").read_text())["distill"] == record
    commands = _pass_commands([record])
    assert commands == ("zaya-export train-demo models/zaya1-demo --stage distill --distill-rounds 1 "
                        "--real-rows 1 --grow-layers 1 --threads 2   # pass 1")
