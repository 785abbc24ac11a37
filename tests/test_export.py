"""`orchard export` against a real SeaweedFS and DuckLake: lake snapshots as datasets that `load_dataset` reads."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest

from flows.cli import build_parser
from flows.cli import main as orchard_main
from orchard.config import Config, ObjectStoreConfig
from orchard.services import Service
from orchard.store import ObjectStore
from schemas.rows import SHARD_TABLES
from tasks.export import FORMATS, ExportError, export_dataset, in_test_split
from tasks.materialise import materialise_run
from test_lake import (
    _node,
    _open_ended_rows,
    _tree_rows,
    count,
    insert_rows,
    latest_snapshot,
    make_lake_before_trees,
    new_lake,
    run_row,
)
from tests.builders import put_shard, store_toml

ROOT = Path(__file__).resolve().parents[1]

# --- builders ---------------------------------------------------------------------------------


def _search_and_injected_nodes(run_id: str, shard_id: str, t: int) -> list[dict]:
    """Nodes of tree t beside its actions and refinements: an injected hard negative of a1, a finished MCTS step,
    an unfinished one (no verdict of its own) and its rollout."""
    tree, right, wrong = f"{shard_id}-t{t}", f"The answer is {t + 2}.", f"The answer is {t + 3}."
    common = dict(run_id=run_id, shard_id=shard_id, tree_id=tree, instruction_id=f"{shard_id}-i{t}", model="smol",
                  prompt=[{"role": "user", "content": f"What is {t} + 2?"}], strategy="step_by_step",
                  turn=1)  # fmt: skip
    return [
        _node(**common, node_id=f"{tree}-x1", parent_id=f"{tree}-n0", depth=1, role="injected", text=wrong,
              verdict="incorrect", score=0.0, edit="final number off by one"),
        _node(**common, node_id=f"{tree}-m1", parent_id=f"{tree}-n0", depth=1, role="step", text=right,
              verdict="correct", score=1.0),
        _node(**common, node_id=f"{tree}-m2", parent_id=f"{tree}-n0", depth=1, role="step", text="The answer"),
        _node(**common, node_id=f"{tree}-m3", parent_id=f"{tree}-m2", depth=2, role="rollout", text=wrong,
              verdict="incorrect", score=0.0),
    ]  # fmt: skip


def shard_rows(run_id: str, shard_id: str, trees: int, open_prompts: int) -> dict[str, list[dict]]:
    """The rows of a shard of `trees` math trees (tests/test_lake.py's, plus MCTS and injected nodes) and
    `open_prompts` open-ended prompts with principle examples."""
    shard: dict[str, list[dict]] = {name: [] for name in SHARD_TABLES}
    for t in range(trees):
        for name, rows in _tree_rows(run_id, shard_id, t).items():
            shard[name].extend(rows)
        shard["nodes"].extend(_search_and_injected_nodes(run_id, shard_id, t))
    for t in range(open_prompts):
        for name, rows in _open_ended_rows(run_id, shard_id, t).items():
            shard[name].extend(rows)
    return shard


def land(config: Config, run_id: str, shard_id: str, trees: int, open_prompts: int) -> dict:
    """Land a shard of shard_rows() in the object store; return its manifest."""
    shard = shard_rows(run_id, shard_id, trees, open_prompts)
    return put_shard(config, run_id, shard_id, shard, {"trees": trees + open_prompts})


def publish(config: Config, run_id: str, shard_id: str, trees: int, open_prompts: int) -> int:
    """Land one shard and materialise it as run `run_id`; return the snapshot id."""
    shards = [land(config, run_id, shard_id, trees, open_prompts)]
    return materialise_run(config, run_row(run_id, shards), shards)


@dataclasses.dataclass(frozen=True)
class Lake:
    config: Config
    first: int  # the snapshot of run r1 alone
    second: int  # the newest snapshot: r1 and r2


@pytest.fixture(scope="module")
def lake_of_two_runs(seaweed: tuple[Service, ObjectStoreConfig], tmp_path_factory: pytest.TempPathFactory) -> Lake:
    """A lake (read only by the tests) with run r1 (12 math trees, 3 open-ended prompts), then run r2 (4 and 1)."""
    _, store = seaweed
    bucket = ObjectStore(dataclasses.replace(store, bucket=f"test-{uuid.uuid4().hex[:16]}"))
    bucket.ensure_bucket()
    config = Config(state_dir=str(tmp_path_factory.mktemp("export-state")), object_store=bucket.cfg)
    first = publish(config, "r1", "s1", trees=12, open_prompts=3)
    second = publish(config, "r2", "s2", trees=4, open_prompts=1)
    return Lake(config, first, second)


@pytest.fixture
def config(store: ObjectStore, tmp_path: Path) -> Config:
    """A Config whose (not yet created) lake lives in the test's own bucket."""
    return Config(state_dir=str(tmp_path / "state"), object_store=store.cfg)


def load(out_dir: Path, tmp_path: Path) -> datasets.DatasetDict:
    return datasets.load_dataset(str(out_dir), cache_dir=str(tmp_path / "hf-cache"))


def view_rows(config: Config, fmt: str, version: int | None = None) -> int:
    """The rows the views of format `fmt` hold (at snapshot `version`)."""
    return sum(count(config, f"SELECT count(*) FROM {view}", version) for view in FORMATS[fmt].views)


def write_toml(config: Config, path: Path) -> Path:
    path.write_text(store_toml(config))
    return path


# --- specifications ---------------------------------------------------------------------------


def test_a_tree_goes_to_test_by_a_stable_hash_of_its_id():
    digest = int.from_bytes(hashlib.sha256(b"s1-t0").digest()[:8], "big") / 2**64
    assert in_test_split("s1-t0", digest + 1e-9) and not in_test_split("s1-t0", digest)
    assert not in_test_split("s1-t0", 0.0) and in_test_split("s1-t0", 1.0)
    share = sum(in_test_split(f"tree-{i}", 0.1) for i in range(2000)) / 2000
    assert 0.08 < share < 0.12


COLUMNS = {
    "trl-dpo": ["prompt", "chosen", "rejected", "id", "tree_id", "run_id", "source", "method", "domain", "model"],
    "trl-kto": ["prompt", "completion", "label", "node_id", "tree_id", "run_id", "domain", "role", "turn", "strategy",
                "model"],
    "sft": ["messages", "node_id", "tree_id", "run_id", "domain", "turn", "strategy", "model"],
    "ranked": ["prompt", "completions", "scores", "node_ids", "parent_id", "tree_id", "run_id", "domain", "turn",
               "model"],
    "trl-rm": ["chosen", "rejected", "id", "tree_id", "run_id", "source", "method", "domain", "model", "margin"],
    "openrlhf-rm": ["chosen", "rejected", "margin", "id", "tree_id", "run_id", "source", "method", "domain", "model"],
    "trl-stepwise": ["prompt", "completions", "labels", "soft_labels", "id", "source", "tree_id", "run_id", "domain",
                     "model"],
    "openrlhf-prm": ["input", "value", "id", "source", "tree_id", "run_id", "domain", "model"],
}  # fmt: skip


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_each_format_loads_with_datasets_split_by_tree(lake_of_two_runs, tmp_path, fmt):
    config = lake_of_two_runs.config
    out_dir = tmp_path / fmt

    summary = export_dataset(config, fmt, out_dir, test_share=0.5)

    dataset = load(out_dir, tmp_path)
    assert sorted(dataset) == ["test", "train"]
    assert dataset["train"].column_names == COLUMNS[fmt]
    assert dataset.num_rows == summary["rows"] == {"train": len(dataset["train"]), "test": len(dataset["test"])}
    assert sum(summary["rows"].values()) == view_rows(config, fmt)
    train_trees, test_trees = set(dataset["train"]["tree_id"]), set(dataset["test"]["tree_id"])
    assert train_trees and test_trees and not train_trees & test_trees  # siblings never straddle splits
    assert all(in_test_split(t, 0.5) for t in test_trees) and not any(in_test_split(t, 0.5) for t in train_trees)
    assert summary["snapshot_id"] == lake_of_two_runs.second == latest_snapshot(config)
    assert summary["run_ids"] == ["r1", "r2"]
    assert sorted(p.name for p in out_dir.iterdir()) == ["README.md", "data"]
    assert not list(tmp_path.glob(f"{fmt}.tmp-*"))


def test_dpo_export_holds_pairs_and_stable_principle_pairs_in_trl_format(lake_of_two_runs, tmp_path):
    export_dataset(lake_of_two_runs.config, "trl-dpo", tmp_path / "dpo", test_share=0.5)

    rows = [row for split in load(tmp_path / "dpo", tmp_path).values() for row in split]

    by_source = {source: [r for r in rows if r["source"] == source] for source in ("pairs", "principle_pairs")}
    assert len(by_source["pairs"]) == (12 + 4) * 3 and len(by_source["principle_pairs"]) == 3 + 1
    principled = next(r for r in by_source["principle_pairs"] if r["id"] == "s1-o0-e1")
    assert principled["tree_id"] == "s1-o0"  # the example's tree
    assert (principled["method"], principled["domain"], principled["model"]) == (None, "open_ended", "smol")
    assert principled["prompt"] == [{"role": "system", "content": "Be kind (1)."},
                                    {"role": "user", "content": "Write a note 0."}]  # fmt: skip
    assert principled["chosen"] == [{"role": "assistant", "content": "Kind note."}]
    pair = next(r for r in by_source["pairs"] if r["id"] == "s1-t0-p1")
    assert (pair["tree_id"], pair["method"], pair["domain"], pair["run_id"]) == ("s1-t0", "rs", "math", "r1")
    assert pair["rejected"] == [{"role": "assistant", "content": "The answer is 3."}]


def test_kto_rows_are_every_verified_answer_labelled_by_its_verdict(lake_of_two_runs, tmp_path):
    export_dataset(lake_of_two_runs.config, "trl-kto", tmp_path / "kto", test_share=0.5)

    rows = [row for split in load(tmp_path / "kto", tmp_path).values() for row in split]

    tree = {r["node_id"].removeprefix("s1-t0-"): r for r in rows if r["tree_id"] == "s1-t0"}
    # Actions, refinements, the injected copy, the finished step and the rollout; not the root, the critique
    # or the unfinished step.
    assert {node: r["label"] for node, r in tree.items()} == {
        "a1": True, "a2": True, "a3": False, "r1": True, "r2": False, "x1": False, "m1": True, "m3": False,
    }  # fmt: skip
    assert tree["r1"]["prompt"][-1]["content"].endswith("Critique: add again.")
    assert tree["a3"]["completion"] == [{"role": "assistant", "content": "The answer is 3."}]
    assert (tree["x1"]["role"], tree["x1"]["domain"], tree["x1"]["run_id"]) == ("injected", "math", "r1")
    assert len(rows) == (12 + 4) * 8


def test_card_maps_the_splits_and_names_snapshot_catalog_runs_and_counts(lake_of_two_runs, tmp_path):
    config = lake_of_two_runs.config
    summary = export_dataset(config, "trl-dpo", tmp_path / "dpo", test_share=0.5)

    card = (tmp_path / "dpo" / "README.md").read_text()

    front, body = card.removeprefix("---\n").split("\n---\n", 1)
    assert "configs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*.parquet" in front
    assert f"lake snapshot **{lake_of_two_runs.second}**" in body
    assert f"- lake snapshot: {lake_of_two_runs.second} " in body
    assert f"- catalog: `{config.lake_catalog}`" in body
    assert "- runs: `r1`, `r2`" in body and "- models: `smol`" in body
    assert f"| train | {summary['rows']['train']} | {summary['trees']['train']} |" in body
    assert f"| test | {summary['rows']['test']} | {summary['trees']['test']} |" in body
    by_source = body.split("## Rows by source", 1)[1]
    assert "| pairs |" in by_source and "| principle_pairs |" in by_source
    assert "## Rows by method" in body and "## Rows by domain" in body and "| open_ended |" in body
    # The trainer and versions the format was proved with (tests/test_real_run.py).
    assert "Checked with: TRL 1.16.0 `DPOTrainer` (transformers 5.19.0, torch 2.13.0+cpu)" in body


def test_preference_exports_take_tree_domain_and_model_from_the_views(local_config, tmp_path):
    shard = shard_rows("r1", "s1", trees=2, open_prompts=2)
    shard["pairs"][1]["model"] = "other"
    shard["principle_examples"][0].update(votes_response=2, votes_antithesis=1)
    shard["instructions"] = [i for i in shard["instructions"] if i["instruction_id"] != "s1-oi1"]
    insert_rows(local_config, shard)

    export_dataset(local_config, "trl-dpo", tmp_path / "dpo", test_share=0.0)
    export_dataset(local_config, "trl-rm", tmp_path / "rm", test_share=0.0)

    dpo = pq.read_table(tmp_path / "dpo" / "data" / "train-00000-of-00001.parquet").to_pylist()
    assert list(dpo[0]) == COLUMNS["trl-dpo"]
    assert [(r["id"], r["tree_id"], r["source"], r["domain"], r["model"]) for r in dpo] == [
        ("s1-o0-e1", "s1-o0", "principle_pairs", "open_ended", "smol"),
        ("s1-o1-e1", "s1-o1", "principle_pairs", None, "smol"),  # its instruction is not in the lake
        ("s1-t0-p1", "s1-t0", "pairs", "math", "smol"),
        ("s1-t0-p2", "s1-t0", "pairs", "math", "other"),
        ("s1-t0-p3", "s1-t0", "pairs", "math", "smol"),
        ("s1-t1-p1", "s1-t1", "pairs", "math", "smol"),
        ("s1-t1-p2", "s1-t1", "pairs", "math", "smol"),
        ("s1-t1-p3", "s1-t1", "pairs", "math", "smol"),
    ]  # fmt: skip
    rm = pq.read_table(tmp_path / "rm" / "data" / "train-00000-of-00001.parquet").to_pylist()
    # A principle pair's margin is the jury's, (2 - 1) / 3 and (3 - 0) / 3; a pair's the verifier's.
    assert [(r["id"], r["margin"]) for r in rm][:3] == [("s1-o0-e1", 1 / 3), ("s1-o1-e1", 1.0), ("s1-t0-p1", 1.0)]


def test_a_snapshot_older_than_a_views_columns_is_an_error_that_says_why(local_config, tmp_path):
    before = make_lake_before_trees(local_config)  # its dpo_pairs has no tree_id
    new_lake(local_config)

    expected = f'at lake snapshot {before}: .*"tree_id" not found.*a snapshot keeps the views it was made with'
    with pytest.raises(ExportError, match=expected):
        export_dataset(local_config, "trl-dpo", tmp_path / "old", version=before)
    summary = export_dataset(local_config, "trl-dpo", tmp_path / "new", test_share=0.0)
    assert summary["rows"] == {"train": 1, "test": 0}  # the newest snapshot's views read the old row


def test_an_older_version_exports_that_snapshots_rows(lake_of_two_runs, tmp_path):
    config, first = lake_of_two_runs.config, lake_of_two_runs.first

    summary = export_dataset(config, "sft", tmp_path / "sft", version=first, test_share=0.5)

    dataset = load(tmp_path / "sft", tmp_path)
    assert summary["snapshot_id"] == first and summary["run_ids"] == ["r1"]
    assert dataset.num_rows["train"] + dataset.num_rows["test"] == view_rows(config, "sft", first) == 12 * 4
    assert set(dataset["train"]["run_id"]) | set(dataset["test"]["run_id"]) == {"r1"}
    assert f"lake snapshot **{first}**" in (tmp_path / "sft" / "README.md").read_text()


def test_an_empty_split_is_left_out_and_the_dataset_still_loads(lake_of_two_runs, tmp_path):
    summary = export_dataset(lake_of_two_runs.config, "ranked", tmp_path / "ranked", test_share=0.0)

    dataset = load(tmp_path / "ranked", tmp_path)
    assert list(dataset) == ["train"] and summary["rows"]["test"] == 0
    assert sorted(p.name for p in (tmp_path / "ranked" / "data").iterdir()) == ["train-00000-of-00001.parquet"]
    assert "split: test" not in (tmp_path / "ranked" / "README.md").read_text()


def test_an_empty_view_is_an_error_naming_view_and_snapshot(config, tmp_path):
    snapshot = new_lake(config)

    with pytest.raises(ExportError, match=f"no rows in kto_rows at lake snapshot {snapshot}: nothing to export"):
        export_dataset(config, "trl-kto", tmp_path / "kto")

    assert not (tmp_path / "kto").exists() and not list(tmp_path.glob("kto.tmp-*"))


def test_a_snapshot_without_the_view_is_an_error_naming_both(lake_of_two_runs, tmp_path):
    expected = "cannot read dpo_pairs and principle_pairs at lake snapshot 0: .*does not exist.*next run"
    with pytest.raises(ExportError, match=expected):
        export_dataset(lake_of_two_runs.config, "trl-dpo", tmp_path / "dpo", version=0)


def test_an_existing_non_empty_directory_is_refused_unless_forced(lake_of_two_runs, tmp_path):
    out_dir = tmp_path / "sft"
    out_dir.mkdir()
    (out_dir / "mine.txt").write_text("keep me")

    with pytest.raises(ExportError, match="sft exists and is not empty"):
        export_dataset(lake_of_two_runs.config, "sft", out_dir)
    assert [p.name for p in out_dir.iterdir()] == ["mine.txt"]

    export_dataset(lake_of_two_runs.config, "sft", out_dir, force=True)
    assert sorted(p.name for p in out_dir.iterdir()) == ["README.md", "data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft"]  # no staging or replaced directory left


def test_an_existing_empty_directory_is_filled(lake_of_two_runs, tmp_path):
    (tmp_path / "sft").mkdir()
    export_dataset(lake_of_two_runs.config, "sft", tmp_path / "sft")
    assert (tmp_path / "sft" / "README.md").is_file()


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_cli_accepts_every_export_format(fmt):
    assert build_parser().parse_args(["export", "--format", fmt, "out"]).format == fmt


def test_cli_export_writes_a_loadable_dataset_and_prints_the_snapshot(lake_of_two_runs, tmp_path, capsys):
    config = lake_of_two_runs.config
    path = write_toml(config, tmp_path / "orchard.toml")
    out_dir = tmp_path / "sft"

    code = orchard_main(["--config", str(path), "export", "--format", "sft", "--test-share", "0.5", str(out_dir)])

    assert code == 0
    out = capsys.readouterr().out
    assert f"exported sft from lake snapshot {lake_of_two_runs.second} to {out_dir}" in out
    dataset = load(out_dir, tmp_path)
    assert f"train: {dataset.num_rows['train']} rows" in out and f"test: {dataset.num_rows['test']} rows" in out
    assert orchard_main(["--config", str(path), "export", "--format", "sft", str(out_dir)]) == 2
    assert "is not empty (pass --force to replace it)" in capsys.readouterr().err
    assert orchard_main(["--config", str(path), "export", "--format", "sft", "--version", "999",
                         str(tmp_path / "other")]) == 2  # fmt: skip
    assert "there is no snapshot 999" in capsys.readouterr().err


def test_push_to_an_unreachable_hub_is_one_clear_error_line(lake_of_two_runs, tmp_path):
    path = write_toml(lake_of_two_runs.config, tmp_path / "orchard.toml")
    out_dir = tmp_path / "dpo"
    # The hub client reads HF_ENDPOINT when it is imported: a fresh process, as a user would run it.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "ORCHARD_"))}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_TOKEN="hf_not_a_real_token", HF_HOME=str(tmp_path / "hf-home"))

    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--config", str(path), "export", "--format", "trl-dpo",
         "--push", "someone/orchard-dpo", str(out_dir)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip

    assert done.returncode == 2, done.stderr
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith("orchard: error: push to someone/orchard-dpo at http://127.0.0.1:9 failed: ")
    assert (out_dir / "README.md").is_file()  # the dataset was written before the push


def test_summary_is_json_serialisable(lake_of_two_runs, tmp_path):
    summary = export_dataset(lake_of_two_runs.config, "ranked", tmp_path / "ranked")
    assert json.loads(json.dumps(summary))["format"] == "ranked"


def test_step_exports_label_each_step_and_put_one_placeholder_per_label(lake_of_two_runs, tmp_path):
    """trl-stepwise: a boolean per step; openrlhf-prm: the steps joined with the step token, a + or - per token."""
    config = lake_of_two_runs.config
    export_dataset(config, "trl-stepwise", tmp_path / "steps", test_share=0.0)
    steps = load(tmp_path / "steps", tmp_path)["train"]
    assert len(steps) == count(config, "SELECT count(*) FROM prm_steps")
    for row in steps:
        assert isinstance(row["prompt"], str) and row["prompt"]
        assert len(row["completions"]) == len(row["labels"]) >= 1 and all(isinstance(x, bool) for x in row["labels"])
    # A finished MCTS step that is right, an unfinished one whose rollout is wrong (test data: m1, m2 + m3).
    by_id = {row["id"]: row for row in steps}
    assert by_id["s1-t0-m1"]["labels"] == [True] and by_id["s1-t0-m2"]["labels"] == [False]
    assert by_id["s1-t0-m1"]["source"] == "mcts"
    # A multi-turn trajectory: the wrong action a3, then its refinements r1 (right) and r2 (wrong), a turn each.
    assert by_id["s1-t0-r1"]["source"] == "turns" and by_id["s1-t0-r1"]["labels"] == [False, True]
    assert by_id["s1-t0-r2"]["labels"] == [False, False] and len(by_id["s1-t0-r2"]["completions"]) == 2

    export_dataset(config, "openrlhf-prm", tmp_path / "prm", test_share=0.0, step_token="<step>")
    prm = load(tmp_path / "prm", tmp_path)["train"]
    assert len(prm) == len(steps)
    for row in prm:
        assert row["input"].count("<step>") == len(row["value"]) and set(row["value"]) <= {"+", "-"}


def test_reward_model_exports_are_whole_conversations_with_a_margin(lake_of_two_runs, tmp_path):
    config = lake_of_two_runs.config
    export_dataset(config, "trl-rm", tmp_path / "rm", test_share=0.0)
    rows = load(tmp_path / "rm", tmp_path)["train"]
    assert len(rows) == view_rows(config, "trl-rm")
    for row in rows:
        assert row["chosen"][-1]["role"] == row["rejected"][-1]["role"] == "assistant"
        assert row["chosen"][:-1] == row["rejected"][:-1] and row["chosen"][0]["role"] in ("system", "user")
        assert 0 < row["margin"] <= 1
