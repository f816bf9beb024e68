"""Greedy AR decoding of the eager model on a GPU with static buffers, one decode step per CUDA/HIP graph launch.

The model's own decode (``models.decoding.decode``) slices the committed slots out of the state, so every step
has a new cache length: new shapes, no graph. Here every step reads the whole fixed-capacity buffer instead,
with the empty slots marked invalid (the attention mask drops them and positions count valid slots only, so
the numbers are those of the sliced cache), and commits through the one commit rule (``write_rows``,
``committed_window``) at a length held in a device tensor. Then the step — forward, argmax, commit, the next
token written into the input buffer — has fixed shapes and no host synchronisation, and torch's
``CUDAGraph`` (a HIP graph on torch's ROCm build) replays it from one host call.

``kernels=True`` runs the fused ops as their Triton kernels (``kernels.triton_faces``) inside the fusion scope;
without it the reference ops run, which is also how the static step is checked on the CPU (no capture there).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack

import torch
from torch import Tensor

import zaya_export.kernels as kernels
from zaya_export.models import ZayaForCausalLM
from zaya_export.models.decoding import prefill
from zaya_export.models.layout import Readout
from zaya_export.models.state import Past, write_rows
from zaya_export.passes.fusion import fused

from .generate import GenerationResult, left_pad

DEVICES = ("cpu", "cuda", "hip")


def torch_device(name: str) -> torch.device:
    """``hip`` is torch's ``cuda`` device on a ROCm build; refused where torch has no such GPU."""
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}; choose from {', '.join(DEVICES)}")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch ({torch.__version__}) sees no GPU")
    built_for = "hip" if torch.version.hip else "cuda"
    if name != built_for:
        raise ValueError(f"--device {name}: this torch is a {built_for.upper()} build; use --device {built_for}")
    return torch.device("cuda")


def kernel_scope(model: ZayaForCausalLM, kernels_on: bool) -> ExitStack:
    """The fused ops as Triton kernels (``kernels_on``), or the reference model as it is."""
    stack = ExitStack()
    if kernels_on:
        stack.enter_context(fused(model))
        stack.enter_context(kernels.triton_faces())
    return stack


def capture_step(step: Callable[[], None], buffers: Callable[[], list[Tensor]],
                 scope: Callable[[], ExitStack]) -> torch.cuda.CUDAGraph:
    """Record one ``step`` as a CUDA/HIP graph: two warm-up steps on a side stream (Triton compiles and
    autotunes outside the capture), every buffer the step writes put back, then the capture."""
    saved = [t.clone() for t in buffers()]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), scope():
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    for buf, value in zip(buffers(), saved):
        buf.copy_(value)
    graph = torch.cuda.CUDAGraph()
    with scope(), torch.cuda.graph(graph):
        step()
    return graph


class GraphDecoder:
    """Prefill eagerly, then decode one token per row per :meth:`step` (a graph replay on a GPU)."""

    def __init__(self, model: ZayaForCausalLM, kernels_on: bool = True, graph: bool | None = None) -> None:
        self.model = model
        self.kernels_on = kernels_on
        self.device = next(model.parameters()).device
        self.graph_on = self.device.type == "cuda" if graph is None else graph
        self.graph: torch.cuda.CUDAGraph | None = None

    def _scope(self) -> ExitStack:
        return kernel_scope(self.model, self.kernels_on)

    def _buffers(self) -> list[Tensor]:
        s = self.state
        return [s.k, s.v, s.valid, s.conv, s.rho, self.lengths, self.token]

    @torch.no_grad()
    def prefill(self, ids: Tensor, mask: Tensor | None, max_new_tokens: int) -> Tensor:
        """Run the prompt ``[B, T]`` into a state of capacity T + max_new_tokens; the first greedy token [B]."""
        with self._scope():
            logits, self.state = prefill(self.model, ids, mask, capacity=ids.shape[1] + max_new_tokens)
        B = ids.shape[0]
        self.lengths = torch.full((B,), self.state.length, dtype=torch.long, device=self.device)
        self.ones = torch.ones(B, dtype=torch.long, device=self.device)
        self.one_valid = torch.ones(B, 1, dtype=torch.bool, device=self.device)
        self.token = logits.argmax(-1)  # [B], the input buffer of the next step
        self.graph = None
        if self.graph_on:
            self.graph = capture_step(self._step, self._buffers, self._scope)
        return self.token.clone()

    def _step(self) -> None:
        """One static-shape decode step on the buffers: reads self.token, writes the next one."""
        s = self.state
        past = Past(s.k, s.v, s.valid, s.conv, s.rho)  # the whole capacity; empty slots are invalid
        logits, update = self.model.step(self.token[:, None], past, readout=Readout.LAST)
        write_rows(s.k, s.v, s.valid, self.lengths, self.ones, self.one_valid, update.k, update.v)
        conv, rho = update.committed(self.ones, s.rho)
        s.conv.copy_(conv)
        s.rho.copy_(rho)
        self.lengths.add_(1)
        self.token.copy_(logits[:, -1].argmax(-1))

    @torch.no_grad()
    def step(self) -> Tensor:
        """Decode one token per row; the new token [B] (a view of the input buffer: copy to keep it)."""
        if self.state.length + 1 > self.state.capacity:
            raise ValueError(f"decode state is full ({self.state.capacity} slots)")
        if self.graph is not None:
            self.graph.replay()
        else:
            with self._scope():
                self._step()
        self.state.length += 1  # host mirror of self.lengths (no sync needed)
        return self.token


def generate_static(model: ZayaForCausalLM, ids: Tensor, max_new_tokens: int, mask: Tensor | None = None,
                    kernels_on: bool = True, graph: bool | None = None) -> tuple[Tensor, float]:
    """Greedy tokens ``[B, max_new_tokens]`` and decode tokens/s per row (after the first token)."""
    decoder = GraphDecoder(model, kernels_on, graph)
    out = [decoder.prefill(ids, mask, max_new_tokens)]
    sync = torch.cuda.synchronize if decoder.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(max_new_tokens - 1):
        out.append(decoder.step().clone())
    sync()
    seconds = time.perf_counter() - start
    return torch.stack(out, 1), (max_new_tokens - 1) / seconds if max_new_tokens > 1 and seconds > 0 else 0.0


def generate_on_device(model: ZayaForCausalLM, prompts: list[list[int]], max_new_tokens: int,
                       stop_ids: list[int] | None, device: str, kernels_on: bool = True,
                       tidar: tuple[int, tuple[int, ...]] | None = None) -> GenerationResult:
    """``run --backend torch --device cuda|hip``: greedy decoding of ``model`` moved to the GPU, the fused ops
    as Triton kernels: AR with every decode step one graph launch (prefill + max_new_tokens − 1 steps), or
    with ``tidar`` = (K, levels) fused TiDAR with every packed step one launch (``graph_tidar.py``). Rows are
    cut after their first stop token, as the host loops do."""
    target = torch_device(device)
    model = model.to(target)
    ids, mask = (torch.from_numpy(a).to(target) for a in left_pad(prompts, model.config.pad_token_id or 0))
    mask = mask.bool() if bool((mask == 0).any()) else None  # None: no padding, no mask to apply
    if tidar is not None:
        from .graph_tidar import generate_tidar_static

        return generate_tidar_static(model, ids, max_new_tokens, mask,
                                     kernels_on, block_len=tidar[0], levels=tidar[1], stop_ids=stop_ids)
    sync = torch.cuda.synchronize if target.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    decoder = GraphDecoder(model, kernels_on)
    out = [decoder.prefill(ids, mask, max_new_tokens)]
    sync()
    first_seconds = time.perf_counter() - start
    for _ in range(max_new_tokens - 1):
        out.append(decoder.step().clone())
    tokens = torch.stack(out, 1).tolist()  # one host sync, at the end
    seconds = time.perf_counter() - start
    stops = set(stop_ids or ())
    rows = [row[: next((i + 1 for i, t in enumerate(row) if t in stops), len(row))] for row in tokens]
    return GenerationResult(rows, max_new_tokens, seconds, first_seconds)
