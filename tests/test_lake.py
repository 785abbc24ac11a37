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
from schemas.rows import LAKE_TABLES, SHARD_TABLES, TABLE_OPTIONS, table
from tasks.materialise import materialise_run

# --- builders ---------------------------------------------------------------------------------


def _s3(store: ObjectStoreConfig) -> Any:
    return s3_client(store)


@pytest.fixture
def config(store: ObjectStore, tmp_path: Path) -> Config:
    """A Config whose lake lives in the test's own bucket and a fresh state directory."""
    return Config(state_dir=str(tmp_path / "state"), object_store=store.cfg)


NODES_PER_TREE = 7  # root, three actions, a critique of the wrong one, two refinements
PAIRS_PER_TREE = 3  # two at turn 1, one at turn 2


def _node(**values: Any) -> dict:
    """A nodes row: `values` over all-null columns."""
    return {**dict.fromkeys(SHARD_TABLES["nodes"].names), **values}


def _tree_rows(run_id: str, shard_id: str, t: int) -> dict[str, list[dict]]:
    """One multi-turn tree asking `t + 2`: actions a1, a2 (correct) and a3 (wrong, gets critique c1);
    under c1, refinement r1 (correct) and r2 (wrong). Pairs (a1, a3), (a2, a3) at turn 1 and (r1, r2) at turn 2."""
    iid, tree = f"{shard_id}-i{t}", f"{shard_id}-t{t}"
    question, right, wrong = f"What is {t} + 2?", f"The answer is {t + 2}.", f"The answer is {t + 3}."
    prompt = [{"role": "user", "content": question}]
    history = [*prompt, {"role": "assistant", "content": wrong},
               {"role": "user", "content": f"expected {t + 2}, got {t + 3}. Critique: add again."}]  # fmt: skip
    instruction = dict(run_id=run_id, shard_id=shard_id, instruction_id=iid)  # an instruction row has no tree id
    common = dict(instruction, tree_id=tree)
    attempt = dict(common, model="smol", temperature=0.9, top_p=0.95, max_tokens=64, prompt_template_version="v1",
                   prompt_tokens=12, completion_tokens=6, finish_reason="stop", verifier="math_verify",
                   strategy="step_by_step")  # fmt: skip

    def answer(node_id: str, parent: str, depth: int, role: str, turn: int, text: str, seed: int, p: list) -> dict:
        correct = text == right
        return _node(**attempt, node_id=f"{tree}-{node_id}", parent_id=f"{tree}-{parent}", depth=depth, role=role,
                     turn=turn, prompt=p, text=text, verdict="correct" if correct else "incorrect",
                     score=1.0 if correct else 0.0, sample_seed=seed,
                     failure_reason=None if correct else "wrong answer")  # fmt: skip

    nodes = [
        _node(**common, node_id=f"{tree}-n0", depth=0, role="instruction", prompt=[], text=question),
        answer("a1", "n0", 1, "action", 1, right, 1, prompt),
        answer("a2", "n0", 1, "action", 1, right, 2, prompt),
        answer("a3", "n0", 1, "action", 1, wrong, 3, prompt),
        _node(**common, node_id=f"{tree}-c1", parent_id=f"{tree}-a3", depth=2, role="critique", model="smol",
              prompt=[*prompt, {"role": "assistant", "content": wrong}], text="Critique: add again."),
        answer("r1", "c1", 3, "refinement", 2, right, 4, history),
        answer("r2", "c1", 3, "refinement", 2, wrong, 5, history),
    ]

    def pair(k: int, chosen: str, rejected: str, turn: int, p: list) -> dict:
        return dict(common, pair_id=f"{tree}-p{k}", domain="math", method="rs", prompt=p,
                    chosen_node_id=f"{tree}-{chosen}", rejected_node_id=f"{tree}-{rejected}", chosen_text=right,
                    rejected_text=wrong, chosen_score=1.0, rejected_score=0.0, margin=1.0, shared_prefix_tokens=12,
                    difficulty=2, pass_rate=3 / 5, strategy="step_by_step", model="smol", turn=turn, contrast="high",
                    k=None, edit_distance=None, jury_label=None, jury_winner=None)  # fmt: skip

    pairs = [pair(1, "a1", "a3", 1, prompt), pair(2, "a2", "a3", 1, prompt), pair(3, "r1", "r2", 2, history)]
    return {
        "instructions": [dict(instruction, domain="math", source="arithmetic", source_row=t + 1, text=question,
                              reference=str(t + 2), difficulty=2)],  # fmt: skip
        "nodes": nodes,
        "pairs": pairs,
        "trees": [dict(common, domain="math", strategies=["step_by_step"], turns=2, nodes=len(nodes), actions=5,
                       correct=3, pass_rate=3 / 5, pairs=len(pairs), prompt_tokens=60, completion_tokens=30, k=None)],
    }  # fmt: skip


def _open_ended_rows(run_id: str, shard_id: str, t: int) -> dict[str, list[dict]]:
    """An open-ended prompt with two principle examples: one the jury labels stable for the response, one not."""
    tree, iid = f"{shard_id}-o{t}", f"{shard_id}-oi{t}"
    instruction = dict(run_id=run_id, shard_id=shard_id, instruction_id=iid)  # an instruction row has no tree id
    common = dict(instruction, tree_id=tree)

    def example(k: int, label: str, winner: str | None) -> dict:
        return dict(common, example_id=f"{tree}-e{k}", prompt=f"Write a note {t}.", constitution="default@1",
                    principle_id=f"p{k}", principle=f"Be kind ({k}).", antithesis=f"Be curt ({k}).",
                    response_node_id=f"{tree}-r{k}", response="Kind note.", antithesis_node_id=f"{tree}-a{k}",
                    antithesis_response="Curt note.", unconditioned_node_id=f"{tree}-u", unconditioned_response="Note.",
                    model="smol", label=label, jury_winner=winner, votes_response=3 if winner else 1,
                    votes_antithesis=0, votes_tie=0, judges=3)  # fmt: skip

    return {
        "instructions": [dict(instruction, domain="open_ended", source="open_ended", source_row=t + 1,
                              text=f"Write a note {t}.", reference="", difficulty=1)],  # fmt: skip
        "principle_examples": [example(1, "stable", "response"), example(2, "non_attitude", None)],
    }


def _shard_tables(run_id: str, shard_id: str, trees: int) -> dict[str, pa.Table]:
    """The tables of a small shard of `trees` multi-turn trees (see _tree_rows)."""
    shard: dict[str, list[dict]] = {name: [] for name in SHARD_TABLES}
    for t in range(trees):
        for name, rows in _tree_rows(run_id, shard_id, t).items():
            shard[name].extend(rows)
    return {name: table(name, rows) for name, rows in shard.items()}


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
                shards_planned=len(shards), shards_published=len(shards), shards_reused=0, shards_quarantined=0,
                shards_failed=0,
                trees=trees, nodes=sum(m["files"]["nodes"]["rows"] for m in shards),
                pairs=sum(m["files"]["pairs"]["rows"] for m in shards), pass_rate=2 / 3, prompt_tokens=100,
                completion_tokens=50, wall_s=300.0, tokens_per_s=0.5, cached_share=None, summary={"failures": []})  # fmt: skip


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


def insert_rows(config: Config, shard: dict[str, list[dict]]) -> int:
    """Write a shard's rows straight into the lake's tables, in one snapshot (no object store, no runs row); return
    that snapshot's id."""
    with lake.connect(config) as con:
        con.execute("BEGIN")
        for name, rows in shard.items():
            lake.insert_arrow(con, name, table(name, rows))
        con.execute("COMMIT")
    return latest_snapshot(config)


# --- specifications ---------------------------------------------------------------------------


def test_extension_files_ship_for_the_installed_duckdb():
    for name in ("httpfs", "ducklake"):
        path = lake.extension_path(name)
        assert path.is_file() and f"v{duckdb.__version__}" in str(path)


# The tables of schemas/rows.py with the DuckDB types schemas/lake.sql gave them when it still spelled them out
# (c98be6d): the DDL generated from rows.py must give every column the same type, so existing lakes and queries are
# unchanged. A column added to rows.py is added here too, with the type it must have.
PINNED_TABLES_SQL = """
CREATE TABLE instructions (run_id VARCHAR, shard_id VARCHAR, instruction_id VARCHAR, domain VARCHAR, source VARCHAR,
    source_row BIGINT, text VARCHAR, reference VARCHAR, difficulty BIGINT);
CREATE TABLE nodes (run_id VARCHAR, shard_id VARCHAR, tree_id VARCHAR, node_id VARCHAR, parent_id VARCHAR,
    instruction_id VARCHAR, depth BIGINT, role VARCHAR, strategy VARCHAR,
    prompt STRUCT(role VARCHAR, content VARCHAR)[], text VARCHAR, verdict VARCHAR, score DOUBLE, verifier VARCHAR,
    verifier_detail VARCHAR, model VARCHAR, temperature DOUBLE, top_p DOUBLE, max_tokens BIGINT, sample_seed BIGINT,
    prompt_template_version VARCHAR, prompt_tokens BIGINT, completion_tokens BIGINT, finish_reason VARCHAR,
    turn BIGINT, feedback VARCHAR, failure_reason VARCHAR, sandbox_exit_code BIGINT, sandbox_stdout VARCHAR,
    sandbox_stderr VARCHAR, cached_tokens BIGINT, visits BIGINT, q_value DOUBLE, self_eval DOUBLE, value DOUBLE,
    edit VARCHAR);
CREATE TABLE pairs (run_id VARCHAR, shard_id VARCHAR, tree_id VARCHAR, pair_id VARCHAR, instruction_id VARCHAR,
    domain VARCHAR, method VARCHAR, prompt STRUCT(role VARCHAR, content VARCHAR)[], chosen_node_id VARCHAR,
    rejected_node_id VARCHAR, chosen_text VARCHAR, rejected_text VARCHAR, chosen_score DOUBLE,
    rejected_score DOUBLE, margin DOUBLE, shared_prefix_tokens BIGINT, difficulty BIGINT, pass_rate DOUBLE,
    strategy VARCHAR, model VARCHAR, turn BIGINT, contrast VARCHAR, k BIGINT, edit_distance BIGINT,
    jury_label VARCHAR, jury_winner VARCHAR);
CREATE TABLE trees (run_id VARCHAR, shard_id VARCHAR, tree_id VARCHAR, instruction_id VARCHAR, domain VARCHAR,
    strategies VARCHAR[], turns BIGINT, nodes BIGINT, actions BIGINT, correct BIGINT, pass_rate DOUBLE,
    pairs BIGINT, prompt_tokens BIGINT, completion_tokens BIGINT, k BIGINT);
CREATE TABLE principle_examples (run_id VARCHAR, shard_id VARCHAR, tree_id VARCHAR, example_id VARCHAR,
    instruction_id VARCHAR, prompt VARCHAR, constitution VARCHAR, principle_id VARCHAR, principle VARCHAR,
    antithesis VARCHAR, response_node_id VARCHAR, response VARCHAR, antithesis_node_id VARCHAR,
    antithesis_response VARCHAR, unconditioned_node_id VARCHAR, unconditioned_response VARCHAR, model VARCHAR,
    label VARCHAR, jury_winner VARCHAR, votes_response BIGINT, votes_antithesis BIGINT, votes_tie BIGINT,
    judges BIGINT);
CREATE TABLE judgements (run_id VARCHAR, shard_id VARCHAR, tree_id VARCHAR, judgement_id VARCHAR,
    comparison_id VARCHAR, kind VARCHAR, criterion VARCHAR, judge VARCHAR, rubric VARCHAR, model VARCHAR,
    presented VARCHAR, first_id VARCHAR, second_id VARCHAR, prompt STRUCT(role VARCHAR, content VARCHAR)[],
    raw VARCHAR, status VARCHAR, winner VARCHAR, preference VARCHAR, reason VARCHAR, expected VARCHAR,
    position_consistent BOOLEAN, label VARCHAR, structured BOOLEAN, prompt_tokens BIGINT, completion_tokens BIGINT,
    finish_reason VARCHAR);
CREATE TABLE drops (run_id VARCHAR, shard_id VARCHAR, stage VARCHAR, reason VARCHAR, "count" BIGINT,
    example_ids VARCHAR[]);
CREATE TABLE contamination (run_id VARCHAR, instruction_id VARCHAR, eval_set VARCHAR, eval_item_id VARCHAR,
    matched_ngrams BIGINT, eval_ngrams BIGINT, coverage DOUBLE);
CREATE TABLE validations (run_id VARCHAR, shard_id VARCHAR, suite VARCHAR, expectation VARCHAR, "column" VARCHAR,
    success BOOLEAN, observed VARCHAR);
CREATE TABLE instruction_fingerprints (run_id VARCHAR, instruction_id VARCHAR, minhash VARCHAR, text_sha1 VARCHAR,
    band_keys UBIGINT[]);
CREATE TABLE instruction_signatures (run_id VARCHAR, instruction_id VARCHAR, minhash VARCHAR,
    hashvalues UINTEGER[]);
"""


def table_columns(ddl: str) -> list[tuple[str, str, str]]:
    """(table, column, DuckDB type) of each column of the tables `ddl` creates in a scratch DuckDB, in column order."""
    with duckdb.connect() as scratch:
        scratch.execute(ddl)
        return scratch.execute(
            "SELECT table_name, column_name, data_type FROM duckdb_columns() WHERE NOT internal "
            "ORDER BY table_name, column_index"
        ).fetchall()


def assert_tables_follow_rows(config: Config) -> None:
    """Every table of schemas/rows.py is in the lake with its columns, in order, with their pinned types."""
    _, found = lake.query(config, "SELECT table_name, column_name, data_type FROM duckdb_columns() "
                                  "WHERE database_name = 'lake' ORDER BY table_name, column_index")  # fmt: skip
    assert [c for c in found if c[0] in LAKE_TABLES] == table_columns(PINNED_TABLES_SQL)


def test_generated_ddl_gives_every_rows_column_the_type_lake_sql_gave_it():
    pinned = table_columns(PINNED_TABLES_SQL)
    assert {name for name, _, _ in pinned} == set(LAKE_TABLES) >= set(SHARD_TABLES)

    assert table_columns(lake.tables_sql(LAKE_TABLES)) == pinned
    # As duckdb_columns() spells them: what the type check at connect compares a lake's columns with.
    spelled = [(name, f.name, lake.duckdb_type(f.type)) for name, schema in LAKE_TABLES.items() for f in schema]
    assert sorted(spelled) == sorted(pinned)


def test_an_arrow_type_without_a_duckdb_type_is_an_error_naming_the_column():
    with pytest.raises(LakeError, match=r"schemas/rows.py notes.when: Arrow type timestamp\[s\] has no DuckDB type"):
        lake.tables_sql({"notes": pa.schema([("text", pa.string()), ("when", pa.timestamp("s"))])})


def test_a_row_with_a_misspelt_or_missing_column_is_refused_naming_the_table_row_and_column():
    rows = _tree_rows("r1", "s1", 0)["pairs"]
    assert table("pairs", rows).num_rows == len(rows)
    misspelt = [*rows[:1], {**{k: v for k, v in rows[1].items() if k != "margin"}, "margn": rows[1]["margin"]}]
    with pytest.raises(ValueError, match=r"^pairs row 1: missing column\(s\) \['margin'\]; "
                                         r"unknown column\(s\) \['margn'\]$"):
        table("pairs", misspelt)


def test_lake_tables_mirror_the_row_schemas_column_for_column(local_config):
    new_lake(local_config)
    assert_tables_follow_rows(local_config)


def test_table_options_schemas_ask_for_are_set_without_a_snapshot(config):
    first = new_lake(config)
    _, options = lake.query(config, "SELECT scope_entry, option_name, value FROM lake.options() WHERE scope = 'TABLE'")
    assert options == [(f"main.{table}", name, str(value))
                       for table, named in TABLE_OPTIONS.items() for name, value in named.items()]
    assert first == 1  # the schema's snapshot after the catalog's own: the options made none


def test_reconnecting_applies_no_schema_change(config):
    first = new_lake(config)
    lake.connect(config).close()
    assert latest_snapshot(config) == first


def test_materialised_run_is_one_snapshot_with_its_rows_on_s3(config):
    before = new_lake(config)
    shards = [land_shard(config, "r1", "s1"), land_shard(config, "r1", "s2")]

    snapshot = materialise_run(config, run_row("r1", shards), shards, validation_rows(shards))

    assert snapshot == before + 1 == latest_snapshot(config)
    assert count(config, "SELECT count(*) FROM nodes WHERE run_id = 'r1'") == 2 * 12 * NODES_PER_TREE
    assert count(config, "SELECT count(*) FROM pairs") == 2 * 12 * PAIRS_PER_TREE
    assert count(config, "SELECT count(*) FROM instructions") == 2 * 12
    assert count(config, "SELECT count(*) FROM trees") == 2 * 12
    assert count(config, "SELECT count(*) FROM validations WHERE success") == 2
    _, runs = lake.query(config, "SELECT run_id, snapshot_id, status, nodes, summary FROM runs")
    assert runs == [("r1", snapshot, "complete", 2 * 12 * NODES_PER_TREE, '{"failures": []}')]
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
    assert count(config, "SELECT count(*) FROM nodes") == 2 * 12 * NODES_PER_TREE
    assert count(config, "SELECT count(*) FROM (SELECT DISTINCT node_id FROM nodes)") == 2 * 12 * NODES_PER_TREE
    assert count(config, "SELECT count(*) FROM trees") == 2 * 12
    assert count(config, "SELECT count(*) FROM validations") == 2
    _, runs = lake.query(config, "SELECT status, snapshot_id, shards_published FROM runs")
    assert runs == [("complete", second, 2)]


def test_a_run_id_published_under_another_config_is_refused(config):
    from tasks.materialise import check_run_id_task, published_config_hash

    assert published_config_hash(config, "r1") is None  # no lake yet
    shards = [land_shard(config, "r1", "s1")]
    snapshot = materialise_run(config, run_row("r1", shards), shards, validation_rows(shards))
    assert published_config_hash(config, "r1") == "cfg123" and published_config_hash(config, "r2") is None
    later = [land_shard(config, "r1", "s2")]

    with pytest.raises(LakeError, match="run r1 was published with config cfg123, and this config is cfg999"):
        materialise_run(config, {**run_row("r1", later), "config_hash": "cfg999"}, later, validation_rows(later))
    assert latest_snapshot(config) == snapshot and count(config, "SELECT count(DISTINCT shard_id) FROM nodes") == 1
    # The flow asks before growing anything: the same rule, with the config's own hash.
    with pytest.raises(LakeError, match=f"and this config is {config.content_hash()}"):
        check_run_id_task.fn(config.to_dict(), "r1")
    check_run_id_task.fn(config.to_dict(), "r2")  # a new run id is fine


def test_a_catalog_left_without_tables_by_a_killed_first_publish_has_no_published_run(config):
    from tasks.materialise import published_config_hash

    # What a SIGKILL between creating the catalog file and committing the schema leaves (bench/faults.py, sigkill-materialise).
    Path(config.lake_catalog).parent.mkdir(parents=True)
    con = duckdb.connect()
    for name in ("httpfs", "ducklake"):
        con.execute(f"LOAD '{lake.extension_path(name)}'")
    con.execute(f"ATTACH 'ducklake:{config.lake_catalog}' AS bare (DATA_PATH '{config.lake_data_path}')")
    con.close()
    assert published_config_hash(config, "r1") is None
    shards = [land_shard(config, "r1", "s1")]
    materialise_run(config, run_row("r1", shards), shards, validation_rows(shards))  # the re-run then publishes
    assert published_config_hash(config, "r1") == "cfg123"


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
    assert count(config, "SELECT count(*) FROM dpo_pairs", version=first) == 12 * PAIRS_PER_TREE


def test_missing_shard_file_publishes_nothing(config):
    before = new_lake(config)
    good = land_shard(config, "r1", "s1")
    broken = land_shard(config, "r1", "s2")
    broken["files"]["pairs"]["key"] = "runs/r1/shards/s2/gone.parquet"

    with pytest.raises(LakeError, match="nothing published.*gone.parquet"):
        materialise_run(config, run_row("r1", [good, broken]), [good, broken], validation_rows([good, broken]))

    assert latest_snapshot(config) == before
    for name in ("runs", "instructions", "nodes", "pairs", "trees", "validations"):
        assert count(config, f"SELECT count(*) FROM {name}") == 0, name


def test_manifest_row_count_that_disagrees_with_the_file_publishes_nothing(config):
    before = new_lake(config)
    shard = land_shard(config, "r1", "s1")
    shard["files"]["nodes"]["rows"] += 1

    with pytest.raises(LakeError, match="runs/r1/shards/s1/nodes.parquet has 84 rows, manifest says 85"):
        materialise_run(config, run_row("r1", [shard]), [shard])

    assert latest_snapshot(config) == before
    assert count(config, "SELECT count(*) FROM nodes") == 0


def test_dpo_pairs_has_trl_conversational_columns(config):
    new_lake(config)
    shards = [land_shard(config, "r1", "s1", trees=1)]
    materialise_run(config, run_row("r1", shards), shards)

    columns, rows = lake.query(config, "SELECT * FROM dpo_pairs ORDER BY pair_id")

    assert columns[:3] == ["prompt", "chosen", "rejected"]
    assert {"pair_id", "run_id", "domain", "margin", "shared_prefix_tokens", "method", "difficulty", "turn"} <= set(
        columns
    )
    row = dict(zip(columns, rows[0]))
    assert row["prompt"] == [{"role": "user", "content": "What is 0 + 2?"}]
    assert row["chosen"] == [{"role": "assistant", "content": "The answer is 2."}]
    assert row["rejected"] == [{"role": "assistant", "content": "The answer is 3."}]
    assert row["turn"] == 1
    refined = dict(zip(columns, rows[2]))
    assert refined["turn"] == 2
    assert [m["role"] for m in refined["prompt"]] == ["user", "assistant", "user"]  # the history of the refinement


def test_preference_views_carry_the_tree_and_model_of_each_row(local_config):
    shard = _tree_rows("r1", "s1", 0)
    shard["pairs"][1]["model"] = "other"
    open_ended = _open_ended_rows("r1", "s1", 0)
    insert_rows(local_config, {**shard, "instructions": shard["instructions"] + open_ended["instructions"],
                               "principle_examples": open_ended["principle_examples"]})  # fmt: skip

    _, pairs = lake.query(local_config, "SELECT pair_id, tree_id, model FROM dpo_pairs ORDER BY pair_id")
    _, principled = lake.query(local_config, "SELECT example_id, tree_id, model, domain, votes_response, "
                                             "votes_antithesis, judges FROM principle_pairs")  # fmt: skip

    assert pairs == [("s1-t0-p1", "s1-t0", "smol"), ("s1-t0-p2", "s1-t0", "other"), ("s1-t0-p3", "s1-t0", "smol")]
    # Only the stable example the response won; its domain is its instruction's.
    assert principled == [("s1-o0-e1", "s1-o0", "smol", "open_ended", 3, 0, 3)]


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
    assert count(config, "SELECT count(*) FROM pairs") == 2 * PAIRS_PER_TREE


def test_sft_examples_are_correct_trajectories_with_their_history(config):
    new_lake(config)
    shards = [land_shard(config, "r1", "s1", trees=1)]
    materialise_run(config, run_row("r1", shards), shards)

    columns, rows = lake.query(config, "SELECT * FROM sft_examples ORDER BY node_id")

    assert columns[0] == "messages"
    assert {"node_id", "tree_id", "run_id", "domain", "turn", "strategy", "model"} <= set(columns)
    examples = {row["node_id"]: row for row in (dict(zip(columns, r)) for r in rows)}
    assert sorted(examples) == ["s1-t0-a1", "s1-t0-a2", "s1-t0-r1"]  # wrong attempts and critiques stay out
    assert examples["s1-t0-a1"]["messages"] == [
        {"role": "user", "content": "What is 0 + 2?"},
        {"role": "assistant", "content": "The answer is 2."},
    ]
    refinement = examples["s1-t0-r1"]
    assert [m["role"] for m in refinement["messages"]] == ["user", "assistant", "user", "assistant"]
    assert "Critique: add again." in refinement["messages"][2]["content"]
    assert refinement["messages"][-1] == {"role": "assistant", "content": "The answer is 2."}
    assert (refinement["turn"], refinement["domain"], refinement["tree_id"]) == (2, "math", "s1-t0")


def test_ranked_lists_order_each_sibling_group_best_first(config):
    new_lake(config)
    shards = [land_shard(config, "r1", "s1", trees=1)]
    materialise_run(config, run_row("r1", shards), shards)

    columns, rows = lake.query(config, "SELECT * FROM ranked_lists ORDER BY turn")

    assert columns[:3] == ["prompt", "completions", "scores"]
    assert {"node_ids", "parent_id", "tree_id", "run_id", "domain", "turn"} <= set(columns)
    first, second = (dict(zip(columns, r)) for r in rows)
    assert (first["parent_id"], first["turn"], first["domain"]) == ("s1-t0-n0", 1, "math")
    assert first["node_ids"] == ["s1-t0-a1", "s1-t0-a2", "s1-t0-a3"]
    assert first["scores"] == [1.0, 1.0, 0.0]
    assert first["completions"][2] == [{"role": "assistant", "content": "The answer is 3."}]
    assert first["prompt"] == [{"role": "user", "content": "What is 0 + 2?"}]
    assert (second["parent_id"], second["turn"]) == ("s1-t0-c1", 2)
    assert second["node_ids"] == ["s1-t0-r1", "s1-t0-r2"] and second["scores"] == [1.0, 0.0]


def test_a_lone_scored_sibling_makes_no_ranked_list(config):
    new_lake(config)
    shards = [land_shard(config, "r1", "s1", trees=1)]
    materialise_run(config, run_row("r1", shards), shards)
    _, rows = lake.query(config, "SELECT * FROM ranked_lists")
    assert len(rows) == 2
    with lake.connect(config) as con:  # drop r2: the turn-2 group keeps one scored member
        con.execute("DELETE FROM nodes WHERE node_id = 's1-t0-r2'")

    _, rows = lake.query(config, "SELECT turn, node_ids FROM ranked_lists")

    assert rows == [(1, ["s1-t0-a1", "s1-t0-a2", "s1-t0-a3"])]


# The lake as Orchard made it before multi-turn trees: nodes and pairs without the appended columns, no trees.
LAKE_SQL_BEFORE_TREES = """
CREATE TABLE IF NOT EXISTS runs (run_id VARCHAR, flow_run_id VARCHAR, snapshot_id BIGINT, config_hash VARCHAR,
    started_at TIMESTAMPTZ, finished_at TIMESTAMPTZ, status VARCHAR, shards_planned BIGINT, shards_published BIGINT,
    shards_quarantined BIGINT, shards_failed BIGINT, trees BIGINT, nodes BIGINT, pairs BIGINT, pass_rate DOUBLE,
    prompt_tokens BIGINT, completion_tokens BIGINT, wall_s DOUBLE, tokens_per_s DOUBLE, summary VARCHAR);
CREATE TABLE IF NOT EXISTS instructions (run_id VARCHAR, shard_id VARCHAR, instruction_id VARCHAR, domain VARCHAR,
    source VARCHAR, source_row BIGINT, text VARCHAR, reference VARCHAR, difficulty BIGINT);
CREATE TABLE IF NOT EXISTS nodes (run_id VARCHAR, shard_id VARCHAR, tree_id VARCHAR, node_id VARCHAR,
    parent_id VARCHAR, instruction_id VARCHAR, depth BIGINT, role VARCHAR, strategy VARCHAR,
    prompt STRUCT(role VARCHAR, content VARCHAR)[], text VARCHAR, verdict VARCHAR, score DOUBLE, verifier VARCHAR,
    verifier_detail VARCHAR, model VARCHAR, temperature DOUBLE, top_p DOUBLE, max_tokens BIGINT, sample_seed BIGINT,
    prompt_template_version VARCHAR, prompt_tokens BIGINT, completion_tokens BIGINT, finish_reason VARCHAR);
CREATE TABLE IF NOT EXISTS pairs (run_id VARCHAR, shard_id VARCHAR, tree_id VARCHAR, pair_id VARCHAR,
    instruction_id VARCHAR, domain VARCHAR, method VARCHAR, prompt STRUCT(role VARCHAR, content VARCHAR)[],
    chosen_node_id VARCHAR, rejected_node_id VARCHAR, chosen_text VARCHAR, rejected_text VARCHAR, chosen_score DOUBLE,
    rejected_score DOUBLE, margin DOUBLE, shared_prefix_tokens BIGINT, difficulty BIGINT, pass_rate DOUBLE,
    strategy VARCHAR, model VARCHAR);
CREATE TABLE IF NOT EXISTS validations (run_id VARCHAR, shard_id VARCHAR, suite VARCHAR, expectation VARCHAR,
    "column" VARCHAR, success BOOLEAN, observed VARCHAR);
CREATE OR REPLACE VIEW dpo_pairs AS
SELECT prompt, [{'role': 'assistant', 'content': chosen_text}] AS chosen,
    [{'role': 'assistant', 'content': rejected_text}] AS rejected, pair_id, run_id, domain, margin,
    shared_prefix_tokens, method, difficulty
FROM pairs;
COMMENT ON TABLE runs IS 'orchard-schema sha256:0000000000000000';
INSERT INTO instructions VALUES ('r0', 's0', 'i0', 'math', 'arithmetic', 1, 'What is 1 + 1?', '2', 1);
INSERT INTO nodes VALUES
    ('r0', 's0', 't0', 'n0', NULL, 'i0', 0, 'instruction', NULL, [], 'What is 1 + 1?', NULL, NULL, NULL, NULL,
     NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
    ('r0', 's0', 't0', 'a1', 'n0', 'i0', 1, 'action', 'step_by_step', [{'role': 'user', 'content': 'What is 1 + 1?'}],
     '2', 'correct', 1.0, 'math', NULL, 'smol', 0.9, 0.95, 64, 1, 'v1', 10, 2, 'stop'),
    ('r0', 's0', 't0', 'a2', 'n0', 'i0', 1, 'action', 'step_by_step', [{'role': 'user', 'content': 'What is 1 + 1?'}],
     '3', 'incorrect', 0.0, 'math', NULL, 'smol', 0.9, 0.95, 64, 2, 'v1', 10, 2, 'stop');
INSERT INTO pairs VALUES ('r0', 's0', 't0', 'p0', 'i0', 'math', 'rs',
    [{'role': 'user', 'content': 'What is 1 + 1?'}], 'a1', 'a2', '2', '3', 1.0, 0.0, 1.0, 10, 1, 0.5, 'step_by_step',
    'smol');
"""


def make_lake_with(config: Config, ddl: str) -> int:
    """Create the lake as an older Orchard left it, by running `ddl` on it; return its snapshot id."""
    con = duckdb.connect()
    try:
        for name in ("httpfs", "ducklake"):
            con.execute(f"LOAD '{lake.extension_path(name)}'")
        con.execute(lake._secret_sql(config.object_store))
        con.execute(f"ATTACH 'ducklake:{lake._catalog(config)}' AS lake (DATA_PATH '{config.lake_data_path}')")
        con.execute("USE lake")
        con.execute(ddl)
    finally:
        con.close()
    return latest_snapshot(config)


def make_lake_before_trees(config: Config) -> int:
    """Create the lake as the version before multi-turn trees left it (one old run in it); return its snapshot id."""
    return make_lake_with(config, LAKE_SQL_BEFORE_TREES)


def test_lake_made_before_multi_turn_trees_is_migrated_in_one_snapshot_on_connect(local_config):
    before = make_lake_before_trees(local_config)

    lake.connect(local_config).close()

    assert latest_snapshot(local_config) == before + 1
    assert_tables_follow_rows(local_config)
    # Rows written before the migration read null in the new columns and still reach the views.
    _, old = lake.query(local_config, "SELECT node_id, turn, sandbox_exit_code FROM nodes WHERE node_id = 'a1'")
    assert old == [("a1", None, None)]
    _, pairs = lake.query(local_config, "SELECT pair_id, turn FROM dpo_pairs")
    assert pairs == [("p0", None)]
    assert count(local_config, "SELECT count(*) FROM sft_examples") == 1
    assert count(local_config, "SELECT count(*) FROM ranked_lists") == 1
    lake.connect(local_config).close()
    assert latest_snapshot(local_config) == before + 1  # migrated once


def test_migrated_lake_takes_new_runs_beside_old_rows(config):
    make_lake_before_trees(config)
    shards = [land_shard(config, "r1", "s1", trees=2)]

    materialise_run(config, run_row("r1", shards), shards)

    assert count(config, "SELECT count(*) FROM nodes") == 3 + 2 * NODES_PER_TREE
    assert count(config, "SELECT count(*) FROM trees") == 2
    _, turns = lake.query(config, "SELECT run_id, turn, count(*) FROM dpo_pairs GROUP BY ALL ORDER BY ALL")
    assert turns == [("r0", None, 1), ("r1", 1, 4), ("r1", 2, 2)]


def test_tables_made_without_their_newest_column_gain_it_when_the_lake_is_opened(local_config):
    older = {name: schema.remove(len(schema) - 1) for name, schema in LAKE_TABLES.items()}
    before = make_lake_with(local_config, lake.tables_sql(older) + """
        INSERT INTO drops VALUES ('r0', NULL, 'seeds', 'empty', 2);
        INSERT INTO nodes (run_id, node_id, role, text) VALUES ('r0', 'n0', 'instruction', 'What is 1 + 1?');
    """)

    lake.connect(local_config).close()

    assert latest_snapshot(local_config) == before + 1
    assert_tables_follow_rows(local_config)
    _, drops = lake.query(local_config, "SELECT reason, example_ids FROM drops")
    assert drops == [("empty", None)]  # a row from before reads null in the column it gained
    _, nodes = lake.query(local_config, "SELECT node_id, edit FROM nodes")
    assert nodes == [("n0", None)]


def test_a_column_whose_type_changed_is_refused_and_changes_nothing(local_config):
    nodes = SHARD_TABLES["nodes"]
    retyped = nodes.set(nodes.get_field_index("turn"), pa.field("turn", pa.string()))
    before = make_lake_with(local_config, lake.tables_sql({"nodes": retyped}))

    with pytest.raises(LakeError, match=r"nodes.turn is VARCHAR, not BIGINT"):
        lake.connect(local_config)

    assert latest_snapshot(local_config) == before
    _, tables = lake.query(local_config, "SELECT table_name FROM duckdb_tables() WHERE database_name = 'lake'")
    assert [t for (t,) in tables] == ["nodes"]
