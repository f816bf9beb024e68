"""``pack_tidar_step``: pack the two TiDAR forwards (``verify`` + ``draft``) into the single-forward ``step``.

The program this pass rewrites is the export plan (model + entry points). It adds the packed ``step`` entry
(verify segment + one proposal per acceptance level, ``models/packed.py``) and ``step_greedy`` (the same forward
with greedy acceptance, commit and next-draft selection in-graph). It is the one place where the packing is
decided, and it proves what packing must preserve before anything is traced (``tidar-decoding.md`` §4.3):

* the verify rows equal the ``verify`` entry's rows (AR rows), and
* proposal p's rows equal a ``draft`` of K+1 masks after committing the anchor and λ_p drafts,

on a random state with a cache and on the model's own greedy continuation, so the per-segment CCA seeding and
the attention template are checked on the model being exported, not only in the unit tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from zaya_export.models import Past, ZayaForCausalLM
from zaya_export.models.packed import packed_layout
from zaya_export.models.state import committed_window
from zaya_export.models.entries import Entry, EntrySpec, example_inputs, greedy_inputs, packed_entry_specs
from zaya_export.models.io_table import UPDATE, Name

from .base import Pass, PassError
from .probe_check import Comparison, ProbeTolerance, record, replay, stack_routes, tolerance_for


@dataclass
class ExportPlan:
    """What ``export`` will trace: the (fused) model and its entry points by name."""

    model: ZayaForCausalLM
    specs: dict[str, EntrySpec] = field(default_factory=dict)


class PackTidarStep(Pass[ExportPlan]):
    name = "pack_tidar_step"

    def __init__(self, block_len: int, levels: tuple[int, ...], tolerance: ProbeTolerance | None = None) -> None:
        self.block_len, self.levels = block_len, tuple(levels)
        self.tolerance = tolerance
        self.check: Comparison | None = None  # the last ensures() comparison, for the pass log

    def requires(self, plan: ExportPlan) -> None:
        missing = {"verify", "draft"} - set(plan.specs)
        if missing:
            raise PassError(f"{self.name}: needs the unpacked TiDAR entries, missing {sorted(missing)}")
        if "step" in plan.specs:
            raise PassError(f"{self.name}: the plan already has a packed step")
        if plan.specs["verify"].tokens != self.block_len + 1:
            raise PassError(f"{self.name}: verify takes {plan.specs['verify'].tokens} tokens, "
                            f"K+1 = {self.block_len + 1}")

    def run(self, plan: ExportPlan) -> int:
        try:
            layout = packed_layout(self.block_len, self.levels, plan.model.config.conv_history)
        except ValueError as exc:
            raise PassError(f"{self.name}: {exc}") from None
        new = packed_entry_specs(layout)
        plan.specs.update(new)
        return len(new)

    def ensures(self, plan: ExportPlan, rewrites: int) -> None:
        tol = self.tolerance or tolerance_for(plan.model.dtype)
        self.check = packing_check(plan.model, plan.specs)
        if not self.check.ok(tol):
            raise PassError(f"{self.name}: the packed step differs from verify/draft: {self.check.describe(tol)}")


def packing_check(model: ZayaForCausalLM, specs: dict[str, EntrySpec], seed: int = 0) -> Comparison:
    """The packed step's rows against the verify / per-level draft rows they stand for, on two inputs: random
    ids over a random cache, and the model's own greedy continuation over the real state of a prompt (the
    drafts a greedy verify accepts). The reference's routing is replayed into the packed forward
    (``probe_check``), so near-tie flips are counted, not mistaken for packing errors."""
    random_inputs = example_inputs(model, 2, specs["verify"].tokens, 5, seed=seed)
    own_inputs = greedy_inputs(model, 2, specs["verify"].tokens, 6, seed=seed + 1)
    return _check_one(model, specs, random_inputs).merge(_check_one(model, specs, own_inputs))


def _check_one(model: ZayaForCausalLM, specs: dict[str, EntrySpec], inputs: tuple[torch.Tensor, ...]) -> Comparison:
    step = specs["step"]
    layout = step.packed
    K1, M, L = layout.block_len + 1, model.config.mask_token_id, model.config.num_hidden_layers
    block, mask, pk, pv, valid, conv, rho = inputs  # block [B, K1]: the verify segment [a, d_1..d_K]
    B = block.shape[0]
    ids = torch.cat([block, torch.full((B, step.tokens - K1), M, dtype=block.dtype)], 1)
    step_mask = torch.cat([mask, torch.ones(B, step.tokens - K1, dtype=mask.dtype)], 1)

    def reference() -> list[torch.Tensor]:
        """verify over the block, then a draft of K+1 masks after committing a, d_1..d_λ for each level."""
        verify_out = Entry(model, specs["verify"])(block, mask, pk, pv, valid, conv, rho)
        logits, new_k, new_v, conv_rows, omega = verify_out
        rows = [logits]
        for lam in layout.levels:
            n = lam + 1  # the anchor and λ_p drafts are committed
            window = committed_window(conv_rows, omega, torch.full((B,), n), rho)
            past = Past(torch.cat([pk, new_k[..., :n, :]], 3), torch.cat([pv, new_v[..., :n, :]], 3),
                        torch.cat([valid, mask[:, :n]], 1), *window)
            masks = torch.full_like(block, M)
            rows.append(Entry(model, specs["draft"])(masks, torch.ones_like(mask), past.k, past.v, past.valid,
                                                     past.conv, past.rho)[0])
        return [torch.cat(rows, 1), new_k, new_v, conv_rows, omega]

    def packed() -> list[torch.Tensor]:
        logits, new_k, new_v, conv_rows, omega = Entry(model, step)(ids, step_mask, pk, pv, valid, conv, rho)
        kappa = conv.shape[-1]  # the verify segment's state rows are the AR rows
        return [logits, new_k[..., :K1, :], new_v[..., :K1, :], conv_rows[..., : kappa + K1], omega[:, :, :K1]]

    ref = record(reference)
    segments = 1 + len(layout.levels)  # the tape holds L verify calls, then L calls per draft
    forced_routes = [stack_routes([ref.routes[s * L + layer] for s in range(segments)], B) for layer in range(L)]
    return replay(packed, forced=[r.choice for r in forced_routes], reference_routes=forced_routes,
                  want=ref.outputs, names=[Name.LOGITS, *UPDATE])
