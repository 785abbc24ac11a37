import asyncio

import pytest

from orchard.config import RunConfig
from schemas import rows
from tasks.grow import GrowError, grow_shard
from tasks.pairs import extract_pairs
from tasks.verify import check_math_answer

from builders import ScriptedEngine, instruction, plan


def check(items):
    return [check_math_answer(text, reference) for text, reference in items]


def grow(engine, *instructions, **run):
    run = RunConfig(**{"strategies": ("step_by_step", "plan_first", "work_backwards"), "samples_per_strategy": 2, **run})
    return asyncio.run(grow_shard(plan(*instructions), run_id="r1", run=run, engine=engine, check=check))


def wrong_on_second_sample(messages, sampling):
    """Right on one sample of each strategy, wrong on the other (decided by the sample's seed parity)."""
    return "2 × 3 = 6\nAnswer: 6" if sampling.seed % 2 == 0 else "2 × 3 = 5\nAnswer: 5"


def test_every_strategy_gets_several_verified_actions():
    engine = ScriptedEngine(lambda m, s: "Answer: 6")
    grown = grow(engine, instruction())
    actions = [n for n in grown.nodes if n["role"] == "action"]
    assert len(actions) == 6
    assert {a["strategy"] for a in actions} == {"step_by_step", "plan_first", "work_backwards"}
    assert all(a["verdict"] == "correct" and a["verifier"] == "math_verify" for a in actions)
    assert grown.stats["correct"] == 6 and grown.pairs == []


def test_nodes_form_a_tree_under_the_instruction():
    grown = grow(ScriptedEngine(lambda m, s: "Answer: 6"), instruction())
    (root,) = [n for n in grown.nodes if n["depth"] == 0]
    assert root["parent_id"] is None and root["role"] == "instruction"
    assert all(n["parent_id"] == root["node_id"] for n in grown.nodes if n["depth"] == 1)
    assert len({n["node_id"] for n in grown.nodes}) == len(grown.nodes)
    rows.table("nodes", grown.nodes)  # matches the landed schema


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
        assert pair["margin"] == 1.0 and pair["method"] == "same_prompt"
        assert pair["shared_prefix_tokens"] == 20
        assert pair["domain"] == "math"
    rows.table("pairs", grown.pairs)


def test_pairs_never_cross_strategies():
    engine = ScriptedEngine(lambda m, s: "Answer: 6" if "step by step" in m[0]["content"] else "Answer: 9")
    grown = grow(engine, instruction())
    assert grown.pairs == []


def test_pass_rate_is_measured_per_prompt():
    engine = ScriptedEngine(lambda m, s: "Answer: 6" if s.seed % 3 else "Answer: 7")
    grown = grow(engine, instruction(), samples_per_strategy=3)
    actions = [n for n in grown.nodes if n["role"] == "action"]
    rate = sum(a["verdict"] == "correct" for a in actions) / len(actions)
    assert {p["pass_rate"] for p in grown.pairs} == {rate}


def test_same_run_asks_the_same_questions():
    first, second = ScriptedEngine(lambda m, s: "Answer: 6"), ScriptedEngine(lambda m, s: "Answer: 6")
    grow(first, instruction())
    grow(second, instruction())
    assert [(m, s.seed) for m, s in first.calls] == [(m, s.seed) for m, s in second.calls]
    assert len({s.seed for _, s in first.calls}) == 6


def test_sampling_parameters_are_recorded_on_nodes():
    grown = grow(ScriptedEngine(lambda m, s: "Answer: 6"), instruction(), temperature=0.7, max_tokens=99)
    action = next(n for n in grown.nodes if n["role"] == "action")
    assert (action["temperature"], action["max_tokens"], action["model"]) == (0.7, 99, "scripted")
    assert action["prompt_template_version"] and action["sample_seed"] is not None


def test_a_failing_engine_fails_the_shard_with_its_reason():
    def broken(messages, sampling):
        raise ConnectionError("engine unreachable")

    with pytest.raises(GrowError, match="6 of 6 requests failed.*engine unreachable"):
        grow(ScriptedEngine(broken), instruction())


def test_unknown_strategy_is_named():
    with pytest.raises(GrowError, match="run.strategies.*telepathy"):
        grow(ScriptedEngine(lambda m, s: ""), instruction(), strategies=("telepathy",))


def test_identical_texts_never_pair():
    node = {"role": "action", "score": 1.0, "parent_id": "p", "prompt": [{"role": "user", "content": "x"}],
            "instruction_id": instruction().instruction_id, "verdict": "correct", "text": "Answer: 6"}
    nodes = [{**node, "node_id": "a"}, {**node, "node_id": "b", "score": 0.0, "verdict": "incorrect"}]
    assert extract_pairs(nodes, {instruction().instruction_id: instruction()}) == []


def test_progress_is_reported_as_answers_arrive():
    seen = []
    run = RunConfig(strategies=("step_by_step",), samples_per_strategy=4)
    asyncio.run(grow_shard(plan(instruction()), run_id="r1", run=run, engine=ScriptedEngine(lambda m, s: "Answer: 6"),
                           check=check, progress=lambda done, total: seen.append((done, total))))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
