"""The shard contracts between stages: what growing a shard counted, how its validation came out, and its receipt.

Growth (tasks/grow.py) makes the stats and lands them in the shard's manifest; the grow-shard task (or, for a shard
grown on a worker, the dispatch task from the manifest in the store) makes the receipt; the flow's check, the fates
and the run summary read them. The stats cross the store as the manifest's `stats` object (`to_dict`/`from_dict`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

RECEIPT_STATES = ("landed", "reused", "quarantined")


@dataclass(frozen=True)
class ShardStats:
    """What growing one shard made and cost: counts of trees, nodes and pairs, why rows were dropped, the requests
    sent and failed, and the engines' usage over the shard's growth."""

    trees: int = 0
    nodes: int = 0
    actions: int = 0  # answers: first attempts and refinements
    correct: int = 0
    critiques: int = 0
    pairs: int = 0
    pairs_found: int = 0  # after pair hygiene, before the run's contrast and difficulty selection
    drops: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # stage -> reason -> rows
    pairs_by_method: Mapping[str, int] = field(default_factory=dict)
    mcts: Mapping[str, int] = field(default_factory=dict)
    principle_examples: int = 0
    principle_labels: Mapping[str, int] = field(default_factory=dict)
    judgements: int = 0
    verdicts_unread: int = 0
    turns: int = 0
    requests: Mapping[str, Any] = field(default_factory=dict)  # sent, failed, failed_by_reason[, first_failure]
    trees_unanswered: int = 0  # trees that got no answer at all (their requests failed): they have no pairs
    grow_wall_s: float = 0.0
    engine: Mapping[str, Any] = field(default_factory=dict)  # the engines' usage (Usage.as_dict), wall_s, tokens/s
    prefix_cache: Mapping[str, Any] | None = None  # PrefixCache.as_dict; set by the growth host

    def to_dict(self) -> dict[str, Any]:
        """Return the stats as the manifest's `stats` object holds them (no `prefix_cache` where none was read)."""
        stats = dataclasses.asdict(self)
        if self.prefix_cache is None:
            del stats["prefix_cache"]
        return stats

    @classmethod
    def from_dict(cls, stats: Mapping[str, Any]) -> ShardStats:
        """Return the stats a manifest holds. A manifest landed by an earlier version may lack later keys (they read
        as nothing counted) or hold keys no longer counted (left out)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in stats.items() if k in known})


@dataclass(frozen=True)
class RecordedValidation:
    """How a landed shard's validation came out, and where its record is (beside the shard or its quarantine)."""

    outcome: str  # passed | quarantined
    summary: str = ""  # why it was quarantined
    rows: tuple[Mapping[str, Any], ...] = ()  # rows of the lake's `validations` table
    key: str | None = None  # the record's key in the store
    gx: bool = True  # whether the record holds GX's own results (a shard passed in a batch has none)


@dataclass(frozen=True)
class ShardReceipt:
    """What one attempt at a shard left: `landed` now, `reused` (an earlier attempt of the run landed it) or
    `quarantined`; its manifest, stats and validation, and the corruption it was grown again over, if any."""

    shard_id: str
    state: str  # one of RECEIPT_STATES
    manifest: Mapping[str, Any]
    stats: ShardStats = field(default_factory=ShardStats)
    validation: RecordedValidation | None = None  # None: not validated where it was grown
    healed: str | None = None
    landed_at: float | None = None  # time.time() when this attempt landed it; None: the manifest says, to the second
    worker: str | None = None  # the Prefect worker that grew it; None: grown in the flow's process

    def __post_init__(self) -> None:
        if self.state not in RECEIPT_STATES:
            raise ValueError(f"shard {self.shard_id}: receipt state must be one of {RECEIPT_STATES}, "
                             f"got {self.state!r}")

    @classmethod
    def of_manifest(cls, shard_id: str, state: str, manifest: Mapping[str, Any], **rest: Any) -> ShardReceipt:
        """Return the receipt of the shard `manifest` describes, its stats read from the manifest."""
        return cls(shard_id, state, manifest, ShardStats.from_dict(manifest.get("stats") or {}), **rest)

    def to_dict(self) -> dict[str, Any]:
        """Return the receipt as JSON-safe values (a grow-shard flow run's result)."""
        return {**dataclasses.asdict(self), "stats": self.stats.to_dict()}
