"""Grow the preference trees of one shard: a plain list of growth phases, every tree on its own clock.

The phases, each in its own module next to its pure core and its prompts:
- `Turns` (tasks/turns.py): first attempts under several strategies, then critique-refine turns of wrong answers;
- `Search` (tasks/mcts.py): MCTS over answer steps, with rollouts and the model's self-evaluation;
- `Principled` (tasks/principles.py): open-ended prompts answered under principles and their antitheses;
- `Injection` (tasks/inject.py): minimally edited wrong copies of correct answers, as hard negatives;
- `Jury` (tasks/jury.py): judges compare principle examples, some verifiable pairs and canaries, in both orders.

The shared core (tasks/growth.py) keeps the nodes, runs the requests and verifies. Once every tree is grown the
shard's pairs are extracted and curated, and the phases do their shard-wide part. Adding a growth method is one
new module and one line in `phases`.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from orchard.config import Config, HygieneConfig, RunConfig
from orchard.engine import ChatEngine, EngineClient, PrefixCache, Usage, counters_delta, prefix_cache_counters
from orchard.store import ObjectStore
from schemas import rows
from tasks import jury as juries
from tasks.growth import Checker, GrowError, Phase, Progress, Shard
from tasks.inject import Injection
from tasks.jury import Judge, Jury
from tasks.land import land_shard, resume_shard
from tasks.mcts import Search
from tasks.pairs import constraint_count, curate
from tasks.principles import Constitution, Principled, load_constitution
from tasks.seeds import Instruction, ShardPlan
from tasks.turns import Turns
from tasks.verify import Verifiers


@dataclass
class GrownShard:
    """What one shard's growth produced, as rows for the shard tables, plus its statistics."""

    instructions: list[dict] = field(default_factory=list)
    nodes: list[dict] = field(default_factory=list)
    pairs: list[dict] = field(default_factory=list)
    trees: list[dict] = field(default_factory=list)
    principle_examples: list[dict] = field(default_factory=list)
    judgements: list[dict] = field(default_factory=list)
    drops: list[dict] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    def tables(self) -> dict:
        """Return the shard's Arrow tables, checked against schemas/rows.py."""
        return {name: rows.table(name, getattr(self, name)) for name in rows.SHARD_TABLES}


def phases(jury: Sequence[Judge], constitution: Constitution) -> list[Phase]:
    """The growth methods, in order; a phase is listed after the phases it needs."""
    return [Turns(), Search(), Principled(constitution), Injection(), Jury(jury, constitution)]


async def grow_shard(
    plan: ShardPlan,
    *,
    run_id: str,
    run: RunConfig,
    engines: Mapping[str, ChatEngine],
    check: Checker,
    progress: Progress | None = None,
    jury: Sequence[Judge] = (),
    constitution: Constitution | None = None,
    hygiene: HygieneConfig | None = None,
) -> GrownShard:
    """Return the instructions, nodes, pairs, trees, principle examples and judgements of every tree of `plan`.

    `engines` maps each role (generator, critic, refiner) to the engine that plays it; `check` verifies
    (instruction, answer) items without blocking the loop; `progress(done, planned)` is called as trees finish
    request levels. The `jury` judges open-ended prompts' principle examples (written under `constitution`, the
    shipped default if None), some verifiable pairs, and canaries; without a jury nothing is judged.
    """
    growth = phases(jury, constitution or load_constitution())
    shard = Shard(plan, run_id, run, engines, check, progress, hygiene)
    for phase in growth:
        phase.start(shard)  # fails before any request is sent
    started = time.monotonic()
    await shard.grow(growth)

    requests = shard.failure_stats()
    if requests["failed"] > run.max_failed_request_share * requests["sent"]:
        # Kept as the cause: a shard whose requests failed because its server was down may grow on a retry.
        raise GrowError(
            f"shard {plan.shard_id}: {requests['failed']} of {requests['sent']} requests failed, more than "
            f"run.max_failed_request_share ({run.max_failed_request_share:.0%}); by reason: "
            f"{requests['failed_by_reason']}; first: {requests['first_failure']}"
        ) from shard.first_failure()[1]

    shard.ordered()
    found = [pair for tree in shard.trees for pair in shard.found_pairs(tree)]
    shard.pairs = curate(found, run, shard.drops)
    await shard.finish(growth)
    requests = shard.failure_stats()  # with the shard-wide requests (the jury's pairs and canaries)
    for example in shard.examples:  # the principle_pairs view publishes the stable examples won by the response
        if not (example["label"] == "stable" and example["jury_winner"] == "response"):
            why = (f"jury preferred the {example['jury_winner']}" if example["label"] == "stable"
                   else f"jury label {example['label'] or 'none (not judged)'}")
            shard.drops.add("jury", f"{why}: not a principle pair", example["example_id"])

    grown = GrownShard(
        instructions=[{**shard.common, **i.as_row()} for i in plan.instructions],
        nodes=shard.nodes,
        pairs=shard.pairs,
        principle_examples=shard.examples,
        judgements=shard.judgements,
        drops=shard.drops.rows(run_id, plan.shard_id),
    )
    grown.trees = tree_rows(grown.nodes, grown.pairs, shard.instructions)
    examples = grown.principle_examples
    answers = [n for n in grown.nodes if n["role"] in ("action", "refinement")]
    # Roles may share an engine: count each engine's usage once. Throughput is over the shard's whole growth.
    used = {id(e): e for e in [*engines.values(), *(judge.engine for judge in jury)]}
    usage = Usage.combined([e.usage for e in used.values()]).as_dict()
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
        "pairs_found": len(found),  # after pair hygiene, before the run's contrast and difficulty selection
        "drops": shard.drops.by_stage(),  # pair hygiene, curation, jury labels: reason -> count
        "pairs_by_method": {m: sum(p["method"] == m for p in grown.pairs) for m in sorted({p["method"] for p in grown.pairs})},
        "mcts": shard.counts.get("mcts", {}),
        "principle_examples": len(examples),
        "principle_labels": {label: sum(e["label"] == label for e in examples) for label in juries.LABELS},
        "judgements": len(grown.judgements),
        "verdicts_unread": sum(j["status"] != "ok" for j in grown.judgements),
        "turns": max((n["turn"] or 0) for n in answers) if answers else 0,
        "requests": requests,
        # Trees that got no answer at all (their requests failed): they have no pairs.
        "trees_unanswered": sum(t["actions"] == 0 and not any(e["tree_id"] == t["tree_id"] for e in examples)
                                for t in grown.trees),
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
            # The deepest turn any node answers (open-ended responses answer turn 1).
            "turns": max((n["turn"] or 0 for n in members), default=0),
            "nodes": len(members), "actions": len(answers), "correct": correct,
            "pass_rate": correct / len(answers) if answers else None,  # open-ended trees have nothing verified
            "pairs": pair_counts[tree_id],
            "prompt_tokens": sum(n["prompt_tokens"] or 0 for n in members),
            "completion_tokens": sum(n["completion_tokens"] or 0 for n in members),
            "k": constraint_count(instructions[root["instruction_id"]]),
        })
    return trees


# --- Prefect task: one per shard --------------------------------------------------------------


@task(name="grow-shard", cache_policy=NO_CACHE, retries=0)
def grow_shard_task(config: dict, run_id: str, plan: ShardPlan) -> dict:
    """Grow, verify and land one shard, unless an intact manifest says it already landed; return its receipt.

    A corrupt landed shard is quarantined and grown again; the receipt's `healed` names what was wrong with it.
    """
    cfg = Config.from_dict(config)
    store = ObjectStore(cfg.object_store)
    logger = get_run_logger()
    known, healed = resume_shard(store, run_id, plan.shard_id, cfg.content_hash())
    if known is not None:
        logger.info("shard %s already %s; not grown again", plan.shard_id,
                    "landed" if known["state"] == "reused" else known["state"])
        return known
    if healed:
        logger.warning("shard %s is grown again: %s", plan.shard_id, healed)

    moving = create_progress_artifact(progress=0.0, description=f"shard {plan.shard_id}: share of the request levels "
                                                                  "its phases plan that are answered")

    def progress(done: int, planned: int) -> None:
        logger.info("shard %s: %d/%d request levels answered", plan.shard_id, done, planned)
        # Called inside the growth's event loop: _sync keeps Prefect from handing back an unawaited coroutine.
        update_progress_artifact(moving, progress=min(99.0, 100.0 * done / planned), _sync=True)

    constitution = load_constitution(cfg.run.constitution or None)

    async def grow() -> GrownShard:
        # One client per engine, shared by the roles it plays, so its concurrency limit holds across roles.
        names = {*cfg.roles.values(), *(judge.engine for judge in cfg.jury)}
        clients = {name: EngineClient(cfg.engines[name]) for name in names}
        try:
            engines = {role: clients[name] for role, name in cfg.roles.items()}
            jury = [Judge(judge.name, judge.rubric, clients[judge.engine]) for judge in cfg.jury]
            # The servers' prefix-cache counters (vLLM's GET /metrics) before and after: their growth is the shard's.
            before = await prefix_cache_counters(clients.values())
            grown = await grow_shard(plan, run_id=run_id, run=cfg.run, engines=engines, check=verifiers.verify,
                                     progress=progress, jury=jury, constitution=constitution, hygiene=cfg.hygiene)
            metrics = counters_delta(before, await prefix_cache_counters(clients.values()))
            grown.stats["prefix_cache"] = PrefixCache.of_usage(grown.stats["engine"], metrics).as_dict()
            return grown
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
    update_progress_artifact(moving, progress=100.0)
    return {"shard_id": plan.shard_id, "state": "landed", "manifest": manifest, "stats": grown.stats, "healed": healed}
