"""The shard-growth core every growth phase uses: the trees' nodes, the request runner, verification and seeds.

It knows no algorithm. A phase (tasks/turns.py, tasks/mcts.py, tasks/principles.py, tasks/inject.py,
tasks/jury.py) works on one tree at a time: it builds a `Request`, `ask`s it as soon as the answers it depends on
are verified, records the answers as nodes and `verify`s them. Every tree runs on its own clock, so there is no
barrier across the shard: the engine client's per-endpoint concurrency is the only throttle, and its queue serves
the requests with the longest chain of dependent levels still to come first (`Request.priority`).

Nothing depends on the order answers arrive in: node ids, seeds and texts follow from the plan and the config,
and `Shard.ordered` puts every table in plan order at the end.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence

from orchard.config import HygieneConfig, RunConfig
from orchard.engine import ChatEngine, Completion, EngineError, Sampling
from schemas import rows
from schemas.errors import OrchardError
from schemas.plan import Instruction, ShardPlan
from tasks.hygiene import Drops, clean_pairs
from tasks.pairs import found_pairs
from tasks.verify import Verdict

# Verifies (instruction, answer text) items without blocking the event loop (tasks/verify.py: Verifiers.verify).
Checker = Callable[[Sequence[tuple[Instruction, str]]], Awaitable[list[Verdict]]]
# progress(levels done, levels planned): called as the shard's trees finish request levels.
Progress = Callable[[int, int], None]


class GrowError(OrchardError):
    """A shard could not be grown; the message says which request failed and why."""


def node_id(*parts: object) -> str:
    """Return a content-derived id: the same parts give the same id in every run."""
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:16]


def sample_seed(base: int, *parts: object) -> int:
    """Return a request seed, so the same run id and config ask the engine the same questions."""
    return int(node_id(base, *parts), 16) % 2**31


@dataclass(frozen=True)
class Request:
    """One request: `n` siblings under `parent`, all sent the same messages, answered by `engine`."""

    tree: "Tree"
    parent: Mapping
    role: str  # the role of the nodes it produces
    messages: list[dict[str, str]]
    sampling: Sampling
    n: int
    strategy: str | None
    template: str
    turn: int | None
    engine: ChatEngine
    prefix: str | None = None  # set: continue an assistant answer that starts with this text (MCTS)
    priority: int = 0  # dependent request levels of its tree still to come after it: the longer, the sooner sent

    @property
    def instruction(self) -> Instruction:
        return self.tree.instruction


@dataclass(eq=False)  # identity: one tree of one shard
class Tree:
    """One instruction's tree: its root, its nodes so far, and how many request levels it plans and has done."""

    index: int  # its place in the plan: tables list trees in plan order
    instruction: Instruction
    root: dict
    nodes: list[dict] = field(default_factory=list)
    injected_pairs: list[dict] = field(default_factory=list)  # error-injection pairs (tasks/inject.py)
    planned: int = 0
    done: int = 0
    pairs_found: list[dict] | None = None  # once grown: every pair it holds, before curation (Shard.found_pairs)

    @property
    def tree_id(self) -> str:
        return self.root["tree_id"]


class Phase:
    """A growth method. `grow` grows one tree, after the phases named in `needs` finished that tree; `finish` does
    the shard-wide part once every tree is grown and the shard's pairs are chosen. `levels` is how many dependent
    request levels it plans for one tree at most: the shard's progress."""

    name = "phase"
    needs: tuple[str, ...] = ()

    def start(self, shard: "Shard") -> None:
        """Prepare to grow `shard`'s trees, before any request is sent; raise GrowError when the phase cannot grow
        this shard (a missing engine, an unknown strategy)."""

    def levels(self, instruction: Instruction, run: RunConfig) -> int:
        return 0

    async def grow(self, shard: "Shard", tree: Tree) -> None:
        """Grow `tree`."""

    async def finish(self, shard: "Shard") -> None:
        """Do the shard-wide part, after every tree."""


def blank_node(common: Mapping, tree_id: str, nid: str, parent_id: str | None, instruction: Instruction, depth: int,
               role: str) -> dict:
    """Return a nodes row with its identity filled in and every other column None."""
    node = dict.fromkeys(rows.NODES.names)
    node.update(common, tree_id=tree_id, node_id=nid, parent_id=parent_id, instruction_id=instruction.instruction_id,
                depth=depth, role=role, prompt=[])
    return node


async def all_of(coroutines: Iterable[Coroutine]) -> list:
    """Run `coroutines` concurrently and return their results in order; the first error cancels the rest."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class Shard:
    """The state of one shard's growth: its trees and nodes, the engines playing each role, what every phase
    produced, and the requests sent and failed."""

    def __init__(self, plan: ShardPlan, run_id: str, run: RunConfig, engines: Mapping[str, ChatEngine],
                 check: Checker, progress: Progress | None = None, hygiene: HygieneConfig | None = None) -> None:
        self.plan, self.run_id, self.run, self.engines, self.check, self.progress = plan, run_id, run, engines, check, progress
        self.hygiene = hygiene or HygieneConfig()
        self.drops = Drops()  # what pair hygiene, curation and the jury's labels left out, and why
        self.common = {"run_id": run_id, "shard_id": plan.shard_id}
        self.instructions = {i.instruction_id: i for i in plan.instructions}
        self.trees: list[Tree] = []
        self.nodes: list[dict] = []
        self.examples: list[dict] = []  # principle examples (tasks/principles.py), labelled by the jury
        self.pairs: list[dict] = []  # the shard's curated pairs, once every tree is grown
        self.judgements: list[dict] = []
        self.counts: dict[str, dict] = {}  # a phase's own statistics (e.g. the search's), by phase
        self.sent = 0
        self.failed: list[tuple[Request, EngineError]] = []  # requests that failed after the client's retries
        self.levels_planned = 0
        self.levels_done = 0
        self._reported = -1
        for index, instruction in enumerate(plan.instructions):
            tree_id = node_id(run_id, instruction.instruction_id)
            root = blank_node(self.common, tree_id, node_id(tree_id, "root"), None, instruction, 0, "instruction")
            root["text"] = instruction.text
            self.trees.append(Tree(index, instruction, root, [root]))
            self.nodes.append(root)
        self.tree_of = {tree.tree_id: tree for tree in self.trees}

    def engine(self, role: str) -> ChatEngine:
        """Return the engine that plays `role` (generator, critic, refiner)."""
        try:
            return self.engines[role]
        except KeyError:
            raise GrowError(f"roles.{role}: no engine plays this role") from None

    def sampling(self, max_tokens: int, *seed_parts: object) -> Sampling:
        """Return the run's sampling with `max_tokens` and a seed derived from `seed_parts`."""
        return Sampling(temperature=self.run.temperature, top_p=self.run.top_p, max_tokens=max_tokens,
                        seed=sample_seed(self.run.seed, *seed_parts))

    # --- the request runner ---------------------------------------------------------------------------------

    async def ask(self, request: Request) -> list[Completion] | None:
        """Return the request's `n` completions, or None when it failed after the engine client's retries (it is
        counted, and its nodes are not grown). Any other error is a defect, not a request to count: it is raised."""
        self.sent += 1
        try:
            if request.prefix is None:
                return await request.engine.chat(request.messages, request.sampling, request.n,
                                                  priority=request.priority)
            return await request.engine.continue_chat(request.messages, request.prefix, request.sampling, request.n,
                                                      priority=request.priority)
        except EngineError as error:
            self.failed.append((request, error))
            return None

    def add_answers(self, request: Request, completions: Sequence[Completion] | None) -> list[dict]:
        """Turn the request's completions into child nodes of its parent (none for a failed request); return them."""
        parent, children = request.parent, []
        for k, completion in enumerate(completions or ()):
            node = blank_node(self.common, request.tree.tree_id, node_id(parent["node_id"], request.role, request.strategy, k),
                              parent["node_id"], request.instruction, parent["depth"] + 1, request.role)
            node.update(
                strategy=request.strategy, prompt=request.messages, text=(request.prefix or "") + completion.text,
                model=completion.model, temperature=request.sampling.temperature, top_p=request.sampling.top_p,
                max_tokens=request.sampling.max_tokens, sample_seed=completion.seed,
                prompt_template_version=request.template, prompt_tokens=completion.prompt_tokens,
                completion_tokens=completion.completion_tokens, finish_reason=completion.finish_reason,
                cached_tokens=completion.cached_tokens, turn=request.turn,
            )
            children.append(node)
        self.add_nodes(request.tree, children)
        return children

    async def grow_nodes(self, request: Request) -> list[dict]:
        """Ask `request` and return its answers as nodes (none when it failed)."""
        return self.add_answers(request, await self.ask(request))

    def add_nodes(self, tree: Tree, nodes: Sequence[dict]) -> None:
        tree.nodes.extend(nodes)
        self.nodes.extend(nodes)

    async def verify(self, nodes: Sequence[dict]) -> None:
        """Record each node's verdict, score, verifier and the feedback its next turn sees."""
        if not nodes:
            return
        verdicts = await self.check([(self.instructions[n["instruction_id"]], n["text"]) for n in nodes])
        for node, verdict in zip(nodes, verdicts):
            node.update(verdict=verdict.verdict, score=verdict.score, verifier=verdict.verifier,
                        verifier_detail=verdict.detail, feedback=verdict.feedback,
                        failure_reason=verdict.failure_reason, sandbox_exit_code=verdict.exit_code,
                        sandbox_stdout=verdict.stdout, sandbox_stderr=verdict.stderr)

    def failure_stats(self) -> dict:
        """Return the requests sent and failed, the failures by reason, and the first failure (in plan order)."""
        by_reason: dict[str, int] = defaultdict(int)
        for _, error in self.failed:
            by_reason[error.reason] += 1
        stats = {"sent": self.sent, "failed": len(self.failed), "failed_by_reason": dict(sorted(by_reason.items()))}
        if self.failed:
            request, error = self.first_failure()
            stats["first_failure"] = (f"instruction {request.instruction.instruction_id} ({request.role}"
                                      f"{', ' + request.strategy if request.strategy else ''}): {error}")[:500]
        return stats

    def first_failure(self) -> tuple[Request, EngineError]:
        """The failed request first in plan order (not in the order the failures happened to arrive)."""
        return min(self.failed, key=lambda f: (f[0].tree.index, f[0].parent["node_id"], f[0].role, f[0].strategy or ""))

    # --- progress -------------------------------------------------------------------------------------------

    def level_done(self, tree: Tree, levels: int = 1) -> None:
        """Count `levels` of `tree`'s planned request levels as done (at most what it planned)."""
        levels = min(levels, tree.planned - tree.done)
        tree.done += levels
        self.advance(levels)

    def advance(self, levels: int) -> None:
        self.levels_done += levels
        if self.progress is None or self.levels_planned == 0:
            return
        tenth = 10 * self.levels_done // self.levels_planned
        if tenth > self._reported:  # about every tenth of the shard, and at the end
            self._reported = tenth
            self.progress(self.levels_done, self.levels_planned)

    # --- growing every tree ---------------------------------------------------------------------------------

    async def grow(self, phases: Sequence[Phase]) -> None:
        """Grow every tree through `phases`, each tree on its own clock: a tree's phase starts as soon as the phases
        it needs have finished that tree, whatever the other trees are doing."""
        for tree in self.trees:
            tree.planned = sum(phase.levels(tree.instruction, self.run) for phase in phases)
        self.levels_planned = sum(t.planned for t in self.trees)
        await all_of(self._grow_tree(tree, phases) for tree in self.trees)

    async def _grow_tree(self, tree: Tree, phases: Sequence[Phase]) -> None:
        finished: dict[str, asyncio.Future] = {}

        async def grow(phase: Phase) -> None:
            await asyncio.gather(*(finished[name] for name in phase.needs))
            await phase.grow(self, tree)

        for phase in phases:  # listed after the phases they need
            unknown = [name for name in phase.needs if name not in finished]
            if unknown:
                raise GrowError(f"phase {phase.name} needs {', '.join(unknown)}, which is not listed before it")
            finished[phase.name] = asyncio.ensure_future(grow(phase))
        await all_of(finished.values())
        self.level_done(tree, tree.planned - tree.done)  # levels a tree did not need (every answer was right)

    async def finish(self, phases: Sequence[Phase]) -> None:
        """Run each phase's shard-wide part, in order."""
        for phase in phases:
            await phase.finish(self)
        self.advance(self.levels_planned - self.levels_done)

    def found_pairs(self, tree: Tree) -> list[dict]:
        """Return every pair `tree` holds that passes pair hygiene, before curation (tasks/pairs.py: found_pairs), once
        all its phases are done: found once, for the jury and for the shard's curation; the others go to `drops`."""
        if tree.pairs_found is None:
            ordered = sorted(tree.nodes, key=lambda n: (n["depth"], n["node_id"]))  # not the order answers arrived in
            tree.pairs_found = clean_pairs(found_pairs(ordered, self.instructions, tree.injected_pairs), self.hygiene,
                                           self.drops)
        return tree.pairs_found

    def ordered(self) -> None:
        """Put nodes and principle examples in plan order: the tables do not depend on the order in which answers
        arrived."""
        index = {tree.tree_id: tree.index for tree in self.trees}
        self.nodes.sort(key=lambda n: (index[n["tree_id"]], n["depth"], n["node_id"]))
        self.examples.sort(key=lambda e: index[e["tree_id"]])  # stable: a tree's examples keep their order
