"""The in-place state commits of the IREE module (``zaya_export.models.commit_entry``), run eagerly: they must leave the
buffers exactly as ``KVCache.commit`` does for any lengths, counts, padding and update form."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import random_model, small_config
from zaya_export.models.commit_entry import COMMIT_SPECS, commit_module, export_commit
from zaya_export.models.entries import Entry, base_entry_specs, example_inputs
from zaya_export.models.folded_entry import export_folded, folded_specs
from zaya_export.runtime.session import KVCache

CONFIG = small_config(num_hidden_layers=2, layer_types=["hybrid", "hybrid_sliding"], sliding_window=8)


def _update(rng: np.random.Generator, B: int, T: int, accepted: bool) -> dict[str, np.ndarray]:
    c = CONFIG
    L, nkv, d = c.num_hidden_layers, c.num_key_value_heads, c.head_dim
    out = {"new_k": rng.standard_normal((L, B, nkv, T, d)), "new_v": rng.standard_normal((L, B, nkv, T, d))}
    if accepted:
        out.update(conv_state_out=rng.standard_normal((L, B, c.conv_channels, c.conv_history)),
                   rho_state_out=rng.standard_normal((L, B, c.value_half)))
    else:
        out.update(conv_rows=rng.standard_normal((L, B, c.conv_channels, c.conv_history + T)),
                   omega=rng.standard_normal((L, B, T, c.value_half)))
    return {k: v.astype(np.float32) for k, v in out.items()}


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 3), steps=st.lists(st.tuples(st.integers(1, 6), st.booleans(), st.integers(0, 10 ** 6)),
                                           min_size=1, max_size=4), seed=st.integers(0, 1000))
def test_commit_entries_equal_host_commit(B, steps, seed):
    rng = np.random.default_rng(seed)
    capacity, slack = 30, 6
    ref = KVCache(CONFIG, B, capacity)
    ref.conv[:] = rng.standard_normal(ref.conv.shape)
    ref.rho[:] = rng.standard_normal(ref.rho.shape)
    buffers = KVCache(CONFIG, B, capacity + slack)  # what DeviceKVCache allocates
    buffers.conv[:], buffers.rho[:] = ref.conv, ref.rho
    state = [torch.from_numpy(a) for a in (buffers.k, buffers.v, buffers.valid, buffers.conv, buffers.rho)]
    for i, (T, accepted, pick) in enumerate(steps):
        counts = np.array([(pick >> (3 * b)) % (T + 1) for b in range(B)])  # 0..T per row, T included
        mask = rng.random((B, T)) > 0.3 if i == 0 else None  # left padding only on the first forward
        out = _update(rng, B, T, accepted)
        name = "commit_accepted" if accepted else "commit"
        new_valid = np.ones((B, T), bool) if mask is None else mask
        with torch.no_grad():
            commit_module(name)(*state, torch.from_numpy(ref.lengths.copy()), torch.from_numpy(counts),
                                torch.from_numpy(new_valid), *(torch.from_numpy(out[n]) for n in COMMIT_SPECS[name].update))
        ref.commit(out, counts=counts, mask=mask)
        k, v, valid, conv, rho = (t.numpy() for t in state)
        for b, n in enumerate(ref.lengths.tolist()):
            assert np.array_equal(k[:, b, :, :n], ref.k[:, b, :, :n]) and np.array_equal(v[:, b, :, :n], ref.v[:, b, :, :n])
        assert np.array_equal(valid[:, :capacity], ref.valid) and not valid[:, capacity:].any()
        assert np.array_equal(conv, ref.conv) and np.array_equal(rho, ref.rho)


def test_commit_programs_mutate_exactly_the_state():
    for name, spec in COMMIT_SPECS.items():
        program = export_commit(CONFIG, name)
        mutated = set(program.graph_signature.user_inputs_to_mutate.values())
        assert mutated == set(spec.mutates), (name, mutated)
        assert [s.arg.name for s in program.graph_signature.input_specs] == spec.inputs


def test_folded_programs_commit_then_run_the_forward():
    """``commit_then_<entry>`` (traced at a dynamic batch and at batch 1) mutates exactly the state and gives what
    the commit entry followed by the forward entry give, for a pending update of another length than the one
    it was traced with and a row that commits nothing."""
    model = random_model(CONFIG).eval()
    L, nkv, d = CONFIG.num_hidden_layers, CONFIG.num_key_value_heads, CONFIG.head_dim
    for name, spec in folded_specs(base_entry_specs(4)).items():
        for batch in (None, 1):
            program = export_folded(model, spec, batch).run_decompositions({})
            assert set(program.graph_signature.user_inputs_to_mutate.values()) == set(spec.mutates), name
            B, T = batch or 3, 5
            g = torch.Generator().manual_seed(B)
            forward = list(example_inputs(model, B, spec.forward.tokens, 12, seed=4))
            meta = [torch.arange(B) + 2, torch.tensor([5, 2, 0][:B]), torch.ones(B, T, dtype=torch.bool)]
            update = [torch.randn(L, B, nkv, T, d, generator=g), torch.randn(L, B, nkv, T, d, generator=g),
                      torch.randn(L, B, CONFIG.conv_channels, CONFIG.conv_history + T, generator=g),
                      torch.randn(L, B, T, CONFIG.value_half, generator=g)]
            got_state, want_state = [t.clone() for t in forward], [t.clone() for t in forward]
            with torch.no_grad():
                got = program.module()(*got_state, *meta, *update)
                commit_module("commit")(*want_state[2:], *meta, *update)
                want = Entry(model, spec.forward)(*want_state)
            assert all(torch.equal(a, b) for a, b in zip(got_state, want_state)), name
            assert len(got) == len(spec.outputs) == len(want)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, atol=1e-5 * max(1.0, float(b.abs().max())), rtol=0)
