import asyncio
import json
import random

import pytest

from builders import ScriptedEngine, check_math, instruction, plan
from orchard.config import RunConfig
from orchard.engine import EngineError
from schemas.errors import is_transient
from tasks.grow import grow_shard
from tasks.growth import GrowError
from tasks.pairs import extract_pairs


def grow(engine, *instructions, critic=None, **run):
    run = RunConfig(**{"strategies": ("step_by_step", "plan_first", "work_backwards"), "samples_per_strategy": 2,
                       "turns": 1, "mcts_iterations": 0, "hard_negatives_per_tree": 0, **run})
    engines = {"generator": engine, "critic": critic or engine, "refiner": engine}
    return asyncio.run(grow_shard(plan(*instructions), run_id="r1", run=run, engines=engines, check=check_math))


def by_role(grown, role):
    return [n for n in grown.nodes if n["role"] == role]


def test_every_strategy_gets_several_verified_actions():
    grown = grow(ScriptedEngine(lambda m, s: "Answer: 6"), instruction())
    actions = by_role(grown, "action")
    assert len(actions) == 6
    assert {a["strategy"] for a in actions} == {"step_by_step", "plan_first", "work_backwards"}
    assert all(a["verdict"] == "correct" and a["verifier"] == "math_verify" and a["turn"] == 1 for a in actions)
    assert grown.stats.correct == 6 and grown.pairs == []


def test_nodes_form_a_tree_under_the_instruction():
    grown = grow(ScriptedEngine(lambda m, s: "Answer: 6"), instruction())
    (root,) = by_role(grown, "instruction")
    assert root["parent_id"] is None and root["depth"] == 0
    assert all(n["parent_id"] == root["node_id"] for n in by_role(grown, "action"))
    assert len({n["node_id"] for n in grown.nodes}) == len(grown.nodes)
    grown.tables()  # every table matches the landed schema


def test_wrong_answer_becomes_rejected_branch():
    engine = ScriptedEngine(lambda m, s: "Answer: 6" if s.seed % 3 else "Answer: 7")
    grown = grow(engine, instruction(), samples_per_strategy=3)
    assert grown.pairs, "some strategy must have both a right and a wrong sample"
    by_id = {n["node_id"]: n for n in grown.nodes}
    for pair in grown.pairs:
        chosen, rejected = by_id[pair["chosen_node_id"]], by_id[pair["rejected_node_id"]]
        assert chosen["verdict"] == "correct" and rejected["verdict"] == "incorrect"
        assert chosen["prompt"] == rejected["prompt"] == pair["prompt"]
        assert chosen["parent_id"] == rejected["parent_id"]
        assert pair["margin"] == 1.0 and pair["method"] == "rs" and pair["turn"] == 1
        assert pair["shared_prefix_tokens"] == 20
        assert pair["domain"] == "math"


def test_siblings_are_asked_for_in_one_request_with_n():
    engine = ScriptedEngine(lambda m, s: "Answer: 6")
    grow(engine, instruction(), samples_per_strategy=3)
    assert len(engine.calls) == 3  # one request per strategy, n = 3


def test_pairs_never_cross_strategies():
    engine = ScriptedEngine(lambda m, s: "Answer: 6" if "step by step" in m[0]["content"] else "Answer: 9")
    assert grow(engine, instruction()).pairs == []


def test_pass_rate_is_measured_per_prompt():
    engine = ScriptedEngine(lambda m, s: "Answer: 6" if s.seed % 3 else "Answer: 7")
    grown = grow(engine, instruction(), samples_per_strategy=3)
    actions = by_role(grown, "action")
    rate = sum(a["verdict"] == "correct" for a in actions) / len(actions)
    assert {p["pass_rate"] for p in grown.pairs} == {rate}


def test_same_run_asks_the_same_questions():
    first, second = ScriptedEngine(lambda m, s: "Answer: 6"), ScriptedEngine(lambda m, s: "Answer: 6")
    grow(first, instruction())
    grow(second, instruction())
    assert [(m, s.seed) for m, s in first.calls] == [(m, s.seed) for m, s in second.calls]
    assert len({s.seed for _, s in first.calls}) == 3


def test_sampling_parameters_are_recorded_on_nodes():
    grown = grow(ScriptedEngine(lambda m, s: "Answer: 6"), instruction(), temperature=0.7, max_tokens=99)
    action = by_role(grown, "action")[0]
    assert (action["temperature"], action["max_tokens"], action["model"]) == (0.7, 99, "scripted")
    assert action["prompt_template_version"] and action["sample_seed"] is not None


def test_a_failing_engine_fails_the_shard_with_its_reason():
    def broken(messages, sampling):
        raise EngineError("http://model: gave up after 4 attempts: ConnectError: engine unreachable",
                          "ConnectError after retries", transient=True)

    with pytest.raises(GrowError, match=r"3 of 3 requests failed, more than run.max_failed_request_share \(5%\).*"
                                        r"ConnectError after retries.*engine unreachable") as raised:
        grow(ScriptedEngine(broken), instruction())
    assert is_transient(raised.value), "a server that was down may answer a retry of the shard"


def test_a_request_that_fails_costs_only_its_own_nodes_and_is_counted():
    def refuses_plan_first(messages, sampling):
        if "First write a one-line plan" in messages[0]["content"]:
            raise EngineError("http://model: HTTP 400: prompt too long", "HTTP 400")
        return "Answer: 6"

    grown = grow(ScriptedEngine(refuses_plan_first), instruction(), max_failed_request_share=0.5)
    assert {a["strategy"] for a in by_role(grown, "action")} == {"step_by_step", "work_backwards"}
    assert len(by_role(grown, "action")) == 4  # 2 samples of each strategy that was answered
    requests = grown.stats.requests
    assert (requests["sent"], requests["failed"], requests["failed_by_reason"]) == (3, 1, {"HTTP 400": 1})
    assert "plan_first" in requests["first_failure"] and grown.stats.trees_unanswered == 0


def test_a_tree_whose_requests_all_fail_is_counted_unanswered_and_has_no_pairs():
    other = instruction("Compute 3 × 3.", "9")

    def refuses_the_second(messages, sampling):
        if "3 × 3" in messages[-1]["content"]:
            raise EngineError("http://model: HTTP 400: no", "HTTP 400")
        return "Answer: 6" if sampling.seed % 2 else "Answer: 7"

    grown = grow(ScriptedEngine(refuses_the_second), instruction(), other, max_failed_request_share=0.5)
    assert grown.stats.trees_unanswered == 1 and grown.stats.requests["failed"] == 3
    assert not [p for p in grown.pairs if p["instruction_id"] == other.instruction_id]


def test_an_error_that_is_not_the_engines_is_not_counted_but_raised():
    def buggy(messages, sampling):
        raise KeyError("a defect")

    with pytest.raises(KeyError, match="a defect"):
        grow(ScriptedEngine(buggy), instruction())


def test_unknown_strategy_is_named():
    with pytest.raises(GrowError, match="unknown math strategy 'telepathy'"):
        grow(ScriptedEngine(lambda m, s: ""), instruction(), strategies=("telepathy",))


def test_identical_texts_never_pair_and_the_drop_says_why():
    from orchard.config import HygieneConfig
    from tasks.hygiene import Drops, clean_pairs

    node = {"role": "action", "score": 1.0, "parent_id": "p", "prompt": [{"role": "user", "content": "x"}],
            "instruction_id": instruction().instruction_id, "verdict": "correct", "text": "Answer: 6",
            "run_id": "r1", "shard_id": "s1", "tree_id": "t1", "prompt_tokens": 3, "strategy": "direct",
            "model": "m", "turn": 1}
    nodes = [{**node, "node_id": "a"}, {**node, "node_id": "b", "score": 0.0, "verdict": "incorrect",
                                         "text": "Answer: 6 "}]
    found = extract_pairs(nodes, {instruction().instruction_id: instruction()})
    drops = Drops()
    assert len(found) == 1 and clean_pairs(found, HygieneConfig(), drops) == []
    assert drops.by_stage() == {"pair_hygiene": {"chosen and rejected identical": 1}}


def test_progress_counts_the_request_levels_every_phase_plans():
    seen = []
    run = RunConfig()  # 2 turns, 3 MCTS rounds
    engine = ScriptedEngine(lambda m, s: "Answer: 6")  # every action right: turn 2 is not needed
    asyncio.run(grow_shard(plan(instruction(), instruction("Compute 1 + 5.", "6")), run_id="r1", run=run,
                           engines={"generator": engine, "critic": engine, "refiner": engine}, check=check_math,
                           progress=lambda done, planned: seen.append((done, planned))))
    per_tree = 1 + 2 * (run.turns - 1) + 2 * run.mcts_iterations  # turns' levels, then each MCTS round's two
    assert {planned for _, planned in seen} == {2 * per_tree}
    assert [done for done, _ in seen] == sorted(done for done, _ in seen) and seen[-1] == (2 * per_tree, 2 * per_tree)


# --- critique and refinement turns ----------------------------------------------------------------

def always_wrong_then_right(messages, sampling):
    """Wrong on the first turn; right once a reviewer has spoken (the refiner's prompt carries the critique)."""
    if messages[0]["content"].startswith("You review"):
        return "You added instead of multiplying."
    return "Answer: 6" if "A reviewer says" in messages[-1]["content"] else "Answer: 5"


def test_wrong_action_gets_feedback_critique_and_refinements_with_the_whole_history():
    grown = grow(ScriptedEngine(always_wrong_then_right), instruction(), turns=2, refine_per_tree=2, refine_samples=2)
    by_id = {n["node_id"]: n for n in grown.nodes}
    critiques, refinements = by_role(grown, "critique"), by_role(grown, "refinement")
    assert len(critiques) == 2 and len(refinements) == 4
    for critique in critiques:
        attempt = by_id[critique["parent_id"]]
        assert attempt["verdict"] == "incorrect" and critique["verdict"] is None and critique["turn"] is None
        assert "The correct final answer is 6" in critique["prompt"][-1]["content"]  # the critic sees the reference
    for refinement in refinements:
        critique = by_id[refinement["parent_id"]]
        attempt = by_id[critique["parent_id"]]
        assert refinement["turn"] == 2 and refinement["verdict"] == "correct"
        assert refinement["prompt"][: len(attempt["prompt"])] == attempt["prompt"]  # the parent's exact prefix
        assert refinement["prompt"][len(attempt["prompt"])] == {"role": "assistant", "content": attempt["text"]}
        last = refinement["prompt"][-1]["content"]
        assert "Your answer 5 is incorrect." in last and critique["text"] in last
        assert "6" not in last  # the refiner never sees the reference answer
        assert refinement["strategy"] == attempt["strategy"]


def test_refinement_siblings_pair_at_their_turn():
    def mixed(messages, sampling):
        if messages[0]["content"].startswith("You review"):
            return "Check the multiplication."
        if "A reviewer says" in messages[-1]["content"]:
            return "Answer: 6" if sampling.seed % 2 else "Answer: 8"
        return "Answer: 5"

    grown = grow(ScriptedEngine(mixed), instruction(), turns=2, refine_per_tree=1, refine_samples=2)
    turn2 = [p for p in grown.pairs if p["turn"] == 2]
    assert len(turn2) == 1
    (pair,) = turn2
    assert pair["prompt"][-1]["content"].startswith("Your answer 5 is incorrect.")
    (tree,) = grown.trees
    assert (tree["turns"], tree["actions"], tree["correct"], tree["pairs"]) == (2, 8, 1, 1)


def test_correct_trees_are_not_refined():
    grown = grow(ScriptedEngine(lambda m, s: "Answer: 6"), instruction(), turns=3)
    assert by_role(grown, "critique") == [] and grown.stats.turns == 1


def test_turns_stop_at_the_configured_limit():
    grown = grow(ScriptedEngine(lambda m, s: "Rambling." if not m[0]["content"].startswith("You review") else "No."),
                 instruction(), turns=3, refine_per_tree=1, refine_samples=2)
    assert max(n["turn"] or 0 for n in grown.nodes) == 3
    assert len(by_role(grown, "critique")) == 2  # one per refined turn, per tree
    assert all(n["verdict"] == "unparsable" for n in grown.nodes if n["role"] in ("action", "refinement"))


def test_critic_can_be_another_engine():
    critic = ScriptedEngine(lambda m, s: "Multiply, do not add.", model="critic-model")
    grown = grow(ScriptedEngine(always_wrong_then_right), instruction(), critic=critic, turns=2, refine_per_tree=1)
    assert {c["model"] for c in by_role(grown, "critique")} == {"critic-model"}
    assert {r["model"] for r in by_role(grown, "refinement")} == {"scripted"}


def test_instruction_following_siblings_pair_by_the_fraction_of_constraints_kept():
    from tasks.constraints import constraints_reference
    from tasks.verify import Verifiers

    reference = constraints_reference(["punctuation:no_comma", "change_case:english_lowercase"], [{}, {}])
    ask = instruction("Describe the sea without commas, in lowercase.", reference, domain="instruction_following")
    engine = ScriptedEngine(lambda m, s: ("the sea is wide", "the sea, wide", "The Sea, Wide")[s.seed % 3])
    run = RunConfig(if_strategies=("direct",), samples_per_strategy=3, turns=1)
    with Verifiers() as verifiers:
        grown = asyncio.run(grow_shard(plan(ask), run_id="r1", run=run, engines={"generator": engine},
                                       check=verifiers.verify))
    assert sorted(n["score"] for n in by_role(grown, "action")) == [0.0, 0.5, 1.0]
    assert sorted(p["margin"] for p in grown.pairs if p["method"] == "rs") == [0.5, 0.5, 1.0]
    assert {p["domain"] for p in grown.pairs} == {"instruction_following"}
    assert "Reply with the response only." in by_role(grown, "action")[0]["prompt"][0]["content"]


# --- every tree on its own clock ------------------------------------------------------------------------


class Unhurried:
    """A scripted engine whose every answer takes a random time (seeded): answers arrive in a shuffled order."""

    def __init__(self, inner: ScriptedEngine, latency_seed: int) -> None:
        self.inner, self.rng = inner, random.Random(latency_seed)
        self.model, self.usage, self.response_format = inner.model, inner.usage, inner.response_format
        self.order: list[int | None] = []  # the seeds of the requests, in the order they were answered

    async def _wait(self, sampling) -> None:
        await asyncio.sleep(self.rng.random() * 0.004)
        self.order.append(sampling.seed)

    async def chat(self, messages, sampling, n=1, *, priority=0):
        await self._wait(sampling)
        return await self.inner.chat(messages, sampling, n)

    async def continue_chat(self, messages, prefix, sampling, n=1, *, priority=0):
        await self._wait(sampling)
        return await self.inner.continue_chat(messages, prefix, sampling, n)


def everything(messages, sampling) -> str:
    """Answers for every phase: right or wrong math by seed, critiques, principled responses, and verdicts."""
    system, last = messages[0]["content"], messages[-1]["content"]
    if system.startswith("You review"):
        return "Multiply instead."
    if "<<<RESPONSE A" in last:
        return json.dumps({"reason": "seeded", "winner": "AB"[sampling.seed % 2]})
    if "Answer: <number>" in system:
        return f"2 × 3 = 6\nAnswer: {6 + sampling.seed % 2}"
    return f"Response {sampling.seed % 7}"


def test_tables_do_not_depend_on_the_order_answers_arrive_in():
    from tasks.jury import Judge

    def stepper(messages, prefix, sampling):
        return ("We multiply." if not prefix else f" Answer: {6 + sampling.seed % 2}", "length" if not prefix else "stop")

    run = RunConfig(strategies=("step_by_step", "plan_first"), samples_per_strategy=2, turns=3, refine_per_tree=2,
                    refine_samples=2, mcts_iterations=2, mcts_width=2, mcts_max_steps=2, hard_negatives_per_tree=1,
                    principles_per_prompt=2, jury_pairs=2, jury_canaries=2)
    instructions = [instruction(), instruction("Compute 1 + 5.", "6"), instruction("Compute 4 + 2.", "6"),
                    instruction("Describe the sea.", "", domain="open_ended")]

    def grow_with(latency_seed: int):
        engine = Unhurried(ScriptedEngine(everything, step=stepper, judge=lambda m: {"Yes": -0.3, "No": -1.4}),
                           latency_seed)
        judges = [Judge(name, name, engine) for name in ("direct", "violations", "reader")]
        grown = asyncio.run(grow_shard(plan(*instructions), run_id="r1", run=run, check=check_math, jury=judges,
                                       engines={"generator": engine, "critic": engine, "refiner": engine}))
        return grown, engine.order

    (first, first_order), (second, second_order) = grow_with(1), grow_with(2)
    assert first_order != second_order and sorted(first_order, key=str) == sorted(second_order, key=str)
    assert {m for m in first.stats.pairs_by_method} == {"rs", "mcts", "error_injection"}
    assert first.judgements and first.principle_examples and first.stats.critiques
    for name, table in first.tables().items():
        assert table.to_pylist() == second.tables()[name].to_pylist(), name
