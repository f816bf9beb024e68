"""A quantized MoE as one onnxruntime ``QMoE`` node (passes/onnx_qmoe, through ``quantize_weights``): the same
outputs as the eager op on the dequantized experts, for every token count and routing (the skip class firing for
every token, all on one expert), symmetric and asymmetric int4 and int8, at fp32 activation accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from test_moe_unroll import SETTINGS, _lowered, _MoE, _run, routed_case
from zaya_export.kernels.moe_top1 import _route
from zaya_export.models.checkpoint import save_tensors
from zaya_export.models.quantization import QuantScheme, dequantize, quantize
from zaya_export.models.safetensors_header import read_header
from zaya_export.passes.base import PassManager
from zaya_export.passes.onnx_qmoe import fused_moe_supported, interleave_rows
from zaya_export.passes.onnx_quant import QuantizeWeights, StoredMatrix

H, I, GROUP = 32, 16, 16


def _quantized_file(module: _MoE, scheme: QuantScheme, folder: Path) -> tuple[dict[str, StoredMatrix], _MoE]:
    """The module's stacks quantized into ``folder/q.safetensors`` (MatMulNBits layout), their parts' places,
    and the module on the dequantized stacks (what the graph must compute)."""
    tensors, quantized = {}, {}
    for name in ("gate_up", "down"):
        q = quantize(getattr(module, name).detach(), scheme.bits, scheme.group_size, scheme.symmetric)
        quantized[name] = dequantize(q, scheme.bits, scheme.group_size)
        tensors.update({f"{name}.{part}": t for part, t in q.parts().items()})
    path = folder / "q.safetensors"
    save_tensors(tensors, path)
    header = read_header(path)
    start = path.stat().st_size - max(i.end for i in header.values())
    matrices = {}
    for name in ("gate_up", "down"):
        parts = {n.split(".", 1)[1]: (start + i.start, i.end - i.start, tuple(tensors[n].shape))
                 for n, i in header.items() if n.startswith(name + ".")}
        matrices[name] = StoredMatrix(scheme.bits, tuple(getattr(module, name).shape), parts)
    return matrices, _MoE(quantized["gate_up"], quantized["down"])


def int8_activation_bound(module: _MoE, inputs: list[torch.Tensor]) -> torch.Tensor:
    """[N, H] worst-case error of the experts' output when both matmuls round their activations to int8.

    onnxruntime's int8-compute kernels quantize each activation block symmetrically (scale amax/127), so each
    input is off by at most half a step, ≤ amax(row)/254 for any block split of the row. That error goes through
    ``|W|``, then SwiGLU (|silu'| ≤ 1.1), then the rounding of the down projection's input, then ``|W_down|``,
    and is scaled by the router's probability of the token's expert (0 for the skip class)."""
    x = inputs[0]  # [N, H]
    with torch.no_grad():
        choice, weight, _ = _route(*inputs, 1e-5)  # [N], [N]
        half_step = x.abs().amax(-1, keepdim=True) / 254  # [N, 1]
        bound = torch.zeros_like(x)
        for e in range(module.gate_up.shape[0]):
            gate_up, down = module.gate_up[e], module.down[e]  # [2I, H], [H, I]
            g, u = (x @ gate_up.T).chunk(2, -1)  # [N, I] each
            e_g, e_u = (half_step * gate_up.abs().sum(-1)).chunk(2, -1)  # [N, I] each
            silu_slope = 1.1
            e_h = silu_slope * u.abs() * e_g + F.silu(g).abs() * e_u + silu_slope * e_g * e_u  # [N, I]
            h_max = (F.silu(g) * u).abs() + e_h
            e_in = e_h + h_max.amax(-1, keepdim=True) / 254  # [N, I]
            mine = (choice == e)[:, None]
            bound = torch.where(mine, (e_in @ down.abs().T) * weight[:, None], bound)  # [N, H]
        return bound


@SETTINGS
@given(N=st.sampled_from([1, 2, 9, 17]), E=st.sampled_from([1, 3, 5]), route=st.sampled_from(["free", "skip", "one"]),
       quant=st.sampled_from(["int4", "int4-asym", "int8-asym"]), seed=st.integers(0, 99))
def test_qmoe_matches_the_reference(tmp_path_factory, N, E, route, quant, seed):
    folder = tmp_path_factory.mktemp("qmoe")
    stacks, inputs = routed_case(seed, N, E, route, H, I)
    module = _MoE(*stacks)
    accuracy = 0 if quant.startswith("int4") else 4  # int8 experts always quantize the activations
    scheme = QuantScheme.parse(quant, GROUP, accuracy_level=accuracy)
    model = _lowered(module, inputs, folder, torch.float32)
    matrices, reference = _quantized_file(module, scheme, folder)
    log = PassManager([QuantizeWeights(scheme, matrices, "q.safetensors", folder, prefix="")]).run(model)
    assert [(p.name, p.rewrites) for p in log] == [("quantize_weights", 2 * E)]
    ops = [n.op_type for n in model.graph]
    assert ops.count("QMoE") == 1 and "MatMulNBits" not in ops and "MoETop1" not in ops
    with torch.no_grad():
        want = reference(*inputs)
    got = _run(model, folder, inputs)
    fp32 = 2e-5 * max(1.0, float(want[0].abs().max()))
    bound = fp32 + (int8_activation_bound(reference, inputs).numpy() if accuracy else 0.0)  # [N, H] or scalar
    assert (np.abs(got[0] - want[0].numpy()) <= bound).all()
    np.testing.assert_allclose(got[1], want[1].numpy(), rtol=2e-5, atol=2e-5)  # the router runs in fp32 either way
    if route == "skip":
        assert (got[0] == 0).all()


def test_qmoe_only_where_it_computes_the_unrolled_experts():
    """QMoE's block-wise kernels need K divisible by the group on both expert matmuls, and int8 experts have no
    fp32-activation kernel (an int8 export at fp32 accuracy keeps the unrolled MatMulNBits branches)."""
    int4, int8 = QuantScheme.parse("int4", 32), QuantScheme.parse("int8", 32)
    assert fused_moe_supported(int4, 256, 256) and fused_moe_supported(int8, 2048, 2048)
    assert fused_moe_supported(QuantScheme.parse("int4-asym", 16, accuracy_level=0), 64, 48)
    assert not fused_moe_supported(QuantScheme.parse("int8", 32, accuracy_level=0), 256, 256)
    assert not fused_moe_supported(int4, 80, 256) and not fused_moe_supported(int4, 256, 80)
    order = interleave_rows(3)
    assert order.tolist() == [0, 3, 1, 4, 2, 5]  # [gate | up] rows → g0 u0 g1 u1 g2 u2
