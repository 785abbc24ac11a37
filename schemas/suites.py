"""Expectation suites of a shard: loaded from schemas/suites/<table>.json, plus the derived check columns they use.

A suite file is GX's own expectation vocabulary without GX's bookkeeping (ids, meta), so a person can read and
edit it:

    {"table": "pairs", "row_id": "pair_id", "description": "...",
     "expectations": [{"type": "expect_column_values_to_be_unique", "kwargs": {"column": "pair_id"},
                       "notes": "why (optional)"}, ...]}

Rules GX has no built-in for (across columns or tables) are boolean columns named `check_*`, derived here by one
function per table and expected to be in {true}. This module does not import Great Expectations (slow to import).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd

from schemas.domains import JUDGED_DOMAINS
from schemas.errors import OrchardError
from schemas.rows import SHARD_TABLES

SUITES_DIR = Path(__file__).parent / "suites"
CHECK_PREFIX = "check_"
# kwargs that name the columns an expectation reads, in the order they are reported.
COLUMN_KWARGS = ("column", "column_A", "column_B", "column_list")
ATTEMPT_ROLES = ("action", "refinement")  # the nodes a verifier scores: first attempts and refinements
PRINCIPLED_ROLES = ("principled", "antithesis", "unconditioned")  # open-ended responses, under a principle or not


class SuiteError(OrchardError, ValueError):
    """A suite file is missing, malformed or names a column or check that does not exist; the message names it."""


@dataclass(frozen=True)
class ExpectationSpec:
    """One expectation of a suite file: GX type name, its kwargs, and why it exists."""

    type: str
    kwargs: dict[str, Any]
    notes: str = ""

    @property
    def columns(self) -> tuple[str, ...]:
        """Return the columns this expectation reads (empty for table-level expectations)."""
        return columns_of(self.kwargs)


def columns_of(kwargs: Mapping[str, Any]) -> tuple[str, ...]:
    """Return the columns an expectation's kwargs name, in reporting order (column, column_A, column_B, column_list)."""
    found: list[str] = []
    for key in COLUMN_KWARGS:
        value = kwargs.get(key)
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(str(v) for v in value)
    return tuple(found)


@dataclass(frozen=True)
class SuiteSpec:
    """The expectations one shard table must meet, as read from its suite file."""

    table: str
    row_id: str
    description: str
    expectations: tuple[ExpectationSpec, ...]
    path: Path

    @property
    def check_columns(self) -> tuple[str, ...]:
        """Return the derived `check_*` columns this suite expects, in file order, without repeats."""
        seen: dict[str, None] = {}
        for expectation in self.expectations:
            for column in expectation.columns:
                if column.startswith(CHECK_PREFIX):
                    seen.setdefault(column, None)
        return tuple(seen)

    @property
    def data_columns(self) -> tuple[str, ...]:
        """Return the shard-table columns the suite reads (row id first, then expectation and condition columns)."""
        seen: dict[str, None] = {self.row_id: None}
        for expectation in self.expectations:
            for column in (*expectation.columns, *_condition_columns(expectation.kwargs.get("row_condition"))):
                if not column.startswith(CHECK_PREFIX):
                    seen.setdefault(column, None)
        return tuple(seen)


def _condition_columns(condition: Any) -> list[str]:
    """Return the column names a GX row_condition dict mentions (nested and/or conditions included)."""
    if not isinstance(condition, dict):
        return []
    found = []
    column = condition.get("column")
    if isinstance(column, dict) and isinstance(column.get("name"), str):
        found.append(column["name"])
    for inner in condition.get("conditions", []) or []:
        found.extend(_condition_columns(inner))
    return found


def load_suite(table: str, suites_dir: Path = SUITES_DIR) -> SuiteSpec:
    """Return the suite of shard table `table` read from `<suites_dir>/<table>.json`, checked against its schema."""
    if table not in SHARD_TABLES:
        raise SuiteError(f"no shard table {table!r}; known: {sorted(SHARD_TABLES)}")
    path = Path(suites_dir) / f"{table}.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise SuiteError(f"{path}: suite file not found") from error
    except json.JSONDecodeError as error:
        raise SuiteError(f"{path}: not valid JSON: {error}") from error
    if not isinstance(raw, dict):
        raise SuiteError(f"{path}: top level must be an object")
    if raw.get("table") != table:
        raise SuiteError(f"{path}: field 'table' is {raw.get('table')!r}, expected {table!r}")
    schema_columns = set(SHARD_TABLES[table].names)
    row_id = raw.get("row_id")
    if row_id not in schema_columns:
        raise SuiteError(f"{path}: field 'row_id' is {row_id!r}, not a column of {table}")
    entries = raw.get("expectations")
    if not isinstance(entries, list) or not entries:
        raise SuiteError(f"{path}: field 'expectations' must be a non-empty list")
    expectations = []
    for i, entry in enumerate(entries):
        where = f"{path}: expectations[{i}]"
        if not isinstance(entry, dict):
            raise SuiteError(f"{where}: must be an object")
        unknown = set(entry) - {"type", "kwargs", "notes"}
        if unknown:
            raise SuiteError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: type, kwargs, notes")
        kind, kwargs, notes = entry.get("type"), entry.get("kwargs", {}), entry.get("notes", "")
        if not isinstance(kind, str) or not kind.startswith("expect_"):
            raise SuiteError(f"{where}: field 'type' must be an expectation name (expect_...), got {kind!r}")
        if not isinstance(kwargs, dict):
            raise SuiteError(f"{where}: field 'kwargs' must be an object")
        if not isinstance(notes, str):
            raise SuiteError(f"{where}: field 'notes' must be a string")
        spec = ExpectationSpec(type=kind, kwargs=kwargs, notes=notes)
        for column in (*spec.columns, *_condition_columns(kwargs.get("row_condition"))):
            if column not in schema_columns and not column.startswith(CHECK_PREFIX):
                raise SuiteError(f"{where} ({kind}): column {column!r} is neither a {table} column nor check_*")
        expectations.append(spec)
    suite = SuiteSpec(
        table=table,
        row_id=row_id,
        description=str(raw.get("description", "")),
        expectations=tuple(expectations),
        path=path,
    )
    unknown_checks = set(suite.check_columns) - set(check_names(table))
    if unknown_checks:
        raise SuiteError(
            f"{path}: check column(s) {sorted(unknown_checks)} are not derived for {table}; "
            f"known: {sorted(check_names(table))} (add them to schemas/suites.py)"
        )
    return suite


def load_suites(suites_dir: Path = SUITES_DIR) -> dict[str, SuiteSpec]:
    """Return the suite of every shard table, in landing order."""
    return {table: load_suite(table, suites_dir) for table in SHARD_TABLES}


def _instruction_checks(frames: Mapping[str, pd.DataFrame]) -> dict[str, pd.Series]:
    """Return the derived checks of the instructions table (none yet: its rules are all built-in)."""
    return {}


def _nodes_by_id(nodes: pd.DataFrame) -> pd.DataFrame:
    """Return the nodes indexed by node_id, to look up a parent's or a paired node's fields with `map`."""
    # Null and duplicate ids are the not_be_null and uniqueness expectations' findings; a null index entry
    # would also make every null parent_id (the roots) look up that node.
    return _by(nodes, "node_id")


def _node_checks(frames: Mapping[str, pd.DataFrame]) -> dict[str, pd.Series]:
    """Return the derived checks of the nodes table: parents resolve in the shard, turns follow the tree shape."""
    nodes, instructions, trees = frames["nodes"], frames["instructions"], frames["trees"]
    by_id = _nodes_by_id(nodes)
    parent = nodes["parent_id"]
    has_parent = parent.notna()
    # A dangling parent is reported once, by check_parent_exists, not again by every rule about the parent.
    dangling = has_parent & ~parent.isin(nodes["node_id"])
    parent_tree = parent.map(by_id["tree_id"])
    parent_role = parent.map(by_id["role"])
    parent_verdict = parent.map(by_id["verdict"])
    # astype: on an empty shard, map() keeps the id column's string dtype, which cannot take `+ 1`.
    grandparent_turn = parent.map(by_id["parent_id"]).map(by_id["turn"]).astype("float64")
    role = nodes["role"]
    refinement, critique = role.eq("refinement"), role.eq("critique")
    step, rollout = role.eq("step"), role.eq("rollout")
    # MCTS: a step continues the tree's root or another step; a rollout completes an unfinished step.
    prefix_of_parent = parent.map(by_id["text"]).fillna("")
    continues_parent = pd.Series(
        [p == "" or t.startswith(p) for p, t in zip(prefix_of_parent, nodes["text"].fillna(""))], index=nodes.index,
        dtype=bool,
    )
    return {
        "check_parent_exists": ~dangling,
        "check_parent_in_same_tree": ~has_parent | dangling | (parent_tree == nodes["tree_id"]),
        "check_instruction_exists": nodes["instruction_id"].isin(instructions["instruction_id"]),
        "check_tree_listed": nodes["tree_id"].isin(trees["tree_id"]),
        "check_refinement_parent_is_critique": ~refinement | dangling | parent_role.eq("critique"),
        # ne("correct") holds for a null verdict too: a missing verdict is reported by not_be_null on the parent.
        "check_critique_parent_is_failed_attempt": (
            ~critique | dangling | (parent_role.isin(ATTEMPT_ROLES) & parent_verdict.ne("correct"))
        ),
        "check_refinement_turn_follows_grandparent": ~refinement | dangling | (nodes["turn"] == grandparent_turn + 1),
        "check_step_parent_is_root_or_step": ~step | dangling | parent_role.isin(["instruction", "step"]),
        "check_rollout_parent_is_unfinished_step": ~rollout | dangling | (parent_role.eq("step") & parent_verdict.isna()),
        # The root's text is the instruction, not an answer prefix: only a step parent's text must be continued.
        "check_mcts_answer_continues_parent": ~(step | rollout) | dangling | ~parent_role.eq("step") | continues_parent,
        # ne("correct") holds for a null verdict: the missing verdict is not_be_null's finding.
        "check_injected_is_wrong": ~role.eq("injected") | nodes["verdict"].ne("correct"),
        # Through the parent: the root's instruction must be of a judged domain (open-ended; the check's name predates
        # the registry), and the node must answer that instruction.
        "check_principled_parent_is_open_ended_root": ~role.isin(PRINCIPLED_ROLES) | dangling | (
            parent_role.eq("instruction")
            & parent.map(by_id["instruction_id"]).eq(nodes["instruction_id"])
            & parent.map(by_id["instruction_id"]).map(_by(instructions, "instruction_id")["domain"]).isin(JUDGED_DOMAINS)
        ),
    }


def _pair_checks(frames: Mapping[str, pd.DataFrame]) -> dict[str, pd.Series]:
    """Return the derived checks of the pairs table: two different sibling nodes of the pair's turn, a true margin."""
    pairs, nodes, instructions = frames["pairs"], frames["nodes"], frames["instructions"]
    by_id = _nodes_by_id(nodes)
    chosen, rejected = pairs["chosen_node_id"], pairs["rejected_node_id"]
    # A missing node is reported by check_chosen/rejected_node_exists, not again by the rules about the nodes.
    both_exist = chosen.isin(nodes["node_id"]) & rejected.isin(nodes["node_id"])
    chosen_parent, rejected_parent = chosen.map(by_id["parent_id"]), rejected.map(by_id["parent_id"])
    difference = pairs["chosen_score"] - pairs["rejected_score"]
    return {
        # fillna: a null text is reported by not_be_null; comparing NA would make the check itself null.
        "check_chosen_differs_from_rejected": (
            pairs["chosen_text"].fillna("").str.strip() != pairs["rejected_text"].fillna("").str.strip()
        ),
        "check_chosen_node_differs_from_rejected_node": (
            pairs["chosen_node_id"].fillna("") != pairs["rejected_node_id"].fillna("")
        ),
        "check_margin_is_score_difference": ((pairs["margin"] - difference).abs() <= 1e-9).fillna(False),
        "check_chosen_node_exists": chosen.isin(nodes["node_id"]),
        "check_rejected_node_exists": rejected.isin(nodes["node_id"]),
        "check_instruction_exists": pairs["instruction_id"].isin(instructions["instruction_id"]),
        "check_nodes_share_parent": ~both_exist | (chosen_parent.notna() & (chosen_parent == rejected_parent)),
        "check_injection_edits_chosen": ~pairs["method"].eq("error_injection") | ~both_exist
        | rejected.map(by_id["role"]).eq("injected"),
        "check_turn_matches_nodes": ~both_exist | (
            (pairs["turn"] == chosen.map(by_id["turn"]).astype("float64"))
            & (pairs["turn"] == rejected.map(by_id["turn"]).astype("float64"))
        ),
    }


def _tree_checks(frames: Mapping[str, pd.DataFrame]) -> dict[str, pd.Series]:
    """Return the derived checks of the trees table: each tree's counts and pass rate agree with its nodes and pairs."""
    trees, nodes, pairs, instructions = frames["trees"], frames["nodes"], frames["pairs"], frames["instructions"]
    attempts = nodes[nodes["role"].isin(ATTEMPT_ROLES)]

    def counted(rows: pd.DataFrame) -> pd.Series:
        """Rows per tree, for each row of `trees` (0 where the tree has none)."""
        # astype: on an empty shard, map() keeps the id column's string dtype.
        return trees["tree_id"].map(rows.groupby("tree_id").size()).astype("float64").fillna(0)

    actions, correct = counted(attempts), counted(attempts[attempts["verdict"].eq("correct")])
    pass_rate = trees["pass_rate"]
    return {
        "check_instruction_exists": trees["instruction_id"].isin(instructions["instruction_id"]),
        "check_nodes_match": trees["nodes"] == counted(nodes),
        "check_actions_match": trees["actions"] == actions,
        "check_correct_match": trees["correct"] == correct,
        "check_pairs_match": trees["pairs"] == counted(pairs),
        # A tree without a scored attempt has no pass rate to speak of: null or 0 both say so.
        "check_pass_rate_is_correct_over_actions": (
            ((pass_rate - correct / actions.where(actions > 0)).abs() <= 1e-9)
            | (actions.eq(0) & (pass_rate.isna() | pass_rate.eq(0)))
        ),
    }


def _by(frame: pd.DataFrame, key: str) -> pd.DataFrame:
    """Return `frame` indexed by `key` (null and repeated keys dropped), to look fields up with `map`."""
    return frame[frame[key].notna()].drop_duplicates(key).set_index(key)


def _principle_example_checks(frames: Mapping[str, pd.DataFrame]) -> dict[str, pd.Series]:
    """Return the derived checks of principle_examples: its nodes, its prompt's domain, its label and its verdicts."""
    examples, nodes, judgements = frames["principle_examples"], frames["nodes"], frames["judgements"]
    by_id = _by(nodes, "node_id")
    nodes_exist = pd.Series(True, index=examples.index, dtype=bool)
    for id_column, text_column, role in (("response_node_id", "response", "principled"),
                                         ("antithesis_node_id", "antithesis_response", "antithesis"),
                                         ("unconditioned_node_id", "unconditioned_response", "unconditioned")):
        ids = examples[id_column]
        nodes_exist &= ids.map(by_id["role"]).eq(role).fillna(False).astype(bool)
        nodes_exist &= (ids.map(by_id["text"]) == examples[text_column]).fillna(False).astype(bool)
    domain = examples["instruction_id"].map(_by(frames["instructions"], "instruction_id")["domain"])
    judges = examples["judges"].astype("float64")
    half = judges / 2
    first, second, tie = (examples[c].astype("float64") for c in ("votes_response", "votes_antithesis", "votes_tie"))
    label = pd.Series("non_attitude", index=examples.index, dtype=object)
    winner = pd.Series("", index=examples.index, dtype=object)  # "" stands for null: NA never equals itself
    for mask, text, side in (((second.eq(0) & (first > half)), "stable", "response"),
                             ((first.eq(0) & (second > half)), "stable", "antithesis"), ((tie > half), "tie", "tie")):
        mask = mask.fillna(False).astype(bool)
        label[mask], winner[mask] = text, side
    verdicts = judgements[judgements["kind"].eq("principle")]

    def per_example(counts: pd.Series) -> pd.Series:
        return examples["example_id"].map(counts).astype("float64").fillna(0)

    by_example = verdicts.groupby("comparison_id")
    rows, voters = per_example(by_example.size()), per_example(by_example["judge"].nunique())
    distinct = per_example(verdicts.drop_duplicates(["comparison_id", "judge", "presented"]).groupby("comparison_id").size())
    return {
        "check_nodes_exist": nodes_exist,
        "check_instruction_is_open_ended": domain.isin(JUDGED_DOMAINS).fillna(False).astype(bool),  # a judged domain
        "check_label_follows_votes": examples["label"].eq(label) & examples["jury_winner"].fillna("").eq(winner),
        # Each of the `judges` judges has one verdict per presentation order: no more, no fewer, no other judge.
        "check_judged_in_both_orders": rows.eq(2 * judges) & distinct.eq(rows) & voters.eq(judges),
    }


def _judgement_checks(frames: Mapping[str, pd.DataFrame]) -> dict[str, pd.Series]:
    """Return the derived checks of judgements: a verdict is read exactly when ok, and compares rows of the shard."""
    judgements, nodes = frames["judgements"], frames["nodes"]
    ok, kind = judgements["status"].eq("ok"), judgements["kind"]
    read = judgements["winner"].notna() & judgements["preference"].notna()
    unread = judgements["winner"].isna() & judgements["preference"].isna()
    first_as_a = judgements["presented"].eq("first_as_a")
    winner = judgements["winner"]
    undone = winner.eq("tie") & judgements["preference"].eq("tie") | (
        winner.eq("A").eq(first_as_a) & judgements["preference"].eq("first") & winner.isin(["A", "B"])
    ) | (winner.eq("A").ne(first_as_a) & judgements["preference"].eq("second") & winner.isin(["A", "B"]))
    known = kind.isin(["canary", "verifiable"])
    compared = (
        (kind.eq("principle") & judgements["comparison_id"].isin(frames["principle_examples"]["example_id"]))
        | (kind.eq("verifiable") & judgements["comparison_id"].isin(frames["pairs"]["pair_id"]))
        | kind.eq("canary")
    ) & judgements["first_id"].isin(nodes["node_id"]) & (
        judgements["second_id"].isin(nodes["node_id"])
        | (kind.eq("canary") & judgements["second_id"].fillna("").str.startswith("canary:"))
    )
    return {
        "check_read_iff_ok": (ok & read) | (~ok & unread),
        "check_preference_undoes_order": ~ok | undone,
        "check_canary_expects_first": (known & judgements["expected"].eq("first")) | (~known & judgements["expected"].isna()),
        "check_compares_shard_rows": compared,
    }


CHECKS: dict[str, Callable[[Mapping[str, pd.DataFrame]], dict[str, pd.Series]]] = {
    "instructions": _instruction_checks,
    "nodes": _node_checks,
    "pairs": _pair_checks,
    "trees": _tree_checks,
    "principle_examples": _principle_example_checks,
    "judgements": _judgement_checks,
    "drops": lambda frames: {},  # plain columns only
}


@functools.cache
def check_names(table: str) -> tuple[str, ...]:
    """Return the names of the check columns derived for `table` (found by deriving them on empty tables)."""
    empty = {name: schema.empty_table().to_pandas() for name, schema in SHARD_TABLES.items()}
    return tuple(CHECKS[table](empty))


def with_checks(suite: SuiteSpec, frames: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Return a copy of `frames[suite.table]` with the suite's data columns and the check columns it expects."""
    frame = frames[suite.table]
    derived = CHECKS[suite.table](frames)
    checked = frame.loc[:, list(suite.data_columns)].copy()
    for name in suite.check_columns:
        # eq(True): GX sees plain booleans, and a check that came out NA counts as failed, never as passed.
        checked[name] = derived[name].eq(True).to_numpy()
    return checked
