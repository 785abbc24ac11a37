"""One nightly run on the real model (llama.cpp server, SeaweedFS, Prefect test harness, GX, DuckLake), grown once, and
every test that reads what it published: its tables and a re-run that adds nothing, its report in Prefect, the `sql`
command, and its trainer-facing exports trained by TRL's own trainers.

They live in one module so that the run is grown once however the suite is split: `make test` runs this module in its
model lane, one worker's (tests/conftest.py).

TRL runs in its own venv (`make train-env`; `make train-check` also converts the shipped GGUF to a safetensors
checkpoint once): tests/train_check.py runs there, two optimizer steps of DPOTrainer, KTOTrainer, SFTTrainer and
RewardTrainer, and checks the stepwise export's labels token by token (TRL 1.16 has no process reward trainer).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import subprocess
import uuid
from pathlib import Path
from typing import NamedTuple

import pytest

from builders import SMALL_RUN, store_toml
from flows.cli import main as orchard_main
from orchard import lake, llama_build
from orchard.config import Config, EngineConfig, ObjectStoreConfig, SeedSource
from orchard.services import Service
from orchard.store import ObjectStore
from tasks.export import FORMATS, export_dataset
from tasks.land import landed_manifest
from tasks.seeds import plan_seeds

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PYTHON = ROOT / ".venv-train" / "bin" / "python"
TRAINED = {"DPOTrainer": "trl-dpo", "KTOTrainer": "trl-kto", "SFTTrainer": "sft", "RewardTrainer": "trl-rm"}

# The real-model run every reading test shares: math searched (MCTS), judged (the jury), injected; open-ended prompts
# under principles; a duplicate source and an eval item dropped before growth. Enough of the easiest problems at
# full-length answers that the 135M model gets some right and some wrong, so every export format has rows (SFT needs
# a correct answer, DPO a pair): 8 math trees in 2 shards, 2 open-ended trees in a third.
REAL_RUN_ID = "it-1"
REAL_ARITHMETIC = SeedSource(kind="arithmetic", count=8, difficulty=1, seed=3)
REAL_SEEDS = (REAL_ARITHMETIC, SeedSource(kind="open_ended", count=2), REAL_ARITHMETIC,
              SeedSource(kind="humaneval", count=1))


class RealRun(NamedTuple):
    """A nightly run grown on the real model: its config (state dir, bucket, engine) and the summary it returned."""

    config: Config
    summary: dict


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory, seaweed: tuple[Service, ObjectStoreConfig],
             llama: EngineConfig, prefect_api: None) -> RealRun:
    """One nightly run on the real model for this module (about two minutes on 2 cores; three and a half under
    `make test`, whose model servers get 1 thread of 2), read by the tests of
    what a real run publishes (tables, report, SQL, exports that train). Tests may run it again (a re-run reuses
    every shard) but must not add to or change its lake otherwise."""
    from flows.nightly import nightly

    _, store_config = seaweed
    object_store = ObjectStore(dataclasses.replace(store_config, bucket=f"real-run-{uuid.uuid4().hex[:12]}"))
    object_store.ensure_bucket()
    config = Config(state_dir=str(tmp_path_factory.mktemp("real-run") / "state"),
                    run=dataclasses.replace(SMALL_RUN, instructions_per_shard=4, max_tokens=128),
                    seeds=REAL_SEEDS, engines={"embedded": dataclasses.replace(llama, retries=1, backoff_s=0.1)},
                    object_store=object_store.cfg)
    return RealRun(config, nightly(config=config.to_dict(), run_id=REAL_RUN_ID))


def run(config: Config, run_id: str) -> dict:
    from flows.nightly import nightly

    return nightly(config=config.to_dict(), run_id=run_id)


def count(config: Config, sql: str) -> int:
    return lake.query(config, sql)[1][0][0]


def test_nightly_publishes_one_snapshot_and_a_rerun_adds_no_duplicates(real_run):
    # The same arithmetic source twice (8 duplicates) and a HumanEval problem (an eval set): dropped before growth.
    config, first = real_run
    store = ObjectStore(config.object_store)
    assert first["status"] == "complete", first["problems"]
    assert first["shards_planned"] == first["shards_published"] == 3
    assert first["trees"] == 10
    assert first["completion_tokens"] > 0 and first["tokens_per_s"] > 0

    landed_nodes = 0
    for shard in plan_seeds(config, "planned").plans:
        manifest = landed_manifest(store, "it-1", shard.shard_id)
        assert manifest["files"]["trees"]["rows"] == len(shard.instructions)
        landed_nodes += manifest["files"]["nodes"]["rows"]
    assert landed_nodes == first["nodes"]
    # Each math tree: a root, 3 strategies × 2 actions, then critiques and refinements of a wrong action if any.
    # Each open-ended tree: a root, and responses under one principle, its antithesis and none.
    roles = dict(lake.query(config, "SELECT role, count(*) FROM nodes GROUP BY 1")[1])
    assert (roles["instruction"], roles["action"]) == (10, 8 * 3 * 2)
    assert roles["principled"] == roles["antithesis"] == roles["unconditioned"] == 2
    assert roles.get("refinement", 0) == 2 * roles.get("critique", 0)
    # MCTS: up to 2 rounds over 8 math trees, 2 children per expansion; an unfinished step has one rollout.
    assert 0 < roles["step"] <= 2 * 8 * 2 and roles["step"] % 2 == 0 and 0 < roles.get("rollout", 0) <= roles["step"]
    assert count(config, "SELECT count(*) FROM nodes WHERE role = 'step' AND (visits < 1 OR q_value IS NULL)") == 0
    methods = dict(lake.query(config, "SELECT method, count(*) FROM pairs GROUP BY 1")[1])
    assert methods.get("mcts", 0) > 0 and methods == first["pairs_by_method"]
    # Error injection: every hard negative is an injected node the verifier failed, paired with its source.
    assert count(config, """SELECT count(*) FROM pairs p JOIN nodes n ON n.node_id = p.rejected_node_id
                             WHERE p.method = 'error_injection' AND (n.role <> 'injected' OR n.verdict = 'correct'
                                   OR p.edit_distance < 1)""") == 0
    assert roles.get("injected", 0) == methods.get("error_injection", 0)
    # The jury, 3 judges × 2 orders: on 2 principle examples, one verifiable pair and one canary per shard with pairs.
    assert count(config, "SELECT count(*) FROM principle_examples WHERE label IS NOT NULL") == 2
    kinds = dict(lake.query(config, "SELECT kind, count(*) FROM judgements GROUP BY 1")[1])
    judged = count(config, "SELECT count(*) FROM pairs WHERE jury_label IS NOT NULL")
    assert judged >= 1 and kinds == {"principle": 2 * 6, "verifiable": judged * 6, "canary": (1 + judged) * 6}
    assert count(config, "SELECT count(*) FROM principle_pairs") == count(
        config, "SELECT count(*) FROM principle_examples WHERE label = 'stable' AND jury_winner = 'response'")
    (agreement,) = lake.query(config, "SELECT agreement FROM runs WHERE run_id = 'it-1'")[1][0]
    assert set(json.loads(agreement)["judges"]) == {"direct", "violations", "reader"}
    assert set(first["jury"]["judges"]) == {"direct", "violations", "reader"}
    assert count(config, "SELECT count(*) FROM pairs WHERE contrast IS NULL") == 0
    assert count(config, "SELECT count(*) FROM trees") == 10
    assert count(config, "SELECT count(*) FROM sft_examples") == count(
        config, "SELECT count(*) FROM nodes WHERE verdict = 'correct'")

    assert count(config, "SELECT count(*) FROM nodes") == first["nodes"]
    assert count(config, "SELECT count(*) FROM pairs") == first["pairs"]
    assert count(config, "SELECT count(*) FROM dpo_pairs") == first["pairs"]
    (runs_row,) = lake.query(config, "SELECT snapshot_id, flow_run_id, status FROM runs WHERE run_id = 'it-1'")[1]
    assert runs_row[0] == first["snapshot_id"] and runs_row[1] and runs_row[2] == "complete"
    assert count(config, "SELECT count(*) FROM validations WHERE NOT success") == 0

    # The hygiene gate: every seed that was read is grown or dropped, with its reason, and HumanEval/0 is flagged.
    before = dict(((stage, reason), n) for stage, reason, n in lake.query(
        config, 'SELECT stage, reason, "count" FROM drops WHERE shard_id IS NULL')[1])
    assert before == {("seeds", "duplicate instruction id (seeds[2] arithmetic)"): 8,
                      ("seeds", "beyond count (seeds[1] open_ended)"): 22,
                      ("seeds", "beyond count (seeds[3] humaneval)"): 163,
                      ("decontamination", "contaminated: humaneval"): 1}
    read = sum(source["read"] for source in first["seeds"])
    assert read == count(config, "SELECT count(*) FROM instructions") + sum(before.values())
    assert lake.query(config, "SELECT eval_set, eval_item_id, coverage FROM contamination")[1] == [
        ("humaneval", "HumanEval/0", 1.0)]
    assert first["contaminated"] == {"instructions": 1, "by_eval_set": {"humaneval": 1}}
    # Every shard-level drop names its shard and says why; the summary lists them by stage.
    assert count(config, "SELECT count(*) FROM drops WHERE shard_id IS NOT NULL AND (reason IS NULL OR \"count\" < 1)") == 0
    assert {r["stage"] for r in first["dropped"]["reasons"]} >= {"seeds", "decontamination"}

    again = run(config, "it-1")
    assert again["shards_reused"] == 3 and again["completion_tokens"] == 0
    assert count(config, "SELECT count(*) FROM drops WHERE shard_id IS NULL") == len(before)  # replaced, not added
    assert count(config, "SELECT count(*) FROM contamination") == 1
    assert again["snapshot_id"] == first["snapshot_id"] + 1
    assert count(config, "SELECT count(*) FROM nodes") == first["nodes"]
    assert count(config, "SELECT count(DISTINCT node_id) FROM nodes") == first["nodes"]
    assert count(config, "SELECT count(*) FROM runs") == 1
    assert lake.query(config, "SELECT count(*) FROM nodes", version=first["snapshot_id"])[1][0][0] == first["nodes"]


def test_run_report_is_in_prefect(real_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    summary = real_run.summary

    async def artifacts():
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="orchard-run-it-1"))
            )
            return {a.key: a for a in found}

    found = asyncio.run(artifacts())
    assert {"orchard-run-it-1", "orchard-run-it-1-report"} <= set(found)
    report = found["orchard-run-it-1-report"].data
    assert f"| {summary['pairs']} |" in report
    assert "## Pairs by method" in report and set(summary["curation"]) == set(summary["pairs_by_method"])
    assert "## Judge agreement" in report and "Fleiss' κ" in report
    for judge in ("direct", "violations", "reader"):
        assert f"| {judge} | " in report
    for method, stats in summary["curation"].items():
        assert f"| {method} | {stats['pairs']} |" in report


def test_sql_command_answers_from_the_lake(real_run, tmp_path, capsys):
    config, summary = real_run
    path = tmp_path / "orchard.toml"
    engine = config.engines["embedded"]
    path.write_text(
        store_toml(config) + f"""[engines.embedded]
kind = "openai"
model = "{engine.model}"
base_urls = ["{engine.base_urls[0]}"]
"""
    )
    assert orchard_main(["--config", str(path), "sql", "SELECT count(*) AS n FROM nodes"]) == 0
    assert f"\n{summary['nodes']}" in capsys.readouterr().out
    assert orchard_main(["--config", str(path), "sql", "--version", "999", "SELECT 1"]) == 2
    assert "999" in capsys.readouterr().err


def test_the_view_of_the_real_run_shows_its_trees_pairs_and_a_nodes_feedback(real_run):
    """The run's view (tasks/view.py), built by the flow, opened from disk in headless Chromium: what a person sees
    against the lake. Screenshots go to view-screenshots/."""
    from selenium.webdriver.common.by import By

    from test_view import chromium, screenshot, wait_ready

    config, summary = real_run
    index = Path(summary["view"])
    assert index == config.state_path / "views" / REAL_RUN_ID / "index.html" and index.is_file()
    trees = {row[0] for row in lake.query(config, f"SELECT tree_id FROM trees WHERE run_id = '{REAL_RUN_ID}'")[1]}
    contaminated = {row[0] for row in lake.query(config, "SELECT instruction_id FROM contamination")[1]}
    # The tree with the most pairs among those with a wrong answer the verifier explained, and that answer.
    (tree, nodes, pairs, wrong, detail), = lake.query(config, f"""
        SELECT t.tree_id, (SELECT count(*) FROM nodes n WHERE n.tree_id = t.tree_id),
               (SELECT count(*) FROM pairs p WHERE p.tree_id = t.tree_id) AS pairs,
               arg_min(w.node_id, w.node_id), arg_min(w.verifier_detail, w.node_id)
        FROM trees t JOIN nodes w ON w.tree_id = t.tree_id AND w.verdict = 'incorrect' AND w.verifier_detail <> ''
        WHERE t.run_id = '{REAL_RUN_ID}' GROUP BY t.tree_id ORDER BY pairs DESC, t.tree_id LIMIT 1""")[1]
    assert pairs > 0
    with chromium() as browser:
        browser.get(index.as_uri())
        wait_ready(browser, "run")
        rows = browser.find_elements(By.CSS_SELECTOR, "#trees tbody tr")
        assert {r.get_attribute("data-tree") for r in rows} - {""} == trees
        not_grown = [r.text for r in rows if not r.get_attribute("data-tree")]
        assert {i for i in contaminated if any(i in text and "contaminated" in text for text in not_grown)} == contaminated
        assert f"Orchard run {REAL_RUN_ID} — complete" in browser.find_element(By.ID, "title").text
        screenshot(browser, "real-run-page")
        browser.find_element(By.CSS_SELECTOR, f'#trees tr[data-tree="{tree}"] a').click()
        wait_ready(browser, "tree")
        assert len(browser.find_elements(By.CSS_SELECTOR, "svg .node")) == nodes
        assert len(browser.find_elements(By.CSS_SELECTOR, "svg .pair-arc")) == pairs
        assert len(browser.find_elements(By.CSS_SELECTOR, "#pairs tbody tr[data-pair]")) == pairs
        browser.find_element(By.CSS_SELECTOR, f'svg .node[data-node="{wrong}"] > :first-child').click()
        shown = browser.find_element(By.CSS_SELECTOR, '#details [data-field="verifier detail"]').text
        assert " ".join(shown.split()) == " ".join(detail.split())
        screenshot(browser, "real-run-tree")


@pytest.mark.train
def test_the_exports_of_a_real_run_train_with_trl(tmp_path, real_run):
    if not TRAIN_PYTHON.exists() or not (llama_build.train_model() / "model.safetensors").is_file():
        pytest.fail("the train venv or the safetensors model is missing: run `make train-check`")
    config, summary = real_run  # every format has rows: see REAL_SEEDS above
    assert summary["status"] == "complete", summary["problems"]

    exports = tmp_path / "exports"
    for fmt in (*TRAINED.values(), "trl-stepwise"):
        export_dataset(config, fmt, exports / fmt, test_share=0.0)
    report = tmp_path / "trained.json"
    done = subprocess.run([str(TRAIN_PYTHON), str(ROOT / "tests" / "train_check.py"), "train",
                           str(llama_build.train_model()), str(exports), str(report)],
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-4000:]
    trained = json.loads(report.read_text())

    assert trained["versions"]["trl"] == "1.16.0"
    for trainer, fmt in TRAINED.items():
        result = trained[trainer]
        assert result["format"] == fmt and result["steps"] == 2, (trainer, result)
        assert result["finite"] and math.isfinite(result["loss"]), (trainer, result)
        # Every exported row is one the trainer could read: none left out as malformed (or too long).
        assert result["rows_kept"] == result["rows"] > 0, (trainer, result)
        assert FORMATS[fmt].checked_with.startswith(f"TRL {trained['versions']['trl']} `{trainer}`")
    stepwise = trained["stepwise"]
    assert stepwise["rows"] == stepwise["checked"] > 0 and stepwise["misaligned"] == 0
