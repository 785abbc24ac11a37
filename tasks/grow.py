"""Grow the preference trees of one shard, UltraInteract style, level by level across the whole shard.

Turn 1: every instruction is answered under several planning strategies, several samples each.
Turn t > 1: wrong answers get the environment's feedback and a critic's critique; a refiner answers again
with the whole history. Every answer is verified. All requests of one level, across every tree of the
shard, are in flight together (bounded per endpoint by the engine client), so engines never wait on
Orchard between trees; a child's prompt starts with its parent's exact messages, so prefix caches hit.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from orchard.config import Config, RunConfig
from orchard.engine import ChatEngine, Completion, EngineClient, Sampling, Usage
from orchard.store import ObjectStore
from schemas import rows
from tasks.land import land_shard, landed_manifest, quarantined_manifest
from tasks.pairs import extract_pairs
from tasks.seeds import Instruction, ShardPlan
from tasks.verify import Verdict, Verifiers

ACTION_TEMPLATE = "action/v2"
CRITIQUE_TEMPLATE = "critique/v1"
REFINE_TEMPLATE = "refine/v1"

# The planning styles an action is asked to use (UltraInteract: diverse strategies per instruction).
STRATEGIES: dict[str, dict[str, str]] = {
    "math": {
        "step_by_step": "Solve the problem step by step, one short line per step.",
        "plan_first": "First write a one-line plan, then carry it out.",
        "work_backwards": "Start from what is asked and work backwards to the given numbers.",
        "program": "Write the calculation as one arithmetic expression, then evaluate it.",
        "estimate_then_check": "Estimate the answer first, then compute it exactly and check it.",
    },
    "instruction_following": {
        "direct": "Answer the request directly.",
        "rules_first": "Read every rule in the request and follow each one exactly.",
        "draft_and_trim": "Keep the answer short and plain, and keep to the requested format.",
    },
    "code": {
        "direct": "Write the function directly.",
        "plan_in_comments": "Start the function body with a short plan as comments, then write the code.",
        "examples_first": "First work out two example calls and their results, then write the code.",
    },
}
ANSWER_FORMAT = {
    "math": "End with a last line of the form 'Answer: <number>'.",
    "code": "Reply with the complete function in one ```python code block.",
    "instruction_following": "Reply with the response only.",
}
ROLE_SYSTEM = {
    "math": "You are a careful math tutor. {strategy} {format}",
    "code": "You are a careful Python programmer. {strategy} {format}",
    "instruction_following": "You are a helpful writer. {strategy} {format}",
}
CRITIC_SYSTEM = (
    "You review a student's attempt at a task. In at most three sentences, say what is wrong and how to fix it. "
    "Do not write the full solution."
)
CRITIC_REFERENCE = {
    "math": "The correct final answer is {reference}.",
    "code": "The hidden tests are:\n{reference}",
    "instruction_following": "The checker's constraints (ids and parameters) are: {reference}",
}
REFINE_REQUEST = "{feedback}\nA reviewer says: {critique}\nWrite a corrected solution. {format}"

Checker = Callable[[Sequence[tuple[Instruction, str]]], list[Verdict]]
Progress = Callable[[str, int, int], None]


class GrowError(RuntimeError):
    """A shard could not be grown; the message says which request failed and why."""


@dataclass
class GrownShard:
    """What one shard's growth produced, as rows for the shard tables, plus its statistics."""

    instructions: list[dict] = field(default_factory=list)
    nodes: list[dict] = field(default_factory=list)
    pairs: list[dict] = field(default_factory=list)
    trees: list[dict] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    def tables(self) -> dict:
        """Return the shard's Arrow tables, checked against schemas/rows.py."""
        return {name: rows.table(name, getattr(self, name)) for name in rows.SHARD_TABLES}


@dataclass(frozen=True)
class _Request:
    """One level's request: `n` siblings under `parent`, all sent the same messages."""

    instruction: Instruction
    tree_id: str
    parent: dict
    role: str  # the role of the nodes it produces
    messages: list[dict[str, str]]
    sampling: Sampling
    n: int
    strategy: str | None
    template: str
    turn: int | None


def _id(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:16]


def strategies_for(run: RunConfig, domain: str) -> tuple[str, ...]:
    """Return the strategies configured for `domain`."""
    return {"code": run.code_strategies, "instruction_following": run.if_strategies}.get(domain, run.strategies)


def action_messages(instruction: Instruction, strategy: str) -> list[dict[str, str]]:
    """Return the exact chat messages an action under `strategy` is generated from."""
    known = STRATEGIES.get(instruction.domain)
    if known is None:
        raise GrowError(f"instruction {instruction.instruction_id}: no strategies for domain {instruction.domain!r}")
    if strategy not in known:
        raise GrowError(
            f"run strategies: unknown {instruction.domain} strategy {strategy!r} (known: {', '.join(known)})"
        )
    system = ROLE_SYSTEM[instruction.domain].format(strategy=known[strategy], format=ANSWER_FORMAT[instruction.domain])
    return [{"role": "system", "content": system}, {"role": "user", "content": instruction.text}]


def critique_messages(instruction: Instruction, attempt: Mapping) -> list[dict[str, str]]:
    """Return the critic's messages: the task, the reference, the attempt and what the checker said of it."""
    reference = CRITIC_REFERENCE[instruction.domain].format(reference=instruction.reference[:1500])
    return [
        {"role": "system", "content": CRITIC_SYSTEM},
        {"role": "user", "content": f"Task:\n{instruction.text}\n\n{reference}\n\nAttempt:\n{attempt['text']}\n\n"
                                    f"The checker said: {attempt['feedback']}"},
    ]


def refine_messages(instruction: Instruction, attempt: Mapping, critique: str) -> list[dict[str, str]]:
    """Return the refiner's messages: the attempt's exact history, then feedback and critique as the next user turn."""
    request = REFINE_REQUEST.format(feedback=attempt["feedback"], critique=critique.strip(),
                                    format=ANSWER_FORMAT[instruction.domain])
    return [*attempt["prompt"], {"role": "assistant", "content": attempt["text"]}, {"role": "user", "content": request}]


def sample_seed(base: int, *parts: object) -> int:
    """Return a request seed, so the same run id and config ask the engine the same questions."""
    return int(_id(base, *parts), 16) % 2**31


def _blank_node(common: Mapping, tree_id: str, node_id: str, parent_id: str | None, instruction: Instruction,
                depth: int, role: str) -> dict:
    node = dict.fromkeys(rows.NODES.names)
    node.update(common, tree_id=tree_id, node_id=node_id, parent_id=parent_id,
                instruction_id=instruction.instruction_id, depth=depth, role=role, prompt=[])
    return node


class _Grower:
    """The state of one shard's growth: its trees' nodes and the engines playing each role."""

    def __init__(self, plan: ShardPlan, run_id: str, run: RunConfig, engines: Mapping[str, ChatEngine],
                 check: Checker, progress: Progress | None) -> None:
        self.plan, self.run, self.engines, self.check, self.progress = plan, run, engines, check, progress
        self.common = {"run_id": run_id, "shard_id": plan.shard_id}
        self.run_id = run_id
        self.nodes: list[dict] = []
        self.instructions = {i.instruction_id: i for i in plan.instructions}

    async def ask(self, label: str, requests: Sequence[_Request]) -> list[list[Completion]]:
        """Send every request of one level at once; return each one's `n` completions, in order."""
        done, step = 0, max(1, len(requests) // 10)

        async def one(request: _Request) -> list[Completion]:
            nonlocal done
            answers = await self.engines[_ROLE_ENGINE[request.role]].chat(request.messages, request.sampling, request.n)
            done += 1
            if self.progress is not None and (done % step == 0 or done == len(requests)):
                self.progress(label, done, len(requests))
            return answers

        results = await asyncio.gather(*(one(r) for r in requests), return_exceptions=True)
        failures = [(r, e) for r, e in zip(requests, results) if isinstance(e, BaseException)]
        if failures:
            request, error = failures[0]
            raise GrowError(
                f"shard {self.plan.shard_id}: {len(failures)} of {len(requests)} {label} requests failed; first: "
                f"instruction {request.instruction.instruction_id} ({request.role}"
                f"{', ' + request.strategy if request.strategy else ''}): {error}"
            )
        return results  # type: ignore[return-value]

    def add_answers(self, requests: Sequence[_Request], answers: Sequence[list[Completion]]) -> list[dict]:
        """Turn each request's completions into child nodes of its parent; return them."""
        children = []
        for request, completions in zip(requests, answers):
            for k, completion in enumerate(completions):
                node = _blank_node(self.common, request.tree_id, _id(request.parent["node_id"], request.role, request.strategy, k),
                                   request.parent["node_id"], request.instruction, request.parent["depth"] + 1,
                                   request.role)
                node.update(
                    strategy=request.strategy, prompt=request.messages, text=completion.text, model=completion.model,
                    temperature=request.sampling.temperature, top_p=request.sampling.top_p,
                    max_tokens=request.sampling.max_tokens, sample_seed=completion.seed,
                    prompt_template_version=request.template, prompt_tokens=completion.prompt_tokens,
                    completion_tokens=completion.completion_tokens, finish_reason=completion.finish_reason,
                    cached_tokens=completion.cached_tokens, turn=request.turn,
                )
                children.append(node)
        self.nodes.extend(children)
        return children

    def verify(self, nodes: Sequence[dict]) -> None:
        """Record each node's verdict, score, verifier and the feedback its next turn sees."""
        verdicts = self.check([(self.instructions[n["instruction_id"]], n["text"]) for n in nodes])
        for node, verdict in zip(nodes, verdicts):
            node.update(verdict=verdict.verdict, score=verdict.score, verifier=verdict.verifier,
                        verifier_detail=verdict.detail, feedback=verdict.feedback,
                        failure_reason=verdict.failure_reason, sandbox_exit_code=verdict.exit_code,
                        sandbox_stdout=verdict.stdout, sandbox_stderr=verdict.stderr)

    def sampling(self, max_tokens: int, *seed_parts: object) -> Sampling:
        return Sampling(temperature=self.run.temperature, top_p=self.run.top_p, max_tokens=max_tokens,
                        seed=sample_seed(self.run.seed, *seed_parts))

    async def first_turn(self) -> list[dict]:
        requests = []
        for instruction in self.plan.instructions:
            tree_id = _id(self.run_id, instruction.instruction_id)
            root = _blank_node(self.common, tree_id, _id(tree_id, "root"), None, instruction, 0, "instruction")
            root["text"] = instruction.text
            self.nodes.append(root)
            for strategy in strategies_for(self.run, instruction.domain):
                requests.append(_Request(
                    instruction, tree_id, root, "action", action_messages(instruction, strategy),
                    self.sampling(self.run.max_tokens, tree_id, strategy), self.run.samples_per_strategy,
                    strategy, ACTION_TEMPLATE, 1,
                ))
        actions = self.add_answers(requests, await self.ask("turn 1 actions", requests))
        self.verify(actions)
        return actions

    async def refine_turn(self, turn: int, frontier: Sequence[dict]) -> list[dict]:
        """Critique up to `refine_per_tree` wrong nodes of each tree, refine each, verify; return the refinements."""
        wrong: dict[str, list[dict]] = defaultdict(list)
        for node in sorted(frontier, key=lambda n: n["node_id"]):
            if node["verdict"] != "correct" and len(wrong[node["tree_id"]]) < self.run.refine_per_tree:
                wrong[node["tree_id"]].append(node)
        attempts = [node for nodes in wrong.values() for node in nodes]
        if not attempts:
            return []
        critique_requests = [
            _Request(self.instructions[a["instruction_id"]], a["tree_id"], a, "critique",
                     critique_messages(self.instructions[a["instruction_id"]], a),
                     self.sampling(self.run.critique_max_tokens, a["node_id"], "critique"), 1, None,
                     CRITIQUE_TEMPLATE, None)
            for a in attempts
        ]
        critiques = self.add_answers(critique_requests, await self.ask(f"turn {turn} critiques", critique_requests))
        refine_requests = [
            _Request(self.instructions[a["instruction_id"]], a["tree_id"], c, "refinement",
                     refine_messages(self.instructions[a["instruction_id"]], a, c["text"]),
                     self.sampling(self.run.max_tokens, c["node_id"], "refine"), self.run.refine_samples,
                     a["strategy"], REFINE_TEMPLATE, turn)
            for a, c in zip(attempts, critiques)
        ]
        refinements = self.add_answers(refine_requests, await self.ask(f"turn {turn} refinements", refine_requests))
        self.verify(refinements)
        return refinements


_ROLE_ENGINE = {"action": "generator", "critique": "critic", "refinement": "refiner"}


async def grow_shard(
    plan: ShardPlan,
    *,
    run_id: str,
    run: RunConfig,
    engines: Mapping[str, ChatEngine],
    check: Checker,
    progress: Progress | None = None,
) -> GrownShard:
    """Return the instructions, nodes, pairs and trees of every tree of `plan`.

    `engines` maps each role (generator, critic, refiner) to the engine that plays it; `check` verifies
    (instruction, answer) items; `progress(level, done, total)` is called as a level's answers arrive.
    """
    for role in ("generator", "critic", "refiner"):
        if role not in engines and (role == "generator" or run.turns > 1):
            raise GrowError(f"roles.{role}: no engine plays this role")
    for instruction in plan.instructions:
        for strategy in strategies_for(run, instruction.domain):
            action_messages(instruction, strategy)  # fail before any request on an unknown strategy
    started = time.monotonic()
    grower = _Grower(plan, run_id, run, engines, check, progress)
    frontier = await grower.first_turn()
    for turn in range(2, run.turns + 1):
        frontier = await grower.refine_turn(turn, frontier)
        if not frontier:
            break

    grown = GrownShard(
        instructions=[{**grower.common, **i.as_row()} for i in plan.instructions],
        nodes=grower.nodes,
        pairs=extract_pairs(grower.nodes, grower.instructions),
    )
    grown.trees = tree_rows(grown.nodes, grown.pairs, grower.instructions)
    answers = [n for n in grown.nodes if n["role"] in ("action", "refinement")]
    # Roles may share an engine: count each engine's usage once. Throughput is over the shard's whole growth.
    usage = Usage.combined([e.usage for e in {id(e): e for e in engines.values()}.values()]).as_dict()
    wall_s = time.monotonic() - started
    usage["wall_s"] = round(wall_s, 3)
    usage["tokens_per_s"] = round(usage["completion_tokens"] / wall_s, 2) if wall_s > 0 else 0.0
    grown.stats = {
        "trees": len(plan.instructions),
        "nodes": len(grown.nodes),
        "actions": len(answers),
        "correct": sum(n["verdict"] == "correct" for n in answers),
        "critiques": sum(n["role"] == "critique" for n in grown.nodes),
        "pairs": len(grown.pairs),
        "turns": max((n["turn"] or 0) for n in answers) if answers else 0,
        "grow_wall_s": round(wall_s, 3),
        "engine": usage,
    }
    return grown


def tree_rows(nodes: Sequence[Mapping], pairs: Sequence[Mapping], instructions: Mapping[str, Instruction]) -> list[dict]:
    """Return one row per tree: strategies used, turns, counts, pass rate and tokens."""
    by_tree: dict[str, list[Mapping]] = defaultdict(list)
    for node in nodes:
        by_tree[node["tree_id"]].append(node)
    pair_counts: dict[str, int] = defaultdict(int)
    for pair in pairs:
        pair_counts[pair["tree_id"]] += 1
    trees = []
    for tree_id, members in by_tree.items():
        root = next(n for n in members if n["role"] == "instruction")
        answers = [n for n in members if n["role"] in ("action", "refinement")]
        correct = sum(n["verdict"] == "correct" for n in answers)
        trees.append({
            "run_id": root["run_id"], "shard_id": root["shard_id"], "tree_id": tree_id,
            "instruction_id": root["instruction_id"], "domain": instructions[root["instruction_id"]].domain,
            "strategies": sorted({n["strategy"] for n in answers if n["role"] == "action"}),
            "turns": max((n["turn"] for n in answers), default=0),
            "nodes": len(members), "actions": len(answers), "correct": correct,
            "pass_rate": correct / len(answers) if answers else 0.0,
            "pairs": pair_counts[tree_id],
            "prompt_tokens": sum(n["prompt_tokens"] or 0 for n in members),
            "completion_tokens": sum(n["completion_tokens"] or 0 for n in members),
        })
    return trees


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

    def progress(level: str, done: int, total: int) -> None:
        logger.info("shard %s: %s %d/%d answered", plan.shard_id, level, done, total)

    async def grow() -> GrownShard:
        # One client per engine, shared by the roles it plays, so its concurrency limit holds across roles.
        clients = {name: EngineClient(cfg.engines[name]) for name in set(cfg.roles.values())}
        try:
            engines = {role: clients[name] for role, name in cfg.roles.items()}
            return await grow_shard(plan, run_id=run_id, run=cfg.run, engines=engines, check=verifiers.check,
                                    progress=progress)
        finally:
            for client in clients.values():
                await client.aclose()

    with Verifiers(cfg.run.verify_workers, cfg.sandbox) as verifiers:
        grown = asyncio.run(grow())
    manifest = land_shard(store, run_id, plan.shard_id, grown.tables(), config_hash=cfg.content_hash(), stats=grown.stats)
    logger.info(
        "shard %s landed: %d trees, %d answers (%d correct), %d critiques, %d pairs, %.1f tokens/s",
        plan.shard_id, grown.stats["trees"], grown.stats["actions"], grown.stats["correct"],
        grown.stats["critiques"], grown.stats["pairs"], grown.stats["engine"]["tokens_per_s"],
    )
    return {"shard_id": plan.shard_id, "state": "landed", "manifest": manifest, "stats": grown.stats}
