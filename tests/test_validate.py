"""Shard validation with Great Expectations: valid shards pass, each kind of bad row is named, Data Docs are built."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pyarrow.parquet as pq
import pytest

from schemas import rows
from schemas.suites import SuiteError, load_suite, load_suites
from tasks.validate import (
    ShardTables,
    ShardValidation,
    ShardValidationError,
    build_data_docs,
    validate_shard,
    validate_shards,
)

REPO = Path(__file__).resolve().parents[1]
RUN = "run-1"
SHARD = "shard-a"


def instruction_row(instruction_id: str = "i1", **changes: Any) -> dict[str, Any]:
    """Return a valid instructions row."""
    row = {
        "run_id": RUN,
        "shard_id": SHARD,
        "instruction_id": instruction_id,
        "domain": "math",
        "source": "arithmetic",
        "source_row": 1,
        "text": "What is 12 * 7?",
        "reference": "84",
        "difficulty": 2,
    }
    return {**row, **changes}


DEPTH = {"instruction": 0, "action": 1, "critique": 2, "refinement": 3, "step": 1, "rollout": 2, "injected": 1,
         "principled": 1, "antithesis": 1, "unconditioned": 1}
VERIFIED_ROLES = ("action", "refinement", "rollout", "injected")
OPEN_ENDED_ROLES = ("principled", "antithesis", "unconditioned")
QUESTION = [{"role": "user", "content": "What is 12 * 7?"}]
# What a refinement of the wrong action a2 was sent: the question, a2's answer, the environment feedback and critique.
HISTORY = [
    *QUESTION,
    {"role": "assistant", "content": "12 * 7 = 88"},
    {"role": "user", "content": "Expected 84, got 88. Critique: 12 * 7 is 70 + 14."},
]


def node_row(node_id: str, parent_id: str | None = "root", **changes: Any) -> dict[str, Any]:
    """Return a valid nodes row: a correct turn-1 math action under the root unless `changes` say otherwise.

    `role` sets the defaults: the root has no model fields; a critique is model-written but not verified; an
    action or refinement is verified and has a turn (a refinement's turn must be given: it depends on the tree);
    an open-ended response (principled, antithesis, unconditioned) answers turn 1 and is not verified.
    """
    role = changes.get("role", "action")
    attempt, written = role in VERIFIED_ROLES, role != "instruction"
    row = {
        "run_id": RUN,
        "shard_id": SHARD,
        "tree_id": "t1",
        "node_id": node_id,
        "parent_id": parent_id,
        "instruction_id": "i1",
        "depth": DEPTH[role],
        "role": role,
        "strategy": "step_by_step" if written else None,
        "prompt": QUESTION if written else [],
        "text": "12 * 7 = 84" if written else "What is 12 * 7?",
        "verdict": "correct" if attempt else None,
        "score": 1.0 if attempt else None,
        "verifier": "math_verify" if attempt else None,
        "verifier_detail": None,
        "model": "smollm2-135m" if written else None,
        "temperature": 0.9 if written else None,
        "top_p": 0.95 if written else None,
        "max_tokens": 160 if written else None,
        "sample_seed": 7 if written else None,
        "prompt_template_version": "v1" if written else None,
        "prompt_tokens": 20 if written else None,
        "completion_tokens": 8 if written else None,
        "finish_reason": "stop" if written else None,
        "turn": 1 if attempt or role in OPEN_ENDED_ROLES else None,
        "feedback": None,
        "failure_reason": None,
        "sandbox_exit_code": None,
        "sandbox_stdout": None,
        "sandbox_stderr": None,
        "cached_tokens": 16 if written else None,
        "visits": None,
        "q_value": None,
        "self_eval": None,
        "value": None,
        "edit": None,
    }
    return {**row, **changes}


def pair_row(pair_id: str = "p1", **changes: Any) -> dict[str, Any]:
    """Return a valid pairs row: correct action a1 chosen over incorrect action a2 at turn 1."""
    row = {
        "run_id": RUN,
        "shard_id": SHARD,
        "tree_id": "t1",
        "pair_id": pair_id,
        "instruction_id": "i1",
        "domain": "math",
        "method": "rs",
        "prompt": QUESTION,
        "chosen_node_id": "a1",
        "rejected_node_id": "a2",
        "chosen_text": "12 * 7 = 84",
        "rejected_text": "12 * 7 = 88",
        "chosen_score": 1.0,
        "rejected_score": 0.0,
        "margin": 1.0,
        "shared_prefix_tokens": 20,
        "difficulty": 2,
        "pass_rate": 0.5,
        "strategy": "step_by_step",
        "model": "smollm2-135m",
        "turn": 1,
        "contrast": "high",
        "k": None,
        "edit_distance": None,
        "jury_label": None,
        "jury_winner": None,
    }
    return {**row, **changes}


def tree_row(tree_id: str = "t1", **changes: Any) -> dict[str, Any]:
    """Return a valid trees row: the math tree t1 of shard_rows()."""
    row = {
        "run_id": RUN,
        "shard_id": SHARD,
        "tree_id": tree_id,
        "instruction_id": "i1",
        "domain": "math",
        "strategies": ["step_by_step", "plan_first"],
        "turns": 2,
        "nodes": 8,
        "actions": 6,
        "correct": 3,
        "pass_rate": 0.5,
        "pairs": 3,
        "prompt_tokens": 140,
        "completion_tokens": 56,
        "k": None,
    }
    return {**row, **changes}


def shard_rows() -> dict[str, list[dict[str, Any]]]:
    """Return the rows of a small valid shard of two trees.

    t1 (math): the root; actions a1, a3 (correct), a2 (wrong), a4 (unparsable); critique c1 of a2; under c1,
    refinements r1 (correct) and r2 (wrong) at turn 2. Pairs (a1, a2), (a3, a4) at turn 1 and (r1, r2) at turn 2.
    t2 (code): the root and one action k1 verified by running its tests in the sandbox.
    """
    code = {"tree_id": "t2", "instruction_id": "i2"}
    return {
        "instructions": [
            instruction_row(),
            instruction_row("i2", domain="code", text="Write add(a, b).", reference=None, source="human_eval"),
        ],
        "nodes": [
            node_row("root", None, role="instruction"),
            node_row("a1"),
            node_row("a2", text="12 * 7 = 88", verdict="incorrect", score=0.0, failure_reason="wrong answer",
                     feedback="Expected 84, got 88."),  # fmt: skip
            node_row("a3", strategy="plan_first", text="84"),
            node_row("a4", strategy="plan_first", text="I cannot tell", verdict="unparsable", score=0.0),
            node_row("c1", "a2", role="critique", prompt=HISTORY[:2], text="Critique: 12 * 7 is 70 + 14."),
            node_row("r1", "c1", role="refinement", turn=2, prompt=HISTORY),
            node_row("r2", "c1", role="refinement", turn=2, prompt=HISTORY, text="12 * 7 = 86", verdict="incorrect",
                     score=0.0),  # fmt: skip
            node_row("root2", None, role="instruction", text="Write add(a, b).", **code),
            node_row("k1", "root2", prompt=[{"role": "user", "content": "Write add(a, b)."}],
                     text="def add(a, b):\n    return a + b", verifier="sandbox_tests", sandbox_exit_code=0,
                     sandbox_stdout="3 passed", sandbox_stderr="", **code),  # fmt: skip
        ],
        "pairs": [
            pair_row("p1"),
            pair_row("p2", chosen_node_id="a3", rejected_node_id="a4", chosen_text="84", rejected_text="I cannot tell"),
            pair_row("p3", chosen_node_id="r1", rejected_node_id="r2", rejected_text="12 * 7 = 86", prompt=HISTORY,
                     turn=2),  # fmt: skip
        ],
        "trees": [
            tree_row(),
            tree_row("t2", instruction_id="i2", domain="code", strategies=["step_by_step"], turns=1, nodes=2,
                     actions=1, correct=1, pass_rate=1.0, pairs=0),  # fmt: skip
        ],
        "principle_examples": [],
        "judgements": [],
        "drops": [{"run_id": RUN, "shard_id": SHARD, "stage": "curation", "reason": "low contrast (run.pair_contrast = "
                   "high)", "count": 2, "example_ids": ["p8", "p9"]}],
    }


def shard_tables(edit: Callable[[dict[str, list[dict[str, Any]]]], None] | None = None) -> dict[str, Any]:
    """Return the valid shard as Arrow tables, after `edit` changed its rows in place."""
    shard = shard_rows()
    if edit:
        edit(shard)
    return {name: rows.table(name, table_rows) for name, table_rows in shard.items()}


@pytest.fixture(scope="module")
def gx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One GX project for the module: validations reuse it, as a run's shards do."""
    return tmp_path_factory.mktemp("gx")


@pytest.fixture(scope="module")
def valid() -> ShardValidation:
    """The validation of the valid shard."""
    return validate_shard(shard_tables(), shard_id=SHARD)


def failed_labels(validation: ShardValidation) -> set[str]:
    """Return `suite: expectation(columns)` for each failed outcome."""
    return {f"{r.suite}: {r.label}" for r in validation.failed()}


def test_valid_shard_passes_every_expectation(valid: ShardValidation) -> None:
    assert valid.success, valid.summary()
    assert valid.failed() == []
    expected = sum(len(suite.expectations) for suite in load_suites().values())
    assert len(valid.results) == expected
    assert valid.summary() == f"shard {SHARD}: all {expected} expectations passed"


def test_outcomes_follow_suite_file_order(valid: ShardValidation) -> None:
    for table, suite in load_suites().items():
        outcomes = [r for r in valid.results if r.suite == table]
        assert [(r.expectation, r.columns) for r in outcomes] == [(e.type, e.columns) for e in suite.expectations]


def set_rows(table: str, index: int, **changes: Any) -> Callable[[dict[str, list[dict[str, Any]]]], None]:
    """Return an edit that changes fields of row `index` of `table`."""

    def edit(shard: dict[str, list[dict[str, Any]]]) -> None:
        shard[table][index] = {**shard[table][index], **changes}

    return edit


# The row conditions of the nodes suite, as GX prints them.
ATTEMPTS = "role IN (action, refinement, rollout, injected)"
WRITTEN = "role IN (action, critique, refinement, step, rollout, injected, principled, antithesis, unconditioned)"


def violation(edit: Callable[..., None], label: str, count: str, name: str) -> Any:
    return pytest.param(edit, label, count, id=name)


# Rows by index: nodes 0 root, 1 a1, 2 a2, 3 a3, 4 a4, 5 c1, 6 r1, 7 r2, 8 root2, 9 k1; pairs p1-p3; trees t1, t2.
VIOLATIONS = [
    violation(set_rows("pairs", 0, chosen_text=""),
              "pairs: expect_column_values_to_not_match_regex(chosen_text)", "1 of 3 rows", "empty-chosen-text"),
    violation(set_rows("pairs", 1, chosen_text=" \n\t"),
              "pairs: expect_column_values_to_not_match_regex(chosen_text)", "1 of 3 rows", "whitespace-chosen-text"),
    violation(set_rows("pairs", 0, rejected_text="12 * 7 = 84"),
              "pairs: expect_column_values_to_be_in_set(check_chosen_differs_from_rejected)", "1 of 3 rows",
              "chosen-equals-rejected"),
    violation(set_rows("nodes", 3, node_id="a1"),
              "nodes: expect_column_values_to_be_unique(node_id)", "2 of 10 rows", "duplicate-node-id"),
    violation(set_rows("nodes", 4, parent_id="no-such-node"),
              "nodes: expect_column_values_to_be_in_set(check_parent_exists)", "1 of 10 rows", "dangling-parent-id"),
    violation(set_rows("nodes", 1, verdict="probably"),
              "nodes: expect_column_values_to_be_in_set(verdict)", "1 of 10 rows", "bad-verdict"),
    violation(set_rows("nodes", 1, verdict=None),
              "nodes: expect_column_values_to_not_be_null(verdict)", f"1 of 7 rows where {ATTEMPTS}",
              "action-without-verdict"),
    violation(set_rows("nodes", 6, verdict=None),
              "nodes: expect_column_values_to_not_be_null(verdict)", f"1 of 7 rows where {ATTEMPTS}",
              "refinement-without-verdict"),
    violation(set_rows("nodes", 2, verifier=None),
              "nodes: expect_column_values_to_not_be_null(verifier)", f"1 of 7 rows where {ATTEMPTS}",
              "action-without-verifier"),
    violation(set_rows("nodes", 5, model=None),
              "nodes: expect_column_values_to_not_be_null(model)", f"1 of 8 rows where {WRITTEN}",
              "critique-without-model"),
    violation(set_rows("pairs", 0, margin=0.0),
              "pairs: expect_column_values_to_be_between(margin)", "1 of 3 rows", "zero-margin"),
    violation(set_rows("pairs", 1, chosen_node_id="a9"),
              "pairs: expect_column_values_to_be_in_set(check_chosen_node_exists)", "1 of 3 rows",
              "pair-references-missing-node"),
    violation(set_rows("pairs", 0, chosen_score=0.0),
              "pairs: expect_column_pair_values_a_to_be_greater_than_b(chosen_score, rejected_score)", "1 of 3 rows",
              "chosen-not-better"),
    violation(set_rows("instructions", 0, domain="poetry"),
              "instructions: expect_column_values_to_be_in_set(domain)", "1 of 2 rows", "unknown-domain"),
    violation(set_rows("nodes", 4, shard_id="shard-b"),
              "nodes: expect_column_values_to_be_in_set(shard_id)", "1 of 10 rows", "row-from-another-shard"),
    # --- multi-turn trees ---
    violation(set_rows("nodes", 5, role="judgement"),
              "nodes: expect_column_values_to_be_in_set(role)", "1 of 10 rows", "unknown-role"),
    violation(set_rows("nodes", 6, parent_id="a2"),
              "nodes: expect_column_values_to_be_in_set(check_refinement_parent_is_critique)", "1 of 10 rows",
              "refinement-under-an-action"),
    violation(set_rows("nodes", 5, parent_id="a1"),
              "nodes: expect_column_values_to_be_in_set(check_critique_parent_is_failed_attempt)", "1 of 10 rows",
              "critique-of-a-correct-action"),
    violation(set_rows("nodes", 5, parent_id="root"),
              "nodes: expect_column_values_to_be_in_set(check_critique_parent_is_failed_attempt)", "1 of 10 rows",
              "critique-of-the-instruction"),
    violation(set_rows("nodes", 9, sandbox_exit_code=None),
              "nodes: expect_column_values_to_not_be_null(sandbox_exit_code)",
              "1 of 1 rows where verifier == sandbox_tests", "sandboxed-node-without-exit-code"),
    violation(set_rows("nodes", 3, turn=0),
              "nodes: expect_column_values_to_be_between(turn)", "1 of 10 rows", "action-at-turn-zero"),
    violation(set_rows("nodes", 9, turn=None),
              "nodes: expect_column_values_to_not_be_null(turn)",
              "1 of 7 rows where role IN (action, refinement, step, rollout)", "action-without-turn"),
    violation(set_rows("nodes", 7, turn=3),
              "nodes: expect_column_values_to_be_in_set(check_refinement_turn_follows_grandparent)", "1 of 10 rows",
              "refinement-skips-a-turn"),
    violation(set_rows("nodes", 6, turn=1),
              "nodes: expect_column_values_to_be_in_set(check_refinement_turn_follows_grandparent)", "1 of 10 rows",
              "refinement-at-its-grandparents-turn"),
    violation(set_rows("trees", 1, tree_id="t9"),
              "nodes: expect_column_values_to_be_in_set(check_tree_listed)", "2 of 10 rows", "tree-without-its-row"),
    violation(set_rows("pairs", 0, rejected_node_id="r2", rejected_text="12 * 7 = 86"),
              "pairs: expect_column_values_to_be_in_set(check_nodes_share_parent)", "1 of 3 rows",
              "pair-of-non-siblings"),
    violation(set_rows("pairs", 2, turn=1),
              "pairs: expect_column_values_to_be_in_set(check_turn_matches_nodes)", "1 of 3 rows",
              "pair-turn-differs-from-its-nodes"),
    violation(set_rows("pairs", 2, turn=None),
              "pairs: expect_column_values_to_not_be_null(turn)", "1 of 3 rows", "pair-without-turn"),
    violation(set_rows("trees", 1, tree_id="t1"),
              "trees: expect_column_values_to_be_unique(tree_id)", "2 of 2 rows", "duplicate-tree-id"),
    violation(set_rows("trees", 0, actions=5),
              "trees: expect_column_values_to_be_in_set(check_actions_match)", "1 of 2 rows", "wrong-action-count"),
    violation(set_rows("trees", 0, nodes=6),
              "trees: expect_column_values_to_be_in_set(check_nodes_match)", "1 of 2 rows", "wrong-node-count"),
    violation(set_rows("trees", 0, correct=2),
              "trees: expect_column_values_to_be_in_set(check_correct_match)", "1 of 2 rows", "wrong-correct-count"),
    violation(set_rows("trees", 1, pairs=1),
              "trees: expect_column_values_to_be_in_set(check_pairs_match)", "1 of 2 rows", "wrong-pair-count"),
    violation(set_rows("trees", 0, pass_rate=0.75),
              "trees: expect_column_values_to_be_in_set(check_pass_rate_is_correct_over_actions)", "1 of 2 rows",
              "pass-rate-not-correct-over-actions"),
    violation(set_rows("trees", 1, pass_rate=1.5),
              "trees: expect_column_values_to_be_between(pass_rate)", "1 of 2 rows", "pass-rate-above-one"),
    violation(set_rows("trees", 1, turns=0),
              "trees: expect_column_values_to_be_between(turns)", "1 of 2 rows", "tree-without-a-turn"),
]  # fmt: skip


def with_mcts(shard: dict[str, list[dict[str, Any]]]) -> None:
    """Add MCTS nodes to t1: steps s1 (unfinished, with rollout o1) and s2 (finished, wrong), and their pair p4."""
    step = {"role": "step", "depth": 1, "verdict": None, "score": None, "verifier": None, "self_eval": 0.5, "turn": 1}
    shard["nodes"] += [
        node_row("s1", **step, text="12 * 7", finish_reason="length", visits=2, q_value=0.6, value=0.6),
        node_row("s2", **step | {"verdict": "incorrect", "score": 0.0, "verifier": "math_verify"},
                 text="12 * 7 = 88", visits=1, q_value=0.1, value=0.1),
        node_row("o1", "s1", role="rollout", depth=2, text="12 * 7 = 84"),
    ]
    shard["pairs"].append(pair_row("p4", method="mcts", chosen_node_id="s1", rejected_node_id="s2",
                                   chosen_text="12 * 7 = 84", chosen_score=0.6, rejected_score=0.1, margin=0.5,
                                   contrast="mid"))
    shard["trees"][0] |= {"nodes": 11, "pairs": 4}


def test_mcts_steps_rollouts_and_pairs_pass() -> None:
    validation = validate_shard(shard_tables(with_mcts), shard_id=SHARD)
    assert validation.success, validation.summary()


def variant_violation(
    variant: Callable[[dict[str, list[dict[str, Any]]]], None],
    label: str,
    name: str,
    *edits: Callable[[dict[str, list[dict[str, Any]]]], None],
) -> Any:
    """Return a case: the valid shard grown by `variant`, then broken by `edits`, fails the expectation `label`."""

    def edit(shard: dict[str, list[dict[str, Any]]]) -> None:
        variant(shard)
        for change in edits:
            change(shard)

    return pytest.param(edit, label, id=name)


def mcts_violation(table: str, index: int, label: str, name: str, **changes: Any) -> Any:
    return variant_violation(with_mcts, label, name, set_rows(table, index, **changes))


# The MCTS rows are nodes 10 s1, 11 s2, 12 o1 and pairs 3 p4.
MCTS_VIOLATIONS = [
    mcts_violation("nodes", 12, "nodes: expect_column_values_to_be_in_set(check_rollout_parent_is_unfinished_step)",
                   "rollout-of-a-finished-step", parent_id="s2", text="12 * 7 = 88 and more"),
    mcts_violation("nodes", 12, "nodes: expect_column_values_to_be_in_set(check_mcts_answer_continues_parent)",
                   "rollout-that-does-not-continue-its-step", text="7 * 12 = 84"),
    mcts_violation("nodes", 11, "nodes: expect_column_values_to_be_in_set(check_step_parent_is_root_or_step)",
                   "step-under-an-action", parent_id="a1"),
    mcts_violation("nodes", 10, "nodes: expect_column_values_to_not_be_null(visits)", "step-without-visits",
                   visits=None),
    mcts_violation("nodes", 10, "nodes: expect_column_values_to_be_between(q_value)", "q-above-one", q_value=1.5),
    mcts_violation("nodes", 12, "nodes: expect_column_values_to_not_be_null(verdict)", "unverified-rollout",
                   verdict=None),
    mcts_violation("pairs", 3, "pairs: expect_column_values_to_be_in_set(method)", "unknown-pair-method", method="beam"),
    mcts_violation("pairs", 3, "pairs: expect_column_values_to_be_in_set(contrast)", "unknown-contrast",
                   contrast="extreme"),
]  # fmt: skip


def with_injection(shard: dict[str, list[dict[str, Any]]]) -> None:
    """Add to t1 the injected error x1 (a1 with its answer changed, failed by the verifier) and their pair p5."""
    shard["nodes"].append(
        node_row("x1", role="injected", text="12 * 7 = 85", verdict="incorrect", score=0.0,
                 verifier_detail="expected 84, got 85", edit="84 -> 85 in the answer", completion_tokens=None,
                 finish_reason=None, cached_tokens=None)  # fmt: skip
    )
    shard["pairs"].append(pair_row("p5", method="error_injection", rejected_node_id="x1", rejected_text="12 * 7 = 85",
                                   edit_distance=1))  # fmt: skip
    # Injected nodes are not attempts: t1's actions, correct answers and pass rate stay as they were.
    shard["trees"][0]["nodes"] += 1
    shard["trees"][0]["pairs"] += 1


OPEN_PROMPT = "Decline an invitation to a friend's party."
PRINCIPLE, ANTITHESIS = "Be brief.", "Be long-winded."
RESPONSES = {  # node id -> (role, text)
    "un1": ("unconditioned", "Thanks so much for the invitation! Sadly I can't make it, but have a great time."),
    "pr1": ("principled", "Thanks, but I can't come. Have fun!"),
    "an1": ("antithesis", "Thank you, truly, from the bottom of my heart, for thinking of me; it is with a heavy "
                          "heart and after long deliberation that I must, regrettably, decline."),
}
JURY = {"judge-direct": "direct", "judge-audit": "violations", "judge-reader": "reader"}  # judge -> rubric
CANARY = "canary-0"


def example_row(example_id: str = "e1", **changes: Any) -> dict[str, Any]:
    """Return a valid principle_examples row: pr1 (written under brevity) vs an1 (its antithesis), stable for pr1."""
    row = {
        "run_id": RUN,
        "shard_id": SHARD,
        "tree_id": "t3",
        "example_id": example_id,
        "instruction_id": "i3",
        "prompt": OPEN_PROMPT,
        "constitution": "house@1",
        "principle_id": "brevity",
        "principle": PRINCIPLE,
        "antithesis": ANTITHESIS,
        "response_node_id": "pr1",
        "response": RESPONSES["pr1"][1],
        "antithesis_node_id": "an1",
        "antithesis_response": RESPONSES["an1"][1],
        "unconditioned_node_id": "un1",
        "unconditioned_response": RESPONSES["un1"][1],
        "model": "smollm2-135m",
        "label": "stable",
        "jury_winner": "response",
        "votes_response": len(JURY),
        "votes_antithesis": 0,
        "votes_tie": 0,
        "judges": len(JURY),
    }
    return {**row, **changes}


def judgement_row(
    comparison_id: str = "e1", judge: str = "judge-direct", presented: str = "first_as_a", **changes: Any
) -> dict[str, Any]:
    """Return a valid judgements row: `judge` prefers pr1 over an1 (example e1) when shown in order `presented`."""
    winner = "A" if presented == "first_as_a" else "B"
    row = {
        "run_id": RUN,
        "shard_id": SHARD,
        "tree_id": "t3",
        "judgement_id": f"{comparison_id}/{judge}/{presented}",
        "comparison_id": comparison_id,
        "kind": "principle",
        "criterion": "brevity",
        "judge": judge,
        "rubric": JURY[judge],
        "model": "smollm2-135m",
        "presented": presented,
        "first_id": "pr1",
        "second_id": "an1",
        "prompt": [{"role": "system", "content": "Decide which response meets the criterion better."},
                   {"role": "user", "content": f"Criterion: {PRINCIPLE}\n\n{OPEN_PROMPT}"}],  # fmt: skip
        "raw": json.dumps({"reason": "It is shorter.", "winner": winner}),
        "status": "ok",
        "winner": winner,
        "preference": "first",
        "reason": "It is shorter.",
        "expected": None,
        "position_consistent": True,
        "label": "stable",
        "structured": True,
        "prompt_tokens": 90,
        "completion_tokens": 12,
        "finish_reason": "stop",
    }
    return {**row, **changes}


def with_jury(shard: dict[str, list[dict[str, Any]]]) -> None:
    """Add the open-ended tree t3: responses under no principle (un1), brevity (pr1) and its antithesis (an1), their
    example e1 judged stable for pr1 by a jury of three in both orders, and a canary every judge got right."""
    open_ended = {"tree_id": "t3", "instruction_id": "i3"}
    user = {"role": "user", "content": OPEN_PROMPT}
    system = {None: "You are a helpful assistant.", "principled": PRINCIPLE, "antithesis": ANTITHESIS}
    shard["instructions"].append(
        instruction_row("i3", domain="open_ended", source="open_prompts", text=OPEN_PROMPT, reference=None,
                        difficulty=None)  # fmt: skip
    )
    shard["nodes"].append(node_row("root3", None, role="instruction", text=OPEN_PROMPT, **open_ended))
    for node_id, (role, text) in RESPONSES.items():
        principled = role != "unconditioned"
        shard["nodes"].append(
            node_row(node_id, "root3", role=role, text=text, strategy="brevity" if principled else None,
                     prompt=[{"role": "system", "content": system[role if principled else None]}, user],
                     **open_ended)  # fmt: skip
        )
    shard["principle_examples"].append(example_row())
    canary = {"kind": "canary", "second_id": "canary:brevity", "expected": "first", "label": None}
    shard["judgements"] += [
        judgement_row(comparison, judge, presented, **(canary if comparison == CANARY else {}))
        for comparison in ("e1", CANARY)
        for judge in JURY
        for presented in ("first_as_a", "second_as_a")
    ]
    shard["trees"].append(
        tree_row("t3", instruction_id="i3", domain="open_ended", strategies=[], turns=1, nodes=4, actions=0,
                 correct=0, pass_rate=0.0, pairs=0, prompt_tokens=60, completion_tokens=24)  # fmt: skip
    )


def with_injection_and_jury(shard: dict[str, list[dict[str, Any]]]) -> None:
    """Apply both with_injection and with_jury."""
    with_injection(shard)
    with_jury(shard)


@pytest.mark.parametrize(
    ("variant", "table_rows"),
    [
        pytest.param(with_injection, {"nodes": 11, "pairs": 4}, id="injection"),
        pytest.param(with_jury, {"instructions": 3, "nodes": 14, "trees": 3, "principle_examples": 1,
                                 "judgements": 12}, id="jury"),  # fmt: skip
        pytest.param(with_injection_and_jury, {"nodes": 15, "pairs": 4, "principle_examples": 1, "judgements": 12},
                     id="injection-and-jury"),  # fmt: skip
    ],
)
def test_injected_errors_and_jury_verdicts_pass(
    variant: Callable[[dict[str, list[dict[str, Any]]]], None], table_rows: dict[str, int]
) -> None:
    validation = validate_shard(shard_tables(variant), shard_id=SHARD)
    assert validation.success, validation.summary()
    # The new rows were read, not skipped: every unconditioned row-level expectation saw them all.
    for table, count in table_rows.items():
        seen = {r.element_count for r in validation.results if r.suite == table and r.element_count is not None
                and r.condition is None}  # fmt: skip
        assert seen == {count}, table


def set_row(table: str, row_id: str, **changes: Any) -> Callable[[dict[str, list[dict[str, Any]]]], None]:
    """Return an edit that changes fields of the row of `table` whose id (the suite's row_id column) is `row_id`."""

    def edit(shard: dict[str, list[dict[str, Any]]]) -> None:
        key = load_suite(table).row_id
        (row,) = [r for r in shard[table] if r[key] == row_id]
        row.update(changes)

    return edit


def drop_row(table: str, row_id: str) -> Callable[[dict[str, list[dict[str, Any]]]], None]:
    """Return an edit that removes the row of `table` whose id is `row_id`."""

    def edit(shard: dict[str, list[dict[str, Any]]]) -> None:
        key = load_suite(table).row_id
        shard[table] = [r for r in shard[table] if r[key] != row_id]

    return edit


INJECTION_VIOLATIONS = [
    variant_violation(with_injection, "nodes: expect_column_values_to_be_in_set(check_injected_is_wrong)",
                      "injected-node-that-passes", set_row("nodes", "x1", verdict="correct", score=1.0)),
    variant_violation(with_injection, "nodes: expect_column_values_to_not_be_null(edit)", "injected-node-without-edit",
                      set_row("nodes", "x1", edit=None)),
    variant_violation(with_injection, "nodes: expect_column_values_to_not_be_null(verdict)",
                      "unverified-injected-node", set_row("nodes", "x1", verdict=None)),
    variant_violation(with_injection, "pairs: expect_column_values_to_not_be_null(edit_distance)",
                      "injection-pair-without-edit-distance", set_row("pairs", "p5", edit_distance=None)),
    variant_violation(with_injection, "pairs: expect_column_values_to_be_between(edit_distance)",
                      "injection-pair-that-changes-nothing", set_row("pairs", "p5", edit_distance=0)),
    variant_violation(with_injection, "pairs: expect_column_values_to_be_in_set(check_injection_edits_chosen)",
                      "injection-pair-whose-rejected-node-is-not-injected",
                      set_row("pairs", "p5", rejected_node_id="a2", rejected_text="12 * 7 = 88")),
]  # fmt: skip

JURY_VIOLATIONS = [
    variant_violation(with_jury, "nodes: expect_column_values_to_be_in_set(check_principled_parent_is_open_ended_root)",
                      "principled-node-under-an-action", set_row("nodes", "pr1", parent_id="a1")),
    variant_violation(with_jury, "nodes: expect_column_values_to_be_in_set(check_principled_parent_is_open_ended_root)",
                      "unconditioned-node-under-another-response", set_row("nodes", "un1", parent_id="pr1")),
    variant_violation(with_jury, "principle_examples: expect_column_values_to_be_in_set(check_label_follows_votes)",
                      "example-label-disagrees-with-its-votes",
                      set_row("principle_examples", "e1", label="non_attitude")),
    variant_violation(with_jury, "principle_examples: expect_column_values_to_be_in_set(check_label_follows_votes)",
                      "example-stable-despite-a-dissenting-vote",
                      set_row("principle_examples", "e1", votes_response=2, votes_antithesis=1)),
    variant_violation(with_jury, "principle_examples: expect_column_values_to_be_in_set(check_judged_in_both_orders)",
                      "example-missing-one-judgement", drop_row("judgements", "e1/judge-reader/second_as_a")),
    variant_violation(with_jury, "principle_examples: expect_column_values_to_be_in_set(check_nodes_exist)",
                      "example-response-differs-from-its-node",
                      set_row("principle_examples", "e1", response="Thanks, but no.")),
    variant_violation(with_jury, "principle_examples: expect_column_values_to_be_in_set(check_nodes_exist)",
                      "example-antithesis-is-not-an-antithesis-node",
                      set_row("principle_examples", "e1", antithesis_node_id="un1",
                              antithesis_response=RESPONSES["un1"][1])),
    variant_violation(with_jury, "principle_examples: expect_column_values_to_be_between(judges)", "jury-of-two",
                      set_row("principle_examples", "e1", judges=2)),
    variant_violation(with_jury, "nodes: expect_column_values_to_be_in_set(check_principled_parent_is_open_ended_root)",
                      "open-ended-response-under-a-math-root", set_row("nodes", "un1", parent_id="root", tree_id="t1")),
    variant_violation(with_jury, "principle_examples: expect_column_values_to_be_in_set(check_judged_in_both_orders)",
                      "one-judges-second-verdict-given-by-another-judge",
                      set_row("judgements", "e1/judge-reader/second_as_a", judge="judge-extra")),
    variant_violation(with_jury, "principle_examples: expect_column_values_to_be_in_set(check_label_follows_votes)",
                      "stable-winner-is-the-side-without-votes",
                      set_row("principle_examples", "e1", jury_winner="antithesis")),
    variant_violation(with_jury, "principle_examples: expect_column_values_to_not_be_null(label)", "unjudged-example",
                      set_row("principle_examples", "e1", label=None, jury_winner=None)),
    variant_violation(with_jury, "judgements: expect_column_values_to_be_in_set(check_read_iff_ok)",
                      "truncated-verdict-with-a-winner", set_row("judgements", "e1/judge-audit/first_as_a",
                                                                 status="truncated", finish_reason="length")),
    variant_violation(with_jury, "judgements: expect_column_values_to_be_in_set(check_read_iff_ok)",
                      "ok-verdict-without-a-winner",
                      set_row("judgements", "e1/judge-audit/first_as_a", winner=None, preference=None)),
    variant_violation(with_jury, "judgements: expect_column_values_to_be_in_set(check_preference_undoes_order)",
                      "preference-ignores-the-presentation-order",
                      set_row("judgements", "e1/judge-direct/second_as_a", preference="second")),
    variant_violation(with_jury, "judgements: expect_column_values_to_be_in_set(check_canary_expects_first)",
                      "canary-without-expected", set_row("judgements", f"{CANARY}/judge-direct/first_as_a",
                                                         expected=None)),
    variant_violation(with_jury, "judgements: expect_column_values_to_be_in_set(check_canary_expects_first)",
                      "principle-comparison-with-an-expected-answer",
                      set_row("judgements", "e1/judge-direct/first_as_a", expected="first")),
    variant_violation(with_jury, "judgements: expect_column_values_to_be_in_set(check_compares_shard_rows)",
                      "judgement-of-an-unknown-comparison",
                      set_row("judgements", "e1/judge-direct/first_as_a", comparison_id="e9")),
    variant_violation(with_jury, "judgements: expect_column_values_to_be_in_set(check_compares_shard_rows)",
                      "canary-against-a-missing-node",
                      set_row("judgements", f"{CANARY}/judge-direct/first_as_a", second_id="n9")),
    variant_violation(with_jury, "judgements: expect_column_values_to_be_in_set(status)", "unknown-judgement-status",
                      set_row("judgements", "e1/judge-direct/first_as_a", status="lost")),
    variant_violation(with_jury, "judgements: expect_column_values_to_be_in_set(label)", "unknown-judgement-label",
                      set_row("judgements", "e1/judge-direct/first_as_a", label="unanimous")),
    variant_violation(with_jury, "judgements: expect_column_values_to_be_unique(judgement_id)",
                      "duplicate-judgement-id",
                      set_row("judgements", "e1/judge-direct/second_as_a", judgement_id="e1/judge-direct/first_as_a")),
]  # fmt: skip


def validated_by_its_suite(edit: Callable[[dict[str, list[dict[str, Any]]]], None], label: str) -> ShardValidation:
    """The shard after `edit`, validated against the suite that `label` ("suite: expectation(columns)") names: what
    that suite says of it, in a fraction of the time every suite takes (whether the others pass is not the question)."""
    return validate_shard(shard_tables(edit), shard_id=SHARD, only=[label.split(":", 1)[0]])


@pytest.mark.parametrize(("edit", "label"), [*MCTS_VIOLATIONS, *INJECTION_VIOLATIONS, *JURY_VIOLATIONS])
def test_each_variant_violation_is_named(edit: Callable[..., None], label: str) -> None:
    validation = validated_by_its_suite(edit, label)
    assert label in failed_labels(validation), validation.summary()


@pytest.mark.parametrize(("edit", "label", "count"), VIOLATIONS)
def test_each_violation_is_named_with_its_row_count(
    edit: Callable[[dict[str, list[dict[str, Any]]]], None], label: str, count: str
) -> None:
    validation = validated_by_its_suite(edit, label)
    assert not validation.success
    assert label in failed_labels(validation), validation.summary()
    assert f"{label} failed on {count}" in validation.summary()


def test_failure_quotes_the_offending_row_id_and_value() -> None:
    validation = validate_shard(shard_tables(set_rows("nodes", 1, verdict="probably")), shard_id=SHARD)
    (outcome,) = [r for r in validation.failed() if r.columns == ("verdict",)]
    assert outcome.unexpected_count == 1
    assert "node_id='a1'" in outcome.observed
    assert "verdict='probably'" in outcome.observed


def test_root_and_critique_without_verdict_or_turn_pass(valid: ShardValidation) -> None:
    attempts = [r for r in valid.results if r.condition == ATTEMPTS]
    assert {r.columns for r in attempts} >= {("verdict",), ("verifier",)}
    assert all(r.success and r.element_count == 7 for r in attempts)
    written = [r for r in valid.results if r.condition == WRITTEN]
    assert {r.columns for r in written} >= {("model",), ("text",)}
    assert all(r.success and r.element_count == 8 for r in written)


def test_only_sandbox_verdicts_need_an_exit_code(valid: ShardValidation) -> None:
    (sandboxed,) = [r for r in valid.results if r.columns == ("sandbox_exit_code",)]
    assert sandboxed.success and sandboxed.element_count == 1  # k1; the math nodes have none and pass
    assert sandboxed.condition == "verifier == sandbox_tests"


def test_critique_of_a_wrong_refinement_passes() -> None:
    def deeper(shard: dict[str, list[dict[str, Any]]]) -> None:
        # r2 (wrong, turn 2) is critiqued by c2, and refined at turn 3 by r3.
        history = [*HISTORY, {"role": "assistant", "content": "12 * 7 = 86"}, {"role": "user", "content": "Again."}]
        shard["nodes"] += [
            node_row("c2", "r2", role="critique", depth=4, prompt=history[:4], text="Critique: not 86."),
            node_row("r3", "c2", role="refinement", depth=5, turn=3, prompt=history),
        ]
        shard["trees"][0] |= {"nodes": 10, "actions": 7, "correct": 4, "pass_rate": 4 / 7, "turns": 3}

    validation = validate_shard(shard_tables(deeper), shard_id=SHARD)
    assert validation.success, validation.summary()


def test_shard_without_pairs_passes() -> None:
    def no_pairs(shard: dict[str, list[dict[str, Any]]]) -> None:
        shard["pairs"] = []
        shard["trees"][0]["pairs"] = 0

    validation = validate_shard(shard_tables(no_pairs), shard_id=SHARD)
    assert validation.success, validation.summary()


def test_data_docs_index_and_shard_pages_are_built_from_validation_records(valid: ShardValidation,
                                                                           gx_dir: Path) -> None:
    failed = validate_shard(shard_tables(set_rows("nodes", 1, verdict="probably")), shard_id="shard-b")
    records = [json.loads(json.dumps(v.to_dict())) for v in (valid, failed)]  # as read back from the store
    index, pages = build_data_docs(gx_dir, records)
    assert index is not None
    assert Path(index).name == "index.html" and Path(index).is_file()
    assert Path(index).is_relative_to(gx_dir)
    assert set(pages) == {SHARD, "shard-b"}
    for shard_pages in pages.values():
        assert set(shard_pages) == set(rows.SHARD_TABLES)
        assert all(Path(page).is_file() for page in shard_pages.values())
    text = Path(index).read_text(encoding="utf-8")
    assert SHARD in text and "shard-b" in text  # the run name shown in the index is the shard id
    assert "probably" in Path(pages["shard-b"]["nodes"]).read_text(encoding="utf-8")  # the failed row, quoted


def test_validating_again_reuses_the_process_context_and_keeps_no_result_in_it(valid: ShardValidation) -> None:
    import tasks.validate

    again = validate_shard(shard_tables(), shard_id=SHARD)
    assert again.success
    (context,) = tasks.validate._CONTEXT  # built once per process
    # One definition per table, and per part of a table's suite once a batch was validated here (validate_shards).
    names = [d.name for d in context.validation_definitions.all()]
    assert sorted(n for n in names if "." not in n) == sorted(rows.SHARD_TABLES)
    assert {n.split(".")[0] for n in names} == set(rows.SHARD_TABLES)
    assert context.validation_results_store.list_keys() == []  # a run's results do not pile up in memory


def test_a_record_made_in_another_process_renders_here(valid: ShardValidation, gx_dir: Path, tmp_path: Path) -> None:
    for name, table in shard_tables().items():
        pq.write_table(table, tmp_path / f"{name}.parquet")
    script = (
        "import json, sys, pyarrow.parquet as pq\n"
        "from pathlib import Path\n"
        "from tasks.validate import validate_shard\n"
        "folder = Path(sys.argv[1])\n"
        "from schemas.rows import SHARD_TABLES\n"
        "tables = {n: pq.read_table(folder / f'{n}.parquet') for n in SHARD_TABLES}\n"
        "print(json.dumps(validate_shard(tables, shard_id=sys.argv[2]).to_dict()))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), SHARD],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["success"], result["summary"]
    assert [r["label"] if "label" in r else r["expectation"] for r in result["results"]] == \
        [r.expectation for r in valid.results]
    _, pages = build_data_docs(gx_dir, [result])
    assert set(pages[SHARD]) == set(rows.SHARD_TABLES)


def test_edited_suite_file_replaces_the_stored_suite(tmp_path: Path) -> None:
    suites_dir = tmp_path / "suites"
    shutil.copytree(load_suite("pairs").path.parent, suites_dir)
    pairs = json.loads((suites_dir / "pairs.json").read_text())
    pairs["expectations"].append(
        {"type": "expect_column_values_to_be_between", "kwargs": {"column": "pass_rate", "max_value": 0.25}}
    )
    (suites_dir / "pairs.json").write_text(json.dumps(pairs))

    stricter = validate_shard(shard_tables(), shard_id=SHARD, suites_dir=suites_dir)
    assert "pairs: expect_column_values_to_be_between(pass_rate)" in failed_labels(stricter)
    # Back to the shipped suites: the stored copy is rewritten again and the shard passes.
    assert validate_shard(shard_tables(), shard_id=SHARD).success


def test_rows_and_dict_are_json_safe(valid: ShardValidation) -> None:
    json.dumps(valid.to_dict())
    table_rows = valid.rows(RUN)
    json.dumps(table_rows)
    assert len(table_rows) == len(valid.results)
    assert set(table_rows[0]) == {"run_id", "shard_id", "suite", "expectation", "column", "success", "observed"}
    assert {r["shard_id"] for r in table_rows} == {SHARD}
    pair_check = [r for r in table_rows if r["column"] == "chosen_score, rejected_score"]
    assert pair_check and pair_check[0]["expectation"] == "expect_column_pair_values_a_to_be_greater_than_b"


def test_a_validation_against_some_suites_says_what_validating_against_all_says_of_them() -> None:
    bad = shard_tables(set_rows("nodes", 1, verdict="probably"))
    everything = validate_shard(bad, shard_id=SHARD)
    some = validate_shard(bad, shard_id=SHARD, only=["pairs", "nodes"])
    assert some.results == [r for r in everything.results if r.suite in ("nodes", "pairs")]
    assert set(some.gx_results) == {"nodes", "pairs"} and not some.success
    with pytest.raises(ShardValidationError, match="no suite for table.*node;"):
        validate_shard(bad, shard_id=SHARD, only=["node"])


def test_missing_table_is_a_named_error() -> None:
    tables = shard_tables()
    del tables["pairs"]
    with pytest.raises(ShardValidationError, match="'pairs' is missing"):
        validate_shard(tables, shard_id=SHARD)


def write_suite(suites_dir: Path, table: str, expectation: dict[str, Any]) -> None:
    """Copy the shipped suites to `suites_dir` and append `expectation` to `table`'s suite."""
    shutil.copytree(load_suite(table).path.parent, suites_dir, dirs_exist_ok=True)
    path = suites_dir / f"{table}.json"
    suite = json.loads(path.read_text())
    suite["expectations"].append(expectation)
    path.write_text(json.dumps(suite))


def test_suite_naming_an_underived_check_column_is_rejected(tmp_path: Path) -> None:
    expectation = {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "check_moon", "value_set": [True]}}
    write_suite(tmp_path, "nodes", expectation)
    with pytest.raises(SuiteError, match=r"nodes\.json: check column\(s\) \['check_moon'\]"):
        load_suite("nodes", tmp_path)


def test_suite_naming_an_unknown_column_is_rejected(tmp_path: Path) -> None:
    write_suite(tmp_path, "pairs", {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "chosen"}})
    with pytest.raises(SuiteError, match=r"pairs\.json: expectations\[\d+\].*'chosen'"):
        load_suite("pairs", tmp_path)


def test_suite_naming_an_unknown_expectation_is_rejected(tmp_path: Path) -> None:
    write_suite(tmp_path / "suites", "pairs", {"type": "expect_pairs_to_be_lovely", "kwargs": {}})
    with pytest.raises(SuiteError, match=r"pairs\.json: expectations\[\d+\] \(expect_pairs_to_be_lovely\)"):
        validate_shard(shard_tables(), shard_id=SHARD, suites_dir=tmp_path / "suites")


def test_a_shard_with_rows_from_a_flagged_instruction_is_quarantined() -> None:
    """The GX gate: no instruction, node (and so SFT row), pair or principle example of a flagged instruction."""
    validation = validate_shard(shard_tables(), shard_id=SHARD, contaminated=["i1"])
    assert not validation.success
    assert {label for label in failed_labels(validation)} == {
        f"{table}: expect_column_values_to_not_be_in_set(instruction_id)"
        for table in ("instructions", "nodes", "pairs")}


def _validation_process_state() -> tuple[int, bool]:
    from tasks import validate

    return os.nice(0), bool(validate._CONTEXT)


def test_a_growth_host_validates_in_processes_behind_growth_each_with_its_gx_context_built() -> None:
    from orchard.config import Config
    from tasks.grow import VALIDATE_NICE, growth_host

    cfg = Config()
    unused = dataclasses.replace(cfg.engines["embedded"], kind="openai", base_urls=("http://127.0.0.1:9",))
    with growth_host(cfg.replace(engines={"embedded": unused})) as host:
        # Started with the host's first shard: by the time a shard lands, GX is imported and its context built.
        niceness, ready = host._validation_pool().submit(_validation_process_state).result()
    assert niceness == min(19, os.nice(0) + VALIDATE_NICE) and ready


# --- a batch of shards validated at once ------------------------------------------------------------------


def own_shard(number: int, edit: Callable[[dict[str, list[dict[str, Any]]]], None] | None = with_injection_and_jury,
              ) -> dict[str, list[dict[str, Any]]]:
    """Return the rows of shard `shard-<number>`: the valid shard (with `edit`), every id its own (`s<number>-…`)."""
    shard = shard_rows()
    if edit:
        edit(shard)
    return relabel(shard, f"s{number}-", f"shard-{number}")


def relabel(shard: dict[str, list[dict[str, Any]]], prefix: str, shard_id: str) -> dict[str, list[dict[str, Any]]]:
    """Prefix every id in a shard's rows with `prefix` (run and shard ids aside) and name `shard_id` in each row, in
    place; return the rows."""
    for table_rows in shard.values():
        for row in table_rows:
            for column, value in row.items():
                # A canary's second id names no row: its prefix is what the check reads.
                if column.endswith("_id") and column not in ("run_id", "shard_id") and isinstance(value, str) \
                        and not value.startswith("canary:"):
                    row[column] = f"{prefix}{value}"
            row["shard_id"] = shard_id
    return shard


def as_batch(shards: list[dict[str, list[dict[str, Any]]]], contaminated: dict[int, list[str]] | None = None,
             ) -> list[ShardTables]:
    """Return shards' rows as a batch to validate, shard i's flagged instruction ids `contaminated[i]`."""
    return [ShardTables({name: rows.table(name, table_rows) for name, table_rows in shard.items()},
                        shard["nodes"][0]["shard_id"], (contaminated or {}).get(i, []))
            for i, shard in enumerate(shards)]


_ALONE: dict[str, ShardValidation] = {}


def validated_alone(shard: ShardTables) -> ShardValidation:
    """`validate_shard` of one shard of a batch; the same rows (the unchanged neighbours of each fault) are validated
    alone once per session: the result is a function of the rows."""
    key = repr((shard.shard_id, list(shard.contaminated),
                {name: table.to_pylist() for name, table in sorted(shard.tables.items())}))
    if key not in _ALONE:
        _ALONE[key] = validate_shard(shard.tables, shard_id=shard.shard_id, contaminated=shard.contaminated)
    return _ALONE[key]


def assert_as_if_alone(batch: list[ShardTables]) -> list[ShardValidation]:
    """Assert that validating `batch` at once gives each shard what validating it alone gives; return the batch's."""
    together = validate_shards(batch)
    assert [v.shard_id for v in together] == [s.shard_id for s in batch]
    for shard, validation in zip(batch, together):
        alone = validated_alone(shard)
        assert validation.results == alone.results
        assert (validation.success, validation.summary()) == (alone.success, alone.summary())
        assert validation.rows(RUN) == alone.rows(RUN)
    return together


def test_a_batch_of_valid_shards_gets_each_shard_its_own_outcomes() -> None:
    together = assert_as_if_alone(as_batch([own_shard(1), own_shard(2, None), own_shard(3, with_mcts)]))
    assert all(v.success for v in together)
    assert all(not v.gx_results for v in together)  # judged in the batch: no GX result of its own


def test_a_batch_of_one_is_a_shard_validated_alone() -> None:
    (validation,) = validate_shards(as_batch([own_shard(1)]))
    assert validation.success and set(validation.gx_results) == set(rows.SHARD_TABLES)


def claims_another_shard(shard: dict[str, list[dict[str, Any]]]) -> None:
    shard["nodes"][1]["shard_id"] = "shard-1"  # the first shard of the batch


def second_run_id(shard: dict[str, list[dict[str, Any]]]) -> None:
    shard["pairs"][0]["run_id"] = "run-2"


def no_instructions(shard: dict[str, list[dict[str, Any]]]) -> None:
    shard["instructions"] = []


def duplicate_id(shard: dict[str, list[dict[str, Any]]]) -> None:
    shard["pairs"][1]["pair_id"] = shard["pairs"][0]["pair_id"]


def shares_a_pair_id_with_the_first_shard(shard: dict[str, list[dict[str, Any]]]) -> None:
    shard["pairs"][0]["pair_id"] = "s1-p1"  # another shard's id, unique in this shard: passes alone


def reason_twice(shard: dict[str, list[dict[str, Any]]]) -> None:
    shard["drops"].append(dict(shard["drops"][0]))


FAULTS = [claims_another_shard, second_run_id, no_instructions, duplicate_id, shares_a_pair_id_with_the_first_shard,
          reason_twice]


@pytest.mark.parametrize("fault", FAULTS, ids=[f.__name__ for f in FAULTS])
def test_a_fault_in_a_batch_is_found_where_validating_each_shard_alone_finds_it(
        fault: Callable[[dict[str, list[dict[str, Any]]]], None]) -> None:
    faulty = own_shard(2)
    fault(faulty)
    together = assert_as_if_alone(as_batch([own_shard(1), faulty, own_shard(3)]))
    if fault is not shares_a_pair_id_with_the_first_shard:
        assert [v.success for v in together] == [True, False, True]
    if fault is second_run_id:  # found by the shard's own part: its neighbours are still judged in the batch
        assert [bool(v.gx_results) for v in together] == [False, True, False]


def test_a_flagged_instruction_in_a_batch_quarantines_its_shard_only() -> None:
    together = assert_as_if_alone(as_batch([own_shard(1), own_shard(2), own_shard(3)], {1: ["s2-i1"]}))
    assert [v.success for v in together] == [True, False, True]


def test_a_growth_host_validates_shards_landing_together_in_batches_each_caller_getting_its_own() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from orchard.config import Config
    from tasks.grow import growth_host

    faulty = own_shard(2)
    second_run_id(faulty)
    batch = as_batch([own_shard(1), faulty, own_shard(3), own_shard(4, None), own_shard(5)])
    del batch[4].tables["pairs"]  # cannot be validated at all: only its caller hears of it
    cfg = Config()
    unused = dataclasses.replace(cfg.engines["embedded"], kind="openai", base_urls=("http://127.0.0.1:9",))
    with growth_host(cfg.replace(engines={"embedded": unused})) as host:
        with ThreadPoolExecutor(len(batch)) as callers:  # as the Prefect task threads of shards landing at once
            validated = [callers.submit(host.validate, shard.tables, shard.shard_id, shard.contaminated)
                         for shard in batch]
    for shard, outcome in zip(batch[:4], validated[:4]):
        alone = validated_alone(shard)
        assert outcome.result().results == alone.results and outcome.result().shard_id == shard.shard_id
    assert [outcome.result().success for outcome in validated[:4]] == [True, False, True, True]
    with pytest.raises(ShardValidationError, match="shard-5: table 'pairs' is missing"):
        validated[4].result()


def test_data_docs_render_the_shards_of_a_batch_that_were_validated_alone(gx_dir: Path) -> None:
    faulty = own_shard(2)
    second_run_id(faulty)
    together = validate_shards(as_batch([own_shard(1), faulty]))
    records = [json.loads(json.dumps(v.to_dict())) for v in together]
    index, pages = build_data_docs(gx_dir, records)
    assert index is not None and Path(index).is_file()
    assert set(pages) == {"shard-2"}  # shard-1 passed in the batch: no GX result of its own to render
    assert set(pages["shard-2"]) == set(rows.SHARD_TABLES)
