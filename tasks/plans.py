"""The run's plan, kept in the object store beside its shards: tasks and deployment runs carry a reference to it.

Layout:

    runs/<run_id>/plans/<shard_id>.json   one shard's plan: its instructions, hidden tests and references included
    runs/<run_id>/plans/index.json        written last: the shards in plan order (references), what each seed source
                                          gave, what the hygiene gate dropped and flagged, and the config hash

A run is planned once: a resumed run (same run id, same config) reads its index and grows the same shards, even if
the lake's history changed since. A run id planned under another config, and never published, is planned again
(its old plans are removed); one published under another config is refused before planning (check_run_id_task).
Parameters (shown in the Prefect UI, sent to every worker) hold only `ShardRef`s, whatever the size of a shard.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from orchard.config import Config
from orchard.store import ObjectMissing, ObjectStore, StoreError
from schemas.errors import OrchardError, retry_transient
from schemas.plan import Instruction, ShardPlan, SourceCount
from tasks.history import earlier_lookup
from tasks.land import put_replacing
from tasks.seeds import plan_seeds

INDEX = "index.json"


class PlanError(OrchardError):
    """A stored plan cannot be read, or is not the plan it is referred to as; the message names its key."""


@dataclass(frozen=True)
class ShardRef:
    """A planned shard as parameters carry it: its id, place in the plan, size, and the key of its plan."""

    shard_id: str
    index: int
    key: str  # runs/<run_id>/plans/<shard_id>.json
    instructions: int


@dataclass
class RunPlan:
    """The run's shards (references, in plan order), what each seed source gave, and the rows of the lake's `drops`
    (run-level) and `contamination` tables that planning wrote; `resumed` when read from an earlier attempt."""

    shards: list[ShardRef]
    sources: list[SourceCount]
    drops: list[dict] = field(default_factory=list)
    contamination: list[dict] = field(default_factory=list)
    resumed: bool = False


def plans_prefix(run_id: str) -> str:
    """Return the key prefix of a run's plans."""
    return f"runs/{run_id}/plans/"


def plan_key(run_id: str, shard_id: str) -> str:
    """Return the key of one shard's plan."""
    return f"{plans_prefix(run_id)}{shard_id}.json"


def store_plan(store: ObjectStore, run_id: str, config_hash: str, planned: Any) -> RunPlan:
    """Write each shard's plan of `planned` (a schemas.plan.SeedPlan), then the run's index, last; return the run plan.

    Whatever an unfinished earlier planning of this run left (plans without an index) is replaced.
    """
    shards = []
    for plan in planned.plans:
        key = plan_key(run_id, plan.shard_id)
        put_replacing(store, key, _dumps({"run_id": run_id, "shard_id": plan.shard_id, "index": plan.index,
                                          "instructions": [i.as_row() for i in plan.instructions]}))
        shards.append(ShardRef(plan.shard_id, plan.index, key, len(plan.instructions)))
    run_plan = RunPlan(shards, list(planned.sources), list(planned.drops), list(planned.contamination))
    put_replacing(store, plans_prefix(run_id) + INDEX, _dumps({
        "run_id": run_id, "config_hash": config_hash, "shards": [asdict(s) for s in shards],
        "sources": [s.to_dict() for s in run_plan.sources], "drops": run_plan.drops,
        "contamination": run_plan.contamination}))
    return run_plan


def stored_plan(store: ObjectStore, run_id: str, config_hash: str) -> RunPlan | None:
    """Return the plan an earlier attempt of run `run_id` stored under this config; None if there is none (or one
    under another config: its plans are removed, so the run is planned afresh)."""
    key = plans_prefix(run_id) + INDEX
    try:
        index = store.get_json(key)
    except ObjectMissing:
        return None
    except StoreError as exc:
        raise PlanError(f"{store.uri(key)}: the run's stored plan cannot be read: {exc}") from None
    try:
        if index["config_hash"] != config_hash:
            for stale in store.list_keys(plans_prefix(run_id)):
                store.delete(stale)
            return None
        return RunPlan([ShardRef(**s) for s in index["shards"]], [SourceCount(**s) for s in index["sources"]],
                       index["drops"], index["contamination"], resumed=True)
    except (KeyError, TypeError) as exc:
        raise PlanError(f"{store.uri(key)}: not a run plan ({type(exc).__name__}: {exc})") from None


def read_plan(store: ObjectStore, run_id: str, ref: ShardRef) -> ShardPlan:
    """Return the shard plan `ref` refers to, as it was stored."""
    try:
        stored = store.get_json(ref.key)
        plan = ShardPlan(stored["shard_id"], stored["index"], tuple(Instruction(**i) for i in stored["instructions"]))
    except ObjectMissing:
        raise PlanError(f"{store.uri(ref.key)}: shard {ref.shard_id}'s plan is not in the store") from None
    except (KeyError, TypeError) as exc:
        raise PlanError(f"{store.uri(ref.key)}: not a shard plan ({type(exc).__name__}: {exc})") from None
    if stored.get("run_id") != run_id or plan.shard_id != ref.shard_id or len(plan.instructions) != ref.instructions:
        raise PlanError(f"{store.uri(ref.key)}: the plan of shard {plan.shard_id} ({len(plan.instructions)} "
                        f"instructions) of run {stored.get('run_id')}, not of shard {ref.shard_id} "
                        f"({ref.instructions}) of run {run_id}")
    return plan


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), default=str).encode()


def plan_run(cfg: Config, run_id: str) -> RunPlan:
    """Return the run's plan: the one an earlier attempt of this run stored under this config, or a new one
    (plan_seeds, against the instructions earlier runs published), written to the store."""
    store = ObjectStore(cfg.object_store)
    return (stored_plan(store, run_id, cfg.content_hash())
            or store_plan(store, run_id, cfg.content_hash(), plan_seeds(cfg, run_id, earlier_lookup(cfg, run_id))))


@task(name="plan-shards", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient)
def plan_shards_task(config: dict, run_id: str) -> RunPlan:
    """Plan the run (plan_run): through the hygiene gate, its shards' plans written to the store."""
    cfg = Config.from_dict(config)
    planned = plan_run(cfg, run_id)
    if planned.resumed:
        get_run_logger().info("run %s: resumed with the %d shards it planned before (%s)", run_id,
                              len(planned.shards), ObjectStore(cfg.object_store).uri(plans_prefix(run_id) + INDEX))
    return planned
