"""Materialise a run: publish its validated shards, validation results and run row as one lake snapshot.

Everything happens in one DuckLake transaction, so a run is published whole or not at all, and a
re-run of the same run id adds only the shards the lake does not hold yet and replaces the run row.
The same transaction indexes the new shards' instructions for later runs' dedup (tasks/history.py).
With a shared (Postgres) catalog, a transaction that loses the race for its snapshot id to another
writer is not committed; it is run again from the newer snapshot, so that the shards it finds
published, and the snapshot id it records, are still true when it commits.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, TypeVar

import duckdb
import pyarrow as pa
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from orchard import lake
from orchard.config import Config
from orchard.lake import LakeError
from schemas.errors import retry_transient
from schemas.fates import STATUSES
from schemas.rows import CONTAMINATION, DROPS, SHARD_TABLES, VALIDATIONS
from schemas.run import RunSummary
from tasks import history
from tasks.hygiene import Signing
from tasks.jury import agreement

RUN_COLUMNS = (
    "run_id", "flow_run_id", "snapshot_id", "config_hash", "started_at", "finished_at", "status",
    "shards_planned", "shards_published", "shards_quarantined", "shards_failed", "trees", "nodes", "pairs",
    "pass_rate", "prompt_tokens", "completion_tokens", "wall_s", "tokens_per_s", "summary", "fleiss_kappa",
    "agreement", "shards_reused", "cached_share",
)  # fmt: skip
# The parts of a run's summary kept as JSON in runs.summary: why shards and rows did not make it, and the fates.
SUMMARY_FIELDS = ("problems", "fates", "shards_healed", "requests", "trees_unanswered", "seeds", "prefix_cache",
                  "prefix_cache_by_shard", "drops_before_growth", "contaminated", "nothing_planned",
                  "prm_min_rollouts")
COMPUTED = ("snapshot_id", "fleiss_kappa", "agreement")  # filled in here, from what the lake holds
T = TypeVar("T")


def materialise_run(
    config: Config,
    run_row: Mapping[str, Any],
    shards: Sequence[Mapping[str, Any]],
    validations: Iterable[Mapping[str, Any]] = (),
) -> int:
    """Publish `shards` (landed manifests that passed validation) and the run's rows; return the new snapshot id.

    `run_row` holds the `runs` columns except the computed ones (snapshot id, jury agreement); `validations` are rows of the
    `validations` table (shard_id, suite, expectation, column, success, observed), for published
    and quarantined shards alike. Shards and validation results already in the lake for this run
    are skipped; the run row is replaced. If anything fails, nothing is published.
    """
    run = _run_values(run_row)
    return _publish_snapshot(config, run["run_id"], lambda present: (run, None), shards, validations)[0]


def publish_run(
    config: Config,
    summary: RunSummary,
    shards: Sequence[Mapping[str, Any]],
    validations: Iterable[Mapping[str, Any]] = (),
    run_rows: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> RunSummary:
    """Publish like materialise_run, the run row written from `summary` with its fates settled inside the publishing
    transaction (a passing shard the lake already held is `reused`); return the summary as published: its fates
    settled, its snapshot id set. `run_rows` holds the run-level rows of `drops` (shard_id null) and
    `contamination`: they replace the run's."""
    finished_at = datetime.now(timezone.utc).isoformat()

    def settled_row(present: set[str]) -> tuple[dict[str, Any], RunSummary]:
        # The run row says what this transaction found, not what the caller expected.
        settled = summary.settled(present)
        return _run_values(run_row(settled, finished_at)), settled

    snapshot_id, settled = _publish_snapshot(config, summary.run_id, settled_row, shards, validations, run_rows)
    return dataclasses.replace(settled, snapshot_id=snapshot_id)


def run_row(summary: RunSummary, finished_at: str) -> dict[str, Any]:
    """Return the `runs` values of `summary` but the computed ones, its SUMMARY_FIELDS as the `summary` column."""
    values = summary.to_dict()
    row = {column: values.get(column) for column in RUN_COLUMNS if column not in COMPUTED}
    row["finished_at"] = finished_at
    row["summary"] = {k: values[k] for k in SUMMARY_FIELDS if k in values}
    return row


def _publish_snapshot(
    config: Config,
    run_id: str,
    settled_row: Callable[[set[str]], tuple[dict[str, Any], T]],
    shards: Sequence[Mapping[str, Any]],
    validations: Iterable[Mapping[str, Any]] = (),
    run_rows: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> tuple[int, T]:
    """Publish in one transaction; `settled_row(shards the lake holds)` gives the run row and what the caller gets
    back with the snapshot id."""
    for manifest in shards:
        _check_manifest(manifest, run_id)

    validations = list(validations)  # read again by each attempt

    with lake.connect(config) as con:
        # Run again from the newer snapshot if another writer of a shared catalog committed first: the shards it
        # finds published, and the snapshot id it records, must still be true when it commits.
        snapshot_id, settled = lake.commit_alone(
            con, lambda: _publish(con, config, run_id, settled_row, shards, validations, run_rows or {}),
            what=f"run {run_id}: nothing published")
        # The id this connection committed, and the snapshot carrying this run's commit message, must both be the
        # one written into runs.snapshot_id (a guard: commit_alone ensures it).
        committed = con.execute(f"SELECT id FROM {lake.LAKE}.last_committed_snapshot()").fetchone()[0]
        published = {row["snapshot_id"]: row for row in lake.snapshot_rows(con)}.get(snapshot_id)
    tagged = published is not None and json.loads(published["commit_extra_info"] or "{}").get("run_id") == run_id
    if committed != snapshot_id or not tagged:
        raise LakeError(
            f"run {run_id}: published as snapshot {committed}, but runs.snapshot_id says {snapshot_id} "
            "(another writer committed in between); fix the runs row by hand"
        )
    return snapshot_id, settled


def _publish(
    con: duckdb.DuckDBPyConnection,
    config: Config,
    run_id: str,
    settled_row: Callable[[set[str]], tuple[dict[str, Any], T]],
    shards: Sequence[Mapping[str, Any]],
    validations: Sequence[Mapping[str, Any]],
    run_rows: Mapping[str, Sequence[Mapping[str, Any]]],
) -> tuple[int, T]:
    """The writes of one publishing transaction of materialise_run; return the snapshot id its commit will make."""
    # Snapshot ids are sequential: this transaction started from `current_snapshot()` and its COMMIT creates the next
    # one. A DuckDB-file catalog has one writer process; with a shared catalog a writer that commits first takes that
    # id, and our COMMIT then fails (lake.commit_alone runs this again).
    base = con.execute(f"SELECT id FROM {lake.LAKE}.current_snapshot()").fetchone()[0]
    snapshot_id = base + 1

    present = _shards_in_lake(con, run_id)
    run, settled = settled_row(present)
    run = dict(run)  # this attempt's: the snapshot id and jury agreement are filled in below
    _check_same_config(con, run_id, run["config_hash"])
    new_shards = [m for m in shards if m["shard_id"] not in present]
    for table in SHARD_TABLES:
        _insert_shard_table(con, config.object_store.bucket, table, new_shards)
    # The index later runs dedup against: the new shards' instructions, fingerprinted under this run's settings.
    signing = Signing.of(config.hygiene)
    history.index_shards(con, run_id, [m["shard_id"] for m in new_shards], signing)

    _insert_validations(con, run_id, validations)
    _replace_run_rows(con, run_id, run_rows)

    con.execute("DELETE FROM runs WHERE run_id = ?", [run_id])
    run["snapshot_id"] = snapshot_id
    # Agreement over every judgement of the run in the lake: this attempt's shards and any published before.
    stats = jury_agreement(con, run_id)
    run["fleiss_kappa"] = stats["fleiss_kappa"] if stats else None
    run["agreement"] = json.dumps(stats, sort_keys=True) if stats else None
    con.execute(
        f"INSERT INTO runs ({', '.join(RUN_COLUMNS)}) VALUES ({', '.join('?' for _ in RUN_COLUMNS)})",
        [run[c] for c in RUN_COLUMNS],
    )
    con.execute(
        f"CALL {lake.LAKE}.set_commit_message('orchard', ?, extra_info => ?)",
        [f"run {run_id}", json.dumps({"run_id": run_id, "shards_added": [m["shard_id"] for m in new_shards],
                                      history.MINHASH: signing.label})],
    )
    return snapshot_id, settled


def published_config_hash(config: Config, run_id: str) -> str | None:
    """Return the config hash run `run_id` was published with, or None when the lake has no such run (or no lake)."""
    if not lake.exists(config):
        return None
    with lake.connect(config, read_only=True) as con:
        # A first publish killed before its schema committed leaves a catalog without tables: no run published yet.
        has_runs = con.execute("SELECT count(*) FROM duckdb_tables() WHERE database_name = ? AND table_name = 'runs'",
                               [lake.LAKE]).fetchone()[0]
        row = con.execute("SELECT config_hash FROM runs WHERE run_id = ?", [run_id]).fetchone() if has_runs else None
    return row[0] if row else None


def _check_same_config(con: duckdb.DuckDBPyConnection, run_id: str, config_hash: str) -> None:
    """Fail if run `run_id` is already published under another config: resuming it would mix two configs' shards."""
    row = con.execute("SELECT config_hash FROM runs WHERE run_id = ?", [run_id]).fetchone()
    if row is not None and row[0] != config_hash:
        raise LakeError(conflict_message(run_id, row[0], config_hash))


def conflict_message(run_id: str, published: str, now: str) -> str:
    return (f"run {run_id} was published with config {published}, and this config is {now}: a re-run with the "
            "same run id resumes that run, so it must use the same config (give a new --run-id, or restore the "
            "config)")


def jury_agreement(con: duckdb.DuckDBPyConnection, run_id: str) -> dict[str, Any] | None:
    """Return the jury statistics of run `run_id` from its judgements in the lake (None when nothing was judged)."""
    cursor = con.execute(
        "SELECT comparison_id, kind, judge, presented, status, winner, preference, label "
        "FROM judgements WHERE run_id = ? ORDER BY judgement_id", [run_id])
    names = [d[0] for d in cursor.description]
    rows = [dict(zip(names, row)) for row in cursor.fetchall()]
    if not rows:
        return None
    return agreement(rows)


def shard_uri(bucket: str, manifest: Mapping[str, Any], table: str) -> str:
    """Return the s3:// URI of `table`'s Parquet file in a landed shard's manifest."""
    return f"s3://{bucket}/{manifest['files'][table]['key']}"


# --- internals --------------------------------------------------------------------------------


def _run_values(run_row: Mapping[str, Any]) -> dict[str, Any]:
    """The runs-table values of `run_row`, checked: every column but snapshot_id, a known status."""
    expected = set(RUN_COLUMNS) - set(COMPUTED)
    missing = sorted(expected - set(run_row))
    unknown = sorted(set(run_row) - expected)
    if missing or unknown:
        raise LakeError(
            f"run row {run_row.get('run_id', '?')}: "
            + "; ".join(filter(None, [missing and f"missing {missing}", unknown and f"unknown {unknown}"]))
        )
    if run_row["status"] not in STATUSES:
        raise LakeError(f"run row {run_row['run_id']}: status must be one of {STATUSES}, got {run_row['status']!r}")
    values = dict(run_row)
    if values["summary"] is not None and not isinstance(values["summary"], str):
        values["summary"] = json.dumps(values["summary"], sort_keys=True, default=str)
    return values


def _check_manifest(manifest: Mapping[str, Any], run_id: str) -> None:
    """Fail unless `manifest` is a landed shard of run `run_id` that names a file for every shard table."""
    shard_id = manifest.get("shard_id", "?")
    if manifest.get("run_id") != run_id:
        raise LakeError(f"shard {shard_id}: manifest belongs to run {manifest.get('run_id')!r}, not {run_id!r}")
    files = manifest.get("files") or {}
    for table in SHARD_TABLES:
        entry = files.get(table)
        if not isinstance(entry, Mapping) or not entry.get("key") or not isinstance(entry.get("rows"), int):
            raise LakeError(f"shard {shard_id}: manifest files.{table} needs a key and a row count, got {entry!r}")


def _shards_in_lake(con: duckdb.DuckDBPyConnection, run_id: str) -> set[str]:
    """The shard ids of run `run_id` whose rows are already in the lake."""
    union = " UNION ".join(f"SELECT shard_id FROM {table} WHERE run_id = $run_id" for table in SHARD_TABLES)
    return {row[0] for row in con.execute(union, {"run_id": run_id}).fetchall()}


def _insert_shard_table(
    con: duckdb.DuckDBPyConnection, bucket: str, table: str, manifests: Sequence[Mapping[str, Any]]
) -> None:
    """Copy `table`'s Parquet files of `manifests` into the lake table, checking the manifests' row counts."""
    uris = [shard_uri(bucket, m, table) for m in manifests if m["files"][table]["rows"] > 0]
    if not uris:
        return
    columns = ", ".join(f'"{name}"' for name in SHARD_TABLES[table].names)
    # One INSERT for all shards of the run: one set of data files per table instead of one per shard.
    inserted = con.execute(
        f"INSERT INTO {table} ({columns}) SELECT {columns} FROM read_parquet(?)", [uris]
    ).fetchone()[0]
    expected = sum(m["files"][table]["rows"] for m in manifests)
    if inserted != expected:
        counts = dict(
            con.execute("SELECT filename, count(*) FROM read_parquet(?, filename = true) GROUP BY filename", [uris])
            .fetchall()
        )
        wrong = [
            f"{uri} has {counts.get(uri, 0)} rows, manifest says {m['files'][table]['rows']}"
            for m in manifests
            if (uri := shard_uri(bucket, m, table)) in uris and counts.get(uri, 0) != m["files"][table]["rows"]
        ]
        raise LakeError(f"{table}: read {inserted} rows, manifests say {expected}: " + "; ".join(wrong))


def _replace_run_rows(con: duckdb.DuckDBPyConnection, run_id: str,
                      run_rows: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    """Replace the run's own rows of `drops` (shard_id null) and `contamination` with `run_rows`' (a re-run plans
    the same seeds again, so they are the same rows, not more)."""
    schemas = {"drops": DROPS, "contamination": CONTAMINATION}
    con.execute("DELETE FROM drops WHERE run_id = ? AND shard_id IS NULL", [run_id])
    con.execute("DELETE FROM contamination WHERE run_id = ?", [run_id])
    for table, schema in schemas.items():
        rows = [dict(row) for row in run_rows.get(table, ())]
        if table == "drops" and any(row.get("shard_id") is not None for row in rows):
            raise LakeError(f"run {run_id}: a run-level drops row names a shard (shard drops land with the shard)")
        if any(row.get("run_id") != run_id for row in rows):
            raise LakeError(f"run {run_id}: a {table} row belongs to another run")
        _insert_rows(con, table, schema, rows)


def _insert_rows(con: duckdb.DuckDBPyConnection, table: str, schema: pa.Schema, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert `rows` (dicts with `schema`'s columns) into lake table `table`, as one Arrow batch."""
    lake.insert_arrow(con, table, pa.Table.from_pylist(list(rows), schema=schema))


def _insert_validations(
    con: duckdb.DuckDBPyConnection, run_id: str, validations: Iterable[Mapping[str, Any]]
) -> None:
    """Insert the validation rows of shards that have none in the lake yet for this run."""
    done = {
        row[0] for row in con.execute("SELECT DISTINCT shard_id FROM validations WHERE run_id = ?", [run_id]).fetchall()
    }
    rows = []
    for i, v in enumerate(validations):
        missing = [k for k in ("shard_id", "suite", "expectation", "success") if k not in v]
        if missing:
            raise LakeError(f"run {run_id}: validation row {i} lacks {missing}")
        if v.get("run_id", run_id) != run_id:
            raise LakeError(f"run {run_id}: validation row {i} belongs to run {v['run_id']!r}")
        if v["shard_id"] in done:
            continue
        observed = v.get("observed")
        rows.append(
            {
                "run_id": run_id,
                "shard_id": v["shard_id"],
                "suite": v["suite"],
                "expectation": v["expectation"],
                "column": v.get("column"),
                "success": bool(v["success"]),
                "observed": observed if observed is None or isinstance(observed, str)
                else json.dumps(observed, sort_keys=True, default=str),
            }
        )
    _insert_rows(con, "validations", VALIDATIONS, rows)



# --- Prefect tasks: one per run ---------------------------------------------------------------


@task(name="check-run-id", cache_policy=NO_CACHE)
def check_run_id_task(config: dict, run_id: str) -> None:
    """Fail before anything is grown when `run_id` was published under another config (materialise checks again)."""
    cfg = Config.from_dict(config)
    published = published_config_hash(cfg, run_id)
    if published is not None and published != cfg.content_hash():
        raise LakeError(conflict_message(run_id, published, cfg.content_hash()))



@task(name="materialise", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient)
def materialise_task(config: dict, summary: RunSummary, shards: list[dict], validations: list[dict],
                     run_rows: dict | None = None) -> RunSummary:
    """Publish the run's validated shards and its runs row as one lake snapshot; return the run's summary as the
    publishing transaction settled it, with its snapshot id."""
    published = publish_run(Config.from_dict(config), summary, shards, validations, run_rows)
    get_run_logger().info("run %s published as lake snapshot %d", summary.run_id, published.snapshot_id)
    return published
