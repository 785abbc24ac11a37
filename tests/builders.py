"""Small builders shared by the tests: a scripted engine (in process or over HTTP) and instruction/plan factories."""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Sequence

from orchard.config import OrchestrationConfig, RunConfig
from orchard.engine import Completion, Sampling, Usage
from schemas.fates import ShardFate
from schemas.plan import Instruction, ShardPlan, SourceCount, instruction_id
from schemas.run import RunSummary
from tasks.verify import Verdict, check_math_answer

# A small run with every part of a tree: strategies, critique-refine turns, MCTS (steps, rollouts, self-evaluations),
# principles for open-ended prompts, the jury on a verifiable pair and a canary per shard.
# Where a test's run grows in this process against a scripted model: a shard that failed transiently (the store or
# the model misbehaving) is dispatched again after 1 s, not after 10 and 30 s (the tests check that it is, and how the
# run ends, not how long a server gets to recover); one verification and one validation process, since a scripted
# model answers at once and a run would wait on more of them starting.
QUICK_RETRIES = OrchestrationConfig(verify_workers=1, dispatch_retry_delays_s=(1.0, 1.0))

# The compute threads of the llama.cpp servers the tests start themselves (the session's, the fault lab's). Under
# `make test`'s two pytest-xdist workers (tests/conftest.py) they get their lane's share of the cores, as `orchard up`
# gives each of its servers its share: a server of 2 threads on 2 cores decodes many times slower whenever anything
# else is running (16 requests of 128 tokens: 78 tokens/s alone; beside one busy process, 17 when that process is
# scheduled as idle, and not done in 90 s when it runs at nice 19; at 1 thread, 74 alone and 70 beside one at nice 5).
# 0: the default.
MODEL_THREADS = max(1, (os.cpu_count() or 1) // 2) if os.environ.get("PYTEST_XDIST_WORKER") else 0

SMALL_RUN = RunConfig(
    instructions_per_shard=2,
    strategies=("step_by_step", "plan_first", "work_backwards"),
    samples_per_strategy=2,
    max_tokens=64,
    turns=2,
    refine_per_tree=1,
    refine_samples=2,
    critique_max_tokens=48,
    mcts_iterations=2,
    mcts_step_tokens=24,
    principles_per_prompt=1,  # open-ended prompts (where a test adds them): one principle each
    principle_max_tokens=48,
    judge_max_tokens=80,
    jury_pairs=1,  # per shard: one verifiable pair and one canary for the jury, besides any principle examples
    jury_canaries=1,
)


def instruction(text: str = "Compute 2 × 3.", reference: str = "6", difficulty: int = 1, domain: str = "math") -> Instruction:
    return Instruction(instruction_id(domain, text, reference), domain, "test", 1, text, reference, difficulty)


def run_summary(fates: Sequence[ShardFate], *, seeds: Sequence[SourceCount] = (), **values) -> RunSummary:
    """A run summary of `fates` (one planned shard each) with nothing grown, but for `values`."""
    return RunSummary(**{
        "run_id": "r", "flow_run_id": None, "config_hash": "cfg", "started_at": "2026-01-01T00:00:00+00:00",
        "shards_planned": len(fates), "fates": tuple(fates), "nothing_planned": None, "trees": 0, "nodes": 0,
        "pairs": 0, "pairs_by_method": {}, "pass_rate": None, "prompt_tokens": 0, "completion_tokens": 0,
        "wall_s": 0.0, "tokens_per_s": None, "prefix_cache": {}, "gpu_hours": None, "cost_usd": None,
        "priced": False, "requests": {}, "prefix_cache_by_shard": {}, "trees_unanswered": 0, "seeds": tuple(seeds),
        "prm_min_rollouts": 1, "drops_before_growth": {}, "contaminated": {}, **values})


def plan(*instructions: Instruction, shard_id: str = "shard-test") -> ShardPlan:
    return ShardPlan(shard_id=shard_id, index=0, instructions=tuple(instructions) or (instruction(),))


async def check_math(items: Sequence[tuple[Instruction, str]]) -> list[Verdict]:
    """Verify (instruction, answer) items of math prompts with math-verify, in this thread: a checker for growth."""
    return [check_math_answer(text, instruction.reference) for instruction, text in items]


class ScriptedEngine:
    """An engine whose answer is a function of (messages, sampling): pins tree logic without a model.

    Like a server that honours `n`, it answers all siblings of a request at once; sibling k is sampled
    with seed + k, so answers can differ between siblings.
    """

    def __init__(self, answer: Callable[[Sequence[dict], Sampling], str], model: str = "scripted", *,
                 step: Callable[[Sequence[dict], str, Sampling], tuple[str, str]] | None = None,
                 judge: Callable[[Sequence[dict]], dict[str, float] | None] | None = None) -> None:
        """`step(messages, prefix, sampling)` returns (continuation, finish_reason) for MCTS steps (default: the
        whole answer, finished); `judge(messages)` returns a request's first-token logprobs (default: none)."""
        self.answer = answer
        self.step = step or (lambda messages, prefix, sampling: (answer(messages, sampling), "stop"))
        self.judge = judge or (lambda messages: None)
        self.model = model
        self.response_format = "none"  # judges' verdicts are asked for in the prompt and checked, like any server
        self.usage = Usage()
        self.calls: list[tuple[list[dict], Sampling]] = []

    async def chat(self, messages: Sequence[dict], sampling: Sampling, n: int = 1, *, priority: int = 0) -> list[Completion]:
        self.calls.append((list(messages), sampling))
        self.usage.requests += 1
        completions = []
        for k in range(n):
            seed = None if sampling.seed is None else sampling.seed + k
            text = self.answer(messages, Sampling(sampling.temperature, sampling.top_p, sampling.max_tokens, seed))
            completions.append(Completion(text, "stop", self.model, prompt_tokens=20,
                                          completion_tokens=len(text.split()), seed=seed,
                                          top_logprobs=self.judge(messages) if sampling.top_logprobs else None))
        return completions

    async def continue_chat(self, messages: Sequence[dict], prefix: str, sampling: Sampling, n: int = 1, *,
                            priority: int = 0) -> list[Completion]:
        self.calls.append((list(messages), sampling))
        self.usage.requests += 1
        completions = []
        for k in range(n):
            seed = None if sampling.seed is None else sampling.seed + k
            text, finish = self.step(messages, prefix, Sampling(sampling.temperature, sampling.top_p, sampling.max_tokens, seed))
            completions.append(Completion(text, finish, self.model, prompt_tokens=20 + len(prefix.split()),
                                          completion_tokens=len(text.split()), seed=seed))
        return completions


class ArithmeticScript:
    """A scripted model's answers to the questions it has learnt (text -> reference): right on even sample seeds, off
    by one on odd ones, so trees have pairs; critiques get a fixed reply. Serve it with
    `ScriptedServer(ScriptedEngine(script.answer))`; an unknown question gets an answer no verifier accepts."""

    def __init__(self) -> None:
        self.references: dict[str, str] = {}

    def learn(self, sources) -> "ArithmeticScript":
        """Learn the questions and references of every seed that seed `sources` read; return the script."""
        from tasks.seeds import load_seeds

        self.references.update((i.text, i.reference) for i in load_seeds(sources))
        return self

    def answer(self, messages: Sequence[dict], sampling: Sampling) -> str:
        if messages[0]["content"].startswith("You review"):
            return "Recompute it."
        reference = self.references.get(messages[1]["content"] if len(messages) > 1 else "")
        if reference is None:
            return "I cannot tell."
        return f"Answer: {reference}" if (sampling.seed or 0) % 2 == 0 else f"Answer: {int(reference) + 1}"


def store_toml(config) -> str:
    """The TOML of `config`'s state directory and object store: a config file for the CLI that reaches the test's lake."""
    store = config.object_store
    return f"""state_dir = "{config.state_dir}"
[object_store]
endpoint_url = "{store.endpoint_url}"
bucket = "{store.bucket}"
access_key_id = "{store.access_key_id}"
secret_access_key = "{store.secret_access_key}"
"""


class ScriptedServer:
    """An OpenAI-compatible HTTP front for a `ScriptedEngine` on 127.0.0.1: a whole flow runs on scripted answers.

    Chat requests go to `engine.answer`; raw completions (MCTS steps) to `engine.step([], prompt, sampling)`, the
    prompt being the whole rendered chat. `n` is honoured like vLLM does (sibling k gets seed + k). Use it as a
    context manager; `url` is the base URL to put in an engine config.
    """

    def __init__(self, engine: ScriptedEngine) -> None:
        def choices(body: dict) -> list[dict]:
            found = []
            for k in range(int(body.get("n", 1))):
                seed = None if body.get("seed") is None else body["seed"] + k
                sampling = Sampling(body.get("temperature", 0.8), body.get("top_p", 0.95), body.get("max_tokens", 128),
                                    seed)
                engine.calls.append((list(body.get("messages", [])), sampling))
                if "messages" in body:
                    text = engine.answer(body["messages"], sampling)
                    found.append({"index": k, "message": {"role": "assistant", "content": text},
                                  "finish_reason": "stop"})
                else:
                    text, finish = engine.step([], body["prompt"], sampling)
                    found.append({"index": k, "text": text, "finish_reason": finish})
            engine.usage.requests += 1
            return found

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                found = choices(body)
                words = sum(len((c.get("text") or c.get("message", {}).get("content", "")).split()) for c in found)
                payload = json.dumps({"model": engine.model, "choices": found,
                                      "usage": {"prompt_tokens": 20, "completion_tokens": words}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "ScriptedServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def put_shard(config, run_id: str, shard_id: str, rows: dict[str, list[dict]], stats: dict) -> dict:
    """Write a shard's tables (`rows` by table name) to the config's bucket as tasks/land.py lays them out, without
    a manifest object; return the manifest it would have (config hash `cfg123`)."""
    import hashlib
    import io

    import pyarrow.parquet as pq

    from orchard.store import s3_client
    from schemas.rows import table

    client, files = s3_client(config.object_store), {}
    for name, shard_rows in rows.items():
        buffer = io.BytesIO()
        pq.write_table(table(name, shard_rows), buffer)
        body = buffer.getvalue()
        key = f"runs/{run_id}/shards/{shard_id}/{name}.parquet"
        client.put_object(Bucket=config.object_store.bucket, Key=key, Body=body)
        files[name] = {"key": key, "rows": len(shard_rows), "bytes": len(body),
                       "sha256": hashlib.sha256(body).hexdigest()}
    return {"run_id": run_id, "shard_id": shard_id, "config_hash": "cfg123", "files": files, "stats": stats,
            "landed_at": "2026-01-01T00:00:00+00:00"}
