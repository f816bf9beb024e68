"""The streamed export: for checkpoints too big to load, the exporter never holds the weights.

``export`` normally loads the checkpoint (fp32, for the probe checks and the calibration) and writes the
weights from the model. For ZAYA1-8B that is 37 GB of fp32 on a 24 GB machine. A streamed export instead

1. traces a *stand-in* model (``models.streaming``: large tensors are a zero broadcast to their shape, small
   ones real), whose graphs are those of the real model;
2. checks the fusion passes (and ``pack_tidar_step``) on a *truncated* model: the first layers (every layer
   type at least once) with their real weights, final norm, and the first ``probe_vocab`` rows of the
   embedding and head (the fusion passes touch neither; the full tied 8B table would be 2.1 GB). The probe
   compares, as for a whole model, the prefill (and, for TiDAR, draft) outputs before and after each pass on
   the two probe inputs, logits and every state output of those layers (``passes/probe_check.py``); the
   manifest's pass log records how many layers it ran on (``probe_layers``). The other layers run the same
   fused code on other values;
3. writes ``onnx/weights.safetensors`` tensor by tensor from the checkpoint, each converted to the stored dtype
   on the way (:func:`write_streamed_weights`), with bytes written, rate and ETA in the status line.

The working set is the truncated model during the checks, then one tensor and its converted copy. The TiDAR
calibration needs the eager model and is skipped (as it is above 2B parameters anyway).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from zaya_export.models.checkpoint import DTYPES
from zaya_export.models.entries import base_entry_specs
from zaya_export.models.safetensors_stream import status_progress, write_streamed
from zaya_export.models.streaming import StreamedCheckpoint, probe_layers, probe_vocab
from zaya_export.passes.base import PassManager, PassRecord
from zaya_export.passes.fusion import fused, fusion_pipeline
from zaya_export.passes.probe_check import tolerance_for
from zaya_export.passes.tidar_packing import ExportPlan, PackTidarStep

if TYPE_CHECKING:
    from zaya_export.models.entries import EntrySpec

    from .exporter import ExportRun

STREAM_CHOICES = ("auto", "on", "off")
STREAM_ABOVE_PARAMS = 2_000_000_000  # auto: stream beyond this (fp32 would be 8 GB; calibration stops here too)
_PROBE_FIELDS = ("max_abs_diff", "max_rel_diff", "routing_flips", "max_flip_margin")

__all__ = ["STREAM_CHOICES", "StreamedCheckpoint", "fuse_streamed", "open_streamed", "write_streamed_weights"]


def open_streamed(checkpoint: Path, stream: str) -> StreamedCheckpoint | None:
    """The checkpoint to stream from, or None for a loaded export (``stream``: on, off, or auto by size)."""
    if stream == "off":
        return None
    source = StreamedCheckpoint(checkpoint)
    return source if stream == "on" or source.n_params > STREAM_ABOVE_PARAMS else None


def fuse_streamed(run: ExportRun, probe: Callable[[torch.nn.Module, bool], Callable[[Any], list]],
                  dump: Callable[[torch.nn.Module], str], dump_dir: Path
                  ) -> tuple[list[PassRecord], tuple[dict[str, EntrySpec], list[PassRecord]] | None]:
    """Check the fusion passes (and the TiDAR packing) on the truncated model, then fuse the stand-in
    ``run.model`` inside ``run.scope``. Returns the fusion log (rewrites of the whole model, probe figures of
    the truncated one) and, for TiDAR, the packed entry specs with the packing's log."""
    layers, vocab = probe_layers(run.source.config), probe_vocab(run.source.config)
    dtype = DTYPES[run.options.dtype]
    run.status(f"checking the fusion passes on the first {layers} layer(s), real weights")
    truncated = run.source.truncated(layers, dtype, vocab)
    packed = None
    with fused(truncated, fusion_pipeline(), probe=probe(truncated, run.with_tidar),
               tolerance=tolerance_for(truncated.dtype)) as checked:
        if run.with_tidar:
            run.status("checking pack_tidar_step on the truncated model")
            plan, packer = ExportPlan(truncated, base_entry_specs(run.block_len)), PackTidarStep(run.block_len,
                                                                                                run.levels)
            log = PassManager([packer]).run(plan)
            packed = (plan.specs, [dataclasses.replace(r, **packer.check.to_json(), probe_layers=layers)
                                   for r in log])
    del truncated
    run.status("fusing (fuse_cca, fuse_attention, fuse_moe)")
    names = {p.name for p in fusion_pipeline()}
    whole = run.scope.enter_context(fused(run.model, fusion_pipeline(), dump=dump, dump_dir=dump_dir,
                                          dump_after=[n for n in run.options.dump_after if n in names]))
    log = [dataclasses.replace(w, **{k: getattr(c, k) for k in _PROBE_FIELDS}, probe_layers=layers)
           for w, c in zip(whole, checked)]
    return log, packed


def write_streamed_weights(source: StreamedCheckpoint, path: Path, dtype: torch.dtype,
                           status: Callable[[str], None]) -> dict[str, tuple]:
    """The artifact's weight file, tensor by tensor from ``source`` in ``dtype`` (routing biases fp32);
    returns name → (offset, length, safetensors dtype) as ``onnx_export.write_weights`` does."""
    offsets = write_streamed(path, source.slots(dtype), lambda slot: source.read(slot.name, dtype),
                             status_progress(status, "writing the shared weights"))
    if source.config.tie_word_embeddings:  # the traced graph names the tied head separately
        offsets["lm_head.weight"] = offsets["model.embed_tokens.weight"]
    return offsets
