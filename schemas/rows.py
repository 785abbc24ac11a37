"""Row contracts of a shard: the Arrow schemas of the Parquet files a shard lands and the lake reads.

Column order here is the column order in Parquet and in the lake tables (schemas/lake.sql).
"""

from __future__ import annotations

import pyarrow as pa

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)

# A seed instruction as it entered a run.
INSTRUCTIONS = pa.schema(
    [
        ("run_id", pa.string()),
        ("shard_id", pa.string()),
        ("instruction_id", pa.string()),
        ("domain", pa.string()),
        ("source", pa.string()),  # generator name or file path
        ("source_row", pa.int64()),  # 1-based line/row in the source; generator index otherwise
        ("text", pa.string()),
        ("reference", pa.string()),  # the exact answer (math)
        ("difficulty", pa.int64()),
    ]
)

# One message of a tree: the instruction (depth 0) or an action (attempt) under a strategy.
NODES = pa.schema(
    [
        ("run_id", pa.string()),
        ("shard_id", pa.string()),
        ("tree_id", pa.string()),
        ("node_id", pa.string()),
        ("parent_id", pa.string()),  # null for the root
        ("instruction_id", pa.string()),
        ("depth", pa.int64()),
        ("role", pa.string()),  # instruction | action | critique | refinement | step | rollout
        ("strategy", pa.string()),  # null for the root
        ("prompt", MESSAGES),  # the exact messages the model was sent (empty for the root)
        ("text", pa.string()),
        ("verdict", pa.string()),  # correct | incorrect | unparsable; null for the root
        ("score", pa.float64()),
        ("verifier", pa.string()),  # which verifier produced verdict/score
        ("verifier_detail", pa.string()),  # e.g. "expected 84, got 88"
        ("model", pa.string()),
        ("temperature", pa.float64()),
        ("top_p", pa.float64()),
        ("max_tokens", pa.int64()),
        ("sample_seed", pa.int64()),
        ("prompt_template_version", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("finish_reason", pa.string()),
        # --- multi-turn trees and sandboxed code (appended so older lakes migrate by ADD COLUMN) ---
        ("turn", pa.int64()),  # 1 for first actions, t for the refinement of turn t; null for roots and critiques
        ("feedback", pa.string()),  # what the environment told the next turn about this node
        ("failure_reason", pa.string()),  # why the verifier failed it (timeout, memory, failing test, …)
        ("sandbox_exit_code", pa.int64()),  # code domain: the sandboxed program's exit status
        ("sandbox_stdout", pa.string()),  # capped
        ("sandbox_stderr", pa.string()),  # capped
        ("cached_tokens", pa.int64()),  # prompt tokens the server reported as served from its prefix cache
        # --- MCTS (role step: the answer so far; role rollout: a step's unfinished answer completed to the end) ---
        ("visits", pa.int64()),  # values backed up through this node (searched trees' roots and steps)
        ("q_value", pa.float64()),  # their mean
        ("self_eval", pa.float64()),  # the model's own P(Yes) that this partial answer is on track; null if unread
        ("value", pa.float64()),  # this step's own value: (1 - λ) · verifier (its answer or rollout) + λ · self_eval
    ]
)

# A (prompt, chosen, rejected) triple from two sibling nodes of one tree.
PAIRS = pa.schema(
    [
        ("run_id", pa.string()),
        ("shard_id", pa.string()),
        ("tree_id", pa.string()),
        ("pair_id", pa.string()),
        ("instruction_id", pa.string()),
        ("domain", pa.string()),
        # how the pair was chosen: rs (rejection sampling: siblings of one prompt, by verifier score) or
        # mcts (best and worst child by Q of one expanded step; scores are Q values)
        ("method", pa.string()),
        ("prompt", MESSAGES),
        ("chosen_node_id", pa.string()),
        ("rejected_node_id", pa.string()),
        ("chosen_text", pa.string()),
        ("rejected_text", pa.string()),
        ("chosen_score", pa.float64()),
        ("rejected_score", pa.float64()),
        ("margin", pa.float64()),
        ("shared_prefix_tokens", pa.int64()),
        ("difficulty", pa.int64()),
        ("pass_rate", pa.float64()),  # the prompt's measured pass rate over all its actions
        ("strategy", pa.string()),
        ("model", pa.string()),
        ("turn", pa.int64()),  # the turn both responses answer
        ("contrast", pa.string()),  # high | mid | low, from the margin and the run's thresholds
        ("k", pa.int64()),  # instruction following: the prompt's number of constraints; null elsewhere
    ]
)

# One row per tree: what was grown for one instruction in one run.
TREES = pa.schema(
    [
        ("run_id", pa.string()),
        ("shard_id", pa.string()),
        ("tree_id", pa.string()),
        ("instruction_id", pa.string()),
        ("domain", pa.string()),
        ("strategies", pa.list_(pa.string())),
        ("turns", pa.int64()),  # the deepest turn grown
        ("nodes", pa.int64()),
        ("actions", pa.int64()),  # actions and refinements
        ("correct", pa.int64()),
        ("pass_rate", pa.float64()),  # correct / actions
        ("pairs", pa.int64()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("k", pa.int64()),  # instruction following: the number of constraints; null elsewhere
    ]
)

# One expectation's outcome on one shard (written by materialise, not landed with the shard).
VALIDATIONS = pa.schema(
    [
        ("run_id", pa.string()),
        ("shard_id", pa.string()),
        ("suite", pa.string()),
        ("expectation", pa.string()),
        ("column", pa.string()),
        ("success", pa.bool_()),
        ("observed", pa.string()),
    ]
)

# What each shard file holds, in landing order (manifest.json is written after all of them).
SHARD_TABLES: dict[str, pa.Schema] = {
    "instructions": INSTRUCTIONS,
    "nodes": NODES,
    "pairs": PAIRS,
    "trees": TREES,
}


def table(name: str, rows: list[dict]) -> pa.Table:
    """Build the Arrow table `name` from row dicts, failing on a missing or mistyped column."""
    schema = SHARD_TABLES[name]
    missing = [{c for c in schema.names if c not in row} for row in rows]
    for i, cols in enumerate(missing):
        if cols:
            raise ValueError(f"{name} row {i}: missing column(s) {sorted(cols)}")
    return pa.Table.from_pylist(rows, schema=schema)
