"""Weight-only quantization: int8/int4 per-group codes in onnxruntime's ``MatMulNBits`` layout.

A weight ``W [N, K]`` (out × in, as ``nn.Linear`` stores it) is cut along K into groups of ``group_size``
values; each group gets one fp32 scale (and, asymmetric, one zero point), and each value a ``bits``-bit code:

    W[n, k] ≈ (q[n, k] - z[n, k // g]) · s[n, k // g]

Symmetric schemes use the fixed zero point 2^(bits-1) (8 or 128, which is ``MatMulNBits``' default when no
zero point is given) and s = max|W_group| / (2^(bits-1) - 1), so the largest value of every group is exact.
Asymmetric ones spread [min(W_group, 0), max(W_group, 0)] over the 2^bits codes (zero is always exact).

Stored layout (``MatMulNBits``): codes ``[N, n_groups, g·bits/8]`` uint8, two int4 codes per byte (the even
k in the low nibble); scales ``[N, n_groups]`` fp32; zero points ``[N, ⌈n_groups·bits/8⌉]`` uint8, packed the
same way. K need not be a multiple of g: the last group is padded with zeros (which code to the zero point).

What is quantized (:func:`quant_targets`): the attention projections and the experts (each expert a matrix of
its own) at ``bits``; the LM head at ``head_bits`` (8 by default for int4: the head's errors land directly in
the logits). Embeddings, norms, convolutions and the router stay in the stored float dtype: the router is tiny
and a rounded router flips expert choices.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from pathlib import Path

import torch
from torch import Tensor

from .config import ZayaConfig
from .safetensors_stream import TensorSlot
from .zaya import ZayaForCausalLM

SCHEMES = ("int8", "int4", "int8-asym", "int4-asym")
GROUP_SIZES = (16, 32, 64, 128, 256)
HEAD_CHOICES = ("int8", "same")
PARTS = ("qweight", "scales", "zero_points")

# Native tensor names that hold quantized matrices ([N, K] or, for experts, [E, N, K]).
_TARGETS = re.compile(r"model\.layers\.\d+\.(self_attn\.(qkv_proj\.(q_proj|k_proj|v_proj_current|v_proj_delayed)"
                      r"|o_proj)\.weight|mlp\.experts\.(gate_up_proj|down_proj))")
HEAD = "lm_head.weight"


class QuantError(ValueError):
    """A quantization scheme or a stored quantized tensor that is not usable."""


@dataclass(frozen=True)
class QuantScheme:
    """How an artifact's matrices are quantized (recorded in its manifest)."""

    bits: int  # 4 or 8
    group_size: int
    symmetric: bool
    head_bits: int  # the LM head's bits
    # MatMulNBits' accuracy_level: 4 quantizes the activations to int8 per group and runs integer dot products
    # (the fast path on x86; int8 weights have no other fast path), 0 computes in fp32 (tests compare with it)
    accuracy_level: int = 4

    @classmethod
    def parse(cls, scheme: str, group_size: int = 32, head: str = "int8", accuracy_level: int = 4) -> QuantScheme:
        """``scheme`` one of :data:`SCHEMES`; ``head``: ``int8`` keeps the LM head at 8 bits, ``same`` uses the
        scheme's bits for it too."""
        if scheme not in SCHEMES:
            raise QuantError(f"unknown quantization {scheme!r}; choose one of {', '.join(SCHEMES)}")
        if group_size not in GROUP_SIZES:
            raise QuantError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
        if head not in HEAD_CHOICES:
            raise QuantError(f"--quant-head must be one of {', '.join(HEAD_CHOICES)}, got {head!r}")
        bits = int(scheme[3])
        return cls(bits=bits, group_size=group_size, symmetric=not scheme.endswith("-asym"),
                   head_bits=8 if head == "int8" else bits, accuracy_level=accuracy_level)

    @property
    def name(self) -> str:
        return f"int{self.bits}{'' if self.symmetric else '-asym'}-g{self.group_size}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Any, where: str = "quant") -> QuantScheme:  # noqa: ANN401
        """Read a manifest's record back; :class:`QuantError` names the bad field."""
        keys = {"bits", "group_size", "symmetric", "head_bits", "accuracy_level"}
        if not isinstance(d, dict) or set(d) != keys:
            raise QuantError(f"{where}: expected an object with keys {sorted(keys)}")
        if d["bits"] not in (4, 8) or d["head_bits"] not in (4, 8) or d["group_size"] not in GROUP_SIZES \
                or not isinstance(d["symmetric"], bool) or d["accuracy_level"] not in (0, 1, 2, 3, 4):
            raise QuantError(f"{where}: unsupported values {d}")
        return cls(**d)

    def bits_for(self, name: str) -> int | None:
        """Bits of the native tensor ``name``, or None when it is not quantized."""
        if name == HEAD:
            return self.head_bits
        return self.bits if _TARGETS.fullmatch(name) else None


@dataclass(frozen=True)
class Quantized:
    """One matrix (or a stack of expert matrices: a leading E axis on every part) in MatMulNBits layout."""

    qweight: Tensor  # uint8 [..., N, n_groups, g·bits/8]
    scales: Tensor  # fp32 [..., N, n_groups]
    zero_points: Tensor | None  # uint8 [..., N, ⌈n_groups·bits/8⌉]; None: symmetric
    k: int  # the unpadded K

    def parts(self) -> dict[str, Tensor]:
        out = {"qweight": self.qweight, "scales": self.scales}
        return out if self.zero_points is None else {**out, "zero_points": self.zero_points}


def _pack(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes [..., n] → bytes [..., n·bits/8] (int4: two per byte, the even index in the low nibble)."""
    if bits == 8:
        return codes
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    if bits == 8:
        return packed[..., :n]
    return torch.stack([packed & 0x0F, packed >> 4], -1).flatten(-2)[..., :n]


def quantize(w: Tensor, bits: int, group_size: int, symmetric: bool) -> Quantized:
    """``w [..., N, K]`` (any float dtype) → codes, scales and zero points (module docstring). Experts are
    quantized one at a time and a matrix :data:`ROWS_PER_CHUNK` rows at a time, so the fp32 working copies stay
    small whatever the matrix (the 8B's tied head is 262k × 2048: 2.1 GB in fp32, each temporary as much)."""
    if w.dim() > 2:
        each = [quantize(m, bits, group_size, symmetric) for m in w]
        zps = [q.zero_points for q in each]
        return Quantized(torch.stack([q.qweight for q in each]), torch.stack([q.scales for q in each]),
                         None if symmetric else torch.stack(zps), w.shape[-1])
    if w.shape[0] > ROWS_PER_CHUNK:
        each = [_quantize_rows(c, bits, group_size, symmetric) for c in w.split(ROWS_PER_CHUNK)]
        return Quantized(torch.cat([q.qweight for q in each]), torch.cat([q.scales for q in each]),
                         None if symmetric else torch.cat([q.zero_points for q in each]), w.shape[-1])
    return _quantize_rows(w, bits, group_size, symmetric)


ROWS_PER_CHUNK = 8192


def _quantize_rows(w: Tensor, bits: int, group_size: int, symmetric: bool) -> Quantized:
    *lead, n, k = w.shape
    groups = math.ceil(k / group_size)
    x = torch.nn.functional.pad(w.float(), (0, groups * group_size - k)).reshape(*lead, n, groups, group_size)
    if not torch.isfinite(x).all():
        raise QuantError("cannot quantize a matrix holding inf or NaN")
    levels = 2 ** bits - 1
    if symmetric:
        zero = torch.full(x.shape[:-1], 2 ** (bits - 1), dtype=torch.float32)
        scale = x.abs().amax(-1) / (2 ** (bits - 1) - 1)  # [..., N, groups]
    else:
        lo, hi = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)
        scale = (hi - lo) / levels
        zero = torch.round(-lo / torch.where(scale > 0, scale, 1.0)).clamp(0, levels)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale is exact
    codes = torch.round(x / scale[..., None] + zero[..., None]).clamp(0, levels).to(torch.uint8)
    qweight = _pack(codes, bits)  # [..., N, groups, g·bits/8]
    zp = None if symmetric else _pack(zero.to(torch.uint8), bits)
    return Quantized(qweight.contiguous(), scale.contiguous(), zp, k)


def dequantize(q: Quantized, bits: int, group_size: int) -> Tensor:
    """The fp32 matrix ``q`` stands for, ``[..., N, K]``."""
    *lead, n, groups, _ = q.qweight.shape
    codes = _unpack(q.qweight, bits, group_size).float()  # [..., N, groups, g]
    if q.zero_points is None:
        zero = torch.full((*lead, n, groups), float(2 ** (bits - 1)))
    else:
        zero = _unpack(q.zero_points, bits, groups).float()
    w = (codes - zero[..., None]) * q.scales[..., None]
    return w.reshape(*lead, n, groups * group_size)[..., :q.k].contiguous()


def part_shapes(shape: tuple[int, ...], bits: int, group_size: int, symmetric: bool) -> dict[str, tuple[int, ...]]:
    """Shapes of the stored parts of a ``[..., N, K]`` matrix."""
    *lead, n, k = shape
    groups = math.ceil(k / group_size)
    out = {"qweight": (*lead, n, groups, group_size * bits // 8), "scales": (*lead, n, groups)}
    if not symmetric:
        out["zero_points"] = (*lead, n, math.ceil(groups * bits / 8))
    return out


def source_name(name: str, tied: bool) -> str:
    """The native tensor a quantized one is made from (a tied head is the embedding)."""
    return "model.embed_tokens.weight" if name == HEAD and tied else name


def quantized_slots(shapes: dict[str, tuple[int, ...]], slots: list[TensorSlot], scheme: QuantScheme,
                    tied: bool) -> tuple[list[TensorSlot], dict[str, int]]:
    """The weight file of a quantized artifact: ``slots`` (every native tensor) without the quantized matrices
    (a tied embedding stays: the embedding lookup reads it), plus ``<name>.<part>`` for each quantized one.
    Returns the slots in writing order (each matrix's parts together) and native name → bits."""
    names = dict(shapes)
    if tied:
        names[HEAD] = shapes["model.embed_tokens.weight"]
    bits = {n: b for n in names if (b := scheme.bits_for(n)) is not None}
    keep = [s for s in slots if s.name not in bits]
    quant = []
    for name, b in bits.items():
        for part, shape in part_shapes(names[name], b, scheme.group_size, scheme.symmetric).items():
            quant.append(TensorSlot(f"{name}.{part}", torch.float32 if part == "scales" else torch.uint8, shape))
    return keep + quant, bits


def quantizing_producer(read: Callable[[str], Tensor], scheme: QuantScheme, bits: dict[str, int], tied: bool
                        ) -> Callable[[TensorSlot], Tensor]:
    """``produce(slot)`` for :func:`models.safetensors_stream.write_streamed`: native slots come from ``read``,
    the parts of a quantized matrix from one quantization of it (kept until its last part is written)."""
    cache: dict[str, Quantized] = {}

    def produce(slot: TensorSlot) -> Tensor:
        name, _, part = slot.name.rpartition(".")
        if part not in PARTS or name not in bits:
            return read(slot.name)
        if name not in cache:
            cache.clear()  # one matrix at a time
            cache[name] = quantize(read(source_name(name, tied)), bits[name], scheme.group_size, scheme.symmetric)
        return cache[name].parts()[part]

    return produce


def dequantize_stored(read: Callable[[str], Tensor], shapes: dict[str, tuple[int, ...]], bits: dict[str, int],
                      scheme: QuantScheme) -> dict[str, Tensor]:
    """Native name → the fp32 matrix each quantized one stands for, from a quantized weight file's parts
    (``read(name)``); ``shapes``: the native shapes (they give the unpadded K). Raises :class:`QuantError`
    when a part's shape is not the one the scheme makes."""
    out = {}
    for name, b in bits.items():
        want = part_shapes(shapes[name], b, scheme.group_size, scheme.symmetric)
        parts = {part: read(f"{name}.{part}") for part in want}
        for part, shape in want.items():
            if tuple(parts[part].shape) != shape:
                raise QuantError(f"{name}.{part}: shape {list(parts[part].shape)}, expected {list(shape)}")
        q = Quantized(parts["qweight"], parts["scales"].float(), parts.get("zero_points"), shapes[name][-1])
        out[name] = dequantize(q, b, scheme.group_size)
    return out


def load_quantized(path: Path, config: ZayaConfig, scheme: QuantScheme, dtype: torch.dtype = torch.float32
                   ) -> ZayaForCausalLM:
    """The eager model a quantized weight file stands for: float tensors as stored, each quantized matrix
    dequantized (the LM head of a tied model becomes its own, dequantized, matrix: the embedding lookup keeps
    reading the float table). Holds every matrix in ``dtype``: for models that fit in memory (the 8B is
    validated on its artifact only)."""
    from safetensors import safe_open

    with torch.device("meta"):
        model = ZayaForCausalLM(config)
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    tied = config.tie_word_embeddings
    bits = {n: b for n in shapes if (b := scheme.bits_for(n)) is not None}
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = set(f.keys())
            state = {n: f.get_tensor(n) for n in shapes if n in stored}
            matrices = dequantize_stored(f.get_tensor, shapes, bits, scheme)
    except QuantError:
        raise
    except Exception as exc:  # a missing part or an unreadable file
        raise QuantError(f"{path}: not a weight file of the {scheme.name} scheme ({exc})") from None
    state.update(matrices)
    if tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing = sorted(set(shapes) - set(state))
    if missing:
        raise QuantError(f"{path}: missing tensors {missing[:5]}")
    state = {n: t.to(torch.float32 if n.endswith("balancing_biases") else dtype) for n, t in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    if tied:  # untie: the head is the quantized copy
        model.lm_head.weight = torch.nn.Parameter(matrices[HEAD].to(dtype), requires_grad=False)
    return model.eval()
