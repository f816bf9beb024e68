"""In-place state commit entries for the IREE module, so the decode state never leaves the device.

A forward entry reads the state and returns its update (``tracing``); on onnxruntime the host then writes
the committed rows into numpy buffers (``runtime.session.KVCache``). On IREE that would move the whole cache
across the host boundary on every call. Instead the runtime keeps the buffers as device arrays, passes a
forward's state outputs back still on the device, and calls one of these entries, which write the first
``counts[b]`` new rows of row b into the buffers *in place*: the traced program mutates its state inputs,
turbine imports that as ``torch.overwrite.tensor.contents`` and IREE ties the result to the argument buffer.

* ``commit``: after ``prefill``/``decode``/``verify``/``step`` (update as ``conv_rows`` + ``omega``, so any
  prefix can be committed: conv window = rows n..n+κ−1, ρ = ω_{n−1}).
* ``commit_accepted``: after the in-graph TiDAR steps, whose outputs already hold the committed conv window
  and ρ (``conv_state_out``/``rho_state_out``); rows with n = 0 keep their state.

All T new key/value rows are written at offsets ``lengths[b]..lengths[b]+T−1`` (one scatter); only the first
n are marked valid, so the rest are invisible and overwritten by the next commit. The caller keeps ``lengths``
on the host and guarantees ``lengths[b] + T <= S``. ``lengths`` is not mutated in the graph: IREE cannot tie
a mutable integer tensor (``si64`` materialization fails).

Cost: IREE 3.13 imports a mutated argument that is also read as borrowed storage and keeps a copy-on-write
clone for it (iree-org/iree#22844 made that conservative), so one commit copies the buffers once *on the
device* (measured: time grows with capacity, ~12 GB/s on this CPU). Nothing crosses to the host; a decode
forward reads the whole buffers anyway, so the copy is of the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import ZayaConfig
from .io_table import (ACCEPTED_UPDATE, COMMIT_META, MAX_BATCH, MAX_SEQ, STATE, TABLE, UPDATE, Name, config_sizes,
                       dynamic_shape, shape)
from .state import committed_window, write_rows


@dataclass(frozen=True)
class CommitSpec:
    name: str
    update: tuple[Name, ...]  # the forward outputs it consumes

    @property
    def inputs(self) -> list[Name]:
        return [*STATE, *COMMIT_META, *self.update]

    @property
    def outputs(self) -> list[Name]:
        return []  # it only writes the state

    @property
    def mutates(self) -> list[Name]:
        return list(STATE)


COMMIT_SPECS = {
    "commit": CommitSpec("commit", UPDATE),
    "commit_accepted": CommitSpec("commit_accepted", ACCEPTED_UPDATE),
}
# forward outputs that only feed a commit: the IREE backend leaves them on the device when the state lives there
UPDATE_OUTPUTS = frozenset(n for spec in COMMIT_SPECS.values() for n in spec.update)


class CommitRows(nn.Module):
    """``commit``: state after the first ``counts[b]`` tokens of a forward's update (``Update`` semantics)."""

    def forward(self, past_k: Tensor, past_v: Tensor, past_valid: Tensor, conv_state: Tensor, rho_state: Tensor,
                lengths: Tensor, counts: Tensor, new_valid: Tensor, new_k: Tensor, new_v: Tensor,
                conv_rows: Tensor, omega: Tensor) -> tuple[Tensor, ...]:
        write_rows(past_k, past_v, past_valid, lengths, counts, new_valid, new_k, new_v)
        conv, rho = committed_window(conv_rows, omega, counts, rho_state)
        conv_state.copy_(conv)
        rho_state.copy_(rho)
        return ()


class CommitAccepted(nn.Module):
    """``commit_accepted``: the in-graph step already gathered the committed conv window and ρ."""

    def forward(self, past_k: Tensor, past_v: Tensor, past_valid: Tensor, conv_state: Tensor, rho_state: Tensor,
                lengths: Tensor, counts: Tensor, new_valid: Tensor, new_k: Tensor, new_v: Tensor,
                conv_state_out: Tensor, rho_state_out: Tensor) -> tuple[Tensor, ...]:
        write_rows(past_k, past_v, past_valid, lengths, counts, new_valid, new_k, new_v)
        some = counts > 0
        conv_state.copy_(torch.where(some[None, :, None, None], conv_state_out, conv_state))
        rho_state.copy_(torch.where(some[None, :, None], rho_state_out, rho_state))
        return ()


_MODULES = {"commit": CommitRows, "commit_accepted": CommitAccepted}


def commit_module(name: str) -> nn.Module:
    return _MODULES[name]()


def export_commit(config: ZayaConfig, name: str) -> torch.export.ExportedProgram:
    """Trace one commit entry (functionalised, so the mutations are in the graph signature) with dynamic B, S
    and T; the examples avoid 0/1 so no dim is specialised."""
    spec = COMMIT_SPECS[name]
    sizes = {**config_sizes(config), "B": 2, "S": 9, "T": 3}
    kappa = sizes["kappa"]
    examples = {n: torch.randn(shape(n, sizes)) for n in spec.update}
    examples |= {n: torch.zeros(shape(n, sizes), dtype=TABLE[n].dtype) for n in STATE}
    examples |= {Name.LENGTHS: torch.tensor([1, 2]), Name.COUNTS: torch.tensor([3, 1]),
                 Name.NEW_VALID: torch.ones(shape(Name.NEW_VALID, sizes), dtype=torch.bool)}
    t = torch.export.Dim("seq", min=1, max=MAX_SEQ)
    dims = {"B": torch.export.Dim("batch", min=1, max=MAX_BATCH), "S": torch.export.Dim("past", min=1, max=MAX_SEQ),
            "T": t, "kappa+T": kappa + t}
    dynamic = tuple(dynamic_shape(n, dims) for n in spec.inputs)
    with torch.no_grad():
        program = torch.export.export(commit_module(name), tuple(examples[n] for n in spec.inputs),
                                      dynamic_shapes=dynamic)
    return program.run_decompositions({})
