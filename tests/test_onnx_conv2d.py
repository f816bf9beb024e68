"""``conv1d_as_2d``: the rewritten graphs compute the 1-D convolutions they replace."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from zaya_export.passes.base import PassManager
from zaya_export.passes.onnx_conv2d import Conv1dAs2d
from zaya_export.runtime.backends import ort_session

CONVS = [  # channels, groups, kernel, stride, pads, dilation, length
    (12, 12, 2, 1, (0, 0), 1, 2), (12, 12, 2, 1, (0, 0), 1, 9), (12, 3, 2, 1, (0, 0), 1, 5),
    (8, 2, 3, 2, (1, 2), 1, 7), (6, 1, 3, 1, (0, 0), 2, 6), (16, 4, 1, 1, (0, 0), 1, 1),
]


@pytest.mark.parametrize("channels,groups,kernel,stride,pads,dilation,length", CONVS)
def test_conv1d_as_2d_computes_the_1d_conv(channels, groups, kernel, stride, pads, dilation, length):
    rng = np.random.default_rng(channels * 100 + kernel * 10 + length)
    w = rng.standard_normal((channels, channels // groups, kernel)).astype(np.float32)
    b = rng.standard_normal(channels).astype(np.float32)
    attrs = dict(group=groups, strides=[stride], pads=list(pads), dilations=[dilation], kernel_shape=[kernel])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs), helper.make_node("Relu", ["y"], ["z"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, channels, length])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = rng.standard_normal((2, channels, length)).astype(np.float32)
    want = ort_session(proto.SerializeToString()).run(None, {"x": x})

    model = ir.serde.deserialize_model(proto)
    log = PassManager([Conv1dAs2d()]).run(model)
    assert [r.rewrites for r in log] == [1]
    assert [n.op_type for n in model.graph] == ["Constant", "Unsqueeze", "Unsqueeze", "Conv", "Squeeze", "Relu"]
    assert [o.name for o in model.graph.outputs] == ["y", "z"]
    got = ort_session(ir.serde.serialize_model(model).SerializeToString()).run(None, {"x": x})
    for a, g in zip(want, got):
        assert a.shape == g.shape
        np.testing.assert_allclose(g, a, rtol=1e-5, atol=1e-5 * float(np.abs(a).max()))


def test_conv1d_as_2d_leaves_2d_convs_alone():
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones((3, 2, 2, 2), np.float32), "w")])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    assert [r.rewrites for r in PassManager([Conv1dAs2d()]).run(model)] == [0]


def test_conv1d_as_2d_sees_through_the_widening_cast():
    """A weight stored narrower reaches the Conv through a Cast whose output has no recorded shape."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 2, 2)).astype(np.float16)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["w"], ["wc"], to=TensorProto.FLOAT),
         helper.make_node("Conv", ["x", "wc"], ["y"], group=3)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = rng.standard_normal((1, 6, 5)).astype(np.float32)
    want = ort_session(proto.SerializeToString()).run(None, {"x": x})[0]
    model = ir.serde.deserialize_model(proto)
    assert [r.rewrites for r in PassManager([Conv1dAs2d()]).run(model)] == [1]
    got = ort_session(ir.serde.serialize_model(model).SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
