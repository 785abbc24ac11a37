"""The run's plan kept in the object store: written once, read by every attempt, carried by reference."""

from __future__ import annotations

import dataclasses
import json

import pytest

from orchard.config import Config, SeedSource
from tasks.plans import INDEX, PlanError, ShardRef, plan_key, plan_run, plans_prefix, read_plan
from tasks.seeds import plan_seeds


@pytest.fixture
def config(tmp_path, store) -> Config:
    cfg = Config(state_dir=str(tmp_path / "state"), object_store=store.cfg,
                 seeds=(SeedSource(kind="arithmetic", count=9, difficulty=2, seed=5),
                        SeedSource(kind="code", count=3, seed=2)))
    return cfg.replace(run=dataclasses.replace(cfg.run, instructions_per_shard=4),
                       hygiene=dataclasses.replace(cfg.hygiene, dedup_against_lake=False))


def test_a_plan_is_written_once_and_each_shard_read_back_as_planned(config, store):
    planned = plan_run(config, "p1")
    direct = plan_seeds(config, "p1")
    assert not planned.resumed
    assert [s.shard_id for s in planned.shards] == [p.shard_id for p in direct.plans]
    assert planned.sources == direct.sources and planned.drops == direct.drops
    for ref, plan in zip(planned.shards, direct.plans, strict=True):
        assert ref == ShardRef(plan.shard_id, plan.index, plan_key("p1", plan.shard_id), len(plan.instructions))
        assert read_plan(store, "p1", ref) == plan  # hidden tests and references included
    assert sorted(store.list_keys(plans_prefix("p1"))) == sorted(
        [plans_prefix("p1") + INDEX] + [ref.key for ref in planned.shards])
    # What parameters carry: a reference, not the instructions.
    assert len(json.dumps(dataclasses.asdict(planned.shards[0]))) < 200


def test_a_resumed_run_reads_its_plan_and_another_config_plans_afresh(config, store):
    first = plan_run(config, "p2")
    again = plan_run(config, "p2")
    assert again.resumed and again.shards == first.shards and again.sources == first.sources
    # Another config (shards of 3): the run is planned again, and the old config's plans are gone.
    other = config.replace(run=dataclasses.replace(config.run, instructions_per_shard=3))
    replanned = plan_run(other, "p2")
    assert not replanned.resumed and len(replanned.shards) == 4
    assert sorted(store.list_keys(plans_prefix("p2"))) == sorted(
        [plans_prefix("p2") + INDEX] + [ref.key for ref in replanned.shards])


def test_a_plan_that_is_not_the_referred_one_is_refused_naming_its_key(config, store):
    planned = plan_run(config, "p3")
    ref = planned.shards[0]
    with pytest.raises(PlanError, match=f"{plans_prefix('p3')}{ref.shard_id}.json: the plan of shard .* not of shard"):
        read_plan(store, "p3", dataclasses.replace(ref, instructions=ref.instructions + 1))
    with pytest.raises(PlanError, match="nope.json: shard .*'s plan is not in the store"):
        read_plan(store, "p3", dataclasses.replace(ref, key=plans_prefix("p3") + "nope.json"))
    store.delete(ref.key)
    store.put_new(ref.key, b'{"run_id": "p3"}')
    with pytest.raises(PlanError, match=f"{ref.key}: not a shard plan"):
        read_plan(store, "p3", ref)
