"""Landing shards in a real SeaweedFS bucket: create-only writes, manifest last, resume, quarantine."""

from __future__ import annotations

import hashlib
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchard.store import ObjectMissing, ObjectStore
from schemas.rows import MESSAGES, SHARD_TABLES
from schemas.shards import ShardStats
from tasks.land import (
    MANIFEST,
    LandingError,
    ShardChecksumError,
    ShardIntegrityError,
    ShardSchemaError,
    land_shard,
    landed_manifest,
    quarantine_corrupt,
    quarantine_shard,
    quarantined_manifest,
    read_shard,
    read_shard_table,
    resume_shard,
    shard_prefix,
)

pytestmark = pytest.mark.integration

RUN = "run-1"
SHARD = "shard-0001"
STATS = ShardStats(trees=3, grow_wall_s=5.5, engine={"completion_tokens": 1234})


def shard_tables(run_id: str = RUN, shard_id: str = SHARD, rows: int = 3) -> dict[str, pa.Table]:
    """Every shard table with `rows` rows whose values follow from column name and type."""

    def value(field: pa.Field, i: int) -> object:
        if field.name == "run_id":
            return run_id
        if field.name == "shard_id":
            return shard_id
        if field.type == MESSAGES:
            return [{"role": "user", "content": f"question {i}"}]
        if pa.types.is_integer(field.type):
            return i
        if pa.types.is_floating(field.type):
            return i / 2
        if pa.types.is_boolean(field.type):
            return i % 2 == 0
        return f"{field.name}-{i}"

    return {
        name: pa.Table.from_pylist([{f.name: value(f, i) for f in schema} for i in range(rows)], schema=schema)
        for name, schema in SHARD_TABLES.items()
    }


def parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


class RecordingStore(ObjectStore):
    """The real store, remembering the keys it was asked to create, in order."""

    def __init__(self, store: ObjectStore) -> None:
        super().__init__(store.cfg)
        self.created: list[str] = []

    def put_new(self, key: str, body: bytes) -> bool:
        self.created.append(key)
        return super().put_new(key, body)


def test_put_new_refuses_to_overwrite_an_existing_key(store: ObjectStore) -> None:
    assert store.put_new("a/key.txt", b"first") is True
    assert store.put_new("a/key.txt", b"second") is False
    assert store.get("a/key.txt") == b"first"


def test_store_reads_lists_and_deletes(store: ObjectStore) -> None:
    store.put_new("p/x.json", json.dumps({"n": 1}).encode())
    store.put_new("p/y.txt", b"y")
    store.put_new("q/z.txt", b"z")
    assert store.list_keys("p/") == ["p/x.json", "p/y.txt"]
    assert store.get_json("p/x.json") == {"n": 1}
    assert store.exists("p/y.txt") and not store.exists("p/nope.txt")
    store.delete("p/y.txt")
    store.delete("p/y.txt")  # deleting what is gone is not an error
    assert store.list_keys("p/") == ["p/x.json"]
    assert store.uri("p/x.json") == f"s3://{store.bucket}/p/x.json"


def test_missing_key_error_names_bucket_and_key(store: ObjectStore) -> None:
    with pytest.raises(ObjectMissing, match=rf"s3://{store.bucket}/no/such\.txt: no such key"):
        store.get("no/such.txt")


def test_landed_shard_has_a_manifest_with_row_counts_and_checksums(store: ObjectStore) -> None:
    tables = shard_tables(rows=4)
    manifest = land_shard(store, RUN, SHARD, tables, config_hash="cfg1", stats=STATS)

    assert landed_manifest(store, RUN, SHARD) == manifest
    assert (manifest["run_id"], manifest["shard_id"], manifest["config_hash"]) == (RUN, SHARD, "cfg1")
    assert manifest["stats"] == STATS.to_dict() and manifest["landed_at"]
    assert sorted(manifest["files"]) == sorted(SHARD_TABLES)
    for name, entry in manifest["files"].items():
        assert entry["key"] == f"runs/{RUN}/shards/{SHARD}/{name}.parquet"
        body = store.get(entry["key"])
        assert (entry["rows"], entry["bytes"], entry["sha256"]) == (4, len(body), hashlib.sha256(body).hexdigest())
        assert read_shard_table(store, manifest, name).equals(tables[name])
    assert store.list_keys(shard_prefix(RUN, SHARD)) == sorted(
        [f"runs/{RUN}/shards/{SHARD}/{name}.parquet" for name in SHARD_TABLES]
        + [f"runs/{RUN}/shards/{SHARD}/manifest.json"]
    )


def test_manifest_is_written_last(store: ObjectStore) -> None:
    recording = RecordingStore(store)
    land_shard(recording, RUN, SHARD, shard_tables(), config_hash="cfg1", stats=STATS)
    assert recording.created[-1] == f"runs/{RUN}/shards/{SHARD}/manifest.json"
    assert len(recording.created) == len(SHARD_TABLES) + 1


def test_existing_manifest_means_already_landed(store: ObjectStore) -> None:
    first = land_shard(store, RUN, SHARD, shard_tables(), config_hash="cfg1", stats=STATS)
    recording = RecordingStore(store)
    again = land_shard(recording, RUN, SHARD, shard_tables(rows=7), config_hash="cfg1", stats=ShardStats(trees=7))
    assert again == first
    assert recording.created == []


def test_landed_shard_under_another_config_is_refused(store: ObjectStore) -> None:
    land_shard(store, RUN, SHARD, shard_tables(), config_hash="cfg1", stats=STATS)
    with pytest.raises(LandingError, match="already landed with config_hash 'cfg1', not 'cfg2'"):
        land_shard(store, RUN, SHARD, shard_tables(), config_hash="cfg2", stats=STATS)


def test_orphan_parquet_without_manifest_is_overwritten(store: ObjectStore) -> None:
    orphan_key = f"runs/{RUN}/shards/{SHARD}/nodes.parquet"
    store.put_new(orphan_key, b"half of a crashed landing")
    tables = shard_tables()
    manifest = land_shard(store, RUN, SHARD, tables, config_hash="cfg1", stats=STATS)
    assert manifest["files"]["nodes"]["sha256"] == hashlib.sha256(store.get(orphan_key)).hexdigest()
    assert read_shard_table(store, manifest, "nodes").equals(tables["nodes"])


def test_changed_file_is_detected_by_its_checksum(store: ObjectStore) -> None:
    manifest = land_shard(store, RUN, SHARD, shard_tables(), config_hash="cfg1", stats=STATS)
    key = manifest["files"]["pairs"]["key"]
    store.delete(key)
    store.put_new(key, parquet_bytes(shard_tables(rows=2)["pairs"]))
    with pytest.raises(ShardChecksumError, match=rf"s3://{store.bucket}/{key}: .* manifest says"):
        read_shard_table(store, manifest, "pairs")


def test_table_with_a_wrong_column_type_is_refused_naming_the_column(store: ObjectStore) -> None:
    tables = shard_tables()
    pairs = tables["pairs"]
    index = pairs.schema.get_field_index("margin")
    tables["pairs"] = pairs.set_column(index, "margin", pairs.column("margin").cast(pa.float32()))
    with pytest.raises(ShardSchemaError, match="table pairs: column 'margin' is float, expected double"):
        land_shard(store, RUN, SHARD, tables, config_hash="cfg1", stats=STATS)
    assert store.list_keys(f"runs/{RUN}/") == []


def test_missing_table_is_refused(store: ObjectStore) -> None:
    tables = shard_tables()
    del tables["instructions"]
    with pytest.raises(ShardSchemaError, match=r"missing \['instructions'\]"):
        land_shard(store, RUN, SHARD, tables, config_hash="cfg1", stats=STATS)


def test_quarantine_moves_the_shard_with_its_validation(store: ObjectStore) -> None:
    tables = shard_tables()
    land_shard(store, RUN, SHARD, tables, config_hash="cfg1", stats=STATS)
    validation = {"success": False, "failed": ["pairs.margin >= 0"]}

    uri = quarantine_shard(store, RUN, SHARD, validation)

    assert uri == f"s3://{store.bucket}/runs/{RUN}/quarantine/{SHARD}/"
    assert landed_manifest(store, RUN, SHARD) is None
    assert store.list_keys(shard_prefix(RUN, SHARD)) == []
    quarantined = quarantined_manifest(store, RUN, SHARD)
    assert quarantined is not None and quarantined["stats"] == STATS.to_dict()
    assert store.get_json(quarantined["validation_key"]) == {"kind": "validation", **validation}
    for name in SHARD_TABLES:
        assert quarantined["files"][name]["key"] == f"runs/{RUN}/quarantine/{SHARD}/{name}.parquet"
        assert read_shard_table(store, quarantined, name).equals(tables[name])


def test_interrupted_quarantine_finishes_removing_the_shard(store: ObjectStore) -> None:
    land_shard(store, RUN, SHARD, shard_tables(), config_hash="cfg1", stats=STATS)
    quarantine_shard(store, RUN, SHARD, {"success": False})
    # As if an earlier quarantine had stopped right after removing the landed manifest.
    leftover = f"runs/{RUN}/shards/{SHARD}/nodes.parquet"
    store.put_new(leftover, b"leftover")
    quarantine_shard(store, RUN, SHARD, {"success": False})
    assert store.list_keys(shard_prefix(RUN, SHARD)) == []


def test_quarantining_a_shard_that_never_landed_is_refused(store: ObjectStore) -> None:
    with pytest.raises(LandingError, match="no landed shard to quarantine"):
        quarantine_shard(store, RUN, "never-landed", {"success": False})


# --- corrupt landed shards: found on resume or when read, quarantined with what is wrong, grown again --------------


def _corrupt(store: ObjectStore, how: str) -> str:
    """Land a shard, then damage it `how`; return the key of the object at fault."""
    manifest = land_shard(store, RUN, SHARD, shard_tables(), config_hash="cfg1", stats=STATS)
    prefix = shard_prefix(RUN, SHARD)
    if how == "truncated":  # the bytes cut short, the manifest untouched
        key = manifest["files"]["nodes"]["key"]
        body = store.get(key)
        store.delete(key)
        store.put_new(key, body[: len(body) // 2])
        return key
    if how == "truncated, manifest rewritten to match":  # the checksums agree: only reading the Parquet tells
        key = manifest["files"]["nodes"]["key"]
        body = store.get(key)[:-40]
        store.delete(key)
        store.put_new(key, body)
        manifest["files"]["nodes"].update(bytes=len(body), sha256=hashlib.sha256(body).hexdigest())
    elif how == "missing part":
        key = manifest["files"]["pairs"]["key"]
        store.delete(key)
        return key
    elif how == "other run":
        manifest["run_id"] = "run-0"
    elif how == "other config":
        manifest["config_hash"] = "cfg0"
    elif how == "unparseable":
        store.delete(prefix + MANIFEST)
        store.put_new(prefix + MANIFEST, b'{"run_id": "run-1", "files": ')
        return prefix + MANIFEST
    store.delete(prefix + MANIFEST)
    store.put_new(prefix + MANIFEST, json.dumps(manifest).encode())
    return manifest["files"]["nodes"]["key"] if how.startswith("truncated") else prefix + MANIFEST


@pytest.mark.parametrize("how", ["truncated", "truncated, manifest rewritten to match", "missing part"])
def test_a_shard_whose_files_are_damaged_fails_to_read_naming_the_object(store: ObjectStore, how: str) -> None:
    key = _corrupt(store, how)
    known, healed = resume_shard(store, RUN, SHARD, "cfg1")  # its manifest is intact: it resumes as landed
    assert known.state == "reused" and healed is None
    with pytest.raises(ShardIntegrityError) as raised:
        read_shard(store, known.manifest)
    assert raised.value.key == key and store.uri(key) in str(raised.value)


@pytest.mark.parametrize(("how", "says"), [("other run", "manifest run_id is 'run-0', not 'run-1'"),
                                          ("other config", "manifest config_hash is 'cfg0', not 'cfg1'"),
                                          ("unparseable", "manifest is not valid JSON")])
def test_a_shard_whose_manifest_is_not_this_runs_is_quarantined_on_resume_and_grown_again(
        store: ObjectStore, how: str, says: str) -> None:
    key = _corrupt(store, how)
    known, healed = resume_shard(store, RUN, SHARD, "cfg1")
    assert known is None and says in healed  # to be grown again
    assert landed_manifest(store, RUN, SHARD) is None and store.list_keys(shard_prefix(RUN, SHARD)) == []
    quarantined = quarantined_manifest(store, RUN, SHARD)
    validation = store.get_json(quarantined["validation_key"])
    assert (validation["kind"], validation["object"]) == ("integrity", key) and says in validation["mismatch"]
    # Until its regrowth lands, a re-run grows it again rather than calling it quarantined or landed.
    assert resume_shard(store, RUN, SHARD, "cfg1")[0] is None


def test_a_corrupt_shard_read_at_validation_moves_to_quarantine_whole(store: ObjectStore) -> None:
    key = _corrupt(store, "truncated")
    manifest = landed_manifest(store, RUN, SHARD)
    with pytest.raises(ShardIntegrityError) as raised:
        read_shard(store, manifest)
    quarantine_corrupt(store, RUN, SHARD, raised.value)
    quarantined = quarantined_manifest(store, RUN, SHARD)
    assert quarantined["kind"] == "integrity" and quarantined["object"] == key
    assert sorted(quarantined["files"]) == sorted(f"{name}.parquet" for name in SHARD_TABLES)
    assert store.get_json(quarantined["validation_key"])["landed_manifest"]  # the manifest as it was, kept
    assert resume_shard(store, RUN, SHARD, "cfg1") == (None, f"{store.uri(key)}: {raised.value.mismatch}")
    # Its regrowth lands under the same prefix and is then what a re-run finds.
    land_shard(store, RUN, SHARD, shard_tables(), config_hash="cfg1", stats=STATS)
    assert resume_shard(store, RUN, SHARD, "cfg1")[0].state == "reused"
