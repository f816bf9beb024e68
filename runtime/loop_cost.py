"""What a decode step costs outside its forwards: the host loop's own work, measured in the loop itself.

Each step of ``generate`` / ``generate_tidar`` also assembles the entry inputs, runs the acceptance rule,
commits the state (host buffers, or the device's in-place commit entries), emits tokens and checks stops.
Timing the commit alone missed the rest: on the demo artifact every onnxruntime prediction came out 5–20%
fast. :func:`host_ms_per_step` runs a short real generation with every forward timed as it happens and
returns the remainder per step, which :mod:`.costmodel` adds to each step's forwards in place of the commit.
"""

from __future__ import annotations

import time

from .generate import generate
from .session import Session
from .tidar import generate_tidar

HOST_TOKENS = 48  # new tokens of the timed generation: enough steps that its setup is a small share
WARMUP_TOKENS = 8  # the untimed generation before it (sessions, allocators, the first draft's buffers)


def host_ms_per_step(session: Session, mode: str, prompt: list[int], new_tokens: int = HOST_TOKENS) -> float:
    """ms per step of ``mode``'s greedy loop outside its forwards (``ar``, ``tidar`` or ``tidar-fused``), from
    a short warm-up and one timed generation of ``new_tokens`` after ``prompt``."""
    forward_s = 0.0
    run = session.run

    def timed(entry: str, inputs: dict):  # noqa: ANN202 - the entry's outputs
        nonlocal forward_s
        start = time.perf_counter()
        try:
            return run(entry, inputs)
        finally:
            forward_s += time.perf_counter() - start

    def once(tokens: int):  # noqa: ANN202 - a generation result
        if mode == "ar":
            return generate(session, [prompt], tokens)
        return generate_tidar(session, [prompt], tokens, fused=mode == "tidar-fused")

    session.run = timed  # the instance attribute shadows the method for this measurement only
    try:
        once(min(WARMUP_TOKENS, new_tokens))
        forward_s = 0.0
        result = once(new_tokens)
    finally:
        del session.run
    steps = result.forwards - 1 if mode == "ar" else result.steps
    return max(result.seconds - forward_s, 0.0) * 1e3 / max(steps, 1)
