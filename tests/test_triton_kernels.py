"""Each Triton kernel against its eager reference, run by Triton's CPU interpreter (``TRITON_INTERPRET=1``) on
small random shapes: T=1, an empty cache, batch > 1, left padding, segment boundaries (expert segments in the
grouped GEMM, the packed step's CCA segments), the skip class; fp32 and bf16.

Tolerances are relative to the scale of what is compared and keyed by dtype: fp32 1e-5 of the largest
reference value (accumulation order over ≤ 256 terms), bf16 4 units in the last place of it (the reference
rounds its intermediates to bf16 where the kernels keep fp32, and the interpreter truncates where a GPU
rounds to nearest)."""

from __future__ import annotations

import os
from types import SimpleNamespace

# Before triton is first imported: triton builds its own language helpers (tl.zeros, ...) as interpreted or
# compiled functions at import time, so the interpreter must be chosen first. Set for the whole process (no
# GPU in CI); the AOT compiler runs in a subprocess without it (kernels/aot.py).
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from conftest import small_config  # noqa: E402
from zaya_export.kernels import routing  # noqa: E402
from zaya_export.kernels.block_attention import block_attention_reference  # noqa: E402
from zaya_export.kernels.cca import cca_reference  # noqa: E402
from zaya_export.kernels.moe_top1 import moe_top1  # noqa: E402
from zaya_export.kernels.residual_norm import residual_rmsnorm_reference  # noqa: E402
from zaya_export.models.packed import packed_layout  # noqa: E402
from zaya_export.models.zaya import CCAAttention, RMSNorm, ResidualScaling, packed_allowed, rope_cos_sin  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]
REL = {torch.float32: 1e-5, torch.bfloat16: 4 * 2.0**-7}


@pytest.fixture(scope="module")
def tk() -> SimpleNamespace:
    """The kernel modules (imported on first use, as the runtime imports them)."""
    from zaya_export.kernels.triton_support import load

    return SimpleNamespace(moe=load("moe_top1"), attn=load("block_attention"), cca=load("cca"),
                           norm=load("residual_rmsnorm"))


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str, computed_in: torch.dtype | None = None) -> None:
    """``computed_in``: the dtype the values were rounded in, when it differs from the stored one."""
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape, got.dtype, want.dtype)
    scale = want.float().abs().max().item()
    err = (got.float() - want.float()).abs().max().item()
    assert err <= REL[computed_in or want.dtype] * max(scale, 1e-6), f"{what}: max error {err:.3g} at scale {scale:.3g}"


# --------------------------------------------------------------------------------------------------- MoE
def _moe_args(N: int, H: int, I: int, E: int, R: int, dtype: torch.dtype, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = r(N, H)
    if N > 2:
        x[1] = 0  # a padded row (the layer zeroes them before the MoE)
    args = [x, r(N, R), r(R, H) / H**0.5, r(R), r(R), r(R).abs() + 0.5, r(2 * R, R) / R**0.5, r(2 * R),
            r(R, 2 * R) / R**0.5, r(R), r(E + 1, R) / R**0.5]
    args = [a.to(dtype) for a in args] + [torch.zeros(E + 1)]  # balancing stays fp32
    return args + [(r(E, 2 * I, H) / H**0.5).to(dtype), (r(E, H, I) / I**0.5).to(dtype), 1e-5]


def _forced(N: int, E: int, seed: int) -> torch.Tensor:
    """Choices covering the skip class, an expert with no token and segments longer than one row tile."""
    g = torch.Generator().manual_seed(seed)
    choice = torch.randint(0, E - 1, (N,), generator=g)  # expert E-1 gets no token
    choice[: max(1, N // 4)] = E  # skip class
    return choice[torch.randperm(N, generator=g)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,grouped", [(1, None), (3, None), (40, None), (5, True)])
def test_moe_top1_kernel_matches_reference(tk, N: int, grouped, dtype: torch.dtype) -> None:
    """Decode GEMV (one token, batch of 3) and the grouped GEMM (40 tokens in 16-row tiles: segments start
    and end inside tiles), with the skip class and an unused expert forced by replaying the choices."""
    E = 4
    args = _moe_args(N, 48, 40, E, 32, dtype, seed=N)
    forced = _forced(N, E, seed=N)
    with routing.routing_tape(routing.RoutingTape("replay", [forced])):
        want_out, want_r = moe_top1(*args)
    with routing.routing_tape(routing.RoutingTape("replay", [forced])) as tape:
        got_out, got_r = tk.moe.moe_top1_triton(*args, grouped=grouped)
    assert len(tape.routes) == 1  # the kernel path routes through the shared top1 (tape-able)
    assert_close(got_r, want_r, "router state")
    assert_close(got_out, want_out, "moe out")
    assert torch.all(got_out[forced == E] == 0)  # the skip class contributes nothing


@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_top1_kernel_free_routing(tk, dtype: torch.dtype) -> None:
    """Unforced: the kernel path makes the reference's own routing decisions."""
    args = _moe_args(24, 64, 32, 4, 32, dtype, seed=7)
    for want, got in zip(moe_top1(*args), tk.moe.moe_top1_triton(*args)):
        assert_close(got, want, "moe (free routing)")


def test_expert_tiles_bound_the_grid(tk) -> None:
    """The tile table covers every routed token exactly once, inside the static grid bound."""
    choice = torch.tensor([2, 0, 4, 2, 2, 0, 1, 2, 4, 2])  # E = 4: expert 3 unused, two skip tokens
    order, tile_start, seg_start, counts = tk.moe.expert_tiles(choice, 4, block_m=2)
    assert counts.tolist() == [2, 1, 5, 0]
    assert torch.equal(choice[order.long()].sort().values, choice.sort().values)
    assert (tile_start[-1] + (counts[-1] + 1) // 2).item() <= -(-len(choice) // 2) + 4
    assert seg_start.tolist() == [0, 2, 3, 8]


# --------------------------------------------------------------------------------------------- attention
def _attn_inputs(B: int, S: int, T: int, n_kv: int, G: int, d: int, dtype: torch.dtype, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return [r(B, n_kv * G, T, d), r(B, n_kv, S, d), r(B, n_kv, S, d), r(B, n_kv, T, d), r(B, n_kv, T, d)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,S,T,causal,window,splits,pad", [
    (1, 0, 1, True, 0, None, 0),  # first decode step: empty cache
    (2, 37, 1, True, 0, 3, 5),  # decode, split-K over the cache, left padding in row 1
    (2, 70, 1, True, 16, 4, 3),  # decode with a sliding window
    (2, 0, 6, True, 0, None, 2),  # prefill with left padding: fully masked rows average all values
    (2, 9, 5, True, 0, None, 3),  # TiDAR verify rows after a cache
    (2, 9, 5, False, 4, None, 3),  # TiDAR draft block: bidirectional, with a window
])
def test_block_attention_kernel_matches_reference(tk, B, S, T, causal, window, splits, pad, dtype) -> None:
    q, pk, pv, k, v = _attn_inputs(B, S, T, 2, 2, 16, dtype, seed=S + T)
    past_valid = torch.ones(B, S, dtype=torch.bool)
    new_valid = torch.ones(B, T, dtype=torch.bool)
    if S:
        past_valid[-1, :pad] = False
    else:
        new_valid[-1, :pad] = False
    want = block_attention_reference(q, pk, pv, k, v, past_valid, new_valid, window, causal)
    got = tk.attn.block_attention_triton(q, pk, pv, k, v, past_valid, new_valid, window, causal, splits=splits)
    assert_close(got, want, "attention")


@pytest.mark.parametrize("dtype", DTYPES)
def test_block_attention_kernel_packed_template(tk, dtype: torch.dtype) -> None:
    """The packed TiDAR step (verify segment + 2 proposals): the kernel reads the static [N, N] template and
    equals the model's masked attention over ``packed_allowed``, window included."""
    layout = packed_layout(3, (0, 2), kappa=2)
    B, S, N, n_kv, G = 2, 11, layout.size, 2, 2
    q, pk, pv, k, v = _attn_inputs(B, S, N, n_kv, G, 16, dtype, seed=3)
    past_valid = torch.ones(B, S, dtype=torch.bool)
    past_valid[1, :4] = False
    for window in (0, 6):
        allowed, _ = packed_allowed(past_valid, layout, window or None)
        want = CCAAttention.attend(SimpleNamespace(G=G), q, k, v, pk, pv, SimpleNamespace(allowed=allowed))
        got = tk.attn.block_attention_triton(q, pk, pv, k, v, past_valid, torch.ones(B, N, dtype=torch.bool),
                                             window, template=layout.template, template_offsets=layout.offsets)
        assert_close(got, want, f"packed attention (window {window})")


# --------------------------------------------------------------------------------------------------- CCA
def _cca_inputs(B: int, T: int, dtype: torch.dtype, seed: int) -> list:
    n_kv, G, d, H, rot = 2, 2, 16, 32, 8
    g = torch.Generator().manual_seed(seed)
    n_q, C = n_kv * G, (n_kv * G + n_kv) * d
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    pos = torch.arange(T)[None].expand(B, T) + torch.arange(B)[:, None] * 5
    cos, sin = rope_cos_sin(pos, rot, 1000.0, torch.float32)
    args = [r(B, T, H), r(B, C, 2), r(B, n_kv * d // 2), cos, sin, r(n_q * d, H) / H**0.5, r(n_kv * d, H) / H**0.5,
            r(n_kv * d // 2, H), r(n_kv * d // 2, H), r(C, 1, 2), r(C), r(C, d, 2) / d**0.5, r(C),
            r(n_kv).abs() + 0.5]
    return [a.to(dtype) for a in args]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T", [(1, 1), (3, 1), (2, 5), (1, 20)])
def test_cca_kernel_matches_reference(tk, B: int, T: int, dtype: torch.dtype) -> None:
    """Decode (one row: the GEMV form), batch > 1, and row tiles of 16/32 with a partial last tile."""
    args = _cca_inputs(B, T, dtype, seed=B * 100 + T)
    for name, got, want in zip(["q", "k", "v", "conv_rows", "omega"], tk.cca.cca_triton(*args), cca_reference(*args)):
        assert_close(got, want, f"cca {name}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_cca_kernel_packed_segments(tk, dtype: torch.dtype) -> None:
    """The packed TiDAR step: each segment's conv reads its own history through the row table and its
    delayed value its own seed; compared with the model's own CCA projection (weights taken from it, as
    the fusion pass does)."""
    cfg = small_config()
    torch.manual_seed(0)
    attn = CCAAttention(cfg).to(dtype)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn_like(p) / max(1, p.shape[-1]) ** 0.5)
    layout = packed_layout(3, (0, 2), kappa=cfg.conv_history)
    B, N = 2, layout.size
    rot = cfg.rotary_dim("hybrid")
    x = torch.randn(B, N, cfg.hidden_size).to(dtype)
    conv = torch.randn(B, cfg.conv_channels, cfg.conv_history).to(dtype)
    rho = torch.randn(B, cfg.value_half).to(dtype)
    cos, sin = rope_cos_sin(7 + layout.offsets[None].expand(B, N), rot, 1e4, dtype)
    segs = layout.segments
    p = attn.qkv_proj
    with torch.no_grad():
        want = attn.project(x, conv, rho, cos, sin, segs)
        got = tk.cca.cca_triton(x, conv, rho, cos, sin, p.q_proj.weight, p.k_proj.weight,
                                p.v_proj_current.weight, p.v_proj_delayed.weight, p.conv_qk_depthwise.weight,
                                p.conv_qk_depthwise.bias, p.conv_qk_grouped.weight, p.conv_qk_grouped.bias,
                                attn.qk_norm.temp,
                                conv_index=segs.conv_index, value_index=segs.value_index)
    for name, g, w in zip(["q", "k", "v", "conv_rows", "omega"], got, want):
        assert_close(g, w, f"packed cca {name}")


# ------------------------------------------------------------------------------------- residual + RMSNorm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (2, 5)])
def test_residual_rmsnorm_kernel(tk, shape: tuple[int, int], dtype: torch.dtype) -> None:
    """The reference equals the model's two modules; the kernel equals the reference."""
    H = 48
    torch.manual_seed(sum(shape))
    scaling, norm = ResidualScaling(H), RMSNorm(H, 1e-5)
    with torch.no_grad():
        for prm in list(scaling.parameters()) + list(norm.parameters()):
            prm.copy_(torch.randn_like(prm))
    scaling, norm = scaling.to(dtype), norm.to(dtype)
    sub, res = torch.randn(*shape, H).to(dtype), torch.randn(*shape, H) * 4
    args = [sub, res, scaling.hidden_states_bias, scaling.hidden_states_scale, scaling.residual_bias,
            scaling.residual_scale, norm.weight, norm.eps]
    with torch.no_grad():
        h_model = scaling(sub, res)
        want = residual_rmsnorm_reference(*args)
        assert torch.equal(want[0], h_model) and torch.equal(want[1], norm(h_model.to(dtype)))
        got = tk.norm.residual_rmsnorm_triton(*args)
    assert_close(got[0], want[0], "residual", computed_in=dtype)  # fp32 sum of a bf16-rounded term
    assert_close(got[1], want[1], "normed")


# ------------------------------------------------------------------------------------------ the whole model
def test_model_with_triton_kernels_decodes_the_reference_tokens(tk) -> None:
    """The GPU path's model (fused ops run as Triton kernels, static-shape decode step) greedy-decodes the
    tokens of the eager reference loop: left padding, batch 2, both layer types (one with a sliding window)."""
    from conftest import random_model
    from zaya_export.runtime.generate import generate_greedy, left_pad
    from zaya_export.runtime.graph_decode import generate_static

    model = random_model(small_config(num_hidden_layers=2, layer_types=["hybrid", "hybrid_sliding"],
                                      sliding_window=4), seed=4)
    prompts = [[5, 9, 33, 7, 81], [2, 44]]
    want = generate_greedy(model, prompts, 4).tokens
    ids, mask = (torch.from_numpy(a) for a in left_pad(prompts, 0))
    got, _ = generate_static(model, ids, 4, mask.bool(), kernels_on=True, graph=False)
    assert got.tolist() == want


def test_device_check_parity_logic_on_the_cpu(tk) -> None:
    """The device check's parity part, at tiny shapes under the interpreter: every case runs and passes (so a
    failure on the GPU is the kernel's, not the check's)."""
    from zaya_export.gpu_check import parity

    report = parity(torch.device("cpu"), {"H": 64, "I": 32, "E": 4, "R": 32, "d": 16, "n_kv": 2, "G": 2, "rot": 8,
                                          "S": 40, "K": 3})
    assert len(report) == 9 and all(set(r) == {"float32", "bfloat16"} for r in report.values())
    failed = {case: r for case, r in report.items() for v in r.values()
              if not all(x.get("ok", False) for x in (v.values() if "ok" not in v else [v]))}
    assert not failed, failed


# ------------------------------------------------------------------- the model's Triton path, piece by piece
def _tiny(seed: int):  # noqa: ANN202
    """Two layers, both layer types (one with a sliding window), all parameters random."""
    from conftest import random_model

    return random_model(small_config(num_hidden_layers=2, layer_types=["hybrid", "hybrid_sliding"],
                                     sliding_window=4), seed=seed)


def _record_faces(monkeypatch) -> list[str]:
    """The names of the Triton faces the model and the fusion slots look up, in call order."""
    import zaya_export.models.zaya as zaya
    import zaya_export.passes.fusion as fusion
    from zaya_export.kernels.registry import triton_face

    calls: list[str] = []
    for module in (zaya, fusion):  # both bind the name at import
        monkeypatch.setattr(module, "triton_face", lambda name: calls.append(name) or triton_face(name))
    return calls


def test_packed_step_runs_the_triton_cca_and_attention(tk, monkeypatch) -> None:
    """Inside ``triton_faces()`` the packed TiDAR step's CCA and attention are the Triton kernels (with the
    segment tables and the [N, N] template), and its logits and state update equal the reference step's."""
    from zaya_export.kernels import triton_faces
    from zaya_export.models.decoding import prefill
    from zaya_export.passes.fusion import fused

    model = _tiny(seed=5)
    ids = torch.tensor([[5, 9, 33, 7, 81], [0, 0, 2, 44, 3]])
    _, state = prefill(model, ids, ids != 0, capacity=12)
    layout = packed_layout(2, (0, 1), kappa=model.config.conv_history)
    step_ids = torch.randint(1, model.config.vocab_size, (2, layout.size), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.step(step_ids, state.past(), layout=layout)
        calls = _record_faces(monkeypatch)
        with fused(model), triton_faces():
            got = model.step(step_ids, state.past(), layout=layout)
    assert calls.count("cca") == calls.count("block_attention") == 2, calls
    assert_close(got[0], want[0], "packed step logits")
    for name in ("k", "v", "conv_rows", "omega"):
        assert_close(getattr(got[1], name), getattr(want[1], name), f"packed step {name}")


def test_packed_step_outside_triton_is_the_reference(tk) -> None:
    """Fused but outside ``triton_faces()`` the packed step runs the reference regions: bit-identical."""
    from zaya_export.models.decoding import prefill
    from zaya_export.passes.fusion import fused

    model = _tiny(seed=6)
    _, state = prefill(model, torch.tensor([[5, 9, 33, 7]]), capacity=8)
    layout = packed_layout(2, (0, 2), kappa=model.config.conv_history)
    step_ids = torch.arange(1, layout.size + 1)[None]
    with torch.no_grad():
        want = model.step(step_ids, state.past(), layout=layout)
        with fused(model):
            got = model.step(step_ids, state.past(), layout=layout)
    assert torch.equal(got[0], want[0])
    assert all(torch.equal(getattr(got[1], n), getattr(want[1], n)) for n in ("k", "v", "conv_rows", "omega"))


def test_fused_tidar_with_triton_kernels_equals_greedy_ar(tk) -> None:
    """The GPU path's fused TiDAR (packed step with every fused op and the residual + norm pair in Triton)
    emits exactly greedy AR's tokens: left padding, batch 2, rows finishing at different steps."""
    from zaya_export.runtime.generate import generate_greedy, left_pad
    from zaya_export.runtime.graph_tidar import generate_tidar_static

    model = _tiny(seed=2)
    prompts = [[5, 9, 33, 7, 81], [2, 44]]
    want = generate_greedy(model, prompts, 4).tokens
    ids, mask = (torch.from_numpy(a) for a in left_pad(prompts, 0))
    got = generate_tidar_static(model, ids, 4, mask.bool(), kernels_on=True, graph=False, block_len=2,
                                levels=(0, 2))
    assert got.tokens == want


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_residual_norm_runs_in_triton(tk, monkeypatch, dtype: torch.dtype) -> None:
    """Inside ``triton_faces()`` (no fusion scope: only the residual + RMSNorm pairs change) each residual
    scaling and the norm that reads it (post-attention; post-MoE with the next layer's input norm or the final
    norm) are one Triton kernel; the logits stay within dtype tolerance of the modules' and (fp32) the greedy
    tokens are the same. Outside the block the layer runs its modules."""
    from zaya_export.kernels import triton_faces
    from zaya_export.runtime.generate import generate_greedy

    model = _tiny(seed=3).to(dtype)
    ids = torch.tensor([[5, 9, 33, 7, 81, 4], [2, 44, 8, 1, 3, 60]])
    calls = _record_faces(monkeypatch)
    with torch.no_grad():
        want = model(ids)
        assert not calls
        with triton_faces():
            got = model(ids)
            assert calls == ["residual_rmsnorm"] * 4  # per layer: after attention; after the MoE + next norm
            tokens = generate_greedy(model, [[5, 9, 33], [2, 44]], 3).tokens if dtype == torch.float32 else None
    assert_close(got.float(), want.float(), "logits with the fused residual + norm", computed_in=dtype)
    assert tokens is None or tokens == generate_greedy(model, [[5, 9, 33], [2, 44]], 3).tokens
