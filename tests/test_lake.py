"""The DuckLake lake against a real SeaweedFS: one snapshot per run, re-runs without duplicates, time travel."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchard import lake
from orchard.config import Config, ObjectStoreConfig
from orchard.lake import LakeError
from orchard.store import ObjectStore, s3_client
from schemas.rows import SHARD_TABLES, table
from tasks.materialise import materialise_run

# --- builders ---------------------------------------------------------------------------------


def _s3(store: ObjectStoreConfig) -> Any:
    return s3_client(store)


@pytest.fixture
def config(store: ObjectStore, tmp_path: Path) -> Config:
    """A Config whose lake lives in the test's own bucket and a fresh state directory."""
    return Config(state_dir=str(tmp_path / "state"), object_store=store.cfg)


def _shard_tables(run_id: str, shard_id: str, trees: int) -> dict[str, pa.Table]:
    """Rows of a small shard: per tree one instruction, a root, three actions (2 correct), two pairs."""
    instructions, nodes, pairs = [], [], []
    for t in range(trees):
        iid, tree = f"{shard_id}-i{t}", f"{shard_id}-t{t}"
        instructions.append(dict(run_id=run_id, shard_id=shard_id, instruction_id=iid, domain="math",
                                 source="arithmetic", source_row=t + 1, text=f"What is {t} + 2?",
                                 reference=str(t + 2), difficulty=2))  # fmt: skip
        prompt = [{"role": "user", "content": f"What is {t} + 2?"}]
        nodes.append(dict(run_id=run_id, shard_id=shard_id, tree_id=tree, node_id=f"{tree}-n0", parent_id=None,
                          instruction_id=iid, depth=0, role="instruction", strategy=None, prompt=[],
                          text=f"What is {t} + 2?", verdict=None, score=None, verifier=None, verifier_detail=None,
                          model=None, temperature=None, top_p=None, max_tokens=None, sample_seed=None,
                          prompt_template_version=None, prompt_tokens=None, completion_tokens=None,
                          finish_reason=None))  # fmt: skip
        for k, answer in enumerate([t + 2, t + 2, t + 3]):
            correct = answer == t + 2
            nodes.append(dict(run_id=run_id, shard_id=shard_id, tree_id=tree, node_id=f"{tree}-n{k + 1}",
                              parent_id=f"{tree}-n0", instruction_id=iid, depth=1, role="action",
                              strategy="step_by_step", prompt=prompt, text=f"The answer is {answer}.",
                              verdict="correct" if correct else "incorrect", score=1.0 if correct else 0.0,
                              verifier="math", verifier_detail=f"expected {t + 2}, got {answer}", model="smol",
                              temperature=0.9, top_p=0.95, max_tokens=64, sample_seed=k,
                              prompt_template_version="v1", prompt_tokens=12, completion_tokens=6,
                              finish_reason="stop"))  # fmt: skip
        for k in (1, 2):
            pairs.append(dict(run_id=run_id, shard_id=shard_id, tree_id=tree, pair_id=f"{tree}-p{k}",
                              instruction_id=iid, domain="math", method="same_prompt", prompt=prompt,
                              chosen_node_id=f"{tree}-n{k}", rejected_node_id=f"{tree}-n3",
                              chosen_text=f"The answer is {t + 2}.", rejected_text=f"The answer is {t + 3}.",
                              chosen_score=1.0, rejected_score=0.0, margin=1.0, shared_prefix_tokens=12,
                              difficulty=2, pass_rate=2 / 3, strategy="step_by_step", model="smol"))  # fmt: skip
    return {"instructions": table("instructions", instructions), "nodes": table("nodes", nodes),
            "pairs": table("pairs", pairs)}  # fmt: skip


def land_shard(config: Config, run_id: str, shard_id: str, trees: int = 12) -> dict:
    """Write a shard's Parquet files and manifest to the bucket; return the manifest (tasks/land.py's shape)."""
    client = _s3(config.object_store)
    files = {}
    for name, rows in _shard_tables(run_id, shard_id, trees).items():
        buffer = io.BytesIO()
        pq.write_table(rows, buffer)
        body = buffer.getvalue()
        key = f"runs/{run_id}/shards/{shard_id}/{name}.parquet"
        client.put_object(Bucket=config.object_store.bucket, Key=key, Body=body)
        files[name] = {"key": key, "rows": rows.num_rows, "bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    manifest = {"run_id": run_id, "shard_id": shard_id, "config_hash": "cfg123", "files": files,
                "stats": {"trees": trees}, "landed_at": "2026-01-01T00:00:00+00:00"}  # fmt: skip
    client.put_object(Bucket=config.object_store.bucket, Key=f"runs/{run_id}/shards/{shard_id}/manifest.json",
                      Body=json.dumps(manifest).encode())  # fmt: skip
    return manifest


def run_row(run_id: str, shards: list[dict], status: str = "complete") -> dict:
    """The runs-table values of a run that published `shards`."""
    trees = sum(m["stats"]["trees"] for m in shards)
    return dict(run_id=run_id, flow_run_id=f"flow-{run_id}", config_hash="cfg123",
                started_at="2026-01-01T00:00:00+00:00", finished_at="2026-01-01T00:05:00+00:00", status=status,
                shards_planned=len(shards), shards_published=len(shards), shards_quarantined=0, shards_failed=0,
                trees=trees, nodes=sum(m["files"]["nodes"]["rows"] for m in shards),
                pairs=sum(m["files"]["pairs"]["rows"] for m in shards), pass_rate=2 / 3, prompt_tokens=100,
                completion_tokens=50, wall_s=300.0, tokens_per_s=0.5, summary={"failures": []})  # fmt: skip


def validation_rows(shards: list[dict]) -> list[dict]:
    return [
        dict(shard_id=m["shard_id"], suite="pairs", expectation="expect_column_values_to_not_be_null",
             column="chosen_text", success=True, observed={"unexpected_count": 0})
        for m in shards
    ]  # fmt: skip


def count(config: Config, sql: str, version: int | None = None) -> int:
    return lake.query(config, sql, version=version)[1][0][0]


def latest_snapshot(config: Config) -> int:
    return lake.snapshots(config)[-1]["snapshot_id"]


def new_lake(config: Config) -> int:
    """Create the lake (schema applied) and return its latest snapshot id."""
    lake.connect(config).close()
    return latest_snapshot(config)


# --- specifications ---------------------------------------------------------------------------


def test_extension_files_ship_for_the_installed_duckdb():
    for name in ("httpfs", "ducklake"):
        path = lake.extension_path(name)
        assert path.is_file() and f"v{duckdb.__version__}" in str(path)


def test_lake_tables_mirror_the_shard_schemas_column_for_column(config):
    duck_type = {pa.string(): "VARCHAR", pa.int64(): "BIGINT", pa.float64(): "DOUBLE",
                 pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])):
                     'STRUCT("role" VARCHAR, "content" VARCHAR)[]'}  # fmt: skip
    new_lake(config)
    for name, schema in SHARD_TABLES.items():
        _, rows = lake.query(config, f"DESCRIBE {name}")
        assert [(r[0], r[1]) for r in rows] == [(f.name, duck_type[f.type]) for f in schema], name


def test_reconnecting_applies_no_schema_change(config):
    first = new_lake(config)
    lake.connect(config).close()
    assert latest_snapshot(config) == first


def test_materialised_run_is_one_snapshot_with_its_rows_on_s3(config):
    before = new_lake(config)
    shards = [land_shard(config, "r1", "s1"), land_shard(config, "r1", "s2")]

    snapshot = materialise_run(config, run_row("r1", shards), shards, validation_rows(shards))

    assert snapshot == before + 1 == latest_snapshot(config)
    assert count(config, "SELECT count(*) FROM nodes WHERE run_id = 'r1'") == 2 * 12 * 4
    assert count(config, "SELECT count(*) FROM pairs") == 2 * 12 * 2
    assert count(config, "SELECT count(*) FROM instructions") == 2 * 12
    assert count(config, "SELECT count(*) FROM validations WHERE success") == 2
    _, runs = lake.query(config, "SELECT run_id, snapshot_id, status, nodes, summary FROM runs")
    assert runs == [("r1", snapshot, "complete", 96, '{"failures": []}')]
    published = lake.snapshots(config)[-1]
    assert json.loads(published["commit_extra_info"])["run_id"] == "r1"
    keys = [o["Key"] for o in _s3(config.object_store).list_objects_v2(Bucket=config.object_store.bucket,
                                                                      Prefix="lake/")["Contents"]]  # fmt: skip
    assert any(k.startswith("lake/main/nodes/") and k.endswith(".parquet") for k in keys)


def test_rematerialising_a_run_adds_no_duplicate_rows_and_updates_its_row(config):
    new_lake(config)
    shards = [land_shard(config, "r1", "s1")]
    first = materialise_run(config, run_row("r1", shards, status="partial"), shards, validation_rows(shards))
    later_shard = [land_shard(config, "r1", "s2")]

    second = materialise_run(config, run_row("r1", shards + later_shard), shards + later_shard,
                             validation_rows(shards + later_shard))  # fmt: skip

    assert second == first + 1
    assert count(config, "SELECT count(*) FROM nodes") == 2 * 12 * 4
    assert count(config, "SELECT count(*) FROM (SELECT DISTINCT node_id FROM nodes)") == 2 * 12 * 4
    assert count(config, "SELECT count(*) FROM validations") == 2
    _, runs = lake.query(config, "SELECT status, snapshot_id, shards_published FROM runs")
    assert runs == [("complete", second, 2)]


def test_second_run_is_a_new_snapshot_and_the_first_stays_queryable(config):
    new_lake(config)
    first_shards = [land_shard(config, "r1", "s1")]
    first = materialise_run(config, run_row("r1", first_shards), first_shards)
    second_shards = [land_shard(config, "r2", "s1", trees=11)]
    second = materialise_run(config, run_row("r2", second_shards), second_shards)

    assert second == first + 1
    assert count(config, "SELECT count(DISTINCT run_id) FROM pairs") == 2
    _, then = lake.query(config, "SELECT DISTINCT run_id FROM pairs", version=first)
    assert then == [("r1",)]
    assert count(config, "SELECT count(*) FROM runs", version=first) == 1
    assert count(config, "SELECT count(*) FROM dpo_pairs", version=first) == 12 * 2


def test_missing_shard_file_publishes_nothing(config):
    before = new_lake(config)
    good = land_shard(config, "r1", "s1")
    broken = land_shard(config, "r1", "s2")
    broken["files"]["pairs"]["key"] = "runs/r1/shards/s2/gone.parquet"

    with pytest.raises(LakeError, match="nothing published.*gone.parquet"):
        materialise_run(config, run_row("r1", [good, broken]), [good, broken], validation_rows([good, broken]))

    assert latest_snapshot(config) == before
    for name in ("runs", "instructions", "nodes", "pairs", "validations"):
        assert count(config, f"SELECT count(*) FROM {name}") == 0, name


def test_manifest_row_count_that_disagrees_with_the_file_publishes_nothing(config):
    before = new_lake(config)
    shard = land_shard(config, "r1", "s1")
    shard["files"]["nodes"]["rows"] += 1

    with pytest.raises(LakeError, match="runs/r1/shards/s1/nodes.parquet has 48 rows, manifest says 49"):
        materialise_run(config, run_row("r1", [shard]), [shard])

    assert latest_snapshot(config) == before
    assert count(config, "SELECT count(*) FROM nodes") == 0


def test_dpo_pairs_has_trl_conversational_columns(config):
    new_lake(config)
    shards = [land_shard(config, "r1", "s1", trees=1)]
    materialise_run(config, run_row("r1", shards), shards)

    columns, rows = lake.query(config, "SELECT * FROM dpo_pairs ORDER BY pair_id")

    assert columns[:3] == ["prompt", "chosen", "rejected"]
    assert {"pair_id", "run_id", "domain", "margin", "shared_prefix_tokens", "method", "difficulty"} <= set(columns)
    row = dict(zip(columns, rows[0]))
    assert row["prompt"] == [{"role": "user", "content": "What is 0 + 2?"}]
    assert row["chosen"] == [{"role": "assistant", "content": "The answer is 2."}]
    assert row["rejected"] == [{"role": "assistant", "content": "The answer is 3."}]


def test_run_row_with_unknown_status_is_refused_before_touching_the_lake(config):
    before = new_lake(config)
    shards = [land_shard(config, "r1", "s1", trees=1)]

    with pytest.raises(LakeError, match="status must be one of"):
        materialise_run(config, run_row("r1", shards, status="done"), shards)

    assert latest_snapshot(config) == before


def test_unknown_snapshot_version_is_a_clear_error(config):
    new_lake(config)
    with pytest.raises(LakeError, match="there is no snapshot 999"):
        lake.query(config, "SELECT 1", version=999)


def test_bad_query_names_the_query(config):
    new_lake(config)
    with pytest.raises(LakeError, match="no_such_table"):
        lake.query(config, "SELECT * FROM no_such_table")


def test_queries_cannot_write_to_the_lake(config):
    new_lake(config)
    with pytest.raises(LakeError, match="read-only"):
        lake.query(config, "DELETE FROM pairs")


def test_reading_a_lake_that_does_not_exist_says_so(config):
    with pytest.raises(LakeError, match="no lake there yet"):
        lake.snapshots(config)


def test_first_run_creates_the_lake_and_publishes_into_it(config):
    shards = [land_shard(config, "r1", "s1", trees=2)]

    snapshot = materialise_run(config, run_row("r1", shards), shards)

    assert snapshot == latest_snapshot(config)
    assert count(config, "SELECT count(*) FROM pairs") == 4
