"""The DuckLake lake on a Postgres catalog: runs publish and read back as with the file catalog, and several
writer processes publish into one catalog at once, each run once and as its own snapshot.

Each test gets a fresh database on a throwaway PostgreSQL cluster that this module starts (initdb in a
temporary directory, listening on 127.0.0.1 only) and stops; the lake's data files go to the real SeaweedFS.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest

from orchard import lake
from orchard.config import Config, LakeConfig, SeedSource
from orchard.lake import LakeError
from orchard.store import ObjectStore
from tasks.hygiene import Signing
from tasks.materialise import materialise_run, published_config_hash
from test_lake import NODES_PER_TREE, PAIRS_PER_TREE, count, land_shard, run_row, validation_rows

pytestmark = pytest.mark.integration

WRITERS = 3  # concurrent publishing processes in the several-writers test


# --- a throwaway PostgreSQL cluster -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Postgres:
    """A running cluster: where it listens, and the superuser that owns it (trust auth on 127.0.0.1)."""

    bin_dir: Path
    port: int
    user: str = "orchard"

    def as_owner(self) -> list[str]:
        """The prefix that runs a server binary as a user PostgreSQL accepts (it refuses to run as root)."""
        return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def create_database(self) -> str:
        """Create a new empty database and return the DuckLake catalog string that reaches it."""
        name = f"lake_{uuid.uuid4().hex[:12]}"
        subprocess.run([*self.as_owner(), str(self.bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                        "-U", self.user, name], check=True, capture_output=True)  # fmt: skip
        return f"postgres:dbname={name} host=127.0.0.1 port={self.port} user={self.user}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL cluster of its own for this module, on a free port of 127.0.0.1; removed afterwards."""
    initdb = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not initdb:
        pytest.skip("PostgreSQL server binaries are not installed (`make postgres` installs them)")
    bin_dir = Path(initdb[-1]).parent
    # Not under pytest's tmp_path: that is private to root, and the server runs as the `postgres` user.
    root = Path(tempfile.mkdtemp(prefix="orchard-pg-"))
    server = Postgres(bin_dir, _free_port())
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data, log = root / "data", root / "server.log"
    subprocess.run([*server.as_owner(), str(bin_dir / "initdb"), "-D", str(data), "-U", server.user, "--auth=trust",
                    "-E", "UTF8", "--no-sync"], check=True, capture_output=True)  # fmt: skip
    options = f"-h 127.0.0.1 -p {server.port} -k {root} -c fsync=off -c max_connections=50"
    subprocess.run([*server.as_owner(), str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options,
                    "-w", "start"], check=True, capture_output=True)  # fmt: skip
    try:
        yield server
    finally:
        subprocess.run([*server.as_owner(), str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w",
                        "stop"], capture_output=True)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def config(store: ObjectStore, postgres: Postgres, tmp_path: Path) -> Config:
    """A Config whose lake has a fresh Postgres database as catalog and the test's own bucket for data."""
    return Config(state_dir=str(tmp_path / "state"), object_store=store.cfg,
                  lake=LakeConfig(catalog=postgres.create_database()))  # fmt: skip


# --- writers in processes of their own ----------------------------------------------------------


def _publish_in_process(config: dict, run_id: str, shards: list[dict], start: Any, inside: Any, results: Any) -> None:
    """A writer process: publish `run_id` once all writers are ready, holding its first transaction open until
    every writer is inside one (so they all start from the same snapshot); report snapshot id and attempts."""
    import tasks.materialise as materialise

    attempts = 0
    publish, insert_validations = materialise._publish, materialise._insert_validations

    def counted_publish(*args: Any, **kwargs: Any) -> int:
        nonlocal attempts
        attempts += 1
        return publish(*args, **kwargs)

    def meet_inside(*args: Any, **kwargs: Any) -> None:
        insert_validations(*args, **kwargs)
        if attempts == 1:
            inside.wait(timeout=60)

    materialise._publish, materialise._insert_validations = counted_publish, meet_inside
    try:
        start.wait(timeout=60)
        snapshot = materialise.materialise_run(Config.from_dict(config), run_row(run_id, shards), shards,
                                               validation_rows(shards))  # fmt: skip
        results.put((run_id, snapshot, attempts, None))
    except Exception as exc:  # reported to the test, which fails with it; the other writers stop waiting
        start.abort()
        inside.abort()
        results.put((run_id, None, attempts, f"{type(exc).__name__}: {exc}"))


def publish_concurrently(config: Config, runs: list[tuple[str, list[dict]]]) -> list[tuple[str, int, int]]:
    """Publish each (run id, shards) from a process of its own, all at once; return (run id, snapshot, attempts)."""
    spawn = multiprocessing.get_context("spawn")
    start, inside, results = spawn.Barrier(len(runs)), spawn.Barrier(len(runs)), spawn.Queue()
    writers = [spawn.Process(target=_publish_in_process, args=(config.to_dict(), run_id, shards, start, inside, results))
               for run_id, shards in runs]  # fmt: skip
    for writer in writers:
        writer.start()
    outcomes = [results.get(timeout=120) for _ in writers]
    for writer in writers:
        writer.join(timeout=30)
    failures = [f"{run_id}: {error}" for run_id, _, _, error in outcomes if error]
    if failures:
        pytest.fail("writers failed:\n" + "\n".join(failures), pytrace=False)
    return sorted((run_id, snapshot, attempts) for run_id, snapshot, attempts, _ in outcomes)


def snapshots_by_run(config: Config) -> dict[int, dict]:
    """The commit extra info of every snapshot that published a run, by snapshot id."""
    return {s["snapshot_id"]: json.loads(s["commit_extra_info"]) for s in lake.snapshots(config)
            if s["commit_extra_info"] and "run_id" in json.loads(s["commit_extra_info"])}  # fmt: skip


# --- specifications ---------------------------------------------------------------------------


def test_postgres_extension_is_loaded_only_for_a_postgres_catalog():
    assert lake.extensions("postgres:dbname=orchard host=db") == ("httpfs", "ducklake", "postgres_scanner")
    assert lake.extensions("/state/lake.ducklake") == ("httpfs", "ducklake")
    path = lake.extension_path("postgres_scanner")
    assert path.is_file() and f"v{duckdb.__version__}" in str(path)


def test_run_published_into_a_postgres_catalog_reads_back_and_travels_in_time(config):
    shards = [land_shard(config, "r1", "s1"), land_shard(config, "r1", "s2")]

    first = materialise_run(config, run_row("r1", shards), shards, validation_rows(shards))

    assert count(config, "SELECT count(*) FROM nodes WHERE run_id = 'r1'") == 2 * 12 * NODES_PER_TREE
    assert count(config, "SELECT count(*) FROM pairs") == 2 * 12 * PAIRS_PER_TREE
    assert count(config, "SELECT count(*) FROM validations WHERE success") == 2
    _, runs = lake.query(config, "SELECT run_id, snapshot_id, status FROM runs")
    assert runs == [("r1", first, "complete")]
    assert lake.snapshots(config)[-1]["snapshot_id"] == first
    assert snapshots_by_run(config)[first] == {"run_id": "r1", "shards_added": ["s1", "s2"],
                                               "minhash": Signing.of(config.hygiene).label}

    later = [land_shard(config, "r2", "s1", trees=5)]
    second = materialise_run(config, run_row("r2", later), later, validation_rows(later))

    assert second == first + 1
    assert count(config, "SELECT count(*) FROM pairs", version=first) == 2 * 12 * PAIRS_PER_TREE
    assert count(config, "SELECT count(*) FROM pairs") == (2 * 12 + 5) * PAIRS_PER_TREE
    with lake.connect(config, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 2
        with pytest.raises(duckdb.Error, match="read-only"):
            con.execute("DELETE FROM runs")
    with lake.connect(config, version=first) as con:
        assert con.execute("SELECT run_id FROM runs").fetchall() == [("r1",)]


def test_a_new_postgres_catalog_has_no_published_run_until_one_is_materialised(config):
    # The nightly flow asks this before growing anything: a new, empty catalog database means "no run yet".
    assert not lake.exists(config) and published_config_hash(config, "r1") is None
    shards = [land_shard(config, "r1", "s1", trees=1)]
    materialise_run(config, run_row("r1", shards), shards)
    assert lake.exists(config) and published_config_hash(config, "r1") == "cfg123"


def test_a_catalog_database_that_does_not_exist_is_not_taken_for_an_empty_lake(config, postgres):
    missing = config.replace(lake=LakeConfig(catalog=f"postgres:dbname=no_such_db host=127.0.0.1 "
                                                     f"port={postgres.port} user={postgres.user}"))  # fmt: skip
    with pytest.raises(LakeError, match='cannot attach.*database "no_such_db" does not exist'):
        lake.exists(missing)


def test_several_writer_processes_publish_each_run_once_as_its_own_snapshot(config):
    # Into a new, empty catalog: the writers also race to create DuckLake's tables and the lake's schema.
    runs = [(f"r{w}", [land_shard(config, f"r{w}", "s1", trees=3 + w)]) for w in range(WRITERS)]

    outcomes = publish_concurrently(config, runs)

    snapshots = {snapshot for _, snapshot, _ in outcomes}
    assert len(snapshots) == WRITERS
    # All writers held their first transaction open together: one committed, every other lost and ran again.
    assert sum(attempts for _, _, attempts in outcomes) >= WRITERS + (WRITERS - 1)
    published = snapshots_by_run(config)
    assert {published[snapshot]["run_id"] for snapshot in snapshots} == {run_id for run_id, _ in runs}
    _, rows = lake.query(config, "SELECT run_id, snapshot_id FROM runs ORDER BY run_id")
    assert rows == [(run_id, snapshot) for run_id, snapshot, _ in outcomes]
    for w in range(WRITERS):
        trees = 3 + w
        assert count(config, f"SELECT count(*) FROM pairs WHERE run_id = 'r{w}'") == trees * PAIRS_PER_TREE
        assert count(config, f"SELECT count(DISTINCT node_id) FROM nodes WHERE run_id = 'r{w}'") == trees * NODES_PER_TREE
        assert count(config, f"SELECT count(*) FROM nodes WHERE run_id = 'r{w}'") == trees * NODES_PER_TREE
        assert count(config, f"SELECT count(*) FROM validations WHERE run_id = 'r{w}'") == 1


def test_the_same_run_published_twice_at_once_adds_its_rows_once(config):
    lake.connect(config).close()
    shards = [land_shard(config, "r1", "s1"), land_shard(config, "r1", "s2")]

    outcomes = publish_concurrently(config, [("r1", shards), ("r1", shards)])

    (_, winner, first_attempts), (_, loser, second_attempts) = sorted(outcomes, key=lambda o: o[1])
    assert (first_attempts, second_attempts) == (1, 2) and loser > winner
    published = snapshots_by_run(config)
    assert published[winner]["shards_added"] == ["s1", "s2"]
    assert published[loser]["shards_added"] == []  # the second found the shards published and replaced the runs row
    assert count(config, "SELECT count(*) FROM nodes") == 2 * 12 * NODES_PER_TREE
    assert count(config, "SELECT count(DISTINCT node_id) FROM nodes") == 2 * 12 * NODES_PER_TREE
    assert count(config, "SELECT count(*) FROM validations") == 2
    _, rows = lake.query(config, "SELECT run_id, snapshot_id FROM runs")
    assert rows == [("r1", loser)]



# --- the whole nightly flow, from two hosts at once ---------------------------------------------

FLOW_RUN_TOML = """state_dir = "{state}"
[run]
instructions_per_shard = 1
samples_per_strategy = 2
turns = 1
mcts_iterations = 0
jury_pairs = 0
jury_canaries = 0
hard_negatives_per_tree = 0

[orchestration]
verify_workers = 1
[[seeds]]
kind = "arithmetic"
count = 3
difficulty = 1
seed = {seed}
[engines.embedded]
kind = "openai"
model = "scripted"
base_urls = ["{engine_url}"]
structured_output = "none"
[lake]
catalog = "{catalog}"
"""


def test_two_nightly_runs_from_two_hosts_publish_into_one_postgres_catalog(store, postgres, tmp_path):
    """Two `orchard run` processes (own state directories, own Prefect) publish at once; a re-run adds nothing."""
    from builders import ArithmeticScript, ScriptedEngine, ScriptedServer, store_toml

    catalog = postgres.create_database()
    orchard = Path(sys.executable).with_name("orchard")

    def host(name: str, seed: int, engine_url: str) -> Path:
        state = tmp_path / name
        path = tmp_path / f"{name}.toml"
        store_table = store_toml(Config(object_store=store.cfg)).split("\n", 1)[1]  # from [object_store] on
        path.write_text(FLOW_RUN_TOML.format(state=state, seed=seed, engine_url=engine_url, catalog=catalog) + store_table)
        return path

    def start(path: Path, run_id: str) -> subprocess.Popen:
        return subprocess.Popen([str(orchard), "--config", str(path), "run", "--run-id", run_id],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # Right on even sample seeds: siblings that pair.
    script = ArithmeticScript().learn([SeedSource(kind="arithmetic", count=3, difficulty=1, seed=seed)
                                       for seed in (1, 2)])
    with ScriptedServer(ScriptedEngine(script.answer)) as engine:
        hosts = {"a": host("host-a", 1, engine.url), "b": host("host-b", 2, engine.url)}
        running = {run_id: start(path, run_id) for run_id, path in (("pg-a", hosts["a"]), ("pg-b", hosts["b"]))}
        outputs = {run_id: process.communicate(timeout=600)[0] for run_id, process in running.items()}
        for run_id, process in running.items():
            assert process.returncode == 0, outputs[run_id][-3000:]
        again = start(hosts["a"], "pg-a")
        output = again.communicate(timeout=600)[0]
        assert again.returncode == 0, output[-3000:]
        assert "3 already in the lake" in output

    config = Config(object_store=store.cfg, lake=LakeConfig(catalog=catalog))
    _, runs = lake.query(config, "SELECT run_id, status, shards_published, shards_reused, trees FROM runs ORDER BY run_id")
    assert runs == [("pg-a", "complete", 0, 3, 3), ("pg-b", "complete", 3, 0, 3)]  # pg-a's re-run reused all 3
    for table, key in (("nodes", "node_id"), ("pairs", "pair_id"), ("trees", "tree_id")):
        total = count(config, f"SELECT count(*) FROM {table}")
        assert total > 0 and total == count(config, f"SELECT count(DISTINCT {key}) FROM {table}")
    assert count(config, "SELECT count(*) FROM trees WHERE run_id = 'pg-a'") == 3
    snapshots = snapshots_by_run(config)
    assert sorted(s["run_id"] for s in snapshots.values() if s.get("run_id")) == ["pg-a", "pg-a", "pg-b"]
