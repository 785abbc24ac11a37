"""Shared fixtures: one real SeaweedFS, one real llama.cpp server and one Prefect test harness per test session, a
fresh bucket per test, and one nightly run on the real model that every test reading a real run's results shares."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from builders import SMALL_RUN
from orchard.config import Config, EngineConfig, LakeConfig, ObjectStoreConfig, SeedSource
from orchard.services import Service, start_llama_server, start_seaweedfs
from orchard.store import ObjectStore

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"

# Tests that use these fixtures talk to real servers: they are integration tests whether or not
# their author remembered the marker, so `-m "not integration"` always leaves them out.
_SERVICE_FIXTURES = {"seaweed", "store", "llama", "prefect_api", "real_run"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, ObjectStoreConfig]]:
    """A SeaweedFS S3 server for the whole session, and the store config that reaches it."""
    config = ObjectStoreConfig(bucket="orchard", access_key_id="orchard", secret_access_key="orchard-test-secret")
    service = start_seaweedfs(config, tmp_path_factory.mktemp("seaweed-state"))
    try:
        yield service, dataclasses.replace(config, endpoint_url=service.url)
    finally:
        service.stop()


@pytest.fixture
def store(seaweed: tuple[Service, ObjectStoreConfig]) -> ObjectStore:
    """An ObjectStore on a bucket of its own, created for this test."""
    _, config = seaweed
    object_store = ObjectStore(dataclasses.replace(config, bucket=f"test-{uuid.uuid4().hex[:16]}"))
    object_store.ensure_bucket()
    return object_store


@pytest.fixture
def local_config(tmp_path: Path) -> Config:
    """A Config whose lake keeps its data files in a local directory: DuckLake without the object store, for what
    only the catalog decides (its endpoint is never reached)."""
    return Config(state_dir=str(tmp_path / "state"), lake=LakeConfig(data_path=f"{tmp_path / 'lake-data'}/"),
                  object_store=ObjectStoreConfig(endpoint_url="http://127.0.0.1:9"))  # fmt: skip


@pytest.fixture(scope="session")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineConfig]:
    """The embedded llama.cpp server for the whole session, as an `openai` engine config."""
    embedded = EngineConfig(kind="embedded", model=EMBEDDED_MODEL, n_ctx=2048)
    service = start_llama_server(embedded, tmp_path_factory.mktemp("llama-state"))
    try:
        yield dataclasses.replace(embedded, kind="openai", base_urls=(service.url,),
                                  structured_output=embedded.response_format)
    finally:
        service.stop()


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    """One Prefect test harness (a real Prefect server on its own SQLite database) for the whole session.

    Flows run in this process dispatch a shard that failed transiently again after 1 s, not after 10 and 30 s: the
    tests check that it is dispatched again and how the run ends, not how long a worker gets to recover. (Flows of
    `orchard run` or `orchard up` in their own processes keep the shipped delays.)"""
    from prefect.testing.utilities import prefect_test_harness

    from flows.grow_shard import DISPATCH_RETRY_DELAYS_S, dispatch_shard_task

    with prefect_test_harness(server_startup_timeout=180), pytest.MonkeyPatch.context() as patch:
        patch.setattr(dispatch_shard_task, "retry_delay_seconds", [1] * len(DISPATCH_RETRY_DELAYS_S))
        yield


# The real-model run every reading test shares: math searched (MCTS), judged (the jury), injected; open-ended prompts
# under principles; a duplicate source and an eval item dropped before growth. Enough of the easiest problems at
# full-length answers that the 135M model gets some right and some wrong, so every export format has rows (SFT needs
# a correct answer, DPO a pair): 8 math trees in 2 shards, 2 open-ended trees in a third.
REAL_RUN_ID = "it-1"
REAL_ARITHMETIC = SeedSource(kind="arithmetic", count=8, difficulty=1, seed=3)
REAL_SEEDS = (REAL_ARITHMETIC, SeedSource(kind="open_ended", count=2), REAL_ARITHMETIC,
              SeedSource(kind="humaneval", count=1))


class RealRun(NamedTuple):
    """A nightly run grown on the real model: its config (state dir, bucket, engine) and the summary it returned."""

    config: Config
    summary: dict


@pytest.fixture(scope="session")
def real_run(tmp_path_factory: pytest.TempPathFactory, seaweed: tuple[Service, ObjectStoreConfig],
             llama: EngineConfig, prefect_api: None) -> RealRun:
    """One nightly run on the real model for the whole session (about two minutes on 2 cores), read by the tests of
    what a real run publishes (tables, report, SQL, exports that train). Tests may run it again (a re-run reuses
    every shard) but must not add to or change its lake otherwise."""
    from flows.nightly import nightly

    _, store_config = seaweed
    object_store = ObjectStore(dataclasses.replace(store_config, bucket=f"real-run-{uuid.uuid4().hex[:12]}"))
    object_store.ensure_bucket()
    config = Config(state_dir=str(tmp_path_factory.mktemp("real-run") / "state"),
                    run=dataclasses.replace(SMALL_RUN, instructions_per_shard=4, max_tokens=128),
                    seeds=REAL_SEEDS, engines={"embedded": dataclasses.replace(llama, retries=1, backoff_s=0.1)},
                    object_store=object_store.cfg)
    return RealRun(config, nightly(config=config.to_dict(), run_id=REAL_RUN_ID))
