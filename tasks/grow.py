"""Grow the preference trees of one shard: every instruction answered under several planning strategies.

All requests of all trees of a shard are in flight together (bounded per endpoint by the engine client),
so the engine never waits on Orchard between trees.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from orchard.config import Config, RunConfig
from orchard.engine import ChatEngine, Completion, EngineClient, Sampling
from orchard.store import ObjectStore
from schemas import rows
from tasks.land import land_shard, landed_manifest, quarantined_manifest
from tasks.pairs import extract_pairs
from tasks.seeds import Instruction, ShardPlan
from tasks.verify import MathVerifier, Verdict

PROMPT_TEMPLATE_VERSION = "math-action/v1"

SYSTEM = "You are a careful math tutor. {strategy} End with a last line of the form 'Answer: <number>'."

# The planning styles an action is asked to use (UltraInteract: diverse strategies per instruction).
STRATEGIES: dict[str, str] = {
    "step_by_step": "Solve the problem step by step, one short line per step.",
    "plan_first": "First write a one-line plan, then carry it out.",
    "work_backwards": "Start from what is asked and work backwards to the given numbers.",
    "program": "Write the calculation as one arithmetic expression, then evaluate it.",
    "estimate_then_check": "Estimate the answer first, then compute it exactly and check it.",
}

Checker = Callable[[Sequence[tuple[str, str]]], list[Verdict]]


class GrowError(RuntimeError):
    """A shard could not be grown; the message says which request failed and why."""


@dataclass
class GrownShard:
    """What one shard's growth produced, as rows for the shard tables, plus its statistics."""

    instructions: list[dict] = field(default_factory=list)
    nodes: list[dict] = field(default_factory=list)
    pairs: list[dict] = field(default_factory=list)
    stats: dict = field(default_factory=dict)


def _id(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:16]


def action_messages(instruction: Instruction, strategy: str) -> list[dict[str, str]]:
    """Return the exact chat messages an action under `strategy` is generated from."""
    try:
        hint = STRATEGIES[strategy]
    except KeyError:
        raise GrowError(f"run.strategies: unknown strategy {strategy!r} (known: {', '.join(STRATEGIES)})") from None
    return [
        {"role": "system", "content": SYSTEM.format(strategy=hint)},
        {"role": "user", "content": instruction.text},
    ]


def sample_seed(base: int, tree_id: str, strategy: str, k: int) -> int:
    """Return a per-sample seed, so the same run id and config ask the engine the same questions."""
    return int(_id(base, tree_id, strategy, k), 16) % 2**31


async def grow_shard(
    plan: ShardPlan,
    *,
    run_id: str,
    run: RunConfig,
    engine: ChatEngine,
    check: Checker,
    progress: Callable[[int, int], None] | None = None,
) -> GrownShard:
    """Return the instructions, nodes and pairs of every tree of `plan`, each action verified by `check`.

    `progress(done, total)` is called as answers arrive (about every tenth of them).
    """
    for strategy in run.strategies:
        if strategy not in STRATEGIES:
            raise GrowError(f"run.strategies: unknown strategy {strategy!r} (known: {', '.join(STRATEGIES)})")
    started = time.monotonic()
    common = {"run_id": run_id, "shard_id": plan.shard_id}
    grown = GrownShard()
    requests = []  # (tree_id, instruction, strategy, k, messages, sampling)
    for instruction in plan.instructions:
        tree_id = _id(run_id, instruction.instruction_id)
        grown.instructions.append({**common, **instruction.as_row()})
        grown.nodes.append(
            {
                **common,
                "tree_id": tree_id,
                "node_id": _id(tree_id, "root"),
                "parent_id": None,
                "instruction_id": instruction.instruction_id,
                "depth": 0,
                "role": "instruction",
                "strategy": None,
                "prompt": [],
                "text": instruction.text,
                "verdict": None,
                "score": None,
                "verifier": None,
                "verifier_detail": None,
                "model": None,
                "temperature": None,
                "top_p": None,
                "max_tokens": None,
                "sample_seed": None,
                "prompt_template_version": None,
                "prompt_tokens": None,
                "completion_tokens": None,
                "finish_reason": None,
            }
        )
        for strategy in run.strategies:
            messages = action_messages(instruction, strategy)
            for k in range(run.samples_per_strategy):
                sampling = Sampling(
                    temperature=run.temperature,
                    top_p=run.top_p,
                    max_tokens=run.max_tokens,
                    seed=sample_seed(run.seed, tree_id, strategy, k),
                )
                requests.append((tree_id, instruction, strategy, k, messages, sampling))

    done, step = 0, max(1, len(requests) // 10)

    async def ask(messages: list[dict[str, str]], sampling: Sampling) -> Completion:
        nonlocal done
        (completion,) = await engine.chat(messages, sampling, n=1)
        done += 1
        if progress is not None and (done % step == 0 or done == len(requests)):
            progress(done, len(requests))
        return completion

    results = await asyncio.gather(*(ask(r[4], r[5]) for r in requests), return_exceptions=True)
    failures = [(r, e) for r, e in zip(requests, results) if isinstance(e, BaseException)]
    if failures:
        (tree_id, instruction, strategy, k, _, _), error = failures[0]
        raise GrowError(
            f"shard {plan.shard_id}: {len(failures)} of {len(requests)} requests failed; first: "
            f"instruction {instruction.instruction_id} strategy {strategy} sample {k}: {error}"
        )
    verdicts = check([(c.text, r[1].reference) for r, c in zip(requests, results)])

    for (tree_id, instruction, strategy, k, messages, sampling), completion, verdict in zip(requests, results, verdicts):
        grown.nodes.append(
            {
                **common,
                "tree_id": tree_id,
                "node_id": _id(tree_id, strategy, k),
                "parent_id": _id(tree_id, "root"),
                "instruction_id": instruction.instruction_id,
                "depth": 1,
                "role": "action",
                "strategy": strategy,
                "prompt": messages,
                "text": completion.text,
                "verdict": verdict.verdict,
                "score": verdict.score,
                "verifier": verdict.verifier,
                "verifier_detail": verdict.detail,
                "model": completion.model,
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "max_tokens": sampling.max_tokens,
                "sample_seed": sampling.seed,
                "prompt_template_version": PROMPT_TEMPLATE_VERSION,
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
                "finish_reason": completion.finish_reason,
            }
        )

    by_id = {i.instruction_id: i for i in plan.instructions}
    grown.pairs = extract_pairs(grown.nodes, by_id)
    actions = [n for n in grown.nodes if n["role"] == "action"]
    wall_s = time.monotonic() - started
    grown.stats = {
        "trees": len(plan.instructions),
        "nodes": len(grown.nodes),
        "actions": len(actions),
        "correct": sum(n["verdict"] == "correct" for n in actions),
        "pairs": len(grown.pairs),
        "grow_wall_s": round(wall_s, 3),
        "engine": engine.usage.as_dict(),
    }
    return grown


# --- Prefect task: one per shard --------------------------------------------------------------


@task(name="grow-shard", cache_policy=NO_CACHE, retries=0)
def grow_shard_task(config: dict, run_id: str, plan: ShardPlan) -> dict:
    """Grow, verify and land one shard, unless its manifest says it already landed; return its receipt."""
    cfg = Config.from_dict(config)
    store = ObjectStore(cfg.object_store)
    logger = get_run_logger()
    for state, manifest in (
        ("reused", landed_manifest(store, run_id, plan.shard_id)),
        ("quarantined", quarantined_manifest(store, run_id, plan.shard_id)),
    ):
        if manifest is not None and manifest.get("config_hash") == cfg.content_hash():
            logger.info("shard %s already %s; not grown again", plan.shard_id, "landed" if state == "reused" else state)
            return {"shard_id": plan.shard_id, "state": state, "manifest": manifest, "stats": manifest["stats"]}

    async def grow() -> GrownShard:
        async with EngineClient(cfg.engine_for("generator")) as engine:
            return await grow_shard(plan, run_id=run_id, run=cfg.run, engine=engine, check=verifier.check,
                                    progress=lambda done, total: logger.info(
                                        "shard %s: %d/%d actions answered", plan.shard_id, done, total))

    with MathVerifier(cfg.run.verify_workers) as verifier:
        grown = asyncio.run(grow())
    tables = {
        "instructions": rows.table("instructions", grown.instructions),
        "nodes": rows.table("nodes", grown.nodes),
        "pairs": rows.table("pairs", grown.pairs),
    }
    manifest = land_shard(store, run_id, plan.shard_id, tables, config_hash=cfg.content_hash(), stats=grown.stats)
    logger.info(
        "shard %s landed: %d trees, %d actions (%d correct), %d pairs, %.1f tokens/s",
        plan.shard_id, grown.stats["trees"], grown.stats["actions"], grown.stats["correct"],
        grown.stats["pairs"], grown.stats["engine"]["tokens_per_s"],
    )
    return {"shard_id": plan.shard_id, "state": "landed", "manifest": manifest, "stats": grown.stats}
