"""``unroll_experts``: every ``zaya.MoETop1`` node becomes its router and one branch per expert, each expert's
weights a constant initializer of its own.

Why: the op's ONNX body groups tokens by expert in a ``Loop`` over the experts, under an ``If`` on the token
count. Both are subgraphs onnxruntime runs through its generic control-flow kernels, and inside the ``Loop`` the
expert index is a run-time value, so ``Gather(gate_up, e)`` copies that expert's weights on every call (the
whole stack once per multi-token forward: 12 MB per ``verify`` of the demo checkpoint). Unrolled, the branches are
plain nodes and each ``Gemm`` reads a constant slice of the weight file in place (demo checkpoint, one thread:
``verify`` went from 3.2× to 2.5× the cost of ``decode``, issue 15). The same expansion serves the
quantized artifacts (``onnx_quant``), whose expert matmuls are ``MatMulNBits`` on each expert's own codes.

Runs after the weights are bound (``onnx_export.bind_external_weights``): an expert's initializer is a view of
the stacked tensor's bytes (offset + e × stride), so nothing is copied; a stack stored narrower than the compute
dtype gets one ``Cast`` per expert, as the stack had one.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from zaya_export.kernels.registry import DOMAIN

from .base import Pass, PassError

# (tape, rows [n, K], "gate_up" | "down", expert) → rows @ W_e.T [n, N]
ExpertMatmul = Callable[[ir.tape.Tape, ir.Value, str, int], ir.Value]


def constant(tape: ir.tape.Tape, value: object, dtype: type = np.int64) -> ir.Value:
    """A ``Constant`` node on ``tape`` holding ``value``."""
    return tape.op("Constant", [], {"value": ir.tensor(np.array(value, dtype=dtype))})


def route(tape: ir.tape.Tape, node: ir.Node) -> tuple[ir.Value, ir.Value, ir.Value, ir.Value]:
    """The router of a ``MoETop1`` node on ``tape`` → x [N, H], the chosen class [N] (E is the skip class), its
    probability [N], and the router state the node outputs second."""
    x, prev, *router, _, _ = node.inputs
    choice, prob, r = tape.op_multi_out("MoERouter", [x, prev, *router], {"eps": node.attributes["eps"].value},
                                        num_outputs=3, domain=DOMAIN)
    flat = tape.op("Reshape", [choice, constant(tape, [-1])])
    return x, flat, tape.op("Reshape", [prob, constant(tape, [-1])]), r


def splice(model: ir.Model, node: ir.Node, tape: ir.tape.Tape, out: ir.Value, r: ir.Value) -> None:
    """``tape``'s nodes go in before the ``MoETop1`` ``node``, ``out`` and ``r`` take over its two outputs, and
    the node goes."""
    model.graph.insert_before(node, tape.nodes)
    replace_value(node.outputs[0], out)
    replace_value(node.outputs[1], r)
    model.graph.remove(node, safe=True)


def expand_moe(model: ir.Model, node: ir.Node, matmul: ExpertMatmul) -> None:
    """Replace one ``MoETop1`` node by ``MoERouter`` and one branch per expert: the rows routed to expert e are
    gathered, run through ``matmul`` (gate/up, SiLU·up, down) and scattered back (rows of the skip class reach no
    expert, so they stay zero), then every row is scaled by its router probability."""
    experts, inter = node.attributes["num_experts"].value, node.attributes["intermediate"].value
    tape = ir.tape.Tape()

    def const(value: object, dtype: type = np.int64) -> ir.Value:
        return constant(tape, value, dtype)

    x, flat, weight, r = route(tape, node)  # flat, weight [N]
    out = tape.op("Expand", [tape.op("CastLike", [const(0.0, np.float32), x]), tape.op("Shape", [x])])  # zeros [N, H]
    first, second, axis = const([0]), const([inter]), const([1])
    for e in range(experts):
        idx = tape.op("Reshape", [tape.op("NonZero", [tape.op("Equal", [flat, const(e)])]), const([-1])])  # [n]
        h = matmul(tape, tape.op("Gather", [x, idx], {"axis": 0}), "gate_up", e)  # [n, 2I]
        g = tape.op("Slice", [h, first, second, axis])
        u = tape.op("Slice", [h, second, const([2 * inter]), axis])
        act = tape.op("Mul", [tape.op("Mul", [g, tape.op("Sigmoid", [g])]), u])  # SiLU(g)·u [n, I]
        y = matmul(tape, act, "down", e)  # [n, H]
        out = tape.op("ScatterND", [out, tape.op("Unsqueeze", [idx, axis]), y])  # rows disjoint across experts
    # each row holds one expert's output (or zeros: the skip class), so one product by the router probability
    # after the scatters is the per-branch product, with 3 fewer nodes per expert
    out = tape.op("Mul", [out, tape.op("Unsqueeze", [weight, axis])])
    splice(model, node, tape, out, r)


def replace_value(old: ir.Value, new: ir.Value) -> None:
    """Every use of ``old`` (a graph output too, which keeps its name) now reads ``new``, which takes over its
    type and shape (the nodes made here carry none)."""
    new.type = new.type or old.type
    new.shape = new.shape or old.shape
    if old.is_graph_output():
        name, old.name = old.name, f"{old.name}.replaced"
        new.name = name
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)


class UnrollExperts(Pass[ir.Model]):
    """Float experts: ``MoETop1`` → router + per-expert ``Gemm`` branches on constant expert slices. Counts two
    rewrites per expert (its two matmuls)."""

    name = "unroll_experts"

    def requires(self, model: ir.Model) -> None:
        for node in moe_nodes(model):
            for stack in node.inputs[-2:]:
                _stored_stack(stack)  # raises on a stack that is not a bound weight

    def run(self, model: ir.Model) -> int:
        rewrites = 0
        cache: dict[tuple[str, int], ir.Value] = {}
        first = next(iter(model.graph))
        moe = moe_nodes(model)
        stacks = list({v.name: v for n in moe for v in n.inputs[-2:]}.values())
        for node in moe:
            pair = {"gate_up": node.inputs[-2], "down": node.inputs[-1]}

            def matmul(tape: ir.tape.Tape, rows: ir.Value, which: str, e: int, pair: dict = pair) -> ir.Value:
                weight = _expert_slice(model, pair[which], e, cache, first)
                return tape.op("Gemm", [rows, weight], {"transB": 1})  # W_e as stored [N, K]: no transpose copy

            expand_moe(model, node, matmul)
            rewrites += 2 * node.attributes["num_experts"].value
        _drop_unused(model, stacks)
        common.RemoveUnusedFunctionsPass()(model)
        return rewrites

    def ensures(self, model: ir.Model, rewrites: int) -> None:
        left = [n.name for n in moe_nodes(model)]
        if left or (DOMAIN, "MoETop1", "") in model.functions:
            raise PassError(f"MoETop1 nodes (or its Loop/If body) left after unrolling: {left}")


def moe_nodes(model: ir.Model) -> list[ir.Node]:
    """The graph's ``zaya.MoETop1`` nodes."""
    return [n for n in model.graph if n.domain == DOMAIN and n.op_type == "MoETop1"]


def _stored_stack(stack: ir.Value) -> tuple[ir.Value, ir.Node | None]:
    """The initializer holding an expert stack's bytes, and the ``Cast`` that widens it (None if stored in the
    compute dtype)."""
    if stack.is_initializer() and isinstance(stack.const_value, ir.ExternalTensor):
        return stack, None
    cast = stack.producer()
    if (cast is not None and cast.op_type == "Cast" and cast.inputs[0] is not None
            and cast.inputs[0].is_initializer() and isinstance(cast.inputs[0].const_value, ir.ExternalTensor)):
        return cast.inputs[0], cast
    raise PassError(f"expert stack {stack.name} is not a weight bound to the weight file")


def _expert_slice(model: ir.Model, stack: ir.Value, e: int, cache: dict, first: ir.Node) -> ir.Value:
    """Expert ``e`` of ``stack`` as an initializer over the same bytes (plus its widening ``Cast``)."""
    key = (stack.name, e)
    if key in cache:
        return cache[key]
    stored, cast = _stored_stack(stack)
    tensor = stored.const_value
    shape = list(tensor.shape)
    stride = tensor.length // shape[0]
    name = f"{stored.name}.{e}"
    part = ir.ExternalTensor(tensor.location, tensor.offset + e * stride, stride, tensor.dtype,
                             shape=ir.Shape(shape[1:]), name=name, base_dir=tensor.base_dir)
    value = ir.Value(name=name, shape=ir.Shape(shape[1:]), type=ir.TensorType(tensor.dtype), const_value=part)
    model.graph.register_initializer(value)
    if cast is not None:
        widen = ir.node("Cast", [value], attributes={"to": cast.attributes["to"].value})
        widen.outputs[0].name = f"{stack.name}.{e}.widened"
        widen.outputs[0].type = stack.type
        widen.outputs[0].shape = ir.Shape(shape[1:])
        model.graph.insert_before(first, widen)
        value = widen.outputs[0]
    cache[key] = value
    return value


def _drop_unused(model: ir.Model, stacks: list[ir.Value]) -> None:
    """Remove the stacked expert weights (and their widening ``Cast``) that nothing reads any more: each expert
    reads its own slice now."""
    for stack in stacks:
        if list(stack.uses()) or stack.is_graph_output():
            continue
        stored, cast = _stored_stack(stack)
        if cast is not None:
            model.graph.remove(cast, safe=True)
        if not list(stored.uses()):
            model.graph.initializers.pop(stored.name, None)
