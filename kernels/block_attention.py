"""``zaya.block_attention``: masked GQA attention over [cache ; new keys] whose mask is generated inside the op.

The mask is never an input: the op derives it from the layout (causal in slot order), the key validity
(left padding) and an optional sliding window on token positions (``cumsum(valid) − 1``), so no ``[T, S]``
tensor is stored in or fed to the artifact. Softmax runs in fp32 as upstream does.

Shapes: q [B, n_q, T, d], past_k/past_v [B, n_kv, S, d], k/v [B, n_kv, T, d], past_valid [B, S] bool,
new_valid [B, T] bool → out [B, T, n_q·d]. ``window`` ≤ 0 means no window; ``causal=False`` lets the new
block see all of itself (TiDAR draft layout).
"""

from __future__ import annotations

import onnxscript
import torch
from onnx.defs import OpSchema
from onnxscript import opset20 as op
from torch import Tensor

from .masking import LOWEST, MASK_DEPTH, mask_bias, mask_scores
from .registry import ZAYA, OnnxFace, register_mlir, register_onnx, register_schema

NO_WINDOW = 2**62


def attend_apart(q: Tensor, past_k: Tensor, past_v: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
    """Softmax attention of q [B, n_q, T, d] over [cache ; new] keys where ``allowed`` [B, T, S+T] → [B, T, n_q·d].

    For a fixed T (every entry but prefill) the cache and the new keys are read apart, never concatenated (that
    is a copy of the whole cache per layer and call, O(S) in a decode step that is otherwise O(S) reads): each
    part gets its own scores and exps under one row max taken over both, and the output is the sum of the two
    parts' products over the shared denominator. GQA by grouping: the G q heads of a KV head are one [G·T, d]
    block of rows against that head's keys, so no KV head is copied G times and every product is a plain
    batched matmul over (B, n_kv) (IREE's data-tiled matmuls refuse a broadcast batch dim)."""
    B, n_q, T, d = q.shape
    if not isinstance(T, int):
        return _attend_joined(q, past_k, past_v, k, v, allowed)
    n_kv, S = k.shape[1], past_k.shape[2]
    G = n_q // n_kv
    qg = q.reshape(B, n_kv, G * T, d)  # row g·T + t: query t of q head g of its KV head
    rows = allowed.repeat(1, G, 1)[:, None]  # [B, 1, G·T, S+T]
    # kernels.masking's fp32 bias and floor, applied to each part: the probabilities of the cache part are never
    # a slice of a joined softmax (IREE's data-tiled product cannot take a slice of dynamic length as operand)
    past = mask_bias(qg @ past_k.transpose(-1, -2) * d**-0.5, rows[..., :S])  # [B, n_kv, G·T, S]
    new = mask_bias(qg @ k.transpose(-1, -2) * d**-0.5, rows[..., S:])  # [B, n_kv, G·T, T]
    best = torch.cat([past, new], -1).amax(-1, keepdim=True)  # over S+T ≥ 1 keys: defined for an empty cache
    floor = best - MASK_DEPTH
    past = torch.exp(torch.maximum(past, floor) - best)
    new = torch.exp(torch.maximum(new, floor) - best)
    total = past.sum(-1, keepdim=True) + new.sum(-1, keepdim=True)
    out = (past / total).to(q.dtype) @ past_v + (new / total).to(q.dtype) @ v  # [B, n_kv, G·T, d]
    return out.view(B, n_q, T, d).transpose(1, 2).reshape(B, T, n_q * d)


def _attend_joined(q: Tensor, past_k: Tensor, past_v: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
    """``attend_apart`` for a T that torch.export keeps symbolic (prefill): [cache ; new] keys joined once, the G
    q heads of a KV head as one more row dimension of two einsums. torch.export cannot fold a symbolic T into
    the rows, and IREE cannot data-tile a batched product over a slice of dynamic length (nor over a broadcast
    operand); prefill pays the join once per prompt."""
    B, n_q, T, d = q.shape
    n_kv = k.shape[1]
    keys, values = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)  # [B, n_kv, S+T, d]
    scores = torch.einsum("bhgtd,bhsd->bhgts", q.view(B, n_kv, n_q // n_kv, T, d), keys)  # [B, n_kv, G, T, S+T]
    probs = torch.softmax(mask_scores(scores * d**-0.5, allowed[:, None, None]), -1).to(q.dtype)
    out = torch.einsum("bhgts,bhsd->bhgtd", probs, values)  # [B, n_kv, G, T, d]
    return out.reshape(B, n_q, T, d).transpose(1, 2).reshape(B, T, n_q * d)


def block_attention_reference(q: Tensor, past_k: Tensor, past_v: Tensor, k: Tensor, v: Tensor,
                              past_valid: Tensor, new_valid: Tensor, window: int, causal: bool = True) -> Tensor:
    """Eager reference (plain torch)."""
    B, T, S = q.shape[0], q.shape[2], past_k.shape[2]
    valid = torch.cat([past_valid, new_valid], 1)  # [B, S+T]
    pos = valid.long().cumsum(-1) - 1
    slot = torch.arange(S + T, device=q.device)
    order = slot[None, :] <= S + torch.arange(T, device=q.device)[:, None]
    # logical_* rather than &, ~: the same graph, and the spelling every MLIR importer legalizes
    allowed = torch.logical_and(order[None], valid[:, None]) if causal else valid[:, None].expand(B, T, S + T)
    if window > 0:
        allowed = torch.logical_and(allowed, (pos[:, S:, None] - pos[:, None, :]) < window)
    return attend_apart(q, past_k, past_v, k, v, allowed)


block_attention = torch.library.custom_op("zaya::block_attention", mutates_args=())(block_attention_reference)


@block_attention.register_fake
def _(q, past_k, past_v, k, v, past_valid, new_valid, window, causal=True):
    B, n_q, T, d = q.shape
    return q.new_empty(B, T, n_q * d)


# ----------------------------------------------------------------------------------------------- ONNX face
register_schema(
    "BlockAttention",
    inputs=[("q", "T"), ("past_k", "T"), ("past_v", "T"), ("k", "T"), ("v", "T"), ("past_valid", "B"),
            ("new_valid", "B")],
    outputs=[("out", "T")],
    attributes={"groups": OpSchema.AttrType.INT, "window": OpSchema.AttrType.INT, "causal": OpSchema.AttrType.INT,
                "scale": OpSchema.AttrType.FLOAT},
)


@onnxscript.script(ZAYA, default_opset=op)
def BlockAttention(q, past_k, past_v, k, v, past_valid, new_valid, groups: int, window: int, causal: int,
                   scale: float):
    zero = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    neg1 = op.Constant(value_ints=[-1])
    G = op.Reshape(op.Constant(value_int=groups), neg1)
    # GQA by broadcasting: q as [B, n_kv, G, T, d] against keys/values as [B, n_kv, 1, S, d], so the cache is
    # never copied G times (an Expand of the whole cache per layer and call); and the cache is never concatenated
    # with the new keys/values either (a copy of it per layer and call): the scores of the two parts are
    # concatenated instead ([T, S+T] per head, not [S, d]), and the output is the sum of the two products.
    axis2 = op.Constant(value_ints=[2])
    b, nq, t, d = op.Split(op.Shape(q), num_outputs=4)
    q5 = op.Reshape(q, op.Concat(b, op.Div(nq, G), G, t, d, axis=0))  # [B, n_kv, G, T, d]
    scores = op.Concat(op.MatMul(q5, op.Transpose(op.Unsqueeze(past_k, axis2), perm=[0, 1, 2, 4, 3])),
                       op.MatMul(q5, op.Transpose(op.Unsqueeze(k, axis2), perm=[0, 1, 2, 4, 3])), axis=-1)
    scores = op.Mul(scores, op.CastLike(op.Constant(value_float=scale), q))  # [B, n_kv, G, T, S+T]
    valid = op.Concat(past_valid, new_valid, axis=1)  # [B, S+T]
    pos = op.Sub(op.CumSum(op.Cast(valid, to=7), op.Constant(value_int=1)), op.Constant(value_int=1))
    # the mask below reads only the validity inputs (not this layer's q or cache), so it is the same subgraph in
    # every layer of one window size, and onnxruntime's common-subexpression elimination builds it once
    S = op.Shape(past_valid, start=1, end=2)
    T = op.Shape(new_valid, start=1, end=2)
    n = op.Add(S, T)
    slot = op.Range(op.Constant(value_int=0), op.Squeeze(n), op.Constant(value_int=1))
    q_slot = op.Range(op.Squeeze(S), op.Squeeze(n), op.Constant(value_int=1))
    order = op.LessOrEqual(op.Unsqueeze(slot, zero), op.Unsqueeze(q_slot, one))  # [T, S+T]
    order = op.Or(order, op.Not(op.Cast(op.Constant(value_int=causal), to=9)))  # causal=0: whole block visible
    allowed = op.And(op.Unsqueeze(order, zero), op.Unsqueeze(valid, one))  # [B, T, S+T]
    q_pos = op.Slice(pos, S, n, one)  # [B, T]
    distance = op.Sub(op.Unsqueeze(q_pos, op.Constant(value_ints=[2])), op.Unsqueeze(pos, one))
    allowed = op.And(allowed, op.Less(distance, op.Constant(value_int=window)))
    # kernels.masking: an fp32 additive mask (a Where on the mask alone, not broadcast over the heads), then the
    # scores floored MASK_DEPTH below the row's best
    bias = op.Where(op.Unsqueeze(allowed, op.Constant(value_ints=[1, 2])), op.Constant(value_float=0.0),
                    op.Constant(value_float=LOWEST))
    scores = op.Add(op.Cast(scores, to=1), bias)
    best = op.ReduceMax(scores, op.Constant(value_ints=[-1]), keepdims=1)
    scores = op.Max(scores, op.Sub(best, op.Constant(value_float=MASK_DEPTH)))
    probs = op.CastLike(op.Softmax(scores, axis=-1), q)
    last = op.Constant(value_ints=[-1])
    out = op.Add(op.MatMul(op.Slice(probs, zero, S, last), op.Unsqueeze(past_v, axis2)),
                 op.MatMul(op.Slice(probs, S, op.Constant(value_ints=[2**62]), last), op.Unsqueeze(v, axis2)))
    out = op.Reshape(out, op.Shape(q))  # [B, n_q, T, d]
    out = op.Transpose(out, perm=[0, 2, 1, 3])
    return op.Reshape(out, op.Concat(zero, zero, neg1, axis=0))


def _translate(q, past_k, past_v, k, v, past_valid, new_valid, window: int, causal: bool = True):
    return ZAYA.BlockAttention(q, past_k, past_v, k, v, past_valid, new_valid, groups=q.shape[1] // k.shape[1],
                               window=window if window > 0 else NO_WINDOW, causal=int(causal),
                               scale=q.shape[3] ** -0.5)


register_onnx("BlockAttention", OnnxFace(torch.ops.zaya.block_attention.default, _translate, BlockAttention))
register_mlir("block_attention", block_attention_reference)
