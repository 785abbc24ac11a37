"""Object store outages on a real SeaweedFS: a short one is ridden out, a long one fails clearly and publishes nothing.

Each test starts its own SeaweedFS on a state directory of its own and stops it in the middle of a run; a restart
reuses the same data directory. The model is a scripted OpenAI-compatible server, so runs are fast and repeatable.
The outage is timed from inside the run: it begins when the second shard has written its first Parquet file and
the first shard has been validated, so the second shard is always half-landed when the store goes away.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import tasks.grow
from builders import QUICK_RETRIES, ArithmeticScript, ScriptedEngine, ScriptedServer
from orchard import lake, services
from orchard import store as store_module
from orchard.config import (
    Config,
    EngineConfig,
    HygieneConfig,
    ObjectStoreConfig,
    RunConfig,
    SeedSource,
)
from orchard.services import Service, start_seaweedfs
from orchard.store import ObjectStore, StoreUnavailable, retry_delay_s
from schemas.plan import ShardPlan
from tasks.land import MANIFEST, VALIDATION, landed_manifest, read_shard_table, shard_prefix
from tasks.plans import INDEX, plan_key, plans_prefix
from tasks.seeds import plan_seeds

pytestmark = pytest.mark.integration

SEEDS = (SeedSource(kind="arithmetic", count=4, difficulty=1, seed=11),)
RUN = RunConfig(
    instructions_per_shard=2,  # 4 seeds: 2 shards, one landed and validated before the outage, one landing into it
    strategies=("step_by_step", "plan_first"),
    samples_per_strategy=2,
    turns=1,  # what is grown matters little here: the smallest run that lands, validates and publishes pairs
    mcts_iterations=0,
    jury_pairs=0,
    jury_canaries=0,
)
STORE = ObjectStoreConfig(bucket="orchard", access_key_id="orchard", secret_access_key="orchard-test-secret")
SHARD_TABLES_IN_LAKE = ("instructions", "trees", "nodes", "pairs")


@pytest.fixture(scope="module")
def engine_url() -> Iterator[str]:
    """A scripted model: right answers on even seeds, wrong ones on odd seeds."""
    with ScriptedServer(ScriptedEngine(ArithmeticScript().learn(SEEDS).answer)) as server:
        yield server.url


# --- a SeaweedFS that can be stopped and started again on its data ------------------------------------


class Seaweed:
    """One SeaweedFS data directory, started and stopped at will; `cfg` reaches the running server."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.service: Service | None = None
        self.ports: list[int] = []
        self.cfg = STORE

    def start(self, *, same_ports: bool = False) -> None:
        """Start on the data directory; `same_ports` reuses the last start's ports, so the endpoint stays the same."""
        pick = services.free_ports

        def ports(count: int) -> list[int]:
            if not same_ports:
                self.ports = pick(count)
            return list(self.ports)

        # start_seaweedfs draws fresh ports every start; replaying the drawn ones is how a restart keeps its endpoint.
        services.free_ports = ports
        try:
            self.service = start_seaweedfs(STORE, self.state_dir)
        finally:
            services.free_ports = pick
        self.cfg = dataclasses.replace(STORE, endpoint_url=self.service.url)

    def stop(self) -> None:
        self.service.stop()


@pytest.fixture
def seaweed(tmp_path: Path) -> Iterator[Seaweed]:
    seaweed = Seaweed(tmp_path / "weed-state")
    seaweed.start()
    try:
        yield seaweed
    finally:
        seaweed.stop()


def config_for(tmp_path: Path, seaweed: Seaweed, engine_url: str) -> Config:
    engine = EngineConfig(kind="openai", model="scripted", base_urls=(engine_url,), retries=0, structured_output="none")
    # A test here grows the same seeds as two runs into one lake ("calm", then "storm") to compare them: the second
    # must not drop them as already published. A shard that failed on the store is dispatched again at once.
    return Config(state_dir=str(tmp_path / "state"), run=RUN, seeds=SEEDS, engines={"embedded": engine},
                  object_store=seaweed.cfg, hygiene=HygieneConfig(dedup_against_lake=False),
                  orchestration=QUICK_RETRIES)


def plans(config: Config) -> list[ShardPlan]:
    return plan_seeds(config, "planned").plans


def run(config: Config, run_id: str) -> dict:
    from flows.nightly import nightly

    return nightly(config=config.to_dict(), run_id=run_id)


def outage_in_landing(monkeypatch: pytest.MonkeyPatch, run_id: str, validated: ShardPlan, landing: ShardPlan,
                      outage: Callable[[], None]) -> threading.Event:
    """Call `outage()` once `validated` has been validated and `landing` has written its first file, before its second.

    Returns an event set when the outage began. Both hooks are in this process: Prefect runs the tasks in threads.
    """
    was_validated, began = threading.Event(), threading.Event()
    record, put_new = tasks.grow.record_validation, ObjectStore.put_new

    def record_validation(store, run_id, shard_id, validation):
        recorded = record(store, run_id, shard_id, validation)
        if shard_id == validated.shard_id:
            was_validated.set()
        return recorded

    def put_new_in_outage(store: ObjectStore, key: str, body: bytes) -> bool:
        if key == shard_prefix(run_id, landing.shard_id) + "nodes.parquet" and not began.is_set():
            assert was_validated.wait(timeout=60), f"shard {validated.shard_id} was never validated"
            outage()
            began.set()
        return put_new(store, key, body)

    monkeypatch.setattr(tasks.grow, "record_validation", record_validation)
    monkeypatch.setattr(ObjectStore, "put_new", put_new_in_outage)
    return began


def count(config: Config, sql: str, version: int | None = None) -> int:
    return lake.query(config, sql, version=version)[1][0][0]


def run_counts(config: Config, run_id: str, version: int | None = None) -> dict[str, int]:
    """Rows of `run_id` in each published shard table (as of snapshot `version`)."""
    return {table: count(config, f"SELECT count(*) FROM {table} WHERE run_id = '{run_id}'", version)
            for table in SHARD_TABLES_IN_LAKE}


# --- the tests -------------------------------------------------------------------------------------------


def test_an_unreachable_store_fails_after_its_retries_naming_endpoint_and_bucket():
    (port,) = services.free_ports(1)  # nothing listens there: every connection is refused
    store = ObjectStore(dataclasses.replace(STORE, endpoint_url=f"http://127.0.0.1:{port}", retries=1))
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as failure:
        store.get("runs/r/shards/s/manifest.json")
    waited = time.monotonic() - started
    assert str(failure.value).startswith(
        f"s3://orchard/runs/r/shards/s/manifest.json: object store http://127.0.0.1:{port} (bucket orchard) "
        "unreachable after 2 attempts over ")
    assert 0.75 * retry_delay_s(1) <= waited < retry_delay_s(1) + 2.0
    # The default gives a store half a minute to come back: longer than a restart, short beside a nightly run.
    default = ObjectStoreConfig().retries
    assert [retry_delay_s(k) for k in range(1, default + 1)] == [2.0, 4.0, 8.0, 16.0]


def test_a_short_outage_while_a_shard_lands_is_ridden_out_by_retries(tmp_path, seaweed, engine_url, prefect_api,
                                                                     monkeypatch):
    config = config_for(tmp_path, seaweed, engine_url)
    first, second = plans(config)
    retried = []
    monkeypatch.setattr(store_module, "retry_delay_s", lambda k: retried.append(k) or retry_delay_s(k))

    def stop_then_start_again() -> None:
        # SeaweedFS takes ~2 s to stop and ~1 s to start: the landing's retries (2 s, then 4 s more) outlast it.
        seaweed.stop()
        threading.Thread(target=lambda: (time.sleep(1.0), seaweed.start(same_ports=True)), daemon=True).start()

    began = outage_in_landing(monkeypatch, "short", first, second, stop_then_start_again)
    summary = run(config, "short")

    assert began.is_set()
    assert summary["status"] == "complete", summary["problems"]
    assert (summary["shards_published"], summary["shards_failed"]) == (2, 0)
    # It took retries and rode the outage out. How many depends on how long SeaweedFS takes to start again, which
    # depends on the machine's load (under `make test`'s model lane, up to 14 s): not asserted.
    assert retried
    assert count(config, "SELECT count(*) FROM runs WHERE run_id = 'short' AND status = 'complete'") == 1
    assert run_counts(config, "short")["nodes"] == summary["nodes"]


def test_a_long_outage_fails_clearly_publishes_nothing_and_the_rerun_completes(tmp_path, seaweed, engine_url,
                                                                               prefect_api, monkeypatch, caplog):
    config = config_for(tmp_path, seaweed, engine_url)
    first, second = plans(config)
    calm = run(config, "calm")  # the same seeds, uninterrupted: what the interrupted run must end up with
    assert calm["status"] == "complete", calm["problems"]
    published = [s["snapshot_id"] for s in lake.snapshots(config)]

    # One retry (about 2 s) per call keeps the test short; `retries` is not part of the config hash.
    impatient = config.replace(object_store=dataclasses.replace(config.object_store, retries=1))
    with monkeypatch.context() as hooks:
        outage_in_landing(hooks, "storm", first, second, seaweed.stop)
        with pytest.raises(Exception) as failure:
            run(impatient, "storm")
    # The shard that was landing failed on the store, after its retries; the flow's check of the validated one then
    # failed to read it back, so the run ends with nothing published (both in the run's log, the last as its error).
    endpoint = seaweed.cfg.endpoint_url
    landing = shard_prefix("storm", second.shard_id) + "nodes.parquet"
    assert f"s3://orchard/{landing}: object store {endpoint} (bucket orchard) unreachable after 2 attempts over " \
           in caplog.text
    assert str(failure.value).startswith("run storm: nothing published: ") and endpoint in str(failure.value)

    # The store comes back on its data, on new ports: the endpoint is not part of the config hash either.
    seaweed.start()
    config = config.replace(object_store=seaweed.cfg)
    store = ObjectStore(config.object_store)
    # At most the storm run's failed `runs` row was committed since the calm run's snapshot: none of its shards' rows.
    snapshots = [s["snapshot_id"] for s in lake.snapshots(config)]
    assert snapshots[:len(published)] == published and len(snapshots) <= len(published) + 1
    assert run_counts(config, "storm") == dict.fromkeys(SHARD_TABLES_IN_LAKE, 0)
    assert lake.query(config, "SELECT status FROM runs WHERE run_id = 'storm'")[1] in ([], [("failed",)])
    # The first shard landed whole before the outage; the second got one file and no manifest.
    manifest = landed_manifest(store, "storm", first.shard_id)
    for table in manifest["files"]:
        read_shard_table(store, manifest, table)  # checks size, sha256 and rows
    assert store.list_keys(shard_prefix("storm", second.shard_id)) == [
        shard_prefix("storm", second.shard_id) + "instructions.parquet"]

    again = run(config, "storm")
    assert again["status"] == "complete", again["problems"]
    # The shard that landed before the outage is not grown again, but it enters the lake only now: published.
    assert (again["shards_planned"], again["shards_reused"], again["shards_published"]) == (2, 0, 2)
    manifests = [k for k in store.list_keys("runs/storm/") if k.endswith(MANIFEST)]
    assert manifests == sorted(shard_prefix("storm", p.shard_id) + MANIFEST for p in (first, second))
    listed = {entry["key"] for key in manifests for entry in store.get_json(key)["files"].values()}
    records = {shard_prefix("storm", p.shard_id) + VALIDATION for p in (first, second)}  # validated where grown
    planned = {plan_key("storm", p.shard_id) for p in (first, second)} | {plans_prefix("storm") + INDEX}
    # The half-landed file replaced; beside the shards, the run's plan.
    assert set(store.list_keys("runs/storm/")) == listed | set(manifests) | records | planned
    assert count(config, "SELECT count(DISTINCT node_id) FROM nodes WHERE run_id = 'storm'") == again["nodes"]
    assert count(config, "SELECT count(DISTINCT pair_id) FROM pairs WHERE run_id = 'storm'") == again["pairs"]
    assert run_counts(config, "storm") == run_counts(config, "calm")
    assert (again["nodes"], again["pairs"], again["trees"]) == (calm["nodes"], calm["pairs"], calm["trees"])
