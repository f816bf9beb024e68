"""The device check (``scripts/gpu_check.sh``): on one GPU, in a few minutes, with only torch and Triton,
print one JSON object with

* ``parity``: every Triton kernel against its eager reference on random inputs of the ``small`` preset's
  geometry (max abs error, error relative to the reference's scale, pass/fail), fp32 and bf16;
* ``greedy``: the GPU path (Triton kernels, one CUDA/HIP graph per decode step, AR and fused greedy TiDAR)
  against the model's eager decode loop on the ``small`` preset, token for token (fp32, so a kernel's
  rounding cannot flip a tie); lossless TiDAR must equal AR;
* ``speed``: decode tok/s of eager torch AR (reference ops), and of AR and fused TiDAR on Triton kernels +
  graphs, bf16, same GPU (two-forward TiDAR has no GPU path; the random-weight preset's drafter is rarely
  accepted, so TiDAR's tokens per step are reported with it);
* ``bandwidth``: achieved memory bandwidth of the decode MoE (GEMV over the chosen experts' weights) and of
  split-K decode attention (over the KV cache) at the 8B's shapes, as a fraction of the device's peak.

Bad arguments give one ``error: ...`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

PARTS = ("parity", "greedy", "speed", "bandwidth")
# Peak memory bandwidth (GB/s) by device name; --peak-gbps overrides, unknown devices report no fraction.
PEAK_GBPS = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100": 2039.0, "MI325X": 6000.0,
             "MI300X": 5300.0, "MI250X": 3277.0, "L40S": 864.0}
REL_TOL = {"float32": 2e-4, "bfloat16": 4 * 2.0**-7}  # relative to the reference's largest value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, as the CLI does
        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(2)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = _Parser(prog="gpu_check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["auto", "cuda", "hip"], default="auto")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated: {', '.join(PARTS)}")
    p.add_argument("--preset", default="small", help="model preset for greedy and speed (tiny, small)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--peak-gbps", type=float, default=None, help="device peak memory bandwidth (default: by name)")
    p.add_argument("--out", default=None, help="also write the JSON object to this file")
    args = p.parse_args(argv)
    parts = [s for s in args.parts.split(",") if s]
    bad = sorted(set(parts) - set(PARTS))
    if bad or not parts:
        p.error(f"--parts: unknown {', '.join(bad) or repr(args.parts)}; choose from {', '.join(PARTS)}")
    if args.preset not in ("tiny", "small"):
        p.error(f"--preset must be tiny or small (the 8b preset does not fit this check), got {args.preset!r}")
    for name in ("prompt_len", "new_tokens", "batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    args.parts = parts
    return args


# ------------------------------------------------------------------------------------------------ parity
def _rel(got, want) -> dict:  # noqa: ANN001
    scale = float(want.float().abs().max())
    err = float((got.float() - want.float()).abs().max())
    rel = err / max(scale, 1e-6)
    return {"max_abs": err, "rel": rel, "ok": bool(rel <= REL_TOL[str(want.dtype).split(".")[-1]])}


SMALL = {"H": 1024, "I": 1024, "E": 16, "R": 256, "d": 128, "n_kv": 2, "G": 4, "rot": 64, "S": 2000, "K": 16}


def parity(device, dims: dict | None = None) -> dict:  # noqa: ANN001
    """Every kernel against its reference, by default at the small preset's geometry (``SMALL``: d=128,
    rot 64, 8 q / 2 kv heads, H=1024, 16 experts), decode and multi-token shapes, fp32 and bf16."""
    import torch

    from zaya_export.kernels import routing
    from zaya_export.kernels.block_attention import block_attention_reference
    from zaya_export.kernels.cca import cca_reference
    from zaya_export.kernels.moe_top1 import moe_top1
    from zaya_export.kernels.residual_norm import residual_rmsnorm_reference
    from zaya_export.kernels.triton_support import load
    from zaya_export.models.packed import packed_layout

    moe, attn, cca, norm = (load(n) for n in ("moe_top1", "block_attention", "cca", "residual_rmsnorm"))
    out: dict[str, dict] = {}
    g = torch.Generator(device="cpu").manual_seed(0)

    def r(*shape, dtype=torch.float32, scale=1.0):  # noqa: ANN002, ANN003, ANN202
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    dims = SMALL | (dims or {})
    H, I, E, R, d, n_kv, G, rot, S, K = (dims[k] for k in ("H", "I", "E", "R", "d", "n_kv", "G", "rot", "S", "K"))
    for dt in (torch.float32, torch.bfloat16):
        name = str(dt).split(".")[-1]

        def moe_case(N: int) -> dict:
            args = [r(N, H, dtype=dt), r(N, R, dtype=dt), r(R, H, dtype=dt, scale=H**-0.5), r(R, dtype=dt),
                    r(R, dtype=dt).abs() + 0.5, r(R, dtype=dt).abs() + 0.5, r(2 * R, R, dtype=dt, scale=R**-0.5),
                    r(2 * R, dtype=dt), r(R, 2 * R, dtype=dt, scale=R**-0.5), r(R, dtype=dt),
                    r(E + 1, R, dtype=dt, scale=R**-0.5), torch.zeros(E + 1, device=device),
                    r(E, 2 * I, H, dtype=dt, scale=H**-0.5), r(E, H, I, dtype=dt, scale=I**-0.5), 1e-5]
            forced = torch.randint(0, E + 1, (N,), generator=g).to(device)
            forced[0] = E  # the skip class
            with routing.routing_tape(routing.RoutingTape("replay", [forced])):
                want = moe_top1(*args)[0]
            with routing.routing_tape(routing.RoutingTape("replay", [forced])):
                got = moe.moe_top1_triton(*args)[0]
            return _rel(got, want)

        def attn_case(B: int, S: int, T: int, causal: bool = True, template=None, offsets=None) -> dict:  # noqa: ANN001
            q, pk, pv, k, v = (r(B, n_kv * G, T, d, dtype=dt), r(B, n_kv, S, d, dtype=dt), r(B, n_kv, S, d, dtype=dt),
                               r(B, n_kv, T, d, dtype=dt), r(B, n_kv, T, d, dtype=dt))
            pvalid = torch.ones(B, S, dtype=torch.bool, device=device)
            pvalid[-1, : S // 3] = False  # left padding in the last row
            nvalid = torch.ones(B, T, dtype=torch.bool, device=device)
            got = attn.block_attention_triton(q, pk, pv, k, v, pvalid, nvalid, 0, causal, template=template,
                                              template_offsets=offsets)
            if template is None:
                want = block_attention_reference(q, pk, pv, k, v, pvalid, nvalid, 0, causal)
            else:  # the packed step's predicate, materialised for the reference
                allowed = torch.cat([pvalid[:, None, :].expand(B, T, S), template.to(device)[None].expand(B, T, T)], -1)
                keys, vals = torch.cat([pk, k], 2)[:, :, None], torch.cat([pv, v], 2)[:, :, None]
                s = (q.view(B, n_kv, G, T, d) @ keys.transpose(-1, -2)) * d**-0.5
                s = s.masked_fill(~allowed[:, None, None], torch.finfo(s.dtype).min)
                p = torch.softmax(s, -1, dtype=torch.float32).to(dt)
                want = (p @ vals).view(B, n_kv * G, T, d).transpose(1, 2).reshape(B, T, -1)
            return _rel(got, want)

        def cca_case(B: int, T: int, segments=None) -> dict:  # noqa: ANN001
            C = (n_kv * G + n_kv) * d
            pos = torch.arange(T, device=device)[None].expand(B, T).float() + 5
            inv = 1.0 / (1e4 ** (torch.arange(0, rot, 2, device=device).float() / rot))
            emb = torch.cat([pos[..., None] * inv] * 2, -1)
            args = [r(B, T, H, dtype=dt), r(B, C, 2, dtype=dt), r(B, n_kv * d // 2, dtype=dt), emb.cos().to(dt),
                    emb.sin().to(dt), r(n_kv * G * d, H, dtype=dt, scale=H**-0.5),
                    r(n_kv * d, H, dtype=dt, scale=H**-0.5),
                    r(n_kv * d // 2, H, dtype=dt, scale=H**-0.5), r(n_kv * d // 2, H, dtype=dt, scale=H**-0.5),
                    r(C, 1, 2, dtype=dt), r(C, dtype=dt), r(C, d, 2, dtype=dt, scale=d**-0.5), r(C, dtype=dt),
                    r(n_kv, dtype=dt).abs() + 0.5]
            got = cca.cca_triton(*args)
            want = cca_reference(*args)
            return {"q": _rel(got[0], want[0]), "k": _rel(got[1], want[1])}

        def norm_case(N: int) -> dict:
            args = [r(N, H, dtype=dt), r(N, H, scale=4.0)] + [r(H, dtype=dt) for _ in range(5)] + [1e-5]
            got, want = norm.residual_rmsnorm_triton(*args), residual_rmsnorm_reference(*args)
            return {"residual": _rel(got[0], want[0].to(dt)), "normed": _rel(got[1], want[1])}

        layout = packed_layout(K, (0, K // 3, K), kappa=2)
        cases: dict[str, Callable[[], dict]] = {
            "moe_decode": lambda: moe_case(4), "moe_grouped": lambda: moe_case(S // 6),
            "attention_decode": lambda: attn_case(4, S, 1), "attention_verify": lambda: attn_case(2, S // 6, K + 1),
            "attention_draft": lambda: attn_case(2, S // 6, K + 1, causal=False),
            "attention_step": lambda: attn_case(2, S // 6, layout.size, template=layout.template,
                                                offsets=layout.offsets),
            "cca_decode": lambda: cca_case(4, 1), "cca_rows": lambda: cca_case(2, 4 * (K + 1)),
            "residual_rmsnorm": lambda: norm_case(8),
        }
        for case, fn in cases.items():
            try:
                out.setdefault(case, {})[name] = fn()
            except Exception as exc:  # noqa: BLE001 - one failing kernel must not hide the others
                out.setdefault(case, {})[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    return out


def _all_ok(tree) -> bool:  # noqa: ANN001
    if isinstance(tree, dict):
        return tree.get("ok", True) is not False and all(_all_ok(v) for v in tree.values() if isinstance(v, dict))
    return True


# ------------------------------------------------------------------------------------------ greedy, speed
def _model(preset: str, dtype, device, seed: int = 0):  # noqa: ANN001, ANN202
    import torch

    from zaya_export.models import ZayaForCausalLM, init_weights
    from zaya_export.models.presets import preset as make

    torch.manual_seed(seed)
    model = ZayaForCausalLM(make(preset))  # initialised on the CPU (seeded), then moved
    init_weights(model, seed)
    return model.to(device=device, dtype=dtype).eval()


def _eager_tokens(model, ids, n: int):  # noqa: ANN001, ANN202 - the model's own decode loop (reference ops)
    import torch

    from zaya_export.models.decoding import decode, prefill

    logits, state = prefill(model, ids, None, capacity=ids.shape[1] + n)
    out = []
    for _ in range(n):
        out.append(logits.argmax(-1))
        if len(out) < n:
            logits = decode(model, out[-1], state)
    return torch.stack(out, 1)


def greedy(args, device) -> dict:  # noqa: ANN001
    import torch

    from zaya_export.runtime.graph_decode import generate_static
    from zaya_export.runtime.graph_tidar import generate_tidar_static

    model = _model(args.preset, torch.float32, device)
    ids = torch.randint(5, model.config.vocab_size, (2, args.prompt_len), device=device)
    want = _eager_tokens(model, ids, args.new_tokens)
    got, _ = generate_static(model, ids, args.new_tokens, kernels_on=True, graph=True)
    same = (got == want).all(0)
    first = int((~same).nonzero()[0]) if not bool(same.all()) else None
    tidar = generate_tidar_static(model, ids, args.new_tokens, kernels_on=True, graph=True)
    tidar_equal = tidar.tokens == want.tolist()
    return {"preset": args.preset, "dtype": "float32", "tokens": args.new_tokens, "rows": 2,
            "equal": first is None and tidar_equal, "ar_equal": first is None, "first_difference": first,
            "tidar_fused_equal": tidar_equal, "tidar_steps": tidar.steps}


def speed(args, device) -> dict:  # noqa: ANN001
    import torch

    from zaya_export.runtime.graph_decode import generate_static
    from zaya_export.runtime.graph_tidar import generate_tidar_static

    model = _model(args.preset, torch.bfloat16, device)
    ids = torch.randint(5, model.config.vocab_size, (args.batch, args.prompt_len), device=device)

    def eager() -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        _eager_tokens(model, ids, args.new_tokens)
        torch.cuda.synchronize()
        return args.new_tokens / (time.perf_counter() - start)

    eager()  # warm-up
    runs = {"eager": eager()}
    # (the reference ops cannot be captured: the eager MoE asks the host which experts were hit)
    generate_static(model, ids, 4, kernels_on=True, graph=True)  # Triton compiles once
    runs["triton_graph"] = generate_static(model, ids, args.new_tokens, kernels_on=True, graph=True)[1]
    generate_tidar_static(model, ids, 4, kernels_on=True, graph=True)
    tidar = generate_tidar_static(model, ids, args.new_tokens, kernels_on=True, graph=True)
    decode_s = tidar.seconds - tidar.first_token_seconds
    runs["tidar_fused_triton_graph"] = (args.new_tokens - 1) / decode_s if decode_s > 0 else 0.0
    return {"preset": args.preset, "dtype": "bfloat16", "batch": args.batch, "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "tok_per_s": runs,
            "speedup_vs_eager_ar": {k: v / runs["eager"] for k, v in runs.items()},
            "tidar_tokens_per_step": (args.new_tokens - 1) / max(tidar.steps, 1), "tidar_steps": tidar.steps}


# --------------------------------------------------------------------------------------------- bandwidth
def _time_ms(fn: Callable[[], object], iters: int = 50) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def peak_gbps(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key in sorted(PEAK_GBPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key.lower() in name.lower():
            return PEAK_GBPS[key]
    return None


def bandwidth(args, device) -> dict:  # noqa: ANN001
    """Bytes each decode kernel must read (the chosen experts' weights; the valid KV cache) over its time."""
    import torch

    from zaya_export.kernels.triton_support import load

    moe, attn = load("moe_top1"), load("block_attention")
    peak = peak_gbps(torch.cuda.get_device_name(device), args.peak_gbps)
    bf16 = torch.bfloat16
    H, I, E, B = 2048, 2048, 16, 4  # the 8B's expert shape, 4 tokens on 4 different experts
    x = torch.randn(B, H, device=device, dtype=bf16)
    gate_up = torch.randn(E, 2 * I, H, device=device, dtype=bf16) * H**-0.5
    down = torch.randn(E, H, I, device=device, dtype=bf16) * I**-0.5
    choice = torch.arange(B, device=device)
    weight = torch.ones(B, device=device, dtype=bf16)
    ms = _time_ms(lambda: moe.expert_swiglu(x, choice, weight, gate_up, down, grouped=False))
    moe_bytes = B * 3 * I * H * 2
    S, n_kv, G, d = 32768, 2, 4, 128
    q = torch.randn(1, n_kv * G, 1, d, device=device, dtype=bf16)
    pk, pv = (torch.randn(1, n_kv, S, d, device=device, dtype=bf16) for _ in range(2))
    k, v = (torch.randn(1, n_kv, 1, d, device=device, dtype=bf16) for _ in range(2))
    pvalid = torch.ones(1, S, dtype=torch.bool, device=device)
    nvalid = torch.ones(1, 1, dtype=torch.bool, device=device)
    attn_ms = _time_ms(lambda: attn.block_attention_triton(q, pk, pv, k, v, pvalid, nvalid, 0))
    attn_bytes = 2 * n_kv * S * d * 2

    def row(nbytes: int, t: float) -> dict:
        gbps = nbytes / (t * 1e-3) / 1e9
        return {"bytes": nbytes, "ms": t, "gbps": gbps, "fraction_of_peak": gbps / peak if peak else None}

    return {"peak_gbps": peak, "moe_decode_gemv": row(moe_bytes, ms) | {"tokens": B, "hidden": H, "intermediate": I},
            "attention_decode_splitk": row(attn_bytes, attn_ms) | {"cache_slots": S}}


# ------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None, stand_ins: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    start = time.perf_counter()
    if not torch.cuda.is_available():
        sys.stderr.write(f"error: no GPU visible to torch {torch.__version__}\n")
        return 2
    built = "hip" if torch.version.hip else "cuda"
    if args.device not in ("auto", built):
        sys.stderr.write(f"error: --device {args.device}: this torch is a {built} build\n")
        return 2
    try:
        import triton
    except ImportError as exc:
        sys.stderr.write(f"error: the kernels need triton (>= 3.6): {exc}\n")
        return 2

    device = torch.device("cuda")
    report: dict = {"device": torch.cuda.get_device_name(device), "backend": built,
                    "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                                 "triton": triton.__version__}, "stand_ins": stand_ins or []}
    steps = {"parity": lambda: parity(device), "greedy": lambda: greedy(args, device),
             "speed": lambda: speed(args, device), "bandwidth": lambda: bandwidth(args, device)}
    for part in args.parts:
        t0 = time.perf_counter()
        try:
            report[part] = steps[part]()
        except Exception as exc:  # noqa: BLE001 - report and go on to the next part
            report[part] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
        report.setdefault("part_seconds", {})[part] = round(time.perf_counter() - t0, 2)
    report["ok"] = _all_ok({k: report[k] for k in args.parts}) and report.get("greedy", {}).get("equal", True)
    report["seconds"] = round(time.perf_counter() - start, 2)
    text = json.dumps(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
