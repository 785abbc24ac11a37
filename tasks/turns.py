"""Turns, UltraInteract style: first attempts under several strategies, then critique and refinement of wrong ones.

Turn 1: every verified instruction is answered under several planning strategies, several samples each (one
request with `n`). Turn t > 1: up to `refine_per_tree` wrong answers of the tree's last turn get the environment's
feedback and a critic's critique; a refiner answers again with the whole history, so a child's prompt starts with
its parent's exact messages and prefix caches hit. A domain's strategies and its parts of the prompts (role, answer
format, what the critic sees of the reference) are its entry in schemas/domains.py. Each attempt's critique is sent as soon as its attempt is
verified, and its refinement as soon as the critique returns; only the choice of which answers of a tree to refine
waits for that tree's turn to be verified.
"""

from __future__ import annotations

from typing import Mapping

from orchard.config import RunConfig
from schemas.domains import DOMAINS, Domain
from schemas.plan import Instruction
from tasks.growth import GrowError, Phase, Request, Shard, Tree, all_of

ACTION_TEMPLATE = "action/v2"
CRITIQUE_TEMPLATE = "critique/v1"
REFINE_TEMPLATE = "refine/v1"

CRITIC_SYSTEM = (
    "You review a student's attempt at a task. In at most three sentences, say what is wrong and how to fix it. "
    "Do not write the full solution."
)
REFINE_REQUEST = "{feedback}\nA reviewer says: {critique}\nWrite a corrected solution. {format}"
CRITIC_REFERENCE_CHARS = 1500  # the most of an instruction's reference its critic is shown


def domain_of(instruction: Instruction) -> Domain:
    """Return the registry entry of `instruction`'s domain; GrowError when turns have no strategies for it."""
    domain = DOMAINS.get(instruction.domain)
    if domain is None or not domain.strategies:
        raise GrowError(f"instruction {instruction.instruction_id}: no strategies for domain {instruction.domain!r}")
    return domain


def strategies_for(run: RunConfig, domain: str) -> tuple[str, ...]:
    """Return the strategies configured for `domain`: the run setting its registry entry names, else (a domain with
    no setting of its own) all of its strategies, in order."""
    entry = DOMAINS[domain]
    return getattr(run, entry.strategies_setting) if entry.strategies_setting else tuple(entry.strategies)


def action_messages(instruction: Instruction, strategy: str) -> list[dict[str, str]]:
    """Return the exact chat messages an action under `strategy` is generated from."""
    domain = domain_of(instruction)
    if strategy not in domain.strategies:
        raise GrowError(
            f"run strategies: unknown {domain.name} strategy {strategy!r} (known: {', '.join(domain.strategies)})"
        )
    system = domain.system.format(strategy=domain.strategies[strategy], format=domain.answer_format)
    return [{"role": "system", "content": system}, {"role": "user", "content": instruction.text}]


def critique_messages(instruction: Instruction, attempt: Mapping) -> list[dict[str, str]]:
    """Return the critic's messages: the task, the reference, the attempt and what the checker said of it."""
    reference = domain_of(instruction).critic_reference.format(reference=instruction.reference[:CRITIC_REFERENCE_CHARS])
    return [
        {"role": "system", "content": CRITIC_SYSTEM},
        {"role": "user", "content": f"Task:\n{instruction.text}\n\n{reference}\n\nAttempt:\n{attempt['text']}\n\n"
                                    f"The checker said: {attempt['feedback']}"},
    ]


def refine_messages(instruction: Instruction, attempt: Mapping, critique: str) -> list[dict[str, str]]:
    """Return the refiner's messages: the attempt's exact history, then feedback and critique as the next user turn."""
    request = REFINE_REQUEST.format(feedback=attempt["feedback"], critique=critique.strip(),
                                    format=domain_of(instruction).answer_format)
    return [*attempt["prompt"], {"role": "assistant", "content": attempt["text"]}, {"role": "user", "content": request}]


def answered_by_turns(instruction: Instruction) -> bool:
    """Whether turns answer `instruction`: every domain but the judged ones (open-ended prompts), which have no
    checker and grow under principles instead. A domain without an entry is turns' to refuse (`domain_of`)."""
    domain = DOMAINS.get(instruction.domain)
    return domain is None or not domain.judged


class Turns(Phase):
    """First attempts under each strategy, then critique-refine turns of the wrong ones."""

    name = "turns"

    def start(self, shard: Shard) -> None:
        shard.engine("generator")
        if shard.run.turns > 1:
            shard.engine("critic"), shard.engine("refiner")
        for instruction in shard.plan.instructions:
            if answered_by_turns(instruction):  # fail before any request on an unknown domain or strategy
                for strategy in strategies_for(shard.run, domain_of(instruction).name):
                    action_messages(instruction, strategy)

    def levels(self, instruction: Instruction, run: RunConfig) -> int:
        # Turn 1's actions, then a critique level and a refinement level per further turn.
        return 1 + 2 * (run.turns - 1) if answered_by_turns(instruction) else 0

    async def grow(self, shard: Shard, tree: Tree) -> None:
        if not answered_by_turns(tree.instruction):
            return
        run = shard.run
        answered = await all_of(self._act(shard, tree, strategy)
                                for strategy in strategies_for(run, tree.instruction.domain))
        frontier = [node for nodes in answered for node in nodes]
        shard.level_done(tree)
        for turn in range(2, run.turns + 1):
            wrong = sorted((n for n in frontier if n["verdict"] != "correct"), key=lambda n: n["node_id"])
            attempts = wrong[: run.refine_per_tree]
            if not attempts:
                return
            refined = await all_of(self._refine(shard, tree, attempt, turn) for attempt in attempts)
            frontier = [node for nodes in refined for node in nodes]
            shard.level_done(tree, 2)
            if not frontier:
                return

    async def _act(self, shard: Shard, tree: Tree, strategy: str) -> list[dict]:
        """Ask for the turn-1 samples under `strategy` and verify them."""
        run = shard.run
        actions = await shard.grow_nodes(Request(
            tree, tree.root, "action", action_messages(tree.instruction, strategy),
            shard.sampling(run.max_tokens, tree.tree_id, strategy), run.samples_per_strategy, strategy,
            ACTION_TEMPLATE, 1, shard.engine("generator"), priority=2 * (run.turns - 1),
        ))
        await shard.verify(actions)
        return actions

    async def _refine(self, shard: Shard, tree: Tree, attempt: dict, turn: int) -> list[dict]:
        """Critique `attempt`, refine it under that critique, verify; return the refinements (none when a request
        failed)."""
        run, instruction = shard.run, tree.instruction
        remaining = 2 * (run.turns - turn)  # levels of further turns after this one's refinement
        critiques = await shard.grow_nodes(Request(
            tree, attempt, "critique", critique_messages(instruction, attempt),
            shard.sampling(run.critique_max_tokens, attempt["node_id"], "critique"), 1, None, CRITIQUE_TEMPLATE,
            None, shard.engine("critic"), priority=remaining + 1,
        ))
        if not critiques:
            return []
        (critique,) = critiques
        refinements = await shard.grow_nodes(Request(
            tree, critique, "refinement", refine_messages(instruction, attempt, critique["text"]),
            shard.sampling(run.max_tokens, critique["node_id"], "refine"), run.refine_samples, attempt["strategy"],
            REFINE_TEMPLATE, turn, shard.engine("refiner"), priority=remaining,
        ))
        await shard.verify(refinements)
        return refinements
