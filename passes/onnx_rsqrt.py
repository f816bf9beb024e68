"""``rsqrt_as_div``: ``x · Reciprocal(Sqrt(a))`` becomes ``x / Sqrt(a)``, so onnxruntime fuses each RMSNorm.

Why: torch exports ``x * torch.rsqrt(mean(x²) + eps)`` as ``Sqrt`` → ``Reciprocal`` → ``Mul``. onnxruntime's
``SimplifiedLayerNormFusion`` matches only the divide form (``Pow`` → ``ReduceMean`` → ``Add`` → ``Sqrt`` →
``Div`` → ``Mul`` by the weight), so every RMSNorm of a decode step ran as seven nodes instead of one
``SimplifiedLayerNormalization``: on a model whose decode step is dominated by per-node overhead (the demo's
1-token forward; ~170 nodes per layer of the 8B config) that is a measurable share of the step. Where the
pattern is not a norm, a divide is as exact as the multiply by the reciprocal (one rounding instead of two).

The rewrite leaves the ``Sqrt`` in place (the ``Reciprocal`` goes once no ``Mul`` reads it) and replaces each
``Mul`` that reads the reciprocal by a ``Div`` of its other operand.
"""

from __future__ import annotations

import onnx_ir as ir

from .base import Pass, PassError


def _products(node: ir.Node) -> list[tuple[ir.Node, ir.Value]]:
    """(``Mul``, its other operand) for each product of something with ``node``'s reciprocal, when ``node`` is
    ``Reciprocal(Sqrt(a))``; else nothing."""
    root = node.inputs[0].producer() if node.op_type == "Reciprocal" and node.domain == "" else None
    if root is None or root.op_type != "Sqrt" or root.domain != "":
        return []
    out = node.outputs[0]
    return [(use.node, use.node.inputs[1 - use.idx]) for use in out.uses()
            if use.node.op_type == "Mul" and use.node.domain == "" and len(use.node.inputs) == 2
            and use.node.inputs[1 - use.idx] is not out]


class RsqrtAsDiv(Pass[ir.Model]):
    name, allow_zero = "rsqrt_as_div", True

    def run(self, model: ir.Model) -> int:
        rewrites = 0
        for node in list(model.graph):
            products = _products(node)
            for mul, other in products:
                div = ir.node("Div", [other, node.inputs[0]], name=f"{mul.name or 'mul'}.div")
                model.graph.insert_before(mul, div)
                out = div.outputs[0]
                out.name, out.shape, out.type = mul.outputs[0].name, mul.outputs[0].shape, mul.outputs[0].type
                mul.outputs[0].name = f"{out.name}.rsqrt"
                ir.convenience.replace_all_uses_with(mul.outputs[0], out, replace_graph_outputs=True)
                model.graph.remove(mul, safe=True)
                rewrites += 1
            if products and not node.outputs[0].uses() and not node.outputs[0].is_graph_output():
                model.graph.remove(node, safe=True)
        return rewrites

    def ensures(self, model: ir.Model, rewrites: int) -> None:
        left = [n.name for n in model.graph if _products(n)]
        if left:
            raise PassError(f"x·Reciprocal(Sqrt(a)) left: {left[:3]}")
