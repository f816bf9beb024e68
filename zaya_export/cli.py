"""The ``zaya-export`` command line: ``init`` writes a random-weight checkpoint, ``run`` generates text.

Every bad input surfaces as one ``error: ...`` line on stderr and exit code 2 (see :mod:`.errors`).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import click

from .errors import InputError, ZayaError


class _Group(click.Group):
    """Turns :class:`ZayaError` (and warnings) into one-line messages instead of tracebacks."""

    def invoke(self, ctx: click.Context):  # noqa: ANN201 - click signature
        warnings.showwarning = lambda msg, *a, **k: click.echo(f"warning: {msg}", err=True)
        try:
            return super().invoke(ctx)
        except ZayaError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="zaya-export")
def main() -> None:
    """Export ZAYA1 checkpoints to deployable artifacts, run them, and validate parity."""


@main.command()
@click.option("--preset", "preset_name", type=click.Choice(["tiny", "small", "8b"]), default="tiny",
              show_default=True, help="Model size.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="Stored weight dtype.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object describing what was written.")
@click.argument("out", type=click.Path(path_type=Path))
def init(preset_name: str, seed: int, dtype: str, force: bool, as_json: bool, out: Path) -> None:
    """Write a random-weight checkpoint in Hugging Face layout (with a small tokenizer) to OUT."""
    import torch
    from .checkpoint import DTYPES, save_checkpoint
    from .models import ZayaForCausalLM, init_weights, preset
    from .tokenizer import build_tokenizer

    if out.exists() and not force:
        raise InputError(f"{out}: already exists (use --force to replace it)")
    config = preset(preset_name)
    torch_dtype = DTYPES[dtype]
    with torch.device("meta"):
        n_params = sum(p.numel() for p in ZayaForCausalLM(config).parameters())
    need = n_params * 4 * 2  # fp32 init plus the write buffer
    total_ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > total_ram:
        raise InputError(f"preset {preset_name} ({n_params / 1e9:.1f}B params) needs ~{need / 2**30:.0f} GiB "
                         f"of RAM to initialise; this machine has {total_ram / 2**30:.0f} GiB")
    console = _stderr()
    with console.status(f"initialising {preset_name} ({n_params / 1e6:.1f}M params)"):
        torch.manual_seed(seed)
        model = ZayaForCausalLM(config)
        init_weights(model, seed)
        tokenizer = build_tokenizer(min(config.vocab_size, 4096))
    with console.status(f"writing {out}"):
        save_checkpoint(model, out, tokenizer_json=tokenizer.to_str(), dtype=torch_dtype, overwrite=force)
    if as_json:
        click.echo(json.dumps({"path": str(out), "preset": preset_name, "params": n_params, "dtype": dtype,
                               "seed": seed}))
    else:
        console.print(f"wrote {out} ({preset_name}, {n_params / 1e6:.1f}M params, {dtype})")


def load_with_progress(checkpoint: Path, dtype: str | None):  # noqa: ANN201 - ZayaForCausalLM
    """Load a checkpoint, with a progress bar on stderr when it is big enough to take a while."""
    from rich.progress import Progress

    from .checkpoint import load_checkpoint

    size = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors")) if checkpoint.is_dir() else 0
    if size < 256 * 2**20:
        return load_checkpoint(checkpoint, dtype=dtype)
    with Progress(transient=True, console=_stderr()) as bar:
        task = bar.add_task(f"loading {checkpoint.name}", total=None)
        return load_checkpoint(checkpoint, dtype=dtype, progress=lambda done, total: bar.update(task, completed=done,
                                                                                               total=total))


def _stderr():  # noqa: ANN202
    from rich.console import Console

    return Console(stderr=True)


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise InputError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    return ids


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--prompt", help="Prompt text (needs tokenizer.json in the checkpoint).")
@click.option("--prompt-ids", help="Prompt as comma-separated token ids, e.g. 2,17,301.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="Compute dtype (default: as stored).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def run(checkpoint: Path, prompt: str | None, prompt_ids: str | None, max_new_tokens: int, dtype: str | None,
        as_json: bool) -> None:
    """Generate greedily from CHECKPOINT with the eager PyTorch model."""
    from .runtime.generate import generate_greedy
    from .tokenizer import load_tokenizer

    if (prompt is None) == (prompt_ids is None):
        raise InputError("give exactly one of --prompt or --prompt-ids")
    model = load_with_progress(checkpoint, dtype)
    config = model.config
    tok_path = checkpoint / "tokenizer.json"
    tokenizer = load_tokenizer(tok_path) if tok_path.is_file() else None
    if prompt is not None:
        if tokenizer is None:
            raise InputError(f"{tok_path}: missing, so --prompt cannot be tokenized (use --prompt-ids)")
        ids = tokenizer.encode(prompt).ids
    else:
        ids = _parse_ids(prompt_ids)
    if not ids:
        raise InputError("the prompt is empty")
    bad = [t for t in ids if not 0 <= t < config.vocab_size]
    if bad:
        raise InputError(f"token id {bad[0]} is out of range for a vocabulary of {config.vocab_size}")
    if len(ids) + max_new_tokens > config.max_position_embeddings:
        raise InputError(f"prompt of {len(ids)} tokens + {max_new_tokens} new tokens exceeds the context of "
                         f"{config.max_position_embeddings}")
    result = generate_greedy(model, [ids], max_new_tokens, config.eos_token_ids)
    tokens = result.tokens[0]
    text = tokenizer.decode(tokens) if tokenizer is not None else None
    report = {
        "tokens": tokens, "text": text, "forwards": result.forwards,
        "tokens_per_forward": round(result.tokens_per_forward, 4),
        "tok_per_s": round(len(tokens) / result.seconds, 2) if result.seconds else None,
    }
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(text if text is not None else " ".join(map(str, tokens)))
    click.echo(f"[{len(tokens)} tokens, {result.forwards} forwards, {report['tokens_per_forward']} tokens/forward, "
               f"{report['tok_per_s']} tok/s]", err=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
