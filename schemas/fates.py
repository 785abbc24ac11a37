"""Every planned shard's fate, and the run status, exit code and counts that follow from them, computed once.

A shard ends in exactly one fate, with its reason:

- `published`: its rows entered the lake in this run's snapshot;
- `reused`: its rows were already in the lake, from an earlier attempt of the same run id;
- `quarantined`: a data-quality suite failed on it, or its validation could not run (final: regrowing it would
  grow the same data again);
- `failed`: it could not be grown or landed, or it was corrupt and its regrowth failed too.

A run is `complete` only when every planned shard is published or reused, `partial` when some are, `failed`
when none is. The run summary (schemas/run.py) holds the fates; the CLI's exit code, the Prefect state, the `runs`
row and the report read the status it derives from them here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from schemas.shards import ShardReceipt

FATES = ("published", "reused", "quarantined", "failed")
IN_LAKE = ("published", "reused")
STATUSES = ("complete", "partial", "failed")
EXIT_CODES = {"complete": 0, "partial": 3, "failed": 1}
# What a shard's validation concluded; `corrupt` (its bytes or manifest are not what was landed) heals by regrowth.
CHECKS = ("passed", "quarantined", "corrupt", "failed")


@dataclass(frozen=True)
class ShardFate:
    """How one planned shard ended, and why."""

    shard_id: str
    fate: str
    reason: str = ""
    healed: str | None = None  # the corruption found in this run, when the shard was grown again over it
    trees: int | None = None
    pairs: int | None = None
    worker: str | None = None
    grow_wall_s: float | None = None

    def __post_init__(self) -> None:
        if self.fate not in FATES:
            raise ValueError(f"shard {self.shard_id}: fate must be one of {FATES}, got {self.fate!r}")

    def to_dict(self) -> dict[str, Any]:
        """Return this fate as JSON-safe values (the `fates` list of a run's summary)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ShardCheck:
    """What one attempt at a shard came to: grown (or found landed) and validated, or where it stopped."""

    shard_id: str
    outcome: str  # one of CHECKS
    reason: str = ""
    receipt: ShardReceipt | None = None  # the landed shard's receipt (manifest, stats, state, worker)
    validation_rows: tuple[Mapping[str, Any], ...] = ()
    record: str | None = None  # the key of its validation record in the store (outcomes and GX's results)

    def __post_init__(self) -> None:
        if self.outcome not in CHECKS:
            raise ValueError(f"shard {self.shard_id}: outcome must be one of {CHECKS}, got {self.outcome!r}")


def shard_fate(check: ShardCheck, healed: str | None = None) -> ShardFate:
    """Return the fate of a shard whose last attempt was `check` (`healed`: the corruption an earlier attempt of
    this run found). A shard that passed is `published` until the lake says it already held it (see `settle`)."""
    fate = {"passed": "published", "quarantined": "quarantined"}.get(check.outcome, "failed")
    reason = check.reason
    if check.outcome == "corrupt":  # a corrupt shard that is not grown again (or whose regrowth is corrupt too)
        reason = f"corrupt: {check.reason}"
    if healed and fate == "failed":
        reason = f"{reason} (grown again after: {healed})"
    if check.receipt is None:
        return ShardFate(check.shard_id, fate, reason, healed)
    stats = check.receipt.stats
    return ShardFate(check.shard_id, fate, reason, healed, stats.trees, stats.pairs, check.receipt.worker,
                     stats.grow_wall_s)


def settle(fates: Sequence[ShardFate], in_lake: Collection[str]) -> list[ShardFate]:
    """Return `fates` with each passing shard the lake already held (`in_lake`: shard ids) marked `reused`."""
    return [dataclasses.replace(f, fate="reused", reason="already in the lake")
            if f.fate == "published" and f.shard_id in in_lake else f for f in fates]


def run_status(fates: Sequence[ShardFate], planned: int) -> str:
    """Return `complete`, `partial` or `failed` for a run of `planned` shards that ended in `fates`."""
    if len(fates) != planned or len({f.shard_id for f in fates}) != planned:
        raise ValueError(f"{planned} shards planned, {len(fates)} fates for {len({f.shard_id for f in fates})} shards")
    done = sum(f.fate in IN_LAKE for f in fates)
    if planned and done == planned:
        return "complete"
    return "partial" if done else "failed"


def fate_counts(fates: Sequence[ShardFate], planned: int) -> dict[str, Any]:
    """Return the run's status and its shards by fate, as the `runs` row and the summary record them."""
    counts = {f"shards_{fate}": sum(f.fate == fate for f in fates) for fate in FATES}
    return {"status": run_status(fates, planned), "shards_planned": planned, **counts,
            "shards_healed": sum(f.healed is not None and f.fate in IN_LAKE for f in fates)}


def problems(fates: Sequence[ShardFate]) -> list[str]:
    """Return one line per shard that did not reach the lake, or reached it only after being grown again."""
    lines = [f"shard {f.shard_id} {f.fate}: {f.reason}" for f in fates if f.fate not in IN_LAKE]
    lines += [f"shard {f.shard_id} was corrupt and was grown again: {f.healed}" for f in fates
              if f.healed and f.fate in IN_LAKE]
    return lines


def exit_code(status: str) -> int:
    """Return the CLI's exit code for a run status: 0 complete, 3 partial, 1 failed."""
    return EXIT_CODES[status]
