"""The plan contracts between stages: an instruction to grow, a shard of them, and the run's seed plan.

Planning (tasks/seeds.py, tasks/plans.py) makes them; growth, the jury, pairs and the report read them.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Instruction:
    """One task to solve, with its exact reference answer."""

    instruction_id: str
    domain: str
    source: str
    source_row: int
    text: str
    reference: str
    difficulty: int

    def as_row(self) -> dict:
        return asdict(self)


def instruction_id(domain: str, text: str, reference: str) -> str:
    """Return a stable id from what the instruction says, so the same seed gets the same id in every run."""
    return hashlib.sha256(f"{domain}\x1f{text}\x1f{reference}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ShardPlan:
    """A batch of instructions that is grown, landed, validated and published as one unit."""

    shard_id: str
    index: int
    instructions: tuple[Instruction, ...]


@dataclass(frozen=True)
class SourceCount:
    """How many rows one seed source gave, how many became instructions, and why the others did not."""

    source: str  # e.g. "seeds[0] gsm8k data/train.jsonl"
    read: int
    kept: int
    dropped: dict[str, int]  # reason -> rows

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SeedPlan:
    """The run's shards, what each seed source contributed to them, and what the hygiene gate dropped and flagged
    before planning: rows of the lake's `drops` (run-level: shard_id null) and `contamination` tables."""

    plans: list[ShardPlan]
    sources: list[SourceCount]
    drops: list[dict] = field(default_factory=list)
    contamination: list[dict] = field(default_factory=list)
