"""``calibration.json``: the acceptance-length histograms an export measured, which the cost model
(:mod:`.costmodel`) combines with the cost curve measured where the artifact runs."""

from __future__ import annotations

from dataclasses import dataclass

CALIBRATION_FILE = "calibration.json"  # in the artifact, hashed like every file


@dataclass(frozen=True)
class Calibration:
    """Acceptance-length histograms measured at export (greedy lossless, eager model, ``prompts`` prompts of
    held-out code, ``new_tokens`` each): what the drafts achieve does not depend on the machine, so it travels
    with the artifact; the cost curve does, so it is measured where the artifact runs. ``lookup``: whether the
    drafts included context-lookup continuations (``runtime.lookup``; calibrations written before it existed
    did not)."""

    acceptance: dict[str, list[int]]
    prompts: int
    new_tokens: int
    source: str
    lookup: bool = False

    def to_json(self) -> dict:
        return {"acceptance": self.acceptance, "prompts": self.prompts, "new_tokens": self.new_tokens,
                "source": self.source, "lookup": self.lookup}

    @classmethod
    def from_json(cls, d: object, block_len: int) -> "Calibration":
        """Parse ``calibration.json``; ``ValueError`` names what is wrong."""
        keys = {"acceptance", "prompts", "new_tokens", "source"}
        if not isinstance(d, dict) or not keys <= set(d) <= keys | {"lookup"}:
            raise ValueError("expected the keys acceptance, prompts, new_tokens, source (and lookup)")
        if not isinstance(d.get("lookup", False), bool):
            raise ValueError("lookup: expected true or false")
        acc = d["acceptance"]
        if not isinstance(acc, dict) or not set(acc) <= {"tidar", "tidar-fused"}:
            raise ValueError("acceptance: expected histograms for tidar and/or tidar-fused")
        for mode, hist in acc.items():
            if (not isinstance(hist, list) or len(hist) != block_len + 1
                    or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in hist)):
                raise ValueError(f"acceptance.{mode}: expected {block_len + 1} non-negative integer counts")
        for key in ("prompts", "new_tokens"):
            if not isinstance(d[key], int) or isinstance(d[key], bool) or d[key] < 0:
                raise ValueError(f"{key}: expected a non-negative integer")
        if not isinstance(d["source"], str):
            raise ValueError("source: expected a string")
        return cls({m: list(h) for m, h in acc.items()}, d["prompts"], d["new_tokens"], d["source"],
                   d.get("lookup", False))
