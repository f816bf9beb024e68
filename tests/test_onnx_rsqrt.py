"""``rsqrt_as_div``: the rewritten graph computes what it replaces, and onnxruntime then fuses each RMSNorm."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from zaya_export.passes.base import PassManager
from zaya_export.passes.onnx_rsqrt import RsqrtAsDiv
from zaya_export.runtime.backends import ort_session, shared_pool


def _rmsnorm_graph(hidden: int, scale: float) -> onnx.ModelProto:
    """torch's export of ``w * (x * rsqrt(mean(x**2) + eps))``, plus two products that are not norms: the
    reciprocal squared (no other operand) and the reciprocal read by a non-``Mul`` too."""
    w = (np.random.default_rng(hidden).standard_normal(hidden) * scale).astype(np.float32)
    nodes = [
        helper.make_node("Pow", ["x", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "last"], ["var"], keepdims=1),
        helper.make_node("Add", ["var", "eps"], ["var_eps"]),
        helper.make_node("Sqrt", ["var_eps"], ["root"]),
        helper.make_node("Reciprocal", ["root"], ["inv"]),
        helper.make_node("Mul", ["x", "inv"], ["normed"]),
        helper.make_node("Mul", ["w", "normed"], ["y"]),
        helper.make_node("Mul", ["inv", "inv"], ["inv_sq"]),
        helper.make_node("Neg", ["inv"], ["neg_inv"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", hidden])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "inv_sq", "neg_inv")],
        [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
         numpy_helper.from_array(np.array([-1], np.int64), "last"),
         numpy_helper.from_array(np.array(1e-5, np.float32), "eps"), numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _optimized_ops(proto: onnx.ModelProto, tmp_path) -> list[str]:  # noqa: ANN001
    shared_pool(ort)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.use_per_session_threads = False  # the process-wide pool ort_session made (backends.shared_pool)
    ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]


@pytest.mark.parametrize("shape,scale", [((1, 1, 64), 1.0), ((3, 5, 48), 1.0), ((2, 7, 32), 100.0),
                                         ((1, 4, 16), 1e-3)])
def test_rsqrt_as_div_computes_the_same(shape, scale):
    proto = _rmsnorm_graph(shape[-1], scale)
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    x[0, 0, :] = 0.0  # an all-zero row: only eps under the root
    want = ort_session(proto.SerializeToString()).run(None, {"x": x})
    model = ir.serde.deserialize_model(proto)
    log = PassManager([RsqrtAsDiv()]).run(model)
    assert [r.rewrites for r in log] == [1]  # x·(1/√a) only: not (1/√a)², not the Neg
    ops = [n.op_type for n in model.graph]
    assert ops.count("Div") == 1 and ops.count("Reciprocal") == 1  # still read by the other two
    assert [o.name for o in model.graph.outputs] == ["y", "inv_sq", "neg_inv"]
    rewritten = ir.serde.serialize_model(model)
    got = ort_session(rewritten.SerializeToString()).run(None, {"x": x})
    for a, g in zip(want, got):
        assert a.shape == g.shape
        np.testing.assert_allclose(g, a, rtol=2e-6, atol=2e-6 * float(np.abs(a).max()))


def test_rsqrt_as_div_lets_onnxruntime_fuse_the_norm(tmp_path):
    """With the reciprocal read by the norm alone, the rewrite drops it, and onnxruntime's optimizer turns the
    norm into one SimplifiedLayerNormalization (which it did not before), computing the same."""
    proto = _rmsnorm_graph(48, 1.0)
    del proto.graph.node[-2:]
    del proto.graph.output[1:]
    x = np.random.default_rng(0).standard_normal((2, 3, 48)).astype(np.float32)
    want = ort_session(proto.SerializeToString()).run(None, {"x": x})[0]
    assert "SimplifiedLayerNormalization" not in _optimized_ops(proto, tmp_path)
    model = ir.serde.deserialize_model(proto)
    assert [r.rewrites for r in PassManager([RsqrtAsDiv()]).run(model)] == [1]
    assert [n.op_type for n in model.graph] == ["Pow", "ReduceMean", "Add", "Sqrt", "Div", "Mul"]
    rewritten = ir.serde.serialize_model(model)
    assert _optimized_ops(rewritten, tmp_path) == ["SimplifiedLayerNormalization"]
    got = ort_session(rewritten.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * float(np.abs(want).max()))
