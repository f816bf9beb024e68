"""ONNX-level passes run after lowering: constant folding (small tensors only, so no weight is ever
duplicated by folding a transpose), dead-code and unused-function removal, and a check that every fused op
survived lowering as a ``zaya``-domain node with a function body."""

from __future__ import annotations

from collections import Counter

import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.optimizer import fold_constants

from .base import Pass, PassError
from .onnx_conv2d import Conv1dAs2d
from .onnx_rsqrt import RsqrtAsDiv


class FoldConstants(Pass[ir.Model]):
    """Fold small constant subgraphs; never a node that reads a weight (folding ``Transpose(W)`` would store a
    second, transposed copy of W in the graph)."""

    name, allow_zero = "fold_constants", True

    def run(self, model: ir.Model) -> int:
        weights = {v.name for v in model.graph.initializers.values() if v.const_value is not None
                   and v.const_value.size > 1024}

        def should_fold(node: ir.Node) -> bool | None:
            return False if any(v is not None and v.name in weights for v in node.inputs) else None

        result = fold_constants(model, input_size_limit=8192, output_size_limit=65536, should_fold=should_fold)
        return len(getattr(result, "symbolic_value_map", {}) or {}) if result.modified else 0


class RemoveDeadCode(Pass[ir.Model]):
    name, allow_zero = "dead_code", True

    def run(self, model: ir.Model) -> int:
        before = sum(1 for _ in model.graph.all_nodes())
        common.RemoveUnusedNodesPass()(model)
        common.RemoveUnusedFunctionsPass()(model)
        common.RemoveUnusedOpsetsPass()(model)
        common.ClearMetadataAndDocStringPass()(model)  # drop per-node torch stack traces
        return before - sum(1 for _ in model.graph.all_nodes())


class CheckFusedNodes(Pass[ir.Model]):
    """Asserts the lowered graph holds exactly the expected number of each ``zaya`` node, each with a body."""

    name, allow_zero = "check_fused_nodes", True

    def __init__(self, expected: dict[str, int]) -> None:
        self.expected = expected

    def run(self, model: ir.Model) -> int:
        return 0

    def ensures(self, model: ir.Model, rewrites: int) -> None:
        found = Counter(n.op_type for n in model.graph if n.domain == "zaya")
        if dict(found) != self.expected:
            raise PassError(f"zaya nodes in the ONNX graph: {dict(found)}, expected {self.expected}")
        missing = sorted({op for op in found if ("zaya", op, "") not in model.functions})
        if missing:
            raise PassError(f"zaya ops without an ONNX function body: {missing}")


def onnx_pipeline(expected: dict[str, int]) -> list[Pass[ir.Model]]:
    return [Conv1dAs2d(), RsqrtAsDiv(), FoldConstants(), RemoveDeadCode(), CheckFusedNodes(expected)]
