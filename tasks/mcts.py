"""Monte Carlo tree search over answer steps, one searched tree at a time: the pure search and its driver.

An answer is grown in steps. Each searched tree's root is its instruction; a step node holds the answer so far.
Each round of a tree selects one leaf by PUCT (virtual loss spreads a batch of selections over different leaves),
asks for `mcts_width` continuations of it, and values each new child once,

    value = (1 - λ) · verifier score + λ · self-evaluation

(the verifier scores the finished answer, or for an unfinished step one rollout of it to the end; the
self-evaluation is the model's own probability that the partial answer is right), and backs the value up to the
root. Q = mean value of the subtree; visits count its values. A tree's next round starts as soon as its previous
backup is done, whatever the shard's other trees are doing; the values are backed up in the children's order, so
the search does not depend on which answer arrived first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from orchard.config import RunConfig
from orchard.engine import Sampling
from schemas.plan import Instruction
from tasks.growth import Phase, Request, Shard, Tree, all_of, sample_seed
from tasks.turns import action_messages, strategies_for

STEP_TEMPLATE = "step/v1"  # an MCTS step continues the action prompt of the tree's first strategy
ROLLOUT_TEMPLATE = "rollout/v1"
SELF_EVAL_TEMPLATE = "self_eval/v1"
SELF_EVAL_SYSTEM = "You check partial answers to tasks. Reply with one word: Yes or No."
SELF_EVAL_REQUEST = (
    "Task:\n{task}\n\nPartial answer so far:\n<<<\n{partial}\n>>>\n\n"
    "Is the partial answer correct so far and on track to a correct, complete answer?"
)
SELF_EVAL_TOP_LOGPROBS = 10


@dataclass(eq=False)  # identity: one node of one search
class SearchNode:
    """A node of the search: the row it writes, its children and its statistics."""

    row: dict
    parent: "SearchNode | None" = None
    terminal: bool = False  # the answer ended (or hit the step limit): never expanded
    steps: int = 0  # steps from the root
    children: list["SearchNode"] = field(default_factory=list)
    visits: int = 0
    value_sum: float = 0.0
    virtual: int = 0  # pending selections in this round (virtual loss: counted as visits worth 0)

    @property
    def q(self) -> float:
        """Mean backed-up value; 0 while unvisited."""
        return self.value_sum / self.visits if self.visits else 0.0

    def add_child(self, row: dict, terminal: bool) -> "SearchNode":
        child = SearchNode(row=row, parent=self, terminal=terminal, steps=self.steps + 1)
        self.children.append(child)
        return child


def node_value(verifier_score: float, self_eval: float | None, lam: float) -> float:
    """Return (1 - λ) · verifier + λ · self-evaluation; the verifier alone when the self-evaluation is missing."""
    if self_eval is None:
        return verifier_score
    return (1 - lam) * verifier_score + lam * self_eval


def _puct(child: SearchNode, parent_visits: int, prior: float, c_puct: float) -> float:
    visits = child.visits + child.virtual
    q = child.value_sum / visits if visits else 0.0
    return q + c_puct * prior * math.sqrt(parent_visits + 1) / (1 + visits)


def _best(candidates: Sequence[SearchNode], parent_visits: int, c_puct: float) -> SearchNode:
    prior = 1.0 / len(candidates)  # uniform prior over the open candidates
    return max(candidates, key=lambda c: (_puct(c, parent_visits, prior, c_puct), -candidates.index(c)))


def select(roots: Sequence[SearchNode], c_puct: float, batch: int) -> list[SearchNode]:
    """Return up to `batch` distinct leaves to expand, chosen one after another by PUCT from a virtual root.

    Each selection adds a virtual visit along its path, so the next one prefers other branches; the virtual
    visits are removed before returning. Exhausted subtrees are never entered.
    """
    chosen: list[SearchNode] = []

    def closed(node: SearchNode) -> bool:  # nothing below it can be picked this round
        if not node.children:
            return node.terminal or node in chosen
        return all(closed(child) for child in node.children)

    try:
        for _ in range(batch):
            open_roots = [r for r in roots if not closed(r)]
            if not open_roots:
                break
            node = _best(open_roots, sum(r.visits + r.virtual for r in roots), c_puct)
            while node.children:
                node = _best([c for c in node.children if not closed(c)], node.visits + node.virtual, c_puct)
            chosen.append(node)
            walk: SearchNode | None = node
            while walk is not None:
                walk.virtual += 1
                walk = walk.parent
    finally:
        for leaf in chosen:
            walk = leaf
            while walk is not None:
                walk.virtual = 0
                walk = walk.parent
    return chosen


def backup(node: SearchNode, value: float) -> None:
    """Count `value` once on `node` and on every ancestor."""
    walk: SearchNode | None = node
    while walk is not None:
        walk.visits += 1
        walk.value_sum += value
        walk = walk.parent


def descendants(roots: Sequence[SearchNode]) -> list[SearchNode]:
    """Return every node under `roots` (roots first, then depth first)."""
    out: list[SearchNode] = []
    stack = list(reversed(roots))
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(reversed(node.children))
    return out


def yes_probability(top_logprobs: Mapping[str, float] | None) -> float | None:
    """Return P(Yes) / (P(Yes) + P(No)) from a first token's alternatives; None when neither is among them."""
    if not top_logprobs:
        return None
    mass = {"yes": 0.0, "no": 0.0}
    for token, logprob in top_logprobs.items():
        word = token.strip().lower()
        if word in mass:
            mass[word] += math.exp(logprob)
    total = mass["yes"] + mass["no"]
    return mass["yes"] / total if total > 0 else None


# --- the driver: one searched tree's rounds -----------------------------------------------------------------

def searched(instruction: Instruction, run: RunConfig) -> bool:
    """Whether the run searches `instruction`'s tree by MCTS."""
    return instruction.domain in run.mcts_domains and run.mcts_iterations > 0


COUNTS = ("rounds", "expansions", "steps", "rollouts", "self_eval_missing", "unvalued")


class Search(Phase):
    """MCTS over answer steps for the trees of the searched domains."""

    name = "mcts"

    def levels(self, instruction: Instruction, run: RunConfig) -> int:
        # Per round: the expansion, then its children's rollouts and self-evaluations (sent together).
        return 2 * run.mcts_iterations if searched(instruction, run) else 0

    async def grow(self, shard: Shard, tree: Tree) -> None:
        run = shard.run
        if not searched(tree.instruction, run):
            return
        counts = shard.counts.setdefault(self.name, dict.fromkeys(COUNTS, 0))
        root = SearchNode(row=tree.root)
        for round_ in range(1, run.mcts_iterations + 1):
            leaves = select([root], run.mcts_c_puct, batch=1)
            if not leaves:
                break
            (leaf,) = leaves
            counts["rounds"], counts["expansions"] = max(counts["rounds"], round_), counts["expansions"] + 1
            remaining = 2 * (run.mcts_iterations - round_)
            step_rows = await shard.grow_nodes(self._step_request(shard, tree, leaf, remaining + 1))
            children = []
            for row in step_rows:
                finished = row["finish_reason"] != "length" or leaf.steps + 1 >= run.mcts_max_steps
                children.append(leaf.add_child(row, terminal=finished))
            values = await all_of(self._value(shard, tree, child, remaining) for child in children)
            for child, (value, rolled_out, self_eval) in zip(children, values):  # in order: a deterministic search
                counts["rollouts"] += rolled_out
                counts["self_eval_missing"] += self_eval is None
                if value is None:  # its rollout and self-evaluation requests failed
                    counts["unvalued"] += 1
                    continue
                child.row.update(self_eval=self_eval, value=value)
                backup(child, value)
            counts["steps"] += len(children)
            shard.level_done(tree, 2)
        for node in descendants([root]):
            node.row.update(visits=node.visits, q_value=node.q)

    async def _value(self, shard: Shard, tree: Tree, child: SearchNode,
                     remaining: int) -> tuple[float | None, int, float | None]:
        """Verify `child` (its rollout to the end when unfinished) and have the model judge it, together; return
        its value (None when neither is known), whether it was rolled out, and the self-evaluation."""

        async def verified() -> tuple[float | None, int]:
            if child.terminal:
                await shard.verify([child.row])
                return child.row["score"], 0
            rollouts = await shard.grow_nodes(self._rollout_request(shard, tree, child, remaining))
            await shard.verify(rollouts)
            return (rollouts[0]["score"], 1) if rollouts else (None, 0)

        async def judged() -> float | None:
            answers = await shard.ask(self._self_eval_request(shard, tree, child.row, remaining))
            return yes_probability(answers[0].top_logprobs) if answers else None

        (score, rolled_out), self_eval = await all_of([verified(), judged()])
        if score is None:
            return self_eval, rolled_out, self_eval
        return node_value(score, self_eval, shard.run.mcts_lambda), rolled_out, self_eval

    @staticmethod
    def _step_request(shard: Shard, tree: Tree, leaf: SearchNode, priority: int) -> Request:
        """The request for `mcts_width` next steps under `leaf` (a tree root or an unfinished step)."""
        run, row = shard.run, leaf.row
        if leaf.parent is None:  # the root: steps answer the tree's first strategy
            strategy = strategies_for(run, tree.instruction.domain)[0]
            messages, prefix = action_messages(tree.instruction, strategy), ""
        else:
            strategy, messages, prefix = row["strategy"], row["prompt"], row["text"]
        last = leaf.steps + 1 >= run.mcts_max_steps
        budget = max(run.mcts_step_tokens, run.max_tokens - leaf.steps * run.mcts_step_tokens) if last else run.mcts_step_tokens
        return Request(tree, row, "step", messages, shard.sampling(budget, row["node_id"], "step"), run.mcts_width,
                       strategy, STEP_TEMPLATE, 1, shard.engine("generator"), prefix=prefix, priority=priority)

    @staticmethod
    def _rollout_request(shard: Shard, tree: Tree, child: SearchNode, priority: int) -> Request:
        """One continuation of an unfinished step to the end of the answer."""
        run, row = shard.run, child.row
        budget = max(run.mcts_step_tokens, run.max_tokens - child.steps * run.mcts_step_tokens)
        return Request(tree, row, "rollout", row["prompt"], shard.sampling(budget, row["node_id"], "rollout"), 1,
                       row["strategy"], ROLLOUT_TEMPLATE, 1, shard.engine("generator"), prefix=row["text"],
                       priority=priority)

    @staticmethod
    def _self_eval_request(shard: Shard, tree: Tree, row: dict, priority: int) -> Request:
        """The model's own judgement of a partial answer: one token, read as P(Yes) from its logprobs."""
        messages = [{"role": "system", "content": SELF_EVAL_SYSTEM},
                    {"role": "user", "content": SELF_EVAL_REQUEST.format(task=tree.instruction.text, partial=row["text"])}]
        sampling = Sampling(temperature=0.0, top_p=1.0, max_tokens=1,
                            seed=sample_seed(shard.run.seed, row["node_id"], "self_eval"),
                            top_logprobs=SELF_EVAL_TOP_LOGPROBS)
        return Request(tree, row, "self_eval", messages, sampling, 1, None, SELF_EVAL_TEMPLATE, None,
                       shard.engine("generator"), priority=priority)
