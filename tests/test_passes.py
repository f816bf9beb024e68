"""Pass infrastructure: rewrite counts, pre/postconditions, output verification, dumps, ONNX-level checks."""

from __future__ import annotations

import onnx_ir as ir
import pytest
import torch

from conftest import random_model, small_config
from zaya_export.passes.base import Pass, PassError, PassManager
from zaya_export.passes.fusion import FuseCCA, FuseMoE, fused, fused_slots, fusion_pipeline
from zaya_export.passes.onnx_cleanup import CheckFusedNodes
from zaya_export.models.entries import Entry, entry_specs, example_inputs, export_entry, op_histogram


@pytest.fixture
def model():
    return random_model(small_config(num_hidden_layers=3, layer_types=["hybrid", "hybrid_sliding", "hybrid"]), seed=6)


def _probe(model):
    inputs = example_inputs(model, 2, 6, 3, seed=0)

    def run(m):
        with torch.no_grad():
            return [*Entry(m, entry_specs(4)["prefill"])(*inputs), *Entry(m, entry_specs(4)["draft"])(*inputs)]

    return run


def test_one_fused_op_per_layer_in_every_traced_entry(model):
    with fused(model, fusion_pipeline(), probe=_probe(model)) as log:
        assert [(r.name, r.rewrites) for r in log] == [("fuse_cca", 3), ("fuse_attention", 3), ("fuse_moe", 3)]
        for spec in entry_specs(4).values():
            hist = op_histogram(export_entry(model, spec))
            if spec.packed is not None:  # the packed TiDAR step keeps the multi-segment CCA/attention reference
                assert (hist["zaya.cca"], hist["zaya.block_attention"], hist["zaya.moe_top1"]) == (0, 0, 3)
                continue
            assert (hist["zaya.cca"], hist["zaya.block_attention"], hist["zaya.moe_top1"]) == (3, 3, 3)
            assert hist["aten.conv1d"] == 0 and hist["aten.topk"] == 0 and hist["aten.softmax"] == 0
    hist = op_histogram(export_entry(model, entry_specs(4)["prefill"]))  # the scope is over: the reference again
    assert not {"zaya.cca", "zaya.block_attention", "zaya.moe_top1"} & set(hist)


def _outputs(model):
    inputs = example_inputs(model, 2, 6, 3, seed=1)
    with torch.no_grad():
        return [t.clone() for name in ("prefill", "draft") for t in Entry(model, entry_specs(4)[name])(*inputs)]


@pytest.mark.parametrize("raises", [False, True], ids=["normal_exit", "body_raises"])
def test_the_fusion_scope_leaves_the_model_as_it_was(model, raises):
    """Fusion is a scoped rewrite: inside, every layer's fused slots are set and the traced graph has the
    zaya.* ops; after the scope (also when its body raises) no slot is set, the state_dict keys are the same
    and the outputs are bit-identical to before."""
    keys, before = list(model.state_dict()), _outputs(model)
    assert not fused_slots(model)

    class Boom(Exception):
        pass

    try:
        with fused(model) as log:
            assert len(log) == 3 and len(fused_slots(model)) == 3 * model.config.num_hidden_layers
            assert list(model.state_dict()) == keys  # slots are not modules: nothing new to save or load
            if raises:
                raise Boom
    except Boom:
        assert raises
    assert not fused_slots(model)
    assert list(model.state_dict()) == keys
    assert all(layer.self_attn.fused_project is None and layer.self_attn.fused_attend is None
               and layer.mlp.fused_forward is None for layer in model.model.layers)
    after = _outputs(model)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_a_failing_pass_leaves_the_model_unfused(model):
    class BrokenMoE(FuseMoE):
        def fused(self, moe, m):
            right = super().fused(moe, m)
            return lambda x, prev: (lambda out, state: (out * 1.01, state))(*right(x, prev))

    keys = list(model.state_dict())
    with pytest.raises(PassError, match="fuse_moe changed the outputs"):
        with fused(model, [FuseCCA(), BrokenMoE()], probe=_probe(model)):
            pass
    assert not fused_slots(model) and list(model.state_dict()) == keys


def test_fusion_outside_a_scope_is_refused(model):
    with pytest.raises(PassError, match="only inside"):
        PassManager([FuseCCA()]).run(model)
    assert not fused_slots(model)


def test_running_a_pass_twice_is_refused(model):
    with fused(model, [FuseCCA()]):
        with pytest.raises(PassError, match="already fused"):
            PassManager([FuseCCA()]).run(model)
        with pytest.raises(PassError, match="already fused"):
            with fused(model, [FuseCCA()]):  # a nested scope that fails restores the outer scope's slots
                pass
        assert len(fused_slots(model)) == model.config.num_hidden_layers
    assert not fused_slots(model)


def test_a_pass_that_finds_nothing_is_an_error(model):
    class Nothing(Pass):
        name = "nothing"

        def run(self, ir):
            return 0

    with pytest.raises(PassError, match="found nothing to rewrite"):
        PassManager([Nothing()]).run(model)


def test_verification_catches_a_wrong_rewrite(model):
    class BrokenMoE(FuseMoE):
        def fused(self, moe, m):
            right = super().fused(moe, m)
            return lambda x, prev: (lambda out, state: (out * 1.01, state))(*right(x, prev))

    with pytest.raises(PassError, match="fuse_moe changed the outputs"):
        with fused(model, [BrokenMoE()], probe=_probe(model)):
            pass


def test_attention_bias_models_are_refused_by_fuse_cca():
    biased = random_model(small_config(attention_bias=True), seed=0)
    with pytest.raises(PassError, match="attention_bias"):
        with fused(biased, [FuseCCA()]):
            pass


def test_dump_after(model, tmp_path):
    with fused(model, fusion_pipeline(),
               dump=lambda m: export_entry(m, entry_specs(1)["decode"]).graph_module.code,
               dump_after=["fuse_moe"], dump_dir=tmp_path):
        pass
    (dump,) = tmp_path.iterdir()
    assert dump.name == "02-fuse_moe.txt" and "zaya.moe_top1" in dump.read_text()
    with pytest.raises(PassError, match="unknown passes"):
        PassManager(fusion_pipeline(), dump_after=["fuse_everything"])


def test_onnx_check_fails_on_missing_fused_nodes():
    graph = ir.Graph([], [], nodes=[], name="g")
    model = ir.Model(graph, ir_version=10)
    with pytest.raises(PassError, match="expected"):
        PassManager([CheckFusedNodes({"CCA": 2})]).run(model)


def test_pack_tidar_step_adds_verified_packed_entries(monkeypatch):
    import zaya_export.passes.tidar_packing as packing
    from zaya_export.models.packed import packed_layout
    from zaya_export.passes.tidar_packing import ExportPlan, PackTidarStep
    from zaya_export.models.entries import base_entry_specs

    model = random_model(small_config(num_hidden_layers=2, layer_types=["hybrid", "hybrid_sliding"],
                                      sliding_window=6), seed=4)
    with fused(model, fusion_pipeline()):
        plan = ExportPlan(model, base_entry_specs(4))
        log = PassManager([PackTidarStep(4, (0, 2, 4))]).run(plan)
        assert [(r.name, r.rewrites) for r in log] == [("pack_tidar_step", 3)]
        assert plan.specs["step"].tokens == 5 * 4 and plan.specs["step_greedy"].accept == "greedy"
        assert plan.specs["step_sample"].accept == "sample"
        check = packing.packing_check(model, plan.specs)
        assert check.max_rel <= 1e-5 and not check.flips, check
        with pytest.raises(PassError, match="already has a packed step"):
            PackTidarStep(4, (0, 2, 4)).requires(plan)
        with pytest.raises(PassError, match="missing"):
            PackTidarStep(4, (0, 2)).requires(ExportPlan(model, {}))
        with pytest.raises(PassError, match="levels must start at 0"):
            PassManager([PackTidarStep(4, (1, 2))]).run(ExportPlan(model, base_entry_specs(4)))
        # a packing that breaks the exactness property (causal proposals instead of the bidirectional draft rule)
        monkeypatch.setattr(packing, "packed_layout",
                            lambda K, L, kappa: packed_layout(K, L, kappa, causal_proposals=True))
        with pytest.raises(PassError, match="differs from verify/draft"):
            PassManager([PackTidarStep(4, (0, 2, 4))]).run(ExportPlan(model, base_entry_specs(4)))
