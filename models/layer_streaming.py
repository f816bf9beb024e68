"""An eager model that holds one layer's large weights at a time, for references too big to load.

The 8B in fp32 is 37 GB, more than this machine has. Its eager forward, though, only ever needs one layer's
matrices at once: :func:`layer_streamed_model` builds the model on the meta device, loads every small tensor
(norms, biases, residual scales, router, conv weights: kept, since a layer's forward also reads the next
layer's input norm) and the embedding/head, and gives each decoder layer a pre-forward hook that reads its
large matrices from the checkpoint and a post-forward hook that drops them again. The model code is the
ordinary one; only where its weights live changes. The working set is the embedding (and head) plus one layer.
"""

from __future__ import annotations

import torch

from .streaming import StreamedCheckpoint
from .zaya import ZayaForCausalLM

KEEP_BELOW = 1 << 20  # elements: tensors this small stay loaded (every one of a layer's norms, biases, router)


def layer_streamed_model(source: StreamedCheckpoint, dtype: torch.dtype = torch.float32) -> ZayaForCausalLM:
    """The eager model of ``source`` with each layer's large matrices read on entry and dropped on exit."""
    config = source.config
    with torch.device("meta"):
        model = ZayaForCausalLM(config)
    state = {}
    streamed: dict[int, list[str]] = {}
    for name, shape in source.shapes.items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        if layer is not None and torch.Size(shape).numel() >= KEEP_BELOW:
            streamed.setdefault(layer, []).append(name)
        else:
            state[name] = source.read(name, dtype).to(torch.float32 if name.endswith("balancing_biases") else dtype)
    meta = {n: t for n, t in model.state_dict().items() if n not in state and n != "lm_head.weight"}
    model.load_state_dict({**meta, **state}, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for i, layer in enumerate(model.model.layers):
        names = streamed.get(i, [])
        prefix = f"model.layers.{i}."

        def load(module: torch.nn.Module, args: object, names: list[str] = names, prefix: str = prefix) -> None:
            module.load_state_dict({n[len(prefix):]: source.read(n, dtype) for n in names}, strict=False, assign=True)

        def drop(module: torch.nn.Module, args: object, out: object, names: list[str] = names,
                 prefix: str = prefix) -> None:
            module.load_state_dict({n[len(prefix):]: torch.empty(source.shapes[n], device="meta") for n in names},
                                   strict=False, assign=True)

        layer.register_forward_pre_hook(load)
        layer.register_forward_hook(drop)
    return model.eval()
