"""The reference model traces with torch.export: one program with dynamic T (new tokens) and S (cached slots)
serves prefill (S = 0), chunked prefill and decode (T = 1), with state as explicit inputs and outputs."""

from __future__ import annotations

import torch

from conftest import random_model, small_config
from zaya_export.models import Past, prefill


class Step(torch.nn.Module):
    """``model.step`` with flat tensor inputs/outputs, the shape export and lowering consume."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, mask, k, v, valid, conv, rho):
        logits, u = self.model.step(ids, Past(k, v, valid, conv, rho), mask)
        return logits, u.k, u.v, u.conv_rows, u.omega


def _inputs(model, B, T, S, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.bool)
    if S > 0:
        _, state = prefill(model, torch.randint(5, 1000, (B, S), generator=g))
        past = state.past()
    else:
        past = model.empty_past(B)
        if T > 3:
            mask[0, :2] = False  # left padding in row 0
    ids = torch.randint(5, 1000, (B, T), generator=g)
    return (ids, mask, past.k, past.v, past.valid, past.conv, past.rho)


def test_one_exported_program_serves_prefill_and_decode():
    model = random_model(small_config(), seed=2)
    T, S = torch.export.Dim("T", min=1, max=1024), torch.export.Dim("S", min=0, max=1024)
    dynamic = ({1: T}, {1: T}, {3: S}, {3: S}, {1: S}, None, None)
    with torch.no_grad():
        program = torch.export.export(Step(model), _inputs(model, 2, 7, 3, 0), dynamic_shapes=dynamic)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    data_dependent = {"aten.nonzero.default", "aten._local_scalar_dense.default", "aten.item.default",
                      "aten.masked_select.default", "aten.unique.default"}
    assert not targets & data_dependent
    run = program.module()
    for B, T_, S_ in [(2, 1, 0), (2, 13, 0), (2, 1, 20), (2, 5, 9), (2, 40, 0)]:
        inputs = _inputs(model, B, T_, S_, seed=T_ + S_)
        with torch.no_grad():
            got, ref = run(*inputs), Step(model)(*inputs)
        for a, b in zip(got, ref):
            assert a.shape == b.shape
            assert (a - b).abs().max().item() <= 1e-4, (B, T_, S_)  # dense (traced) vs sparse (eager) MoE
