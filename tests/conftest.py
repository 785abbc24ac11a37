"""Shared fixtures: one real SeaweedFS, one real llama.cpp server and one Prefect test harness per test session (per
pytest-xdist worker), a fresh bucket per test; and how `make test`'s two workers share the tests out."""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from builders import MODEL_THREADS
from orchard.config import EMBEDDED_STORE_SECRET, Config, EngineConfig, LakeConfig, ObjectStoreConfig
from orchard.services import Service, start_llama_server, start_seaweedfs
from orchard.store import ObjectStore

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"

# Tests that use these fixtures talk to real servers: they are integration tests whether or not
# their author remembered the marker, so `-m "not integration"` always leaves them out.
_SERVICE_FIXTURES = {"seaweed", "store", "llama", "prefect_api"}


# `make test` runs the suite on two pytest-xdist workers (`-n 2`) in two lanes. The modules that keep a model server
# busy for minutes (the shared real-model run, `orchard up`'s GPU workers, the fault lab, vLLM) are one unit of work,
# run by one worker one after another, so that beside its model servers only the other lane's few seconds of
# real-model tests decode, every server with its share of the cores (builders.MODEL_THREADS, `orchard up`'s). Every other
# module is a unit of its own (its module fixtures set up once), run by the other worker, whose work is shorter, at a
# lower CPU priority (LANE_NICE), so it takes the CPU the model lane leaves idle rather than the model lane's.
MODEL_LANE = "model servers"
_MODEL_MODULES = {"test_real_run", "test_cluster", "test_faults", "test_vllm"}
LANE_NICE = 5


def lane(nodeid: str) -> str:
    """The unit of work a test belongs to: MODEL_LANE, or its module's path."""
    module = nodeid.split("::", 1)[0]
    return MODEL_LANE if Path(module).stem in _MODEL_MODULES else module


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    # xdist's loadgroup (xdist_group marks) does not group under pytest 9: its worker rewrites `_nodeid`, which
    # pytest 9 no longer reads. Its module-scope scheduler, with MODEL_LANE as one scope, does the same.
    from xdist.scheduler import LoadScopeScheduling

    class Lanes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return lane(nodeid)

    # Units in collection order, where the model lane comes first (pytest_collection_modifyitems): the longest unit
    # starts at once, and the other worker takes every other unit in turn. (By default xdist starts the units with
    # the most tests first, and the model lane has few tests, each of minutes.)
    config.option.loadscopereorder = False
    return Lanes(config, log)


_niced = False  # whether this worker lowered its priority (once, at its first test outside the model lane)


def pytest_runtest_setup(item: pytest.Item) -> None:
    global _niced
    if not _niced and os.environ.get("PYTEST_XDIST_WORKER") and lane(item.nodeid) != MODEL_LANE:
        os.nice(LANE_NICE)  # this worker and the servers it starts from now on
        _niced = True


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: lane(item.nodeid) != MODEL_LANE)  # stable: the model lane first, else as collected
    for item in items:
        if _SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, ObjectStoreConfig]]:
    """A SeaweedFS S3 server for the whole session, and the store config that reaches it."""
    # The key Orchard gives a SeaweedFS it starts itself on 127.0.0.1: a value, but not one `orchard run` warns of.
    config = ObjectStoreConfig(bucket="orchard", access_key_id="orchard", secret_access_key=EMBEDDED_STORE_SECRET)
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
    embedded = EngineConfig(kind="embedded", model=EMBEDDED_MODEL, n_ctx=2048, threads=MODEL_THREADS)
    service = start_llama_server(embedded, tmp_path_factory.mktemp("llama-state"))
    try:
        yield dataclasses.replace(embedded, kind="openai", base_urls=(service.url,),
                                  structured_output=embedded.response_format)
    finally:
        service.stop()


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    """One Prefect test harness (a real Prefect server on its own SQLite database) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
