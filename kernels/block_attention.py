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

from .registry import ZAYA, OnnxFace, register_mlir, register_onnx, register_schema

NO_WINDOW = 2**62


def block_attention_reference(q: Tensor, past_k: Tensor, past_v: Tensor, k: Tensor, v: Tensor,
                              past_valid: Tensor, new_valid: Tensor, window: int, causal: bool = True) -> Tensor:
    """Eager reference (plain torch)."""
    B, n_q, T, d = q.shape
    n_kv = k.shape[1]
    S, G = past_k.shape[2], n_q // n_kv
    keys = torch.cat([past_k, k], 2)[:, :, None]  # [B, n_kv, 1, S+T, d], shared by the G q heads of a group
    values = torch.cat([past_v, v], 2)[:, :, None]
    valid = torch.cat([past_valid, new_valid], 1)  # [B, S+T]
    pos = valid.long().cumsum(-1) - 1
    slot = torch.arange(S + T, device=q.device)
    order = slot[None, :] <= S + torch.arange(T, device=q.device)[:, None]
    # logical_* rather than &, ~: the same graph, and the spelling every MLIR importer legalizes
    allowed = torch.logical_and(order[None], valid[:, None]) if causal else valid[:, None].expand(B, T, S + T)
    if window > 0:
        allowed = torch.logical_and(allowed, (pos[:, S:, None] - pos[:, None, :]) < window)
    scores = (q.view(B, n_kv, G, T, d) @ keys.transpose(-1, -2)) * d**-0.5  # [B, n_kv, G, T, S+T]
    scores = scores.masked_fill(torch.logical_not(allowed[:, None, None]), torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, -1, dtype=torch.float32).to(q.dtype)
    return (probs @ values).view(B, n_q, T, d).transpose(1, 2).reshape(B, T, n_q * d)


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
                "scale": OpSchema.AttrType.FLOAT, "fill": OpSchema.AttrType.FLOAT},
)


@onnxscript.script(ZAYA, default_opset=op)
def BlockAttention(q, past_k, past_v, k, v, past_valid, new_valid, groups: int, window: int, causal: int,
                   scale: float, fill: float):
    zero = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    neg1 = op.Constant(value_ints=[-1])
    G = op.Reshape(op.Constant(value_int=groups), neg1)
    # GQA by broadcasting: q as [B, n_kv, G, T, d] against keys/values as [B, n_kv, 1, S+T, d], so the cache is
    # never copied G times (an Expand of the whole cache per layer and call)
    keys = op.Unsqueeze(op.Concat(past_k, k, axis=2), op.Constant(value_ints=[2]))  # [B, n_kv, 1, S+T, d]
    values = op.Unsqueeze(op.Concat(past_v, v, axis=2), op.Constant(value_ints=[2]))
    b, nq, t, d = op.Split(op.Shape(q), num_outputs=4)
    q5 = op.Reshape(q, op.Concat(b, op.Div(nq, G), G, t, d, axis=0))  # [B, n_kv, G, T, d]
    scores = op.Mul(op.MatMul(q5, op.Transpose(keys, perm=[0, 1, 2, 4, 3])),
                    op.CastLike(op.Constant(value_float=scale), q))  # [B, n_kv, G, T, S+T]
    valid = op.Concat(past_valid, new_valid, axis=1)  # [B, S+T]
    pos = op.Sub(op.CumSum(op.Cast(valid, to=7), op.Constant(value_int=1)), op.Constant(value_int=1))
    S = op.Shape(past_k, start=2, end=3)
    T = op.Shape(q, start=2, end=3)
    n = op.Add(S, T)
    slot = op.Range(op.Constant(value_int=0), op.Squeeze(n), op.Constant(value_int=1))
    q_slot = op.Range(op.Squeeze(S), op.Squeeze(n), op.Constant(value_int=1))
    order = op.LessOrEqual(op.Unsqueeze(slot, zero), op.Unsqueeze(q_slot, one))  # [T, S+T]
    order = op.Or(order, op.Not(op.Cast(op.Constant(value_int=causal), to=9)))  # causal=0: whole block visible
    allowed = op.And(op.Unsqueeze(order, zero), op.Unsqueeze(valid, one))  # [B, T, S+T]
    q_pos = op.Slice(pos, S, n, one)  # [B, T]
    distance = op.Sub(op.Unsqueeze(q_pos, op.Constant(value_ints=[2])), op.Unsqueeze(pos, one))
    allowed = op.And(allowed, op.Less(distance, op.Constant(value_int=window)))
    scores = op.Where(op.Unsqueeze(allowed, op.Constant(value_ints=[1, 2])), scores,
                      op.CastLike(op.Constant(value_float=fill), scores))
    probs = op.CastLike(op.Softmax(op.Cast(scores, to=1), axis=-1), q)
    out = op.Reshape(op.MatMul(probs, values), op.Shape(q))  # [B, n_q, T, d]
    out = op.Transpose(out, perm=[0, 2, 1, 3])
    return op.Reshape(out, op.Concat(zero, zero, neg1, axis=0))


def _translate(q, past_k, past_v, k, v, past_valid, new_valid, window: int, causal: bool = True):
    fill = float(torch.finfo({1: torch.float32, 10: torch.float16, 16: torch.bfloat16}[int(q.dtype)]).min)
    return ZAYA.BlockAttention(q, past_k, past_v, k, v, past_valid, new_valid, groups=q.shape[1] // k.shape[1],
                               window=window if window > 0 else NO_WINDOW, causal=int(causal),
                               scale=q.shape[3] ** -0.5, fill=fill)


register_onnx("BlockAttention", OnnxFace(torch.ops.zaya.block_attention.default, _translate, BlockAttention))
register_mlir("block_attention", block_attention_reference)
