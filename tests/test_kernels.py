"""Each fused zaya.* op: the ONNX function body (run by onnxruntime) against the eager reference, and the
eager reference against the model region it replaces, on random shapes including T=1, an empty cache,
batch > 1, left padding and sliding windows."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from zaya_export.runtime.backends import ort_session
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zaya_export.kernels as kernels
from conftest import random_model, small_config
from zaya_export.kernels.registry import DOMAIN

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run_onnx_op(torch_op, args: list, n_out: int) -> list[np.ndarray]:
    """Wrap one torch custom op call in a module, export it to ONNX with the zaya translation, run in ORT."""

    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    extra = [a for a in args if not isinstance(a, torch.Tensor)]

    class Bound(torch.nn.Module):
        def forward(self, *xs):
            return torch_op(*xs, *extra)

    program = torch.export.export(Bound(), tuple(tensors))
    onnx_program = torch.onnx.export(program, dynamo=True, custom_translation_table=kernels.translation_table(),
                                     opset_version=20, optimize=False, verbose=False)
    model = onnx_program.model
    for proto in kernels.function_protos():
        fn = ir.serde.deserialize_function(proto)
        model.functions[fn.identifier()] = fn
    model.opset_imports.setdefault(DOMAIN, 1)
    proto = ir.serde.serialize_model(model)
    assert any(n.domain == DOMAIN for n in proto.graph.node)
    onnx.checker.check_model(proto, full_check=True)
    session = ort_session(proto.SerializeToString())
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: t.numpy() for n, t in zip(names, tensors)})


def _cca_args(B, T, n_kv, G, d, H, rot, seed):
    g = torch.Generator().manual_seed(seed)
    n_q, C = n_kv * G, (n_kv * G + n_kv) * d
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    pos = torch.arange(T)[None].expand(B, T).float() + 3
    inv = 1.0 / (1000 ** (torch.arange(0, rot, 2).float() / rot))
    emb = torch.cat([pos[..., None] * inv] * 2, -1)
    return [r(B, T, H), r(B, C, 2), r(B, n_kv * d // 2), emb.cos(), emb.sin(), r(n_q * d, H) / H**0.5,
            r(n_kv * d, H) / H**0.5, r(n_kv * d // 2, H), r(n_kv * d // 2, H), r(C, 1, 2), r(C), r(C, d, 2) / d**0.5,
            r(C), r(n_kv).abs() + 0.5]


@SETTINGS
@given(B=st.integers(1, 3), T=st.sampled_from([1, 2, 7]), n_kv=st.sampled_from([1, 2]), G=st.sampled_from([1, 4]),
       d=st.sampled_from([8, 16]), full_rot=st.booleans(), seed=st.integers(0, 99))
def test_cca_onnx_body_matches_reference(B, T, n_kv, G, d, full_rot, seed):
    args = _cca_args(B, T, n_kv, G, d, H=24, rot=d if full_rot else d // 2, seed=seed)
    want = torch.ops.zaya.cca(*args)
    got = run_onnx_op(torch.ops.zaya.cca, args, 5)
    for a, b in zip(got, want):
        assert a.shape == tuple(b.shape)
        assert np.abs(a - b.numpy()).max() <= 2e-5


@SETTINGS
@given(B=st.integers(1, 3), T=st.sampled_from([1, 3, 9]), S=st.sampled_from([0, 1, 6]), n_kv=st.sampled_from([1, 2]),
       G=st.sampled_from([1, 2]), window=st.sampled_from([0, 1, 4]), pad=st.booleans(), seed=st.integers(0, 99))
def test_block_attention_onnx_body_matches_reference(B, T, S, n_kv, G, window, pad, seed):
    g = torch.Generator().manual_seed(seed)
    d = 8
    q = torch.randn(B, n_kv * G, T, d, generator=g)
    past_k, past_v = torch.randn(B, n_kv, S, d, generator=g), torch.randn(B, n_kv, S, d, generator=g)
    k, v = torch.randn(B, n_kv, T, d, generator=g), torch.randn(B, n_kv, T, d, generator=g)
    past_valid = torch.ones(B, S, dtype=torch.bool)
    new_valid = torch.ones(B, T, dtype=torch.bool)
    if pad:  # left padding in row 0, either in the cache or in the new tokens
        (past_valid if S else new_valid)[0, :1] = False
    args = [q, past_k, past_v, k, v, past_valid, new_valid, window]
    want = torch.ops.zaya.block_attention(*args)
    (got,) = run_onnx_op(torch.ops.zaya.block_attention, args, 1)
    assert np.isfinite(got).all()
    assert np.abs(got - want.numpy()).max() <= 2e-5


@SETTINGS
@given(N=st.sampled_from([1, 2, 9, 17]), E=st.sampled_from([1, 3, 5]), route=st.sampled_from(["free", "skip", "one"]),
       seed=st.integers(0, 99))
def test_moe_top1_onnx_body_matches_reference(N, E, route, seed):
    """Both dispatches of the ONNX body (gathered for one token, grouped by expert for many) against the
    reference, with tokens spread over the experts, all on the skip class, or all on one expert (the others'
    groups empty)."""
    g = torch.Generator().manual_seed(seed)
    H, R, I = 12, 8, 10
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    balancing = torch.zeros(E + 1)
    if route != "free":  # +10 makes that class win for every token
        balancing[-1 if route == "skip" else E // 2] = 10.0
    skip = route == "skip"
    args = [r(N, H), r(N, R), r(R, H) / 3, r(R), r(R), r(R).abs() + 0.5, r(R, R) / 3, r(R), r(R, R) / 3, r(R),
            r(E + 1, R), balancing, r(E, 2 * I, H) / 3, r(E, H, I) / 3, 1e-5]
    want = torch.ops.zaya.moe_top1(*args)
    got = run_onnx_op(torch.ops.zaya.moe_top1, args, 2)
    for a, b in zip(got, want):
        assert np.abs(a - b.numpy()).max() <= 2e-5 * max(1.0, float(b.abs().max()))
    if skip:
        assert (want[0] == 0).all() and (got[0] == 0).all()  # no expert runs for the skip class


def test_reference_ops_equal_the_model_regions():
    """Each fusion pass swaps a region for its op; the whole model's outputs (every entry, the packed step
    included) stay within fp32 rounding."""
    from zaya_export.passes.fusion import fused, fusion_pipeline
    from zaya_export.models.entries import Entry, accept_inputs, entry_specs, example_inputs

    model = random_model(small_config(), seed=4)
    specs = entry_specs(3).values()
    cases = [(spec, example_inputs(model, B, spec.tokens or T, S, seed=i)
              + (accept_inputs(spec, B, model.config.vocab_size, seed=i) if spec.accept else ()))
             for spec in specs for i, (B, T, S) in enumerate([(1, 1, 0), (2, 9, 0), (3, 1, 6)])]

    def probe(m):
        with torch.no_grad():
            return [t for spec, inputs in cases for t in Entry(m, spec)(*inputs)]

    with fused(model, fusion_pipeline(), probe=probe) as log:
        pass
    assert [(r.name, r.rewrites) for r in log] == [("fuse_cca", 2), ("fuse_attention", 2), ("fuse_moe", 2)]
    assert log[0].max_abs_diff == 0.0  # same arithmetic, different summation order only in attention
    assert all(r.max_rel_diff <= 1e-5 and r.routing_flips == 0 for r in log)


@SETTINGS
@given(scale=st.sampled_from([1.0, 100.0]), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       density=st.sampled_from([0.0, 0.1, 0.5, 1.0]), seed=st.integers(0, 99))
def test_mask_scores_is_the_exact_mask_without_denormals(scale, dtype, density, seed):
    """kernels.masking against the dtype-minimum fill it replaces: the same probabilities to fp32 rounding at
    logit scale 1 and ~100 (rows spread far past MASK_DEPTH), fully masked rows uniform, and no denormal
    probability (each one cost a microcode assist in onnxruntime's softmax)."""
    from zaya_export.kernels.masking import mask_scores

    g = torch.Generator().manual_seed(seed)
    scores = (torch.randn(2, 3, 5, 40, generator=g) * scale).to(dtype)
    allowed = torch.rand(2, 1, 5, 40, generator=g) < density
    allowed[0, 0, 1] = False  # a fully masked row (left padding)
    exact = torch.softmax(scores.masked_fill(~allowed, torch.finfo(dtype).min), -1, dtype=torch.float32)
    probs = torch.softmax(mask_scores(scores, allowed), -1)
    assert probs.dtype == torch.float32 and torch.isfinite(probs).all()
    assert (probs - exact).abs().max() <= 1e-6
    assert torch.allclose(probs[0, :, 1], torch.full_like(probs[0, :, 1], 1 / 40))
    assert ((probs == 0) | (probs >= torch.finfo(torch.float32).tiny)).all()
