"""Small builders shared by the tests: a scripted engine and instruction/plan factories."""

from __future__ import annotations

from typing import Callable, Sequence

from orchard.engine import Completion, Sampling, Usage
from tasks.seeds import Instruction, ShardPlan, instruction_id


def instruction(text: str = "Compute 2 × 3.", reference: str = "6", difficulty: int = 1, domain: str = "math") -> Instruction:
    return Instruction(instruction_id(domain, text, reference), domain, "test", 1, text, reference, difficulty)


def plan(*instructions: Instruction, shard_id: str = "shard-test") -> ShardPlan:
    return ShardPlan(shard_id=shard_id, index=0, instructions=tuple(instructions) or (instruction(),))


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

    async def chat(self, messages: Sequence[dict], sampling: Sampling, n: int = 1) -> list[Completion]:
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

    async def continue_chat(self, messages: Sequence[dict], prefix: str, sampling: Sampling, n: int = 1) -> list[Completion]:
        self.calls.append((list(messages), sampling))
        self.usage.requests += 1
        completions = []
        for k in range(n):
            seed = None if sampling.seed is None else sampling.seed + k
            text, finish = self.step(messages, prefix, Sampling(sampling.temperature, sampling.top_p, sampling.max_tokens, seed))
            completions.append(Completion(text, finish, self.model, prompt_tokens=20 + len(prefix.split()),
                                          completion_tokens=len(text.split()), seed=seed))
        return completions


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
