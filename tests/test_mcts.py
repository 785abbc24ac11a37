"""MCTS: PUCT selection across a shard's trees, backup, values, step growth on a scripted engine, and pair curation."""

import asyncio
import math

import pytest

from builders import ScriptedEngine, check_math, instruction, plan
from orchard.config import RunConfig
from tasks.grow import grow_shard
from tasks.mcts import SearchNode, backup, node_value, select, yes_probability
from tasks.pairs import contrast_of, curate


def leaf(name: str, parent: SearchNode | None = None, terminal: bool = False) -> SearchNode:
    if parent is None:
        return SearchNode(row={"node_id": name})
    return parent.add_child({"node_id": name}, terminal)


# --- the search itself --------------------------------------------------------------------------


def test_one_round_picks_distinct_leaves_across_the_shard():
    roots = [leaf("a"), leaf("b"), leaf("c")]
    assert [n.row["node_id"] for n in select(roots, c_puct=1.0, batch=3)] == ["a", "b", "c"]
    backup(roots[0], 0.0)  # a was valued, and badly: the unexplored trees come first
    assert [n.row["node_id"] for n in select(roots, c_puct=1.0, batch=2)] == ["b", "c"]
    assert all(n.virtual == 0 for n in roots)  # virtual visits are gone after the round


def test_selection_follows_q_and_spreads_over_leaves_with_virtual_loss():
    root = leaf("r")
    good, bad = leaf("good", root), leaf("bad", root)
    for child, value in ((good, 0.9), (bad, 0.1)):
        backup(child, value)
    assert select([root], c_puct=0.1, batch=1) == [good]
    assert set(select([root], c_puct=0.1, batch=2)) == {good, bad}  # the second pick avoids the taken leaf


def test_exhausted_subtrees_and_trees_are_never_selected():
    done = leaf("done")
    backup(leaf("end", done, terminal=True), 1.0)
    live = leaf("live")
    finished, open_ = leaf("finished", live, terminal=True), leaf("open", live)
    backup(finished, 1.0)
    backup(open_, 0.0)
    assert select([done, live], c_puct=1.0, batch=3) == [open_]
    backup(leaf("last", open_, terminal=True), 0.5)
    assert select([done, live], c_puct=1.0, batch=3) == []


def test_backup_counts_a_value_on_every_ancestor():
    root = leaf("r")
    child = leaf("c", root)
    grandchild = leaf("g", child)
    backup(child, 0.4)
    backup(grandchild, 1.0)
    assert (root.visits, child.visits, grandchild.visits) == (2, 2, 1)
    assert root.q == pytest.approx(0.7) and grandchild.q == 1.0


def test_value_mixes_verifier_and_self_evaluation_by_lambda():
    assert node_value(1.0, 0.5, 0.2) == pytest.approx(0.9)
    assert node_value(0.0, 1.0, 0.2) == pytest.approx(0.2)
    assert node_value(1.0, None, 0.2) == 1.0  # an unread self-evaluation is left out, not guessed


def test_yes_probability_reads_yes_against_no_and_refuses_to_guess():
    assert yes_probability({"Yes": math.log(0.6), " no": math.log(0.2), "The": math.log(0.2)}) == pytest.approx(0.75)
    assert yes_probability({"The": -0.1, "1": -2.0}) is None
    assert yes_probability(None) is None


# --- growing steps on a scripted engine ---------------------------------------------------------




def stepper(messages, prefix, sampling):
    """First step: a setup line (unfinished); the next one finishes right on odd seeds, wrong on even ones."""
    if not prefix:
        return ("We multiply 2 by 3.", "length")
    return (" Answer: 6" if sampling.seed % 2 else " Answer: 7", "stop")


def judge(messages):
    return {"Yes": math.log(0.8), "No": math.log(0.2)}


def search(*instructions, engine=None, **run):
    engine = engine or ScriptedEngine(lambda m, s: "Answer: 6" if s.seed % 2 else "Answer: 7", step=stepper, judge=judge)
    run = RunConfig(**{"strategies": ("step_by_step",), "samples_per_strategy": 1, "turns": 1, "mcts_iterations": 2,
                       "mcts_width": 2, "mcts_max_steps": 2, **run})
    return asyncio.run(grow_shard(plan(*instructions), run_id="r1", run=run, engines={"generator": engine}, check=check_math))


def test_steps_continue_their_parent_and_unfinished_steps_are_rolled_out():
    grown = search(instruction())
    by_id = {n["node_id"]: n for n in grown.nodes}
    steps = [n for n in grown.nodes if n["role"] == "step"]
    rollouts = [n for n in grown.nodes if n["role"] == "rollout"]
    first = [s for s in steps if by_id[s["parent_id"]]["role"] == "instruction"]
    assert len(first) == 2 and all(s["text"] == "We multiply 2 by 3." and s["verdict"] is None for s in first)
    assert len(rollouts) == 2 and {by_id[r["parent_id"]]["role"] for r in rollouts} == {"step"}
    for node in steps[2:] + rollouts:
        assert node["text"].startswith(by_id[node["parent_id"]]["text"])
        assert node["verdict"] in ("correct", "incorrect") and node["turn"] == 1
    assert grown.stats.mcts == {"rounds": 2, "expansions": 2, "steps": 4, "rollouts": 2, "self_eval_missing": 0,
                                   "unvalued": 0}


def test_values_and_visits_are_recorded_and_q_is_their_mean():
    grown = search(instruction())
    root = next(n for n in grown.nodes if n["role"] == "instruction")
    steps = [n for n in grown.nodes if n["role"] == "step"]
    for step in steps:
        assert step["self_eval"] == pytest.approx(0.8)
        verified = step["score"] if step["verdict"] else next(
            r["score"] for r in grown.nodes if r["role"] == "rollout" and r["parent_id"] == step["node_id"])
        assert step["value"] == pytest.approx(0.8 * verified + 0.2 * 0.8)
    assert root["visits"] == len(steps)
    assert root["q_value"] == pytest.approx(sum(s["value"] for s in steps) / len(steps))


def test_mcts_pairs_are_best_and_worst_q_siblings_sharing_the_parent_prefix():
    grown = search(instruction())
    by_id = {n["node_id"]: n for n in grown.nodes}
    mcts = [p for p in grown.pairs if p["method"] == "mcts"]
    assert mcts, grown.pairs
    for pair in mcts:
        chosen, rejected = by_id[pair["chosen_node_id"]], by_id[pair["rejected_node_id"]]
        assert chosen["parent_id"] == rejected["parent_id"] and chosen["role"] == rejected["role"] == "step"
        assert pair["chosen_score"] == chosen["q_value"] > rejected["q_value"] == pair["rejected_score"]
        prefix = by_id[chosen["parent_id"]]["text"] if by_id[chosen["parent_id"]]["role"] == "step" else ""
        assert pair["chosen_text"].startswith(prefix) and pair["rejected_text"].startswith(prefix)
        assert pair["shared_prefix_tokens"] == 20 + len(prefix.split())
        assert "Answer: 6" in pair["chosen_text"] and "Answer: 7" in pair["rejected_text"]
    grown.tables()


def test_search_spreads_over_the_shard_and_skips_unsearched_domains():
    code = instruction("Write f.", "assert f() == 1", domain="code")
    grown = search(instruction(), instruction("Compute 1 + 5.", "6"), code, mcts_iterations=1,
                   code_strategies=("direct",))
    roots = {n["node_id"]: n for n in grown.nodes if n["role"] == "instruction"}
    searched = {n["parent_id"] for n in grown.nodes if n["role"] == "step"}
    assert len(searched) == 2 and all(roots[r]["visits"] == 2 for r in searched)
    assert all(n["instruction_id"] != code.instruction_id for n in grown.nodes if n["role"] == "step")


def test_missing_self_evaluation_leaves_the_verifier_value():
    engine = ScriptedEngine(lambda m, s: "Answer: 6", step=stepper)  # no logprobs
    grown = search(instruction(), engine=engine, mcts_iterations=1)
    steps = [n for n in grown.nodes if n["role"] == "step"]
    assert all(s["self_eval"] is None for s in steps)
    assert grown.stats.mcts["self_eval_missing"] == len(steps)


def test_zero_iterations_or_no_domain_turns_mcts_off():
    for run in ({"mcts_iterations": 0}, {"mcts_domains": ()}):
        grown = search(instruction(), **run)
        assert not [n for n in grown.nodes if n["role"] in ("step", "rollout")]
        assert grown.stats.mcts == {}


# --- contrast and difficulty curation -----------------------------------------------------------


def pair(pair_id, margin, pass_rate=0.5):
    return {"pair_id": pair_id, "margin": margin, "pass_rate": pass_rate}


def test_contrast_follows_the_thresholds():
    run = RunConfig(contrast_low_max=0.3, contrast_high_min=0.6)
    assert [contrast_of(m, run) for m in (0.1, 0.3, 0.45, 0.6, 1.0)] == ["low", "low", "mid", "high", "high"]
    two_way = RunConfig(contrast_low_max=0.5, contrast_high_min=0.5)
    assert [contrast_of(m, two_way) for m in (0.4, 0.5, 0.6)] == ["low", "high", "high"]


def test_a_run_keeps_high_low_or_all_contrasts():
    pairs = [pair("a", 1.0), pair("b", 0.2), pair("c", 0.5)]
    assert [p["pair_id"] for p in curate([dict(p) for p in pairs], RunConfig(pair_contrast="high"))] == ["a"]
    assert [p["pair_id"] for p in curate([dict(p) for p in pairs], RunConfig(pair_contrast="low"))] == ["b"]
    every = curate([dict(p) for p in pairs], RunConfig())
    assert [(p["pair_id"], p["contrast"]) for p in every] == [("a", "high"), ("b", "low"), ("c", "mid")]


@pytest.mark.parametrize(("share", "highs", "lows"), [(0.5, 3, 3), (0.25, 1, 3), (0.75, 6, 2), (1.0, 6, 0), (0.0, 0, 3)])
def test_a_mix_keeps_the_asked_proportion(share, highs, lows):
    pairs = [pair(f"h{i}", 0.9) for i in range(6)] + [pair(f"l{i}", 0.1) for i in range(3)] + [pair("m", 0.45)]
    kept = curate(pairs, RunConfig(pair_contrast="mix", contrast_mix_high=share))
    assert sum(p["contrast"] == "high" for p in kept) == highs
    assert sum(p["contrast"] == "low" for p in kept) == lows
    assert all(p["contrast"] != "mid" for p in kept)


def test_difficulty_band_keeps_moderately_hard_prompts():
    pairs = [pair("easy", 1.0, pass_rate=0.9), pair("moderate", 1.0, pass_rate=0.5), pair("hard", 1.0, pass_rate=0.0)]
    kept = curate(pairs, RunConfig(difficulty_band=(0.2, 0.8)))
    assert [p["pair_id"] for p in kept] == ["moderate"]


@pytest.mark.parametrize(("changes", "message"), [
    ({"pair_contrast": "some"}, "run.pair_contrast"),
    ({"difficulty_band": (0.8, 0.2)}, "run.difficulty_band"),
    ({"contrast_low_max": 0.7, "contrast_high_min": 0.6}, "run.contrast_low_max/contrast_high_min"),
    ({"mcts_lambda": 1.5}, "run.mcts_lambda"),
])
def test_bad_curation_settings_are_named(changes, message):
    with pytest.raises(ValueError, match=message):  # pydantic's ValidationError, with the check's message
        RunConfig(**changes)
