"""Entry points as ``torch.export`` programs with flat, explicit state.

Every entry takes the same inputs, so backends and the runtime treat them alike:

inputs   input_ids [B, T] int64, input_mask [B, T] bool (False = left padding),
         past_k / past_v [L, B, n_kv, S, d], past_valid [B, S] bool, conv_state [L, B, C, κ], rho_state [L, B, dv]

| entry   | T            | outputs                                                                        |
| ------- | ------------ | ------------------------------------------------------------------------------ |
| prefill | dynamic      | logits [B, V] (last position), new_k/new_v [L, B, n_kv, T, d], conv_rows       |
|         |              | [L, B, C, κ+T], omega [L, B, T, dv]                                            |
| decode  | 1            | as prefill                                                                     |
| verify  | K+1          | logits [B, K+1, V] (every row), new_k/new_v, conv_rows, omega                  |
| draft   | K+1          | logits [B, K+1, V]; the block attends bidirectionally; state is read only      |
| step    | (K+1)(1+P)   | logits [B, N, V], new_k/new_v, conv_rows, omega of the packed TiDAR layout     |
|         |              | (verify segment first, then P proposals; ``models/packed.py``)                 |
| step_greedy | (K+1)(1+P) | the whole greedy lossless TiDAR step in-graph: extra input draft_valid [B, K]; |
|         |              | outputs count [B], tokens [B, K+1], next_drafts/next_valid [B, K], new_k/new_v |
|         |              | (K+1 verify rows), conv_state_out, rho_state_out (committed by gather at ℓ)    |

``conv_rows``/``omega`` let the runtime commit any prefix of the new tokens (all of them for prefill and
decode, ℓ+1 after a TiDAR verify) without another forward. B and S are dynamic everywhere. The runtime
appends ``new_k``/``new_v`` into its own preallocated cache, so no graph copies the whole cache.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .decoding import decode, prefill
from .state import Past
from .zaya import ZayaForCausalLM
from .layout import BIDIRECTIONAL, CAUSAL, Readout, StepLayout, packed_of
from .packed import PackedLayout, packed_layout

from .ingraph_step import greedy_step, sample_step, sampler_vector
from .io_table import ACCEPT_INPUTS, ACCEPT_OUTPUTS, FORWARD_INPUTS, MAX_BATCH, MAX_SEQ, UPDATE, Name, dynamic_shape

AR_ENTRIES = ("prefill", "decode")  # what every artifact has; TiDAR ones add verify, draft and the packed step


@dataclass(frozen=True, kw_only=True)
class EntrySpec:
    name: str
    tokens: int | None  # static T (None = dynamic)
    all_rows: bool  # logits for every new token, not just the last
    state: bool  # returns the state update
    layout: StepLayout = CAUSAL  # BIDIRECTIONAL: the draft block; a PackedLayout: the single-forward TiDAR step
    accept: str = ""  # "greedy" | "sample": acceptance, commit and next-draft selection inside the graph
    probe: bool = False  # debug: also return the residual stream after every attention and MoE

    @property
    def packed(self) -> PackedLayout | None:
        """The packed TiDAR layout of a ``step*`` entry, else None."""
        return packed_of(self.layout)

    @property
    def readout(self) -> Readout:
        """What ``model.step`` returns: hidden states for in-graph acceptance (the head runs on 2K+1 rows
        only), else every row's logits or the last row's."""
        if self.accept:
            return Readout.HIDDEN
        return Readout.LOGITS if self.all_rows else Readout.LAST

    @property
    def inputs(self) -> list[Name]:
        return [*FORWARD_INPUTS, *ACCEPT_INPUTS[self.accept]] if self.accept else list(FORWARD_INPUTS)

    @property
    def outputs(self) -> list[Name]:
        if self.accept:
            return list(ACCEPT_OUTPUTS[self.accept])
        if self.probe:
            return [Name.LOGITS, Name.HIDDEN]
        return [Name.LOGITS, *UPDATE] if self.state else [Name.LOGITS]


def default_levels(block_len: int) -> tuple[int, ...]:
    """Λ = (0, 6, 16) at K = 16 (the project default), scaled to other K."""
    return tuple(sorted({0, round(6 * block_len / 16), block_len}))


def entry_specs(block_len: int, levels: tuple[int, ...] | None = None, kappa: int = 2) -> dict[str, EntrySpec]:
    """Every entry point: the unpacked ones and the packed TiDAR step for ``levels`` (the runtime's view; the
    exporter gets the packed entries from the ``pack_tidar_step`` pass, which also verifies them)."""
    packed = packed_layout(block_len, levels or default_levels(block_len), kappa)
    return {**base_entry_specs(block_len), **packed_entry_specs(packed)}


def base_entry_specs(block_len: int) -> dict[str, EntrySpec]:
    """AR entries and the two TiDAR forwards (verify, draft) of K+1 tokens."""
    K1 = block_len + 1
    return {
        "prefill": EntrySpec(name="prefill", tokens=None, all_rows=False, state=True),
        "decode": EntrySpec(name="decode", tokens=1, all_rows=False, state=True),
        "verify": EntrySpec(name="verify", tokens=K1, all_rows=True, state=True),
        "draft": EntrySpec(name="draft", tokens=K1, all_rows=True, state=False, layout=BIDIRECTIONAL),
    }


def packed_entry_specs(packed: PackedLayout) -> dict[str, EntrySpec]:
    """The single-forward TiDAR step: host acceptance (``step``), in-graph greedy (``step_greedy``) and in-graph
    stochastic lossless / logit-mixing acceptance (``step_sample``)."""
    return {
        "step": EntrySpec(name="step", tokens=packed.size, all_rows=True, state=True, layout=packed),
        "step_greedy": EntrySpec(name="step_greedy", tokens=packed.size, all_rows=True, state=True, layout=packed,
                                 accept="greedy"),
        "step_sample": EntrySpec(name="step_sample", tokens=packed.size, all_rows=True, state=True, layout=packed,
                                 accept="sample"),
    }


# Debug entry for ``validate --bisect``: a causal forward that also returns hidden [2L, B, T, H], the residual
# stream after layer i's attention (row 2i) and after its MoE (row 2i+1).
PROBE = EntrySpec(name="layers", tokens=None, all_rows=True, state=False, probe=True)


class Entry(nn.Module):
    """``model.step`` with the flat signature above, for one entry."""

    def __init__(self, model: ZayaForCausalLM, spec: EntrySpec) -> None:
        super().__init__()
        self.model, self.spec = model, spec

    def forward(self, input_ids: Tensor, input_mask: Tensor, past_k: Tensor, past_v: Tensor, past_valid: Tensor,
                conv_state: Tensor, rho_state: Tensor, draft_valid: Tensor | None = None,
                draft_logits: Tensor | None = None, uniforms: Tensor | None = None, sampler: Tensor | None = None
                ) -> tuple[Tensor, ...]:
        spec = self.spec
        probe: list[Tensor] | None = [] if spec.probe else None
        logits, u = self.model.step(input_ids, Past(past_k, past_v, past_valid, conv_state, rho_state), input_mask,
                                    layout=spec.layout, readout=spec.readout, probe=probe)
        if probe is not None:
            return logits, torch.stack(probe)
        if spec.accept == "greedy":  # `logits` are the normed hidden states here: the head runs on 2K+1 rows only
            return greedy_step(input_ids, logits, self.model.lm_head, u, draft_valid, spec.packed)
        if spec.accept == "sample":
            return sample_step(input_ids, logits, self.model.lm_head, u, draft_valid, draft_logits, uniforms, sampler,
                               spec.packed)
        logits = logits if spec.all_rows else logits[:, -1]
        return (logits, u.k, u.v, u.conv_rows, u.omega) if spec.state else (logits,)


def example_inputs(model: ZayaForCausalLM, B: int, T: int, S: int, seed: int = 0) -> tuple[Tensor, ...]:
    """Random inputs of the entry signature: a random state of S cached slots (left padding in row 0), or a
    fresh sequence's state (zero conv window and ρ) when S = 0."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    L, nkv, d = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    dtype = model.dtype
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    valid = torch.ones(B, S, dtype=torch.bool)
    if S > 1:
        valid[0, : S // 2] = False
    elif T > 2:
        mask[0, :1] = False
    past = [torch.randn(L, B, nkv, S, d, generator=g).to(dtype) for _ in range(2)]
    conv = torch.randn(L, B, cfg.conv_channels, cfg.conv_history, generator=g).to(dtype)
    rho = torch.randn(L, B, cfg.value_half, generator=g).to(dtype)
    if S == 0:
        conv, rho = torch.zeros_like(conv), torch.zeros_like(rho)
    return (ids, mask, past[0], past[1], valid, conv, rho)


def example_feed(model: ZayaForCausalLM, B: int, T: int, S: int, seed: int = 0) -> dict[Name, "np.ndarray"]:
    """:func:`example_inputs` as a backend feed: forward input name → numpy array."""
    return dict(zip(FORWARD_INPUTS, (x.numpy() for x in example_inputs(model, B, T, S, seed))))


def greedy_inputs(model: ZayaForCausalLM, B: int, T: int, S: int, seed: int = 0) -> tuple[Tensor, ...]:
    """Inputs of the entry signature drawn from the model's own distribution: the real state after a random
    prompt of S tokens, and as new ids the model's greedy continuation of T tokens (what a greedy TiDAR
    verify would accept). Random ids and a random cache miss what real decoding reaches: large attention
    logits over keys the model itself wrote, routing on its own hidden states."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (B, max(S, 1)), generator=g)
    with torch.no_grad():
        last, state = prefill(model, prompt, capacity=max(S, 1) + T)
        past = state.past()
        past = Past(*(t.clone() for t in (past.k, past.v, past.valid, past.conv, past.rho)))
        tokens = [last.argmax(-1)]
        for _ in range(T - 1):
            tokens.append(decode(model, tokens[-1], state).argmax(-1))
    ids = torch.stack(tokens, 1)  # [B, T]
    return (ids, torch.ones(B, T, dtype=torch.bool), past.k, past.v, past.valid, past.conv, past.rho)


def accept_inputs(spec: EntrySpec, B: int, vocab: int, seed: int = 0, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, w: float = 1.0) -> tuple[Tensor, ...]:
    """Example extra inputs of an in-graph TiDAR step: every draft valid, random draft logits and uniforms."""
    K = spec.packed.block_len
    valid = torch.ones(B, K, dtype=torch.bool)
    if spec.accept == "greedy":
        return (valid,)
    g = torch.Generator().manual_seed(seed)
    return (valid, torch.randn(B, K, vocab, generator=g), torch.rand(B, K + 1, generator=g),
            sampler_vector(temperature, top_k, top_p, w))


BATCH1 = "_b1"  # suffix of an entry's batch-1 twin in the IREE module


def batch1_twin(entry: str) -> str:
    """The name of ``entry`` traced at a fixed batch of 1. IREE's CPU code for a matrix product whose row count
    is dynamic streams the weights about 4x slower than for a fixed one (the demo's LM head at one row: 0.79 ms
    against 0.18 ms), so the module carries a batch-1 twin of every fixed-length entry and the runtime calls it
    for a single sequence; batches of more keep the dynamic function."""
    return entry + BATCH1


def entry_dims(spec: EntrySpec, batch: int | None = None) -> dict[str, torch.export.Dim]:
    """The dynamic dims of ``spec``'s trace: S always, B unless ``batch`` fixes it, T unless the entry fixes it."""
    dims = {"S": torch.export.Dim("past", min=0, max=MAX_SEQ)}
    if batch is None:
        dims["B"] = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    if spec.tokens is None:
        dims["T"] = torch.export.Dim("seq", min=1, max=MAX_SEQ)
    return dims


def export_entry(model: ZayaForCausalLM, spec: EntrySpec, batch: int | None = None) -> torch.export.ExportedProgram:
    """Trace one entry point with its dynamic dims (examples avoid 0/1 so no dim gets specialised). ``batch``
    fixes the batch size instead of leaving it dynamic (the IREE module's batch-1 twins)."""
    dynamic = tuple(dynamic_shape(name, entry_dims(spec, batch)) for name in spec.inputs)
    inputs = example_inputs(model, batch or 2, spec.tokens or 7, 3)
    if spec.accept:
        inputs = (*inputs, *accept_inputs(spec, batch or 2, model.config.vocab_size))
    with torch.no_grad():
        return torch.export.export(Entry(model, spec), inputs, dynamic_shapes=dynamic)


def op_histogram(program: torch.export.ExportedProgram) -> Counter:
    """Call counts by op name, e.g. ``{"zaya.cca": 40, "aten.linear": 2}``."""
    return Counter(node.target.name().replace("::", ".") for node in program.graph.nodes
                   if node.op == "call_function" and hasattr(node.target, "name"))
