"""``zaya-export validate``: numerical parity of an artifact's backend with the source model.

Per entry point, on random inputs of several shapes (T=1, empty cache, batch > 1, left padding, chunked
continuation): max abs / max rel error, KL divergence and top-1 agreement of the logits, max abs error of
every state output; then greedy-sequence equality over several prompts. Tolerances are keyed by dtype. The
report (json + markdown) is written into the artifact and summarised in its manifest; any failed check
makes the command exit non-zero.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zaya_export.runtime.generate import generate
from zaya_export.runtime.sampling import SamplerConfig
from zaya_export.runtime.tidar import generate_tidar
from zaya_export.runtime.session import Session, artifact_model

from .eager_reference import EagerReference
from .quant_budget import budget_markdown, error_budget

from zaya_export.kernels.routing import RoutingTape, routing_tape
from zaya_export.models.upstream import skip_bias_layers

from zaya_export.runtime.artifact import REPORTS, Artifact
from zaya_export.runtime.manifest import EntryPoint
from zaya_export.models.checkpoint import load_checkpoint
from zaya_export.errors import ZayaError
from zaya_export.models.entries import example_feed
from zaya_export.models.io_table import Name


@dataclass(frozen=True)
class Tolerance:
    """Every error limit is relative to the scale of what is compared (its largest reference magnitude), so a
    checkpoint whose logits reach |z| ≈ 100 is held to the same standard as one whose logits stay near 1."""

    logits_rtol: float  # max |Δlogit| as a fraction of the check's largest reference |logit|
    state_rtol: float  # per state output, as a fraction of its largest reference value
    kl: float  # floor of the KL limit; the limit also admits what the logit limit admits, ½·(rtol·scale)²
    top1: float  # top-1 agreement over rows without a near tie at the top (gap within the logit limit)
    greedy_exact: bool  # greedy sequences equal, up to a divergence at a near tie (explained, reported)
    tie: float = 1e-4  # routing margin below which a backend may route the other way (probe_check)


TOLERANCES = {
    # fp32: backends use other kernels (fused MatMul/Add, MLAS blocking): ~2e-4 of the scale is seen on models
    # with |logits| ≈ 90; a wrong op moves rows by O(1) of it.
    "fp32": Tolerance(logits_rtol=2e-3, state_rtol=2e-3, kl=1e-6, top1=1.0, greedy_exact=True),
    # narrow weights: a rounded weight can flip a near-tied top-1 routing choice, which moves that token's
    # hidden state a lot; the distribution metrics (KL, top-1) are the gate.
    "fp16": Tolerance(logits_rtol=5e-2, state_rtol=1e-1, kl=1e-2, top1=0.95, greedy_exact=False, tie=1e-2),
    "bf16": Tolerance(logits_rtol=1e-1, state_rtol=2.5e-1, kl=3e-2, top1=0.9, greedy_exact=False, tie=4e-2),
    # a quantized artifact against its own (dequantized) weights: MatMulNBits' fast path also rounds the
    # activations to int8 per group, which moves logits by ~1% of their scale (measured on the demo); a wrong
    # code layout or scale moves them by O(1) of it. Its distance from the unquantized model is the error
    # budget (quant_budget), not this.
    "quant": Tolerance(logits_rtol=5e-2, state_rtol=1e-1, kl=5e-3, top1=0.95, greedy_exact=False, tie=1e-2),
}
# (batch, new tokens, cached slots): T=1, empty cache, batch > 1 with padding, continuation after a cache.
# Entries with a fixed T (decode, verify, draft) use their own T.
SHAPES = [(1, 1, 0), (1, 13, 0), (3, 17, 0), (2, 9, 12), (3, 1, 25)]
MAX_FLIP_TRIES = 8  # near-tie routing decisions tried, one at a time, to explain a mismatch


def entry_shapes(tokens: int | None, max_batch: int) -> list[tuple[int, int, int]]:
    """The (batch, new tokens, cached slots) an entry is checked at: :data:`SHAPES` with a fixed-length entry's
    own T, and batches capped at the artifact's ``max_batch`` (the cache and length cases stay)."""
    return sorted(dict.fromkeys((min(B, max_batch), tokens or T, S) for B, T, S in SHAPES))


def logit_metrics(test: np.ndarray, ref: np.ndarray, tol: Tolerance | None = None) -> dict[str, float]:
    """max abs / max rel error (relative to the largest reference |logit|), mean and max KL(ref ‖ test) and
    top-1 agreement of ``[N, V]`` logits; rows whose reference top-2 gap is within the logit limit are near
    ties, counted apart and left out of the top-1 rate. Non-finite values make every error infinite."""
    t, r = test.astype(np.float64), ref.astype(np.float64)
    scale = float(np.abs(r).max()) if r.size else 0.0
    if not (np.isfinite(t).all() and np.isfinite(r).all()):
        inf = float("inf")
        return {"max_abs": inf, "max_rel": inf, "scale": scale, "kl_mean": inf, "kl_max": inf, "top1": 0.0,
                "near_ties": 0}
    diff = np.abs(t - r)
    log_r = r - np.logaddexp.reduce(r, -1, keepdims=True)
    log_t = t - np.logaddexp.reduce(t, -1, keepdims=True)
    kl = (np.exp(log_r) * (log_r - log_t)).sum(-1)
    limit = (tol.logits_rtol if tol else 0.0) * scale
    top2 = np.sort(r, -1)[..., -2:] if r.shape[-1] > 1 else np.concatenate([r, r], -1)
    tie = (top2[..., 1] - top2[..., 0]) <= limit
    agree = t.argmax(-1) == r.argmax(-1)
    return {"max_abs": float(diff.max()), "max_rel": float(diff.max() / scale) if scale else float(diff.max()),
            "scale": scale, "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1": float(agree[~tie].mean()) if (~tie).any() else 1.0, "near_ties": int(tie.sum())}


def _logits_ok(m: dict[str, float], tol: Tolerance) -> bool:
    kl_limit = max(tol.kl, 0.5 * (tol.logits_rtol * m["scale"]) ** 2)
    return m["max_rel"] <= tol.logits_rtol and m["kl_max"] <= kl_limit and m["top1"] >= tol.top1


def _state_error(got: dict[str, np.ndarray], want: dict[str, np.ndarray], names: list[str]) -> float:
    """Worst state error, each output relative to its own scale (infinite for non-finite values)."""
    worst = 0.0
    for n in names:
        a, b = got[n].astype(np.float64), want[n].astype(np.float64)
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            return float("inf")
        if a.size:
            scale = float(np.abs(b).max())
            err = float(np.abs(a - b).max())
            worst = max(worst, err / scale if scale else err)
    return worst


def _entry_ok(got: dict[str, np.ndarray], want: dict[str, np.ndarray], rows, tol: Tolerance  # noqa: ANN001
              ) -> tuple[bool, dict[str, float], float]:
    m = logit_metrics(got[Name.LOGITS][rows], want[Name.LOGITS][rows], tol)
    state = _state_error(got, want, [n for n in got if n != Name.LOGITS])
    return _logits_ok(m, tol) and state <= tol.state_rtol, m, state


def _explain_by_flip(ref: EagerReference, entry: str, inputs: dict[str, np.ndarray], got: dict[str, np.ndarray],
                     rows, tol: Tolerance) -> dict[str, Any] | None:  # noqa: ANN001
    """A backend and the eager model may route a near-tie token to different experts, which moves that row by
    far more than rounding. Re-run the eager model with one near-tie decision flipped to its runner-up (the
    decisions before it replayed, those after it free); if that reproduces the backend, the mismatch is
    explained: return where the flip was."""
    with routing_tape(RoutingTape("record")) as tape:  # taped runs bypass the memo: forced decisions differ
        ref.backend.run(entry, inputs)
    ties = sorted(((float(r.margin[t]), call, t) for call, r in enumerate(tape.routes)
                   for t in (r.margin <= tol.tie).nonzero().flatten().tolist()))[:MAX_FLIP_TRIES]
    for margin, call, t in ties:
        forced = [r.choice.clone() for r in tape.routes]
        forced[call][t] = tape.routes[call].runner_up[t]
        with routing_tape(RoutingTape("replay", forced, limit=call + 1)):
            want = ref.backend.run(entry, inputs)
        if _entry_ok(got, want, rows, tol)[0]:
            return {"moe_call": call, "token": t, "margin": margin,
                    "expert": int(tape.routes[call].runner_up[t]), "instead_of": int(tape.routes[call].choice[t])}
    return None


def _accept_inputs(artifact: Artifact, info: EntryPoint, B: int, seed: int) -> dict[str, np.ndarray]:
    """Extra inputs of the in-graph TiDAR steps: row b lacks its last b drafts; random draft logits and
    uniforms; sampling at temperature 0.9, top-k 50, top-p 0.95, w 0.5 (so warping and mixing are exercised)."""
    names = set(info.input_names)
    if Name.DRAFT_VALID not in names:  # not an in-graph step (every entry of an AR artifact)
        return {}
    K, V = artifact.manifest.tidar.block_len, artifact.config.vocab_size
    rng = np.random.default_rng(seed)
    extra = {Name.DRAFT_VALID: np.arange(K)[None].repeat(B, 0) < K - np.arange(B)[:, None],
             Name.DRAFT_LOGITS: rng.standard_normal((B, K, V)).astype(np.float32),
             Name.UNIFORMS: rng.random((B, K + 1)).astype(np.float32),
             Name.SAMPLER: np.array([0.9, 50, 0.95, 0.5], np.float32)}
    return {k: v for k, v in extra.items() if k in names}


def eager_reference(artifact: Artifact, checkpoint: Path | None = None) -> EagerReference:
    """The eager side of ``validate`` for ``artifact`` (on ``checkpoint``'s weights when given; a quantized
    artifact's always on its own), to share between the backends checked in one run."""
    tidar = artifact.manifest.tidar
    return EagerReference(_reference_model(artifact, None if artifact.manifest.scheme else checkpoint),
                          tidar.block_len if tidar else None, tidar.levels if tidar else None)


def _reference_model(artifact: Artifact, checkpoint: Path | None):  # noqa: ANN202
    """The eager model in the artifact's compute dtype: on the artifact's own (stored) weights, or on the
    source checkpoint's."""
    compute = artifact.manifest.compute_dtype
    if checkpoint is None:
        return artifact_model(artifact, compute)
    return load_checkpoint(checkpoint, dtype=compute)


def hf_model(model, attn_implementation: str | None = None, as_upstream_loads: bool = False):  # noqa: ANN001, ANN201
    """Upstream transformers' ZayaForCausalLM holding ``model``'s weights (needs the ``test`` extra).

    ``as_upstream_loads``: also do what upstream 5.23's ``from_pretrained`` does to a checkpoint, reset every
    router's skip-class balancing bias to -1.0; otherwise the stored (fp32) biases are kept, as this tool does."""
    try:
        import transformers
    except ImportError:
        raise ZayaError("--reference hf needs transformers==5.23.0 (pip install 'zaya-export[test]')") from None
    fields = {k: v for k, v in model.config.to_dict().items()
              if k not in ("architectures", "model_type", "mask_token_id", "diffusion_block_len", "dtype")}
    config = transformers.ZayaConfig(**fields)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    hf = transformers.ZayaForCausalLM(config).to(model.dtype).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    if missing or unexpected:
        raise ZayaError(f"upstream model does not take these weights: missing {missing}, unexpected {unexpected}")
    for ours, theirs in zip(model.model.layers, hf.model.layers):  # keep the fp32 routing biases
        theirs.mlp.gate.balancing_biases.copy_(ours.mlp.gate.balancing_biases)
        if as_upstream_loads:
            theirs.mlp.gate.balancing_biases[-1] = -1.0
    return hf


def _hf_logits(hf, ids: torch.Tensor, mask: torch.Tensor, all_rows: bool) -> np.ndarray:  # noqa: ANN001
    """Logits of the upstream model (last position, or every row), with generate()'s positions for padding."""
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = hf(ids, attention_mask=mask.long(), position_ids=pos).logits.float().numpy()
    return logits if all_rows else logits[:, -1]


def validate_artifact(artifact: Artifact, backend: str = "ort", checkpoint: Path | None = None,
                      reference: str = "eager", prompts: list[list[int]] | None = None,
                      max_new_tokens: int = 16, device: str = "auto",
                      eager: EagerReference | None = None) -> dict[str, Any]:
    """One backend of ``artifact`` against the eager model. ``eager``: the reference runs to share with the
    other backends of the same ``validate`` (built from ``checkpoint`` when not given; pass one built by
    :func:`eager_reference` with the same ``checkpoint``)."""
    # Against its own weights an artifact must match at its compute precision; against the source checkpoint
    # the rounding of the stored weights counts too. A quantized artifact is checked against its own
    # (dequantized) weights, and against the source through its error budget.
    scheme = artifact.manifest.scheme
    dtype = artifact.manifest.dtype if checkpoint is not None else artifact.manifest.compute_dtype
    if scheme is not None:
        dtype = "quant" if scheme.accuracy_level else artifact.manifest.compute_dtype
    tol = TOLERANCES[dtype]
    ref = eager or eager_reference(artifact, checkpoint)
    ref_model = ref.model
    session = Session.from_artifact(artifact, backend, device=device)
    hf = hf_model(ref_model) if reference == "hf" else None
    skip = skip_bias_layers(ref_model) if hf is not None else []
    hf_loaded = hf_model(ref_model, as_upstream_loads=True) if skip else None
    quirk = {"layers": [{"layer": i, "stored": v} for i, v in skip], "max_abs_vs_stored": 0.0,
             "max_abs_vs_as_loaded": 0.0, "top1_vs_as_loaded": 1.0} if skip else None
    checks: list[dict[str, Any]] = []
    for entry, info in artifact.entry_points.items():
        if info.debug or not session.has(entry):  # diagnostics (validate --bisect), or not in this format
            continue
        shapes = entry_shapes(info.tokens, artifact.manifest.max_batch)
        for B, T, S in shapes:
            inputs = example_feed(ref_model, B, T, S, seed=B * 7 + T + S)
            inputs.update(_accept_inputs(artifact, info, B, seed=B + T + S))
            got = session.run(entry, inputs)
            want = ref.run(entry, inputs)
            shape = {"batch": B, "new": T, "cached": S}
            if Name.LOGITS not in got:  # in-graph TiDAR step
                checks.append({"entry": entry, "shape": shape, **_step_check(ref, entry, inputs, got, want, tol)})
                continue
            upstream = hf is not None and S == 0 and entry in ("prefill", "decode", "verify")  # causal only
            rows = inputs[Name.INPUT_MASK] if got[Name.LOGITS].ndim == 3 else slice(None)  # every-row logits: real rows
            if upstream:
                ids, mask = torch.from_numpy(inputs[Name.INPUT_IDS]), torch.from_numpy(inputs[Name.INPUT_MASK])
                every_row = want[Name.LOGITS].ndim == 3
                want = {**want, Name.LOGITS: _hf_logits(hf, ids, mask, every_row)}
                if hf_loaded is not None:
                    _note_quirk(quirk, got[Name.LOGITS][rows], want[Name.LOGITS][rows],
                                _hf_logits(hf_loaded, ids, mask, every_row)[rows])
            ok, m, state = _entry_ok(got, want, rows, tol)
            flip = None
            if not ok and not upstream:
                flip = _explain_by_flip(ref, entry, inputs, got, rows, tol)
                ok = flip is not None
            checks.append({"entry": entry, "shape": shape, **m, "state_max_rel": state, "routing_flip": flip,
                           "ok": bool(ok)})
    prompts = prompts or _default_prompts(artifact, ref_model.config.vocab_size)
    stop = ref_model.config.eos_token_ids
    greedy = []
    for p in prompts:
        got = generate(session, [p], max_new_tokens, stop).tokens[0]
        want = ref.greedy(p, max_new_tokens, stop)
        same = sum(1 for a, b in zip(got, want) if a == b) if len(got) == len(want) else 0
        tie = None if got == want else _near_tie_divergence(ref_model, p, got, want, tol)
        # a divergence at a near tie is a correct greedy decode on every path; a lossy one (quantized, fp16) may
        # also differ at a few positions without one
        ok = got == want or tie is not None or (not tol.greedy_exact and same / max(len(want), 1) >= tol.top1)
        greedy.append({"prompt_len": len(p), "tokens": got, "reference": want, "equal": got == want,
                       "near_tie": tie, "ok": bool(ok)})
    tidar = _tidar_checks(session, ref, prompts, max_new_tokens, tol) if session.has("verify") else []
    budget = None
    if scheme is not None:
        budget = error_budget(session, quant_source(artifact, checkpoint), scheme, artifact.tokenizer, prompts)
    report = {"backend": backend, "reference": reference, "dtype": dtype, "tolerance": asdict(tol),
              "checkpoint": str(checkpoint) if checkpoint else None, "entries": checks, "greedy": greedy,
              "tidar": tidar, "upstream_skip_bias_reset": quirk, "quant_budget": budget,
              "ok": all(c["ok"] for c in checks + greedy + tidar) and (budget is None or budget["ok"])}
    return report


def quant_source(artifact: Artifact, checkpoint: Path | None):  # noqa: ANN201 - ZayaForCausalLM
    """The unquantized model a quantized artifact's budget is measured against: ``checkpoint``, or the
    checkpoint the artifact was exported from when it is still where the manifest says."""
    path = checkpoint or Path(artifact.manifest.source)
    if not (path / "config.json").is_file():
        raise ZayaError(f"{artifact.root} is quantized ({artifact.manifest.scheme.name}): its error budget is measured "
                        f"against the unquantized checkpoint, which is not at {path}; pass --checkpoint")
    return load_checkpoint(path, dtype=artifact.manifest.compute_dtype)


def _note_quirk(quirk: dict[str, Any], got: np.ndarray, stored: np.ndarray, as_loaded: np.ndarray) -> None:
    """Accumulate how the artifact compares with upstream as it really loads the checkpoint (skip biases reset
    to -1.0) next to upstream with the stored biases, which is what the parity verdict uses."""
    quirk["max_abs_vs_stored"] = max(quirk["max_abs_vs_stored"], float(np.abs(got - stored).max()))
    quirk["max_abs_vs_as_loaded"] = max(quirk["max_abs_vs_as_loaded"], float(np.abs(got - as_loaded).max()))
    top1 = float((got.argmax(-1) == as_loaded.argmax(-1)).mean())
    quirk["top1_vs_as_loaded"] = min(quirk["top1_vs_as_loaded"], top1)


def _step_check(ref: EagerReference, entry: str, inputs: dict[str, np.ndarray], got: dict[str, np.ndarray],
                want: dict[str, np.ndarray], tol: Tolerance) -> dict[str, Any]:
    """In-graph TiDAR step: its integer decisions must equal the eager model's, unless the packed forward's
    logits hold a near tie at the top of some row (then either decision is right; the states after two
    different decisions differ by design). States are compared relative to their scale."""
    exact = all(np.array_equal(got[n], want[n]) for n in got if got[n].dtype.kind in "iub")
    state = _state_error(got, want, [n for n in got if got[n].dtype.kind == "f"])
    agree = float(np.mean(got[Name.COUNT] == want[Name.COUNT]))  # rows that accepted as many drafts
    tie = False
    if not exact:
        logits = ref.run("step", inputs)[Name.LOGITS]  # the same packed forward, with every row's logits
        top2 = np.sort(logits, -1)[..., -2:]
        tie = bool(((top2[..., 1] - top2[..., 0]) <= tol.logits_rtol * np.abs(logits).max()).any())
    if tol.greedy_exact:
        ok = (exact and state <= tol.state_rtol) or tie
    else:  # narrow weights may flip a near-tie decision, after which the committed states differ by design
        ok = agree >= 0.5
    return {"max_abs": 0.0, "max_rel": 0.0, "kl_mean": 0.0, "kl_max": 0.0, "top1": agree, "state_max_rel": state,
            "near_ties": int(tie), "routing_flip": None, "ok": bool(ok)}


def _near_tie_divergence(model, prompt: list[int], got: list[int], want: list[int],  # noqa: ANN001
                         tol: Tolerance) -> dict[str, Any] | None:
    """Where two greedy sequences first differ, the reference's logits for the two tokens: if they are within
    the logit limit of each other, either continuation is a correct greedy decode (a near tie), so return
    where and by how much; None when the divergence is a real error."""
    i = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if i is None:  # one sequence is a prefix of the other: stopped at EOS in one only
        return None
    with torch.no_grad():
        z = model(torch.tensor([prompt + want[:i]]))[0, -1].float()
    gap = float(z[want[i]] - z[got[i]])
    if gap <= tol.logits_rtol * float(z.abs().max()):
        return {"position": i, "reference_token": want[i], "token": got[i], "logit_gap": gap}
    return None


def _tidar_checks(session: Session, ref: EagerReference, prompts: list[list[int]], max_new_tokens: int,
                  tol: Tolerance) -> list[dict[str, Any]]:
    """Greedy TiDAR == greedy AR (eager), and the same acceptance lengths as the eager model for seeded
    stochastic lossless sampling."""
    ref_model = ref.model
    stop = ref_model.config.eos_token_ids
    out = []
    for p in prompts:
        ar = ref.greedy(p, max_new_tokens, stop)
        for fused in (False, True):
            td = generate_tidar(session, [p], max_new_tokens, stop, fused=fused)
            cfg = SamplerConfig(temperature=1.0, seed=len(p))
            got = generate_tidar(session, [p], max_new_tokens, stop, cfg, fused=fused)
            want = ref.tidar(session.block_len, p, max_new_tokens, stop, cfg, fused)
            equal = td.tokens[0] == ar
            tie = None if equal else _near_tie_divergence(ref_model, p, td.tokens[0], ar, tol)
            greedy_ok = equal or tie is not None if tol.greedy_exact else True
            steps, same = _steps_until_divergence(got, want)
            out.append({"prompt_len": len(p), "mode": "tidar-fused" if fused else "tidar",
                        "greedy_equals_ar": equal, "near_tie": tie, "acceptance": got.acceptance,
                        "eager_acceptance": want.acceptance, "same_acceptance": same, "steps_compared": steps,
                        "ok": bool(greedy_ok and (same or not tol.greedy_exact))})
    return out


def _steps_until_divergence(got, want) -> tuple[int, bool]:  # noqa: ANN001 - TidarResult
    """Compare the per-step acceptance lengths ℓ of two seeded sampling runs up to (and including) the step
    whose sampled token first differs. Inverse-CDF draws over V probabilities summed in float32 by different
    runtimes can pick different near-zero-probability tokens at a boundary; after that the contexts differ and
    later steps are not comparable. Acceptance itself must agree on every compared step."""
    a, b = got.tokens[0], want.tokens[0]
    diverge = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    steps, emitted = 0, 0
    for ell in want.lengths[0]:
        steps += 1
        emitted += ell + 1
        if emitted > diverge:
            break
    return steps, got.lengths[0][:steps] == want.lengths[0][:steps]


def _default_prompts(artifact: Artifact, vocab: int) -> list[list[int]]:
    prompts = []
    if artifact.tokenizer is not None:
        from zaya_export.runtime.tokenizer import load_tokenizer

        tok = load_tokenizer(artifact.tokenizer)
        prompts += [tok.encode(t).ids for t in ("def main():", "import os\nimport sys\n", "class Tree:\n    def")]
    rng = np.random.default_rng(0)
    prompts += [rng.integers(5, vocab, n).tolist() for n in (1, 5, 33)]
    return prompts


def write_report(artifact: Artifact, report: dict[str, Any]) -> None:
    """report/validation-*.{json,md} inside the artifact (each written whole, then renamed), and a summary in
    the manifest (one atomic replace that keeps the file hashes as they were checked)."""
    folder = artifact.root / REPORTS
    folder.mkdir(exist_ok=True)
    name = f"validation-{report['backend']}-{report['reference']}"
    for path, text in ((folder / f"{name}.json", json.dumps(report, indent=2) + "\n"),
                       (folder / f"{name}.md", to_markdown(report))):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    summary = dict(artifact.manifest.validation or {})
    summary[name] = {"ok": report["ok"], "worst_logits_max_abs": max(c["max_abs"] for c in report["entries"]),
                     "worst_kl": max(c["kl_max"] for c in report["entries"]),
                     "min_top1": min(c["top1"] for c in report["entries"]),
                     "greedy_equal": sum(g["equal"] for g in report["greedy"]), "prompts": len(report["greedy"])}
    if report.get("quant_budget"):
        summary[name]["quant_budget"] = {k: report["quant_budget"][k] for k in ("kl_mean", "top1", "ppl_ratio", "ok")}
    artifact.record_validation(summary)


def to_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Validation: {report['backend']} vs {report['reference']} ({report['dtype']})", "",
             f"Result: **{'PASS' if report['ok'] else 'FAIL'}**", "",
             "Errors are relative to the largest reference value of each check (logits) or output (state).", "",
             "| entry | B | T | S | max abs | max rel | KL max | top-1 | near ties | state max rel | routing | ok |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in report["entries"]:
        s, flip = c["shape"], c.get("routing_flip")
        route = f"near-tie flip (call {flip['moe_call']}, margin {flip['margin']:.1e})" if flip else "same"
        lines.append(f"| {c['entry']} | {s['batch']} | {s['new']} | {s['cached']} | {c['max_abs']:.2e} | "
                     f"{c['max_rel']:.2e} | {c['kl_max']:.2e} | {c['top1']:.3f} | {c.get('near_ties', 0)} | "
                     f"{c['state_max_rel']:.2e} | {route} | {'✓' if c['ok'] else '✗'} |")
    lines += ["", "| prompt tokens | generated | equal to reference | ok |", "|---|---|---|---|"]
    lines += [f"| {g['prompt_len']} | {len(g['tokens'])} | {g['equal']}"
              f"{' (near tie at %d)' % g['near_tie']['position'] if g.get('near_tie') else ''} | "
              f"{'✓' if g['ok'] else '✗'} |" for g in report["greedy"]]
    if report.get("tidar"):
        lines += ["", "| mode | prompt tokens | greedy TiDAR == AR | acceptance (backend) | acceptance (eager) | ok |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {t['mode']} | {t['prompt_len']} | {t['greedy_equals_ar']} | {t['acceptance']} | "
                  f"{t['eager_acceptance']} | {'✓' if t['ok'] else '✗'} |" for t in report["tidar"]]
    if report.get("quant_budget"):
        lines += budget_markdown(report["quant_budget"])
    quirk = report.get("upstream_skip_bias_reset")
    if quirk:
        lines += ["", f"Upstream 5.23 resets the skip-class bias of {len(quirk['layers'])} router(s) to -1.0 on load "
                  "(this artifact uses the stored values). Against upstream with the stored biases: max abs "
                  f"{quirk['max_abs_vs_stored']:.2e}; against upstream as it loads the file: max abs "
                  f"{quirk['max_abs_vs_as_loaded']:.2e}, top-1 {quirk['top1_vs_as_loaded']:.3f}. The difference "
                  "between the two is explained by the reset, not counted against the artifact."]
    return "\n".join(lines) + "\n"


def cross_check(artifact: Artifact, backends: list[str], device: str = "auto",
                model: Any = None) -> list[dict[str, Any]]:
    """Backend ↔ backend (e.g. ORT ↔ IREE) on the same inputs: logits and state max abs per entry and shape.
    ``model`` only shapes the example inputs (its config and dtype): pass the one already loaded (e.g.
    :attr:`EagerReference.model`) rather than loading the artifact's weights again."""
    tol = TOLERANCES[artifact.manifest.compute_dtype]
    model = _reference_model(artifact, None) if model is None else model
    sessions = {b: Session.from_artifact(artifact, b, device=device) for b in backends}
    out = []
    for i, a in enumerate(backends):
        for b in backends[i + 1:]:
            for entry, info in artifact.entry_points.items():
                if info.debug or not (sessions[a].has(entry) and sessions[b].has(entry)):
                    continue
                B, T, S = min(2, artifact.manifest.max_batch), info.tokens or 9, 12
                inputs = example_feed(model, B, T, S, seed=T + S)
                inputs.update(_accept_inputs(artifact, info, B, seed=T + S))
                x, y = sessions[a].run(entry, inputs), sessions[b].run(entry, inputs)
                err = {n: float(np.abs(x[n].astype(np.float64) - y[n]).max()) for n in x}
                scale = {n: float(np.abs(x[n]).max()) if x[n].size else 0.0 for n in x}
                limit = {n: (tol.logits_rtol * scale[n] if n == Name.LOGITS else 0.0 if x[n].dtype.kind in "iub"
                             else tol.state_rtol * scale[n]) for n in x}
                out.append({"pair": f"{a}-{b}", "entry": entry, "max_abs": err,
                            "ok": all(err[n] <= limit[n] for n in err)})
    return out
