"""Row contracts of a shard: the Arrow schemas of the Parquet files a shard lands and the lake reads.

Column order here is the column order in Parquet and in the lake tables, which orchard.lake creates from these
schemas (tables_sql). New columns are appended: a lake made before one gains it, at the end, when next opened.
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
        # instruction | action | critique | refinement | step | rollout | injected
        # | principled | antithesis | unconditioned (open-ended: written under a principle, its antithesis, or neither)
        ("role", pa.string()),
        ("strategy", pa.string()),  # null for the root; the principle id for principled and antithesis nodes
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
        # --- error injection (role injected: a correct answer, minimally edited so that it is wrong) ---
        ("edit", pa.string()),  # what was changed, e.g. "'<' -> '<=' on line 3"; null for other roles
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
        # mcts (best and worst child by Q of one expanded step; scores are Q values) or error_injection (a correct
        # answer and a minimally edited copy that the verifier fails)
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
        ("edit_distance", pa.int64()),  # error_injection: characters changed between chosen and rejected
        # When the jury also judged the pair: stable | non_attitude | tie, and whom a stable jury preferred
        # (chosen | rejected | tie), so a run can say how often the jury agrees with the verifier.
        ("jury_label", pa.string()),
        ("jury_winner", pa.string()),
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

# An open-ended prompt answered under one principle of the constitution, under its antithesis, and under neither
# (SAMI-style principle-grounded examples), with the jury's label for (principled vs antithesis).
PRINCIPLE_EXAMPLES = pa.schema(
    [
        ("run_id", pa.string()),
        ("shard_id", pa.string()),
        ("tree_id", pa.string()),
        ("example_id", pa.string()),
        ("instruction_id", pa.string()),
        ("prompt", pa.string()),  # the user's request
        ("constitution", pa.string()),  # name@version
        ("principle_id", pa.string()),
        ("principle", pa.string()),  # the principle's text: the system message the response was written under
        ("antithesis", pa.string()),  # its antithesis: the system message the contrast was written under
        ("response_node_id", pa.string()),
        ("response", pa.string()),  # written under the principle
        ("antithesis_node_id", pa.string()),
        ("antithesis_response", pa.string()),  # written under the antithesis
        ("unconditioned_node_id", pa.string()),
        ("unconditioned_response", pa.string()),  # written with no principle (shared by the prompt's examples)
        ("model", pa.string()),
        ("label", pa.string()),  # stable | non_attitude | tie (the jury on response vs antithesis_response)
        ("jury_winner", pa.string()),  # response | antithesis | tie when stable or tie; null for a non-attitude
        ("votes_response", pa.int64()),  # judges that preferred the response in both presentation orders
        ("votes_antithesis", pa.int64()),
        ("votes_tie", pa.int64()),
        ("judges", pa.int64()),  # the jury's size
    ]
)

# One judge's verdict on one comparison in one presentation order. A comparison's `first` side is the one its
# construction expects to win (the principled response, the verifier's chosen answer, a canary's real response).
JUDGEMENTS = pa.schema(
    [
        ("run_id", pa.string()),
        ("shard_id", pa.string()),
        ("tree_id", pa.string()),
        ("judgement_id", pa.string()),
        ("comparison_id", pa.string()),  # the example_id, pair_id or canary id it judges
        ("kind", pa.string()),  # principle | verifiable | canary
        ("criterion", pa.string()),  # the principle id, or "correctness" for verifiable pairs
        ("judge", pa.string()),  # the jury member's name
        ("rubric", pa.string()),
        ("model", pa.string()),
        ("presented", pa.string()),  # first_as_a | second_as_a: which side was shown as response A
        ("first_id", pa.string()),  # node id of the first side
        ("second_id", pa.string()),  # node id of the second side, or canary:<principle id>
        ("prompt", MESSAGES),  # the exact messages the judge was sent
        ("raw", pa.string()),  # the judge's whole answer, as sent
        ("status", pa.string()),  # ok | truncated | unparseable | invalid (parsed, but breaks the verdict schema)
        ("winner", pa.string()),  # A | B | tie as the judge said it; null unless status is ok
        ("preference", pa.string()),  # first | second | tie, undoing the presentation order; null unless ok
        ("reason", pa.string()),
        ("expected", pa.string()),  # the known answer (first) for canaries and verifiable pairs; null otherwise
        ("position_consistent", pa.bool_()),  # the same judge preferred the same side in both orders; null if unread
        ("label", pa.string()),  # the comparison's label: stable | non_attitude | tie (null for canaries)
        ("structured", pa.bool_()),  # the server constrained the answer to the verdict schema
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("finish_reason", pa.string()),
    ]
)

# Rows dropped, by stage and reason: a shard's (pair hygiene, curation, jury labels) land with it; a run's own
# (seeds, decontamination, dedup: before shards exist; shard_id null) are written by materialise.
DROPS = pa.schema(
    [
        ("run_id", pa.string()),
        ("shard_id", pa.string()),
        ("stage", pa.string()),  # seeds | decontamination | dedup | pair_hygiene | curation | jury
        ("reason", pa.string()),
        ("count", pa.int64()),
        ("example_ids", pa.list_(pa.string())),  # a few of the dropped ids (instruction, pair or example ids), the smallest
    ]
)

# An instruction the hygiene gate flagged as contaminated by one eval item (written by materialise; never grown).
CONTAMINATION = pa.schema(
    [
        ("run_id", pa.string()),
        ("instruction_id", pa.string()),
        ("eval_set", pa.string()),
        ("eval_item_id", pa.string()),
        ("matched_ngrams", pa.int64()),  # the eval item's distinct n-grams found in the instruction
        ("eval_ngrams", pa.int64()),  # the eval item's distinct n-grams
        ("coverage", pa.float64()),  # matched_ngrams / eval_ngrams
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

# The lake's index of published instructions, for dedup against earlier runs (tasks/history.py; written by the
# publishing transaction, and once for runs published before it existed). `minhash` names the settings a row was made
# with (tasks.hygiene.Signing.label): a plan compares rows of its own settings only.
# Scanned whole by each plan: the text hash finds exact duplicates, the LSH band keys near-duplicate candidates.
INSTRUCTION_FINGERPRINTS = pa.schema(
    [
        ("run_id", pa.string()),
        ("instruction_id", pa.string()),
        ("minhash", pa.string()),  # e.g. "affine32 seed=1 shingle=5 perm=128 bands=9x13"; "off": text hash only
        ("text_sha1", pa.string()),  # hex sha1 of the normalized text (tasks.hygiene.normalized)
        ("band_keys", pa.list_(pa.uint64())),  # band i's key at position i + 1; empty when near duplicates are off
    ]
)

# Read by instruction id, for near-duplicate candidates only: the MinHash values the Jaccard check compares.
INSTRUCTION_SIGNATURES = pa.schema(
    [
        ("run_id", pa.string()),
        ("instruction_id", pa.string()),
        ("minhash", pa.string()),
        ("hashvalues", pa.list_(pa.uint32())),  # num_perm values (datasketch MinHash.hashvalues)
    ]
)

# What each shard file holds, in landing order (manifest.json is written after all of them).
SHARD_TABLES: dict[str, pa.Schema] = {
    "instructions": INSTRUCTIONS,
    "nodes": NODES,
    "pairs": PAIRS,
    "trees": TREES,
    "principle_examples": PRINCIPLE_EXAMPLES,
    "judgements": JUDGEMENTS,
    "drops": DROPS,
}

# DuckLake options of lake tables, set by orchard.lake at connect (DuckLake refuses them in the transaction that creates
# the table, so the table DDL cannot hold them). A near-duplicate candidate's signature is read by instruction id:
# small row groups let that read one of them (2048 rows: the smallest DuckDB's writer makes, flushing whole vectors)
# instead of its run's whole file.
TABLE_OPTIONS: dict[str, dict[str, int]] = {"instruction_signatures": {"parquet_row_group_size": 2048}}

# Every lake table a schema here describes: orchard.lake creates them, and adds the columns a lake lacks, at connect.
LAKE_TABLES: dict[str, pa.Schema] = {
    **SHARD_TABLES,
    "contamination": CONTAMINATION,
    "validations": VALIDATIONS,
    "instruction_fingerprints": INSTRUCTION_FINGERPRINTS,
    "instruction_signatures": INSTRUCTION_SIGNATURES,
}


def table(name: str, rows: list[dict]) -> pa.Table:
    """Build the Arrow table `name` from row dicts, failing on a missing, unknown (a misspelt name would otherwise be
    dropped, leaving its column NULL) or mistyped column."""
    schema = SHARD_TABLES[name]
    columns = set(schema.names)
    for i, row in enumerate(rows):
        if row.keys() != columns:
            missing, unknown = sorted(columns - row.keys()), sorted(row.keys() - columns)
            raise ValueError(f"{name} row {i}: " + "; ".join(
                [f"missing column(s) {missing}"] * bool(missing) + [f"unknown column(s) {unknown}"] * bool(unknown)))
    return pa.Table.from_pylist(rows, schema=schema)
