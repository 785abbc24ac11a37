"""Land a shard in the object store: its Parquet files first, `manifest.json` last; quarantine a shard that failed.

Layout (one prefix per shard; a shard is visible only through its manifest):

    runs/<run_id>/shards/<shard_id>/{instructions,nodes,pairs}.parquet + manifest.json + validation.json
    runs/<run_id>/quarantine/<shard_id>/{...}.parquet + validation.json + manifest.json
"""

from __future__ import annotations

import hashlib
import io
import json
from datetime import datetime, timezone
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from orchard.store import ObjectMissing, ObjectStore
from schemas.errors import OrchardError
from schemas.rows import SHARD_TABLES
from schemas.shards import ShardReceipt, ShardStats

MANIFEST = "manifest.json"
VALIDATION = "validation.json"


class LandingError(OrchardError):
    """A shard cannot be landed, read or quarantined; the message names the shard, file or column."""


class ShardSchemaError(LandingError):
    """A shard table does not have the schema of its contract in schemas/rows.py."""


class ShardIntegrityError(LandingError):
    """A landed shard is not what was landed: a file is missing, truncated, unreadable or differs from its manifest,
    or the manifest is unreadable or belongs to another run, shard or config. Such a shard is quarantined and grown
    again; `key` names the object at fault and `mismatch` what is wrong with it."""

    def __init__(self, uri: str, key: str, mismatch: str) -> None:
        super().__init__(f"{uri}: {mismatch}")
        self.key = key
        self.mismatch = mismatch


class ShardChecksumError(ShardIntegrityError):
    """A shard file's bytes differ from what its manifest recorded."""


def shard_prefix(run_id: str, shard_id: str) -> str:
    """Return the key prefix of a landed shard."""
    return f"runs/{run_id}/shards/{shard_id}/"


def quarantine_prefix(run_id: str, shard_id: str) -> str:
    """Return the key prefix of a quarantined shard."""
    return f"runs/{run_id}/quarantine/{shard_id}/"


def land_shard(
    store: ObjectStore,
    run_id: str,
    shard_id: str,
    tables: Mapping[str, pa.Table],
    *,
    config_hash: str,
    stats: ShardStats,
) -> dict[str, Any]:
    """Write the shard's Parquet files, then its manifest; return the manifest (the existing one if already landed)."""
    prefix = shard_prefix(run_id, shard_id)
    existing = landed_manifest(store, run_id, shard_id)
    if existing is not None:
        return _same_landing(store, prefix, existing, config_hash)

    _check_tables(shard_id, tables)
    try:
        stats_json = json.loads(json.dumps(stats.to_dict()))
    except (TypeError, ValueError) as exc:
        raise LandingError(f"shard {shard_id}: stats are not JSON-serialisable: {exc}") from None

    files: dict[str, dict[str, Any]] = {}
    for name in SHARD_TABLES:
        body = _parquet_bytes(tables[name])
        key = f"{prefix}{name}.parquet"
        # No manifest yet, so a file already here is an orphan of an unfinished landing: replace it.
        put_replacing(store, key, body)
        files[name] = {"key": key, "rows": tables[name].num_rows, "bytes": len(body), "sha256": _sha256(body)}

    manifest = {
        "run_id": run_id,
        "shard_id": shard_id,
        "config_hash": config_hash,
        "files": files,
        "stats": stats_json,
        "landed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    body = json.dumps(manifest, indent=2, sort_keys=True).encode()
    if not store.put_new(prefix + MANIFEST, body):
        # Another lander of the same shard finished first; its manifest is the truth.
        other = landed_manifest(store, run_id, shard_id)
        if other is None:
            raise LandingError(f"{store.uri(prefix + MANIFEST)}: write refused as existing, yet it cannot be read")
        return _same_landing(store, prefix, other, config_hash)
    return json.loads(body)


def landed_manifest(store: ObjectStore, run_id: str, shard_id: str) -> dict[str, Any] | None:
    """Return the manifest of the landed shard, or None if it has not landed (or was quarantined)."""
    return _manifest_at(store, shard_prefix(run_id, shard_id) + MANIFEST)


def quarantined_manifest(store: ObjectStore, run_id: str, shard_id: str) -> dict[str, Any] | None:
    """Return the manifest of the quarantined shard, or None if it is not in quarantine."""
    return _manifest_at(store, quarantine_prefix(run_id, shard_id) + MANIFEST)


def check_manifest(store: ObjectStore, manifest: Mapping[str, Any], run_id: str, shard_id: str,
                   config_hash: str) -> None:
    """Fail with ShardIntegrityError unless `manifest` is shard `shard_id` of run `run_id` under `config_hash` and
    names a complete file entry for every shard table."""
    key = shard_prefix(run_id, shard_id) + MANIFEST
    for field, want in (("run_id", run_id), ("shard_id", shard_id), ("config_hash", config_hash)):
        if manifest.get(field) != want:
            raise ShardIntegrityError(store.uri(key), key, f"manifest {field} is {manifest.get(field)!r}, not {want!r}")
    files = manifest.get("files")
    for name in SHARD_TABLES:
        entry = files.get(name) if isinstance(files, Mapping) else None
        if not isinstance(entry, Mapping) or not all(k in entry for k in ("key", "bytes", "sha256", "rows")):
            raise ShardIntegrityError(store.uri(key), key, f"manifest has no complete files.{name} entry (got {entry!r})")


def read_shard_table(store: ObjectStore, manifest: Mapping[str, Any], name: str) -> pa.Table:
    """Return table `name` of the shard described by `manifest`, after checking its size, sha256 and row count."""
    shard_id = manifest.get("shard_id", "?")
    entry = (manifest.get("files") or {}).get(name)
    if not isinstance(entry, Mapping) or not all(k in entry for k in ("key", "bytes", "sha256", "rows")):
        key = shard_prefix(str(manifest.get("run_id", "?")), shard_id) + MANIFEST
        raise ShardIntegrityError(store.uri(key), key, f"manifest has no complete files.{name} entry (got {entry!r})")
    key = entry["key"]
    try:
        body = store.get(key)
    except ObjectMissing:
        raise ShardIntegrityError(store.uri(key), key, f"listed in the manifest of shard {shard_id} but missing") from None
    digest = _sha256(body)
    if len(body) != entry["bytes"] or digest != entry["sha256"]:
        raise ShardChecksumError(store.uri(key), key,
                                 f"{len(body)} bytes with sha256 {digest}, "
                                 f"manifest says {entry['bytes']} bytes with sha256 {entry['sha256']}")
    try:
        table = pq.read_table(io.BytesIO(body))
    except (pa.ArrowException, OSError) as exc:
        raise ShardIntegrityError(store.uri(key), key, f"not a readable Parquet file: {exc}") from None
    if table.num_rows != entry["rows"]:
        raise ShardIntegrityError(store.uri(key), key, f"{table.num_rows} rows, manifest says {entry['rows']}")
    return table


def read_shard(store: ObjectStore, manifest: Mapping[str, Any]) -> dict[str, pa.Table]:
    """Return every table of a landed shard, each checked against its manifest (ShardIntegrityError if one is off)."""
    return {name: read_shard_table(store, manifest, name) for name in SHARD_TABLES}


def resume_shard(store: ObjectStore, run_id: str, shard_id: str,
                 config_hash: str) -> tuple[ShardReceipt | None, str | None]:
    """Return what an earlier attempt of this run left of a shard: (its receipt, or None if it must be grown; the
    corruption found, if any).

    A landed shard whose manifest is intact and this run's is `reused`; one quarantined by a failed suite stays
    `quarantined` (growing it again would grow the same data); a corrupt one is moved to quarantine here and
    must be grown again, as must one an earlier attempt quarantined as corrupt without landing its regrowth.
    """
    try:
        manifest = landed_manifest(store, run_id, shard_id)
        if manifest is not None:
            check_manifest(store, manifest, run_id, shard_id, config_hash)
            return ShardReceipt.of_manifest(shard_id, "reused", manifest), None
    except ShardIntegrityError as error:
        quarantine_corrupt(store, run_id, shard_id, error)
        return None, str(error)
    try:
        quarantined = quarantined_manifest(store, run_id, shard_id)
    except ShardIntegrityError as error:  # a quarantine copy that cannot be read says nothing final
        return None, str(error)
    if quarantined is not None and quarantined.get("kind") == "integrity":
        return None, f"{store.uri(quarantined.get('object', ''))}: {quarantined.get('mismatch', '')}"
    if quarantined is None or quarantined.get("config_hash") != config_hash:
        return None, None
    return ShardReceipt.of_manifest(shard_id, "quarantined", quarantined), None


def write_validation(store: ObjectStore, run_id: str, shard_id: str, record: Mapping[str, Any]) -> str:
    """Write a landed shard's validation record beside its files (after its manifest); return its key."""
    key = shard_prefix(run_id, shard_id) + VALIDATION
    try:
        body = json.dumps(record, indent=1, sort_keys=True, default=str).encode()
    except (TypeError, ValueError) as exc:
        raise LandingError(f"shard {shard_id}: validation record is not JSON-serialisable: {exc}") from None
    put_replacing(store, key, body)
    return key


def quarantine_shard(store: ObjectStore, run_id: str, shard_id: str, validation: Mapping[str, Any]) -> str:
    """Move a landed shard that failed its suites to quarantine with its validation result; return the quarantine
    prefix URI."""
    source = shard_prefix(run_id, shard_id)
    target = quarantine_prefix(run_id, shard_id)
    manifest = landed_manifest(store, run_id, shard_id)
    if manifest is None:
        if quarantined_manifest(store, run_id, shard_id) is not None:
            # An earlier quarantine wrote its manifest, then stopped before removing all of shards/.
            _delete_prefix(store, source)
            return store.uri(target)
        raise LandingError(f"{store.uri(source + MANIFEST)}: no landed shard to quarantine")
    files = {name: entry for name, entry in manifest["files"].items()}
    return _quarantine(store, run_id, shard_id, {"kind": "validation", **validation},
                       {**manifest, "kind": "validation"}, files)


def quarantine_corrupt(store: ObjectStore, run_id: str, shard_id: str, error: ShardIntegrityError) -> str:
    """Move whatever is under a corrupt landed shard's prefix to quarantine, as it is, with a validation.json that
    names the object at fault and the mismatch; return the quarantine prefix URI."""
    source = shard_prefix(run_id, shard_id)
    keys = [k for k in store.list_keys(source) if k != source + MANIFEST]
    files = {key.rsplit("/", 1)[-1]: {"key": key} for key in keys}
    try:
        landed = store.get(source + MANIFEST).decode("utf-8", errors="replace")
    except ObjectMissing:
        landed = None
    validation = {"kind": "integrity", "shard_id": shard_id, "passed": False, "object": error.key,
                  "mismatch": error.mismatch, "summary": f"corrupt: {error}", "landed_manifest": landed}
    quarantined = {"run_id": run_id, "shard_id": shard_id, "kind": "integrity", "object": error.key,
                   "mismatch": error.mismatch, "stats": {}}
    return _quarantine(store, run_id, shard_id, validation, quarantined, files)


# --- internals ----------------------------------------------------------------------------------------


def _quarantine(store: ObjectStore, run_id: str, shard_id: str, validation: Mapping[str, Any],
                manifest: Mapping[str, Any], files: Mapping[str, Mapping[str, Any]]) -> str:
    """Copy `files` (name -> entry with the landed `key`) to the shard's quarantine prefix, write `validation`, then
    the quarantine manifest, then delete the landed prefix; return the quarantine prefix URI."""
    target = quarantine_prefix(run_id, shard_id)
    try:
        validation_body = json.dumps(validation, indent=2, sort_keys=True, default=str).encode()
    except (TypeError, ValueError) as exc:
        raise LandingError(f"shard {shard_id}: validation result is not JSON-serialisable: {exc}") from None
    copied: dict[str, dict[str, Any]] = {}
    for name, entry in files.items():
        key = target + entry["key"].rsplit("/", 1)[-1]
        try:
            # Bytes are copied as they are, unverified: a shard may be quarantined because they are bad.
            put_replacing(store, key, store.get(entry["key"]))
        except ObjectMissing:
            continue  # a part the manifest lists but the store lost: validation.json says so
        copied[name] = {**entry, "key": key}
    put_replacing(store, target + VALIDATION, validation_body)
    quarantined = {**manifest, "files": copied, "validation_key": target + VALIDATION,
                   "quarantined_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    # Written last among the quarantine files so it only ever describes a complete copy.
    put_replacing(store, target + MANIFEST, json.dumps(quarantined, indent=2, sort_keys=True).encode())
    _delete_prefix(store, shard_prefix(run_id, shard_id))
    return store.uri(target)


def _same_landing(store: ObjectStore, prefix: str, manifest: dict[str, Any], config_hash: str) -> dict[str, Any]:
    """Return `manifest` if it was landed with `config_hash`; a shard is written once, so fail otherwise."""
    if manifest.get("config_hash") != config_hash:
        raise LandingError(
            f"{store.uri(prefix + MANIFEST)}: already landed with config_hash {manifest.get('config_hash')!r}, "
            f"not {config_hash!r}; a shard is written once (start a new run to grow it again)"
        )
    return manifest


def _check_tables(shard_id: str, tables: Mapping[str, pa.Table]) -> None:
    """Fail unless `tables` holds exactly the shard tables, each with its contract's columns and types."""
    missing = sorted(set(SHARD_TABLES) - set(tables))
    unknown = sorted(set(tables) - set(SHARD_TABLES))
    if missing or unknown:
        raise ShardSchemaError(
            f"shard {shard_id}: expected tables {sorted(SHARD_TABLES)}; "
            + "; ".join(filter(None, [missing and f"missing {missing}", unknown and f"unknown {unknown}"]))
        )
    for name, expected in SHARD_TABLES.items():
        actual = tables[name].schema
        for column in expected.names:
            if column not in actual.names:
                raise ShardSchemaError(f"shard {shard_id}, table {name}: column {column!r} is missing")
            want, got = expected.field(column).type, actual.field(column).type
            if not got.equals(want):
                raise ShardSchemaError(f"shard {shard_id}, table {name}: column {column!r} is {got}, expected {want}")
        extra = [c for c in actual.names if c not in expected.names]
        if extra:
            raise ShardSchemaError(f"shard {shard_id}, table {name}: unexpected column(s) {extra}")
        if actual.names != expected.names:
            raise ShardSchemaError(
                f"shard {shard_id}, table {name}: columns are in order {actual.names}, expected {expected.names}"
            )


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def _sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def put_replacing(store: ObjectStore, key: str, body: bytes) -> None:
    """Create `key` with `body`, replacing an object left there by an unfinished earlier attempt."""
    if store.put_new(key, body):
        return
    store.delete(key)
    if not store.put_new(key, body):
        raise LandingError(f"{store.uri(key)}: recreated by another writer while replacing it (concurrent landing?)")


def _manifest_at(store: ObjectStore, key: str) -> dict[str, Any] | None:
    try:
        body = store.get(key)
    except ObjectMissing:
        return None
    try:
        manifest = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardIntegrityError(store.uri(key), key, f"manifest is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise ShardIntegrityError(store.uri(key), key, "manifest is not a JSON object")
    return manifest


def _delete_prefix(store: ObjectStore, prefix: str) -> None:
    """Delete every object under `prefix`, the manifest first so the shard stops being visible at once."""
    keys = store.list_keys(prefix)
    if prefix + MANIFEST in keys:
        store.delete(prefix + MANIFEST)
    for key in keys:
        if key != prefix + MANIFEST:
            store.delete(key)
