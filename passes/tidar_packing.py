"""``pack_tidar_step``: pack the two TiDAR forwards (``verify`` + ``draft``) into the single-forward ``step``.

The program this pass rewrites is the export plan (model + entry points). It adds the packed ``step`` entry
(verify segment + one proposal per acceptance level, ``models/packed.py``) and ``step_greedy`` (the same forward
with greedy acceptance, commit and next-draft selection in-graph). It is the one place where the packing is
decided, and it proves what packing must preserve before anything is traced (``tidar-decoding.md`` §4.3):

* the verify rows equal the ``verify`` entry's rows (AR rows), and
* proposal p's rows equal a ``draft`` of K+1 masks after committing the anchor and λ_p drafts,

on a random state with a cache, so the per-segment CCA seeding and the attention template are checked on the
model being exported, not only in the unit tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from zaya_export.models import Past, ZayaForCausalLM
from zaya_export.models.packed import packed_layout
from zaya_export.tracing import Entry, EntrySpec, example_inputs, packed_entry_specs

from .base import Pass, PassError


@dataclass
class ExportPlan:
    """What ``export`` will trace: the (fused) model and its entry points by name."""

    model: ZayaForCausalLM
    specs: dict[str, EntrySpec] = field(default_factory=dict)


class PackTidarStep(Pass[ExportPlan]):
    name = "pack_tidar_step"

    def __init__(self, block_len: int, levels: tuple[int, ...], atol: float = 1e-4) -> None:
        self.block_len, self.levels, self.atol = block_len, tuple(levels), atol

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
        worst = packing_error(plan.model, plan.specs)
        if worst > self.atol:
            raise PassError(f"{self.name}: the packed step differs from verify/draft by {worst:.3g} > {self.atol:g}")


def packing_error(model: ZayaForCausalLM, specs: dict[str, EntrySpec], seed: int = 0) -> float:
    """Max abs difference between the packed step's rows and the verify / per-level draft rows they stand for."""
    step = specs["step"]
    layout = step.packed
    K1, M = layout.block_len + 1, model.config.mask_token_id
    ids, mask, pk, pv, valid, conv, rho = example_inputs(model, 2, step.tokens, 5, seed=seed)
    ids = ids.clone()
    ids[:, K1:] = M
    with torch.no_grad():
        packed = Entry(model, step)(ids, mask, pk, pv, valid, conv, rho)[0]  # [B, N, V]
        verify_out = Entry(model, specs["verify"])(ids[:, :K1], mask[:, :K1], pk, pv, valid, conv, rho)
        worst = float((packed[:, :K1] - verify_out[0]).abs().max())
        _, new_k, new_v, conv_rows, omega = verify_out
        kappa = conv.shape[-1]
        for p, lam in enumerate(layout.levels, 1):
            n = lam + 1  # the anchor and λ_p drafts are committed
            past = Past(torch.cat([pk, new_k[..., :n, :]], 3), torch.cat([pv, new_v[..., :n, :]], 3),
                        torch.cat([valid, torch.ones_like(valid[:, :1]).expand(-1, n)], 1),
                        conv_rows[..., n : n + kappa], omega[:, :, n - 1])
            masks = torch.full_like(ids[:, :K1], M)
            draft = Entry(model, specs["draft"])(masks, mask[:, :K1], past.k, past.v, past.valid, past.conv,
                                                 past.rho)[0]
            worst = max(worst, float((packed[:, K1 * p : K1 * (p + 1)] - draft).abs().max()))
    return worst
