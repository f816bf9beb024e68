"""``quantize_weights``: an ONNX entry's matmuls on quantized weights become onnxruntime ``MatMulNBits``.

The quantized artifact's weight file holds each quantized matrix as codes, scales (and zero points) in
``MatMulNBits`` layout (``models/quantization.py``); this pass points the graph at them:

1. every ``zaya.MoETop1`` node becomes the router and one onnxruntime ``QMoE`` node (``onnx_qmoe``), or, where
   that op cannot express the scheme, the router (``zaya.MoERouter``) and one unrolled branch per expert:
   the rows routed to expert e are gathered, run through two ``MatMulNBits`` on that expert's own codes and
   scattered back (rows of the skip class reach no expert). Each expert's codes must be a constant
   initializer: ``MatMulNBits`` prepacks constant weights once, while a weight gathered at run time takes a
   dequantize-then-matmul fallback about 100x slower (measured: 31 ms against 0.26 ms for a 4096x2048 int4
   matrix, one token);
2. the ``zaya.CCA`` bodies are inlined, so their projections appear as ``MatMul(x, Transpose(W))``;
3. every ``MatMul(x, Transpose(W))`` on a quantized ``W`` (the CCA projections, ``o_proj``, the LM head, the
   packed step's reference attention) becomes ``MatMulNBits(x, codes, scales[, zero points])``.

It ensures no matmul reads a quantized matrix's float weight any more (a tied embedding lookup still reads the
embedding, which the file keeps). The count of rewrites is the number of ``MatMulNBits`` nodes made.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir
import onnx_ir.passes.common as common

from zaya_export.models.quantization import QuantScheme

from .base import Pass, PassError
from .moe_unroll import expand_moe, replace_value, splice
from .onnx_qmoe import MS_DOMAIN, bound_part, fused_moe, fused_moe_supported, qmoe_shape


@dataclass(frozen=True)
class StoredMatrix:
    """Where a quantized matrix's parts lie in the weight file."""

    bits: int
    shape: tuple[int, ...]  # the float matrix: [N, K], or [E, N, K] for experts
    parts: dict[str, tuple[int, int, tuple[int, ...]]]  # part → (byte offset, length, shape)


class QuantizeWeights(Pass[ir.Model]):
    name = "quantize_weights"

    def __init__(self, scheme: QuantScheme, matrices: dict[str, StoredMatrix], weights_file: str, folder: Path,
                 prefix: str = "model.") -> None:
        self.scheme, self.folder, self.weights_file = scheme, folder, weights_file
        self.matrices = {prefix + name: m for name, m in matrices.items()}  # by graph initializer name

    def run(self, model: ir.Model) -> int:
        rewrites = 0
        for node in [n for n in model.graph if n.domain == "zaya" and n.op_type == "MoETop1"]:
            rewrites += self._expand_moe(model, node)
        common.InlinePass(criteria=lambda f: f.name in ("CCA", "MoERouter"))(model)
        for node in [n for n in model.graph if n.op_type == "Transpose"]:
            rewrites += self._dense(model, node)
        common.RemoveUnusedNodesPass()(model)
        common.RemoveUnusedFunctionsPass()(model)
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        return rewrites

    def ensures(self, model: ir.Model, rewrites: int) -> None:
        for node in model.graph:
            if node.op_type in ("MatMul", "Gemm", "Transpose") or node.domain == "zaya":
                read = [v.name for v in node.inputs if v is not None and v.name in self.matrices]
                if read:
                    raise PassError(f"{node.op_type} node {node.name} still reads the float weights {read} of "
                                    "quantized matrices")

    # ------------------------------------------------------------------------------------------ rewrites
    def _codes(self, model: ir.Model, name: str, expert: int | None) -> list[ir.Value]:
        """Initializers of one matrix's parts (one expert's slice of a stacked matrix), in MatMulNBits order."""
        m = self.matrices[name]
        values = []
        for part in ("qweight", "scales", "zero_points"):
            if part not in m.parts:
                continue
            offset, length, shape = m.parts[part]
            if expert is not None:
                length //= shape[0]
                offset, shape = offset + expert * length, shape[1:]
            vname = f"{name}.{part}" + ("" if expert is None else f".{expert}")
            values.append(bound_part(model, vname, part, (offset, length), shape, self.weights_file, self.folder))
        return values

    def _matmul(self, tape: ir.tape.Tape, model: ir.Model, x: ir.Value, name: str, expert: int | None = None
                ) -> ir.Value:
        m = self.matrices[name]
        n, k = m.shape[-2:]
        return tape.op("MatMulNBits", [x, *self._codes(model, name, expert)],
                       {"K": k, "N": n, "bits": m.bits, "block_size": self.scheme.group_size,
                        "accuracy_level": self.scheme.accuracy_level}, domain=MS_DOMAIN)

    def _dense(self, model: ir.Model, node: ir.Node) -> int:
        w = node.inputs[0]
        perm = node.attributes.get("perm")
        if w is None or w.name not in self.matrices or perm is None or list(perm.value) != [1, 0]:
            return 0
        uses = list(node.outputs[0].uses())
        bad = [(u.node.op_type, u.idx) for u in uses if u.node.op_type != "MatMul" or u.idx != 1]
        if bad:
            raise PassError(f"{w.name}: its transpose feeds {bad}, not only the weight input of MatMul nodes")
        for use in uses:
            tape = ir.tape.Tape()
            out = self._matmul(tape, model, use.node.inputs[0], w.name)
            model.graph.insert_before(use.node, tape.nodes)
            replace_value(use.node.outputs[0], out)
            model.graph.remove(use.node, safe=True)
        model.graph.remove(node, safe=True)
        return len(uses)

    def _expand_moe(self, model: ir.Model, node: ir.Node) -> int:
        """MoETop1 → router + one branch per expert on its own rows (module docstring, step 1)."""
        stacks = {"gate_up": node.inputs[-2].name, "down": node.inputs[-1].name}
        if any(name not in self.matrices for name in stacks.values()):
            raise PassError(f"{node.name}: the experts {sorted(stacks.values())} are not quantized")

        experts, hidden = self.matrices[stacks["gate_up"]].shape[0], self.matrices[stacks["gate_up"]].shape[2]
        if fused_moe_supported(self.scheme, hidden, node.attributes["intermediate"].value):
            tape = ir.tape.Tape()
            out, r = fused_moe(tape, node, self._stack(model, stacks["gate_up"]), self._stack(model, stacks["down"]),
                               self.scheme)
            splice(model, node, tape, out, r)
            return 2 * experts

        def matmul(tape: ir.tape.Tape, rows: ir.Value, which: str, e: int) -> ir.Value:
            return self._matmul(tape, model, rows, stacks[which], e)

        expand_moe(model, node, matmul)
        return 2 * experts

    def _stack(self, model: ir.Model, name: str) -> dict[str, ir.Value]:
        """Part → initializer of a whole quantized expert stack, shaped as ``QMoE`` reads it."""
        m = self.matrices[name]
        return {part: bound_part(model, f"{name}.{part}.stack", part, (offset, length),
                                 qmoe_shape(part, m.shape, self.scheme.group_size, m.bits), self.weights_file,
                                 self.folder)
                for part, (offset, length, _) in m.parts.items()}
