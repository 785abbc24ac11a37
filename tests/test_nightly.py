"""The nightly flow end to end on real parts: llama.cpp server, SeaweedFS, Prefect test harness, GX, DuckLake."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest

from builders import SMALL_RUN, ArithmeticScript, ScriptedEngine, ScriptedServer, check_math, store_toml
from flows.cli import main as orchard_main
from orchard import lake
from orchard.config import Config, EngineConfig, SeedSource
from orchard.store import ObjectStore
from tasks.grow import grow_shard
from tasks.land import land_shard, landed_manifest, quarantine_prefix
from tasks.seed_files import SeedError
from tasks.seeds import plan_seeds

pytestmark = pytest.mark.integration

# The tests of failure paths run on a scripted model over HTTP (the real model's runs are in `real_run`): no search,
# no jury, so that every request is a strategy, a critique or a refinement whose answer the script knows.
SCRIPTED_RUN = dataclasses.replace(SMALL_RUN, mcts_iterations=0, jury_pairs=0, jury_canaries=0)


class Scripted(NamedTuple):
    """The module's scripted model: what it answers, and the URL that serves it."""

    script: ArithmeticScript
    url: str


@pytest.fixture(scope="module")
def scripted() -> Iterator[Scripted]:
    """A scripted model server that knows the answers of the questions a test has its script learn."""
    script = ArithmeticScript()
    with ScriptedServer(ScriptedEngine(script.answer)) as server:
        yield Scripted(script, server.url)


@pytest.fixture
def config(tmp_path, store, scripted, prefect_api) -> Config:
    engine = EngineConfig(kind="openai", model="scripted", base_urls=(scripted.url,), retries=1, backoff_s=0.1,
                          structured_output="none")
    config = Config(
        state_dir=str(tmp_path / "state"),
        run=SCRIPTED_RUN,
        seeds=(SeedSource(kind="arithmetic", count=4, difficulty=1, seed=11),),
        engines={"embedded": engine},
        object_store=store.cfg,
    )
    scripted.script.learn(config.seeds)
    return config


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


class _GarbageForPoison(BaseHTTPRequestHandler):
    """Forwards to the model server, but answers garbage to any prompt that mentions POISON."""

    upstream = ""

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if b"POISON" in body:
            status, payload = 200, b'{"choices": "nope"'
        else:
            answer = httpx.post(self.upstream + self.path, content=body, headers={"Content-Type": "application/json"},
                                timeout=120)
            status, payload = answer.status_code, answer.content
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_garbage_from_the_model_fails_one_shard_and_the_others_publish(config, scripted, tmp_path):
    handler = type("Proxy", (_GarbageForPoison,), {"upstream": config.engines["embedded"].base_urls[0]})
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    seeds = tmp_path / "gsm8k.jsonl"
    questions = ["What is 2 + 2?", "What is 3 + 3?", "What is POISON 4 + 4?", "What is 5 + 5?"]
    seeds.write_text("\n".join(json.dumps({"question": q, "answer": f"#### {eval(q[8:-1].replace('POISON', ''))}"})
                               for q in questions))
    engine = dataclasses.replace(config.engines["embedded"], base_urls=(f"http://127.0.0.1:{proxy.server_address[1]}",))
    broken = config.replace(engines={"embedded": engine}, seeds=(SeedSource(kind="gsm8k", path=str(seeds), count=0),))
    scripted.script.learn(broken.seeds)
    try:
        summary = run(broken, "it-garbage")
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert summary["status"] == "partial"
    assert (summary["shards_failed"], summary["shards_published"]) == (1, 1)
    assert any("gave up after 2 attempts: unusable answer" in p for p in summary["problems"])
    texts = {r[0] for r in lake.query(broken, "SELECT text FROM instructions WHERE run_id = 'it-garbage'")[1]}
    assert texts == {"What is 2 + 2?", "What is 3 + 3?"}


def test_shard_violating_a_suite_is_quarantined_and_not_published(config, store, scripted):
    plans = plan_seeds(config, "planned").plans
    bad_plan = plans[0]
    engine = ScriptedEngine(scripted.script.answer)
    grown = asyncio.run(grow_shard(bad_plan, run_id="it-bad", run=config.run, check=check_math,
                                   engines={"generator": engine, "critic": engine, "refiner": engine}))
    assert grown.pairs
    grown.pairs[0]["chosen_text"] = ""  # the injected violation: an empty chosen response
    land_shard(store, "it-bad", bad_plan.shard_id, grown.tables(), config_hash=config.content_hash(), stats=grown.stats)

    summary = run(config, "it-bad")
    assert summary["status"] == "partial" and summary["shards_quarantined"] == 1
    assert any(bad_plan.shard_id in p and "chosen_text" in p for p in summary["problems"])
    assert landed_manifest(store, "it-bad", bad_plan.shard_id) is None
    assert store.exists(f"{quarantine_prefix('it-bad', bad_plan.shard_id)}validation.json")
    published = {r[0] for r in lake.query(config, "SELECT DISTINCT shard_id FROM nodes WHERE run_id = 'it-bad'")[1]}
    assert published == {plans[1].shard_id}
    failed = lake.query(config, "SELECT shard_id FROM validations WHERE run_id = 'it-bad' AND NOT success")[1]
    assert {r[0] for r in failed} == {bad_plan.shard_id}


def test_malformed_seed_file_names_the_line_and_publishes_nothing(config, store, tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"question": "What is 1+1?", "answer": "#### 2"}\n{"question": "What is 2+2?"}\n')
    broken = config.replace(seeds=(SeedSource(kind="gsm8k", path=str(seeds)),))
    with pytest.raises(SeedError, match=r"seeds\.jsonl: line 2: field 'answer' is missing"):
        run(broken, "it-bad-seeds")
    assert store.list_keys("") == []
    assert not Path(broken.lake_catalog).exists()


def test_a_user_error_in_a_run_is_one_line_on_the_console_and_its_traceback_is_in_the_log(config, tmp_path, capfd):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"question": "What is 1+1?", "answer": "#### 2"}\n{"question": "What is 2+2?"}\n')
    path = tmp_path / "orchard.toml"
    path.write_text(store_toml(config) + f'[[seeds]]\nkind = "gsm8k"\npath = "{seeds}"\n')
    assert orchard_main(["--config", str(path), "run", "--run-id", "it-cli-error"]) == 1
    err = capfd.readouterr().err
    assert "Traceback" not in err
    (line,) = [said for said in err.splitlines() if said.startswith("orchard:")]
    assert "seeds.jsonl: line 2: field 'answer' is missing" in line and "orchard.log" in line
    log = (Path(config.state_dir) / "logs" / "orchard.log").read_text()
    assert "Traceback" in log and "SeedError" in log


def test_a_run_does_not_grow_again_what_an_earlier_run_published_and_says_so(config):
    """Dedup against the lake: a second run id with the same seeds plans nothing and publishes why; a run with one
    new seed grows only that one; a re-run of the first run id plans as it did (later runs do not count)."""
    config = config.replace(seeds=(SeedSource(kind="arithmetic", count=2, difficulty=1, seed=11),))
    first = run(config, "it-a")
    assert first["status"] == "complete" and first["trees"] == 2

    from flows.nightly import nightly

    state = nightly(config=config.to_dict(), run_id="it-b", return_state=True)
    assert state.is_failed() and "nothing to grow" in state.message
    (row,) = lake.query(config, "SELECT status, shards_planned, summary FROM runs WHERE run_id = 'it-b'")[1]
    assert row[:2] == ("failed", 0)
    second = json.loads(row[2])
    reason = "exact duplicate (normalized text) of an instruction run it-a published"
    assert second["drops_before_growth"] == {"dedup": {reason: 2}}
    assert any("nothing to grow: the hygiene gate dropped all 2 instructions" in p for p in second["problems"])
    assert lake.query(config, "SELECT stage, reason, \"count\" FROM drops WHERE run_id = 'it-b'")[1] == [
        ("dedup", reason, 2)]

    more = config.replace(seeds=(SeedSource(kind="arithmetic", count=3, difficulty=1, seed=11),))
    third = run(more, "it-c")
    assert third["status"] == "complete" and third["trees"] == 1

    again = run(config, "it-a")  # it-a first published before it-b and it-c: it still plans both of its seeds
    assert again["status"] == "complete" and again["shards_reused"] == 1 and again["completion_tokens"] == 0
