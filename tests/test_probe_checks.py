"""The probe checks never refuse a correct rewrite of a large-logit model, and still catch wrong ones: a
segment seeded with the wrong CCA history, one wrong row of the packed mask template, a fused MoE that runs
or picks the wrong expert. Near-tie routing flips are counted, not mistaken for numeric errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import perturbed, random_model, small_config
from zaya_export.kernels.routing import Route, RoutingTape, routing_flips, routing_tape, top1
from zaya_export.models.packed import packed_layout
from zaya_export.passes import tidar_packing
from zaya_export.passes.base import PassError, PassManager
from zaya_export.passes import fusion
from zaya_export.passes.fusion import FuseMoE, fusion_pipeline
from zaya_export.passes.probe_check import PROBE_TOLERANCE, compare_outputs
from zaya_export.passes.tidar_packing import ExportPlan, PackTidarStep
from zaya_export.models.entries import Entry, base_entry_specs, entry_specs, example_inputs, greedy_inputs

K, LEVELS = 4, (0, 2, 4)
GEOMETRIES = {
    "sliding_kappa3": dict(hidden_size=48, num_hidden_layers=3, layer_types=["hybrid", "hybrid_sliding", "hybrid"],
                           sliding_window=6, cca_time0=3, num_experts=5, diffusion_block_len=K),
    "gqa4_untied": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
                        lm_head_bias=True, num_experts=8, diffusion_block_len=K),
}


def _big_model(name: str, seed: int = 3):
    model = perturbed(random_model(small_config(**GEOMETRIES[name]), seed=seed), seed=seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert model(ids).abs().max() > 30  # the regime the checks must survive
    return model


def _probe(model):
    inputs = [example_inputs(model, 2, 6, 3, seed=0), greedy_inputs(model, 2, 6, 5, seed=1)]
    specs = entry_specs(K)

    def run(m):
        return [t for x in inputs for n in ("prefill", "draft") for t in Entry(m, specs[n])(*x)]

    return run


@pytest.fixture(scope="module", params=sorted(GEOMETRIES))
def fused(request):
    model = _big_model(request.param)
    with fusion.fused(model, fusion_pipeline(), probe=_probe(model)):
        yield model


def test_correct_rewrites_pass_on_large_logit_models(fused):
    plan = ExportPlan(fused, base_entry_specs(K))
    packer = PackTidarStep(K, LEVELS)
    PassManager([packer]).run(plan)
    tol = PROBE_TOLERANCE[torch.float32]
    assert packer.check.ok(tol) and packer.check.max_rel <= tol.rtol / 20, packer.check
    assert packer.check.max_abs > 0  # large logits: not bit-equal, yet accepted


def _broken_layout(break_it):
    def layout(block_len, levels, kappa):
        return break_it(packed_layout(block_len, levels, kappa))
    return layout


def _wrong_seed(layout):
    """Proposal 2 (λ = 2) seeded with the conv history of λ = 1: one segment's CCA seeding wrong."""
    conv = layout.segments.conv_index.clone()
    conv[2, :2] -= 1
    return dataclasses.replace(layout, segments=dataclasses.replace(layout.segments, conv_index=conv))


def _wrong_template_row(layout):
    """One row of the template: the first mask row of proposal 1 (λ = 0) also sees draft d_1."""
    template = layout.template.clone()
    row = (K + 1) * 1  # first row of proposal 1
    template[row, 1] = True
    return dataclasses.replace(layout, template=template)


@pytest.mark.parametrize("break_it", [_wrong_seed, _wrong_template_row], ids=["cca_seeding", "template_row"])
def test_pack_check_catches_a_broken_packing(fused, monkeypatch, break_it):
    monkeypatch.setattr(tidar_packing, "packed_layout", _broken_layout(break_it))
    with pytest.raises(PassError, match="differs from verify/draft: output .* of its scale"):
        PassManager([PackTidarStep(K, LEVELS)]).run(ExportPlan(fused, base_entry_specs(K)))


class WrongExpertWeights(FuseMoE):
    """Layer 1's fused MoE runs the next expert's weights for the chosen one."""

    def fused(self, moe, model):
        if moe is not model.model.layers[1].mlp:
            return super().fused(moe, model)
        real = moe.experts.gate_up_proj, moe.experts.down_proj
        right = super().fused(moe, model)

        def forward(x, prev):
            moe.experts.gate_up_proj = torch.nn.Parameter(real[0].roll(1, 0), requires_grad=False)
            moe.experts.down_proj = torch.nn.Parameter(real[1].roll(1, 0), requires_grad=False)
            try:
                return right(x, prev)
            finally:
                moe.experts.gate_up_proj, moe.experts.down_proj = real

        return forward


class WrongChoice(FuseMoE):
    """Layer 1's fused MoE routes with a bias that makes expert 0 win everywhere."""

    def fused(self, moe, model):
        right = super().fused(moe, model)
        if moe is not model.model.layers[1].mlp:
            return right
        biases = moe.gate.balancing_biases

        def forward(x, prev):
            saved = biases.clone()
            biases[0] += 2.0
            try:
                return right(x, prev)
            finally:
                biases.copy_(saved)

        return forward


@pytest.mark.parametrize("broken, message", [(WrongExpertWeights, "of its scale"),
                                             (WrongChoice, "chose another expert with a clear routing margin")])
def test_fusion_probe_catches_a_wrong_expert(broken, message):
    model = _big_model("sliding_kappa3")
    passes = [p if p.name != "fuse_moe" else broken() for p in fusion_pipeline()]
    with pytest.raises(PassError, match=f"fuse_moe changed the outputs: .*{message}"):
        with fusion.fused(model, passes, probe=_probe(model)):
            pass


class NearTie(FuseMoE):
    """Breaks exact ties the other way (+1e-7 on expert 1's bias), as other rounding could."""

    def fused(self, moe, model):
        right = super().fused(moe, model)
        biases = moe.gate.balancing_biases

        def forward(x, prev):
            saved = biases.clone()
            biases[1] += 1e-7
            try:
                return right(x, prev)
            finally:
                biases.copy_(saved)

        return forward


def test_near_tie_flips_are_reported_not_refused():
    model = random_model(small_config(num_experts=4), seed=5)
    with torch.no_grad():  # experts 0 and 1 get identical, dominant router rows: every token ties between them
        for layer in model.model.layers:
            out = layer.mlp.gate.router_mlp.out_proj.weight
            out[1] = out[0]
            out[:2] *= 4
            layer.mlp.gate.balancing_biases.zero_()
    passes = [p if p.name != "fuse_moe" else NearTie() for p in fusion_pipeline()]
    with fusion.fused(model, passes, probe=_probe(model)) as log:
        moe = log[-1]
    assert moe.name == "fuse_moe" and moe.routing_flips > 0 and moe.max_flip_margin <= 1e-6
    assert moe.max_rel_diff <= 1e-5  # replayed routing: the numbers still agree


def test_routing_tape_records_margins_and_replays():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.45, 0.45]])
    bias = torch.zeros(3)
    with routing_tape(RoutingTape("record")) as tape:
        assert top1(probs, bias).tolist() == [0, 1]
    (route,) = tape.routes
    assert route.runner_up.tolist() == [1, 2] and torch.allclose(route.margin, torch.tensor([0.2, 0.0]))
    forced = [torch.tensor([2, 2])]
    with routing_tape(RoutingTape("replay", forced)) as rep:
        assert top1(probs, bias).tolist() == [2, 2]
    flips = routing_flips(tape.routes, rep.routes, forced)
    assert [(f.token, f.own, f.forced) for f in flips] == [(0, 0, 2), (1, 1, 2)]
    assert top1(probs, bias).tolist() == [0, 1]  # no tape outside the block


def test_compare_outputs_is_relative_and_nan_aware():
    want = torch.tensor([100.0, -50.0])
    assert compare_outputs([want + 1e-3], [want]).max_rel == pytest.approx(1e-5, rel=1e-2)
    assert compare_outputs([torch.tensor([float("nan"), 0.0])], [want]).max_rel == float("inf")
    assert compare_outputs([torch.tensor([1, 2])], [torch.tensor([1, 3])]).max_rel == float("inf")
    assert compare_outputs([torch.zeros(3)], [torch.zeros(3)]).max_rel == 0.0


def test_validate_explains_a_backend_that_routes_a_near_tie_the_other_way():
    """A backend whose numbers differ from eager only because one near-tie token went to the runner-up expert
    is explained (and named), not failed; a clear-margin difference is not explained."""
    import numpy as np

    from zaya_export.eager_reference import EagerReference
    from zaya_export.validate import TOLERANCES, _entry_ok, _explain_by_flip

    model = random_model(small_config(num_experts=4), seed=5)
    with torch.no_grad():  # every token ties between experts 0 and 1 in layer 0
        out = model.model.layers[0].mlp.gate.router_mlp.out_proj.weight
        out[1] = out[0]
        out[:2] *= 4
        model.model.layers[0].mlp.gate.balancing_biases.zero_()
    ref = EagerReference(model)
    inputs = dict(zip(["input_ids", "input_mask", "past_k", "past_v", "past_valid", "conv_state", "rho_state"],
                      (x.numpy() for x in example_inputs(model, 1, 6, 0, seed=3))))
    with routing_tape(RoutingTape("record")) as tape:
        want = ref.backend.run("prefill", inputs)
    t = int((tape.routes[0].margin <= 1e-7).nonzero()[-1])  # a token tied between experts 0 and 1
    forced = [r.choice.clone() for r in tape.routes]
    forced[0][t] = tape.routes[0].runner_up[t]  # a backend that broke that tie the other way
    with routing_tape(RoutingTape("replay", forced, limit=1)):
        got = ref.backend.run("prefill", inputs)
    tol = TOLERANCES["fp32"]
    assert not _entry_ok(got, want, slice(None), tol)[0]  # it does move the output
    flip = _explain_by_flip(ref, "prefill", inputs, got, slice(None), tol)
    assert flip is not None and (flip["moe_call"], flip["token"]) == (0, t) and flip["margin"] <= tol.tie
    wrong = dict(got, logits=got["logits"] + np.float32(0.5) * np.abs(got["logits"]).max())
    assert _explain_by_flip(ref, "prefill", inputs, wrong, slice(None), tol) is None
    # the forced runs never entered the shared memo: it still serves the free-routing outputs
    np.testing.assert_array_equal(ref.run("prefill", inputs)["logits"], want["logits"])
