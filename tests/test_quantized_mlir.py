"""Quantized matrices on the MLIR/IREE path (``models/quantized_matrix.py``): the traced faces compute the
dequantized model, the lowered module reads the codes in place (int4 as i4 or as packed bytes), IREE fuses the
dequantization of every plain matrix into the matmul that reads it, and IREE equals onnxruntime."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zaya_export.kernels as kernels
from conftest import perturbed, random_model, small_config
from zaya_export.exporter import export_artifact
from zaya_export.mlir_export import NARROW_PARAMETER_FLAGS, QUANTIZED_FLAGS, store_parameters
from zaya_export.models.checkpoint import save_checkpoint
from zaya_export.models.entries import Entry, accept_inputs, entry_specs, example_inputs
from zaya_export.models.quantization import HEAD, QuantScheme, _unpack, dequantize, quantize
from zaya_export.models.quantized_matrix import QuantizedMatrix, quantized_matrices
from zaya_export.passes.fusion import fused
from zaya_export.runtime.artifact import open_artifact
from zaya_export.validate import cross_check, validate_artifact


def _fill(model: torch.nn.Module, floats: dict[str, torch.Tensor], scheme: QuantScheme) -> dict[str, torch.Tensor]:
    """Put the real parts of each swapped matrix into its QuantizedMatrix (in the form the lowering traces);
    returns name → the dequantized matrix they stand for."""
    out = {}
    for name, w in floats.items():
        qm = model.get_submodule(name)
        assert isinstance(qm, QuantizedMatrix)
        q = quantize(w, qm.bits, scheme.group_size, scheme.symmetric)
        groups = q.scales.shape[-1]
        codes = q.qweight if qm.packed else _unpack(q.qweight, qm.bits, scheme.group_size)
        qm.qweight = codes.contiguous()
        qm.scales = q.scales
        if q.zero_points is not None:
            zp = q.zero_points if qm.packed or qm.bits == 8 else _unpack(q.zero_points, 4, groups)
            qm.zero_points = torch.nn.functional.pad(zp, (0, qm.zero_points.shape[-1] - zp.shape[-1])).contiguous()
        out[name] = dequantize(q, qm.bits, scheme.group_size)
    return out


@pytest.mark.parametrize("quant,group,tied", [("int4-asym", 16, False), ("int4", 32, True), ("int8-asym", 16, True),
                                              ("int4-asym", 32, False)])
def test_quantized_faces_compute_the_dequantized_model(quant, group, tied):
    """Every entry kind (one-token decode faces: fused reductions and the gathered MoE, or at batch 1 the selected
    one; multi-token: dequantized matmuls and the all-expert MoE; the packed TiDAR step) on QuantizedMatrix
    weights equals the float model on the dequantized weights. The expert width 80 gives the down projection an odd group count at group 16 (the
    int4 zero points padded to whole bytes) and a padded last group at group 32."""
    config = small_config(num_hidden_layers=2, tie_word_embeddings=tied, moe_intermediate_size=80)
    spec_of = entry_specs(4).__getitem__
    model = perturbed(random_model(config, seed=3), noise=0.2)
    scheme = QuantScheme.parse(quant, group, "same")
    floats = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)
              if scheme.bits_for(n) is not None}
    if tied:
        floats[HEAD] = model.lm_head.weight.detach().clone()
    reference = perturbed(random_model(config, seed=3), noise=0.2)
    with fused(model), fused(reference):
        with quantized_matrices(model, scheme) as swapped:
            assert sorted(swapped) == sorted(floats)
            dequantized = _fill(model, floats, scheme)
            with torch.no_grad():
                if tied:  # the reference's head becomes its own matrix, the embedding stays float
                    reference.lm_head.weight = torch.nn.Parameter(dequantized.pop(HEAD))
                for name, w in dequantized.items():
                    owner, _, attr = name.rpartition(".")
                    getattr(reference.get_submodule(owner), attr).copy_(w)
            # decode once more at batch 1: the batch-1 twin's MoE face selects its expert by a scalar index
            cases = [(name, spec, 2) for name, spec in entry_specs(4).items()] + [("decode", spec_of("decode"), 1)]
            for name, spec, batch in cases:
                inputs = example_inputs(model, batch, spec.tokens or 5, 3, seed=4)
                if spec.accept:
                    inputs = (*inputs, *accept_inputs(spec, batch, config.vocab_size))
                with kernels.mlir_faces(decode=spec.tokens == 1), torch.no_grad():
                    got, want = Entry(model, spec)(*inputs), Entry(reference, spec)(*inputs)
                for g, w in zip(got, want, strict=True):
                    if g.is_floating_point():
                        scale = w.abs().max().clamp_min(1.0)
                        assert (g - w).abs().max() <= 1e-4 * scale, (name, (g - w).abs().max())
                    else:
                        assert torch.equal(g, w), name
    assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())  # restored
    assert not any(isinstance(m, QuantizedMatrix) for m in model.modules())
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_store_parameters_packs_int4_codes_as_i4(tmp_path):
    path = tmp_path / "m.mlir"
    path.write_text(
        '  util.global private @__auto.w.qweight = #flow.parameter.named<"model"::"w.qweight"> : tensor<4x2x16xi8>\n'
        '  util.global private @__auto.e.qweight = #flow.parameter.named<"model"::"e.qweight"> : tensor<2x4x2x8xi8>\n'
        '    %__auto.w.qweight = util.global.load @__auto.w.qweight : tensor<4x2x16xi8>\n'
        '    %__auto.e.qweight = util.global.load @__auto.e.qweight : tensor<2x4x2x8xi8>\n')
    assert store_parameters(path, {"w.qweight": "U8", "e.qweight": "U8"}, int4=["w.qweight"]) == 1
    text = path.read_text()
    assert '"w.qweight"> : tensor<4x2x16xi4>' in text and '"e.qweight"> : tensor<2x4x2x8xi8>' in text
    assert "%__auto.w.qweight = arith.extui %__auto.w.qweight.stored : tensor<4x2x16xi4> to tensor<4x2x16xi8>" in text
    with pytest.raises(RuntimeError, match="not an i8 parameter"):
        store_parameters(path, {}, int4=["missing.qweight"])


def _dispatches(mlir: Path, entry: str, flags: tuple[str, ...]) -> list[str]:
    """Names of ``entry``'s dispatches after IREE's dispatch formation for the CPU target."""
    flow = mlir.with_suffix(".flow.mlir")
    cmd = [str(Path(sys.executable).parent / "iree-compile"), str(mlir), "--iree-input-type=torch",
           "--iree-hal-target-device=local", "--iree-hal-local-target-device-backends=llvm-cpu",
           "--iree-llvmcpu-target-cpu=x86-64-v3", *flags, "--compile-to=flow", "-o", str(flow)]
    subprocess.run(cmd, check=True, capture_output=True)
    return re.findall(rf"flow\.executable\.export public @({re.escape(entry)}\$\w+)", flow.read_text())


def test_quantized_iree_module_reads_codes_in_place_and_fuses_dequantization(tmp_path):
    """int4-asym with an int4 head and an odd group count: the module's quantized globals are i4 (plain
    matrices) or packed bytes (expert stacks), never float; IREE equals the dequantized eager model and
    onnxruntime; in decode no dispatch dequantizes a plain matrix on its own (it sits inside the matmul)."""
    config = small_config(num_hidden_layers=2, tie_word_embeddings=False)
    ckpt = save_checkpoint(perturbed(random_model(config, seed=5), noise=0.3), tmp_path / "ckpt")
    out = tmp_path / "art"
    export_artifact(ckpt, out, quant="int4-asym", group_size=16, quant_head="same", quant_accuracy=0,
                    formats=("onnx", "mlir"), tidar="off", calibrate=0)
    art = open_artifact(out)
    assert set(QUANTIZED_FLAGS) | set(NARROW_PARAMETER_FLAGS) <= set(art.manifest.iree["cpu"].flags)
    text = (out / art.manifest.mlir.module).read_text()
    head_k = config.hidden_size
    assert re.search(rf'"lm_head\.weight\.qweight"> : tensor<{config.vocab_size}x{head_k // 16}x16xi4>', text)
    assert re.search(r'"model\.layers\.0\.mlp\.experts\.gate_up_proj\.qweight"> : tensor<\d+x\d+x\d+x8xi8>', text)
    assert not re.search(r'"[^"]*\.(qweight|zero_points)"> : tensor<[0-9x]*f32>', text)
    keys = re.findall(r'#flow\.parameter\.named<"model"::"([^"]+)">', text)
    float_copies = [k for k in keys if art.manifest.scheme.bits_for(k) is not None]
    assert keys and not float_copies, float_copies  # every quantized matrix is read as its parts only
    report = validate_artifact(art, backend="iree", checkpoint=ckpt)
    assert all(c["ok"] for c in report["entries"]), [c for c in report["entries"] if not c["ok"]]
    assert max(c["max_rel"] for c in report["entries"]) <= 1e-5
    cross = cross_check(art, ["ort", "iree"])
    assert cross and all(c["ok"] for c in cross), cross
    decode = _dispatches(out / art.manifest.mlir.module, "decode", (*NARROW_PARAMETER_FLAGS, *QUANTIZED_FLAGS))
    assert decode and not [d for d in decode if re.search(r"elementwise\w*_i4x", d)], decode
    assert any(re.search(r"matmul_like|matvec_like", d) for d in decode)
