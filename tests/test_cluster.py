"""`orchard up` / `status` / `down`, the deployments, distributed growth on two GPU workers, and the Prefect UI as
a person sees it (headless Chromium)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import yaml

from bench import fault_cluster
from bench.browser import chromium
from flows.grow_shard import DispatchError, dispatch_shard_task, dispatcher, grow_here, worker_config
from orchard.cluster import (
    CRASH_AUTOMATION,
    ClusterError,
    down,
    prefect_database,
    prefect_template,
    read_up,
    start_prefect_api,
    status,
    status_text,
    up,
)
from orchard.config import (
    HEARTBEAT_S,
    Config,
    ConfigError,
    CostConfig,
    ObjectStoreConfig,
    OrchestrationConfig,
    load_config,
    secret_value,
)
from orchard.engine import EngineUnavailable
from orchard.lake import query
from orchard.services import free_ports
from orchard.store import ObjectStore, StoreUnavailable
from schemas.errors import is_transient
from schemas.shards import ShardStats
from tasks.land import landed_manifest
from tasks.plans import ShardRef, plan_key
from tasks.report import cost_estimate

REPO = Path(__file__).resolve().parent.parent
RUN_ID = "cluster-run"

SMALL_RUN = """
state_dir = "{state}"
[run]
instructions_per_shard = 1
strategies = ["step_by_step", "plan_first"]
samples_per_strategy = 1
turns = 1
mcts_iterations = 1
max_tokens = 48
jury_pairs = 0
jury_canaries = 0
hard_negatives_per_tree = 0
[[seeds]]
kind = "arithmetic"
count = 2
difficulty = 1
[hygiene]
# One cluster's lake takes several runs of these same seeds (each scenario checks its own run): a later run must
# grow them again, not drop them as published by an earlier one.
dedup_against_lake = false
[orchestration]
api_port = {port}
gpu_workers = 2
crashed_after_s = 60
# One verification and one validation process per grow-shard run (not one per core): a run grows one shard, and two
# workers' runs share these 2 cores with two model servers.
verify_workers = 1
# A crashed or failed grow-shard run is dispatched again after 1 s, not after 10 and 30: the tests check that it is
# dispatched again and how the run ends, not how long a worker gets to recover.
dispatch_retry_delays_s = [1, 1]
"""


# --- the parts, without servers ------------------------------------------------------------------


def test_prefect_yaml_declares_a_nightly_cron_with_a_time_zone_and_grow_shard_on_the_gpu_pool() -> None:
    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    nightly, grow = deployments["nightly"], deployments["grow-shard"]
    (schedule,) = nightly["schedules"]
    assert schedule["cron"] == "0 2 * * *" and schedule["timezone"]
    assert nightly["concurrency_limit"] == 1
    assert nightly["work_pool"]["name"] == Config().orchestration.cpu_pool
    assert set(nightly["parameters"]) == {"preset", "max_shards", "run_id"}
    assert grow["work_pool"]["name"] == Config().orchestration.gpu_pool
    for deployment in deployments.values():  # entrypoints resolve from the repository root
        path, _, name = deployment["entrypoint"].partition(":")
        assert f"def {name}(" in (REPO / path).read_text()
        # Heartbeats as often as the crash automation of `orchard up` assumes: a dead worker's run is Crashed.
        assert deployment["work_pool"]["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == str(HEARTBEAT_S)


def test_a_shard_is_dispatched_again_only_when_its_grow_shard_run_crashed_or_failed_transiently() -> None:
    from prefect.states import Failed

    retry = dispatch_shard_task.retry_condition_fn
    assert retry(None, None, Failed(data=DispatchError("worker died", transient=True)))
    assert not retry(None, None, Failed(data=DispatchError("grow-shard run ended Failed: schema")))
    assert not retry(None, None, Failed(data=ConfigError("bad config")))
    assert retry(None, None, Failed(data=StoreUnavailable("b", "k", "http://s3", 5, 30.0, ConnectionError("down"))))
    # Dispatched again after each delay of orchestration.dispatch_retry_delays_s (by default 10 s, then 30 s).
    default = OrchestrationConfig().dispatch_retry_delays_s
    assert default == (10.0, 30.0) and dispatch_shard_task.retries == len(default)
    quick = dispatcher(OrchestrationConfig(dispatch_retry_delays_s=(1.0, 2.0, 3.0)))
    assert (quick.retries, quick.retry_delay_seconds) == (3, [1.0, 2.0, 3.0])
    assert dispatcher(OrchestrationConfig(dispatch_retry_delays_s=())).retries == 0
    with pytest.raises(ValueError, match="dispatch_retry_delays_s"):
        OrchestrationConfig(dispatch_retry_delays_s=(-1.0,))


def test_a_worker_whose_model_server_is_down_fails_the_shard_at_once_with_a_transient_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    (dead,) = free_ports(1)  # nothing listens there
    asked = Config().replace(object_store=ObjectStoreConfig(endpoint_url="http://store:8333")).to_dict()
    monkeypatch.setenv("ORCHARD__ENGINES__EMBEDDED__KIND", '"openai"')
    monkeypatch.setenv("ORCHARD__ENGINES__EMBEDDED__BASE_URLS", f'["http://127.0.0.1:{dead}"]')
    with pytest.raises(EngineUnavailable, match=f"engine 'embedded' does not answer GET /v1/models.*127.0.0.1:{dead}") as raised:
        # before any GPU slot, store or request
        grow_here(worker_config(asked), "run", ShardRef("shard-test", 0, plan_key("run", "shard-test"), 1))
    assert is_transient(raised.value)


def test_crashed_after_s_must_outlast_a_heartbeat() -> None:
    with pytest.raises(ValueError, match="crashed_after_s"):
        OrchestrationConfig(crashed_after_s=HEARTBEAT_S)


def test_a_worker_applies_its_own_endpoints_but_refuses_variables_that_change_the_data(
        monkeypatch: pytest.MonkeyPatch) -> None:
    asked = Config().replace(object_store=ObjectStoreConfig(endpoint_url="http://store:8333")).to_dict()
    monkeypatch.setenv("ORCHARD__ENGINES__EMBEDDED__KIND", '"openai"')
    monkeypatch.setenv("ORCHARD__ENGINES__EMBEDDED__BASE_URLS", '["http://gpu-host:8000"]')
    monkeypatch.setenv("ORCHARD__ORCHESTRATION__GPU_LIMIT", '"orchard-gpu-7"')
    local = worker_config(asked)
    assert local.engines["embedded"].base_urls == ("http://gpu-host:8000",)
    assert local.orchestration.gpu_limit == "orchard-gpu-7"
    monkeypatch.setenv("ORCHARD__RUN__MAX_TOKENS", "7")
    with pytest.raises(ConfigError, match="change what is grown"):
        worker_config(asked)


def test_a_worker_refuses_a_run_without_a_shared_store() -> None:
    with pytest.raises(ConfigError, match="object_store.endpoint_url"):
        worker_config(Config().to_dict())


def test_cost_estimate_prices_tokens_and_gpu_hours() -> None:
    stats = [ShardStats(engine={"prompt_tokens": 2_000_000, "completion_tokens": 500_000}, grow_wall_s=1800.0),
             ShardStats(engine={"prompt_tokens": 0, "completion_tokens": 500_000}, grow_wall_s=1800.0)]
    priced = cost_estimate(stats, CostConfig(usd_per_million_prompt_tokens=0.5, usd_per_million_completion_tokens=2.0,
                                             usd_per_gpu_hour=3.0))
    assert priced == {"gpu_hours": 1.0, "cost_usd": 0.5 * 2 + 2.0 * 1 + 3.0, "priced": True}
    assert cost_estimate(stats, CostConfig())["priced"] is False


def test_an_unreadable_up_record_is_a_named_error(tmp_path: Path) -> None:
    cfg = Config(state_dir=str(tmp_path))
    (tmp_path / "up.json").write_text("{not json")
    with pytest.raises(ClusterError, match="up.json"):
        read_up(cfg)


def test_a_fresh_prefect_home_gets_a_copy_of_the_migrated_template_and_no_other_home_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCHARD_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "prefect" / f"prefect-{importlib.metadata.version('prefect')}.db"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"migrated")
    assert prefect_template() == cached  # there: not migrated again

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    prefect_database(fresh, {})
    assert (fresh / "prefect.db").read_bytes() == b"migrated"
    assert sorted(p.name for p in fresh.iterdir()) == ["prefect.db"]  # no partial copy left

    used = tmp_path / "used"  # a home with its history keeps it
    used.mkdir()
    (used / "prefect.db").write_bytes(b"runs")
    prefect_database(used, {})
    assert (used / "prefect.db").read_bytes() == b"runs"

    elsewhere = tmp_path / "elsewhere"  # Prefect's database is a Postgres server: nothing is copied
    elsewhere.mkdir()
    prefect_database(elsewhere, {"PREFECT_API_DATABASE_CONNECTION_URL": "postgresql+asyncpg://db/prefect"})
    assert not any(elsewhere.iterdir())


@pytest.mark.integration
def test_the_prefect_template_is_migrated_by_prefect_and_a_server_starts_on_a_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCHARD_CACHE", str(tmp_path / "cache"))
    template = prefect_template()
    with sqlite3.connect(template) as db:
        (revision,) = db.execute("SELECT version_num FROM alembic_version").fetchone()
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert revision and {"flow_run", "deployment", "work_pool"} <= tables
    server = start_prefect_api(tmp_path / "state")
    try:
        assert (tmp_path / "state" / "prefect" / "prefect.db").exists()
        flows = httpx.post(f"{server.url}/api/flows/filter", json={}, timeout=10.0)
        assert flows.status_code == 200 and flows.json() == []
    finally:
        server.stop()


# --- orchard up: real Prefect server, SeaweedFS, llama.cpp servers and process workers --------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Config]:
    """`orchard up` with two GPU workers, and one nightly run through the deployments; `orchard down` at the end."""
    root = tmp_path_factory.mktemp("cluster")
    (port,) = free_ports(1)
    config_path = root / "orchard.toml"
    config_path.write_text(SMALL_RUN.format(state=root / "state", port=port))
    cfg = load_config(config_path, environ={})
    up(cfg, config_path, say=lambda _: None)
    try:
        yield cfg
    finally:
        down(cfg, say=lambda _: None)


def _api(cfg: Config):  # noqa: ANN202 — Prefect settings pointing at the cluster's API
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings({PREFECT_API_URL: read_up(cfg)["api_url"]})


def _client():  # noqa: ANN202 — a Prefect sync client (inside `_api(cfg)`)
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


@pytest.fixture(scope="module")
def nightly_run(cluster: Config):  # noqa: ANN201 — the finished nightly flow run
    from prefect.deployments import run_deployment

    with _api(cluster):
        run = run_deployment("nightly/nightly", parameters={"run_id": RUN_ID}, timeout=900, poll_interval=2,
                             as_subflow=False)
    return run


@pytest.mark.integration
def test_up_runs_the_server_store_model_servers_and_workers(cluster: Config) -> None:
    report = status(cluster)
    assert report["up"], status_text(report)
    names = {p["name"] for p in report["processes"]}
    assert {"prefect-server", "seaweedfs", "worker-cpu-0", "worker-gpu-0", "worker-gpu-1",
            "llama-gpu-0-embedded", "llama-gpu-1-embedded"} <= names
    pools = {pool["name"]: pool for pool in report["api"]["pools"]}
    assert {w["name"] for w in pools["orchard-gpu"]["workers"]} == {"gpu-0", "gpu-1"}
    deployments = {d["name"]: d for d in report["api"]["deployments"]}
    assert deployments["nightly/nightly"]["schedule"].startswith("0 2 * * *")
    assert deployments["grow-shard/grow-shard"]["pool"] == "orchard-gpu"
    with _api(cluster), _client() as client:
        limits = {limit.name: limit.limit for limit in client.read_global_concurrency_limits()}
    # One slot per GPU worker; Prefect keeps the nightly deployment's concurrency_limit as a limit of its own.
    assert {k: v for k, v in limits.items() if not k.startswith("deployment:")} == {"orchard-gpu-0": 1, "orchard-gpu-1": 1}
    assert sorted(v for k, v in limits.items() if k.startswith("deployment:")) == [1]
    with _api(cluster), _client() as client:
        (crash,) = client.read_automations_by_name(CRASH_AUTOMATION)
    assert crash.enabled and crash.trigger.within.total_seconds() == cluster.orchestration.crashed_after_s
    assert [action.type for action in crash.actions] == ["change-flow-run-state"]


@pytest.mark.integration
def test_nightly_dispatches_shards_to_both_gpu_workers_and_the_lake_holds_each_once(cluster: Config,
                                                                                    nightly_run) -> None:
    assert nightly_run.state.is_completed(), nightly_run.state
    with _api(cluster), _client() as client:
        runs = client.read_flow_runs()
        flows = {run.flow_id: client.read_flow(run.flow_id).name for run in runs}
    grown = [run for run in runs if flows[run.flow_id] == "grow-shard"]
    assert len(grown) == 2 and all(run.state.is_completed() for run in grown)
    assert all(str(run.parent_task_run_id) for run in grown)  # subflows of the nightly run's dispatch tasks
    workers = Counter(run.labels.get("prefect.worker.name") for run in grown)
    assert set(workers) == {"gpu-0", "gpu-1"}, workers
    store_url = next(p.url for p in read_up(cluster)["processes"] if p.name == "seaweedfs")
    live = cluster.replace(object_store=dataclasses.replace(cluster.object_store, endpoint_url=store_url))
    _, shards = query(live, "SELECT shard_id, count(*) FROM trees GROUP BY 1 ORDER BY 1")
    assert len(shards) == 2 and all(count == 1 for _, count in shards)
    store = ObjectStore(live.object_store)
    assert all(landed_manifest(store, RUN_ID, shard_id) for shard_id, _ in shards)
    (dupes,) = query(live, "SELECT count(*) - count(DISTINCT node_id) FROM nodes")[1]
    assert dupes == (0,)
    _, published = query(live, f"SELECT status, shards_published FROM runs WHERE run_id = '{RUN_ID}'")
    assert published == [("complete", 2)]


@pytest.mark.integration
def test_the_prefect_ui_shows_the_run_its_progress_and_its_report(cluster: Config, nightly_run) -> None:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ui = read_up(cluster)["ui_url"]
    report_key = f"orchard-run-{RUN_ID}-report"
    with _api(cluster), _client() as client:
        (report,) = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[report_key])))
    with chromium(window="1400,1000") as browser:
        page = lambda: browser.find_element(By.TAG_NAME, "body").text  # noqa: E731
        browser.get(f"{ui}/runs/flow-run/{nightly_run.id}")
        WebDriverWait(browser, 90).until(lambda _: nightly_run.name in page() and "Completed" in page())
        assert "dispatch-shard" in page() and "materialise" in page()  # the task graph and logs
        browser.find_element(By.CSS_SELECTOR, "li.p-tab#artifacts").click()
        WebDriverWait(browser, 60).until(lambda _: f"run {RUN_ID}: shards landed and validated" in page())
        browser.get(f"{ui}/artifacts/artifact/{report.id}")  # the markdown report, rendered
        WebDriverWait(browser, 60).until(lambda _: "Judge agreement" in page())
        text = page()
        assert f"Orchard run {RUN_ID} — complete" in text
        assert "cost estimate" in text and "GPU-slot hours" in text
        assert "gpu-0" in text and "gpu-1" in text  # the shards table names the worker that grew each shard


# --- cluster faults (issue 12): the scenarios of bench/fault_cluster.py, on this cluster, two shards each ------


@pytest.mark.integration
def test_a_gpu_model_server_killed_mid_shard_fails_that_attempt_and_another_worker_grows_the_shard(
        cluster: Config, nightly_run) -> None:
    # The server is started again afterwards, so the next fault has two workers again.
    expected, observed, passed = fault_cluster.model_server_killed_on(cluster, max_shards=2, restart=True)
    assert passed, f"expected: {expected}\nobserved: {observed}"


@pytest.mark.integration
def test_a_grow_shard_run_cancelled_mid_shard_stops_is_cancelled_and_its_shard_waits_for_the_rerun(
        cluster: Config, nightly_run) -> None:
    # Before the worker kill below: both workers are up.
    expected, observed, passed = fault_cluster.grow_run_cancelled_on(cluster, max_shards=2)
    assert passed, f"expected: {expected}\nobserved: {observed}"


@pytest.mark.integration
def test_a_gpu_worker_killed_mid_shard_is_crashed_and_another_worker_grows_the_shard(cluster: Config,
                                                                                     nightly_run) -> None:
    expected, observed, passed = fault_cluster.gpu_worker_killed_on(cluster, max_shards=2)
    assert passed, f"expected: {expected}\nobserved: {observed}"


@pytest.mark.integration
def test_down_stops_everything_up_started(cluster: Config, nightly_run) -> None:
    processes = read_up(cluster)["processes"]
    running = sum(p.running for p in processes)  # a worker a fault test killed is not stopped again
    assert running >= len(processes) - 1
    assert down(cluster, say=lambda _: None) == running
    assert not any(p.running for p in processes)
    assert read_up(cluster) is None and status(cluster)["up"] is False


def test_flow_parameters_carry_secret_references_that_the_worker_resolves(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = Config().replace(object_store=ObjectStoreConfig(endpoint_url="http://store:8333",
                                                            secret_access_key="env:ORCHARD_TEST_S3_SECRET")).to_dict()
    monkeypatch.setenv("ORCHARD_TEST_S3_SECRET", "s3cr3t")
    assert "s3cr3t" not in str(asked)
    local = worker_config(asked)
    assert local.object_store.secret_access_key == "env:ORCHARD_TEST_S3_SECRET"
    assert secret_value(local.object_store.secret_access_key) == "s3cr3t"
