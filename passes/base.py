"""Pass contract and pass manager.

A pass has a name, checks what it ``requires`` before running, returns how many rewrites fired, and checks
what it ``ensures`` afterwards (after onnx-ir's ``PassBase``). The manager runs an ordered pipeline, checks
after every pass that the program still computes the same outputs on fixed probe inputs (``probe_check``:
relative to each output's scale, routing decisions compared on their own), can dump the
program after a named pass, and returns a log that goes into the artifact's manifest.

A pass that fires zero times on a ZAYA program is an error, not a log line: every ZAYA1 layer has exactly
one CCA, one attention and one MoE region, so a zero count means the model code and the pass disagree.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from .probe_check import PROBE_TOLERANCE, ProbeTolerance, record, replay

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
    # probe outputs after the pass vs before the pipeline, routing replayed (``probe_check``); None: no probe
    max_abs_diff: float | str | None = None
    max_rel_diff: float | str | None = None
    routing_flips: int | None = None  # near-tie tokens that would have chosen another expert (tolerated)
    max_flip_margin: float | None = None
    # the probe ran on the first N layers only (a streamed export's truncated model); None: on the whole model
    probe_layers: int | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if d["probe_layers"] is None:  # the key appears only where it says something
            del d["probe_layers"]
        return d

    @classmethod
    def from_json(cls, d: Any, where: str) -> PassRecord:  # noqa: ANN401
        """Read one record back (a manifest's pass log); ``ValueError`` names the bad field."""
        known = {f.name for f in fields(cls)}
        if not isinstance(d, dict) or not {"name", "rewrites"} <= d.keys() or not d.keys() <= known:
            raise ValueError(f"{where}: expected a pass record with keys from {sorted(known)}")
        if not isinstance(d["name"], str) or type(d["rewrites"]) is not int:
            raise ValueError(f"{where}: name must be a string and rewrites an integer")
        for key in ("seconds", "max_abs_diff", "max_rel_diff", "max_flip_margin"):
            if key in d and not isinstance(d[key], (int, float, str, type(None))):
                raise ValueError(f"{where}.{key}: expected a number")
        for key in ("routing_flips", "probe_layers"):
            if d.get(key) is not None and type(d[key]) is not int:
                raise ValueError(f"{where}.{key}: expected an integer")
        return cls(**{"seconds": 0.0, **d})


class PassManager(Generic[IR]):
    """Run passes in order; verify with ``probe`` (IR → list of tensors) against the pre-pipeline outputs,
    with the reference's routing replayed and errors relative to each output's scale (``tolerance``, keyed
    by dtype: ``probe_check.PROBE_TOLERANCE``); dump with ``dump(ir) -> str`` after the passes named in
    ``dump_after``."""

    def __init__(self, passes: Sequence[Pass[IR]], probe: Callable[[IR], list] | None = None,
                 tolerance: ProbeTolerance | None = None, dump: Callable[[IR], str] | None = None,
                 dump_after: Sequence[str] = (), dump_dir: Path | None = None) -> None:
        names = [p.name for p in passes]
        unknown = sorted(set(dump_after) - set(names))
        if unknown:
            raise PassError(f"--dump-after names unknown passes {unknown}; the pipeline is {names}")
        self.passes, self.probe = list(passes), probe
        self.tolerance = tolerance or PROBE_TOLERANCE[torch.float32]
        self.dump, self.dump_after, self.dump_dir = dump, set(dump_after), dump_dir

    def run(self, ir: IR) -> list[PassRecord]:
        reference = record(lambda: self.probe(ir)) if self.probe else None
        log = []
        for index, p in enumerate(self.passes):
            start = time.perf_counter()
            p.requires(ir)
            rewrites = p.run(ir)
            if rewrites == 0 and not p.allow_zero:
                raise PassError(f"pass {p.name} found nothing to rewrite")
            p.ensures(ir, rewrites)
            check = {}
            if reference is not None:
                try:
                    result = replay(lambda: self.probe(ir), reference)
                except ValueError as exc:
                    raise PassError(f"pass {p.name}: {exc}") from None
                if not result.ok(self.tolerance):
                    raise PassError(f"pass {p.name} changed the outputs: {result.describe(self.tolerance)}")
                check = result.to_json()
            log.append(PassRecord(p.name, rewrites, round(time.perf_counter() - start, 4), **check))
            if p.name in self.dump_after and self.dump is not None:
                text = self.dump(ir)
                if self.dump_dir is not None:
                    self.dump_dir.mkdir(parents=True, exist_ok=True)
                    (self.dump_dir / f"{index:02d}-{p.name}.txt").write_text(text)
        return log
