"""Weight-only int8/int4 quantization: the codes, their MatMulNBits layout, the quantized ONNX graphs against the
model they stand for, and the error budget against the unquantized source (the demo checkpoint)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
from zaya_export.runtime.backends import ort_session
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper

from conftest import perturbed, random_model, small_config
from zaya_export.cli import main
from zaya_export.exporter import ExportError, export_artifact
from zaya_export.models.checkpoint import save_checkpoint
from zaya_export.models.quantization import QuantError, QuantScheme, dequantize, quantize
from zaya_export.runtime.artifact import ArtifactError, open_artifact
from zaya_export.validate import validate_artifact

DEMO = Path(__file__).resolve().parent.parent / "models" / "zaya1-demo"
CASES = [(bits, sym, k, g) for bits in (4, 8) for sym in (True, False) for k, g in ((64, 32), (80, 32), (40, 16))]


@pytest.mark.parametrize("bits,symmetric,k,group", CASES)
def test_codes_round_to_the_nearest_level(bits, symmetric, k, group):
    w = torch.randn(2, 24, k) * torch.logspace(-3, 2, 24)[None, :, None]  # rows of very different scales
    w[0, 3] = 0.0  # an all-zero row: exact
    q = quantize(w, bits, group, symmetric)
    back = dequantize(q, bits, group)
    assert back.shape == w.shape
    groups = math.ceil(k / group)
    assert q.qweight.shape == (2, 24, groups, group * bits // 8) and q.qweight.dtype == torch.uint8
    step = q.scales.repeat_interleave(group, -1)[..., :k]  # [2, 24, k]: each value's quantization step
    # round to nearest, no clipping: half a step, plus the fp32 rounding of w / scale and of code × scale (a few
    # ulps of |w|; a bound without it failed ~1% of random draws by 1e-8 at |w| ≈ 6)
    assert ((back - w).abs() <= 0.5 * step * (1 + 1e-5) + 2**-22 * w.abs() + 1e-12).all()
    assert (back[0, 3] == 0).all()
    if symmetric:  # the group maximum is exact
        top = w.reshape(2, 24, -1).abs().amax(-1)
        assert torch.allclose(back.reshape(2, 24, -1).abs().amax(-1), top, rtol=1e-6)


def test_refuses_non_finite_weights_and_unknown_schemes():
    with pytest.raises(QuantError, match="inf or NaN"):
        quantize(torch.tensor([[1.0, float("nan")]]), 8, 32, True)
    with pytest.raises(QuantError, match="unknown quantization"):
        QuantScheme.parse("int3")
    with pytest.raises(QuantError, match="group-size"):
        QuantScheme.parse("int4", group_size=48)


@pytest.mark.parametrize("bits,symmetric,k,group", CASES)
def test_matmulnbits_reads_our_layout(bits, symmetric, k, group):
    """onnxruntime's MatMulNBits (fp32 accuracy level) on our codes computes x @ dequantize(codes)ᵀ."""
    n = 48
    q = quantize(torch.randn(n, k), bits, group, symmetric)
    inits = [onnx.numpy_helper.from_array(q.qweight.numpy(), "B"), onnx.numpy_helper.from_array(q.scales.numpy(), "S")]
    if not symmetric:
        inits.append(onnx.numpy_helper.from_array(q.zero_points.numpy(), "Z"))
    node = helper.make_node("MatMulNBits", ["A", "B", "S"] + ([] if symmetric else ["Z"]), ["Y"], domain="com.microsoft",
                            K=k, N=n, bits=bits, block_size=group, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    sess = ort_session(model.SerializeToString())
    for m in (0, 1, 7):
        a = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
        want = a @ dequantize(q, bits, group).numpy().T
        np.testing.assert_allclose(sess.run(None, {"A": a})[0], want, rtol=1e-5, atol=1e-5 * max(1, np.abs(want).max(initial=0)))


# --------------------------------------------------------------------------------------- quantized export
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # perturbed: logits of |z| ~ 100, routers near ties, the skip class firing
    model = perturbed(random_model(small_config(num_hidden_layers=2, layer_types=["hybrid", "hybrid_sliding"],
                                                sliding_window=8, tie_word_embeddings=False), seed=5), noise=0.3)
    return save_checkpoint(model, tmp_path_factory.mktemp("quant") / "ckpt")


@pytest.mark.parametrize("quant,head", [("int4-asym", "same"), ("int8", "int8")])
def test_quantized_graphs_compute_their_dequantized_model(ckpt, tmp_path, quant, head):
    """At MatMulNBits' exact (fp32) accuracy level, every entry (prefill, decode, verify, draft, the packed TiDAR
    steps) matches the eager model on the dequantized weights at fp32 tolerance: the MoE expansion, the inlined
    CCA projections, o_proj and the untied head all read the right codes."""
    out = tmp_path / "art"
    manifest = export_artifact(ckpt, out, quant=quant, group_size=16, quant_head=head, quant_accuracy=0, calibrate=0)
    scheme = manifest.scheme
    assert scheme.bits == int(quant[3]) and scheme.symmetric == (not quant.endswith("asym"))
    art = open_artifact(out)
    graph = onnx.load(str(art.path("onnx/step.onnx")), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    layers, experts = 2, small_config().num_experts
    # per layer: 4 CCA projections (fused) + 4 (packed step's reference path) + o_proj, and the experts: one QMoE,
    # or (int8 at fp32 accuracy, which QMoE has no kernel for) 2 MatMulNBits per expert; the head
    fused = scheme.bits == 4
    assert ops.count("QMoE") == (layers if fused else 0)
    assert ops.count("MatMulNBits") == layers * (4 + 1 + (0 if fused else 2 * experts)) + 1
    assert not any(n.op_type == "MoETop1" for n in graph.node)
    report = validate_artifact(art, checkpoint=ckpt)
    assert report["dtype"] == "fp32" and all(c["ok"] for c in report["entries"]), [
        c for c in report["entries"] if not c["ok"]][:2]
    assert report["quant_budget"]["windows"] > 0 and report["quant_budget"]["kl_mean"] > 0


def test_quant_refusals(ckpt, tmp_path):
    with pytest.raises(ExportError, match="--quant-head must be one of"):
        export_artifact(ckpt, tmp_path / "a", quant="int4", quant_head="int2", formats=("onnx", "mlir"))
    with pytest.raises(ExportError, match="group-size"):
        export_artifact(ckpt, tmp_path / "b", quant="int4", group_size=24)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    result = CliRunner().invoke(main, ["export", str(ckpt), "-o", str(tmp_path / "c"), "--quant", "int3"])
    assert result.exit_code == 2 and "int3" in result.output


@pytest.fixture(scope="module")
def demo_artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-quant")
    for quant in ("int8", "int4"):
        export_artifact(DEMO, root / quant, quant=quant, tidar="off", calibrate=0)
    return root


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_demo_checkpoint_error_budget(demo_artifacts, quant):
    """The issue's bar on the shipped demo: int8 within mean KL 1e-3 and ≥ 99% top-1 agreement; int4 within its
    budget (quant_budget.BUDGETS). Measured on held-out stdlib text, against the unquantized checkpoint."""
    art = open_artifact(demo_artifacts / quant)
    report = validate_artifact(art)  # the source is the manifest's (the shipped checkpoint)
    budget = report["quant_budget"]
    assert budget["text"] == "stdlib held-out files" and budget["windows"] * budget["window_tokens"] >= 1024
    if quant == "int8":
        assert budget["kl_mean"] <= 1e-3 and budget["top1"] >= 0.99 and budget["ppl_ratio"] <= 1.01
    assert budget["ok"] and report["ok"], budget
    assert all(c["ok"] for c in report["entries"])


def test_demo_int4_is_smaller_and_runs(demo_artifacts, tmp_path):
    sizes = {q: (demo_artifacts / q / "onnx" / "weights.safetensors").stat().st_size for q in ("int8", "int4")}
    assert sizes["int4"] < sizes["int8"]
    result = CliRunner().invoke(main, ["run", str(demo_artifacts / "int4"), "--prompt", "def main():",
                                       "--max-new-tokens", "8", "--json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output.strip().splitlines()[-1])["tokens"]) == 8


def test_tampered_quantized_artifacts_are_refused(demo_artifacts, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(demo_artifacts / "int8", bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["quant"]["bits"] = 3
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError):
        open_artifact(bad)


def test_missing_source_checkpoint_is_a_clear_error(demo_artifacts, tmp_path):
    import shutil

    moved = tmp_path / "art"
    shutil.copytree(demo_artifacts / "int8", moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["source"] = str(tmp_path / "nowhere")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["validate", str(moved), "--json"])
    assert result.exit_code != 0 and "pass --checkpoint" in result.output


def test_large_matrices_are_quantized_in_row_chunks(monkeypatch):
    """The working set of quantizing a big matrix (the 8B's tied head) is one chunk of rows; the codes are those
    of the whole matrix at once."""
    import zaya_export.models.quantization as quantization

    w = torch.randn(37, 48)
    whole = quantize(w, 4, 16, False)
    monkeypatch.setattr(quantization, "ROWS_PER_CHUNK", 5)
    chunked = quantize(w, 4, 16, False)
    for a, b in zip(whole.parts().values(), chunked.parts().values()):
        assert torch.equal(a, b)


def test_layerwise_validate_streams_the_source_one_layer_at_a_time(ckpt, tmp_path, monkeypatch):
    """The 8B path of validate (its fp32 eager model does not fit): the artifact's `layers` entry against the
    source run with one layer's matrices loaded at a time. Forced here on a small model by streaming every
    matrix. On this perturbed model (|logits| ~ 100, routers near ties) int8 is outside its budget, and the
    layer-by-layer check must say so as the full validate does; a float artifact must match exactly."""
    import zaya_export.models.layer_streaming as layer_streaming
    from zaya_export.validate import TOLERANCES
    from zaya_export.validate_layerwise import layerwise_markdown, validate_layerwise

    monkeypatch.setattr(layer_streaming, "KEEP_BELOW", 1000)  # every matrix of a layer is streamed
    out = tmp_path / "art"
    export_artifact(ckpt, out, quant="int8", tidar="off", calibrate=0)
    report = validate_layerwise(open_artifact(out), tolerances=TOLERANCES)
    full = validate_artifact(open_artifact(out))["quant_budget"]
    assert len(report["residual_stream"]) == 2 * 2 and report["residual_stream"][0]["max_rel"] < 0.05
    assert not report["ok"] and not full["ok"] and report["kl_mean"] > 1e-3 and full["kl_mean"] > 1e-3
    assert "FAIL" in layerwise_markdown(report)
    float_art = tmp_path / "fp32"
    export_artifact(ckpt, float_art, tidar="off", calibrate=0)
    exact = validate_layerwise(open_artifact(float_art), tolerances=TOLERANCES)
    assert exact["ok"] and exact["kl_mean"] < 1e-6 and max(p["max_rel"] for p in exact["residual_stream"]) < 1e-4


def test_large_quantized_artifacts_decode_on_the_prefill_session(demo_artifacts, monkeypatch):
    """Above SHARE_ABOVE_BYTES of weights, decode runs on prefill's onnxruntime session (one prepacked copy of
    the codes: 8.3 GB per session at 8B); the tokens are those of the separate decode graph."""
    import zaya_export.runtime.backends as backends
    from zaya_export.runtime.generate import generate
    from zaya_export.runtime.session import Session

    art = open_artifact(demo_artifacts / "int8")
    prompt = [2, 17, 301, 45]
    separate = Session.from_artifact(art, "ort")
    want = generate(separate, [prompt], 12).tokens[0]
    monkeypatch.setattr(backends, "SHARE_ABOVE_BYTES", 0)
    shared = Session.from_artifact(art, "ort")
    assert generate(shared, [prompt], 12).tokens[0] == want
    assert set(shared.backend.sessions) == {"prefill"}
