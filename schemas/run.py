"""The run summary: what a run grew, published and cost, and how each planned shard ended.

The report (tasks/report.py) builds it from the shards' receipts and fates; the publishing transaction
(tasks/materialise.py) settles its fates against the lake and writes it as the `runs` row; the report, the CLI and
the flow's result read it. The run's status and shard counts are not stored in it: they follow from its fates
(schemas/fates.py), so a summary whose fates are settled says the settled counts, and nothing writes them twice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from schemas.fates import ShardFate, fate_counts, run_status, settle
from schemas.fates import problems as shard_problems
from schemas.plan import SourceCount


@dataclass(frozen=True)
class RunReport:
    """What the report read back from the published snapshot: per pair method, the jury, the drops, prm_steps."""

    curation: Mapping[str, Any] = field(default_factory=dict)
    jury: Mapping[str, Any] | None = None
    dropped: Mapping[str, Any] | None = None
    prm_steps: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunSummary:
    """One run: its fates, the totals of the shards that passed, what the shards grown now cost, and, as the run
    goes on, its snapshot id, Data Docs, report and stage times."""

    run_id: str
    flow_run_id: str | None
    config_hash: str
    started_at: str  # ISO 8601, UTC
    shards_planned: int
    fates: tuple[ShardFate, ...]
    nothing_planned: str | None  # why nothing was planned (the hygiene gate dropped every instruction), if so
    # Totals over the shards that passed:
    trees: int
    nodes: int
    pairs: int
    pairs_by_method: Mapping[str, int]
    pass_rate: float | None
    # What the shards grown now cost (not reused ones): tokens, throughput over the growth, prefix cache, price.
    prompt_tokens: int
    completion_tokens: int
    wall_s: float
    tokens_per_s: float | None
    prefix_cache: Mapping[str, Any]  # PrefixCache.as_dict of the shards grown now
    gpu_hours: float | None
    cost_usd: float | None
    priced: bool
    requests: Mapping[str, Any]  # sent, failed, failed_by_reason: of the shards grown now
    prefix_cache_by_shard: Mapping[str, Mapping[str, Any]]  # each shard grown now: its PrefixCache.as_dict
    trees_unanswered: int
    seeds: tuple[SourceCount, ...]
    prm_min_rollouts: int  # the prm_steps view reads it from the runs row
    drops_before_growth: Mapping[str, Mapping[str, int]]  # the hygiene gate's: stage -> reason -> rows
    contaminated: Mapping[str, Any]  # instructions flagged, and by eval set
    snapshot_id: int | None = None  # set once published
    data_docs: str | None = None
    view: str | None = None  # the run view's index.html (tasks/view.py)
    report: RunReport | None = None
    stages: Mapping[str, float] | None = None  # wall seconds of each stage, in order

    @property
    def status(self) -> str:
        """`complete`, `partial` or `failed`, from the fates."""
        return run_status(self.fates, self.shards_planned)

    @property
    def problems(self) -> list[str]:
        """One line per shard that did not reach the lake or was grown again, and why nothing was planned."""
        return shard_problems(self.fates) + ([self.nothing_planned] if self.nothing_planned else [])

    @property
    def counts(self) -> dict[str, Any]:
        """The status and the shards by fate (`shards_published`, …, `shards_healed`), as the runs row holds them."""
        return fate_counts(self.fates, self.shards_planned)

    @property
    def cached_share(self) -> float | None:
        return self.prefix_cache.get("cached_share")

    def settled(self, in_lake: Collection[str]) -> RunSummary:
        """Return this summary with each passing shard the lake already held (`in_lake`: shard ids) `reused`."""
        return dataclasses.replace(self, fates=tuple(settle(self.fates, in_lake)))

    def to_dict(self) -> dict[str, Any]:
        """Return the summary as JSON-safe values, with the status and counts its fates give: the flow's result, the
        report's table artifact and, in part, the `runs` row. The report's parts and the stage times appear once
        they are known."""
        summary = {
            "run_id": self.run_id, "flow_run_id": self.flow_run_id, "config_hash": self.config_hash,
            "started_at": self.started_at, **self.counts, "fates": [f.to_dict() for f in self.fates],
            "problems": self.problems, "nothing_planned": self.nothing_planned,
            "trees": self.trees, "nodes": self.nodes, "pairs": self.pairs, "pairs_by_method": dict(self.pairs_by_method),
            "pass_rate": self.pass_rate, "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens, "wall_s": self.wall_s, "tokens_per_s": self.tokens_per_s,
            "prefix_cache": dict(self.prefix_cache), "gpu_hours": self.gpu_hours, "cost_usd": self.cost_usd,
            "priced": self.priced, "cached_share": self.cached_share, "requests": dict(self.requests),
            "prefix_cache_by_shard": dict(self.prefix_cache_by_shard), "trees_unanswered": self.trees_unanswered,
            "seeds": [source.to_dict() for source in self.seeds], "prm_min_rollouts": self.prm_min_rollouts,
            "drops_before_growth": dict(self.drops_before_growth), "contaminated": dict(self.contaminated),
            "snapshot_id": self.snapshot_id, "data_docs": self.data_docs, "view": self.view,
        }
        if self.report is not None:
            summary.update(dataclasses.asdict(self.report))
        if self.stages is not None:
            summary["stages"] = dict(self.stages)
        return summary
