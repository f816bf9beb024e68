"""Fusion passes: each rewrites one region per ZAYA1 layer into a single ``zaya.*`` op, for one scope.

The regions are the model's own module boundaries (``CCAAttention.project``, ``CCAAttention.attend``,
``SparseMoE.forward``): the same information ``torch.export`` records as ``nn_module_stack``, used before
tracing instead of after it. Rewriting at that level binds every weight and activation to the op's
signature by name, so a fused graph cannot silently take the wrong operand; the traced graph is then
checked for exactly one op per layer (``expected_ops``).

A rewrite fills the module's fused slot (``fused_project``, ``fused_attend``, ``fused_forward``: plain
callables, not modules, so the state_dict never changes) and is reversible: the passes run only inside
``with fused(model, passes) as log:``, which restores every slot on exit, exception or not, so a model is
never left fused.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

import zaya_export.kernels as kernels  # registers the zaya.* ops
from zaya_export.kernels.registry import triton_active, triton_face
from zaya_export.models import ZayaForCausalLM
from zaya_export.models.packed import Segments
from zaya_export.models.zaya import AttnLayout

from .base import Pass, PassError, PassManager, PassRecord


class _Scopes(threading.local):
    """ids of the models inside a ``fused`` scope on this thread, once per open scope (a fusion pass refuses
    any other model). Thread-local like ``kernels.routing``'s tape, not a context variable."""

    open: tuple[int, ...] = ()


_SCOPES = _Scopes()


def _fused(fn, op: str):  # noqa: ANN001, ANN202
    fn.zaya_op = op
    return fn


def fused_slots(model: nn.Module) -> dict[tuple[str, str], Callable[..., Any]]:
    """Every fused slot that is set: (module name, slot) → the callable in it."""
    return {(name, slot): fn for name, module in model.named_modules()
            for slot in getattr(module, "fused_slots", ()) if (fn := getattr(module, slot)) is not None}


@contextmanager
def fused(model: ZayaForCausalLM, passes: Sequence[Pass[ZayaForCausalLM]] | None = None,
          **manager_options: Any) -> Iterator[list[PassRecord]]:
    """Run the fusion ``passes`` (default :func:`fusion_pipeline`) on ``model`` through a :class:`PassManager`
    (``manager_options``: its ``probe``, ``tolerance``, ``dump``...) and yield the pass log. On exit, also when
    a pass or the body raises, every fused slot gets back the value it had on entry (none, outside an
    enclosing scope): the model computes with its reference regions again, and its state_dict never changed.
    """
    saved = [(module, slot, getattr(module, slot)) for module in model.modules()
             for slot in getattr(module, "fused_slots", ())]
    _SCOPES.open = (*_SCOPES.open, id(model))
    try:
        yield PassManager(fusion_pipeline() if passes is None else passes, **manager_options).run(model)
    finally:
        still_open = list(_SCOPES.open)
        still_open.remove(id(model))  # this scope's entry, whatever order scopes close in
        _SCOPES.open = tuple(still_open)
        for module, slot, value in saved:
            setattr(module, slot, value)


class _LayerFusion(Pass[ZayaForCausalLM]):
    """Fills the fused slot ``slot`` of each layer's submodule ``owner_path`` with a call to the fused op
    ``op``; only inside a :func:`fused` scope, which undoes it."""

    op: str = ""
    owner_path: str = ""
    slot: str = ""

    def owner(self, layer):  # noqa: ANN001, ANN201 - the module whose region is replaced
        return getattr(layer, self.owner_path)

    def fused(self, owner, model):  # noqa: ANN001, ANN201 - the replacement, bound to owner's weights
        raise NotImplementedError

    def _is_fused(self, owner) -> bool:  # noqa: ANN001
        return getattr(getattr(owner, self.slot), "zaya_op", None) == self.op

    def requires(self, model: ZayaForCausalLM) -> None:
        if id(model) not in _SCOPES.open:
            raise PassError(f"{self.name}: fusion runs only inside `with passes.fusion.fused(model, ...)`, "
                            "which unfuses the model again on exit")
        done = [i for i, layer in enumerate(model.model.layers) if getattr(self.owner(layer), self.slot) is not None]
        if done:
            raise PassError(f"{self.name}: layers {done} are already fused")

    def run(self, model: ZayaForCausalLM) -> int:
        for layer in model.model.layers:
            owner = self.owner(layer)
            setattr(owner, self.slot, _fused(self.fused(owner, model), self.op))
        return len(model.model.layers)

    def ensures(self, model: ZayaForCausalLM, rewrites: int) -> None:
        missing = [i for i, layer in enumerate(model.model.layers) if not self._is_fused(self.owner(layer))]
        if missing or rewrites != model.config.num_hidden_layers:
            raise PassError(f"{self.name}: layers {missing} not fused ({rewrites} rewrites)")

    def expected_ops(self, model: ZayaForCausalLM) -> dict[str, int]:
        """How many nodes of the op a traced entry point must contain."""
        return {self.op: model.config.num_hidden_layers}


class FuseCCA(_LayerFusion):
    """q/k/v projections + q/k mean residual + two-stage conv + L2 norm·τ + partial RoPE → ``zaya.cca``."""

    name, op, owner_path, slot = "fuse_cca", "zaya.cca", "self_attn", "fused_project"

    def requires(self, model: ZayaForCausalLM) -> None:
        if model.config.attention_bias:
            raise PassError("fuse_cca: zaya.cca has no q/k/v biases (ZAYA1 uses none); attention_bias=true")
        super().requires(model)

    def fused(self, attn, model):  # noqa: ANN001, ANN201
        p, temp = attn.qkv_proj, attn.qk_norm.temp

        def project(x: Tensor, conv: Tensor, rho: Tensor, cos: Tensor, sin: Tensor,  # noqa: ANN202
                    segments: Segments | None = None):
            args = (x, conv, rho, cos, sin, p.q_proj.weight, p.k_proj.weight, p.v_proj_current.weight,
                    p.v_proj_delayed.weight, p.conv_qk_depthwise.weight, p.conv_qk_depthwise.bias,
                    p.conv_qk_grouped.weight, p.conv_qk_grouped.bias, temp)
            if segments is None:
                return kernels.call("cca", *args)
            return _packed_cca(attn, args, segments)

        return project


class FuseAttention(_LayerFusion):
    """Masked GQA attention → ``zaya.block_attention`` (mask rebuilt inside the op from the layout)."""

    name, op, owner_path, slot = "fuse_attention", "zaya.block_attention", "self_attn", "fused_attend"

    def fused(self, attn, model):  # noqa: ANN001, ANN201
        def attend(q: Tensor, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor, layout: AttnLayout) -> Tensor:
            if layout.template is not None:
                return _packed_attention(attn, q, k, v, past_k, past_v, layout)
            return kernels.call("block_attention", q, past_k, past_v, k, v, layout.past_valid, layout.new_valid,
                                layout.window, layout.causal)

        return attend


def _packed_cca(attn, args: tuple[Tensor, ...], segments: Segments):  # noqa: ANN001, ANN202
    """The packed TiDAR step's CCA (``args``: ``zaya.cca``'s operands). Only the Triton kernel reads the
    per-segment conv/value tables; ``zaya.cca`` itself (custom op, ONNX and MLIR faces) is one-segment, so
    outside ``triton_faces()`` the module's reference region runs, exactly as the unfused model (and traces)."""
    if not triton_active():
        return attn.project(*args[:5], segments)
    return triton_face("cca")(*args, conv_index=segments.conv_index, value_index=segments.value_index)


def _packed_attention(attn, q: Tensor, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor,  # noqa: ANN001
                      layout: AttnLayout) -> Tensor:
    """The packed step's attention: the Triton kernel generates the mask from the static [T, T] template and
    the step tokens' offsets; ``zaya.block_attention`` has no template operand, so outside ``triton_faces()``
    the module's reference region (over the materialised predicate) runs."""
    if not triton_active():
        return attn.attend(q, k, v, past_k, past_v, layout)
    return triton_face("block_attention")(q, past_k, past_v, k, v, layout.past_valid, layout.new_valid,
                                          layout.window, template=layout.template, template_offsets=layout.offsets)


class FuseMoE(_LayerFusion):
    """Router MLP with EDA state + biased top-1 with skip class + SwiGLU experts → ``zaya.moe_top1``."""

    name, op, owner_path, slot = "fuse_moe", "zaya.moe_top1", "mlp", "fused_forward"

    def fused(self, moe, model):  # noqa: ANN001, ANN201
        gate, experts, eps = moe.gate, moe.experts, model.config.rms_norm_eps
        mlp = gate.router_mlp

        def forward(x: Tensor, prev: Tensor | None) -> tuple[Tensor, Tensor]:
            B, T, H = x.shape
            R = gate.down_proj.weight.shape[0]
            if prev is None:  # layer 0: r + 0·1 is exactly r
                prev = torch.zeros(B * T, R, dtype=x.dtype, device=x.device)
            scale = gate.router_states_scale if gate.use_eda else torch.ones(R, dtype=x.dtype, device=x.device)
            out, state = kernels.call(
                "moe_top1", x.reshape(B * T, H), prev, gate.down_proj.weight, gate.down_proj.bias, scale,
                mlp.norm.weight, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, mlp.out_proj.weight,
                gate.balancing_biases, experts.gate_up_proj, experts.down_proj, eps,
            )
            return out.view(B, T, H), state

        return forward


def fusion_pipeline() -> list[_LayerFusion]:
    return [FuseCCA(), FuseAttention(), FuseMoE()]
