"""``zaya.cca``: the whole CCA projection of one layer as one op.

q/k projections → q/k mean residual → two-stage causal conv over [conv history ; new rows] → L2 norm to √d with
the per-KV-head temperature → partial RoPE; plus the current/delayed value. Inputs are the normed hidden
states, the layer's conv/ρ state and the RoPE tables; outputs are what attention and the state update need.

Shapes: x [B, T, H], conv [B, C, κ], rho [B, dv], cos/sin [B, T, rot] →
q [B, n_q, T, d], k [B, n_kv, T, d], v [B, n_kv, T, d], conv_rows [B, C, κ+T], omega [B, T, dv].
"""

from __future__ import annotations

import onnxscript
import torch
import torch.nn.functional as F
from onnx.defs import OpSchema
from onnxscript import opset20 as op
from torch import Tensor

from .registry import ZAYA, OnnxFace, register_mlir, register_onnx, register_schema

_WEIGHTS = ["q_w", "k_w", "vc_w", "vd_w", "dw_w", "dw_b", "g_w", "g_b", "temp"]


def cca_reference(x: Tensor, conv: Tensor, rho: Tensor, cos: Tensor, sin: Tensor, q_w: Tensor, k_w: Tensor,
                  vc_w: Tensor, vd_w: Tensor, dw_w: Tensor, dw_b: Tensor, g_w: Tensor, g_b: Tensor, temp: Tensor
        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Eager reference (plain torch)."""
    B, T, _ = x.shape
    d = g_w.shape[1]
    n_q, n_kv = q_w.shape[0] // d, k_w.shape[0] // d
    q_hat, k_hat = x @ q_w.T, x @ k_w.T
    k_rep = k_hat.view(B, T, n_kv, 1, d).expand(B, T, n_kv, n_q // n_kv, d).reshape(B, T, n_q, d)
    q_res = (q_hat.view(B, T, n_q, d) + k_rep) * 0.5
    k_res = q_res.view(B, T, n_kv, n_q // n_kv, d).mean(dim=-2)
    conv_rows = torch.cat([conv, torch.cat([q_hat, k_hat], -1).transpose(1, 2)], -1)
    z = F.conv1d(F.conv1d(conv_rows, dw_w, dw_b, groups=dw_w.shape[0]), g_w, g_b, groups=n_q + n_kv).transpose(1, 2)
    q = z[..., : n_q * d].reshape(B, T, n_q, d) + q_res
    k = z[..., n_q * d :].reshape(B, T, n_kv, d) + k_res
    omega = x @ vd_w.T
    v = torch.cat([x @ vc_w.T, torch.cat([rho[:, None], omega], 1)[:, :T]], -1).view(B, T, n_kv, d)
    eps, scale = torch.finfo(x.dtype).eps, d**0.5
    q = q * (scale / q.norm(dim=-1, keepdim=True).clamp_min(eps))
    k = k * (scale / k.norm(dim=-1, keepdim=True).clamp_min(eps)) * temp[None, None, :, None]
    return (_rope(q.transpose(1, 2), cos, sin), _rope(k.transpose(1, 2), cos, sin), v.transpose(1, 2).contiguous(),
            conv_rows, omega)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    rot = cos.shape[-1]
    x_rot = x[..., :rot]
    rotated = torch.cat([-x_rot[..., rot // 2 :], x_rot[..., : rot // 2]], -1)
    return torch.cat([x_rot * cos[:, None] + rotated * sin[:, None], x[..., rot:]], -1)


cca = torch.library.custom_op("zaya::cca", mutates_args=())(cca_reference)


@cca.register_fake
def _(x, conv, rho, cos, sin, q_w, k_w, vc_w, vd_w, dw_w, dw_b, g_w, g_b, temp):
    B, T, _ = x.shape
    d = g_w.shape[1]
    n_q, n_kv = q_w.shape[0] // d, k_w.shape[0] // d
    return (x.new_empty(B, n_q, T, d), x.new_empty(B, n_kv, T, d), x.new_empty(B, n_kv, T, d),
            x.new_empty(B, conv.shape[1], conv.shape[2] + T), x.new_empty(B, T, vd_w.shape[0]))


# ----------------------------------------------------------------------------------------------- ONNX face
register_schema(
    "CCA",
    inputs=[(n, "T") for n in ["x", "conv", "rho", "cos", "sin", *_WEIGHTS]],
    outputs=[(n, "T") for n in ["q", "k", "v", "conv_rows", "omega"]],
    attributes={a: OpSchema.AttrType.INT for a in ("n_q", "n_kv", "head_dim", "rot", "channels", "heads")}
    | {"eps": OpSchema.AttrType.FLOAT},
)


@onnxscript.script(ZAYA, default_opset=op)
def CCA(x, conv, rho, cos, sin, q_w, k_w, vc_w, vd_w, dw_w, dw_b, g_w, g_b, temp,
        n_q: int, n_kv: int, head_dim: int, rot: int, channels: int, heads: int, eps: float):
    zero = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    neg1 = op.Constant(value_ints=[-1])
    d = op.Reshape(op.Constant(value_int=head_dim), neg1)
    nq = op.Reshape(op.Constant(value_int=n_q), neg1)
    nkv = op.Reshape(op.Constant(value_int=n_kv), neg1)
    groups = op.Div(nq, nkv)
    q_hat = op.MatMul(x, op.Transpose(q_w, perm=[1, 0]))  # [B, T, n_q·d]
    k_hat = op.MatMul(x, op.Transpose(k_w, perm=[1, 0]))  # [B, T, n_kv·d]
    # the residual halves by GQA group: q as [B, T, n_kv, G, d] plus k as [B, T, n_kv, 1, d], broadcast
    q5 = op.Reshape(q_hat, op.Concat(zero, zero, nkv, groups, d, axis=0))
    k5 = op.Reshape(k_hat, op.Concat(zero, zero, nkv, one, d, axis=0))
    half = op.CastLike(op.Constant(value_float=0.5), x)
    q_res5 = op.Mul(op.Add(q5, k5), half)  # [B, T, n_kv, G, d]
    k_res = op.ReduceMean(q_res5, op.Constant(value_ints=[3]), keepdims=0)  # [B, T, n_kv, d]
    q_res = op.Reshape(q_res5, op.Concat(zero, zero, nq, d, axis=0))  # [B, T, n_q, d]
    conv_rows = op.Concat(conv, op.Transpose(op.Concat(q_hat, k_hat, axis=-1), perm=[0, 2, 1]), axis=2)
    # The convs run 2-D over a height-1 image: onnxruntime's NCHWc kernels, not its per-group 1-D path (onnx_conv2d)
    axis2 = op.Constant(value_ints=[2])
    y = op.Conv(op.Unsqueeze(conv_rows, axis2), op.Unsqueeze(dw_w, axis2), dw_b, group=channels)  # [B, C, 1, T+κ-1]
    z4 = op.Conv(y, op.Unsqueeze(g_w, axis2), g_b, group=heads)  # [B, C, 1, T]
    z = op.Transpose(op.Squeeze(z4, axis2), perm=[0, 2, 1])  # [B, T, C]
    q_width = op.Mul(nq, d)
    big = op.Constant(value_ints=[2**62])
    q = op.Add(op.Reshape(op.Slice(z, zero, q_width, axis2), op.Concat(zero, zero, nq, d, axis=0)), q_res)
    k = op.Add(op.Reshape(op.Slice(z, q_width, big, axis2), op.Concat(zero, zero, nkv, d, axis=0)), k_res)
    omega = op.MatMul(x, op.Transpose(vd_w, perm=[1, 0]))
    T = op.Shape(x, start=1, end=2)
    v_del = op.Slice(op.Concat(op.Unsqueeze(rho, one), omega, axis=1), zero, T, one)
    v = op.Reshape(op.Concat(op.MatMul(x, op.Transpose(vc_w, perm=[1, 0])), v_del, axis=-1),
                   op.Concat(zero, zero, nkv, d, axis=0))
    epsilon = op.CastLike(op.Constant(value_float=eps), x)
    scale = op.Sqrt(op.CastLike(d, x))
    last = op.Constant(value_ints=[-1])
    qn = op.ReduceL2(q, last, keepdims=1)
    kn = op.ReduceL2(k, last, keepdims=1)
    q = op.Mul(q, op.Div(scale, op.Max(qn, epsilon)))
    k = op.Mul(op.Mul(k, op.Div(scale, op.Max(kn, epsilon))), op.Reshape(temp, op.Concat(one, one, nkv, one, axis=0)))
    # Partial rotary as x·cos′ + (x·R)·sin′ over the whole head: cos′/sin′ are cos/sin padded with 1/0 past the
    # rotated dims, R the signed permutation of rotate-half (zero past them). One product with a ±1/0 matrix
    # is exact, and it is 5 nodes per tensor where slicing, negating and concatenating the halves took 11; the
    # padded tables read only the shared cos/sin inputs, so onnxruntime builds them once per layer type.
    rot_end = op.Reshape(op.Constant(value_int=rot), neg1)
    pad = op.Concat(zero, op.Sub(d, rot_end), axis=0)  # nothing before, d − rot after, on the last axis
    cos4 = op.Unsqueeze(op.Pad(cos, pad, op.CastLike(op.Constant(value_float=1.0), cos), last), one)  # [B,1,T,d]
    sin4 = op.Unsqueeze(op.Pad(sin, pad, op.CastLike(op.Constant(value_float=0.0), sin), last), one)
    # R[i, j] = −1 where i = j + rot/2 (j < rot/2), +1 where i = j − rot/2 (rot/2 ≤ j < rot): all constants,
    # folded by onnxruntime when it creates the session
    idx = op.Range(op.Constant(value_int=0), op.Constant(value_int=head_dim), op.Constant(value_int=1))
    i, j = op.Unsqueeze(idx, one), op.Unsqueeze(idx, zero)  # [d, 1], [1, d]
    h = op.Div(op.Constant(value_int=rot), op.Constant(value_int=2))
    below = op.Less(j, h)
    minus = op.And(op.Equal(i, op.Add(j, h)), below)
    plus = op.And(op.Equal(op.Add(i, h), j), op.And(op.Not(below), op.Less(j, op.Constant(value_int=rot))))
    turn = op.CastLike(op.Sub(op.Cast(plus, to=1), op.Cast(minus, to=1)), x)  # [d, d]
    qt = op.Transpose(q, perm=[0, 2, 1, 3])
    q_out = op.Add(op.Mul(qt, cos4), op.Mul(op.MatMul(qt, turn), sin4))
    kt = op.Transpose(k, perm=[0, 2, 1, 3])
    k_out = op.Add(op.Mul(kt, cos4), op.Mul(op.MatMul(kt, turn), sin4))
    return q_out, k_out, op.Transpose(v, perm=[0, 2, 1, 3]), conv_rows, omega


def _translate(x, conv, rho, cos, sin, q_w, k_w, vc_w, vd_w, dw_w, dw_b, g_w, g_b, temp):
    d = g_w.shape[1]
    n_q, n_kv = q_w.shape[0] // d, k_w.shape[0] // d
    eps = float(torch.finfo({1: torch.float32, 10: torch.float16, 16: torch.bfloat16}[int(x.dtype)]).eps)
    return ZAYA.CCA(x, conv, rho, cos, sin, q_w, k_w, vc_w, vd_w, dw_w, dw_b, g_w, g_b, temp, n_q=n_q, n_kv=n_kv,
                    head_dim=d, rot=cos.shape[-1], channels=dw_w.shape[0], heads=n_q + n_kv, eps=eps)


register_onnx("CCA", OnnxFace(torch.ops.zaya.cca.default, _translate, CCA))
register_mlir("cca", cca_reference)
