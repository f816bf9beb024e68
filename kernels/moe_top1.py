"""``zaya.moe_top1``: one layer's MoE as one op: router MLP with the carried EDA state, biased top-1 choice
among E experts plus the skip class, and the chosen SwiGLU expert scaled by its un-biased probability.

Shapes: x [N, H], prev [N, R] (router state of the previous layer; zeros and ``eda_scale`` = ones in layer 0,
which is exact), router weights, balancing [E+1] fp32, gate_up [E, 2I, H], down [E, H, I]
→ out [N, H], router_state [N, R].

Dispatch: the eager reference runs each hit expert once on its tokens. The ONNX body picks by N: for a single
token (decode) it gathers the one chosen expert's weights; for many tokens (prefill, verify, the packed step) it
groups tokens by expert (a Loop over the E experts, each Gemm on its own rows, data-dependent shapes, so the
FLOPs are those of top-1, not E×). The MLIR faces need static shapes: for one token per row the chosen
expert's weights, selected in place for a single row (``moe_top1_selected``) or gathered per row
(``moe_top1_gathered``); all experts for the rest (``moe_top1_static``).
"""

from __future__ import annotations

import onnxscript
import torch
import torch.nn.functional as F
from onnx.defs import OpSchema
from onnxscript import opset20 as op
from torch import Tensor

from .routing import top1
from .registry import ZAYA, OnnxFace, register_helper, register_mlir, register_onnx, register_schema

_ROUTER = ["down_w", "down_b", "eda_scale", "norm_w", "fc1_w", "fc1_b", "fc2_w", "fc2_b", "out_w", "balancing"]


@torch.library.custom_op("zaya::moe_top1", mutates_args=())
def moe_top1(x: Tensor, prev: Tensor, down_w: Tensor, down_b: Tensor, eda_scale: Tensor, norm_w: Tensor,
             fc1_w: Tensor, fc1_b: Tensor, fc2_w: Tensor, fc2_b: Tensor, out_w: Tensor, balancing: Tensor,
             gate_up: Tensor, down: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Eager reference (plain torch, sparse dispatch)."""
    choice, weight, r = _route(x, prev, down_w, down_b, eda_scale, norm_w, fc1_w, fc1_b, fc2_w, fc2_b, out_w,
                               balancing, eps)
    out = torch.zeros_like(x)
    for e in torch.unique(choice).tolist():
        if e == gate_up.shape[0]:
            continue
        rows = (choice == e).nonzero().flatten()
        g, u = F.linear(x[rows], gate_up[e]).chunk(2, -1)
        out.index_add_(0, rows, F.linear(F.silu(g) * u, down[e]) * weight[rows, None])
    return out, r


def _route(x: Tensor, prev: Tensor, down_w: Tensor, down_b: Tensor, eda_scale: Tensor, norm_w: Tensor,
           fc1_w: Tensor, fc1_b: Tensor, fc2_w: Tensor, fc2_b: Tensor, out_w: Tensor, balancing: Tensor, eps: float
           ) -> tuple[Tensor, Tensor, Tensor]:
    """Router with EDA: → choice [N] (E = skip), its un-biased probability [N], router state r [N, R]."""
    r = F.linear(x, down_w, down_b) + prev * eda_scale  # [N, R]
    rf = r.float()
    a = norm_w * (rf * torch.rsqrt(rf.pow(2).mean(-1, keepdim=True) + eps)).to(r.dtype)
    probs = torch.softmax(F.linear(F.gelu(F.linear(F.gelu(F.linear(a, fc1_w, fc1_b)), fc2_w, fc2_b)), out_w), -1)
    choice = top1(probs, balancing)  # [N], E = skip
    weight = probs.gather(-1, choice[:, None]).squeeze(-1)
    return choice, weight, r


def _route_to_expert(x: Tensor, prev: Tensor, down_w: Tensor, down_b: Tensor, eda_scale: Tensor, norm_w: Tensor,
                     fc1_w: Tensor, fc1_b: Tensor, fc2_w: Tensor, fc2_b: Tensor, out_w: Tensor, balancing: Tensor,
                     num_experts: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``_route`` for the faces that read one expert per token: → expert [N], weight [N], router state. The
    skip class (choice E) reads expert 0 with weight 0, so every token has an expert to read."""
    choice, weight, r = _route(x, prev, down_w, down_b, eda_scale, norm_w, fc1_w, fc1_b, fc2_w, fc2_b, out_w,
                               balancing, eps)
    skip = choice == num_experts
    return torch.where(skip, torch.zeros_like(choice), choice), torch.where(skip, torch.zeros_like(weight), weight), r


def moe_top1_static(x: Tensor, prev: Tensor, down_w: Tensor, down_b: Tensor, eda_scale: Tensor, norm_w: Tensor,
                    fc1_w: Tensor, fc1_b: Tensor, fc2_w: Tensor, fc2_b: Tensor, out_w: Tensor, balancing: Tensor,
                    gate_up: Tensor, down: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The op with fixed-shape dispatch, for compilers that need static shapes (the MLIR face): every expert
    runs on every token and a one-hot weight keeps the chosen one. E× the expert FLOPs, no data-dependent
    shapes (the same choice the ONNX body makes for N > 1)."""
    choice, weight, r = _route(x, prev, down_w, down_b, eda_scale, norm_w, fc1_w, fc1_b, fc2_w, fc2_b, out_w,
                               balancing, eps)
    out = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        g, u = F.linear(x, gate_up[e]).chunk(2, -1)  # [N, I] each
        keep = torch.where(choice == e, weight, torch.zeros_like(weight))  # [N]
        out = out + F.linear(F.silu(g) * u, down[e]) * keep[:, None]
    return out, r


def moe_top1_gathered(x: Tensor, prev: Tensor, down_w: Tensor, down_b: Tensor, eda_scale: Tensor, norm_w: Tensor,
                      fc1_w: Tensor, fc1_b: Tensor, fc2_w: Tensor, fc2_b: Tensor, out_w: Tensor, balancing: Tensor,
                      gate_up: Tensor, down: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The op with per-token gathered expert weights, for decode (one token per row, so N = B is small): each
    token reads only its chosen expert, the sparse cost, where the static form reads and runs all E. The skip
    class reads expert 0 with weight 0. For many tokens the static form is cheaper (it reads each expert once)."""
    expert, weight, r = _route_to_expert(x, prev, down_w, down_b, eda_scale, norm_w, fc1_w, fc1_b, fc2_w, fc2_b,
                                         out_w, balancing, gate_up.shape[0], eps)
    g, u = torch.einsum("nih,nh->ni", gate_up.index_select(0, expert), x).chunk(2, -1)  # [N, I] each
    out = torch.einsum("nhi,ni->nh", down.index_select(0, expert), F.silu(g) * u)  # [N, H]
    return out * weight[:, None], r


def moe_top1_selected(x: Tensor, prev: Tensor, down_w: Tensor, down_b: Tensor, eda_scale: Tensor, norm_w: Tensor,
                      fc1_w: Tensor, fc1_b: Tensor, fc2_w: Tensor, fc2_b: Tensor, out_w: Tensor, balancing: Tensor,
                      gate_up: Tensor, down: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The op for exactly one token (x [1, H]: the IREE module's batch-1 decode): the chosen expert's matrices
    are selected by a scalar index, a slice of the weights that IREE reads in place, where the gathered form
    copies them first (demo layer: 0.137 ms gathered, 0.042 ms selected). The skip class reads expert 0 with
    weight 0."""
    E = gate_up.shape[0]
    expert, weight, r = _route_to_expert(x, prev, down_w, down_b, eda_scale, norm_w, fc1_w, fc1_b, fc2_w, fc2_b,
                                         out_w, balancing, E, eps)
    e = expert[0].item()
    torch._check(e >= 0)
    torch._check(e < E)
    product = _matvec if isinstance(gate_up, Tensor) else F.linear  # float weights / a quantized stack
    g, u = product(x, gate_up[e]).chunk(2, -1)  # [1, I] each
    return product(F.silu(g) * u, down[e]) * weight[:, None], r


def _matvec(x: Tensor, w: Tensor) -> Tensor:
    """``F.linear(x, w)`` for x [1, K] as a multiply and a row sum: not a matmul, so IREE does not data-tile it.
    A data-tiled product packs its weight once at load when the weight is a constant, but the selected expert
    is known only at run time, so its slice would be packed on every call (0.17 ms of the demo's 1.5 ms decode,
    more than the product itself); as a reduction it is read in place."""
    return (x[:, None, :] * w).sum(-1)  # [1, N]


def moe_top1_decode(x: Tensor, *args) -> tuple[Tensor, Tensor]:  # noqa: ANN002 - moe_top1's other arguments
    """The MLIR face for one token per row: the selected form when the trace has exactly one row (a fixed
    batch of 1), else the gathered form (one expert per row, a dynamic batch)."""
    one_row = isinstance(x.shape[0], int) and x.shape[0] == 1
    return (moe_top1_selected if one_row else moe_top1_gathered)(x, *args)


@moe_top1.register_fake
def _(x, prev, down_w, down_b, eda_scale, norm_w, fc1_w, fc1_b, fc2_w, fc2_b, out_w, balancing, gate_up, down, eps):
    return torch.empty_like(x), x.new_empty(x.shape[0], down_w.shape[0])


# ----------------------------------------------------------------------------------------------- ONNX face
register_schema(
    "MoETop1",
    inputs=[("x", "T"), ("prev", "T")] + [(n, "F" if n == "balancing" else "T") for n in _ROUTER]
    + [("gate_up", "T"), ("down", "T")],
    outputs=[("out", "T"), ("router_state", "T")],
    attributes={"eps": OpSchema.AttrType.FLOAT, "num_experts": OpSchema.AttrType.INT,
                "intermediate": OpSchema.AttrType.INT},
)


@onnxscript.script(ZAYA, default_opset=op)
def MoERouter(x, prev, down_w, down_b, eda_scale, norm_w, fc1_w, fc1_b, fc2_w, fc2_b, out_w, balancing, eps: float):
    """The router with EDA → choice [N, 1] (E = skip), its un-biased probability [N, 1], router state r [N, R].
    A function of its own: MoETop1 calls it, and the quantized MoE (passes/onnx_quant) routes with it."""
    neg1 = op.Constant(value_ints=[-1])
    r = op.Add(op.Add(op.MatMul(x, op.Transpose(down_w, perm=[1, 0])), down_b), op.Mul(prev, eda_scale))
    rf = op.Cast(r, to=1)
    # x / √(mean(x²) + ε), the form onnxruntime fuses into one SimplifiedLayerNormalization (passes/onnx_rsqrt)
    var = op.ReduceMean(op.Pow(rf, op.Constant(value_float=2.0)), neg1, keepdims=1)
    a = op.Mul(norm_w, op.CastLike(op.Div(rf, op.Sqrt(op.Add(var, op.Constant(value_float=eps)))), r))
    a = op.Gelu(op.Add(op.MatMul(a, op.Transpose(fc1_w, perm=[1, 0])), fc1_b))
    a = op.Gelu(op.Add(op.MatMul(a, op.Transpose(fc2_w, perm=[1, 0])), fc2_b))
    probs = op.Softmax(op.MatMul(a, op.Transpose(out_w, perm=[1, 0])), axis=-1)  # [N, E+1]
    _, choice = op.TopK(op.Add(op.Cast(probs, to=1), balancing), op.Constant(value_ints=[1]), axis=-1)  # [N, 1]
    return choice, op.GatherElements(probs, choice, axis=1), r


@onnxscript.script(ZAYA, default_opset=op)
def MoETop1(x, prev, down_w, down_b, eda_scale, norm_w, fc1_w, fc1_b, fc2_w, fc2_b, out_w, balancing, gate_up, down,
            eps: float, num_experts: int, intermediate: int):
    zero = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    neg1 = op.Constant(value_ints=[-1])
    choice, prob, r = MoERouter(x, prev, down_w, down_b, eda_scale, norm_w, fc1_w, fc1_b, fc2_w, fc2_b, out_w,
                                balancing, eps=eps)
    E = op.Constant(value_int=num_experts)
    skip = op.Equal(choice, E)
    weight = op.Where(skip, op.CastLike(op.Constant(value_float=0.0), prob), prob)
    expert = op.Where(skip, op.Constant(value_int=0), choice)  # [N, 1]
    I = op.Reshape(op.Constant(value_int=intermediate), neg1)
    two_i = op.Mul(I, op.Constant(value_ints=[2]))
    N = op.Shape(x, start=0, end=1)
    # Expert matrices are used as stored ([2I, H], [H, I]) through Gemm's transB: a MatMul would need them
    # transposed, and onnxruntime does not fold a transpose of a tensor gathered at run time (a copy of the
    # expert's weights on every call).
    if op.Equal(op.Squeeze(N), op.Constant(value_int=1)):
        # one token: gather the chosen expert's weights only
        e1 = op.Gather(op.Reshape(expert, neg1), op.Constant(value_int=0), axis=0)  # scalar
        h = op.Gemm(x, op.Gather(gate_up, e1, axis=0), transB=1)  # [1, 2I]
        act = op.Mul(op.Mul(op.Slice(h, zero, I, one), op.Sigmoid(op.Slice(h, zero, I, one))),
                     op.Slice(h, I, two_i, one))
        out = op.Mul(op.Gemm(act, op.Gather(down, e1, axis=0), transB=1), weight)  # [1, H]
    else:
        # many tokens, grouped by expert: each expert runs on its own rows only (the skip class on none)
        flat = op.Reshape(expert, neg1)  # [N]
        out = op.Mul(x, op.CastLike(op.Constant(value_float=0.0), x))  # zeros [N, H]
        for i in range(num_experts):
            e = op.Reshape(i, op.Constant(value_ints=[]))  # the loop counter as a scalar
            idx = op.Reshape(op.NonZero(op.Equal(flat, e)), neg1)  # [n] rows routed to e
            rows = op.Gather(x, idx, axis=0)  # [n, H]
            h = op.Gemm(rows, op.Gather(gate_up, e, axis=0), transB=1)  # [n, 2I]
            act = op.Mul(op.Mul(op.Slice(h, zero, I, one), op.Sigmoid(op.Slice(h, zero, I, one))),
                         op.Slice(h, I, two_i, one))
            y = op.Mul(op.Gemm(act, op.Gather(down, e, axis=0), transB=1), op.Gather(weight, idx, axis=0))
            out = op.ScatterND(out, op.Unsqueeze(idx, one), y)  # rows are disjoint across experts
    return out, r


def _translate(x, prev, down_w, down_b, eda_scale, norm_w, fc1_w, fc1_b, fc2_w, fc2_b, out_w, balancing, gate_up,
               down, eps: float):
    return ZAYA.MoETop1(x, prev, down_w, down_b, eda_scale, norm_w, fc1_w, fc1_b, fc2_w, fc2_b, out_w, balancing,
                        gate_up, down, eps=eps, num_experts=gate_up.shape[0], intermediate=gate_up.shape[1] // 2)


register_helper("MoERouter", MoERouter)
register_onnx("MoETop1", OnnxFace(torch.ops.zaya.moe_top1.default, _translate, MoETop1))
register_mlir("moe_top1", moe_top1_static, decode=moe_top1_decode)
