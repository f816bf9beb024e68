"""The one table of entry-point inputs and outputs: every name, its dims, its dtype and its role.

Every other module derives from here: entry signatures (``entries``), commit entries (``commit_entry``),
``torch.export`` dynamic shapes, the runtime's cache buffers (``runtime.host_cache``/``device_cache``) and the
keys the generation loops read. A name is a :class:`Name` (a ``str`` enum), so ``outputs[Name.LOGITS]`` works
on any backend's plain-string dict and a typo is an ``AttributeError``, not a silent miss.

Dims are symbols resolved by :func:`shape`: ``B`` batch, ``T`` new tokens, ``S`` cache slots (dynamic), and
config sizes ``L`` layers, ``nkv`` KV heads, ``d`` head dim, ``C`` conv channels, ``kappa`` conv history,
``dv`` delayed-value width, ``V`` vocabulary, ``H`` hidden, ``K`` draft block; ``x+y`` and ``2x`` compose.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import torch

MAX_BATCH, MAX_SEQ = 64, 1 << 20
DYNAMIC = ("B", "S", "T")  # every other dim is fixed by the config


class Name(StrEnum):
    # forward inputs
    INPUT_IDS = "input_ids"
    INPUT_MASK = "input_mask"
    PAST_K = "past_k"
    PAST_V = "past_v"
    PAST_VALID = "past_valid"
    CONV_STATE = "conv_state"
    RHO_STATE = "rho_state"
    # in-graph TiDAR step inputs
    DRAFT_VALID = "draft_valid"
    DRAFT_LOGITS = "draft_logits"
    UNIFORMS = "uniforms"
    SAMPLER = "sampler"
    # forward outputs
    LOGITS = "logits"
    HIDDEN = "hidden"
    NEW_K = "new_k"
    NEW_V = "new_v"
    CONV_ROWS = "conv_rows"
    OMEGA = "omega"
    # in-graph TiDAR step outputs
    COUNT = "count"
    TOKENS = "tokens"
    NEXT_DRAFTS = "next_drafts"
    NEXT_VALID = "next_valid"
    NEXT_DRAFT_LOGITS = "next_draft_logits"
    CONV_STATE_OUT = "conv_state_out"
    RHO_STATE_OUT = "rho_state_out"
    # commit entry inputs (besides the state and an update)
    LENGTHS = "lengths"
    COUNTS = "counts"
    NEW_VALID = "new_valid"


@dataclass(frozen=True)
class Port:
    name: Name
    dims: tuple[str, ...]
    dtype: torch.dtype  # float32 stands for the compute dtype
    doc: str


_F, _I, _B = torch.float32, torch.int64, torch.bool
TABLE: dict[Name, Port] = {p.name: p for p in (
    Port(Name.INPUT_IDS, ("B", "T"), _I, "new token ids"),
    Port(Name.INPUT_MASK, ("B", "T"), _B, "False = left padding"),
    Port(Name.PAST_K, ("L", "B", "nkv", "S", "d"), _F, "cached keys, every layer"),
    Port(Name.PAST_V, ("L", "B", "nkv", "S", "d"), _F, "cached values"),
    Port(Name.PAST_VALID, ("B", "S"), _B, "which cache slots hold a token"),
    Port(Name.CONV_STATE, ("L", "B", "C", "kappa"), _F, "CCA conv window: the last κ pre-conv rows"),
    Port(Name.RHO_STATE, ("L", "B", "dv"), _F, "CCA delayed value ρ"),
    Port(Name.DRAFT_VALID, ("B", "K"), _B, "which drafts of the step exist"),
    Port(Name.DRAFT_LOGITS, ("B", "K", "V"), _F, "the drafter's logits of the step's drafts"),
    Port(Name.UNIFORMS, ("B", "K+1"), _F, "acceptance uniforms, then the residual/bonus sample's"),
    Port(Name.SAMPLER, ("4",), _F, "[temperature, top_k, top_p, w]"),
    Port(Name.LOGITS, ("B", "T", "V"), _F, "logits (last row only: [B, V])"),
    Port(Name.HIDDEN, ("2L", "B", "T", "H"), _F, "residual stream after each attention and MoE (debug)"),
    Port(Name.NEW_K, ("L", "B", "nkv", "T", "d"), _F, "keys of the new tokens"),
    Port(Name.NEW_V, ("L", "B", "nkv", "T", "d"), _F, "values of the new tokens"),
    Port(Name.CONV_ROWS, ("L", "B", "C", "kappa+T"), _F, "[conv window ; new pre-conv rows]"),
    Port(Name.OMEGA, ("L", "B", "T", "dv"), _F, "delayed-value candidates of the new tokens"),
    Port(Name.COUNT, ("B",), _I, "committed tokens ℓ+1"),
    Port(Name.TOKENS, ("B", "K+1"), _I, "accepted drafts then a' at ℓ"),
    Port(Name.NEXT_DRAFTS, ("B", "K"), _I, "the next step's drafts"),
    Port(Name.NEXT_VALID, ("B", "K"), _B, "which of them exist"),
    Port(Name.NEXT_DRAFT_LOGITS, ("B", "K", "V"), _F, "their drafter logits"),
    Port(Name.CONV_STATE_OUT, ("L", "B", "C", "kappa"), _F, "conv window committed at ℓ"),
    Port(Name.RHO_STATE_OUT, ("L", "B", "dv"), _F, "ρ committed at ℓ"),
    Port(Name.LENGTHS, ("B",), _I, "committed length of each row"),
    Port(Name.COUNTS, ("B",), _I, "how many new rows each row commits"),
    Port(Name.NEW_VALID, ("B", "T"), _B, "which new rows are tokens (not padding)"),
)}

# Groups every signature is built from.
TOKENS_IN = (Name.INPUT_IDS, Name.INPUT_MASK)
STATE = (Name.PAST_K, Name.PAST_V, Name.PAST_VALID, Name.CONV_STATE, Name.RHO_STATE)  # the cache buffers
FORWARD_INPUTS = (*TOKENS_IN, *STATE)
UPDATE = (Name.NEW_K, Name.NEW_V, Name.CONV_ROWS, Name.OMEGA)  # any prefix of it can be committed
ACCEPTED_UPDATE = (Name.NEW_K, Name.NEW_V, Name.CONV_STATE_OUT, Name.RHO_STATE_OUT)  # committed at ℓ in-graph
ACCEPT_INPUTS = {"greedy": (Name.DRAFT_VALID,),
                 "sample": (Name.DRAFT_VALID, Name.DRAFT_LOGITS, Name.UNIFORMS, Name.SAMPLER)}
_DECISIONS = (Name.COUNT, Name.TOKENS, Name.NEXT_DRAFTS, Name.NEXT_VALID)
ACCEPT_OUTPUTS = {"greedy": (*_DECISIONS, *ACCEPTED_UPDATE),
                  "sample": (*_DECISIONS, Name.NEXT_DRAFT_LOGITS, *ACCEPTED_UPDATE)}
COMMIT_META = (Name.LENGTHS, Name.COUNTS, Name.NEW_VALID)


def config_sizes(config) -> dict[str, int]:  # noqa: ANN001 - ZayaConfig (imported lazily by callers)
    """The config's value of every fixed dim symbol."""
    return {"L": config.num_hidden_layers, "nkv": config.num_key_value_heads, "d": config.head_dim,
            "C": config.conv_channels, "kappa": config.conv_history, "dv": config.value_half,
            "V": config.vocab_size, "H": config.hidden_size, "K": config.diffusion_block_len}


def _term(term: str, sizes: dict[str, int]) -> int:
    if term.isdigit():
        return int(term)
    coeff = ""
    while term and term[0].isdigit():
        coeff, term = coeff + term[0], term[1:]
    return int(coeff or 1) * sizes[term]


def dim(symbol: str, sizes: dict[str, int]) -> int:
    """Value of one dim symbol (``"kappa+T"``, ``"2L"``, ``"4"``) given every symbol's size."""
    return sum(_term(t, sizes) for t in symbol.split("+"))


def shape(name: Name, sizes: dict[str, int]) -> tuple[int, ...]:
    """Concrete shape of ``name``; ``sizes`` holds the config sizes and the dynamic B, S, T."""
    return tuple(dim(s, sizes) for s in TABLE[name].dims)


def dynamic_shape(name: Name, dims: dict[str, object]) -> dict[int, object] | None:
    """``torch.export`` dynamic-shape spec of ``name``: axis → ``dims[symbol]`` for every axis whose symbol
    (``"B"``, or a composite such as ``"kappa+T"``) is in ``dims``; None when no axis is dynamic."""
    out = {axis: dims[symbol] for axis, symbol in enumerate(TABLE[name].dims) if symbol in dims}
    return out or None


def state_buffers(config, batch: int, capacity: int, dtype: object, zeros) -> dict[Name, object]:  # noqa: ANN001
    """Fresh cache buffers (every :data:`STATE` name) of ``capacity`` slots, allocated by ``zeros(shape,
    dtype)``; ``dtype`` is used for the float buffers, bool for validity."""
    sizes = {**config_sizes(config), "B": batch, "S": capacity}
    return {n: zeros(shape(n, sizes), bool if TABLE[n].dtype is torch.bool else dtype) for n in STATE}
