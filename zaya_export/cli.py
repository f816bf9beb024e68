"""The ``zaya-export`` command line: ``init`` writes a random-weight checkpoint, ``run`` generates text.

Every bad input surfaces as one ``error: ...`` line on stderr and exit code 2 (see :mod:`.errors`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import warnings
from pathlib import Path

import click

from zaya_export.errors import InputError, ZayaError

EXPORT_MAX_BATCH = 64  # models.io_table.MAX_BATCH, written out: importing it would load torch before every command


class Finite(click.FloatRange):
    """A float option within [min, max] that is a real number: NaN and ±Inf are refused (click's own range check
    lets NaN through, since every comparison with it is false)."""

    name = "finite float"

    def convert(self, value, param, ctx):  # noqa: ANN001, ANN201 - click signature
        rv = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(rv, param, ctx)


SEED = click.IntRange(0, 2**32 - 1)
BENCH_BACKENDS = ("ort", "iree", "iree-host", "torch")  # bench.BACKENDS, here so a typo fails before torch loads


class _Group(click.Group):
    """Turns :class:`ZayaError` (and warnings) into one-line messages instead of tracebacks."""

    def invoke(self, ctx: click.Context):  # noqa: ANN201 - click signature
        warnings.showwarning = lambda msg, *a, **k: click.echo(f"warning: {msg}", err=True)
        # torch.export's pytree deprecation notice (raised from torch's own code on every trace): not actionable
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # a bad option value: one line like every other error, with the fix
            name = f"{exc.ctx.command_path}: " if exc.ctx is not None and exc.ctx.command_path else ""
            click.echo(f"error: {name}{exc.format_message()} (see --help)", err=True)
            ctx.exit(2)
        except ZayaError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except OSError as exc:  # the system refused a file operation: name the file, not our stack
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"error: {where}{exc.strerror or exc}", err=True)
            ctx.exit(2)
        except MemoryError:
            click.echo("error: out of memory (the model or the request is too large for this machine)", err=True)
            ctx.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="zaya-export")
def main() -> None:
    """Export ZAYA1 checkpoints to deployable artifacts, run them, and validate parity."""


INIT_SHARD_BYTES = 2_500_000_000  # init's shard size: the 8B preset in bf16 becomes 8 files, the others one


@main.command()
@click.option("--preset", "preset_name", type=click.Choice(["tiny", "small", "8b"]), default="tiny",
              show_default=True, help="Model size.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="Stored weight dtype.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object describing what was written.")
@click.argument("out", type=click.Path(path_type=Path))
def init(preset_name: str, seed: int, dtype: str, force: bool, as_json: bool, out: Path) -> None:
    """Write a random-weight checkpoint in Hugging Face layout (with a small tokenizer) to OUT."""
    from .output_dir import check_replaceable

    check_replaceable(out, force, "checkpoint")  # before the heavy imports: a refused path fails at once
    import time
    import torch
    from zaya_export.models.checkpoint import DTYPES, save_streamed_checkpoint
    from zaya_export.models.safetensors_stream import eta_text
    from zaya_export.models.streaming import random_slots
    from .models import preset
    from zaya_export.runtime.tokenizer import build_tokenizer

    config = preset(preset_name)
    # one tensor at a time (the 8B preset is 18.8 GB in bf16): the values init_weights(model, seed) gives
    slots, produce = random_slots(config, seed, DTYPES[dtype])
    n_params = sum(torch.Size(s.shape).numel() for s in slots if not s.name.endswith("balancing_biases"))
    console = _stderr()
    tokenizer = build_tokenizer(min(config.vocab_size, 4096))
    with console.status(f"writing {out} ({preset_name}, {n_params / 1e6:.1f}M params)") as status:
        start = time.perf_counter()
        save_streamed_checkpoint(
            config, out, slots, produce, tokenizer_json=tokenizer.to_str(), overwrite=force,
            max_shard_bytes=INIT_SHARD_BYTES,
            progress=lambda done, total: status.update(f"writing {out}: {eta_text(done, total, start)}"))
    if as_json:
        click.echo(json.dumps({"path": str(out), "preset": preset_name, "params": n_params, "dtype": dtype,
                               "seed": seed}))
    else:
        console.print(f"wrote {out} ({preset_name}, {n_params / 1e6:.1f}M params, {dtype})")


@main.command("train-demo")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--steps", type=click.IntRange(min=1), default=2400, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--max-minutes", type=Finite(min=0), default=0.0, show_default=True,
              help="Stop early after this long (0 = run every step); the card records the steps run.")
@click.option("--stop-after", type=click.IntRange(min=0), default=0,
              help="Run only the first N steps of the --steps schedule (replays a run cut by --max-minutes).")
@click.option("--stage", type=click.Choice(["all", "scratch", "distill", "card"]), default="all", show_default=True,
              help="scratch: stage 1 only (TiDAR objective on the corpus); distill: stage 2 only, on a trained OUT "
                   "(self-distilled drafter, resumable per round); card: only re-measure OUT and rewrite its card.")
@click.option("--distill-rounds", type=click.IntRange(min=1), default=None,
              help="On-policy self-distillation rounds of stage 2 (default: the recipe's, in self_distill.py).")
@click.option("--teacher", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Stage 2: hold the AR rows to this checkpoint (e.g. the stage-1 model) instead of the model the "
                   "pass starts from.")
@click.option("--kl-weight", type=Finite(min=0), default=None,
              help="Stage 2: weight of the AR rows' KL to the teacher (default: the recipe's).")
@click.option("--gamma", type=Finite(min=0, max=1), default=None,
              help="Stage 2: weight γ^k of draft position k in the draft loss (default: the recipe's).")
@click.option("--real-rows", type=click.IntRange(min=0, max=15), default=None,
              help="Stage 2: rows of each 16-row batch trained on real corpus windows with the stage-1 loss (the "
                   "rest are distilled; default: the recipe's).")
@click.option("--grow-layers", type=click.IntRange(min=1, max=64), default=None,
              help="Stage 2: first append this many layers to the model the pass starts from (silent at first, so it "
                   "computes what it did; grow_demo.py).")
@click.option("--threads", type=click.IntRange(min=1, max=256), default=None,
              help="Stage 2: torch threads (default: the recipe's); changes only the speed and the floating-point "
                   "summation order.")
def train_demo(out: Path, steps: int, seed: int, max_minutes: float, stop_after: int, stage: str,
               distill_rounds: int | None, teacher: Path | None, kl_weight: float | None,
               real_rows: int | None, gamma: float | None, grow_layers: int | None,
               threads: int | None) -> None:
    """Train the demo checkpoint (small ZAYA1, stdlib source, CPU) into OUT: stage 1 from scratch with the TiDAR
    objective, stage 2 self-distills its drafter on its own generations; then measure it on held-out files and
    code from outside the corpus, and write its model card."""
    from .demo_card import measure, write_card
    from .self_distill import DistillSettings, distill_checkpoint
    from .train_demo import TrainSettings, train

    console = _stderr()
    if stage in ("all", "scratch"):
        train(out, TrainSettings(seed=seed, steps=steps, max_minutes=max_minutes, stop_after=stop_after),
              log=console.print)
    if not (out / "train_log.json").is_file():
        raise InputError(f"{out}: no train_log.json (train it first: --stage scratch)")
    if stage in ("all", "distill"):
        try:
            settings = DistillSettings(seed=seed)
            if distill_rounds is not None:
                settings = dataclasses.replace(settings, rounds=distill_rounds)
            if teacher is not None:
                settings = dataclasses.replace(settings, teacher=str(teacher.resolve()))
            if kl_weight is not None:
                settings = dataclasses.replace(settings, kl_weight=kl_weight)
            if threads is not None:
                settings = dataclasses.replace(settings, threads=threads)
            if gamma is not None:
                settings = dataclasses.replace(settings, gamma=gamma)
            if grow_layers:
                settings = dataclasses.replace(settings, grow_layers=grow_layers)
            if real_rows is not None:
                batch = settings.real_rows + settings.distilled_rows
                settings = dataclasses.replace(settings, real_rows=real_rows, distilled_rows=batch - real_rows)
            distill_checkpoint(out, settings, log=console.print)
        except ValueError as exc:
            raise InputError(str(exc)) from None
    with console.status("measuring on held-out prompts"):
        figures = measure(out)
    console.print(f"wrote {write_card(out, figures)}")
    click.echo(json.dumps(figures["modes"]))


def _stderr():  # noqa: ANN202
    from rich.console import Console

    return Console(stderr=True)


def _split(text: str) -> list[str]:
    """A comma-separated option value as its non-empty items."""
    return [item.strip() for item in text.split(",") if item.strip()]


def _parse_levels(text: str | None) -> tuple[int, ...] | str | None:
    if text is None or text.strip() == "auto":
        return None if text is None else "auto"
    return tuple(_parse_ints(text, "--levels must be comma-separated integers or auto"))


def _parse_block_len(text: str | None) -> int | str | None:
    if text is None or text.strip() == "auto":
        return None if text is None else "auto"
    values = _parse_ints(text, "--block-len must be an integer or auto")
    if len(values) != 1:
        raise InputError("--block-len must be one integer or auto")
    return values[0]


def _parse_ids(text: str) -> list[int]:
    return _parse_ints(text, "--prompt-ids must be comma-separated integers")


def _parse_ints(text: str, refusal: str) -> list[int]:
    """A comma-separated list of integers (spaces and empty items ignored); InputError(``refusal``) otherwise."""
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise InputError(f"{refusal}, got {text!r}") from None


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--prompt", help="Prompt text (needs tokenizer.json).")
@click.option("--prompt-ids", help="Prompt as comma-separated token ids, e.g. 2,17,301.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--device", default="auto", show_default=True,
              help="IREE device for --backend iree: local-task (CPU threads), local-sync (the calling thread), "
              "auto (local-sync for models under 64 MiB of weights, else local-task), hip (AMD GPU); for "
              "--backend torch: cuda or hip runs the Triton kernels on the GPU, one graph launch per decode step.")
@click.option("--backend", type=click.Choice(["ort", "iree", "torch"]), default=None,
              help="ort (artifacts; the default for them) or torch (eager; the default for checkpoints).")
@click.option("--mode", type=click.Choice(["auto", "ar", "tidar", "tidar-fused"]), default="auto", show_default=True,
              help="ar: one token per forward; tidar: verify K drafts and draft K more (two forwards per step); "
              "tidar-fused: one packed forward per step; auto: the one the cost model predicts fastest here "
              "(measured entry costs x the artifact's calibrated acceptance; ar without TiDAR entries).")
@click.option("--sampler", "sampler_name", type=click.Choice(["greedy", "lossless", "mix"]), default="lossless",
              show_default=True, help="TiDAR acceptance: greedy (argmax), lossless (rejection sampling; greedy "
              "at temperature 0), mix (logit mixing with --w, lossy below 1).")
@click.option("--w", "mix_w", type=Finite(0, 1), default=0.5, show_default=True,
              help="Weight of the AR logits under --sampler mix (1 = lossless).")
@click.option("--lookup/--no-lookup", default=True, show_default=True,
              help="TiDAR drafts: where the context repeats its last tokens, propose what followed them before "
              "instead of the drafter's tokens (lossless: only acceptance changes; off under --sampler mix).")
@click.option("--temperature", type=Finite(min=0), default=0.0, show_default=True,
              help="0 = greedy.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, help="Keep the k most likely tokens (0 = all).")
@click.option("--top-p", type=Finite(min=0, max=1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the sampling uniforms.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="Compute dtype of the torch backend (default: as stored).")
@click.option("--allow-version-mismatch", is_flag=True, help="Run an artifact built with other tool versions.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def run(source: Path, prompt: str | None, prompt_ids: str | None, max_new_tokens: int, device: str,
        backend: str | None,
        mode: str, sampler_name: str, mix_w: float, lookup: bool, temperature: float, top_k: int, top_p: float,
        seed: int, dtype: str | None, allow_version_mismatch: bool, as_json: bool) -> None:
    """Generate from SOURCE, an exported artifact or a checkpoint directory."""
    if (prompt is None) == (prompt_ids is None):
        raise InputError("give exactly one of --prompt or --prompt-ids")
    if mode == "ar" and sampler_name == "mix":
        raise InputError("--sampler mix needs --mode tidar")
    if mode == "auto" and not lookup:
        raise InputError("--no-lookup needs an explicit --mode: --mode auto predicts from the artifact's "
                         "calibration, measured with lookup drafts")
    parsed_ids = _parse_ids(prompt_ids) if prompt_ids is not None else None
    if parsed_ids is not None and (not parsed_ids or min(parsed_ids) < 0):
        raise InputError("the prompt is empty" if not parsed_ids
                         else f"token id {min(parsed_ids)} is out of range (ids are >= 0)")
    if not source.is_dir():
        raise InputError(f"{source}: not a checkpoint or artifact directory")
    from zaya_export.runtime.generate import generate
    from zaya_export.runtime.sampling import SamplerConfig
    from zaya_export.runtime.tidar import generate_tidar

    from .sources import kind, open_session

    is_artifact = kind(source) == "artifact"
    backend = backend or ("ort" if is_artifact else "torch")
    gpu = backend == "torch" and device in ("cuda", "hip")  # the GPU path: Triton kernels + CUDA/HIP graphs
    if gpu and (mode not in ("ar", "auto", "tidar-fused") or sampler_name == "mix" or temperature > 0):
        raise InputError(f"--backend torch --device {device} runs greedy decoding, AR or fused TiDAR (--mode "
                         "ar|tidar-fused, temperature 0); two-forward TiDAR and sampling run on the CPU devices")
    if gpu:
        from zaya_export.runtime.graph_decode import torch_device

        try:
            torch_device(device)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        mode = "ar" if mode == "auto" else mode
    with _stderr().status(f"opening {source} ({backend})"):
        options = {"device": device} if is_artifact and not gpu else {}
        session = open_session(source, backend, dtype=dtype, allow_version_mismatch=allow_version_mismatch,
                               **options)
    config, tokenizer = session.config, session.tokenizer
    if prompt is not None:
        if tokenizer is None:
            raise InputError(f"{source / 'tokenizer.json'}: missing, so --prompt cannot be tokenized (use --prompt-ids)")
        ids = tokenizer.encode(prompt).ids
    else:
        ids = parsed_ids
    if not ids:
        raise InputError("the prompt is empty")
    bad = [t for t in ids if not 0 <= t < config.vocab_size]
    if bad:
        raise InputError(f"token id {bad[0]} is out of range for a vocabulary of {config.vocab_size}")
    if len(ids) + max_new_tokens > config.max_position_embeddings:
        raise InputError(f"prompt of {len(ids)} tokens + {max_new_tokens} new tokens exceeds the context of "
                         f"{config.max_position_embeddings}")
    if mode not in ("ar", "auto") and session.artifact is not None and not session.has("step"):
        why = ("it was exported from an AR checkpoint, whose config names no mask token; re-export with "
               "--tidar on to add them" if session.artifact.manifest.tidar is None
               else "re-export it with this zaya-export")
        raise InputError(f"{source}: no TiDAR entry points for --mode {mode} ({why})")
    greedy = sampler_name == "greedy"
    sampler = SamplerConfig(temperature=0.0 if greedy else temperature, top_k=top_k, top_p=top_p, seed=seed)
    w = mix_w if sampler_name == "mix" else 1.0
    auto = None
    if mode == "auto":
        from zaya_export.runtime.costmodel import auto_mode

        calibration = session.artifact.calibration if session.artifact is not None else None
        mode, predictions, why = auto_mode(session, calibration, len(ids), max_new_tokens,
                                           greedy or temperature == 0.0, w)
        auto = {"chosen": mode, "reason": why, "predicted": {m: p.to_json() for m, p in predictions.items()}}
        if not as_json and predictions:
            figures = ", ".join(f"{m} {p.tok_per_s:.0f}" for m, p in predictions.items())
            click.echo(f"[auto: {mode} ({why}; predicted tok/s: {figures})]", err=True)
        if mode == "ar" and sampler_name == "mix":
            raise InputError(f"{source}: --sampler mix needs TiDAR entry points ({why})")
    session.prepare(mode)  # onnxruntime sessions built before the clock starts
    if gpu:
        from zaya_export.runtime.graph_decode import generate_on_device

        result = generate_on_device(session.backend.model, [ids], max_new_tokens, config.eos_token_ids, device,
                                    tidar=(session.block_len, session.levels) if mode == "tidar-fused" else None)
    elif mode != "ar":
        result = generate_tidar(session, [ids], max_new_tokens, config.eos_token_ids, sampler, w,
                                fused=mode == "tidar-fused", lookup=lookup)
    else:
        result = generate(session, [ids], max_new_tokens, config.eos_token_ids, sampler)
    tokens = result.tokens[0]
    text = tokenizer.decode(tokens) if tokenizer is not None else None
    report = {
        "tokens": tokens, "text": text, "forwards": result.forwards,
        "tokens_per_forward": round(result.tokens_per_forward, 4),
        "tok_per_s": round(len(tokens) / result.seconds, 2) if result.seconds else None,
        "backend": backend, "mode": mode, "time_to_first_token_s": round(result.first_token_seconds, 4),
    }
    if auto is not None:
        report["auto"] = auto
    if mode != "ar":
        report.update(steps=result.steps, acceptance=result.acceptance, mean_accepted=round(result.mean_accepted, 3),
                      sampler=sampler_name, w=w, lookup=lookup and w == 1.0)
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(text if text is not None else " ".join(map(str, tokens)))
    extra = f", mean accepted {report['mean_accepted']}" if mode != "ar" else ""
    click.echo(f"[{len(tokens)} tokens, {result.forwards} forwards, {report['tokens_per_forward']} tokens/forward, "
               f"{report['tok_per_s']} tok/s, {backend}, {mode}{extra}]", err=True)
    if mode != "ar":
        click.echo("[acceptance histogram, steps by drafts accepted: "
                   f"{' '.join(f'{n}:{count}' for n, count in enumerate(result.acceptance))}]", err=True)


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), required=True, help="Artifact directory.")
@click.option("--format", "formats", default="onnx", show_default=True,
              help="Comma-separated formats: onnx, mlir (one multi-entry MLIR module for IREE).")
@click.option("--target", "targets", default=None, help="IREE targets to compile the MLIR module for, "
              "comma-separated: cpu, gfx942 (MI300X/MI325X), gfx90a (MI250X), gfx1100 (RX 7900). Default with "
              "mlir: cpu.")
@click.option("--kernels", default="auto", show_default=True, help="GPU archs to AOT-compile the Triton kernels "
              "for into OUT/kernels/<arch>/, comma-separated: gfx942, gfx90a, gfx1100, sm_90; auto = every GPU "
              "--target (when triton is installed); off = none.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--force", is_flag=True, help="Replace OUT if it exists (only once the new one is complete).")
@click.option("--dump-after", multiple=True,
              help="Dump what a phase (prepare, calibrate, fuse, block, pack, trace, weights, lower-onnx, lower-mlir, "
                   "write) or a fusion pass (fuse_cca, fuse_attention, fuse_moe) produced, into OUT.dump/ "
                   "(repeatable).")
@click.option("--block-len", default=None,
              help="TiDAR drafts per step K (default: the config's diffusion_block_len), or auto: the K up to that "
              "which the cost model predicts fastest on this machine, from the calibration's acceptance and "
              "onnxruntime's measured cost of a forward per token count.")
@click.option("--levels", default=None, help="Acceptance levels of the packed TiDAR step, e.g. 0,6,16 "
              "(must start at 0; default 0,6,16 scaled to K), or auto: 0 and the most frequent acceptance "
              "lengths of the calibration's fused run (as many levels as the default).")
@click.option("--tidar", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="TiDAR entry points (verify, draft, packed step): auto = only for a diffusion checkpoint (its "
              "config names a mask token or a block length); an AR checkpoint gets prefill and decode.")
@click.option("--calibrate", type=click.IntRange(min=0, max=64), default=4, show_default=True,
              help="Held-out prompts on which the TiDAR acceptance is measured for run --mode auto (0: skip).")
@click.option("--stream", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Stream the weights from the checkpoint into the artifact tensor by tensor, tracing a model "
              "that holds shapes only and checking the passes on its first layers: auto = above 2B parameters.")
@click.option("--quant", type=click.Choice(["int8", "int4", "int8-asym", "int4-asym"]), default=None,
              help="Weight-only quantization of the attention, expert and LM-head matrices (per-group scales, "
                   "onnxruntime MatMulNBits; ONNX only).")
@click.option("--group-size", type=click.Choice(["16", "32", "64", "128", "256"]), default="32", show_default=True,
              help="Values per quantization group (one scale each).")
@click.option("--quant-head", type=click.Choice(["int8", "same"]), default="int8", show_default=True,
              help="The LM head under --quant int4: kept at int8, or the same bits as the rest.")
@click.option("--max-batch", type=click.IntRange(min=1, max=EXPORT_MAX_BATCH), default=EXPORT_MAX_BATCH,
              show_default=True,
              help="Most sequences the artifact serves at once; 1 compiles only fixed-batch-1 functions into the IREE "
                   "module (the ones a single sequence runs: about half the MLIR build and IREE compile).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest summary as JSON.")
def export(checkpoint: Path, out: Path, formats: str, targets: str | None, kernels: str, dtype: str, force: bool,
           dump_after: tuple[str, ...], block_len: str | None, levels: str | None, tidar: str, calibrate: int,
           stream: str, quant: str | None, group_size: str, quant_head: str, max_batch: int, as_json: bool) -> None:
    """Export CHECKPOINT to an artifact: fused, traced entry points lowered to ONNX and/or MLIR (compiled by
    IREE), weights stored once."""
    from .output_dir import check_replaceable

    check_replaceable(out, force, "artifact", [checkpoint])  # before the heavy imports: fails at once
    from .exporter import export_artifact

    console = _stderr()
    with console.status("exporting") as status:
        manifest = export_artifact(
            checkpoint, out, dtype=dtype, force=force, dump_after=dump_after, block_len=_parse_block_len(block_len),
            levels=_parse_levels(levels), formats=tuple(_split(formats)),
            targets=None if targets is None else tuple(_split(targets)), tidar=tidar, calibrate=calibrate,
            stream=stream, kernels=kernels, quant=quant, group_size=int(group_size), quant_head=quant_head,
            max_batch=max_batch, status=lambda msg: status.update(msg))
    summary = {"artifact": str(out), "entry_points": sorted(manifest.entry_points), "dtype": manifest.dtype,
               "quant": manifest.quant, "max_batch": manifest.max_batch,
               "formats": list(manifest.formats), "iree_targets": sorted(manifest.iree),
               "kernels": {a: [k["kernel"] for k in ks] for a, ks in manifest.kernels.items()},
               "pass_log": [r.to_json() for r in manifest.pass_log.model], "seconds": manifest.export_seconds}
    if as_json:
        click.echo(json.dumps(summary))
    else:
        fired = ", ".join(f"{r['name']}×{r['rewrites']}" for r in summary["pass_log"])
        iree = f"; IREE: {', '.join(summary['iree_targets'])}" if summary["iree_targets"] else ""
        if summary["kernels"]:
            iree += f"; Triton kernels: {', '.join(summary['kernels'])}"
        if manifest.scheme is not None:
            iree += f"; weights {manifest.scheme.name}"
        console.print(f"wrote {out} ({'+'.join(summary['formats'])}: {', '.join(summary['entry_points'])}; {fired}"
                      f"{iree}; {summary['seconds']} s)")


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def inspect(artifact: Path, as_json: bool) -> None:
    """Show an artifact's entry points, op histograms, fused-op counts, sizes and versions."""
    from collections import Counter

    import onnx

    from zaya_export.runtime.artifact import open_artifact
    from zaya_export.runtime.backends import check_signature

    art = open_artifact(artifact, allow_version_mismatch=True)
    info = {"artifact": str(artifact), "dtype": art.manifest.dtype, "quant": art.manifest.quant,
            "max_batch": art.manifest.max_batch, "versions": art.manifest.versions,
            "files": {rel: art.path(rel).stat().st_size for rel in art.manifest.files}, "entry_points": {}}
    for name, entry in art.entry_points.items():
        ports = {"inputs": [p.to_json() for p in entry.inputs], "outputs": [p.to_json() for p in entry.outputs]}
        if entry.onnx is None:
            info["entry_points"][name] = {**ports, "nodes": 0, "fused": {}, "ops": {}, "functions": []}
            continue
        try:
            proto = onnx.load(str(art.path(entry.onnx)), load_external_data=False)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
            raise InputError(f"{art.path(entry.onnx)}: not a readable ONNX graph ({type(exc).__name__})") from None
        check_signature(art.path(entry.onnx), entry, *(
            [(v.name, [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim])
             for v in values] for values in (proto.graph.input, proto.graph.output)))
        hist = Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in proto.graph.node)
        info["entry_points"][name] = {
            **ports, "nodes": sum(hist.values()),
            "fused": {k: v for k, v in hist.items() if k.startswith("zaya.")}, "ops": dict(hist.most_common()),
            "functions": sorted(f.name for f in proto.functions),
        }
    info["validation"] = art.manifest.validation
    info["iree"] = _inspect_iree(art)
    info["kernels"] = _inspect_kernels(art)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    scheme = art.manifest.scheme
    quant = f"  quant={scheme.name} (LM head int{scheme.head_bits})" if scheme else ""
    click.echo(f"{artifact}  dtype={info['dtype']}{quant}  max_batch={info['max_batch']}  "
               + " ".join(f"{k}={v}" for k, v in info["versions"].items()))
    for name, e in info["entry_points"].items():
        fused = ", ".join(f"{k}×{v}" for k, v in e["fused"].items())
        click.echo(f"  {name}: {e['nodes']} ONNX nodes; fused: {fused}; inputs: "
                   + ", ".join(f"{i['name']}{i.get('shape', '')}" for i in e["inputs"]))
    for target, t in info["iree"].items():
        gpu = f"; AMD code objects: {', '.join(t['amd_archs_found'])}" if t["arch"] else ""
        ok = "" if t["archs_ok"] else "  MISMATCH"
        click.echo(f"  iree/{target}: {t['bytes'] / 2**20:.2f} MiB, driver {t['driver']}{gpu}{ok}")
    for arch, ks in info["kernels"].items():
        for k in ks:
            mma = f"yes ({', '.join(k['matrix_instructions'])})" if k["uses_matrix_cores"] else "no"
            click.echo(f"  kernels/{arch}/{k['kernel']}: {k['code_bytes'] / 1024:.1f} KiB, VGPR {k['vgprs']}, "
                       f"SGPR {k['sgprs']}, LDS {k['lds_bytes']} B, occupancy {k['occupancy']}/{k['occupancy_max']}, "
                       f"matrix cores {mma}{'  MISSING' if k['matmul'] and not k['uses_matrix_cores'] else ''}")
    for rel, size in sorted(info["files"].items()):
        click.echo(f"  {rel:32s} {size / 2**20:9.2f} MiB")
    if info["validation"]:
        for name, v in info["validation"].items():
            click.echo(f"  {name}: {'PASS' if v['ok'] else 'FAIL'} (max abs {v['worst_logits_max_abs']:.2e}, "
                       f"greedy {v['greedy_equal']}/{v['prompts']})")


def _inspect_kernels(art) -> dict:  # noqa: ANN001
    """Per arch and kernel: code size, registers, LDS, occupancy and the matrix instructions found in the
    compiled code (recorded at export by kernels/isa.py; the files themselves are hash-checked on open)."""
    keys = ("kernel", "format", "code_bytes", "vgprs", "agprs", "sgprs", "lds_bytes", "scratch_bytes", "occupancy",
            "occupancy_max", "matmul", "uses_matrix_cores", "matrix_instructions", "grid", "block", "use")
    return {arch: [{k: r.get(k) for k in keys} for r in records] for arch, records in art.manifest.kernels.items()}


def _inspect_iree(art) -> dict:  # noqa: ANN001
    """Per-target size, and the AMD GPU architectures actually found in each module's code objects."""
    from .mlir_export import TARGETS, amd_archs_in

    out = {}
    for target, m in art.manifest.iree.items():
        found = amd_archs_in(art.path(m.vmfb))
        arch = TARGETS[target].arch if target in TARGETS else None
        out[target] = {"bytes": art.path(m.vmfb).stat().st_size, "driver": m.driver, "flags": list(m.flags),
                       "arch": arch, "amd_archs_found": sorted(set(found)),
                       "archs_ok": (set(found) == {arch}) if arch else not found}
    return out


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--checkpoint", type=click.Path(path_type=Path), help="Source checkpoint (default: the artifact's "
              "own weights in the eager model).")
@click.option("--reference", type=click.Choice(["eager", "hf"]), default="eager", show_default=True,
              help="hf = upstream transformers' ZayaForCausalLM for fresh-sequence logits.")
@click.option("--backend", "backends", default="ort", show_default=True,
              help="Backend(s) to check, comma-separated: ort, iree, torch. Several also compare each pair.")
@click.option("--device", default="auto", show_default=True,
              help="IREE device: local-task, local-sync, auto (by model size, as for run), hip.")
@click.option("--bisect", "do_bisect", is_flag=True, help="Locate the first layer and fused op where the backends "
              "(and eager) diverge, using the artifact's `layers` debug entry.")
@click.option("--json", "as_json", is_flag=True)
def validate(artifact: Path, checkpoint: Path | None, reference: str, backends: str, device: str, do_bisect: bool,
             as_json: bool) -> None:
    """Check ARTIFACT against the source model; exit 1 when any check fails."""
    names = _split(backends)
    bad = sorted(set(names) - {"ort", "iree", "torch"})
    if bad or not names:
        raise InputError(f"unknown --backend {bad or backends!r}; choose from ort, iree, torch")
    if not artifact.is_dir():
        raise InputError(f"{artifact}: not an artifact directory")
    from zaya_export.runtime.artifact import open_artifact
    from zaya_export.runtime.session import Session

    from .bisect import bisect, describe
    from .validate import cross_check, eager_reference, to_markdown, validate_artifact, write_report
    art = open_artifact(artifact)
    from .bench import eager_fits

    if not eager_fits(art):  # the 8B: compare layer by layer with the source, one layer in memory at a time
        from .validate import TOLERANCES
        from .validate_layerwise import layerwise_markdown, validate_layerwise

        with _stderr().status(f"validating {artifact} layer by layer against the source checkpoint"):
            report = validate_layerwise(art, checkpoint, names[0], tolerances=TOLERANCES)
        click.echo(json.dumps(report) if as_json else layerwise_markdown(report))
        try:
            folder = art.root / "report"
            folder.mkdir(exist_ok=True)
            (folder / f"validation-{names[0]}-layerwise.json").write_text(json.dumps(report, indent=2) + "\n")
        except OSError as exc:
            click.echo(f"warning: {artifact}: the report was not stored ({exc.strerror})", err=True)
        if not report["ok"]:
            click.echo("error: validation failed (see the report above)", err=True)
            raise SystemExit(1)
        return
    reports, out = [], {"ok": True}
    eager = eager_reference(art, checkpoint)  # computed once, shared by every backend
    for backend in names:
        with _stderr().status(f"validating {artifact} ({backend} vs {reference})"):
            report = validate_artifact(art, backend=backend, checkpoint=checkpoint, reference=reference,
                                       device=device, eager=eager)
        reports.append(report)
        out["ok"] &= report["ok"]
        if not as_json:
            click.echo(to_markdown(report))
        try:  # the verdict is printed first: a read-only artifact loses only the stored copy
            write_report(art, report)
        except OSError as exc:
            click.echo(f"warning: {artifact}: the report was not stored ({exc.strerror})", err=True)
    out["reports"] = reports
    if len(names) > 1:
        with _stderr().status(f"cross-checking {', '.join(names)}"):
            out["cross"] = cross_check(art, names, device, model=eager.model)
        out["ok"] &= all(c["ok"] for c in out["cross"])
        if not as_json:
            for c in out["cross"]:
                errs = ", ".join(f"{k} {v:.1e}" for k, v in c["max_abs"].items())
                click.echo(f"{c['pair']} {c['entry']}: {errs} {'✓' if c['ok'] else '✗'}")
    if do_bisect:
        model = eager.model
        sessions = [Session.from_model(model)] + [Session.from_artifact(art, b, device=device) for b in names]
        out["bisect"] = [bisect(sessions[i], sessions[j], model) for i in range(len(sessions))
                         for j in range(i + 1, len(sessions))]
        if not as_json:
            for r in out["bisect"]:
                click.echo(describe(r))
    if as_json:
        click.echo(json.dumps(out))
    if not out["ok"]:
        click.echo("error: validation failed (see the report above)", err=True)
        raise SystemExit(1)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--backend", "backends", default="ort", show_default=True,
              help="Backend(s), comma-separated (ort, iree, torch; iree-host: IREE with the decode state copied "
              "from the host on every call); each is compared with eager torch.")
@click.option("--prompt-len", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--new-tokens", type=click.IntRange(min=2), default=128, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--modes", default=None, help="Compare decode modes on each backend instead, e.g. "
              "ar,tidar,tidar-fused (speedups over ar; over eager AR too when torch is a backend).")
@click.option("--w", "mix_w", type=Finite(0, 1), default=1.0, show_default=True,
              help="TiDAR mixing weight for --modes (1 = lossless).")
@click.option("--lookup/--no-lookup", default=True, show_default=True,
              help="TiDAR drafts with context-lookup continuations (as run makes them) or the drafter's alone.")
@click.option("--entries", is_flag=True, help="Measure the cost curve instead: ms per call of every entry, and of "
              "prefill at 1, 2, 4, ... tokens, per backend (with --prompt-len tokens in the cache).")
@click.option("--plot", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="With --entries: also write the curve as a PNG plot to this file.")
@click.option("--json", "as_json", is_flag=True)
def bench(artifact: Path, backends: str, prompt_len: int, new_tokens: int, repeats: int, modes: str | None,
          mix_w: float, lookup: bool, entries: bool, plot: Path | None, as_json: bool) -> None:
    """Decode tok/s: a backend vs the eager torch model (AR), AR vs TiDAR modes on each backend (--modes, with
    the cost model's predictions), or the cost curve of every entry (--entries)."""
    names = _split(backends)
    if not names or set(names) - set(BENCH_BACKENDS):
        raise InputError(f"unknown --backend {backends!r}; choose from {', '.join(BENCH_BACKENDS)}")
    wanted = tuple(_split(modes)) if modes else ()
    bad = sorted(set(wanted) - {"ar", "tidar", "tidar-fused"})
    if bad or (modes is not None and not wanted):
        raise InputError(f"unknown --modes {bad or modes!r}; choose from ar, tidar, tidar-fused")
    if entries and modes:
        raise InputError("give --entries or --modes, not both")
    if plot is not None and not entries:
        raise InputError("--plot draws the cost curve: add --entries")
    from zaya_export.runtime.artifact import open_artifact

    from .bench import bench_artifact, bench_entries, bench_matrix, plot_entries

    art = open_artifact(artifact)
    context = art.config.max_position_embeddings
    if prompt_len + new_tokens > context:
        raise InputError(f"--prompt-len {prompt_len} + --new-tokens {new_tokens} exceeds the model's context of "
                         f"{context}")
    with _stderr().status(f"benchmarking {artifact}"):
        if entries:
            result = bench_entries(art, tuple(names), prompt_len, max(repeats, 5))
        elif modes:
            if set(wanted) - {"ar"} and art.manifest.tidar is None:
                raise InputError(f"{artifact}: no TiDAR entry points (exported from an AR checkpoint; re-export "
                                 "with --tidar on to bench the TiDAR modes)")
            result = bench_matrix(art, tuple(names), prompt_len, new_tokens, repeats, wanted, mix_w, lookup)
        else:
            result = bench_artifact(art, tuple(n for n in names if n != "torch"), prompt_len, new_tokens, repeats)
    if plot is not None:
        plot_entries(result, plot)
    if as_json:
        click.echo(json.dumps(result))
        return
    if entries:
        for name, curve in result.items():
            click.echo(f"{name} (threads per entry: {curve['threads'] or 'backend default'})")
            click.echo(f"  {'entry':12s} {'tokens':>6s} {'ms/call':>9s} {'x decode':>9s}")
            for row in curve["rows"]:
                ratio = f"{row['vs_decode']:9.2f}" if row["vs_decode"] is not None else f"{'-':>9s}"
                click.echo(f"  {row['entry']:12s} {row['tokens']:6d} {row['ms']:9.3f} {ratio}")
            if curve.get("commit_folded"):
                click.echo("  (commit: timed alone; the decoding loops run it inside the next decode or draft call, "
                           "whose rows include it)")
            for mode, ms in curve.get("host_ms_per_step", {}).items():
                click.echo(f"  {'host/' + mode:19s} {ms:9.3f}   (the loop's time per step outside its forwards)")
        if plot is not None:
            click.echo(f"wrote {plot}")
        return
    if modes:
        for name, res in result.items():
            for mode, row in res["modes"].items():
                eager = f"  vs eager AR {row['speedup_vs_eager_ar']}x" if row["speedup_vs_eager_ar"] else ""
                pred = (f"  predicted {row['predicted_tok_per_s']:.2f} ({row['prediction_error']:+.0%})"
                        if "predicted_tok_per_s" in row else "")
                click.echo(f"{name:9s} {mode:12s} {row['tok_per_s']:9.2f} tok/s{pred}  {row['forwards']:4d} forwards  "
                           f"{row['tokens_per_forward']:6.3f} tokens/forward  mean accepted "
                           f"{row['mean_accepted']:6.3f}  speedup {row['speedup_vs_ar']}x{eager}")
            click.echo(f"{name:9s} auto picks {res['auto']['chosen']} ({res['auto']['reason']})")
        return
    tps, speedup = result["decode_tok_per_s"], result["speedup"]
    rates = ", ".join(f"{b} {tps[b]}" + (f" ({speedup[b]}x)" if speedup else "") for b in result["backends"])
    eager = f"eager {tps['eager']}, " if speedup else ""
    click.echo(f"decode tok/s: {eager}{rates} (prompt {prompt_len}, {new_tokens} new, best of {repeats}; same "
               f"tokens: {result['same_tokens']}){'' if speedup else '; eager ' + result['eager']}")
    roof = result["roofline"]
    click.echo(f"roofline: {roof['bytes_per_token'] / 2**20:.1f} MiB read per token at context {roof['context']}, "
               f"{roof['bandwidth_gb_s']} GB/s measured: {roof['roofline_tok_per_s']} tok/s; "
               + ", ".join(f"{k} {v}%" for k, v in roof["percent_of_roofline"].items()))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
