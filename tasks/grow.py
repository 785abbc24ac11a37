"""Grow the preference trees of one shard, UltraInteract style, level by level across the whole shard.

Turn 1: every instruction is answered under several planning strategies, several samples each.
Turn t > 1: wrong answers get the environment's feedback and a critic's critique; a refiner answers again
with the whole history. Every answer is verified. All requests of one level, across every tree of the
shard, are in flight together (bounded per endpoint by the engine client), so engines never wait on
Orchard between trees; a child's prompt starts with its parent's exact messages, so prefix caches hit.
Side by side with those turns, trees of the searched domains grow answers step by step by MCTS
(tasks/mcts.py): each round's expansions, rollouts and self-evaluations are again one batch per shard.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from orchard.config import Config, RunConfig
from orchard.engine import ChatEngine, Completion, EngineClient, EngineError, Sampling, Usage
from orchard.engine import PrefixCache, counters_delta, prefix_cache_counters
from orchard.errors import OrchardError
from orchard.store import ObjectStore
from schemas import rows
from tasks.land import land_shard, resume_shard
from tasks.mcts import SearchNode, backup, descendants, node_value, select
from tasks import jury as juries
from tasks.inject import error_candidates
from tasks.pairs import ERROR_INJECTION, pair_row, constraint_count, curate, extract_pairs, mcts_pairs, pass_rates
from tasks.principles import Constitution, load_constitution
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
STEP_TEMPLATE = "step/v1"  # an MCTS step continues the action prompt of the tree's first strategy
ROLLOUT_TEMPLATE = "rollout/v1"
SELF_EVAL_TEMPLATE = "self_eval/v1"
SELF_EVAL_SYSTEM = "You check partial answers to tasks. Reply with one word: Yes or No."
SELF_EVAL_REQUEST = (
    "Task:\n{task}\n\nPartial answer so far:\n<<<\n{partial}\n>>>\n\n"
    "Is the partial answer correct so far and on track to a correct, complete answer?"
)
SELF_EVAL_TOP_LOGPROBS = 10
# Open-ended prompts: the same request answered under a principle, under its antithesis, and under neither.
PRINCIPLED_TEMPLATE = "principled/v1"
PRINCIPLED_SYSTEM = "You are a helpful assistant. Write your answer under this principle: {principle}"
UNCONDITIONED_SYSTEM = "You are a helpful assistant."
INJECT_TEMPLATE = "inject/v1"
INJECT_TRIES = 4  # edited candidates verified per correct answer; the first the verifier fails is kept
VERIFIED_DOMAINS = ("math", "code")  # where a minimally edited answer can be proven wrong

Checker = Callable[[Sequence[tuple[Instruction, str]]], list[Verdict]]
Progress = Callable[[str, int, int], None]


class GrowError(OrchardError):
    """A shard could not be grown; the message says which request failed and why."""


@dataclass
class GrownShard:
    """What one shard's growth produced, as rows for the shard tables, plus its statistics."""

    instructions: list[dict] = field(default_factory=list)
    nodes: list[dict] = field(default_factory=list)
    pairs: list[dict] = field(default_factory=list)
    trees: list[dict] = field(default_factory=list)
    principle_examples: list[dict] = field(default_factory=list)
    judgements: list[dict] = field(default_factory=list)
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
    prefix: str | None = None  # set: continue an assistant answer that starts with this text (MCTS)
    engine: ChatEngine | None = None  # set: this engine answers (a judge's), not the one playing the role


@dataclass(frozen=True)
class Judge:
    """A member of the jury: its name, its rubric (tasks/jury.py: RUBRICS) and the engine it runs on."""

    name: str
    rubric: str
    engine: ChatEngine


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
                 check: Checker, progress: Progress | None, jury: Sequence[Judge],
                 constitution: Constitution) -> None:
        self.plan, self.run, self.engines, self.check, self.progress = plan, run, engines, check, progress
        self.jury, self.constitution = tuple(jury), constitution
        self.common = {"run_id": run_id, "shard_id": plan.shard_id}
        self.run_id = run_id
        self.nodes: list[dict] = []
        self.instructions = {i.instruction_id: i for i in plan.instructions}
        self.sent = 0
        self.failed: list[tuple[_Request, EngineError]] = []  # requests that failed after the client's retries

    async def ask(self, label: str, requests: Sequence[_Request]) -> list[list[Completion] | None]:
        """Send every request of one level at once; return each one's `n` completions, in order (None for a
        request that failed after the engine client's retries: it is counted, and its nodes are not grown)."""
        done, step = 0, max(1, len(requests) // 10)

        async def one(request: _Request) -> list[Completion]:
            nonlocal done
            engine = request.engine or self.engines[_ROLE_ENGINE[request.role]]
            if request.prefix is None:
                answers = await engine.chat(request.messages, request.sampling, request.n)
            else:
                answers = await engine.continue_chat(request.messages, request.prefix, request.sampling, request.n)
            done += 1
            if self.progress is not None and (done % step == 0 or done == len(requests)):
                self.progress(label, done, len(requests))
            return answers

        results = await asyncio.gather(*(one(r) for r in requests), return_exceptions=True)
        self.sent += len(requests)
        answers: list[list[Completion] | None] = []
        for request, result in zip(requests, results):
            if isinstance(result, EngineError):
                self.failed.append((request, result))
                answers.append(None)
            elif isinstance(result, BaseException):
                raise result  # not the engine's failure: a defect to see, not a request to count
            else:
                answers.append(result)
        return answers

    def failure_stats(self) -> dict:
        """Return the requests sent and failed, the failures by reason, and the first failure's description."""
        by_reason: dict[str, int] = defaultdict(int)
        for _, error in self.failed:
            by_reason[error.reason] += 1
        stats = {"sent": self.sent, "failed": len(self.failed), "failed_by_reason": dict(sorted(by_reason.items()))}
        if self.failed:
            request, error = self.failed[0]
            stats["first_failure"] = (f"instruction {request.instruction.instruction_id} ({request.role}"
                                      f"{', ' + request.strategy if request.strategy else ''}): {error}")[:500]
        return stats

    def add_answers(self, requests: Sequence[_Request], answers: Sequence[list[Completion] | None]) -> list[dict]:
        """Turn each request's completions into child nodes of its parent (none for a failed request); return them."""
        children = []
        for request, completions in zip(requests, answers):
            for k, completion in enumerate(completions or ()):
                node = _blank_node(self.common, request.tree_id, _id(request.parent["node_id"], request.role, request.strategy, k),
                                   request.parent["node_id"], request.instruction, request.parent["depth"] + 1,
                                   request.role)
                node.update(
                    strategy=request.strategy, prompt=request.messages, text=(request.prefix or "") + completion.text,
                    model=completion.model,
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

    def plant(self) -> list[dict]:
        """Add and return each instruction's tree root."""
        roots = []
        for instruction in self.plan.instructions:
            tree_id = _id(self.run_id, instruction.instruction_id)
            root = _blank_node(self.common, tree_id, _id(tree_id, "root"), None, instruction, 0, "instruction")
            root["text"] = instruction.text
            roots.append(root)
        self.nodes.extend(roots)
        return roots

    async def first_turn(self, roots: Sequence[dict]) -> list[dict]:
        requests = []
        for root in roots:
            instruction, tree_id = self.instructions[root["instruction_id"]], root["tree_id"]
            if instruction.domain == "open_ended":  # no checker: grown under principles instead
                continue
            for strategy in strategies_for(self.run, instruction.domain):
                requests.append(_Request(
                    instruction, tree_id, root, "action", action_messages(instruction, strategy),
                    self.sampling(self.run.max_tokens, tree_id, strategy), self.run.samples_per_strategy,
                    strategy, ACTION_TEMPLATE, 1,
                ))
        if not requests:
            return []
        actions = self.add_answers(requests, await self.ask("turn 1 actions", requests))
        self.verify(actions)
        return actions

    async def write_principled(self, roots: Sequence[dict]) -> list[dict]:
        """Answer each open-ended prompt under each of its sampled principles, under their antitheses, and under
        no principle; return one principle_examples row per (prompt, principle), not yet judged."""
        open_roots = [r for r in roots if self.instructions[r["instruction_id"]].domain == "open_ended"]
        if not open_roots:
            return []
        requests, sampled = [], {}
        for root in open_roots:
            instruction, tree_id = self.instructions[root["instruction_id"]], root["tree_id"]
            rng = random.Random(sample_seed(self.run.seed, tree_id, "principles"))
            count = min(self.run.principles_per_prompt, len(self.constitution.principles))
            sampled[tree_id] = rng.sample(self.constitution.principles, count)
            user = {"role": "user", "content": instruction.text}
            requests.append(_Request(instruction, tree_id, root, "unconditioned",
                                     [{"role": "system", "content": UNCONDITIONED_SYSTEM}, user],
                                     self.sampling(self.run.principle_max_tokens, tree_id, "unconditioned"), 1, None,
                                     PRINCIPLED_TEMPLATE, 1))
            for principle in sampled[tree_id]:
                for role, text in (("principled", principle.text), ("antithesis", principle.antithesis)):
                    requests.append(_Request(
                        instruction, tree_id, root, role,
                        [{"role": "system", "content": PRINCIPLED_SYSTEM.format(principle=text)}, user],
                        self.sampling(self.run.principle_max_tokens, tree_id, principle.principle_id, role), 1,
                        principle.principle_id, PRINCIPLED_TEMPLATE, 1,
                    ))
        written = self.add_answers(requests, await self.ask("principled responses", requests))
        by_key = {(n["tree_id"], n["role"], n["strategy"]): n for n in written}
        examples = []
        for root in open_roots:
            tree_id = root["tree_id"]
            plain = by_key.get((tree_id, "unconditioned", None))
            for principle in sampled[tree_id]:
                response = by_key.get((tree_id, "principled", principle.principle_id))
                contrast = by_key.get((tree_id, "antithesis", principle.principle_id))
                if plain is None or response is None or contrast is None:
                    continue  # one of its requests failed (counted in the shard's requests): no example
                examples.append({
                    **self.common, "tree_id": tree_id, "example_id": _id(tree_id, principle.principle_id),
                    "instruction_id": root["instruction_id"], "prompt": root["text"],
                    "constitution": self.constitution.label, "principle_id": principle.principle_id,
                    "principle": principle.text, "antithesis": principle.antithesis,
                    "response_node_id": response["node_id"], "response": response["text"],
                    "antithesis_node_id": contrast["node_id"], "antithesis_response": contrast["text"],
                    "unconditioned_node_id": plain["node_id"], "unconditioned_response": plain["text"],
                    "model": response["model"], "label": None, "jury_winner": None, "votes_response": None,
                    "votes_antithesis": None, "votes_tie": None, "judges": None,
                })
        return examples

    def inject_errors(self) -> list[dict]:
        """Make hard negatives: for up to `hard_negatives_per_tree` correct math or code answers per tree, the first
        minimally edited copy the verifier fails becomes an `injected` sibling; return one pair per such copy."""
        per_tree = self.run.hard_negatives_per_tree
        if per_tree == 0:
            return []
        sources: dict[str, list[dict]] = defaultdict(list)
        for node in sorted(self.nodes, key=lambda n: n["node_id"]):
            instruction = self.instructions[node["instruction_id"]]
            if node["role"] in ("action", "refinement") and node["verdict"] == "correct" \
                    and instruction.domain in VERIFIED_DOMAINS and len(sources[node["tree_id"]]) < 2 * per_tree:
                sources[node["tree_id"]].append(node)
        candidates = []
        for nodes in sources.values():
            for source in nodes:
                domain = self.instructions[source["instruction_id"]].domain
                for edit in error_candidates(source["text"], domain, seed=sample_seed(self.run.seed, source["node_id"]),
                                             limit=INJECT_TRIES):
                    node = {**source, "node_id": _id(source["node_id"], "injected", edit.text), "role": "injected",
                            "text": edit.text, "edit": edit.description, "prompt_template_version": INJECT_TEMPLATE,
                            "completion_tokens": None, "finish_reason": None, "cached_tokens": None}
                    candidates.append((source, node, edit))
        self.verify([node for _, node, _ in candidates])
        kept: dict[str, list[str]] = defaultdict(list)
        pairs, rates = [], pass_rates(self.nodes)
        for source, node, edit in candidates:
            tree = kept[source["tree_id"]]
            if node["verdict"] == "correct" or source["node_id"] in tree or len(tree) >= per_tree:
                continue
            tree.append(source["node_id"])
            self.nodes.append(node)
            instruction = self.instructions[source["instruction_id"]]
            pair = pair_row(source, node, instruction, method=ERROR_INJECTION, chosen_score=source["score"],
                         rejected_score=node["score"], chosen_text=source["text"], rejected_text=node["text"],
                         pass_rate=rates.get(instruction.instruction_id))
            pair["edit_distance"] = edit.edit_distance
            pairs.append(pair)
        return pairs

    async def judge(self, examples: Sequence[dict], pairs: Sequence[dict]) -> list[dict]:
        """Have every judge read every comparison in both orders: each principle example (response vs antithesis),
        up to `jury_pairs` verifiable pairs, and `jury_canaries` canaries; label the examples and pairs; return
        the judgement rows."""
        if not self.jury:
            return []
        comparisons = [juries.Comparison(
            e["example_id"], "principle", e["tree_id"], e["principle_id"], e["principle"], e["prompt"],
            e["response_node_id"], e["response"], e["antithesis_node_id"], e["antithesis_response"],
        ) for e in examples]
        judged_pairs = sorted((p for p in pairs if p["domain"] != "open_ended"), key=lambda p: p["pair_id"])
        comparisons += [juries.Comparison(
            p["pair_id"], "verifiable", p["tree_id"], juries.CORRECTNESS, juries.CORRECTNESS_TEXT,
            self.instructions[p["instruction_id"]].text, p["chosen_node_id"], p["chosen_text"], p["rejected_node_id"],
            p["rejected_text"],
        ) for p in judged_pairs[: self.run.jury_pairs]]
        if not comparisons:
            return []
        comparisons += [self._canary(k, source) for k, source in
                        zip(range(self.run.jury_canaries), itertools.cycle(sorted(comparisons, key=lambda c: c.comparison_id)))]
        instruction_of = {n["tree_id"]: self.instructions[n["instruction_id"]] for n in self.nodes if n["role"] == "instruction"}
        requests, keys = [], []
        for comparison in comparisons:
            for judge in self.jury:
                for presented in juries.PRESENTATIONS:
                    sampling = Sampling(temperature=0.0, top_p=1.0, max_tokens=self.run.judge_max_tokens,
                                        seed=sample_seed(self.run.seed, comparison.comparison_id, judge.name, presented),
                                        json_schema=juries.VERDICT_SCHEMA)
                    requests.append(_Request(instruction_of[comparison.tree_id], comparison.tree_id,
                                             {"node_id": comparison.first_id}, "judgement",
                                             juries.judge_messages(judge.rubric, comparison, presented), sampling, 1,
                                             None, juries.JUDGE_TEMPLATE, None, engine=judge.engine))
                    keys.append((comparison, judge, presented))
        answers = await self.ask("jury verdicts", requests)
        rows = []
        for (comparison, judge, presented), request, answered in zip(keys, requests, answers):
            if answered is None:
                continue  # the request failed (counted): this judge gives no verdict in this order
            (answer,) = answered
            verdict = juries.parse_verdict(answer.text, answer.finish_reason)
            rows.append({
                **self.common, "tree_id": comparison.tree_id,
                "judgement_id": _id(comparison.comparison_id, judge.name, presented),
                "comparison_id": comparison.comparison_id, "kind": comparison.kind,
                "criterion": comparison.criterion_id, "judge": judge.name, "rubric": judge.rubric,
                "model": answer.model, "presented": presented, "first_id": comparison.first_id,
                "second_id": comparison.second_id, "prompt": request.messages, "raw": answer.text,
                "status": verdict.status, "winner": verdict.winner, "reason": verdict.reason,
                "preference": juries.preference(verdict.winner, presented), "expected": comparison.expected,
                "position_consistent": None, "label": None, "structured": judge.engine.response_format != "none",
                "prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
                "finish_reason": answer.finish_reason,
            })
        self._label(rows, examples, pairs)
        return rows

    def _canary(self, k: int, source: juries.Comparison) -> juries.Comparison:
        """A comparison with a known answer: `source`'s first response against one that plainly breaks its criterion."""
        if source.kind == "principle":
            violation = self.constitution.get(source.criterion_id).canary
        else:
            violation = juries.CORRECTNESS_CANARY
        return juries.Comparison(_id(self.plan.shard_id, "canary", k, source.comparison_id), "canary", source.tree_id,
                                 source.criterion_id, source.criterion, source.request, source.first_id,
                                 source.first_text, f"canary:{source.criterion_id}", violation)

    def _label(self, rows: list[dict], examples: Sequence[dict], pairs: Sequence[dict]) -> None:
        """Label each comparison from its verdicts; write the label onto its judgements, example or pair."""
        said: dict[str, dict[str, dict[str, str | None]]] = defaultdict(lambda: defaultdict(dict))
        for row in rows:
            said[row["comparison_id"]][row["judge"]][row["presented"]] = row["preference"]
        names = [judge.name for judge in self.jury]
        labels = {comparison: juries.label_comparison(verdicts, names) for comparison, verdicts in said.items()}
        for example in examples:  # every verdict of it failed: it is labelled on no votes
            labels.setdefault(example["example_id"], juries.label_comparison({}, names))
        for row in rows:
            label = labels[row["comparison_id"]]
            row["position_consistent"] = label.consistent[row["judge"]]
            row["label"] = None if row["kind"] == "canary" else label.label
        sides = {"first": "response", "second": "antithesis", "tie": "tie", None: None}
        for example in examples:
            label = labels[example["example_id"]]
            example.update(label=label.label, jury_winner=sides[label.winner], votes_response=label.votes["first"],
                           votes_antithesis=label.votes["second"], votes_tie=label.votes["tie"], judges=len(names))
        for pair in pairs:
            if pair["pair_id"] in labels:
                label = labels[pair["pair_id"]]
                pair.update(jury_label=label.label,
                            jury_winner={"first": "chosen", "second": "rejected"}.get(label.winner, label.winner))

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
        attempt_of = {a["node_id"]: a for a in attempts}  # a failed critique request leaves its attempt unrefined
        refine_requests = [
            _Request(self.instructions[a["instruction_id"]], a["tree_id"], c, "refinement",
                     refine_messages(self.instructions[a["instruction_id"]], a, c["text"]),
                     self.sampling(self.run.max_tokens, c["node_id"], "refine"), self.run.refine_samples,
                     a["strategy"], REFINE_TEMPLATE, turn)
            for c in critiques for a in [attempt_of[c["parent_id"]]]
        ]
        refinements = self.add_answers(refine_requests, await self.ask(f"turn {turn} refinements", refine_requests))
        self.verify(refinements)
        return refinements

    async def search(self, roots: Sequence[dict]) -> dict:
        """Grow MCTS steps under the roots of the trees whose domain is searched; return the search's counts.

        Each round selects one leaf per searched tree (by PUCT across the whole shard), asks for `mcts_width`
        continuations of each, rolls every unfinished child out to the end, verifies the finished answers,
        asks the model to judge every new child, and backs the values up.
        """
        run = self.run
        searched = [r for r in roots if self.instructions[r["instruction_id"]].domain in run.mcts_domains]
        if not searched or run.mcts_iterations == 0:
            return {}
        trees = [SearchNode(row=root) for root in searched]
        counts = {"rounds": 0, "expansions": 0, "steps": 0, "rollouts": 0, "self_eval_missing": 0, "unvalued": 0}
        for round_ in range(1, run.mcts_iterations + 1):
            leaves = select(trees, run.mcts_c_puct, batch=len(trees))
            if not leaves:
                break
            counts["rounds"], counts["expansions"] = round_, counts["expansions"] + len(leaves)
            step_requests = [self._step_request(leaf) for leaf in leaves]
            step_rows = self.add_answers(step_requests, await self.ask(f"mcts round {round_} steps", step_requests))
            children, leaf_of = [], {leaf.row["node_id"]: leaf for leaf in leaves}
            for row in step_rows:
                leaf = leaf_of[row["parent_id"]]
                finished = row["finish_reason"] != "length" or leaf.steps + 1 >= run.mcts_max_steps
                children.append(leaf.add_child(row, terminal=finished))
            open_children = [c for c in children if not c.terminal]
            rollout_requests = [
                _Request(self.instructions[c.row["instruction_id"]], c.row["tree_id"], c.row, "rollout", c.row["prompt"],
                         self.sampling(max(run.mcts_step_tokens, run.max_tokens - c.steps * run.mcts_step_tokens),
                                       c.row["node_id"], "rollout"),
                         1, c.row["strategy"], ROLLOUT_TEMPLATE, 1, prefix=c.row["text"])
                for c in open_children
            ]
            judge_requests = [self._self_eval_request(c.row) for c in children]
            rollout_answers, judgements = await asyncio.gather(
                self.ask(f"mcts round {round_} rollouts", rollout_requests),
                self.ask(f"mcts round {round_} self-evaluations", judge_requests),
            )
            rollouts = self.add_answers(rollout_requests, rollout_answers)
            self.verify([c.row for c in children if c.terminal] + rollouts)
            rollout_score = {r["parent_id"]: r["score"] for r in rollouts}
            for child, judged in zip(children, judgements):
                self_eval = yes_probability(judged[0].top_logprobs) if judged else None
                counts["self_eval_missing"] += self_eval is None
                verified = child.row["score"] if child.terminal else rollout_score.get(child.row["node_id"])
                if verified is None and self_eval is None:  # its rollout and self-evaluation requests failed
                    counts["unvalued"] += 1
                    continue
                value = self_eval if verified is None else node_value(verified, self_eval, run.mcts_lambda)
                child.row.update(self_eval=self_eval, value=value)
                backup(child, value)
            counts["steps"] += len(children)
            counts["rollouts"] += len(rollouts)
        for node in descendants(trees):
            node.row.update(visits=node.visits, q_value=node.q)
        return counts

    def _step_request(self, leaf: SearchNode) -> _Request:
        """The request for `mcts_width` next steps under `leaf` (a tree root or an unfinished step)."""
        run, row = self.run, leaf.row
        instruction = self.instructions[row["instruction_id"]]
        if leaf.parent is None:  # the root: steps answer the tree's first strategy
            strategy = strategies_for(run, instruction.domain)[0]
            messages, prefix = action_messages(instruction, strategy), ""
        else:
            strategy, messages, prefix = row["strategy"], row["prompt"], row["text"]
        last = leaf.steps + 1 >= run.mcts_max_steps
        budget = max(run.mcts_step_tokens, run.max_tokens - leaf.steps * run.mcts_step_tokens) if last else run.mcts_step_tokens
        return _Request(instruction, row["tree_id"], row, "step", messages,
                        self.sampling(budget, row["node_id"], "step"), run.mcts_width, strategy, STEP_TEMPLATE, 1,
                        prefix=prefix)

    def _self_eval_request(self, row: dict) -> _Request:
        """The model's own judgement of a partial answer: one token, read as P(Yes) from its logprobs."""
        instruction = self.instructions[row["instruction_id"]]
        messages = [{"role": "system", "content": SELF_EVAL_SYSTEM},
                    {"role": "user", "content": SELF_EVAL_REQUEST.format(task=instruction.text, partial=row["text"])}]
        sampling = Sampling(temperature=0.0, top_p=1.0, max_tokens=1, seed=sample_seed(self.run.seed, row["node_id"], "self_eval"),
                            top_logprobs=SELF_EVAL_TOP_LOGPROBS)
        return _Request(instruction, row["tree_id"], row, "self_eval", messages, sampling, 1, None, SELF_EVAL_TEMPLATE, None)


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


_ROLE_ENGINE = {"action": "generator", "critique": "critic", "refinement": "refiner",
                "step": "generator", "rollout": "generator", "self_eval": "generator",
                "principled": "generator", "antithesis": "generator", "unconditioned": "generator"}


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
) -> GrownShard:
    """Return the instructions, nodes, pairs, trees, principle examples and judgements of every tree of `plan`.

    `engines` maps each role (generator, critic, refiner) to the engine that plays it; `check` verifies
    (instruction, answer) items; `progress(level, done, total)` is called as a level's answers arrive. The `jury`
    judges open-ended prompts' principle examples (written under `constitution`, the shipped default if None),
    some verifiable pairs, and canaries; without a jury nothing is judged.
    """
    for role in ("generator", "critic", "refiner"):
        if role not in engines and (role == "generator" or run.turns > 1):
            raise GrowError(f"roles.{role}: no engine plays this role")
    for instruction in plan.instructions:
        if instruction.domain == "open_ended":
            continue
        for strategy in strategies_for(run, instruction.domain):
            action_messages(instruction, strategy)  # fail before any request on an unknown strategy
    if not jury and any(i.domain == "open_ended" for i in plan.instructions):
        raise GrowError(f"shard {plan.shard_id}: open-ended prompts are judged by a jury, and none was given")
    constitution = constitution or load_constitution()
    started = time.monotonic()
    grower = _Grower(plan, run_id, run, engines, check, progress, jury, constitution)
    roots = grower.plant()

    async def turns() -> None:
        frontier = await grower.first_turn(roots)
        for turn in range(2, run.turns + 1):
            frontier = await grower.refine_turn(turn, frontier)
            if not frontier:
                break

    # Sampled turns, the search and the principled responses run side by side: each fills the engines while the
    # others wait on a level.
    _, search, examples = await asyncio.gather(turns(), grower.search(roots), grower.write_principled(roots))

    requests = grower.failure_stats()
    if requests["failed"] > run.max_failed_request_share * requests["sent"]:
        # Kept as the cause: a shard whose requests failed because its server was down may grow on a retry.
        raise GrowError(
            f"shard {plan.shard_id}: {requests['failed']} of {requests['sent']} requests failed, more than "
            f"run.max_failed_request_share ({run.max_failed_request_share:.0%}); by reason: "
            f"{requests['failed_by_reason']}; first: {requests['first_failure']}"
        ) from grower.failed[0][1]

    rates = pass_rates(grower.nodes)
    found = extract_pairs(grower.nodes, grower.instructions, rates) + mcts_pairs(grower.nodes, grower.instructions, rates)
    found += grower.inject_errors()
    pairs = curate(found, run)
    judgements = await grower.judge(examples, pairs)
    grown = GrownShard(
        instructions=[{**grower.common, **i.as_row()} for i in plan.instructions],
        nodes=grower.nodes,
        pairs=pairs,
        principle_examples=examples,
        judgements=judgements,
    )
    grown.trees = tree_rows(grown.nodes, grown.pairs, grower.instructions)
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
        "pairs_found": len(found),  # before the run's contrast and difficulty selection
        "pairs_by_method": {m: sum(p["method"] == m for p in grown.pairs) for m in sorted({p["method"] for p in grown.pairs})},
        "mcts": search,
        "principle_examples": len(examples),
        "principle_labels": {label: sum(e["label"] == label for e in examples) for label in juries.LABELS},
        "judgements": len(judgements),
        "verdicts_unread": sum(j["status"] != "ok" for j in judgements),
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


def planned_levels(plan: ShardPlan, run: RunConfig, judged: bool) -> int:
    """Return how many request levels growing `plan` takes at most (a shard's progress is levels done / this)."""
    domains = {i.domain for i in plan.instructions}
    levels = 1 if domains - {"open_ended"} else 0  # turn-1 actions
    levels += 2 * (run.turns - 1) if levels else 0  # critiques and refinements of each further turn
    if domains & set(run.mcts_domains):
        levels += 3 * run.mcts_iterations  # steps, rollouts and self-evaluations per round
    if "open_ended" in domains:
        levels += 1  # principled, antithesis and unconditioned responses
    return levels + (1 if judged else 0)  # the jury's verdicts


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

    levels = planned_levels(plan, cfg.run, judged=bool(cfg.jury))
    finished: set[str] = set()
    moving = create_progress_artifact(progress=0.0, description=f"shard {plan.shard_id}: request levels answered "
                                                                  f"(of {levels} at most)")

    def progress(level: str, done: int, total: int) -> None:
        logger.info("shard %s: %s %d/%d answered", plan.shard_id, level, done, total)
        if done == total and level not in finished:
            finished.add(level)
            # Called inside the growth's event loop: _sync keeps Prefect from handing back an unawaited coroutine.
            update_progress_artifact(moving, progress=min(99.0, 100.0 * len(finished) / max(1, levels)), _sync=True)

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
            grown = await grow_shard(plan, run_id=run_id, run=cfg.run, engines=engines, check=verifiers.check,
                                     progress=progress, jury=jury, constitution=constitution)
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
