"""Logits and greedy-generation parity of the reference model with upstream transformers' ZayaForCausalLM."""

from __future__ import annotations

import pytest
import torch

from conftest import hf_model, random_model, small_config
from zaya_export.models import decode, prefill
from zaya_export.runtime.generate import generate_greedy, left_pad

ATOL = 1e-4

CONFIGS = {
    # preset tiny: one full and one sliding-window layer (window 32), G = 2
    "tiny": dict(),
    # G = 1, biases everywhere, untied head with bias, 3 layers
    "bias_untied": dict(num_attention_heads=2, num_key_value_heads=2, attention_bias=True, lm_head_bias=True,
                        tie_word_embeddings=False, num_hidden_layers=3),
    # G = 4, longer conv history (κ = 3), full rotary, other theta, skinny experts
    "wide_conv": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16, cca_time0=3, cca_time1=2,
                      num_experts=6, moe_intermediate_size=48, layer_types=["hybrid", "hybrid"],
                      rope_parameters={"hybrid": {"rope_type": "default", "rope_theta": 1000.0,
                                                  "partial_rotary_factor": 1.0}}),
    # every layer sliding with a small window, so long prompts cross it many times
    "all_sliding": dict(num_hidden_layers=3, layer_types=["hybrid_sliding"] * 3, sliding_window=8),
}


@pytest.fixture(params=sorted(CONFIGS), scope="module")
def pair(request):
    model = random_model(small_config(**CONFIGS[request.param]), seed=len(request.param))
    return model, hf_model(model)


def _ids(model, B, T, seed=0):
    return torch.randint(5, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("T", [1, 2, 37, 100])
def test_full_forward_matches_upstream(pair, T):
    model, hf = pair
    ids = _ids(model, 2, T, seed=T)
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.shape == (2, T, model.config.vocab_size)
    assert (ours - theirs).abs().max().item() <= ATOL


def test_left_padding_matches_upstream_and_unpadded(pair):
    model, hf = pair
    prompts = [_ids(model, 1, 30, seed=1)[0].tolist(), _ids(model, 1, 19, seed=2)[0].tolist()]
    ids, mask = map(torch.from_numpy, left_pad(prompts, 0))
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        theirs = hf(ids, attention_mask=mask, position_ids=pos).logits
        alone = model(torch.tensor([prompts[1]]))
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max().item() <= ATOL
    if not model.config.attention_bias:  # with q/k biases a zeroed pad row still feeds the bias into the conv
        assert (ours[1, -19:] - alone[0]).abs().max().item() <= ATOL
    assert torch.isfinite(ours).all()  # fully masked padding rows stay finite


def test_prefill_decode_equals_full_forward(pair):
    model, _ = pair
    ids = _ids(model, 2, 45, seed=3)
    with torch.no_grad():
        full = model(ids)
        last, state = prefill(model, ids[:, :20], capacity=45)
        steps = [last]
        for t in range(20, 44):
            steps.append(decode(model, ids[:, t], state))
    got = torch.stack(steps, dim=1)  # predictions for positions 19..43
    assert (got - full[:, 19:44]).abs().max().item() <= ATOL
    assert state.length == 44


def test_chunked_prefill_continues_from_state(pair):
    model, _ = pair
    ids = _ids(model, 2, 40, seed=4)
    with torch.no_grad():
        full = model(ids)
        _, state = prefill(model, ids[:, :13], capacity=40)
        logits, update = model.step(ids[:, 13:40], state.past())
    assert (logits - full[:, 13:]).abs().max().item() <= ATOL
    assert update.k.shape[3] == 27


def test_left_padded_decode_continues_the_padded_forward(pair):
    model, _ = pair
    long, short = _ids(model, 1, 25, seed=5)[0].tolist(), _ids(model, 1, 9, seed=6)[0].tolist()
    ids, mask = map(torch.from_numpy, left_pad([long, short], 0))
    cont = _ids(model, 2, 12, seed=7)
    with torch.no_grad():
        last, state = prefill(model, ids, mask, capacity=40)
        got = torch.stack([last] + [decode(model, cont[:, t], state) for t in range(12)], dim=1)  # [2, 13, V]
        full = model(torch.cat([ids, cont], 1), attention_mask=torch.cat([mask, torch.ones_like(cont)], 1))
        alone = model(torch.cat([torch.tensor([short]), cont[1:]], dim=1))
    assert (got - full[:, 24:]).abs().max().item() <= ATOL
    if not model.config.attention_bias:  # with q/k biases a zeroed pad row still feeds the bias into the conv
        assert (got[1] - alone[0, 8:]).abs().max().item() <= ATOL


def _upstream_greedy(hf, prompts, n, pad_id=0):
    ids, mask = map(torch.from_numpy, left_pad(prompts, pad_id))
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      pad_token_id=pad_id, eos_token_id=None)
    return out[:, ids.shape[1]:].tolist()


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_generation_matches_upstream_generate(pair, batch):
    model, hf = pair
    prompts = [_ids(model, 1, n, seed=10 + n)[0].tolist() for n in (17, 5, 11)[:batch]]
    ours = generate_greedy(model, prompts, 24, stop_ids=None)
    assert ours.forwards == 24
    assert ours.tokens == _upstream_greedy(hf, prompts, 24)


def test_bf16_close_to_upstream_bf16():
    model = random_model(small_config(), seed=9, dtype=torch.bfloat16)
    hf = hf_model(model)
    ids = _ids(model, 2, 33, seed=9)
    with torch.no_grad():
        ours, theirs = model(ids).float(), hf(ids).logits.float()
    assert model.model.layers[0].mlp.gate.balancing_biases.dtype == torch.float32
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    assert agree >= 0.97, agree
    assert (ours - theirs).abs().max().item() <= 0.1 * theirs.abs().max().item()
