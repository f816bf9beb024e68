"""The static-shape decode step of the GPU path (``runtime/graph_decode.py``), checked on the CPU with the
reference ops (no graph capture here): the whole fixed-capacity cache with empty slots masked gives exactly
the greedy tokens of the model's own decode loop, with left padding and batch > 1."""

from __future__ import annotations

import pytest
import torch

from conftest import random_model, small_config
from zaya_export.runtime.generate import generate_greedy, left_pad
from zaya_export.runtime.graph_decode import generate_static, torch_device


@pytest.mark.parametrize("prompts", [[[5, 9, 33, 7]], [[5, 9, 33, 7, 81], [2, 44]]])
def test_static_decode_equals_the_eager_loop(prompts) -> None:
    model = random_model(small_config(num_hidden_layers=2, layer_types=["hybrid", "hybrid_sliding"],
                                      sliding_window=4), seed=2)
    want = generate_greedy(model, prompts, 7).tokens
    ids, mask = (torch.from_numpy(a) for a in left_pad(prompts, 0))
    got, tok_per_s = generate_static(model, ids, 7, mask.bool() if (mask == 0).any() else None,
                                     kernels_on=False, graph=False)
    assert got.tolist() == want and tok_per_s > 0


def test_device_names() -> None:
    assert torch_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="unknown device"):
        torch_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no GPU"):
            torch_device("hip")


def test_run_gpu_device_errors_are_one_line(tmp_path) -> None:
    """``run --backend torch --device cuda|hip``: without a GPU (or with TiDAR/sampling asked for) one
    ``error:`` line and exit 2."""
    from click.testing import CliRunner

    from zaya_export.cli import main

    runner = CliRunner()
    ckpt = tmp_path / "tiny"
    assert runner.invoke(main, ["init", "--preset", "tiny", "--seed", "1", str(ckpt)]).exit_code == 0
    cases = [(["--device", "cuda", "--mode", "tidar"], "greedy decoding"),
             (["--device", "hip", "--temperature", "0.7"], "greedy decoding")]
    if not torch.cuda.is_available():
        cases += [(["--device", "hip"], "sees no GPU"), (["--device", "cuda", "--mode", "ar"], "sees no GPU")]
    for extra, message in cases:
        result = runner.invoke(main, ["run", str(ckpt), "--prompt-ids", "2,5,9", "--backend", "torch", *extra])
        lines = [line for line in result.output.strip().splitlines() if line]
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.output
        assert message in lines[0], lines[0]


@pytest.mark.parametrize("prompts", [[[5, 9, 33, 7]], [[5, 9, 33, 7, 81], [2, 44]]])
def test_static_fused_tidar_equals_greedy_ar(prompts) -> None:
    """Greedy lossless fused TiDAR with the in-graph acceptance on static buffers emits exactly greedy AR's
    tokens (a random drafter: ℓ is mostly 0, the rows finish at different steps)."""
    from zaya_export.runtime.graph_tidar import generate_tidar_static

    model = random_model(small_config(num_hidden_layers=2, layer_types=["hybrid", "hybrid_sliding"],
                                      sliding_window=4), seed=2)
    want = generate_greedy(model, prompts, 9).tokens
    ids, mask = (torch.from_numpy(a) for a in left_pad(prompts, 0))
    got = generate_tidar_static(model, ids, 9, mask.bool() if (mask == 0).any() else None,
                                kernels_on=False, graph=False, block_len=3, levels=(0, 2, 3))
    assert got.tokens == want and 1 <= got.steps <= 8 and sum(got.acceptance) == sum(map(len, got.lengths))


def test_static_fused_tidar_on_the_trained_demo_model() -> None:
    """On the shipped TiDAR-trained demo checkpoint drafts do get accepted (fewer steps than tokens), and the
    fused static step still emits exactly greedy AR's tokens."""
    from pathlib import Path

    from zaya_export.models import load_checkpoint
    from zaya_export.runtime.graph_tidar import generate_tidar_static
    from zaya_export.runtime.tokenizer import load_tokenizer

    demo = Path(__file__).resolve().parent.parent / "models" / "zaya1-demo"
    model = load_checkpoint(demo).eval()
    ids = load_tokenizer(demo / "tokenizer.json").encode("def read_config(path):\n    with open(").ids
    want = generate_greedy(model, [ids], 24).tokens
    got = generate_tidar_static(model, torch.tensor([ids]), 24, kernels_on=False, graph=False)
    assert got.tokens == want and got.steps < 23 and got.mean_accepted > 0
