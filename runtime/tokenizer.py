"""Tokenizers for generated checkpoints, and loading ``tokenizer.json`` through the ``tokenizers`` library.

Generated checkpoints get a small byte-level BPE with the ZAYA1/Gemma special-token ids (0 <pad>, 1 <eos>,
2 <bos>, 3 <unk>, 4 <mask>) so every code path that handles special tokens sees the real ids.
"""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from zaya_export.errors import CheckpointError

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]


def _seed_corpus() -> list[str]:
    """Offline, deterministic training text: the source of a few standard-library modules."""
    import argparse
    import json as json_mod
    import string

    return [inspect.getsource(mod) for mod in (textwrap, string, json_mod.decoder, argparse)]


def build_tokenizer(vocab_size: int, texts: Iterable[str] | None = None) -> Tokenizer:
    """A byte-level BPE of exactly ``vocab_size`` entries (specials + 256 bytes + merges), prepending <bos>.
    ``texts`` defaults to a few standard-library modules (enough for random-weight checkpoints)."""
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level tokenizer (need >= 261)")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_seed_corpus() if texts is None else texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return tok


def load_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers library raises plain Exception subclasses
        raise CheckpointError(f"{path}: cannot load tokenizer ({str(exc).splitlines()[0]})") from None
