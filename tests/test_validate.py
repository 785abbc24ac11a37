"""Shard validation with Great Expectations: valid shards pass, each kind of bad row is named, Data Docs are built."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pyarrow.parquet as pq
import pytest

from schemas import rows
from schemas.suites import SuiteError, load_suite, load_suites
from tasks.validate import ShardValidation, ShardValidationError, validate_shard

REPO = Path(__file__).resolve().parents[1]
RUN = "run-1"
SHARD = "shard-a"


def instruction_row(instruction_id: str = "i1", **changes: Any) -> dict[str, Any]:
    """Return a valid instructions row."""
    row = {
        "run_id": RUN,
        "shard_id": SHARD,
        "instruction_id": instruction_id,
        "domain": "math",
        "source": "arithmetic",
        "source_row": 1,
        "text": "What is 12 * 7?",
        "reference": "84",
        "difficulty": 2,
    }
    return {**row, **changes}


def node_row(node_id: str, parent_id: str | None = "root", **changes: Any) -> dict[str, Any]:
    """Return a valid nodes row: an action under the root unless `role="instruction"` is given."""
    action = changes.get("role", "action") == "action"
    row = {
        "run_id": RUN,
        "shard_id": SHARD,
        "tree_id": "t1",
        "node_id": node_id,
        "parent_id": parent_id,
        "instruction_id": "i1",
        "depth": 1 if action else 0,
        "role": "action",
        "strategy": "step_by_step" if action else None,
        "prompt": [{"role": "user", "content": "What is 12 * 7?"}] if action else [],
        "text": "12 * 7 = 84" if action else "What is 12 * 7?",
        "verdict": "correct" if action else None,
        "score": 1.0 if action else None,
        "verifier": "math" if action else None,
        "verifier_detail": None,
        "model": "smollm2-135m" if action else None,
        "temperature": 0.9 if action else None,
        "top_p": 0.95 if action else None,
        "max_tokens": 160 if action else None,
        "sample_seed": 7 if action else None,
        "prompt_template_version": "v1" if action else None,
        "prompt_tokens": 20 if action else None,
        "completion_tokens": 8 if action else None,
        "finish_reason": "stop" if action else None,
    }
    return {**row, **changes}


def pair_row(pair_id: str = "p1", **changes: Any) -> dict[str, Any]:
    """Return a valid pairs row: correct action a1 chosen over incorrect action a2."""
    row = {
        "run_id": RUN,
        "shard_id": SHARD,
        "tree_id": "t1",
        "pair_id": pair_id,
        "instruction_id": "i1",
        "domain": "math",
        "method": "same_prompt",
        "prompt": [{"role": "user", "content": "What is 12 * 7?"}],
        "chosen_node_id": "a1",
        "rejected_node_id": "a2",
        "chosen_text": "12 * 7 = 84",
        "rejected_text": "12 * 7 = 88",
        "chosen_score": 1.0,
        "rejected_score": 0.0,
        "margin": 1.0,
        "shared_prefix_tokens": 20,
        "difficulty": 2,
        "pass_rate": 0.5,
        "strategy": "step_by_step",
        "model": "smollm2-135m",
    }
    return {**row, **changes}


def shard_rows() -> dict[str, list[dict[str, Any]]]:
    """Return the rows of a small valid shard: one tree, a root, two correct and two incorrect actions, two pairs."""
    return {
        "instructions": [instruction_row()],
        "nodes": [
            node_row("root", None, role="instruction"),
            node_row("a1"),
            node_row("a2", text="12 * 7 = 88", verdict="incorrect", score=0.0),
            node_row("a3", strategy="plan_first", text="84"),
            node_row("a4", strategy="plan_first", text="I cannot tell", verdict="unparsable", score=0.0),
        ],
        "pairs": [
            pair_row("p1"),
            pair_row("p2", chosen_node_id="a3", rejected_node_id="a4", chosen_text="84", rejected_text="I cannot tell"),
        ],
    }


def shard_tables(edit: Callable[[dict[str, list[dict[str, Any]]]], None] | None = None) -> dict[str, Any]:
    """Return the valid shard as Arrow tables, after `edit` changed its rows in place."""
    shard = shard_rows()
    if edit:
        edit(shard)
    return {name: rows.table(name, table_rows) for name, table_rows in shard.items()}


@pytest.fixture(scope="module")
def gx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One GX project for the module: validations reuse it, as a run's shards do."""
    return tmp_path_factory.mktemp("gx")


@pytest.fixture(scope="module")
def valid(gx_dir: Path) -> ShardValidation:
    """The validation of the valid shard."""
    return validate_shard(shard_tables(), shard_id=SHARD, gx_dir=gx_dir)


def failed_labels(validation: ShardValidation) -> set[str]:
    """Return `suite: expectation(columns)` for each failed outcome."""
    return {f"{r.suite}: {r.label}" for r in validation.failed()}


def test_valid_shard_passes_every_expectation(valid: ShardValidation) -> None:
    assert valid.success, valid.summary()
    assert valid.failed() == []
    expected = sum(len(suite.expectations) for suite in load_suites().values())
    assert len(valid.results) == expected
    assert valid.summary() == f"shard {SHARD}: all {expected} expectations passed"


def test_outcomes_follow_suite_file_order(valid: ShardValidation) -> None:
    for table, suite in load_suites().items():
        outcomes = [r for r in valid.results if r.suite == table]
        assert [(r.expectation, r.columns) for r in outcomes] == [(e.type, e.columns) for e in suite.expectations]


def set_rows(table: str, index: int, **changes: Any) -> Callable[[dict[str, list[dict[str, Any]]]], None]:
    """Return an edit that changes fields of row `index` of `table`."""

    def edit(shard: dict[str, list[dict[str, Any]]]) -> None:
        shard[table][index] = {**shard[table][index], **changes}

    return edit


VIOLATIONS = [
    pytest.param(
        set_rows("pairs", 0, chosen_text=""),
        "pairs: expect_column_values_to_not_match_regex(chosen_text)",
        "1 of 2 rows",
        id="empty-chosen-text",
    ),
    pytest.param(
        set_rows("pairs", 1, chosen_text=" \n\t"),
        "pairs: expect_column_values_to_not_match_regex(chosen_text)",
        "1 of 2 rows",
        id="whitespace-chosen-text",
    ),
    pytest.param(
        set_rows("pairs", 0, rejected_text="12 * 7 = 84"),
        "pairs: expect_column_values_to_be_in_set(check_chosen_differs_from_rejected)",
        "1 of 2 rows",
        id="chosen-equals-rejected",
    ),
    pytest.param(
        set_rows("nodes", 3, node_id="a1"),
        "nodes: expect_column_values_to_be_unique(node_id)",
        "2 of 5 rows",
        id="duplicate-node-id",
    ),
    pytest.param(
        set_rows("nodes", 2, parent_id="no-such-node"),
        "nodes: expect_column_values_to_be_in_set(check_parent_exists)",
        "1 of 5 rows",
        id="dangling-parent-id",
    ),
    pytest.param(
        set_rows("nodes", 1, verdict="probably"),
        "nodes: expect_column_values_to_be_in_set(verdict)",
        "1 of 5 rows",
        id="bad-verdict",
    ),
    pytest.param(
        set_rows("nodes", 1, verdict=None),
        "nodes: expect_column_values_to_not_be_null(verdict)",
        "1 of 4 rows where role == action",
        id="action-without-verdict",
    ),
    pytest.param(
        set_rows("nodes", 2, verifier=None),
        "nodes: expect_column_values_to_not_be_null(verifier)",
        "1 of 4 rows where role == action",
        id="action-without-verifier",
    ),
    pytest.param(
        set_rows("pairs", 0, margin=0.0),
        "pairs: expect_column_values_to_be_between(margin)",
        "1 of 2 rows",
        id="zero-margin",
    ),
    pytest.param(
        set_rows("pairs", 1, chosen_node_id="a9"),
        "pairs: expect_column_values_to_be_in_set(check_chosen_node_exists)",
        "1 of 2 rows",
        id="pair-references-missing-node",
    ),
    pytest.param(
        set_rows("pairs", 0, chosen_score=0.0),
        "pairs: expect_column_pair_values_a_to_be_greater_than_b(chosen_score, rejected_score)",
        "1 of 2 rows",
        id="chosen-not-better",
    ),
    pytest.param(
        set_rows("instructions", 0, domain="poetry"),
        "instructions: expect_column_values_to_be_in_set(domain)",
        "1 of 1 rows",
        id="unknown-domain",
    ),
    pytest.param(
        set_rows("nodes", 4, shard_id="shard-b"),
        "nodes: expect_column_values_to_be_in_set(shard_id)",
        "1 of 5 rows",
        id="row-from-another-shard",
    ),
]


@pytest.mark.parametrize(("edit", "label", "count"), VIOLATIONS)
def test_each_violation_is_named_with_its_row_count(
    gx_dir: Path, edit: Callable[[dict[str, list[dict[str, Any]]]], None], label: str, count: str
) -> None:
    validation = validate_shard(shard_tables(edit), shard_id=SHARD, gx_dir=gx_dir)
    assert not validation.success
    assert label in failed_labels(validation), validation.summary()
    assert f"{label} failed on {count}" in validation.summary()


def test_failure_quotes_the_offending_row_id_and_value(gx_dir: Path) -> None:
    validation = validate_shard(shard_tables(set_rows("nodes", 1, verdict="probably")), shard_id=SHARD, gx_dir=gx_dir)
    (outcome,) = [r for r in validation.failed() if r.columns == ("verdict",)]
    assert outcome.unexpected_count == 1
    assert "node_id='a1'" in outcome.observed
    assert "verdict='probably'" in outcome.observed


def test_instruction_root_without_verdict_or_model_passes(valid: ShardValidation) -> None:
    conditioned = [r for r in valid.results if r.condition == "role == action"]
    assert {r.columns for r in conditioned} >= {("verdict",), ("verifier",), ("model",), ("text",)}
    assert all(r.success and r.element_count == 4 for r in conditioned)


def test_shard_without_pairs_passes(gx_dir: Path) -> None:
    def no_pairs(shard: dict[str, list[dict[str, Any]]]) -> None:
        shard["pairs"] = []

    validation = validate_shard(shard_tables(no_pairs), shard_id=SHARD, gx_dir=gx_dir)
    assert validation.success, validation.summary()


def test_data_docs_index_and_shard_pages_are_built(valid: ShardValidation, gx_dir: Path) -> None:
    assert valid.data_docs_index is not None
    index = Path(valid.data_docs_index)
    assert index.name == "index.html" and index.is_file()
    assert index.is_relative_to(gx_dir)
    assert set(valid.data_docs_pages) == {"instructions", "nodes", "pairs"}
    for page in valid.data_docs_pages.values():
        assert Path(page).is_file()
    assert SHARD in index.read_text(encoding="utf-8")  # the run name shown in the index is the shard id


def test_revalidating_a_shard_reuses_the_project(gx_dir: Path, valid: ShardValidation) -> None:
    again = validate_shard(shard_tables(), shard_id=SHARD, gx_dir=gx_dir)
    assert again.success
    project = gx_dir / "gx"
    assert sorted(p.stem for p in (project / "validation_definitions").iterdir()) == ["instructions", "nodes", "pairs"]
    assert sorted(p.stem for p in (project / "expectations").glob("*.json")) == ["instructions", "nodes", "pairs"]


def test_a_new_process_reuses_the_project(gx_dir: Path, valid: ShardValidation, tmp_path: Path) -> None:
    for name, table in shard_tables().items():
        pq.write_table(table, tmp_path / f"{name}.parquet")
    script = (
        "import json, sys, pyarrow.parquet as pq\n"
        "from pathlib import Path\n"
        "from tasks.validate import validate_shard\n"
        "folder, gx_dir = Path(sys.argv[1]), Path(sys.argv[2])\n"
        "tables = {n: pq.read_table(folder / f'{n}.parquet') for n in ('instructions', 'nodes', 'pairs')}\n"
        "print(json.dumps(validate_shard(tables, shard_id=sys.argv[3], gx_dir=gx_dir).to_dict()))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), str(gx_dir), SHARD],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["success"], result["summary"]
    assert result["data_docs_index"] == valid.data_docs_index


def test_edited_suite_file_replaces_the_stored_suite(gx_dir: Path, tmp_path: Path) -> None:
    suites_dir = tmp_path / "suites"
    shutil.copytree(load_suite("pairs").path.parent, suites_dir)
    pairs = json.loads((suites_dir / "pairs.json").read_text())
    pairs["expectations"].append(
        {"type": "expect_column_values_to_be_between", "kwargs": {"column": "pass_rate", "max_value": 0.25}}
    )
    (suites_dir / "pairs.json").write_text(json.dumps(pairs))

    stricter = validate_shard(shard_tables(), shard_id=SHARD, gx_dir=gx_dir, suites_dir=suites_dir)
    assert "pairs: expect_column_values_to_be_between(pass_rate)" in failed_labels(stricter)
    # Back to the shipped suites: the stored copy is rewritten again and the shard passes.
    assert validate_shard(shard_tables(), shard_id=SHARD, gx_dir=gx_dir).success


def test_rows_and_dict_are_json_safe(valid: ShardValidation) -> None:
    json.dumps(valid.to_dict())
    table_rows = valid.rows(RUN)
    json.dumps(table_rows)
    assert len(table_rows) == len(valid.results)
    assert set(table_rows[0]) == {"run_id", "shard_id", "suite", "expectation", "column", "success", "observed"}
    assert {r["shard_id"] for r in table_rows} == {SHARD}
    pair_check = [r for r in table_rows if r["column"] == "chosen_score, rejected_score"]
    assert pair_check and pair_check[0]["expectation"] == "expect_column_pair_values_a_to_be_greater_than_b"


def test_missing_table_is_a_named_error(gx_dir: Path) -> None:
    tables = shard_tables()
    del tables["pairs"]
    with pytest.raises(ShardValidationError, match="'pairs' is missing"):
        validate_shard(tables, shard_id=SHARD, gx_dir=gx_dir)


def write_suite(suites_dir: Path, table: str, expectation: dict[str, Any]) -> None:
    """Copy the shipped suites to `suites_dir` and append `expectation` to `table`'s suite."""
    shutil.copytree(load_suite(table).path.parent, suites_dir, dirs_exist_ok=True)
    path = suites_dir / f"{table}.json"
    suite = json.loads(path.read_text())
    suite["expectations"].append(expectation)
    path.write_text(json.dumps(suite))


def test_suite_naming_an_underived_check_column_is_rejected(tmp_path: Path) -> None:
    expectation = {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "check_moon", "value_set": [True]}}
    write_suite(tmp_path, "nodes", expectation)
    with pytest.raises(SuiteError, match=r"nodes\.json: check column\(s\) \['check_moon'\]"):
        load_suite("nodes", tmp_path)


def test_suite_naming_an_unknown_column_is_rejected(tmp_path: Path) -> None:
    write_suite(tmp_path, "pairs", {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "chosen"}})
    with pytest.raises(SuiteError, match=r"pairs\.json: expectations\[\d+\].*'chosen'"):
        load_suite("pairs", tmp_path)


def test_suite_naming_an_unknown_expectation_is_rejected(tmp_path: Path) -> None:
    write_suite(tmp_path / "suites", "pairs", {"type": "expect_pairs_to_be_lovely", "kwargs": {}})
    with pytest.raises(SuiteError, match=r"pairs\.json: expectations\[\d+\] \(expect_pairs_to_be_lovely\)"):
        validate_shard(shard_tables(), shard_id=SHARD, gx_dir=tmp_path / "gx", suites_dir=tmp_path / "suites")
