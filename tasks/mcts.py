"""Monte Carlo tree search over answer steps, across every tree of a shard (the pure part: no I/O).

An answer is grown in steps. Each searched tree's root is its instruction; a step node holds the answer so
far. One round selects leaves by PUCT from a virtual root over all the shard's trees, so the search spends
its expansions where they look most useful across the shard; virtual loss spreads one round's selections
over different leaves so they can be expanded as one batch. Each new child is valued once,

    value = (1 - λ) · verifier score + λ · self-evaluation

(the verifier scores the finished answer, or for an unfinished step one rollout of it to the end; the
self-evaluation is the model's own probability that the partial answer is right), and the value is backed
up to the root. Q = mean value of the subtree; visits count its values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence


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
