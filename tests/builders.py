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

    def __init__(self, answer: Callable[[Sequence[dict], Sampling], str], model: str = "scripted") -> None:
        self.answer = answer
        self.model = model
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
                                          completion_tokens=len(text.split()), seed=seed))
        return completions
