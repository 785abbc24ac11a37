"""Shared fixtures: one real SeaweedFS, one real llama.cpp server and one Prefect test harness per test session, a
fresh bucket per test, and one nightly run on the real model that every test reading a real run's results shares."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchard.config import EMBEDDED_STORE_SECRET, Config, EngineConfig, LakeConfig, ObjectStoreConfig
from orchard.services import Service, start_llama_server, start_seaweedfs
from orchard.store import ObjectStore

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"

# Tests that use these fixtures talk to real servers: they are integration tests whether or not
# their author remembered the marker, so `-m "not integration"` always leaves them out.
_SERVICE_FIXTURES = {"seaweed", "store", "llama", "prefect_api"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
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
    embedded = EngineConfig(kind="embedded", model=EMBEDDED_MODEL, n_ctx=2048)
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
