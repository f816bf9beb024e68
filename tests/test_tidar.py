"""TiDAR two-forward decoding: losslessness (greedy token for token, stochastic in distribution), logit
mixing, exact state commit at every acceptance length, and speed when the drafts are right."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import zaya_export.runtime.tidar as tidar
from conftest import random_model, small_config
from zaya_export.models import prefill
from zaya_export.runtime.generate import generate, generate_greedy
from zaya_export.runtime.sampling import SamplerConfig
from zaya_export.runtime.session import Session

CONFIGS = {
    "tiny": dict(),
    "all_sliding_k4": dict(num_hidden_layers=3, layer_types=["hybrid_sliding"] * 3, sliding_window=6,
                           diffusion_block_len=4),
    "wide_conv_k7": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16, cca_time0=3, cca_time1=2,
                         diffusion_block_len=7),
}
PROMPTS = [[5, 9, 31, 200, 7, 7, 8, 99, 12], [44], [300, 301]]  # lengths 9, 1 and 2 (shorter than the conv window)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("fused", [False, True], ids=["tidar", "tidar-fused"])
def test_greedy_tidar_equals_greedy_ar(name, fused):
    model = random_model(small_config(**CONFIGS[name], eos_token_id=None), seed=len(name))
    session = Session.from_model(model)
    ar = generate_greedy(model, PROMPTS, 30)
    td = tidar.generate_tidar(session, PROMPTS, 30, fused=fused)
    assert td.tokens == ar.tokens
    assert sum(td.acceptance) >= td.steps
    assert td.forwards == (2 + td.steps if fused else 2 + 2 * td.steps - 1)


def test_packed_step_rows_equal_verify_and_drafts_after_each_level():
    """The exactness property of the packed layout: verify rows are AR rows, and proposal p's rows equal a
    bidirectional draft of K+1 masks made after committing the anchor and λ_p drafts (per-segment CCA)."""
    from zaya_export.models.layout import BIDIRECTIONAL
    from zaya_export.models.packed import packed_layout

    model = random_model(small_config(diffusion_block_len=5, num_hidden_layers=3,
                                      layer_types=["hybrid", "hybrid_sliding", "hybrid"], sliding_window=7), seed=8)
    K, levels, M = 5, (0, 2, 3, 5), model.config.mask_token_id
    layout = packed_layout(K, levels, model.config.conv_history)
    prompt, block = torch.tensor([[5, 9, 31, 200, 7, 8, 3]]), torch.tensor([[17, 18, 19, 20, 21, 22]])
    with torch.no_grad():
        _, state = prefill(model, prompt)
        ids = torch.cat([block] + [torch.full((1, K + 1), M)] * len(levels), 1)
        logits, _ = model.step(ids, state.past(), layout=layout)
        verify, _ = model.step(block, state.past())
        assert (logits[:, : K + 1] - verify).abs().max().item() <= 1e-4
        for p, lam in enumerate(levels, 1):
            _, after = prefill(model, torch.cat([prompt, block[:, : lam + 1]], 1))
            draft, _ = model.step(torch.full((1, K + 1), M), after.past(), layout=BIDIRECTIONAL)
            assert (logits[:, (K + 1) * p : (K + 1) * (p + 1)] - draft).abs().max().item() <= 1e-4, lam


def test_commit_reproduces_ar_state_at_every_acceptance_length():
    model = random_model(small_config(diffusion_block_len=5), seed=2)
    session = Session.from_model(model)
    prompt = np.array([[5, 9, 31, 200, 7, 8]])
    block = np.array([[17, 18, 19, 20, 21, 22]])  # anchor + 5 drafts
    for n in range(1, 7):  # ℓ = n − 1 accepted drafts
        cache = session.new_cache(1, 20)
        cache.commit(session.run("prefill", cache.inputs(prompt)))
        cache.commit(session.run("verify", cache.inputs(block)), counts=np.array([n]))
        with torch.no_grad():
            _, ref = prefill(model, torch.from_numpy(np.concatenate([prompt, block[:, :n]], 1)))
        L = ref.length
        assert cache.length == L and cache.valid[0, :L].all() and not cache.valid[0, L:].any()
        assert np.abs(cache.k[:, :, :, :L] - ref.k.numpy()).max() <= 1e-5
        assert np.abs(cache.v[:, :, :, :L] - ref.v.numpy()).max() <= 1e-5
        assert np.abs(cache.conv - ref.conv.numpy()).max() <= 1e-5
        assert np.abs(cache.rho - ref.rho.numpy()).max() <= 1e-5


def _first_tokens(result, n):
    return np.array([t[:n] for t in result.tokens])


def _chi2_homogeneity(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample chi-square statistic over the values of a and b (cells with expected count < 5 merged)."""
    values = np.union1d(a, b)
    table = np.array([[np.sum(a == v), np.sum(b == v)] for v in values], dtype=float)
    small = table.sum(1) < 10
    if small.any():
        table = np.vstack([table[~small], table[small].sum(0, keepdims=True)])
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    return float(((table - expected) ** 2 / expected).sum()), table.shape[0] - 1


CHI2_999 = {d: c for d, c in enumerate([0, 10.8, 13.8, 16.3, 18.5, 20.5, 22.5, 24.3, 26.1, 27.9, 29.6, 31.3, 32.9,
                                        34.5, 36.1, 37.7, 39.3, 40.8, 42.3, 43.8, 45.3])}  # p = 0.001


def make_stats_model():  # noqa: ANN201 - ZayaForCausalLM
    """Vocabulary of 12, so thousands of samples pin the output distribution down."""
    cfg = small_config(vocab_size=12, hidden_size=32, head_dim=8, num_attention_heads=2, num_key_value_heads=1,
                       moe_intermediate_size=16, num_experts=2, router_hidden_size=8, diffusion_block_len=3,
                       eos_token_id=None, pad_token_id=0, bos_token_id=2)
    model = random_model(cfg, seed=5)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(0.3)  # softer logits: acceptance neither 0 nor 1
    return model


@pytest.fixture(scope="module")
def stats_model():
    return make_stats_model()


def _sampled(stats_model, rule=None, n=3000, w=1.0, fused=False):
    session = Session.from_model(stats_model, levels=(0, 2))  # K = 3: level 3 missing, so tails get rejected
    prompts = [[2, 7, 9]] * n
    cfg = SamplerConfig(temperature=1.0, seed=11)
    if rule is None:
        return _first_tokens(generate(session, prompts, 3, sampler=cfg), 3)
    return _first_tokens(tidar.generate_tidar(session, prompts, 3, sampler=cfg, w=w, fused=fused), 3)


@pytest.mark.parametrize("fused", [False, True], ids=["tidar", "tidar-fused"])
def test_stochastic_lossless_is_distributed_as_ar_sampling(stats_model, monkeypatch, fused):
    ar = _sampled(stats_model)
    td = _sampled(stats_model, rule="lossless", fused=fused)
    for pos in (1, 2):  # the tokens decided by acceptance (position 0 is a plain AR sample in both)
        stat, dof = _chi2_homogeneity(ar[:, pos], td[:, pos])
        assert stat < CHI2_999[dof], (pos, stat, dof)
    joint_ar, joint_td = ar[:, 1] * 12 + ar[:, 2], td[:, 1] * 12 + td[:, 2]
    stat, dof = _chi2_homogeneity(joint_ar, joint_td)
    assert stat < CHI2_999[min(dof, 20)] * max(1, dof / 20), (stat, dof)

    # A broken acceptance rule (always accept the drafts) must fail the same test.
    def always_accept(z, drafts, zeta, cfg, w, rng, valid=None):
        K = drafts.shape[1]
        return np.full(len(z), K), z[:, K].argmax(-1)

    monkeypatch.setattr(tidar, "accept", always_accept)
    monkeypatch.setattr(Session, "has", lambda self, entry: entry not in ("step_greedy", "step_sample"))
    broken = _sampled(stats_model, rule="broken", fused=fused)
    stat, dof = _chi2_homogeneity(ar[:, 1], broken[:, 1])
    assert stat > CHI2_999[dof], (stat, dof)


def test_mixing(stats_model):
    session = Session.from_model(stats_model)
    prompts = [[2, 7, 9], [2, 3], [2, 11, 5, 6]]
    for cfg in (SamplerConfig(), SamplerConfig(temperature=1.0, seed=4)):
        lossless = tidar.generate_tidar(session, prompts, 24, sampler=cfg)
        assert tidar.generate_tidar(session, prompts, 24, sampler=cfg, w=1.0).tokens == lossless.tokens
    # against the drafter's own drafts at w = 1 (lookup drafts, on by default there, are another proposal)
    means = [tidar.generate_tidar(session, prompts, 24, w=w, lookup=False).mean_accepted
             for w in (1.0, 0.75, 0.5, 0.25, 0.0)]
    assert all(a <= b for a, b in zip(means, means[1:])), means
    assert means[-1] == stats_model.config.diffusion_block_len  # w = 0: the drafts judge themselves
    with pytest.raises(ValueError, match="mixing weight"):
        tidar.generate_tidar(session, prompts, 4, w=1.5)


def test_right_drafts_give_many_tokens_per_forward():
    """With weights arranged so every position (AR or draft) predicts the same token, every draft is accepted:
    each two-forward step emits K+1 tokens."""
    model = random_model(small_config(lm_head_bias=True, eos_token_id=None), seed=1)
    with torch.no_grad():
        model.lm_head.bias.zero_()
        model.lm_head.bias[77] = 1e4
    K = model.config.diffusion_block_len
    session = Session.from_model(model)
    for fused, per_step in ((False, 2), (True, 1)):
        result = tidar.generate_tidar(session, [[5, 6, 7]], 16 * (K + 1), fused=fused)
        assert result.tokens == [[77] * (16 * (K + 1))]
        assert result.acceptance[K] == result.steps and sum(result.acceptance) == result.steps
        assert result.tokens_per_forward >= 0.8 * (K + 1) / per_step, (fused, result.tokens_per_forward)


def test_in_graph_greedy_step_equals_host_acceptance(monkeypatch):
    """step_greedy (acceptance, commit, proposal selection inside the graph) decides exactly like the host path,
    with drafts rejected (random weights) and with every draft accepted (weights that make drafts right)."""
    right = random_model(small_config(lm_head_bias=True, eos_token_id=None), seed=1)
    with torch.no_grad():
        right.lm_head.bias.zero_()
        right.lm_head.bias[77] = 1e4
    for model in (random_model(small_config(eos_token_id=None), seed=4), right):
        session = Session.from_model(model, levels=(0, 3, 16))
        in_graph = tidar.generate_tidar(session, PROMPTS, 40, fused=True)
        monkeypatch.setattr(Session, "has", lambda self, entry: False)
        host = tidar.generate_tidar(session, PROMPTS, 40, fused=True)
        monkeypatch.undo()
        assert (in_graph.tokens, in_graph.acceptance) == (host.tokens, host.acceptance)
        assert in_graph.tokens == generate_greedy(model, PROMPTS, 40).tokens


@pytest.mark.parametrize("cfg,w", [(SamplerConfig(temperature=1.0, seed=3), 1.0),
                                   (SamplerConfig(temperature=0.8, top_k=5, top_p=0.9, seed=5), 1.0),
                                   (SamplerConfig(temperature=1.0, seed=7), 0.5)], ids=["lossless", "warped", "mix"])
def test_in_graph_sampling_step_equals_host_acceptance(stats_model, monkeypatch, cfg, w):
    """step_sample (rejection sampling / logit mixing with the host's uniforms, inside the graph) makes the host
    path's decisions: same tokens and acceptance lengths for the same seed, batch of 64 rows."""
    session = Session.from_model(stats_model, levels=(0, 2))
    prompts = [[2, 7, 9], [2, 3], [2, 11, 5, 6]] * 21 + [[4]]
    in_graph = tidar.generate_tidar(session, prompts, 12, sampler=cfg, w=w, fused=True)
    monkeypatch.setattr(Session, "has", lambda self, entry: entry not in ("step_greedy", "step_sample"))
    host = tidar.generate_tidar(session, prompts, 12, sampler=cfg, w=w, fused=True)
    assert (in_graph.tokens, in_graph.acceptance) == (host.tokens, host.acceptance)
    assert 0 < in_graph.mean_accepted  # the test exercises accepted drafts, not only rejections


@pytest.mark.parametrize("scale", [1.0, 100.0], ids=["unit", "logits~100"])
@pytest.mark.parametrize("top_k,top_p,temperature", [(0, 1.0, 1.0), (5, 1.0, 0.7), (0, 0.9, 1.0), (7, 0.5, 1.3),
                                                     (1, 0.3, 1.0), (3000, 0.99, 0.5), (0, 1e-6, 1.0)])
def test_in_graph_warp_equals_host_warp_with_and_without_a_sort(scale, top_k, top_p, temperature):
    """The in-graph sampler cuts (the sort form for ONNX, the bisection form for IREE) give the host's
    probabilities, on rows with ties at a cut (kept, as the host keeps them) and at logit scale ~100."""
    from zaya_export.models.ingraph_step import warp, warp_by_bisection
    from zaya_export.runtime.sampling import warp as host_warp

    g = torch.Generator().manual_seed(int(scale) + top_k)
    z = torch.randn(4, 3, 257, generator=g) * scale
    z[0, 0, :4] = z[0, 0].max() + 1.0  # a 4-way tie for the largest value
    z[1, 1, 10:20] = 0.25 * scale  # a wide tie in the middle
    cfg = SamplerConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    want = host_warp(z.reshape(-1, 257).double().numpy(), cfg).reshape(z.shape)
    args = (torch.tensor(temperature), torch.tensor(float(top_k)), torch.tensor(top_p))
    for form in (warp, warp_by_bisection):
        got = form(z, *args).double().numpy()
        # the same tokens survive every cut (fp32 underflows what float64 keeps at ~1e-160: those may be 0)
        assert not got[want == 0].any() and (got[want > 1e-30] > 0).all(), form.__name__
        # fp32 against float64: exp amplifies the rounding of z / temperature by |z / temperature|
        rtol = 8 * 2.0**-24 * max(1.0, float(z.abs().max()) / temperature)
        np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-7, err_msg=form.__name__)
