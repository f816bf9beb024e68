"""A state commit folded into the next forward: one IREE call where the runtime made two.

With the decode state on the IREE device (``runtime.device_cache``), every forward that changes the state is
followed by a commit entry (``commit_entry``) before the next forward runs. Each call has a fixed cost on top of
its dispatches (argument transfer, submission, the wait): on the demo checkpoint the commit call takes 0.3 ms of
which its work is ~0.15. So the module also carries ``commit_then_<entry>`` functions that first write the
previous forward's pending commit into the state, in place, and then run the forward on the committed state:
AR decoding (commit, then the next decode) and two-forward TiDAR (the verify's commit, then the draft).

Signature: the forward's inputs, then the commit's meta (``lengths``, ``counts``, ``new_valid``) and the
previous forward's update, whose T is that forward's (any length), not this one's; the forward's outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .commit_entry import COMMIT_SPECS, CommitSpec, commit_module
from .entries import Entry, EntrySpec, entry_dims, example_inputs
from .io_table import COMMIT_META, MAX_SEQ, STATE, Name, config_sizes, dynamic_shape, shape
from .zaya import ZayaForCausalLM

FOLDED = {"commit": ("decode", "draft")}  # commit → the forwards that take it with them (its update: UPDATE)


def folded_name(commit: str, entry: str) -> str:
    """The module function that runs ``commit`` and then ``entry`` (its batch-1 twin adds ``entries.BATCH1``)."""
    return f"{commit}_then_{entry}"


@dataclass(frozen=True)
class FoldedSpec:
    name: str
    commit: CommitSpec
    forward: EntrySpec

    @property
    def inputs(self) -> list[Name]:
        return [*self.forward.inputs, *COMMIT_META, *self.commit.update]

    @property
    def outputs(self) -> list[Name]:
        return list(self.forward.outputs)

    @property
    def mutates(self) -> list[Name]:
        return list(STATE)


def folded_specs(specs: dict[str, EntrySpec]) -> dict[str, FoldedSpec]:
    """The folded functions for the entries in ``specs`` (an AR artifact has no draft, so no commit_then_draft)."""
    return {folded_name(c, e): FoldedSpec(folded_name(c, e), COMMIT_SPECS[c], specs[e])
            for c, forwards in FOLDED.items() for e in forwards if e in specs}


class CommitThen(nn.Module):
    """The commit on the state, then the forward on the committed state. The commit mutates its state
    arguments, so the importer ties them: the cache is written in place, as by the commit entry alone."""

    def __init__(self, commit: nn.Module, forward: Entry) -> None:
        super().__init__()
        self.commit, self.forward_entry = commit, forward

    def forward(self, input_ids: Tensor, input_mask: Tensor, past_k: Tensor, past_v: Tensor, past_valid: Tensor,
                conv_state: Tensor, rho_state: Tensor, lengths: Tensor, counts: Tensor, new_valid: Tensor,
                new_k: Tensor, new_v: Tensor, conv_rows: Tensor, omega: Tensor) -> tuple[Tensor, ...]:
        state = (past_k, past_v, past_valid, conv_state, rho_state)
        self.commit(*state, lengths, counts, new_valid, new_k, new_v, conv_rows, omega)
        return self.forward_entry(input_ids, input_mask, *state)


def export_folded(model: ZayaForCausalLM, spec: FoldedSpec, batch: int | None = None) -> torch.export.ExportedProgram:
    """Trace ``spec`` with the forward's dynamic dims (``batch`` fixes the batch, as for the twins) and a dynamic
    length of its own for the pending update; examples avoid 0/1 so no dim gets specialised."""
    B, S, pending = batch or 2, 9, 3
    dims = entry_dims(spec.forward, batch)
    length = torch.export.Dim("pending", min=1, max=MAX_SEQ)
    update_dims = {**{k: v for k, v in dims.items() if k in ("B", "S")}, "T": length,
                   "kappa+T": model.config.conv_history + length}
    sizes = {**config_sizes(model.config), "B": B, "T": pending}
    forward = example_inputs(model, B, spec.forward.tokens or 7, S)
    meta = (torch.arange(1, B + 1), torch.full((B,), pending), torch.ones(B, pending, dtype=torch.bool))
    update = tuple(torch.randn(shape(n, sizes)).to(model.dtype) for n in spec.commit.update)
    dynamic = (*(dynamic_shape(n, dims) for n in spec.forward.inputs),
               *(dynamic_shape(n, update_dims) for n in (*COMMIT_META, *spec.commit.update)))
    with torch.no_grad():
        return torch.export.export(CommitThen(commit_module(spec.commit.name), Entry(model, spec.forward)),
                                   (*forward, *meta, *update), dynamic_shapes=dynamic)
