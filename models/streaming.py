"""Models whose weights are read one tensor at a time, for checkpoints too big to load (ZAYA1-8B: 18.8 GB in
bf16, 37 GB once the graphs' fp32 would hold it).

* :class:`StreamedCheckpoint`: a checked checkpoint (every check of ``load_checkpoint`` that needs no weight
  bytes) whose tensors are read on demand, each with the NaN/Inf and overflow checks of a full load.
* :meth:`StreamedCheckpoint.stand_in`: the model to fuse and trace. Tracing needs shapes, not values, so every
  large tensor is a stride-0 view of one zero (4 bytes for any shape); tensors up to
  ``REAL_BELOW`` elements (norms, biases, temperatures, conv kernels) are the real values, because the ONNX
  constant folder may fold small constants into the graph and must fold the true ones. Its graphs are the
  graphs of the fully loaded model.
* :meth:`StreamedCheckpoint.truncated`: the first layers with their real weights (plus embeddings, final norm
  and head), on which the export's probe checks run: every layer runs the same fused code, so a pass that
  breaks one layer type breaks it in the first layer of that type.
* :func:`random_slots`: the tensors ``init`` writes, produced one at a time from :func:`random_parameter`
  (the same values as ``init_weights``).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from .checkpoint import checked_cast, checkpoint_plan
from .config import ZayaConfig
from .safetensors_header import TensorInfo
from .safetensors_stream import TensorSlot, read_tensor
from .upstream import skip_bias_warning
from .zaya import ZayaForCausalLM, random_parameter

REAL_BELOW = 65536  # elements: tensors this small are loaded for real in the stand-in (see module docstring)


def stored_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """Routing biases stay fp32 whatever the storage dtype (a rounded bias changes routing decisions)."""
    return torch.float32 if name.endswith("balancing_biases") else dtype


class StreamedCheckpoint:
    """A checkpoint directory, checked up front, read tensor by tensor."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config, self.plan = checkpoint_plan(self.path)  # native name → source tensors
        self.shapes = {name: _shape(infos) for name, infos in self.plan.items()}

    @property
    def n_params(self) -> int:
        return sum(torch.Size(s).numel() for s in self.shapes.values())

    def read(self, name: str, dtype: torch.dtype, rows: int | None = None) -> torch.Tensor:
        """One native tensor (stacked from its legacy parts when needed) in ``dtype``, checked finite; with
        ``rows``, only its first rows (a single-part tensor: the embedding and head)."""
        infos: list[TensorInfo] = self.plan[name]
        if rows is not None and len(infos) != 1:
            raise ValueError(f"{name}: rows of a tensor stacked from {len(infos)} parts")
        parts = [read_tensor(info, rows) for info in infos]
        tensor = parts[0] if len(parts) == 1 else torch.stack(parts)
        del parts
        return checked_cast(tensor, infos[0], stored_dtype(name, dtype))

    def slots(self, dtype: torch.dtype) -> list[TensorSlot]:
        """What the artifact's weight file holds: every native tensor in its stored dtype."""
        return [TensorSlot(name, stored_dtype(name, dtype), shape) for name, shape in self.shapes.items()]

    def stand_in(self, dtype: torch.dtype) -> ZayaForCausalLM:
        """The fp32 model with small tensors real (rounded through the storage ``dtype``, as the artifact stores
        them) and large ones a zero broadcast to their shape: traces to the same graphs as the real model."""
        state = {}
        for name, shape in self.shapes.items():
            if torch.Size(shape).numel() <= REAL_BELOW:
                state[name] = self.read(name, dtype).float()
            else:
                state[name] = torch.zeros((), dtype=torch.float32).expand(shape)
        model = _build(self.config, state)
        note = skip_bias_warning(model)  # the routing biases are real: warn as load_checkpoint does
        if note:
            warnings.warn(f"{self.path}: {note}", stacklevel=2)
        return model

    def truncated(self, layers: int, dtype: torch.dtype, vocab: int | None = None) -> ZayaForCausalLM:
        """The first ``layers`` layers with their real weights (rounded through ``dtype``), fp32; with
        ``vocab``, only the first ``vocab`` rows of the embedding and head (``probe_vocab``)."""
        config = truncated_config(self.config, layers, vocab)
        keep = [n for n in self.shapes if not n.startswith("model.layers.")
                or int(n.split(".")[2]) < layers]
        rows = {name: vocab for name in _PER_TOKEN} if vocab else {}
        return _build(config, {name: self.read(name, dtype, rows.get(name)).float() for name in keep})


_PER_TOKEN = ("model.embed_tokens.weight", "lm_head.weight", "lm_head.bias")  # one row per vocabulary entry


def truncated_config(config: ZayaConfig, layers: int, vocab: int | None = None) -> ZayaConfig:
    return dataclasses.replace(config, num_hidden_layers=layers, layer_types=list(config.layer_types[:layers]),
                               vocab_size=vocab or config.vocab_size)


PROBE_VOCAB = 32768  # vocabulary rows of the probe model: a tied fp32 8B embedding/head alone is 2.1 GB


def probe_vocab(config: ZayaConfig) -> int:
    """How many leading vocabulary rows the probe model keeps: ``PROBE_VOCAB``, and every special token the
    entries use (mask, pad, bos, eos). No pass touches the embedding or the head, so their other rows add memory,
    not checking."""
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    special = [t for t in (config.mask_token_id, config.pad_token_id, config.bos_token_id, *eos) if t is not None]
    return min(config.vocab_size, max(PROBE_VOCAB, max(special, default=0) + 1))


def probe_layers(config: ZayaConfig, at_least: int = 2) -> int:
    """How many leading layers the probe checks run on: ``at_least``, and enough to hold every layer type."""
    types = list(config.layer_types)
    need = max(types.index(t) + 1 for t in set(types)) if types else 0
    return min(config.num_hidden_layers, max(at_least, need))


def random_slots(config: ZayaConfig, seed: int, dtype: torch.dtype
                 ) -> tuple[list[TensorSlot], Callable[[TensorSlot], torch.Tensor]]:
    """The tensors of a random-weight checkpoint (``init``) in generation order, and the function producing
    each in turn: the values ``init_weights(model, seed)`` gives, without building the model."""
    with torch.device("meta"):
        state = ZayaForCausalLM(config).state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    slots = [TensorSlot(name, stored_dtype(name, dtype), tuple(t.shape)) for name, t in state.items()]
    gen = torch.Generator().manual_seed(seed)

    def produce(slot: TensorSlot) -> torch.Tensor:
        if slot.name.endswith("balancing_biases"):  # a buffer, as init_weights sets it: only the skip class's -1
            tensor = torch.zeros(slot.shape)
            tensor[-1] = -1.0
            return tensor
        return random_parameter(slot.name, slot.shape, gen, config.initializer_range)  # draws in parameter order

    return slots, produce


def _shape(infos: list[TensorInfo]) -> tuple[int, ...]:
    return infos[0].shape if len(infos) == 1 else (len(infos), *infos[0].shape)


def _build(config: ZayaConfig, state: dict[str, torch.Tensor]) -> ZayaForCausalLM:
    with torch.device("meta"):
        model = ZayaForCausalLM(config)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()
