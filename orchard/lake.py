"""The DuckLake lake: connections with the S3 secret and the catalog attached, queries, snapshots.

DuckDB cannot INSTALL extensions here (no network), so httpfs and ducklake (and postgres_scanner for
a `postgres:` catalog) are LOADed from the signed files that the `duckdb-extension-*` packages ship.
A DuckDB-file catalog admits one process at a time, and within one process one open attachment:
open a connection, use it, close it. A Postgres catalog admits several writer processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import logging
import os
import random
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import duckdb
import pyarrow as pa

from orchard.config import Config, ObjectStoreConfig, secret_value
from schemas.errors import OrchardError
from schemas.rows import LAKE_TABLES, TABLE_OPTIONS

_log = logging.getLogger(__name__)

LAKE = "lake"  # the name the lake is attached under; queries may say `lake.pairs` or just `pairs`
_SCHEMA_MARK = "orchard-schema sha256:"  # prefix of the comment on `runs` that records the applied DDL
_REMOTE_CATALOGS = ("postgres:", "sqlite:", "mysql:")
# Writers that attach a new shared catalog at the same moment race to create DuckLake's metadata tables;
# the loser's error says so (Postgres: "duplicate key value violates unique constraint"), and a second try
# finds them made.
_CREATION_RACE = ("already exists", "duplicate key")
_ATTACH_ATTEMPTS = 4
# Attempts of a write when other writers of a shared catalog keep committing first; the wait between them grows like
# DuckLake's own retries (100 ms, x1.5), with jitter so that two losers do not meet again.
COMMIT_ATTEMPTS = 10
T = TypeVar("T")
# The DuckDB type of each Arrow type schemas/rows.py uses, spelled as duckdb_columns() reports it; lists and structs
# of these are composed by duckdb_type.
_DUCKDB_TYPES = {
    pa.string(): "VARCHAR",
    pa.int64(): "BIGINT",
    pa.float64(): "DOUBLE",
    pa.bool_(): "BOOLEAN",
    pa.uint32(): "UINTEGER",
    pa.uint64(): "UBIGINT",
}


class LakeError(OrchardError):
    """The lake cannot be opened, queried or written; the message names the catalog, snapshot or query."""


class LakeUnavailable(LakeError):
    """The catalog or the lake's data files could not be reached, or other writers kept committing first: a
    later attempt may succeed."""

    transient = True


class LakeNotFound(LakeError):
    """A read-only or versioned connection found no lake in the catalog: no run has created it yet."""


def extension_path(name: str) -> Path:
    """Return the `.duckdb_extension` file that the `duckdb-extension-<name>` package ships for this DuckDB."""
    package = f"duckdb_extension_{name}"
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        raise LakeError(f"DuckDB extension {name!r}: package duckdb-extension-{name} is not installed") from None
    path = Path(str(root)) / "extensions" / f"v{duckdb.__version__}" / f"{name}.duckdb_extension"
    if not path.is_file():
        raise LakeError(
            f"DuckDB extension {name!r}: {path} does not exist; duckdb-extension-{name} must match "
            f"duckdb=={duckdb.__version__}"
        )
    return path


def schema_sql() -> str:
    """Return the lake's DDL: the tables of schemas/rows.py (tables_sql), then schemas/lake.sql (`runs`, the views)."""
    return tables_sql(LAKE_TABLES) + "\n" + importlib.resources.files("schemas").joinpath("lake.sql").read_text()


def tables_sql(tables: Mapping[str, pa.Schema]) -> str:
    """Return DuckDB DDL that creates each table from its Arrow schema and adds any column an existing table lacks.

    Every column gets an `ADD COLUMN IF NOT EXISTS`: a no-op where the table has it; on a lake made before the column
    it is appended, as in schemas/rows.py (which appends new columns), and rows already there read NULL in it.
    """
    creates, migrations = [], []
    for name, schema in tables.items():
        columns = [f"{identifier(field.name)} {_column_type(name, field)}" for field in schema]
        creates.append(f"CREATE TABLE IF NOT EXISTS {identifier(name)} (\n    " + ",\n    ".join(columns) + "\n);\n")
        migrations += [f"ALTER TABLE {identifier(name)} ADD COLUMN IF NOT EXISTS {column};\n" for column in columns]
    return "".join(creates + migrations)


def duckdb_type(kind: pa.DataType) -> str:
    """Return the DuckDB type of Arrow type `kind` as duckdb_columns() spells it, e.g. `STRUCT("role" VARCHAR)[]`."""
    if pa.types.is_list(kind):
        return duckdb_type(kind.value_type) + "[]"
    if pa.types.is_struct(kind):
        return "STRUCT(" + ", ".join(f"{identifier(field.name)} {duckdb_type(field.type)}" for field in kind) + ")"
    if kind not in _DUCKDB_TYPES:
        raise LakeError(f"Arrow type {kind} has no DuckDB type in orchard.lake (_DUCKDB_TYPES)")
    return _DUCKDB_TYPES[kind]


def connect(config: Config, *, read_only: bool = False, version: int | None = None) -> duckdb.DuckDBPyConnection:
    """Return a DuckDB connection with the lake attached as `lake` and in use; `version` attaches a past snapshot.

    A writable connection creates the catalog on first use and applies the schema (schema_sql) when it
    changed. A read-only or versioned connection never writes and fails if the lake does not exist.
    """
    catalog = _catalog(config)
    writable = not read_only and version is None
    if writable:
        _create_file_catalog(config, catalog)
    for attempt in range(1, _ATTACH_ATTEMPTS + 1):
        try:
            return _open(config, catalog, read_only=read_only, version=version)
        except LakeError as exc:
            racing = writable and catalog.startswith(_REMOTE_CATALOGS) and any(
                mark in str(exc).lower() for mark in _CREATION_RACE
            )
            if not racing or attempt == _ATTACH_ATTEMPTS:
                raise
            time.sleep(0.2 * attempt)
    raise AssertionError("unreachable")


def _create_file_catalog(config: Config, catalog: str) -> None:
    """Create a DuckDB-file catalog that does not exist yet whole or not at all: built beside it under a temporary name
    (the catalog, its schema) and linked into place, so a failure half-way (a full disk) leaves no file that a later
    run would find unreadable. Another process creating it at the same time wins: its file is kept."""
    path = Path(catalog)
    if catalog.startswith(_REMOTE_CATALOGS) or path.exists():
        return
    partial = path.with_name(f".{path.name}.creating-{os.getpid()}")
    try:
        _open(config, str(partial), read_only=False, version=None).close()
        with contextlib.suppress(FileExistsError):
            os.link(partial, path)
    finally:
        for leftover in (partial, partial.with_name(partial.name + ".wal")):
            leftover.unlink(missing_ok=True)


def extensions(catalog: str) -> tuple[str, ...]:
    """The DuckDB extensions a lake with this catalog needs; a Postgres catalog is reached through postgres_scanner."""
    return ("httpfs", "ducklake", "postgres_scanner") if catalog.startswith("postgres:") else ("httpfs", "ducklake")


def _open(config: Config, catalog: str, *, read_only: bool, version: int | None) -> duckdb.DuckDBPyConnection:
    """One try at connect(): a new DuckDB connection with the extensions loaded and the lake attached."""
    con = duckdb.connect()
    try:
        for name in extensions(catalog):
            con.execute(f"LOAD {quote(str(extension_path(name)))}")
        con.execute(_secret_sql(config.object_store))
        options = [f"DATA_PATH {quote(config.lake_data_path)}"]
        if version is not None:
            options.append(f"SNAPSHOT_VERSION {int(version)}")
        elif read_only:
            options.append("READ_ONLY")
        try:
            con.execute(f"ATTACH {quote('ducklake:' + catalog)} AS {LAKE} ({', '.join(options)})")
        except duckdb.Error as exc:
            raise _attach_error(catalog, version, exc) from None
        con.execute(f"USE {LAKE}")
        if not read_only and version is None:
            _apply_schema(con)
            _apply_table_options(con)
    except BaseException:
        con.close()
        raise
    return con


def exists(config: Config) -> bool:
    """Whether the lake exists: a DuckDB-file catalog's file is there; a remote catalog is attached read-only to tell."""
    catalog = config.lake_catalog.removeprefix("ducklake:")
    if not catalog.startswith(_REMOTE_CATALOGS):
        return Path(catalog).expanduser().exists()
    try:
        connect(config, read_only=True).close()
    except LakeNotFound:
        return False
    return True


def query(config: Config, sql: str, *, version: int | None = None) -> tuple[list[str], list[tuple]]:
    """Run one read-only SQL query on the lake (as of snapshot `version` if given); return column names and rows."""
    with connect(config, read_only=True, version=version) as con:
        try:
            cursor = con.execute(sql)
        except duckdb.Error as exc:
            where = f" at snapshot {version}" if version is not None else ""
            raise LakeError(f"query on lake {_catalog(config)}{where} failed: {_first_line(exc)}\n  query: {sql}") from None
        if cursor.description is None:  # a statement without a result (e.g. SET): nothing to show
            return [], []
        columns = [column[0] for column in cursor.description]
        return columns, cursor.fetchall()


def snapshots(config: Config) -> list[dict[str, Any]]:
    """Return every snapshot of the lake, oldest first, with its changes and commit message."""
    with connect(config, read_only=True) as con:
        return snapshot_rows(con)


def snapshot_rows(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """Return the snapshots of the lake attached to `con`, oldest first."""
    cursor = con.execute(f"SELECT * FROM {LAKE}.snapshots() ORDER BY snapshot_id")
    columns = [column[0] for column in cursor.description]
    return [dict(zip(columns, row)) for row in cursor.fetchall()]


def commit_alone(con: duckdb.DuckDBPyConnection, write: Callable[[], T], *, what: str,
                 attempts: int = COMMIT_ATTEMPTS) -> T:
    """Return what `write()` returned once the transaction it ran in committed with no other commit in between.

    DuckLake would retry a commit that lost its snapshot id to another writer against the newer snapshot, without
    running our reads again: a write could add rows another writer added meanwhile, or record a snapshot id it did not
    get. Its retries are turned off instead, and `write` runs again from the newer snapshot. (A DuckDB-file catalog
    has one writer process: it never loses.) Errors say `what` first, e.g. "run r1: nothing published".
    """
    con.execute("SET ducklake_max_retry_count = 0")
    for attempt in range(1, attempts + 1):
        con.execute("BEGIN")
        try:
            result = write()
            con.execute("COMMIT")
            return result
        except BaseException as exc:
            rollback(con)
            if isinstance(exc, duckdb.TransactionException) and "maximum retry count" in str(exc):
                if attempt == attempts:
                    raise LakeUnavailable(f"{what}: other writers of the catalog committed first {attempt} times "
                                          "in a row") from None
                time.sleep(0.1 * 1.5 ** (attempt - 1) * random.uniform(0.5, 1.5))
                continue
            if isinstance(exc, duckdb.IOException | duckdb.ConnectionException | duckdb.HTTPException):
                raise LakeUnavailable(f"{what}: {exc}") from None
            if isinstance(exc, duckdb.Error | LakeError):
                raise LakeError(f"{what}: {exc}") from None
            raise
    raise AssertionError("unreachable")


def insert_arrow(con: duckdb.DuckDBPyConnection, table: str, rows: pa.Table) -> None:
    """Insert the Arrow table `rows` into lake table `table`, by column name."""
    if not rows.num_rows:
        return
    con.register("new_rows", rows)
    try:
        columns = ", ".join(f'"{name}"' for name in rows.schema.names)
        con.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM new_rows")
    finally:
        con.unregister("new_rows")


def rollback(con: duckdb.DuckDBPyConnection) -> None:
    """Roll back the open transaction; one whose COMMIT failed has already ended, which is fine.

    Callers roll back on their way out with an error of their own. A catalog that went away mid-transaction (a
    Postgres server stopped) cannot roll back either: nothing was committed, and the caller's error says why, so
    the rollback's failure is logged rather than raised over it.
    """
    try:
        con.execute("ROLLBACK")
    except duckdb.TransactionException as exc:
        if "no transaction is active" not in str(exc):
            raise
    except duckdb.Error as exc:
        _log.warning("rollback failed (the transaction was not committed): %s", _first_line(exc) or type(exc).__name__)


# --- internals --------------------------------------------------------------------------------


def _catalog(config: Config) -> str:
    """The catalog string after `ducklake:`; a file catalog gets its parent directory created."""
    catalog = config.lake_catalog.removeprefix("ducklake:")
    if catalog.startswith(_REMOTE_CATALOGS):
        return catalog
    path = Path(catalog).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return str(path)


def _secret_sql(store: ObjectStoreConfig) -> str:
    """The CREATE SECRET statement that lets httpfs reach the object store."""
    if not store.endpoint_url:
        raise LakeError(
            "object_store.endpoint_url is empty: start the embedded store (orchard.services) "
            "or configure an endpoint before opening the lake"
        )
    url = urlsplit(store.endpoint_url)
    if url.scheme not in ("http", "https") or not url.netloc:
        raise LakeError(f"object_store.endpoint_url: expected http(s)://host[:port], got {store.endpoint_url!r}")
    # AWS wants virtual-host addressing; SeaweedFS, MinIO and R2 answer path-style requests.
    url_style = "vhost" if url.hostname and url.hostname.endswith("amazonaws.com") else "path"
    return (
        "CREATE SECRET orchard_s3 (TYPE s3, "
        f"KEY_ID {quote(store.access_key_id)}, SECRET {quote(secret_value(store.secret_access_key))}, "
        f"ENDPOINT {quote(url.netloc)}, URL_STYLE '{url_style}', "
        f"USE_SSL {'true' if url.scheme == 'https' else 'false'}, REGION {quote(store.region)})"
    )


def _apply_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Apply schema_sql() in one transaction unless the lake already carries this exact DDL.

    Re-running the DDL every time would not be free: CREATE OR REPLACE VIEW makes a new snapshot
    on each call. The hash of the applied DDL (generated from schemas/rows.py, so a row change
    changes it) is kept as the comment on `runs`. The DDL migrates a lake made by an older version
    (new tables, new columns); a column whose type changed since cannot be migrated so, and fails
    here, before anything is committed, instead of at the next INSERT.
    """
    ddl = schema_sql()
    mark = _SCHEMA_MARK + hashlib.sha256(ddl.encode()).hexdigest()[:16]
    if _applied_mark(con) == mark:
        return
    con.execute("BEGIN")
    try:
        con.execute(ddl)
        _check_types(con)
        con.execute(f"COMMENT ON TABLE runs IS {quote(mark)}")
        con.execute(f"CALL {LAKE}.set_commit_message('orchard', {quote('schema ' + mark)})")
        con.execute("COMMIT")
    except duckdb.Error as exc:
        rollback(con)
        # Writers of a shared catalog that apply the same DDL at once conflict (both create `runs`, …);
        # DuckLake commits one of them, and for the others the lake is then as they wanted it.
        if _applied_mark(con) == mark:
            return
        raise LakeError(f"the lake schema (rows.py and lake.sql) could not be applied: {_first_line(exc)}") from None
    except LakeError:
        rollback(con)
        raise


def _apply_table_options(con: duckdb.DuckDBPyConnection) -> None:
    """Set the DuckLake table options schemas/rows.py asks for (TABLE_OPTIONS) that the lake lacks; that makes no
    snapshot. Writers of a shared catalog that set them at once conflict: the others then find them set."""
    wanted = {(table, name): str(value) for table, options in TABLE_OPTIONS.items() for name, value in options.items()}

    def lacking() -> list[tuple[str, str]]:
        found = {(entry.removeprefix("main."), name): value for name, _, value, scope, entry
                 in con.execute(f"FROM {LAKE}.options() WHERE scope = 'TABLE'").fetchall()}
        return [key for key, value in wanted.items() if found.get(key) != value]

    missing = lacking()
    if not missing:
        return
    con.execute("BEGIN")
    try:
        for table, name in missing:
            con.execute(f"CALL {LAKE}.set_option({quote(name)}, {wanted[table, name]}, table_name => {quote(table)})")
        con.execute("COMMIT")
    except duckdb.Error as exc:
        rollback(con)
        if lacking():
            raise LakeError(f"lake table options {sorted(missing)} could not be set: {_first_line(exc)}") from None


def _applied_mark(con: duckdb.DuckDBPyConnection) -> str | None:
    """The schema mark on the lake's `runs` table as of the latest snapshot (None before the first schema)."""
    applied = con.execute(
        "SELECT comment FROM duckdb_tables() WHERE database_name = ? AND table_name = 'runs'", [LAKE]
    ).fetchone()
    return applied[0] if applied is not None else None


def _check_types(con: duckdb.DuckDBPyConnection) -> None:
    """Fail if a lake table has a column of another type than schemas/rows.py gives it (ADD COLUMN leaves it so)."""
    found = con.execute(
        "SELECT table_name, column_name, data_type FROM duckdb_columns() "
        "WHERE database_name = ? AND schema_name = 'main'",
        [LAKE],
    ).fetchall()
    expected = {(name, field.name): duckdb_type(field.type) for name, schema in LAKE_TABLES.items() for field in schema}
    retyped = [f"{table}.{column} is {kind}, not {expected[table, column]}"
               for table, column, kind in found if expected.get((table, column), kind) != kind]  # fmt: skip
    if retyped:
        raise LakeError(f"lake columns differ from schemas/rows.py, and a type is not migrated: {'; '.join(retyped)}")


def _column_type(table: str, field: pa.Field) -> str:
    """The DuckDB type of column `field` of `table`; an error names them."""
    try:
        return duckdb_type(field.type)
    except LakeError as exc:
        raise LakeError(f"schemas/rows.py {table}.{field.name}: {exc}") from None


def _attach_error(catalog: str, version: int | None, exc: duckdb.Error) -> LakeError:
    """A LakeError that says what went wrong attaching `catalog` in words a user can act on."""
    text = str(exc)
    if version is not None and "No snapshot found" in text:
        return LakeError(f"lake {catalog}: there is no snapshot {version} (see `snapshots`)")
    # Not Postgres' `database "x" does not exist`: a catalog database is made by its admin, never by a run.
    if "does not exist" in text and not re.search(r'database "[^"]*" does not exist', text):
        return LakeNotFound(f"lake {catalog}: no lake there yet (a run creates it when it materialises)")
    if "already attached" in text or "lock" in text.lower():
        return LakeError(
            f"lake {catalog}: the catalog is open elsewhere (a DuckDB-file catalog admits one process, "
            f"and one open connection per process; close the other or use a Postgres catalog): {_first_line(exc)}"
        )
    if isinstance(exc, duckdb.IOException | duckdb.ConnectionException | duckdb.HTTPException):
        return LakeUnavailable(f"lake {catalog}: cannot attach: {_first_line(exc)}")
    return LakeError(f"lake {catalog}: cannot attach: {_first_line(exc)}")


def quote(text: str) -> str:
    """`text` as a SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def identifier(name: str) -> str:
    """`name` as a quoted SQL identifier (a column may be named `count` or `column`)."""
    return '"' + name.replace('"', '""') + '"'


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
