"""Quantized matrices in the traced model, for the MLIR/IREE lowering of a ``--quant`` artifact.

The ONNX path quantizes after lowering (``passes/onnx_quant``: ``MatMulNBits`` on the stored codes). IREE has no
such op: its quantized matmul is a matmul whose weight operand is an elementwise *dequantization* of integer
codes, which IREE's dispatch formation fuses into the matmul's dispatch, so the codes are read and widened in
registers and no float copy of the weight is ever written. This module puts that form into the trace:

* :func:`quantized_matrices` swaps each quantized weight (``nn.Linear.weight``, the expert stacks, the LM head)
  for a :class:`QuantizedMatrix` submodule whose buffers are named ``<weight>.qweight`` / ``.scales`` /
  ``.zero_points``: the names the weight file stores the parts under, so the MLIR globals read them in place.
  Codes are traced as one uint8 per code, shape ``[..., N, G, g]``; for a plain int4 matrix the lowering
  retypes that global to ``i4`` (two codes per byte, the file's own packing) and widens it where it is read
  (:func:`zaya_export.mlir_export.store_parameters`), and its zero points likewise; int4 expert stacks keep the
  file's bytes and unpack them with shifts in the graph.
* The model code and the MLIR faces are unchanged: a :class:`QuantizedMatrix` answers the few things they do with
  a weight (``F.linear``, ``x @ w.T``, ``w[e]``, ``w.index_select(0, rows)`` and the row-wise einsum of the
  decode MoE, ``w.shape``) through ``__torch_function__``.
* One-token entries compute ``y[n] = Σ_G Σ_g x[G, g] · (q[n, G, g] - z[n, G]) · s[n, G]`` as one reduction, the
  form IREE turns into a single matvec dispatch with the dequantization inside; multi-token entries dequantize
  one matrix and run a real matmul (compute-bound there: the transient matrix is one weight, not a copy of all).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zaya_export.kernels.registry import decode_faces

from .quantization import HEAD, QuantScheme

_EINSUM_ROWWISE = ("nih,nh->ni", "nhi,ni->nh")  # the decode MoE face: per-row weight [n, out, in] · x [n, in]


class _Parts:
    """Codes, scales and zero points of one matrix, a stack of them, or rows gathered from a stack.

    ``codes``: one uint8 per code ``[..., N, G, g]``, or for int4 stacks the file's packed bytes
    ``[..., N, G, g/2]`` (``packed``), unpacked in the graph by shifts (see :class:`QuantizedMatrix`); zero
    points likewise (one per group, or packed bytes)."""

    def __init__(self, codes: Tensor, scales: Tensor, zero_points: Tensor | None, bits: int, k: int,
                 packed: bool) -> None:
        self.codes, self.scales, self.zero_points, self.bits, self.k = codes, scales, zero_points, bits, k
        self.packed = packed

    @property
    def shape(self) -> torch.Size:
        """The float matrix's shape ``[..., N, K]``."""
        return torch.Size((*self.codes.shape[:-2], self.k))

    def select(self, index: Any) -> _Parts:  # noqa: ANN401 - an int, a SymInt or an index tensor
        scalar = isinstance(index, (int, torch.SymInt))  # a SymInt: the traced batch-1 MoE face's expert
        take = (lambda t: t[index]) if scalar else (lambda t: t.index_select(0, index))
        zp = None if self.zero_points is None else take(self.zero_points)
        return _Parts(take(self.codes), take(self.scales), zp, self.bits, self.k, self.packed)

    @property
    def _group_dims(self) -> int:
        return 3 if self.packed else 2  # [G, g/2, 2] or [G, g]

    @property
    def _group_axes(self) -> tuple[int, ...]:
        return tuple(range(-self._group_dims, 0))

    def dequantized(self) -> Tensor:
        """fp32 ``[..., N, G, g]`` (packed: ``[..., N, G, g/2, 2]``): (code - zero point) · scale, elementwise
        (the form IREE fuses into the matmul that reads it)."""
        codes = _unpack(self.codes) if self.packed else self.codes
        groups = self.codes.shape[-2]
        if self.zero_points is None:
            zero: Tensor | float = float(2 ** (self.bits - 1))
        else:
            zp = _unpack(self.zero_points).flatten(-2) if self.packed else self.zero_points
            if zp.shape[-1] != groups:  # int4 pads an odd group count to whole bytes
                zp = zp[..., :groups]
            zero = zp.float().reshape(*zp.shape[:-1], groups, *[1] * (self._group_dims - 1))
        return (codes.float() - zero) * self.scales.reshape(*self.scales.shape, *[1] * (self._group_dims - 1))

    def _grouped(self, x: Tensor) -> Tensor:
        """``x [..., K]`` → ``[..., G, g]`` or ``[..., G, g/2, 2]`` (zero-padded to whole groups)."""
        groups, size = self.codes.shape[-2], self.codes.shape[-1] * (2 if self.packed else 1)
        if groups * size != self.k:
            x = F.pad(x, (0, groups * size - self.k))
        return x.reshape(*x.shape[:-1], groups, *((size // 2, 2) if self.packed else (size,)))

    def linear(self, x: Tensor) -> Tensor:
        """``x [..., K] @ W.T`` for a plain matrix ``W [N, K]``."""
        if decode_faces():  # one token per row: one reduction over the group axes, dequantization inside
            return (self._grouped(x).unsqueeze(-self._group_dims - 1) * self.dequantized()).sum(self._group_axes)
        w = self.dequantized().flatten(-self._group_dims)[..., : self.k]  # [N, K]
        return F.linear(x, w)

    def rowwise(self, x: Tensor) -> Tensor:
        """Gathered rows ``W [n, out, in]`` applied to ``x [n, in]`` → ``[n, out]``."""
        return (self._grouped(x)[:, None] * self.dequantized()).sum(self._group_axes)


def _unpack(packed: Tensor) -> Tensor:
    """Bytes ``[..., m]`` → int4 codes ``[..., m, 2]`` (the even code in the low nibble) by a broadcast shift:
    elementwise, so IREE fuses it with the dequantization (``quantization._unpack`` stacks the two nibbles,
    a concatenation, and trims padding)."""
    shifts = torch.tensor([0, 4], dtype=torch.uint8, device=packed.device)
    return torch.bitwise_and(torch.bitwise_right_shift(packed[..., None], shifts), 15)


class _Operand:
    """What the model code and the faces read of a weight: its shape, ``w.T`` for ``x @ w.T``, and the torch
    functions :func:`_dispatch` answers. Subclasses give :meth:`parts`."""

    def parts(self) -> _Parts:
        raise NotImplementedError

    @property
    def shape(self) -> torch.Size:
        return self.parts().shape

    @property
    def T(self) -> _Transposed:  # noqa: N802 - mirrors Tensor.T for ``x @ w.T``
        return _Transposed(self.parts())

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:  # noqa: ANN401
        return _dispatch(func, args, kwargs or {})


class QuantizedMatrix(_Operand, nn.Module):
    """A quantized weight in place of a float one; buffers named as the weight file names its parts."""

    def __init__(self, float_shape: tuple[int, ...], bits: int, group_size: int, symmetric: bool) -> None:
        super().__init__()
        *lead, n, k = float_shape
        groups = math.ceil(k / group_size)
        # int4 stacks (experts) keep the file's bytes in the graph: the decode MoE gathers an expert's codes,
        # and AMD GPU codegen cannot gather i4. A plain int4 matrix is traced one code per byte and retyped to
        # i4 at lowering (faster on CPU than unpacking by shifts: 1.2 vs 5.3 ms for an int4 4096×2048 matvec).
        self.bits, self.k, self.packed = bits, k, bits == 4 and bool(lead)
        # zero-size-in-memory stand-ins: only shapes and dtypes reach the trace (the values are external)
        size = group_size // 2 if self.packed else group_size
        self.register_buffer("qweight", _zeros((*lead, n, groups, size), torch.uint8))
        self.register_buffer("scales", _zeros((*lead, n, groups), torch.float32))
        if not symmetric:  # like the codes: the file's bytes when packed, else one per group (i4 when lowered)
            stored = math.ceil(groups * bits / 8)
            self.register_buffer("zero_points", _zeros((*lead, n, stored if self.packed or bits == 8 else 2 * stored),
                                                       torch.uint8))
        else:
            self.zero_points = None

    def parts(self) -> _Parts:
        return _Parts(self.qweight, self.scales, self.zero_points, self.bits, self.k, self.packed)

    @property
    def device(self) -> torch.device:
        return self.scales.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # what it computes in

    def __getitem__(self, index: int | torch.SymInt) -> _Rows:
        return _Rows(self.parts().select(index))

    def index_select(self, dim: int, index: Tensor) -> _Rows:
        if dim != 0:
            raise NotImplementedError("a quantized matrix stack is gathered along its first axis only")
        return _Rows(self.parts().select(index))


class _Rows(_Operand):
    """``stack[e]`` (a matrix) or ``stack.index_select(0, rows)`` (a matrix per row) of a quantized stack."""

    def __init__(self, parts: _Parts) -> None:
        self._parts = parts

    def parts(self) -> _Parts:
        return self._parts


class _Transposed(_Rows):
    """``w.T``: only ever the right operand of ``x @ w.T``."""


def _dispatch(func: Any, args: tuple, kwargs: dict) -> Tensor:  # noqa: ANN401
    if func is F.linear:
        x, w, *rest = args
        bias = rest[0] if rest else kwargs.get("bias")
        y = w.parts().linear(x)
        return y if bias is None else y + bias
    if getattr(func, "__name__", "") in ("matmul", "__matmul__") and isinstance(args[1], _Transposed):
        return args[1].parts().linear(args[0])
    if func is torch.einsum and args[0] in _EINSUM_ROWWISE and isinstance(args[1], _Rows):
        return args[1].parts().rowwise(args[2])
    raise NotImplementedError(f"a quantized weight cannot be used in {getattr(func, '__name__', func)}"
                              f"{tuple(type(a).__name__ for a in args)} (only "
                              "linear layers, x @ w.T and the MoE faces read quantized weights)")


def _zeros(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    return torch.zeros((), dtype=dtype).expand(shape)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return model.get_submodule(path), attr


@contextmanager
def quantized_matrices(model: nn.Module, scheme: QuantScheme | None) -> Iterator[list[str]]:
    """Inside the block, every weight ``scheme`` quantizes is a :class:`QuantizedMatrix` (a tied LM head is
    untied: the embedding lookup keeps the float table). Yields the swapped names; restores the float weights
    (and the tie) on exit. ``scheme`` None: nothing changes."""
    if scheme is None:
        yield []
        return
    saved: dict[str, Tensor] = {}
    state = dict(model.named_parameters(remove_duplicate=False))
    if "lm_head.weight" not in state:  # tied, and named only once
        state[HEAD] = model.get_submodule("lm_head").weight
    try:
        for name, weight in state.items():
            bits = scheme.bits_for(name)
            if bits is None:
                continue
            owner, attr = _owner(model, name)
            saved[name] = weight
            del owner._parameters[attr]
            setattr(owner, attr, QuantizedMatrix(tuple(weight.shape), bits, scheme.group_size, scheme.symmetric))
        yield list(saved)
    finally:
        for name, weight in saved.items():
            owner, attr = _owner(model, name)
            delattr(owner, attr)
            owner.register_parameter(attr, weight)
