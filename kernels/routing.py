"""The biased top-1 routing decision, written once, and a scoped tape that records or replays it.

Every MoE implementation (the model's ``Router``, the fused ``zaya.moe_top1`` reference and its MLIR faces)
calls :func:`top1` for the discrete choice ``e* = argmax_j fp32(π_j) + β_j``. That argmax is the one place
where two correct computations of the same model can disagree by more than rounding: when two classes are
within rounding of each other (a near tie), float noise picks either, and the chosen expert moves that token
a lot. Checks that compare two computations must therefore compare routing *separately* from numbers:

* ``RoutingTape("record")`` keeps, per MoE call in order, each token's choice, runner-up and margin
  (biased score of the winner minus the runner-up's);
* ``RoutingTape("replay", forced)`` makes every call use the recorded choices instead of its own (so the
  numbers of the two computations stay comparable), while still recording what it *would* have chosen; the
  caller then counts the tokens that chose differently and looks at their margins (:func:`routing_flips`).

Outside a tape (the default, and always while tracing) :func:`top1` is a plain argmax. The tape is scoped to
a ``with`` block on one thread and never leaks into another computation.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Route:
    """One MoE call's decisions over its N tokens (flattened batch × time)."""

    choice: Tensor  # [N] int64, E = skip class
    runner_up: Tensor  # [N] int64
    margin: Tensor  # [N] fp32, biased score of choice − of runner-up (≥ 0 for a free choice)


@dataclass
class RoutingTape:
    """``mode``: "record" or "replay". ``forced``: the choices to replay, one [N] tensor per call in order;
    ``limit``: replay only the first ``limit`` calls and route freely after (None = all)."""

    mode: str = "record"
    forced: list[Tensor] = field(default_factory=list)
    limit: int | None = None
    routes: list[Route] = field(default_factory=list)  # what each call chose (or would have chosen)

    def choices(self) -> list[Tensor]:
        return [r.choice for r in self.routes]


class _Active(threading.local):
    tape: RoutingTape | None = None


# Thread-local, not a context variable: custom-op implementations can run in another contextvars context
# (seen once transformers is imported), where a ContextVar set by the caller reads as unset.
_ACTIVE = _Active()


@contextmanager
def routing_tape(tape: RoutingTape) -> Iterator[RoutingTape]:
    """Record (or replay) every routing decision made inside the block (this thread only)."""
    outer, _ACTIVE.tape = _ACTIVE.tape, tape
    try:
        yield tape
    finally:
        _ACTIVE.tape = outer


def top1(probs: Tensor, balancing: Tensor) -> Tensor:
    """Biased top-1 choice ``[N]`` from router probabilities ``probs`` [N, E+1] and fp32 biases [E+1]."""
    scores = probs.float() + balancing  # [N, E+1]
    choice = scores.argmax(-1)  # argmax, not topk: IREE mis-lowers topk k=1
    tape = _ACTIVE.tape
    if tape is None or torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return choice
    if scores.shape[-1] > 1:
        two = scores.topk(2, dim=-1)
        runner_up = torch.where(two.indices[:, 0] == choice, two.indices[:, 1], two.indices[:, 0])
    else:
        runner_up = choice
    margin = scores.gather(-1, choice[:, None]).squeeze(-1) - scores.gather(-1, runner_up[:, None]).squeeze(-1)
    call = len(tape.routes)
    tape.routes.append(Route(choice.clone(), runner_up, margin))
    if tape.mode == "replay" and (tape.limit is None or call < tape.limit):
        if call >= len(tape.forced):
            raise RuntimeError(f"routing replay: call {call} has no recorded decision ({len(tape.forced)} recorded)")
        forced = tape.forced[call]
        if forced.shape != choice.shape:
            raise RuntimeError(f"routing replay: call {call} routes {tuple(choice.shape)} tokens, the record "
                               f"{tuple(forced.shape)}")
        return forced.to(choice.device)
    return choice


@dataclass(frozen=True)
class Flip:
    """A token whose own choice differs from the replayed one."""

    call: int  # MoE call index (layer order within each forward)
    token: int  # flat token index within that call
    forced: int
    own: int
    margin: float  # the reference's margin between its winner and runner-up at that token


def routing_flips(reference: list[Route], replayed: list[Route], forced: list[Tensor]) -> list[Flip]:
    """Tokens where a replayed computation would have chosen another expert than the one forced on it, with
    the reference's routing margin at that token (a near tie when it is within rounding)."""
    flips = []
    for call, (ref, rep, want) in enumerate(zip(reference, replayed, forced)):
        for t in (rep.choice != want).nonzero().flatten().tolist():
            flips.append(Flip(call, t, int(want[t]), int(rep.choice[t]), float(ref.margin[t])))
    return flips
