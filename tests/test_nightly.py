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

from builders import QUICK_RETRIES, SMALL_RUN, ArithmeticScript, ScriptedEngine, ScriptedServer, check_math, store_toml
from flows.cli import main as orchard_main
from orchard import lake
from orchard.config import Config, EngineConfig, SeedSource
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
        orchestration=QUICK_RETRIES,  # garbage from the model fails a shard transiently: dispatched again at once
    )
    scripted.script.learn(config.seeds)
    return config


def run(config: Config, run_id: str) -> dict:
    from flows.nightly import nightly

    return nightly(config=config.to_dict(), run_id=run_id)


def count(config: Config, sql: str) -> int:
    return lake.query(config, sql)[1][0][0]


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
