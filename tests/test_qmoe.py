"""A quantized MoE as one onnxruntime ``QMoE`` node (passes/onnx_qmoe, through ``quantize_weights``): the same
outputs as the eager op on the dequantized experts, for every token count and routing (the skip class firing for
every token, all on one expert), symmetric and asymmetric int4 and int8, at fp32 activation accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from hypothesis import given, strategies as st

from test_moe_unroll import SETTINGS, _lowered, _MoE, _run, routed_case
from zaya_export.models.checkpoint import save_tensors
from zaya_export.models.quantization import QuantScheme, dequantize, quantize
from zaya_export.models.safetensors_header import read_header
from zaya_export.passes.base import PassManager
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
    tolerance = 2e-5 if accuracy == 0 else 2e-2  # int8 activations: ~1% of the output's scale
    for a, b in zip(got, want):
        assert np.abs(a - b.numpy()).max() <= tolerance * max(1.0, float(b.abs().max()))
    if route == "skip":
        assert (got[0] == 0).all()
