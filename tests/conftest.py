"""Shared fixtures: one real SeaweedFS and one real llama.cpp server per test session, a fresh bucket per test."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator

import pytest

from orchard.config import EngineConfig, ObjectStoreConfig
from orchard.services import Service, start_llama_server, start_seaweedfs
from orchard.store import ObjectStore

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"

# Tests that use these fixtures talk to real servers: they are integration tests whether or not
# their author remembered the marker, so `-m "not integration"` always leaves them out.
_SERVICE_FIXTURES = {"seaweed", "store", "llama"}


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
