"""What one process holds while it grows follows its config, not the number of shards (issue 22).

Fast tier: the simulated engine of bench/gpu_sim.py on a thread of this process; no SeaweedFS, Prefect or model server.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import threading
from pathlib import Path

import httpx
import pytest

from orchard.config import Config, EngineConfig, OrchestrationConfig, RunConfig, load_config
from schemas.plan import ShardPlan
from tasks.grow import GrowthHost, growth_host, shards_in_flight
from tasks.seeds import generate_arithmetic

_SPEC = importlib.util.spec_from_file_location("gpu_sim", Path(__file__).resolve().parents[1] / "bench" / "gpu_sim.py")
gpu_sim = sys.modules.get("gpu_sim") or importlib.util.module_from_spec(_SPEC)
if "gpu_sim" not in sys.modules:
    sys.modules["gpu_sim"] = gpu_sim
    _SPEC.loader.exec_module(gpu_sim)

INSTRUCTIONS = generate_arithmetic(6, difficulty=1, seed=3)
CONCURRENCY = 3


def sim_config(url: str = "http://127.0.0.1:1", *, concurrency: int = CONCURRENCY, urls: int = 1,
               per_shard: int = 2, **orchestration) -> Config:
    engine = EngineConfig(kind="openai", model="sim", base_urls=(url,) * urls, max_concurrency=concurrency,
                          structured_output="json_schema", retries=0)
    preset = Config()
    run = RunConfig(instructions_per_shard=per_shard, strategies=("step_by_step", "plan_first"), samples_per_strategy=2,
                    turns=1, mcts_iterations=1, jury_pairs=1, jury_canaries=1, hard_negatives_per_tree=0)
    return Config(run=run, engines={"sim": engine}, roles={role: "sim" for role in preset.roles},
                  jury=tuple(dataclasses.replace(judge, engine="sim") for judge in preset.jury),
                  orchestration=OrchestrationConfig(verify_workers=1, **orchestration))


def test_shards_in_flight_are_enough_trees_for_the_engines_and_at_most_the_cap():
    # 2 trees per request slot: 3 slots × 2 URLs → 12 trees → 6 shards of 2, and two spare.
    assert shards_in_flight(sim_config(concurrency=3, urls=2, per_shard=2)) == 8
    assert shards_in_flight(sim_config(concurrency=64, per_shard=128)) == 3
    assert shards_in_flight(sim_config(concurrency=64, per_shard=4)) == 34
    assert shards_in_flight(sim_config(concurrency=512, per_shard=4, max_shards_in_flight=64)) == 64
    # Dispatched shards grow in the workers' processes: the cap alone bounds what the flow waits on.
    assert shards_in_flight(sim_config(concurrency=3, grow="deployment", max_shards_in_flight=20)) == 20


def test_what_a_host_spends_on_growth_leaves_the_config_hash_alone():
    cfg = sim_config()
    busier = cfg.replace(orchestration=dataclasses.replace(cfg.orchestration, verify_workers=16,
                                                           max_shards_in_flight=8))
    assert busier.content_hash() == cfg.content_hash()
    local = load_config(base=cfg.to_dict(), environ={"ORCHARD__ORCHESTRATION__VERIFY_WORKERS": "6"})
    assert local.orchestration.verify_workers == 6 and local.content_hash() == cfg.content_hash()


def test_verify_workers_is_no_longer_a_setting_of_what_is_grown():
    with pytest.raises(ValueError, match="run.verify_workers: unknown key"):
        load_config(environ={"ORCHARD__RUN__VERIFY_WORKERS": "2"})


def test_a_process_keeps_one_growth_host_while_a_block_holds_it_open():
    cfg = sim_config()
    with growth_host(cfg) as first, growth_host(cfg) as second:
        assert first is second
        other = cfg.replace(orchestration=dataclasses.replace(cfg.orchestration, verify_workers=2))
        with growth_host(other) as third:
            assert third is not first  # another pool size is another host
    with growth_host(cfg) as again:
        assert again is not first
    assert not first._thread.is_alive()


def test_shards_growing_at_once_share_one_client_and_each_counts_its_own_usage():
    settings = gpu_sim.SimSettings(slots=8, prefill_s=0.0, per_token_s=0.001, median_tokens=12)
    references = {i.text: i.reference for i in INSTRUCTIONS}
    with gpu_sim.sim_in_thread(settings, references) as url:
        cfg = sim_config(url)
        plans = [ShardPlan(shard_id=f"s{k}", index=k, instructions=tuple(INSTRUCTIONS[2 * k:2 * k + 2]))
                 for k in range(3)]
        httpx.post(f"{url}/sim/reset")
        grown, errors = {}, []

        def grow(plan: ShardPlan, host: GrowthHost) -> None:
            try:
                grown[plan.shard_id] = host.grow(plan, cfg, "r1")
            except BaseException as exc:  # noqa: BLE001 — handed to the test thread below
                errors.append(exc)

        with growth_host(cfg) as host:
            threads = [threading.Thread(target=grow, args=(plan, host)) for plan in plans]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
        assert not errors, errors
        sim = httpx.get(f"{url}/sim/stats").json()
    assert sorted(grown) == ["s0", "s1", "s2"]
    assert all(shard.stats.trees == 2 and shard.stats.actions > 0 for shard in grown.values())
    # The server saw one client: never more requests at once than max_concurrency, on at most as many connections.
    assert sim["peak_in_flight"] <= CONCURRENCY
    assert sim["connections"] <= CONCURRENCY
    # Each shard counted its own requests and tokens: together they are exactly what the server answered.
    assert sum(s.stats.engine["requests"] for s in grown.values()) == sim["requests"]
    assert sum(s.stats.engine["completion_tokens"] for s in grown.values()) == sim["completion_tokens"]
