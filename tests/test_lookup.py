"""Context-lookup drafts (``runtime.lookup``): the continuation found is the one defined (longest suffix, most
recent occurrence, loops copied with overlap), and TiDAR with it stays lossless (greedy token for token,
sampling in distribution) while accepting more where the text repeats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import zaya_export.runtime.tidar as tidar
from conftest import random_model, small_config
from test_tidar import CHI2_999, _chi2_homogeneity, _first_tokens, make_stats_model
from zaya_export.runtime.calibration import Calibration
from zaya_export.runtime.generate import generate, generate_greedy
from zaya_export.runtime.lookup import continuation, with_lookup
from zaya_export.runtime.sampling import SamplerConfig
from zaya_export.runtime.session import Session

DEMO = Path(__file__).resolve().parents[1] / "models" / "zaya1-demo"


def _reference(ctx: list[int], length: int, lo: int, hi: int) -> list[int] | None:
    """The definition, spelled out: longest suffix n in [lo, hi] that occurred before (ending before the last
    token), its most recent occurrence, and the tokens after it copied one by one (a copy may re-read itself)."""
    L = len(ctx)
    for n in range(min(hi, L - 1), lo - 1, -1):
        for j in range(L - n - 1, -1, -1):
            if ctx[j : j + n] == ctx[L - n :]:
                out = list(ctx)
                for i in range(length):
                    out.append(out[j + n + i])
                return out[L:]
    return None


def _found(ctx: list[int], length: int, lo: int = 2, hi: int = 8) -> list[int] | None:
    got = continuation(np.asarray(ctx, np.int64), length, lo, hi)
    return None if got is None else got.tolist()


def test_continuations_by_hand():
    assert _found([1, 2, 3, 4], 4) is None  # nothing repeats
    assert _found([5, 6, 7, 8, 5, 6], 6) == [7, 8, 5, 6, 7, 8]  # the loop continues past the present
    assert _found([4, 4, 4, 4], 5) == [4] * 5  # period 1
    # "2 3" last followed by 8, but "1 2 3" (longer) by 9: the longest match wins over the most recent
    assert _found([1, 2, 3, 9, 7, 2, 3, 8, 1, 2, 3], 3) == [9, 7, 2]
    # two occurrences of the same length: the most recent wins
    assert _found([1, 2, 5, 1, 2, 6, 1, 2], 1) == [6]
    assert _found([3, 1, 2, 1], 3) is None  # only "1" repeats: shorter than min_match = 2
    assert _found([3, 1, 2, 1], 3, lo=1) == [2, 1, 2]
    assert _found([7], 4) is None and _found([], 4) is None and _found([1, 1, 1], 0) is None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=40), st.integers(1, 12), st.integers(1, 4), st.integers(0, 6))
def test_continuation_equals_the_definition(ctx, length, lo, extra):
    hi = lo + extra
    assert _found(ctx, length, lo, hi) == _reference(ctx, length, lo, hi)


def test_with_lookup_replaces_only_rows_with_a_match_and_marks_them_valid():
    drafts = np.array([[9, 9, 9], [8, 8, 8], [7, 7, 7]])
    valid = np.array([[True, False, False], [True, True, False], [True, True, True]])
    contexts = [[1, 2, 3, 1, 2], [1, 2, 3], [5, 5, 5]]
    got, ok = with_lookup(drafts, valid, contexts, rows=np.array([0, 1]))
    assert got.tolist() == [[3, 1, 2], [8, 8, 8], [7, 7, 7]]  # row 2 skipped (not asked), row 1 has no match
    assert ok.tolist() == [[True] * 3, [True, True, False], [True] * 3]
    assert drafts[0].tolist() == [9, 9, 9]  # inputs untouched


REPEATING = [[5, 9, 31, 5, 9, 31, 5, 9], [44, 45, 44, 45, 44], [300, 301]]


@pytest.mark.parametrize("fused", [False, True], ids=["tidar", "tidar-fused"])
def test_greedy_with_lookup_equals_ar_on_repeating_prompts_with_padding(fused):
    model = random_model(small_config(eos_token_id=None), seed=3)
    session = Session.from_model(model)
    ar = generate_greedy(model, REPEATING, 40)
    with_ = tidar.generate_tidar(session, REPEATING, 40, fused=fused)
    without = tidar.generate_tidar(session, REPEATING, 40, fused=fused, lookup=False)
    assert with_.tokens == ar.tokens == without.tokens


@pytest.fixture(scope="module")
def stats_model():
    return make_stats_model()


@pytest.mark.parametrize("fused", [False, True], ids=["tidar", "tidar-fused"])
def test_stochastic_lossless_with_lookup_is_distributed_as_ar_sampling(stats_model, fused, monkeypatch):
    """The prompt holds "7 x" for every token x and ends in 7, so whatever anchor is sampled, the first drafts
    are a lookup continuation (counted below)."""
    session = Session.from_model(stats_model, levels=(0, 2))
    prompts = [[2, *(t for x in range(12) for t in (7, x)), 7]] * 3000
    cfg = SamplerConfig(temperature=1.0, seed=12)
    found = []

    def counting(drafts, valid, contexts, rows=None):  # noqa: ANN001, ANN202
        out = with_lookup(drafts, valid, contexts, rows)
        found.append(int((out[0] != drafts).any(1).sum()))
        return out

    monkeypatch.setattr(tidar, "with_lookup", counting)
    ar = _first_tokens(generate(session, prompts, 4, sampler=cfg), 4)
    td = _first_tokens(tidar.generate_tidar(session, prompts, 4, sampler=cfg, fused=fused), 4)
    assert found[0] > 0.5 * len(prompts), found[0]  # most rows' first drafts changed
    for pos in (1, 2, 3):
        stat, dof = _chi2_homogeneity(ar[:, pos], td[:, pos])
        assert stat < CHI2_999[dof], (pos, stat, dof)


@pytest.mark.skipif(not (DEMO / "model.safetensors").exists(), reason="the shipped demo checkpoint is not here")
def test_demo_model_accepts_more_with_lookup_where_its_output_loops():
    """The shipped demo model falls into loops on code it does not know; its drafter gets a loop's first
    positions right and then repeats its most likely token, while a lookup continuation follows the loop."""
    from zaya_export.models.checkpoint import load_checkpoint
    from zaya_export.runtime.tokenizer import load_tokenizer

    model = load_checkpoint(DEMO, dtype="fp32")
    tok = load_tokenizer(DEMO / "tokenizer.json")
    prompt = tok.encode("KEYWORDS = (\n    'absolute',\n    'action',\n    'ada',\n    'add',\n").ids
    session = Session.from_model(model)
    ar = generate_greedy(model, [prompt], 64).tokens
    for fused in (False, True):
        drafter = tidar.generate_tidar(session, [prompt], 64, fused=fused, lookup=False)
        both = tidar.generate_tidar(session, [prompt], 64, fused=fused)
        assert drafter.tokens == both.tokens == ar
        assert both.tokens_per_forward > 1.2 * drafter.tokens_per_forward, (fused, both.tokens_per_forward,
                                                                           drafter.tokens_per_forward)


def test_mixing_keeps_the_drafters_drafts(stats_model):
    """w < 1 blends each target with the drafter's logits for its own draft: lookup stays off there."""
    session = Session.from_model(stats_model)
    prompts = [[2, 7, 9, 2, 7, 9, 2, 7]]
    for w in (0.5, 0.0):
        on = tidar.generate_tidar(session, prompts, 24, w=w)
        off = tidar.generate_tidar(session, prompts, 24, w=w, lookup=False)
        assert on.tokens == off.tokens and on.acceptance == off.acceptance


def test_calibration_records_lookup_and_reads_older_files():
    cal = Calibration({"tidar": [1, 2, 3]}, 4, 64, "test", lookup=True)
    assert Calibration.from_json(cal.to_json(), 2) == cal
    old = {"acceptance": {"tidar": [1, 2, 3]}, "prompts": 4, "new_tokens": 64, "source": "test"}
    assert Calibration.from_json(old, 2).lookup is False
    with pytest.raises(ValueError, match="lookup"):
        Calibration.from_json({**old, "lookup": "yes"}, 2)
    with pytest.raises(ValueError, match="keys"):
        Calibration.from_json({**old, "other": 1}, 2)


def test_run_lookup_flag(tmp_path):
    """`run --no-lookup` drafts with the drafter alone (a random model's greedy output repeats itself, so lookup
    drafts are accepted and its drafter's are not), and needs an explicit mode."""
    import json

    from click.testing import CliRunner

    from zaya_export.cli import main
    from zaya_export.models.checkpoint import save_checkpoint

    ckpt = save_checkpoint(random_model(small_config(eos_token_id=None), seed=5), tmp_path / "ckpt")
    base = ["run", str(ckpt), "--prompt-ids", "5,6,7", "--max-new-tokens", "24", "--json"]
    on = json.loads(CliRunner().invoke(main, [*base, "--mode", "tidar"]).output)
    off = json.loads(CliRunner().invoke(main, [*base, "--mode", "tidar", "--no-lookup"]).output)
    assert on["lookup"] and not off["lookup"] and on["tokens"] == off["tokens"]
    assert on["mean_accepted"] > off["mean_accepted"], (on["acceptance"], off["acceptance"])
    bad = CliRunner().invoke(main, [*base, "--no-lookup"])
    assert bad.exit_code == 2 and "error:" in bad.output and "--mode" in bad.output
