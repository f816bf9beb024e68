"""Pass contract and pass manager.

A pass has a name, checks what it ``requires`` before running, returns how many rewrites fired, and checks
what it ``ensures`` afterwards (after onnx-ir's ``PassBase``). The manager runs an ordered pipeline, checks
after every pass that the program still computes the same outputs on a fixed probe input, can dump the
program after a named pass, and returns a log that goes into the artifact's manifest.

A pass that fires zero times on a ZAYA program is an error, not a log line: every ZAYA1 layer has exactly
one CCA, one attention and one MoE region, so a zero count means the model code and the pass disagree.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

IR = TypeVar("IR")


class PassError(RuntimeError):
    """A pass's precondition or postcondition failed, or the program changed its outputs."""


class Pass(ABC, Generic[IR]):
    name: str = "pass"
    allow_zero: bool = False  # cleanup passes may legitimately find nothing

    def requires(self, ir: IR) -> None:  # noqa: B027 - optional hook
        """Raise :class:`PassError` when ``ir`` is not what this pass expects."""

    @abstractmethod
    def run(self, ir: IR) -> int:
        """Rewrite ``ir`` in place; return the number of rewrites that fired."""

    def ensures(self, ir: IR, rewrites: int) -> None:  # noqa: B027 - optional hook
        """Raise :class:`PassError` when the rewrite left ``ir`` in a state it should not be in."""


@dataclass
class PassRecord:
    name: str
    rewrites: int
    seconds: float
    max_abs_diff: float | None  # probe outputs after the pass vs before the pipeline

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class PassManager(Generic[IR]):
    """Run passes in order; verify with ``probe`` (IR → list of arrays/tensors) against the pre-pipeline
    outputs within ``atol``; dump with ``dump(ir) -> str`` after the passes named in ``dump_after``."""

    def __init__(self, passes: Sequence[Pass[IR]], probe: Callable[[IR], list] | None = None, atol: float = 1e-4,
                 dump: Callable[[IR], str] | None = None, dump_after: Sequence[str] = (),
                 dump_dir: Path | None = None) -> None:
        names = [p.name for p in passes]
        unknown = sorted(set(dump_after) - set(names))
        if unknown:
            raise PassError(f"--dump-after names unknown passes {unknown}; the pipeline is {names}")
        self.passes, self.probe, self.atol = list(passes), probe, atol
        self.dump, self.dump_after, self.dump_dir = dump, set(dump_after), dump_dir

    def run(self, ir: IR) -> list[PassRecord]:
        reference = self.probe(ir) if self.probe else None
        log = []
        for index, p in enumerate(self.passes):
            start = time.perf_counter()
            p.requires(ir)
            rewrites = p.run(ir)
            if rewrites == 0 and not p.allow_zero:
                raise PassError(f"pass {p.name} found nothing to rewrite")
            p.ensures(ir, rewrites)
            diff = None
            if reference is not None:
                diff = max_abs_diff(self.probe(ir), reference)
                if diff > self.atol:
                    raise PassError(f"pass {p.name} changed the outputs: max abs diff {diff:.3g} > {self.atol:g}")
            log.append(PassRecord(p.name, rewrites, round(time.perf_counter() - start, 4), diff))
            if p.name in self.dump_after and self.dump is not None:
                text = self.dump(ir)
                if self.dump_dir is not None:
                    self.dump_dir.mkdir(parents=True, exist_ok=True)
                    (self.dump_dir / f"{index:02d}-{p.name}.txt").write_text(text)
        return log


def max_abs_diff(got: list, want: list) -> float:
    import numpy as np

    if len(got) != len(want):
        raise PassError(f"the program now has {len(got)} outputs instead of {len(want)}")
    worst = 0.0
    for a, b in zip(got, want):
        a, b = np.asarray(_to_numpy(a), dtype=np.float64), np.asarray(_to_numpy(b), dtype=np.float64)
        if a.shape != b.shape:
            raise PassError(f"an output changed shape: {a.shape} vs {b.shape}")
        if a.size:
            worst = max(worst, float(np.max(np.abs(a - b))))
    return worst


def _to_numpy(x: Any) -> Any:
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    return x
