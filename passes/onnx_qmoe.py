"""A quantized ``zaya.MoETop1`` as one onnxruntime ``com.microsoft.QMoE`` node.

Why: the unrolled form (``moe_unroll.expand_moe``) is ~16 nodes per expert (select, gather, two
``MatMulNBits``, SwiGLU, scale, scatter), 256 per layer for 16 experts. onnxruntime runs every one of them on
every call, most on empty tensors: profiled on the int4 8B config's decode (one token), the kernels that are not
``MatMulNBits`` took twice the time of those that are, the experts' part of it about 10 000 node calls per token.
``QMoE`` groups the rows by expert inside one kernel, and only the experts that receive rows run
(measured at the 8B expert size, 16 experts 2048→2×2048→2048 int4: ~0.2–0.4 ms for one token).

The node's contract, and how ZAYA's MoE maps onto it:

- selection: ``router_probs`` is the one-hot of the router's choice (``OneHot`` with depth E: the skip class E
  is out of range and selects nothing, so its row is all zeros), top-1;
- mixing: ``router_weights`` is that one-hot times the router's probability, so a row's output is
  ``p · expert(x)``, and a skip-class row gets weight 0 for whatever expert top-1 picked from its zero row;
- SwiGLU: ``g · sigmoid(α·g) · (u + β)`` with the op's defaults α = 1, β = 0 and no limit, i.e. SiLU(g)·u;
  onnxruntime's CPU kernel only takes the gate and up rows interleaved (``swiglu_fusion=1``), while the weight
  file keeps ``gate_up``'s rows as ``[gate | up]`` (every other reader, MLIR included, reads that layout), so
  the codes, scales and zero points go through a ``Gather`` over rows with a constant permutation, which
  onnxruntime folds into a constant once, when it creates the session;
- codes, scales and zero points: the same bytes ``MatMulNBits`` reads (``[E, N, K·bits/8]``, ``[E, N, K/g]``,
  ``[E, N, ⌈(K/g)·bits/8⌉]``), with the same default zero point 2^(bits-1).

Where the op cannot express the scheme (:func:`fused_moe_supported`), the unrolled form stays.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from zaya_export.models.quantization import QuantScheme

from .moe_unroll import constant, route

MS_DOMAIN = "com.microsoft"

# A stack's part → its QMoE shape (besides [E, N]) from (K, group size, bits)
_PART_TAIL = {"qweight": lambda k, g, bits: k * bits // 8, "scales": lambda k, g, bits: k // g,
              "zero_points": lambda k, g, bits: -(-(k // g) * bits // 8)}
PART_TYPES = {"qweight": ir.DataType.UINT8, "zero_points": ir.DataType.UINT8, "scales": ir.DataType.FLOAT}


def fused_moe_supported(scheme: QuantScheme, hidden: int, intermediate: int) -> bool:
    """Whether ``QMoE`` computes what the unrolled ``MatMulNBits`` branches compute: block-wise codes need K
    divisible by the group on both matmuls, and int8 experts have no fp32-activation kernel (they always quantize
    the activations to int8), so an int8 scheme asking for fp32 accuracy keeps the unrolled form."""
    g = scheme.group_size
    return hidden % g == 0 and intermediate % g == 0 and (scheme.bits == 4 or scheme.accuracy_level == 4)


def interleave_rows(intermediate: int) -> np.ndarray:
    """[2I] row order that turns ``[gate | up]`` into ``[g0, u0, g1, u1, …]``."""
    return np.stack([np.arange(intermediate), np.arange(intermediate) + intermediate], 1).reshape(-1)


def bound_part(model: ir.Model, vname: str, part: str, location: tuple[int, int], shape: tuple[int, ...],
               weights_file: str, folder: object) -> ir.Value:
    """The initializer ``vname`` over one quantized part's bytes (offset, length) in the weight file, registered
    once."""
    if vname not in model.graph.initializers:
        offset, length = location
        dtype = PART_TYPES[part]
        tensor = ir.ExternalTensor(weights_file, offset, length, dtype, shape=ir.Shape(shape), name=vname,
                                   base_dir=folder)
        model.graph.register_initializer(ir.Value(name=vname, shape=ir.Shape(shape), type=ir.TensorType(dtype),
                                                  const_value=tensor))
    return model.graph.initializers[vname]


def fused_moe(tape: ir.tape.Tape, node: ir.Node, gate_up: dict[str, ir.Value], down: dict[str, ir.Value],
              scheme: QuantScheme) -> tuple[ir.Value, ir.Value]:
    """Router + one ``QMoE`` for ``node`` (a ``zaya.MoETop1``) → (output [N, H], router state out).
    ``gate_up`` / ``down``: part → stack initializer (QMoE shapes, gate_up rows still ``[gate | up]``)."""
    experts, inter = node.attributes["num_experts"].value, node.attributes["intermediate"].value
    x, flat, prob, r = route(tape, node)  # flat, prob [N]
    select = tape.op("OneHot", [flat, constant(tape, experts), constant(tape, [0.0, 1.0], np.float32)],
                     {"axis": -1})  # [N, E]: the skip class E is out of range, a zero row
    select = tape.op("CastLike", [select, x])
    mix = tape.op("Mul", [select, tape.op("Unsqueeze", [prob, constant(tape, [1])])])  # [N, E]: p on the choice
    order = constant(tape, interleave_rows(inter))
    fc1 = {part: tape.op("Gather", [v, order], {"axis": 1}) for part, v in gate_up.items()}  # folded by ORT
    y = tape.op("QMoE", [x, select, fc1["qweight"], fc1["scales"], None, down["qweight"], down["scales"], None,
                         None, None, None, fc1.get("zero_points"), down.get("zero_points"), None, mix],
                {"k": 1, "activation_type": "swiglu", "swiglu_fusion": 1, "expert_weight_bits": scheme.bits,
                 "block_size": scheme.group_size, "weights_prepacked": 0, "normalize_routing_weights": 0,
                 "accuracy_level": scheme.accuracy_level}, domain=MS_DOMAIN)
    return y, r


def qmoe_shape(part: str, shape: tuple[int, ...], group_size: int, bits: int) -> tuple[int, ...]:
    """QMoE shape of a part of an ``[E, N, K]`` expert stack."""
    e, n, k = shape
    return (e, n, _PART_TAIL[part](k, group_size, bits))
