"""``conv1d_as_2d``: every 1-D ``Conv`` of the main graph becomes a 2-D one over a height-1 image.

Why: onnxruntime runs a 1-D grouped convolution through its generic path (one im2col + GEMM per group), while a
2-D one gets the NCHWc layout transformer's depthwise and grouped kernels. ZAYA's CCA has two such convolutions
per layer, a depthwise one (C groups) and one with a dense d×d matrix per head. Measured in onnxruntime, 2 threads,
one decode token: C = 1280 (the 8B config), depthwise 135 → 25 µs, grouped 96 → 58 µs; C = 384 (the demo),
67 → 24 µs and 28 → 24 µs. The CCA op's own ONNX body (``kernels/cca.py``) is written 2-D already; this pass
handles the convolutions the exporter emits directly (the packed TiDAR step's reference CCA).

The rewrite: ``Squeeze(Conv(Unsqueeze(x, 2), Unsqueeze(W, 2)), 2)`` with each spatial attribute given a leading
height entry (kernel 1, stride 1, dilation 1, no padding). The weight's ``Unsqueeze`` reads a constant, so
onnxruntime folds it when it creates the session. Only convolutions whose weight is known to be rank 3 change.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .base import Pass, PassError

_LEADING = {"kernel_shape": 1, "strides": 1, "dilations": 1}


def _rank(value: ir.Value | None) -> int | None:
    """Rank of a weight: its own shape, its constant's, or (a narrower stored weight) what its ``Cast`` reads."""
    if value is None:
        return None
    if value.const_value is not None:
        return len(value.const_value.shape)
    if value.shape is not None:
        return len(value.shape)
    producer = value.producer()
    return _rank(producer.inputs[0]) if producer is not None and producer.op_type == "Cast" else None


class Conv1dAs2d(Pass[ir.Model]):
    name, allow_zero = "conv1d_as_2d", True

    def run(self, model: ir.Model) -> int:
        rewrites = 0
        for node in [n for n in model.graph if n.op_type == "Conv" and n.domain == "" and _rank(n.inputs[1]) == 3]:
            tape = ir.tape.Tape()
            axis = tape.op("Constant", [], {"value": ir.tensor(np.array([2], dtype=np.int64))})
            x, w, *bias = node.inputs
            attrs = {}
            for name, attr in node.attributes.items():
                if name in _LEADING:
                    attrs[name] = [_LEADING[name], *attr.value]
                elif name == "pads":  # [begin, end] → [top, begin, bottom, end]
                    attrs[name] = [0, attr.value[0], 0, attr.value[1]]
                else:
                    attrs[name] = attr.value
            y = tape.op("Conv", [tape.op("Unsqueeze", [x, axis]), tape.op("Unsqueeze", [w, axis]), *bias], attrs)
            out = tape.op("Squeeze", [y, axis])
            model.graph.insert_before(node, tape.nodes)
            out.name, out.shape, out.type = node.outputs[0].name, node.outputs[0].shape, node.outputs[0].type
            node.outputs[0].name = f"{out.name}.conv1d"
            ir.convenience.replace_all_uses_with(node.outputs[0], out, replace_graph_outputs=True)
            model.graph.remove(node, safe=True)
            rewrites += 1
        return rewrites

    def ensures(self, model: ir.Model, rewrites: int) -> None:
        left = [n.name for n in model.graph if n.op_type == "Conv" and n.domain == "" and _rank(n.inputs[1]) == 3]
        if left:
            raise PassError(f"1-D Conv nodes left: {left[:3]}")
