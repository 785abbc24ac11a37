"""The simulated GPU engine of bench/gpu_sim.py answers every request shape Orchard sends as Orchard reads it.

Fast tier (`make check`): the engine runs on a thread of this process; no SeaweedFS, model server or Prefect.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path

import httpx
import pytest

from orchard.config import EngineConfig
from orchard.engine import EngineClient, Sampling
from tasks.jury import VERDICT_SCHEMA, parse_verdict

_SPEC = importlib.util.spec_from_file_location("gpu_sim", Path(__file__).resolve().parents[1] / "bench" / "gpu_sim.py")
gpu_sim = importlib.util.module_from_spec(_SPEC)
sys.modules["gpu_sim"] = gpu_sim
_SPEC.loader.exec_module(gpu_sim)

SMALL = gpu_sim.SimSettings(slots=4, prefill_s=0.0, per_token_s=0.001, median_tokens=12)
TASK = "Tom has 3 boxes of 4 apples. How many apples does he have?"
ACTION = [{"role": "system", "content": "Solve it. End with a last line of the form 'Answer: <number>'."},
          {"role": "user", "content": TASK}]


@pytest.fixture(scope="module")
def sim_url() -> str:
    with gpu_sim.sim_in_thread(SMALL, references={TASK: "12"}) as url:
        yield url


def engine(url: str, concurrency: int = 4) -> EngineConfig:
    return EngineConfig(kind="openai", model="sim", base_urls=(url,), max_concurrency=concurrency,
                        structured_output="json_schema", retries=0)


def ask(url: str, call, concurrency: int = 4):
    async def run():
        async with EngineClient(engine(url, concurrency)) as client:
            return await call(client)

    return asyncio.run(run())


def test_n_choices_come_back_with_usage_and_an_answer_line(sim_url: str) -> None:
    got = ask(sim_url, lambda c: c.chat(ACTION, Sampling(max_tokens=200, seed=5), n=3))
    assert len(got) == 3
    assert all(c.text.splitlines()[-1].startswith("Answer: ") for c in got if c.finish_reason == "stop")
    assert all(c.prompt_tokens > 0 and c.completion_tokens > 0 for c in got)


def test_same_seed_gives_the_same_text(sim_url: str) -> None:
    first = ask(sim_url, lambda c: c.chat(ACTION, Sampling(seed=11), n=2))
    again = ask(sim_url, lambda c: c.chat(ACTION, Sampling(seed=11), n=2))
    other = ask(sim_url, lambda c: c.chat(ACTION, Sampling(seed=12), n=2))
    assert [c.text for c in first] == [c.text for c in again]
    assert [c.text for c in first] != [c.text for c in other]


def test_a_judge_answers_a_verdict_that_parses(sim_url: str) -> None:
    judge = [{"role": "user", "content": "Which response is better, A or B?"}]
    got = ask(sim_url, lambda c: c.chat(judge, Sampling(temperature=0.0, max_tokens=96, seed=3,
                                                        json_schema=VERDICT_SCHEMA), n=1))
    verdict = parse_verdict(got[0].text, got[0].finish_reason)
    assert verdict.status == "ok" and verdict.winner in ("A", "B", "tie")


def test_a_completion_continues_and_stops_at_max_tokens(sim_url: str) -> None:
    finishes = set()
    for seed in range(12):
        got = ask(sim_url, lambda c: c.continue_chat(ACTION, "First we add", Sampling(max_tokens=10, seed=seed), n=2))
        assert len(got) == 2 and all(c.text for c in got)
        finishes |= {c.finish_reason for c in got}
        assert all(c.completion_tokens <= 10 for c in got)
    assert finishes == {"length", "stop"}


def test_a_self_evaluation_carries_yes_and_no(sim_url: str) -> None:
    check = [{"role": "user", "content": "Is this partial answer on track? Reply Yes or No."}]
    chat = ask(sim_url, lambda c: c.chat(check, Sampling(max_tokens=1, seed=4, top_logprobs=10)))
    raw = ask(sim_url, lambda c: c.complete("Is it right? ", Sampling(max_tokens=1, seed=4, top_logprobs=10)))
    for completion in (chat[0], raw[0]):
        assert {"Yes", "No"} <= set(completion.top_logprobs)
        assert completion.text in ("Yes", "No")


def test_models_route_and_the_request_log(sim_url: str) -> None:
    assert httpx.get(f"{sim_url}/v1/models").json()["data"][0]["id"] == "sim"
    httpx.post(f"{sim_url}/sim/reset")
    ask(sim_url, lambda c: c.chat(ACTION, Sampling(seed=1), n=2))
    stats = httpx.get(f"{sim_url}/sim/stats").json()
    assert stats["requests"] == 1 and stats["sequences"] == 2
    assert json.loads(json.dumps(stats["bodies"][0]["body"]))["n"] == 2
    assert 0 < stats["occupancy"] <= 1


def test_engine_client_keeps_one_connection_per_request_in_flight(sim_url: str) -> None:
    """More requests in flight than a small default pool keeps alive (httpx kept 20): none is closed and opened again."""
    concurrency = 32
    httpx.post(f"{sim_url}/sim/reset")

    async def many(client: EngineClient):
        return await asyncio.gather(*(client.chat(ACTION, Sampling(max_tokens=4, seed=s)) for s in range(8 * concurrency)))

    ask(sim_url, many, concurrency)
    stats = httpx.get(f"{sim_url}/sim/stats").json()
    assert stats["requests"] == 8 * concurrency
    assert stats["connections"] <= concurrency
