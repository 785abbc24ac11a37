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
import contextlib
import dataclasses
import json
import math
import os
import queue
import threading
import time
from collections import defaultdict
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import pyarrow as pa
from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from orchard.config import Config, HygieneConfig, RunConfig
from orchard.engine import (
    CacheCounters,
    ChatEngine,
    EngineClient,
    PrefixCache,
    Usage,
    counters_delta,
    prefix_cache_counters,
)
from orchard.services import die_with_owner, owner
from orchard.store import ObjectStore
from schemas import rows
from schemas.errors import is_transient
from schemas.plan import Instruction, ShardPlan
from schemas.shards import ShardReceipt, ShardStats
from schemas.stopping import stop_requested
from tasks import jury as juries
from tasks.growth import Checker, GrowError, Phase, Progress, Shard
from tasks.inject import Injection
from tasks.jury import Judge, Jury
from tasks.land import land_shard, resume_shard
from tasks.mcts import Search
from tasks.pairs import constraint_count, curate
from tasks.plans import ShardRef, read_plan
from tasks.principles import Constitution, Principled, load_constitution
from tasks.turns import Turns
from tasks.validate import (
    ShardTables,
    ShardValidation,
    record_unvalidated,
    record_validation,
    shard_contamination,
    stored_validation,
    validate_shard,
    validate_shards,
    warm_validation,
)
from tasks.verify import Verifiers, worker_context


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
    stats: ShardStats = field(default_factory=ShardStats)

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
    grown.stats = ShardStats(
        trees=len(plan.instructions),
        nodes=len(grown.nodes),
        actions=len(answers),
        correct=sum(n["verdict"] == "correct" for n in answers),
        critiques=sum(n["role"] == "critique" for n in grown.nodes),
        pairs=len(grown.pairs),
        pairs_found=len(found),
        drops=shard.drops.by_stage(),  # pair hygiene, curation, jury labels: reason -> count
        pairs_by_method={m: sum(p["method"] == m for p in grown.pairs) for m in sorted({p["method"] for p in grown.pairs})},
        mcts=shard.counts.get("mcts", {}),
        principle_examples=len(examples),
        principle_labels={label: sum(e["label"] == label for e in examples) for label in juries.LABELS},
        judgements=len(grown.judgements),
        verdicts_unread=sum(j["status"] != "ok" for j in grown.judgements),
        turns=max((n["turn"] or 0) for n in answers) if answers else 0,
        requests=requests,
        trees_unanswered=sum(t["actions"] == 0 and not any(e["tree_id"] == t["tree_id"] for e in examples)
                             for t in grown.trees),
        grow_wall_s=round(wall_s, 3),
        engine=usage,
    )
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


# --- the process's growth host: one per process, shared by every shard growing in it -------------------------


def engines_used(cfg: Config) -> list[str]:
    """Return the names of the engines the roles and the jury use."""
    return sorted({*cfg.roles.values(), *(judge.engine for judge in cfg.jury)})


def verify_workers(cfg: Config) -> int:
    """Return how many verification workers (and sandbox threads) this process runs: the setting, else its cores."""
    return cfg.orchestration.verify_workers or len(os.sched_getaffinity(0))


def shards_in_flight(cfg: Config) -> int:
    """Return how many shards one process grows at once: enough trees that every engine always has requests ready,
    at most `orchestration.max_shards_in_flight`.

    Inline, that is twice the requests the engines take at once (max_concurrency × base URLs, summed over the engines
    the roles and the jury use) in trees, plus SPARE_SHARDS shards, so shards' tails (their last dependent requests,
    the jury's shard-wide part) overlap the next shards' growth. Dispatched shards grow on the pool's workers, each
    in a process of its own: the cap alone bounds how many the flow waits on.
    """
    cap = cfg.orchestration.max_shards_in_flight
    if cfg.orchestration.grow != "inline":
        return cap
    requests = sum(cfg.engines[name].max_concurrency * max(1, len(cfg.engines[name].base_urls))
                   for name in engines_used(cfg))
    return max(1, min(cap, math.ceil(TREES_PER_REQUEST_SLOT * requests / cfg.run.instructions_per_shard)
                           + SPARE_SHARDS))


# Trees in flight per request the engines take at once: a tree waits on verification and on its own earlier answers
# between requests, so one tree per slot leaves slots idle (bench/scale.py measures the occupancy this gives).
TREES_PER_REQUEST_SLOT = 2
# Shards in flight beyond those: while one shard waits on its last long chain and another on its jury, the others
# still fill the slots (with one spare, shards of 32 and 128 left the 64-slot engine 0.95 busy, dipping to 0.63-0.74
# whenever two tails met: bench/scale.py).
SPARE_SHARDS = 2


# How much lower than growth the validation processes run (os.nice): GX's work can wait, the engines' answers cannot.
VALIDATE_NICE = 10
# Validation processes per host at most (~300 MB each): enough that the shards landing together at a run's end are
# validated side by side.
MAX_VALIDATORS = 4
# Shards one validation process takes at once at most: GX's cost is per expectation, so a batch of 32 shards of 4
# instructions costs little more than one shard (bench/validate_batch.py), while its rows (a few MB of frames) and
# the shards that wait on it stay small; a failing batch is validated again shard by shard.
MAX_VALIDATION_BATCH = 32


class GrowthHost:
    """What every shard growing in this process shares: one event loop (on a thread of its own), one engine client
    per engine (so `max_concurrency` is what each server sees from the process and one priority queue, longest
    remaining chains first, spans every shard), one verification pool sized to the host's cores, and validation
    processes.

    Open it with `growth_host(cfg)`; `grow` runs one shard on it and `validate` validates one, from any thread.
    """

    def __init__(self, cfg: Config) -> None:
        self.clients = {name: EngineClient(cfg.engines[name]) for name in engines_used(cfg)}
        self.verifiers = Verifiers(verify_workers(cfg), cfg.sandbox)
        self.users = 0  # growth_host's count of the blocks that hold this host open
        self._counters: dict[str, CacheCounters] | None = None  # the servers' prefix-cache counters, last read
        self._counters_lock: asyncio.Lock | None = None
        self._validator: ProcessPoolExecutor | None = None  # started by the first shard that grows
        self._validator_starting = self._validator_closed = False
        self.validators = min(MAX_VALIDATORS, verify_workers(cfg))
        self._validator_lock = threading.Lock()
        # Shards waiting for a validation process, and one thread per process that hands them over in batches.
        self._waiting: list[tuple[ShardTables, Future]] = []
        self._waiting_lock = threading.Lock()
        self._batcher = ThreadPoolExecutor(max_workers=self.validators, thread_name_prefix="orchard-validate")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="orchard-growth", daemon=True)
        self._thread.start()

    @staticmethod
    def key(cfg: Config) -> str:
        """What a host is made of: configs with the same engines, sandbox and workers share one."""
        return json.dumps({"engines": {name: dataclasses.asdict(cfg.engines[name]) for name in engines_used(cfg)},
                           "sandbox": dataclasses.asdict(cfg.sandbox), "workers": verify_workers(cfg)},
                          sort_keys=True)

    def grow(self, plan: ShardPlan, cfg: Config, run_id: str, progress: Progress | None = None) -> GrownShard:
        """Grow one shard on this host and return it; `progress(done, planned)` is called in the calling thread.

        Waiting here holds no event loop: the caller may be any thread (a Prefect task's). If the wait is broken
        (the task is cancelled), the shard's growth is cancelled too.
        """
        self._start_validation_pool()
        constitution = load_constitution(cfg.run.constitution or None)
        events: queue.SimpleQueue = queue.SimpleQueue()
        grown = asyncio.run_coroutine_threadsafe(
            self._grow(plan, cfg, run_id, constitution, None if progress is None else lambda *levels: events.put(levels)),
            self._loop)
        grown.add_done_callback(lambda _: events.put(None))
        try:
            while (levels := events.get()) is not None:
                progress(*levels)
            return grown.result()
        finally:
            grown.cancel()  # nothing when it is done

    async def _grow(self, plan: ShardPlan, cfg: Config, run_id: str, constitution: Constitution,
                    progress: Progress | None) -> GrownShard:
        # A view per engine and shard: the shard's own usage over the process's connections and slots.
        views = {name: client.view() for name, client in self.clients.items()}
        engines = {role: views[name] for role, name in cfg.roles.items()}
        jury = [Judge(judge.name, judge.rubric, views[judge.engine]) for judge in cfg.jury]
        await self._cache_counters_gained()  # the first shard reads where the servers' counters start
        grown = await grow_shard(plan, run_id=run_id, run=cfg.run, engines=engines, check=self.verifiers.verify,
                                 progress=progress, jury=jury, constitution=constitution, hygiene=cfg.hygiene)
        grown.stats = dataclasses.replace(grown.stats, prefix_cache=PrefixCache.of_usage(
            grown.stats.engine, await self._cache_counters_gained()).as_dict())
        return grown

    def _start_validation_pool(self) -> None:
        """Start the validation processes on a thread of their own, once (the first shard that grows here): forking
        them waits for the fork server's imports (seconds, on a run's first shard), which growth need not wait for.
        Each builds its GX context while the shard grows (at VALIDATE_NICE), so the shards that land are validated
        at once instead of after GX's seconds of imports. If they cannot start, `validate` says why."""
        with self._validator_lock:
            if self._validator is not None or self._validator_starting:
                return
            self._validator_starting = True

        def start() -> None:
            with contextlib.suppress(Exception):  # the first validation starts them again and raises what failed
                self._validation_pool()

        threading.Thread(target=start, name="orchard-validate-start", daemon=True).start()

    def _validation_pool(self) -> ProcessPoolExecutor:
        """Return the validation processes, started by the first call."""
        with self._validator_lock:
            if self._validator_closed:
                raise RuntimeError("the growth host closed: no validation process starts")
            if self._validator is None:
                self._validator = ProcessPoolExecutor(max_workers=self.validators, mp_context=worker_context(),
                                                      initializer=_validation_process, initargs=owner())
                for _ in range(self.validators):  # one call each while the others are still starting: all start
                    self._validator.submit(os.getpid)
            return self._validator

    def validate(self, tables: Mapping[str, pa.Table], shard_id: str, contaminated: Sequence[str]) -> ShardValidation:
        """Validate a landed shard's tables in one of this host's validation processes and return the outcome.

        Validation processes (one per core, at most MAX_VALIDATORS), at a lower CPU priority than growth
        (VALIDATE_NICE), keep GX's second or more of pure-Python work per shard off the event loop's interpreter and
        behind the engines' and verifiers' CPU; each builds its GX context once. A shard that lands while every
        process is busy waits, and while it waits it counts as in flight; a process that becomes free takes every
        shard waiting (at most MAX_VALIDATION_BATCH) and validates them at once (`validate_shards`: each shard's
        outcome is the one it would have alone), so shards that land together cost GX about one shard's work.
        """
        self._validation_pool()
        validated: Future = Future()
        with self._waiting_lock:
            self._waiting.append((ShardTables(dict(tables), shard_id, list(contaminated)), validated))
        # One hand-over per shard: the first to find a batcher thread free takes every shard waiting by then, the
        # later ones of that batch find none left and end at once.
        self._batcher.submit(self._validate_waiting)
        return validated.result()

    def _validate_waiting(self) -> None:
        """Validate the shards waiting (at most MAX_VALIDATION_BATCH) in one validation process, as one batch; hand
        each its own outcome or error (an error of the whole batch to each of them)."""
        with self._waiting_lock:
            batch, self._waiting = self._waiting[:MAX_VALIDATION_BATCH], self._waiting[MAX_VALIDATION_BATCH:]
        if not batch:
            return
        try:
            outcomes = self._validation_pool().submit(validate_each, [shard for shard, _ in batch]).result()
        except BaseException as error:  # noqa: BLE001 - the batch's callers get its error, whatever it is
            for _, validated in batch:
                validated.set_exception(error)
            return
        for (_, validated), (validation, error) in zip(batch, outcomes):
            if error is None:
                validated.set_result(validation)
            else:
                validated.set_exception(error)

    async def _cache_counters_gained(self) -> CacheCounters | None:
        """Return what the servers' prefix-cache counters (vLLM's GET /metrics) gained since they were last read here.

        Shards growing at once share the servers: each shard is given the growth since the previous read, so the
        shards' figures add up to the servers' growth over the run instead of counting overlaps twice.
        """
        if self._counters_lock is None:
            self._counters_lock = asyncio.Lock()
        async with self._counters_lock:
            now = await prefix_cache_counters(self.clients.values())
            gained = None if self._counters is None else counters_delta(self._counters, now)
            self._counters = now
            return gained

    def close(self) -> None:
        """Close the engine clients and the verification pool, and stop the loop."""
        try:
            for client in self.clients.values():
                asyncio.run_coroutine_threadsafe(client.aclose(), self._loop).result(timeout=30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._loop.close()
            self.verifiers.close()
            self._batcher.shutdown(wait=True, cancel_futures=True)
            with self._waiting_lock:  # nobody validates on a closed host; if one did, it hears so
                waiting, self._waiting = self._waiting, []
            for _, validated in waiting:
                validated.set_exception(RuntimeError("the growth host closed before this shard was validated"))
            with self._validator_lock:  # a pool still starting (its thread holds the lock) is shut down once started
                validator, self._validator, self._validator_closed = self._validator, None, True
            if validator is not None:
                validator.shutdown(wait=True, cancel_futures=True)


def validate_each(batch: Sequence[ShardTables]) -> list[tuple[ShardValidation | None, Exception | None]]:
    """Return each shard's validation, or why it could not run: the batch at once (`validate_shards`), or, if that
    raises (a shard lacks a table), each shard alone, so one shard's error is not its neighbours'."""
    try:
        return [(validation, None) for validation in validate_shards(batch)]
    except Exception:  # noqa: BLE001 - told apart below, shard by shard
        if len(batch) == 1:
            raise
    outcomes: list[tuple[ShardValidation | None, Exception | None]] = []
    for shard in batch:
        try:
            outcomes.append((validate_shard(shard.tables, shard_id=shard.shard_id,
                                            contaminated=shard.contaminated), None))
        except Exception as error:  # noqa: BLE001 - this shard's caller raises it
            outcomes.append((None, error))
    return outcomes


def _validation_process(pid: int, started: str | None) -> None:
    """A validation process starts behind growth (VALIDATE_NICE) with its GX context built; it ends when its owner
    (`owner()`: the process that grows) is gone, and leaves Ctrl-C to the run."""
    die_with_owner(pid, started)
    os.nice(VALIDATE_NICE)
    warm_validation()


_HOSTS: dict[str, GrowthHost] = {}
_HOSTS_LOCK = threading.Lock()


@contextlib.contextmanager
def growth_host(cfg: Config) -> Iterator[GrowthHost]:
    """Yield this process's growth host for `cfg`'s engines, opening it if no block holds one open; the last block
    to leave closes it. The nightly flow holds it for a run's growth, so its shards share it; a grow-shard run on a
    worker opens its own."""
    key = GrowthHost.key(cfg)
    with _HOSTS_LOCK:
        host = _HOSTS.get(key)
        if host is None:
            host = _HOSTS[key] = GrowthHost(cfg)
        host.users += 1
    try:
        yield host
    finally:
        with _HOSTS_LOCK:
            host.users -= 1
            last = host.users == 0
            if last:
                del _HOSTS[key]
        if last:
            host.close()


# --- Prefect task: one per shard --------------------------------------------------------------

PROGRESS_EVERY_S = 5.0


@task(name="grow-shard", cache_policy=NO_CACHE, retries=0)
def grow_shard_task(config: dict, run_id: str, shard: ShardRef) -> ShardReceipt:
    """Grow, verify, land and validate one shard, unless an intact manifest says it already landed; return its
    receipt, whose `validation` says how its suites fared (a shard that failed them is quarantined here).

    A corrupt landed shard is quarantined and grown again; the receipt's `healed` names what was wrong with it.
    The shard grows on this process's growth host (one engine client per engine, one verification pool) and is
    validated on it right after it lands.
    """
    cfg = Config.from_dict(config)
    store = ObjectStore(cfg.object_store)
    logger = get_run_logger()
    known, healed = resume_shard(store, run_id, shard.shard_id, cfg.content_hash())
    if known is not None:
        logger.info("shard %s already %s; not grown again", shard.shard_id,
                    "landed" if known.state == "reused" else known.state)
        return with_stored_validation(store, run_id, known)
    plan = read_plan(store, run_id, shard)
    if healed:
        logger.warning("shard %s is grown again: %s", plan.shard_id, healed)

    moving = create_progress_artifact(progress=0.0, description=f"shard {plan.shard_id}: share of the request levels "
                                                                  "its phases plan that are answered")

    shown = [-PROGRESS_EVERY_S]  # the first answered level is shown at once: the shard is seen to be growing

    def progress(done: int, planned: int) -> None:
        # Each update is a call to the Prefect API (and its server's CPU): at most one per PROGRESS_EVERY_S per shard,
        # so hundreds of small shards growing at once do not take the CPU their engines' answers need.
        if time.monotonic() - shown[0] < PROGRESS_EVERY_S:
            return
        shown[0] = time.monotonic()
        logger.info("shard %s: %d/%d request levels answered", plan.shard_id, done, planned)
        update_progress_artifact(moving, progress=min(99.0, 100.0 * done / planned))

    with growth_host(cfg) as host:
        grown = host.grow(plan, cfg, run_id, progress)
        tables = grown.tables()
        manifest = land_shard(store, run_id, plan.shard_id, tables, config_hash=cfg.content_hash(), stats=grown.stats)
        landed_at = time.time()
        logger.info(
            "shard %s landed: %d trees, %d answers (%d correct), %d critiques, %d pairs, %.1f tokens/s",
            plan.shard_id, grown.stats.trees, grown.stats.actions, grown.stats.correct,
            grown.stats.critiques, grown.stats.pairs, grown.stats.engine["tokens_per_s"],
        )
        del grown
        try:
            validation = host.validate(tables, plan.shard_id, shard_contamination(cfg, tables))
            validated = record_validation(store, run_id, plan.shard_id, validation)
        except Exception as error:  # noqa: BLE001 - a validation that cannot run is a fate: quarantined, with why
            if is_transient(error) or stop_requested():  # a stop took its processes: validated when the run resumes
                raise
            logger.error("shard %s: validation could not run", plan.shard_id, exc_info=True)
            validated = record_unvalidated(store, run_id, plan.shard_id, error)
    if validated.outcome == "passed":
        logger.info("shard %s validated: all %d expectations passed", plan.shard_id, len(validated.rows))
    else:
        logger.warning("shard %s quarantined: %s", plan.shard_id, validated.summary)
    update_progress_artifact(moving, progress=100.0)
    state = "landed" if validated.outcome == "passed" else "quarantined"
    return ShardReceipt.of_manifest(plan.shard_id, state, manifest, validation=validated, healed=healed,
                                    landed_at=landed_at)


def with_stored_validation(store: ObjectStore, run_id: str, receipt: ShardReceipt) -> ShardReceipt:
    """Return the receipt of a shard an earlier attempt landed, with the validation recorded beside it, if any."""
    if receipt.state != "reused":
        return receipt
    return dataclasses.replace(receipt, validation=stored_validation(store, run_id, receipt.shard_id))
