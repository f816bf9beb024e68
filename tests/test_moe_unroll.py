"""``unroll_experts`` (passes/moe_unroll): the MoE op's Loop/If body becomes plain per-expert branches on
constant slices of the weight file, with the same outputs, for every token count and routing, stored in the
compute dtype or narrower."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from zaya_export.runtime.backends import ort_session
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import zaya_export.kernels as kernels
from zaya_export.kernels.registry import DOMAIN
from zaya_export.models.checkpoint import save_tensors
from zaya_export.models.safetensors_header import read_header
from zaya_export.onnx_export import bind_external_weights, unroll_entry
from zaya_export.passes.base import PassError, PassManager
from zaya_export.passes.moe_unroll import UnrollExperts

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
H, R, I = 12, 8, 10


class _MoE(torch.nn.Module):
    """One MoE op whose expert stacks are parameters (so they lower to initializers, as in a real entry)."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        super().__init__()
        self.gate_up, self.down = torch.nn.Parameter(gate_up), torch.nn.Parameter(down)

    def forward(self, x, prev, *router):  # noqa: ANN001, ANN201
        return torch.ops.zaya.moe_top1(x, prev, *router, self.gate_up, self.down, 1e-5)


def _lowered(module: _MoE, inputs: list[torch.Tensor], folder: Path, stored: torch.dtype) -> ir.Model:
    """The module as an ONNX IR model (function bodies attached), its stacks bound to ``folder/w.safetensors``
    stored in ``stored``."""
    N = torch.export.Dim("N", min=1, max=64)  # traced at 5 tokens (an example of 1 would specialise N)
    traced = [torch.randn(5, *t.shape[1:]) for t in inputs[:2]] + inputs[2:]
    program = torch.export.export(module, tuple(traced), dynamic_shapes=({0: N}, {0: N}, (None,) * (len(inputs) - 2)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torch.onnx.export(program, dynamo=True, custom_translation_table=kernels.translation_table(),
                                  opset_version=20, optimize=False, verbose=False).model
    for proto in kernels.function_protos():
        fn = ir.serde.deserialize_function(proto)
        model.functions[fn.identifier()] = fn
    model.opset_imports.setdefault(DOMAIN, 1)
    path = folder / "w.safetensors"
    save_tensors({"gate_up": module.gate_up.detach().to(stored), "down": module.down.detach().to(stored)}, path)
    header = read_header(path)
    start = path.stat().st_size - max(i.end for i in header.values())
    offsets = {n: (start + i.start, i.end - i.start, i.dtype) for n, i in header.items()}
    bind_external_weights(model, offsets, folder)
    for value in model.graph.initializers.values():  # the onnx_export naming of the bound file
        if isinstance(value.const_value, ir.ExternalTensor):
            value.const_value = ir.ExternalTensor("w.safetensors", value.const_value.offset,
                                                  value.const_value.length, value.const_value.dtype,
                                                  shape=value.const_value.shape, name=value.name, base_dir=folder)
    return model


def _run(model: ir.Model, folder: Path, inputs: list[torch.Tensor]) -> list[np.ndarray]:
    path = folder / "moe.onnx"
    onnx.save_model(ir.serde.serialize_model(model), str(path))
    onnx.checker.check_model(str(path), full_check=True)
    session = ort_session(str(path))
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})


@SETTINGS
@given(N=st.sampled_from([1, 2, 9, 17]), E=st.sampled_from([1, 3, 5]), route=st.sampled_from(["free", "skip", "one"]),
       stored=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 99))
def test_unrolled_moe_matches_the_reference(tmp_path_factory, N, E, route, stored, seed):
    """Against the eager op on the stored (rounded) weights: tokens spread over the experts, all on the skip
    class (every branch empty), or all on one expert; one token (decode) and many."""
    folder = tmp_path_factory.mktemp("moe")
    (gate_up, down), inputs = routed_case(seed, N, E, route, H, I)
    module = _MoE(gate_up.to(stored).float(), down.to(stored).float())
    model = _lowered(module, inputs, folder, stored)
    log = unroll_entry(model)
    assert [(p.name, p.rewrites) for p in log] == [("unroll_experts", 2 * E)]
    assert not any(n.op_type in ("Loop", "If", "MoETop1") for n in model.graph.all_nodes())
    assert not model.functions.get((DOMAIN, "MoETop1", ""))
    gemms = [n for n in model.graph if n.op_type == "Gemm"]
    assert len(gemms) == 2 * E
    for node in gemms:  # each reads one expert's bytes of the stack in place (through a Cast when narrower)
        weight = node.inputs[1]
        if stored != torch.float32:
            assert weight.producer().op_type == "Cast"
            weight = weight.producer().inputs[0]
        assert weight.is_initializer() and isinstance(weight.const_value, ir.ExternalTensor)
    assert {"gate_up", "down", "gate_up.stored", "down.stored"}.isdisjoint(model.graph.initializers)
    with torch.no_grad():
        want = module(*inputs)
    got = _run(model, folder, inputs)
    for a, b in zip(got, want):
        assert np.abs(a - b.numpy()).max() <= 2e-5 * max(1.0, float(b.abs().max()))
    if route == "skip":
        assert (got[0] == 0).all()


def routed_case(seed: int, N: int, E: int, route: str, hidden: int, inter: int
                ) -> tuple[tuple[torch.Tensor, torch.Tensor], list[torch.Tensor]]:
    """Expert stacks (gate_up [E, 2I, H], down [E, H, I]) and the op's inputs for N tokens: routing ``free``
    (spread over the experts), ``skip`` (every token on the skip class) or ``one`` (every token on one expert)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    balancing = torch.zeros(E + 1)
    if route != "free":  # +10 makes that class win for every token
        balancing[-1 if route == "skip" else E // 2] = 10.0
    stacks = (r(E, 2 * inter, hidden) / 3, r(E, hidden, inter) / 3)
    inputs = [r(N, hidden), r(N, R), r(R, hidden) / 3, r(R), r(R), r(R).abs() + 0.5, r(R, R) / 3, r(R),
              r(R, R) / 3, r(R), r(E + 1, R), balancing]
    return stacks, inputs


def _random_case(E: int, N: int) -> tuple[_MoE, list[torch.Tensor]]:
    """An op with E random experts and the inputs of N tokens, free routing."""
    module = _MoE(torch.randn(E, 2 * I, H), torch.randn(E, H, I))
    return module, [torch.randn(N, H), torch.randn(N, R), torch.randn(R, H), torch.randn(R), torch.randn(R),
                    torch.ones(R), torch.randn(R, R), torch.randn(R), torch.randn(R, R), torch.randn(R),
                    torch.randn(E + 1, R), torch.zeros(E + 1)]


def test_expert_slices_are_the_stack_bytes(tmp_path):
    """Expert e's initializer is the stack's external data at offset + e × (bytes per expert)."""
    E = 3
    module, inputs = _random_case(E, 4)
    model = _lowered(module, inputs, tmp_path, torch.float32)
    stacks = {n: model.graph.initializers[n].const_value for n in ("gate_up", "down")}
    PassManager([UnrollExperts()]).run(model)
    for name, stack in stacks.items():
        stride = stack.length // E
        for e in range(E):
            part = model.graph.initializers[f"{name}.{e}"].const_value
            assert (part.offset, part.length) == (stack.offset + e * stride, stride)
            np.testing.assert_array_equal(part.numpy(), getattr(module, name).detach().numpy()[e])


def test_unbound_stacks_are_refused(tmp_path):
    """The pass reads expert slices from the weight file; a stack held in memory is a pipeline-order bug."""
    module, inputs = _random_case(2, 3)
    model = _lowered(module, inputs, tmp_path, torch.float32)
    model.graph.initializers["gate_up"].const_value = ir.tensor(module.gate_up.detach().numpy())
    with pytest.raises(PassError, match="not a weight bound to the weight file"):
        PassManager([UnrollExperts()]).run(model)
