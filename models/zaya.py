"""ZAYA1 in plain PyTorch: the reference every export, kernel and backend is checked against.

Parameter names are exactly upstream ``transformers``' (``model.layers.{l}.self_attn.qkv_proj.q_proj.weight``
...), so real checkpoints load without renaming. Unlike upstream, all decode state is explicit (see
``state.py``) and nothing depends on Python-side cache objects or data-dependent control flow, so
``torch.export`` traces every path. The math follows ``shared/docs/zaya1-model.md`` §3 step by step,
including upstream's dtype choices (fp32 residual stream, activation-dtype QK norm, fp32 softmax).

Symbols: B batch, T new tokens, S cached slots, H hidden, n_q/n_kv heads, d head dim, C = (n_q+n_kv)·d conv
channels, κ conv history, dv = n_kv·d/2 value half, R router hidden, E experts, V vocabulary, L layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zaya_export.kernels.block_attention import attend_apart
from zaya_export.kernels.registry import triton_active, triton_face
from zaya_export.kernels.routing import top1

from .config import ZayaConfig
from .layout import BIDIRECTIONAL, CAUSAL, BlockLayout, Readout, StepLayout, packed_of
from .packed import PackedLayout, Segments
from .state import Past, Update, empty_past


class RMSNorm(nn.Module):
    """``w ⊙ cast_in(x_f32 · rsqrt(mean(x_f32²) + eps))``: fp32 statistics, plain (not 1+w) weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class ResidualScaling(nn.Module):
    """``(sub + b_h) ⊙ s_h + (res + b_r) ⊙ s_r``; ``res`` is the fp32 residual, so the sum is fp32."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.hidden_states_scale = nn.Parameter(torch.ones(dim))
        self.hidden_states_bias = nn.Parameter(torch.zeros(dim))
        self.residual_scale = nn.Parameter(torch.ones(dim))
        self.residual_bias = nn.Parameter(torch.zeros(dim))

    def forward(self, sub: Tensor, res: Tensor) -> Tensor:
        return (sub + self.hidden_states_bias) * self.hidden_states_scale + (
            res + self.residual_bias
        ) * self.residual_scale


def rope_cos_sin(positions: Tensor, rot: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin ``[B, T, rot]`` in rotate-half layout, computed in fp32 then cast (no module buffers)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rot, 2, dtype=torch.float32, device=positions.device) / rot))
    freqs = positions[..., None].float() * inv_freq  # [B, T, rot/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_partial_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first ``rot`` dims of each head (pairs j, j+rot/2); the rest pass through. x: [B, h, T, d]."""
    rot = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, rot]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)


class CCAProjection(nn.Module):
    """``qkv_proj``: q/k projections mixed by a two-stage causal conv over time, q/k mean residuals, and a value
    whose second half comes from the previous token (the delayed value)."""

    def __init__(self, config: ZayaConfig) -> None:
        super().__init__()
        H, d = config.hidden_size, config.head_dim
        self.n_q, self.n_kv, self.d = config.num_attention_heads, config.num_key_value_heads, d
        bias = config.attention_bias
        C = config.conv_channels
        self.q_proj = nn.Linear(H, self.n_q * d, bias=bias)
        self.k_proj = nn.Linear(H, self.n_kv * d, bias=bias)
        self.v_proj_current = nn.Linear(H, config.value_half, bias=bias)
        self.v_proj_delayed = nn.Linear(H, config.value_half, bias=bias)
        self.conv_qk_depthwise = nn.Conv1d(C, C, config.cca_time0, groups=C)
        self.conv_qk_grouped = nn.Conv1d(C, C, config.cca_time1, groups=self.n_q + self.n_kv)

    def forward(self, x: Tensor, conv: Tensor, rho: Tensor, segments: Segments | None = None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """x [B, T, H], conv [B, C, κ], rho [B, dv] → q [B,T,n_q,d], k [B,T,n_kv,d], v [B,T,n_kv,d],
        conv_rows [B, C, κ+T], omega [B, T, dv]. With ``segments`` (TiDAR packed step) each segment runs the
        conv and delayed value over its own history, gathered from the shared rows."""
        B, T, _ = x.shape
        G = self.n_q // self.n_kv
        q_hat = self.q_proj(x)  # [B, T, n_q·d]
        k_hat = self.k_proj(x)  # [B, T, n_kv·d]
        # q/k mean residual: q head h averages with its KV head; k head g averages its group's q residuals.
        k_rep = k_hat.view(B, T, self.n_kv, 1, self.d).expand(B, T, self.n_kv, G, self.d)
        q_res = (q_hat.view(B, T, self.n_q, self.d) + k_rep.reshape(B, T, self.n_q, self.d)) * 0.5
        k_res = q_res.view(B, T, self.n_kv, G, self.d).mean(dim=-2)
        # Two-stage causal conv over [history ; new rows]: depthwise then one dense d×d matrix per head and tap.
        conv_rows = torch.cat([conv, torch.cat([q_hat, k_hat], dim=-1).transpose(1, 2)], dim=-1)  # [B, C, κ+T]
        if segments is None:
            z = self.conv_qk_grouped(self.conv_qk_depthwise(conv_rows)).transpose(1, 2)  # [B, T, C]
        else:
            G, W = segments.conv_index.shape  # segments, κ + rows per segment
            C, kappa = conv_rows.shape[1], conv.shape[-1]
            # The segments side by side in one sequence [B, C, G·W], one conv over it: output j of a segment
            # reads its inputs j..j+κ only, so its first W−κ outputs are the segment's own conv and the κ that
            # straddle two segments are dropped. One batch row, not G: onnxruntime's grouped Conv costs per
            # batch row (demo step, [4, 384, 11]: 175 µs, against 56 µs for [1, 384, 66]).
            z = self.conv_qk_grouped(self.conv_qk_depthwise(conv_rows[:, :, segments.conv_index.flatten()]))
            z = F.pad(z, (0, kappa)).view(B, C, G, W)[..., : W - kappa].reshape(B, C, T).transpose(1, 2)
        q = z[..., : self.n_q * self.d].view(B, T, self.n_q, self.d) + q_res
        k = z[..., self.n_q * self.d :].view(B, T, self.n_kv, self.d) + k_res
        # Value: current-token half and previous-token (delayed) half, one whole KV head group each.
        omega = self.v_proj_delayed(x)  # [B, T, dv]
        v_ext = torch.cat([rho[:, None, :], omega], dim=1)  # [ρ, ω_0..ω_{T-1}]
        v_delayed = v_ext[:, :T] if segments is None else v_ext[:, segments.value_index.flatten()]
        v = torch.cat([self.v_proj_current(x), v_delayed], dim=-1).view(B, T, self.n_kv, self.d)
        return q, k, v, conv_rows, omega


class QKNorm(nn.Module):
    """L2-normalise q and k to norm √d in the activation dtype, then scale k by a per-KV-head temperature."""

    def __init__(self, config: ZayaConfig) -> None:
        super().__init__()
        self.scale = config.head_dim**0.5
        self.temp = nn.Parameter(torch.zeros(config.num_key_value_heads))

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        eps = torch.finfo(q.dtype).eps
        q = q * (self.scale / q.norm(p=2, dim=-1, keepdim=True).clamp_min(eps))
        k = k * (self.scale / k.norm(p=2, dim=-1, keepdim=True).clamp_min(eps))
        return q, k * self.temp[None, None, :, None]


@dataclass(frozen=True)
class AttnLayout:
    """What decides which keys a query may see: the materialised predicate for the reference path, and the
    descriptor (validity + window) from which ``zaya.block_attention`` regenerates it inside the op."""

    allowed: Tensor  # [B, T, S+T] bool
    past_valid: Tensor  # [B, S] bool
    new_valid: Tensor  # [B, T] bool
    window: int  # sliding window on positions; 0 = none
    causal: bool = True  # False: the new block attends bidirectionally (TiDAR draft)
    segments: Segments | None = None  # TiDAR packed step: per-segment CCA history
    template: Tensor | None = None  # packed step: [T, T] bool mask among the step tokens (the Triton kernel's)
    offsets: Tensor | None = None  # packed step: [T] positions of the step tokens after the committed length


class CCAAttention(nn.Module):
    """``self_attn``: CCA projection, QK norm, partial RoPE and masked GQA attention over [cache ; new keys].

    ``project`` and ``attend`` are the two regions the fusion passes replace (by ``zaya.cca`` and
    ``zaya.block_attention``): a pass fills the slot ``fused_project`` / ``fused_attend`` (plain callables of
    the same signature, not modules, so never in the state_dict) for the duration of a
    ``passes.fusion.fused`` scope, and ``forward``, which only wires the regions, calls the slot when set. The
    packed TiDAR step passes its ``segments`` to the project slot too: a slot whose op cannot read them runs
    this module's reference region instead."""

    fused_slots = ("fused_project", "fused_attend")

    def __init__(self, config: ZayaConfig) -> None:
        super().__init__()
        self.qkv_proj = CCAProjection(config)
        self.qk_norm = QKNorm(config)
        self.o_proj = nn.Linear(config.num_attention_heads * config.head_dim, config.hidden_size,
                                bias=config.attention_bias)
        self.fused_project: Callable[..., tuple[Tensor, ...]] | None = None  # (x, conv, rho, cos, sin, segments)
        self.fused_attend: Callable[..., Tensor] | None = None  # (q, k, v, past_k, past_v, layout)

    def forward(self, x: Tensor, past_k: Tensor, past_v: Tensor, conv: Tensor, rho: Tensor, layout: AttnLayout,
                cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """x [B, T, H]; past_k/v [B, n_kv, S, d] → out [B, T, H] and this layer's k, v, conv_rows, omega."""
        if layout.segments is not None:  # packed TiDAR step: the slot decides whether its op takes segments
            q, k, v, conv_rows, omega = (self.fused_project or self.project)(x, conv, rho, cos, sin, layout.segments)
            out = (self.fused_attend or self.attend)(q, k, v, past_k, past_v, layout)
            return self.o_proj(out), k, v, conv_rows, omega
        q, k, v, conv_rows, omega = (self.fused_project or self.project)(x, conv, rho, cos, sin)
        out = (self.fused_attend or self.attend)(q, k, v, past_k, past_v, layout)
        return self.o_proj(out), k, v, conv_rows, omega

    def project(self, x: Tensor, conv: Tensor, rho: Tensor, cos: Tensor, sin: Tensor,  # noqa: ANN201
                segments: Segments | None = None):
        """→ q [B, n_q, T, d], k/v [B, n_kv, T, d] (q, k normed and rotated), conv_rows, omega."""
        q, k, v, conv_rows, omega = self.qkv_proj(x, conv, rho, segments)
        q, k = self.qk_norm(q, k)
        q = apply_partial_rope(q.transpose(1, 2), cos, sin)
        k = apply_partial_rope(k.transpose(1, 2), cos, sin)
        return q, k, v.transpose(1, 2), conv_rows, omega

    def attend(self, q: Tensor, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor, layout: AttnLayout) -> Tensor:
        """Softmax attention of q over [past ; new] keys → [B, T, n_q·d]: the cache and the new keys read apart
        (``kernels.block_attention.attend_apart``), masked slots just below the row's best score
        (``kernels.masking``); a fully masked row (left padding) stays finite, uniform over its slots."""
        return attend_apart(q, past_k, past_v, k, v, layout.allowed)


class RouterMLP(nn.Module):
    def __init__(self, R: int, classes: int, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(R, eps)
        self.fc1 = nn.Linear(R, R)
        self.fc2 = nn.Linear(R, R)
        self.out_proj = nn.Linear(R, classes, bias=False)

    def forward(self, r: Tensor) -> Tensor:
        return self.out_proj(F.gelu(self.fc2(F.gelu(self.fc1(self.norm(r))))))


class Router(nn.Module):
    """``mlp.gate``: MLP router whose hidden state is carried across layers (EDA), biased top-1 choice among
    E experts plus a skip class. Returns the chosen expert (E = skip), its un-biased probability and the state
    for the next layer."""

    def __init__(self, config: ZayaConfig, layer_idx: int) -> None:
        super().__init__()
        R, E = config.router_hidden_size, config.num_experts
        self.num_experts = E
        self.down_proj = nn.Linear(config.hidden_size, R)
        self.use_eda = layer_idx != 0
        if self.use_eda:
            self.router_states_scale = nn.Parameter(torch.ones(R))
        self.router_mlp = RouterMLP(R, E + 1, config.rms_norm_eps)
        biases = torch.zeros(E + 1, dtype=torch.float32)
        biases[-1] = -1.0
        self.register_buffer("balancing_biases", biases)  # fp32 whatever the model dtype (see ZayaForCausalLM)

    def forward(self, x: Tensor, prev: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        r = self.down_proj(x)  # [N, R]
        if self.use_eda and prev is not None:
            r = r + prev * self.router_states_scale
        probs = torch.softmax(self.router_mlp(r), dim=-1)  # [N, E+1], activation dtype
        choice = top1(probs, self.balancing_biases)  # [N]
        weight = torch.gather(probs, -1, choice[:, None]).squeeze(-1)  # [N]
        return choice, weight, r


class Experts(nn.Module):
    """Stacked SwiGLU experts: ``gate_up_proj [E, 2I, H]`` (gate rows first), ``down_proj [E, H, I]``."""

    def __init__(self, config: ZayaConfig) -> None:
        super().__init__()
        E, I, H = config.num_experts, config.moe_intermediate_size, config.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))

    def forward(self, x: Tensor, choice: Tensor, weight: Tensor) -> Tensor:
        """x [N, H], choice [N] in 0..E (E = skip), weight [N] → [N, H]; skip tokens get 0."""
        if torch.compiler.is_exporting():
            return self._dense(x, choice, weight)
        return self._sparse(x, choice, weight)

    def _expert(self, e: int, x: Tensor) -> Tensor:
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)  # [n, I] each
        return F.linear(F.silu(gate) * up, self.down_proj[e])

    def _dense(self, x: Tensor, choice: Tensor, weight: Tensor) -> Tensor:
        """Static dispatch for tracing: every expert runs on every token, a one-hot weight keeps the chosen one.
        E× the FLOPs, but no data-dependent shapes; the fused ``zaya.moe_top1`` op is where export gets fast."""
        out = torch.zeros_like(x)
        for e in range(self.gate_up_proj.shape[0]):
            out = out + self._expert(e, x) * torch.where(choice == e, weight, torch.zeros_like(weight))[:, None]
        return out

    def _sparse(self, x: Tensor, choice: Tensor, weight: Tensor) -> Tensor:
        """Eager dispatch: each hit expert runs once on its own tokens (what upstream does)."""
        out = torch.zeros_like(x)
        for e in torch.unique(choice).tolist():
            if e == self.gate_up_proj.shape[0]:
                continue  # skip class: no expert runs
            rows = (choice == e).nonzero().flatten()
            out.index_add_(0, rows, self._expert(e, x[rows]) * weight[rows, None])
        return out


class SparseMoE(nn.Module):
    """``mlp``: router + experts, the region ``fuse_moe`` replaces by ``zaya.moe_top1`` through the slot
    ``fused_forward`` (a plain callable of ``forward``'s signature, set only inside a fusion scope)."""

    fused_slots = ("fused_forward",)

    def __init__(self, config: ZayaConfig, layer_idx: int) -> None:
        super().__init__()
        self.gate = Router(config, layer_idx)
        self.experts = Experts(config)
        self.fused_forward: Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor]] | None = None

    def forward(self, x: Tensor, prev_router: Tensor | None) -> tuple[Tensor, Tensor]:
        """x [B, T, H], the previous layer's router state [B·T, R] or None → out [B, T, H], router state."""
        if self.fused_forward is not None:
            return self.fused_forward(x, prev_router)
        B, T, H = x.shape
        choice, weight, router_state = self.gate(x.reshape(B * T, H), prev_router)
        out = self.experts(x.reshape(B * T, H), choice, weight)
        return out.view(B, T, H), router_state


def scale_then_norm(scaling: ResidualScaling, norm: RMSNorm, sub: Tensor, res: Tensor) -> tuple[Tensor, Tensor]:
    """sub [B, T, H] sublayer output, res [B, T, H] fp32 residual → new residual (fp32) and its norm
    (activation dtype). Inside ``kernels.triton_faces()`` one Triton kernel does both, so the residual is not
    written and read back in between; outside it the two modules run as always (same numbers, same trace)."""
    if not triton_active():
        h = scaling(sub, res)
        return h, norm(h.to(norm.weight.dtype))
    return triton_face("residual_rmsnorm")(sub, res, scaling.hidden_states_bias, scaling.hidden_states_scale,
                                           scaling.residual_bias, scaling.residual_scale, norm.weight, norm.eps)


class DecoderLayer(nn.Module):
    def __init__(self, config: ZayaConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = CCAAttention(config)
        self.mlp = SparseMoE(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_residual_scale = ResidualScaling(config.hidden_size)
        self.post_mlp_residual_scale = ResidualScaling(config.hidden_size)

    def forward(self, h: Tensor, prev_router: Tensor | None, input_mask: Tensor | None, past_k: Tensor,
                past_v: Tensor, conv: Tensor, rho: Tensor, layout: AttnLayout, cos: Tensor, sin: Tensor,
                probe: list[Tensor] | None = None, normed: Tensor | None = None, next_norm: RMSNorm | None = None):
        """h [B, T, H] fp32 residual stream → new h, router state, this layer's state update, and the
        ``next_norm`` of the new h (or None). ``probe`` collects the residual stream after attention and after
        the MoE (for locating backend divergence). The Triton path (``step`` inside ``kernels.triton_faces()``)
        passes ``next_norm``, the norm that reads this layer's output (the next layer's input norm or the
        final norm), so the post-MoE scaling and that norm run as one kernel, and the next layer gets the
        result as ``normed``, its input norm of ``h``; the reference path passes neither."""
        dtype = self.input_layernorm.weight.dtype
        x = self.input_layernorm(h.to(dtype)) if normed is None else normed
        if input_mask is not None:  # zero padded rows so they leave no trace in the conv window or ρ
            x = x * input_mask[..., None].to(dtype)
        a, k, v, conv_rows, omega = self.self_attn(x, past_k, past_v, conv, rho, layout, cos, sin)
        h, x = scale_then_norm(self.post_attention_residual_scale, self.post_attention_layernorm, a, h)
        m, router_state = self.mlp(x, prev_router)
        if probe is not None:
            probe.append(h)
        if next_norm is None:
            h, next_x = self.post_mlp_residual_scale(m, h), None
        else:
            h, next_x = scale_then_norm(self.post_mlp_residual_scale, next_norm, m, h)
        if probe is not None:
            probe.append(h)
        return h, router_state, (k, v, conv_rows, omega), next_x


class ZayaModel(nn.Module):
    def __init__(self, config: ZayaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.input_hidden_states_scale = nn.Parameter(torch.ones(config.hidden_size))
        self.input_hidden_states_bias = nn.Parameter(torch.zeros(config.hidden_size))


def attention_allowed(past_valid: Tensor, new_valid: Tensor, window: int | None,
                      causal: bool = True) -> tuple[Tensor, Tensor]:
    """Key predicate ``[B, T, S+T]`` for attention over [cache ; new], and the positions ``[B, T]`` of the new
    tokens. ``causal=False`` makes the new block bidirectional (TiDAR drafting): every new token sees the
    whole cache and every other new token.

    Positions count real tokens only (``cumsum(valid) − 1``), as ``generate`` does for left padding, so a
    left-padded row computes exactly what the unpadded sequence computes.
    """
    B, S = past_valid.shape
    T = new_valid.shape[1]
    valid = torch.cat([past_valid, new_valid], dim=1)  # [B, S+T]
    key_pos = valid.long().cumsum(-1) - 1  # [B, S+T]
    q_pos = key_pos[:, S:]  # [B, T]
    slot = torch.arange(S + T, device=valid.device)
    order = slot[None, :] <= (S + torch.arange(T, device=valid.device))[:, None]  # [T, S+T]
    allowed = (order if causal else torch.ones_like(order))[None] & valid[:, None, :]
    if window is not None:
        allowed = allowed & ((q_pos[:, :, None] - key_pos[:, None, :]) < window)
    return allowed, q_pos.clamp_min(0)


def packed_allowed(past_valid: Tensor, packed: PackedLayout, window: int | None) -> tuple[Tensor, Tensor]:
    """Key predicate ``[B, N, S+N]`` and positions ``[B, N]`` of a packed TiDAR step after the cache: every
    step token sees the whole (valid) cache, and the static template among step tokens."""
    B, S = past_valid.shape
    N = packed.size
    pos = past_valid.long().sum(-1, keepdim=True) + packed.offsets.to(past_valid.device)[None]  # [B, N]
    allowed = torch.cat([past_valid[:, None, :].expand(B, N, S),
                         packed.template.to(past_valid.device)[None].expand(B, N, N)], dim=-1)
    if window is not None:
        key_pos = torch.cat([past_valid.long().cumsum(-1) - 1, pos], dim=-1)  # [B, S+N]
        allowed = allowed & ((pos[:, :, None] - key_pos[:, None, :]) < window)
    return allowed, pos


class ZayaForCausalLM(nn.Module):
    """ZAYA1 with a tied (or untied) LM head. ``forward`` is the plain full-sequence model; ``step`` is the
    state-explicit forward used by prefill, decode and every exported entry point."""

    def __init__(self, config: ZayaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = ZayaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.lm_head_bias)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module signature
        # Keep the routing biases fp32 across .to(dtype): they decide the argmax and upstream keeps them fp32.
        out = super()._apply(fn, recurse)
        for layer in self.model.layers:
            gate = layer.mlp.gate
            if gate.balancing_biases.dtype != torch.float32 and gate.balancing_biases.device.type != "meta":
                gate.balancing_biases = gate.balancing_biases.float()
        return out

    def empty_past(self, batch: int) -> Past:
        return empty_past(self.config, batch, self.dtype, self.lm_head.weight.device, self.rho_init())

    def rho_init(self) -> Tensor | None:
        """Per-layer ρ of a fresh sequence, ``v_proj_delayed(0)``: the bias, or None when there is none."""
        biases = [layer.self_attn.qkv_proj.v_proj_delayed.bias for layer in self.model.layers]
        return None if biases[0] is None else torch.stack([b.detach() for b in biases])

    def step(self, input_ids: Tensor, past: Past, input_mask: Tensor | None = None, *,
             layout: StepLayout = CAUSAL, readout: Readout = Readout.LOGITS,
             probe: list[Tensor] | None = None) -> tuple[Tensor, Update]:
        """Forward T new tokens after the committed state ``past``.

        input_ids [B, T]; input_mask [B, T] bool (False = left padding) or None → the ``readout`` and the
        uncommitted :class:`Update`. ``layout`` (``layout.py``): ``CAUSAL``; ``BIDIRECTIONAL``, the TiDAR draft
        block, which attends to the cache and bidirectionally to itself while the CCA conv and delayed value
        still continue from the committed state (they are sequence-local, not mask-driven); or a
        :class:`PackedLayout`, the single-forward TiDAR layout (verify + proposals, ``packed.py``), T its size.
        ``readout``: ``LOGITS`` [B, T, V]; ``LAST`` [B, 1, V]; ``HIDDEN`` the final-normed hidden states
        [B, T, H], so a caller can apply the LM head to only the rows it needs (the in-graph TiDAR step: 2K+1
        of N rows). ``probe`` (a list) receives the residual stream [B, T, H] after each layer's attention and
        MoE.
        """
        if not isinstance(layout, (BlockLayout, PackedLayout)):
            raise TypeError(f"layout must be CAUSAL, BIDIRECTIONAL or a PackedLayout, got {layout!r}")
        readout = Readout(readout)
        packed = packed_of(layout)
        causal = layout is not BIDIRECTIONAL
        cfg, m = self.config, self.model
        B, T = input_ids.shape
        dtype = self.dtype
        new_valid = torch.ones(B, T, dtype=torch.bool, device=input_ids.device) if input_mask is None else input_mask
        e = m.embed_tokens(input_ids)  # [B, T, H]
        h = ((e + m.input_hidden_states_bias) * m.input_hidden_states_scale).float()
        per_type = {}
        for layer_type in set(cfg.layer_types):
            window = cfg.sliding_window if layer_type == "hybrid_sliding" else None
            if packed is None:
                allowed, pos = attention_allowed(past.valid, new_valid, window, causal)
            else:
                allowed, pos = packed_allowed(past.valid, packed, window)
            cos, sin = rope_cos_sin(pos, cfg.rotary_dim(layer_type), cfg.rope_theta(layer_type), dtype)
            attn = AttnLayout(allowed, past.valid, new_valid, window or 0, causal,
                              *((None, None, None) if packed is None else
                                (packed.segments, packed.template, packed.offsets)))
            per_type[layer_type] = (attn, cos, sin)
        router_state, normed = None, None  # normed: the next layer's input norm, when the last one made it
        next_norms = self._next_norms() if triton_active() else [None] * len(m.layers)
        ks, vs, convs, omegas = [], [], [], []
        for i, layer in enumerate(m.layers):
            attn, cos, sin = per_type[cfg.layer_types[i]]
            h, router_state, (k, v, conv_rows, omega), normed = layer(
                h, router_state, input_mask, past.k[i], past.v[i], past.conv[i], past.rho[i], attn, cos, sin, probe,
                normed, next_norms[i]
            )
            ks.append(k)
            vs.append(v)
            convs.append(conv_rows)
            omegas.append(omega)
        if readout is Readout.LAST:
            h = h[:, -1:]
            normed = None if normed is None else normed[:, -1:]
        out = m.norm(h.to(dtype)) if normed is None else normed
        logits = out if readout is Readout.HIDDEN else self.lm_head(out)
        return logits, Update(torch.stack(ks), torch.stack(vs), torch.stack(convs), torch.stack(omegas))

    def _next_norms(self) -> list[RMSNorm]:
        """Per layer, the norm that reads its output: the next layer's input norm, the final norm for the last
        (the Triton path fuses each with the layer's post-MoE residual scaling)."""
        layers = self.model.layers
        return [layer.input_layernorm for layer in list(layers)[1:]] + [self.model.norm]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits ``[B, T, V]`` of a fresh sequence; ``attention_mask`` [B, T] (1 = token, 0 = left padding)."""
        mask = None if attention_mask is None else attention_mask.bool()
        logits, _ = self.step(input_ids, self.empty_past(input_ids.shape[0]), mask)
        return logits


def random_parameter(name: str, shape: tuple[int, ...], gen: torch.Generator, std: float,
                     randomize_all: bool = False) -> Tensor:
    """One parameter of :func:`init_weights` (fp32, drawn from ``gen`` in ``named_parameters`` order), so a
    writer can produce the same weights one tensor at a time (``init --preset 8b`` never holds the model)."""
    if len(shape) >= 2:
        if randomize_all or "conv" in name:  # unit-variance activations, so routing depends on input
            fan_in = shape[-1] * (shape[-2] if "conv" in name else 1)
            scale = 1.0 if name.endswith("embed_tokens.weight") else 1 / math.sqrt(fan_in)
        else:
            scale = std
        return torch.randn(shape, generator=gen).mul_(scale)
    if name.endswith("qk_norm.temp"):
        return 0.5 + torch.rand(shape, generator=gen)
    if randomize_all:
        base = 1.0 if name.endswith(("scale", "norm.weight", "layernorm.weight")) else 0.0
        return base + 0.1 * torch.randn(shape, generator=gen)
    if name.endswith("bias"):
        return torch.zeros(shape)
    return torch.ones(shape)


def init_weights(model: ZayaForCausalLM, seed: int, randomize_all: bool = False) -> None:
    """Random weights: normal(0, initializer_range) for matrices as upstream does. With ``randomize_all``
    every scale, bias, temperature and balancing bias is random too, so parity tests exercise every
    parameter (upstream's τ = 0 would make attention uniform and hide bugs in q/k)."""
    gen = torch.Generator().manual_seed(seed)
    std = model.config.initializer_range
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(random_parameter(name, tuple(p.shape), gen, std, randomize_all))
        for layer in model.model.layers:
            b = layer.mlp.gate.balancing_biases
            b.zero_()
            b[-1] = 0.0 if randomize_all else -1.0  # let parity tests hit the skip class too
            if randomize_all:
                b.add_(0.01 * torch.randn(b.shape, generator=gen))
