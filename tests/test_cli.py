"""The CLI: init → run round trip, --json, and one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from zaya_export.models.checkpoint import load_checkpoint
from zaya_export.cli import main
from zaya_export.runtime.generate import generate_greedy


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tiny"
    result = CliRunner().invoke(main, ["init", "--preset", "tiny", "--seed", "3", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_help_on_every_command():
    for cmd in ([], ["init"], ["run"], ["export"], ["inspect"], ["validate"], ["bench"]):
        result = _run(*cmd, "--help")
        assert result.exit_code == 0 and "Usage" in result.output


def test_init_writes_hf_layout_that_loads(ckpt):
    assert {p.name for p in ckpt.iterdir()} == {".zaya-export", "config.json", "generation_config.json",
                                                "model.safetensors",
                                                "tokenizer.json"}
    config = json.loads((ckpt / "config.json").read_text())
    assert config["model_type"] == "zaya" and config["mask_token_id"] == 4 and config["diffusion_block_len"] == 16
    model = load_checkpoint(ckpt)
    assert model.config.num_hidden_layers == 2
    same_seed = _run("init", "--preset", "tiny", "--seed", "3", ckpt.parent / "again")
    assert same_seed.exit_code == 0
    assert (ckpt / "model.safetensors").read_bytes() == (ckpt.parent / "again" / "model.safetensors").read_bytes()


def test_run_json_matches_the_generation_loop(ckpt):
    result = _run("run", ckpt, "--prompt-ids", "2,17,301,44", "--max-new-tokens", "12", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) == {"tokens", "text", "forwards", "tokens_per_forward", "tok_per_s", "backend", "mode",
                           "time_to_first_token_s", "auto"}
    assert report["backend"] == "torch" and report["mode"] == "ar"  # --mode auto: a checkpoint has no calibration
    assert report["auto"]["chosen"] == "ar" and "calibration" in report["auto"]["reason"]
    model = load_checkpoint(ckpt)
    expected = generate_greedy(model, [[2, 17, 301, 44]], 12, model.config.eos_token_ids)
    assert report["tokens"] == expected.tokens[0]
    assert report["forwards"] == len(report["tokens"]) and report["tokens_per_forward"] == 1.0
    assert isinstance(report["text"], str) and report["tok_per_s"] > 0


def test_run_text_prompt(ckpt):
    result = _run("run", ckpt, "--prompt", "def main():", "--max-new-tokens", "5")
    assert result.exit_code == 0, result.output
    assert re.search(r"\[\d+ tokens, \d+ forwards, 1.0 tokens/forward, [\d.]+ tok/s, torch, ar\]", result.stderr)
    assert "acceptance histogram" not in result.stderr  # AR drafts nothing


def test_run_tidar_prints_the_acceptance_histogram(ckpt):
    result = _run("run", ckpt, "--prompt", "def main():", "--max-new-tokens", "12", "--mode", "tidar")
    assert result.exit_code == 0, result.output
    assert re.search(r"\[\d+ tokens, \d+ forwards, [\d.]+ tokens/forward, [\d.]+ tok/s, torch, tidar, "
                     r"mean accepted [\d.]+\]", result.stderr)
    hist = re.search(r"\[acceptance histogram, steps by drafts accepted: ((?:\d+:\d+ ?)+)\]", result.stderr)
    assert hist is not None
    counts = [tuple(map(int, pair.split(":"))) for pair in hist[1].split()]
    assert [n for n, _ in counts] == list(range(17))  # ℓ = 0..K, K = 16
    report = json.loads(_run("run", ckpt, "--prompt", "def main():", "--max-new-tokens", "12", "--mode", "tidar",
                             "--json").stdout)
    assert [c for _, c in counts] == report["acceptance"]


@pytest.mark.parametrize("args, message", [
    (["--prompt-ids", "2,5,5000"], "token id 5000 is out of range"),
    (["--prompt-ids", "2,-1"], "token id -1 is out of range"),
    (["--prompt-ids", "2,x"], "comma-separated integers"),
    (["--prompt-ids", ""], "the prompt is empty"),
    ([], "exactly one of --prompt or --prompt-ids"),
    (["--prompt", "a", "--prompt-ids", "1"], "exactly one of"),
    (["--prompt-ids", ",".join(["7"] * 4090), "--max-new-tokens", "10"], "exceeds the context of 4096"),
])
def test_run_bad_input(ckpt, args, message):
    result = _run("run", ckpt, *args)
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.output


def test_run_text_prompt_without_tokenizer(ckpt, tmp_path):
    import shutil
    copy = tmp_path / "notok"
    shutil.copytree(ckpt, copy)
    (copy / "tokenizer.json").unlink()
    result = _run("run", copy, "--prompt", "hi")
    assert result.exit_code == 2 and "tokenizer.json: missing" in result.stderr
    assert _run("run", copy, "--prompt-ids", "2,3", "--max-new-tokens", "2").exit_code == 0


def test_init_refuses_existing_output(ckpt):
    result = _run("init", ckpt)
    assert result.exit_code == 2 and "already exists" in result.stderr


def test_bad_checkpoint_through_the_real_entry_point(ckpt, tmp_path):
    """A subprocess, as a user runs it: one error line on stderr, exit code 2, no traceback."""
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    proc = subprocess.run([sys.executable, "-m", "zaya_export.cli", "run", str(broken), "--prompt-ids", "2"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {broken / 'model.safetensors'}: truncated: tensors need "
        f"{len(data) - 8 - int.from_bytes(data[:8], 'little')} data bytes but the file holds "
        f"{len(data) // 2 - 8 - int.from_bytes(data[:8], 'little')}"
    ]
    assert proc.stdout == ""


def test_init_json_and_small_dtypes(tmp_path):
    result = _run("init", "--preset", "tiny", "--dtype", "fp16", "--json", tmp_path / "half")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["params"] > 1_000_000
    for dtype in ("fp16", "bf16"):
        model = load_checkpoint(tmp_path / "half", dtype=dtype)
        ids = torch.randint(5, 1000, (2, 21), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = model(ids)
        assert logits.dtype == model.dtype and torch.isfinite(logits).all()
        with torch.no_grad():
            ref = load_checkpoint(tmp_path / "half", dtype="fp32")(ids)
        agree = (logits.float().argmax(-1) == ref.argmax(-1)).float().mean().item()
        assert agree >= 0.9, (dtype, agree)
