-- The DuckLake lake: one table per shard file (mirroring schemas/rows.py column for column, in order),
-- one row per run, the validation results, and the views training code reads.
--
-- Applied by orchard.lake.connect in one transaction whenever this file's hash differs from the one
-- recorded on the `runs` table, so it must stay idempotent. Tables use IF NOT EXISTS: changing a
-- table here does not migrate an existing lake (write an ALTER TABLE for that). Views are replaced,
-- so editing a view here reaches existing lakes on their next connect.

CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR,
    flow_run_id VARCHAR,
    snapshot_id BIGINT,              -- the lake snapshot that published this run
    config_hash VARCHAR,
    started_at TIMESTAMPTZ,
    finished_at TIMESTAMPTZ,
    status VARCHAR,                  -- complete | partial | failed
    shards_planned BIGINT,
    shards_published BIGINT,
    shards_quarantined BIGINT,
    shards_failed BIGINT,
    trees BIGINT,
    nodes BIGINT,
    pairs BIGINT,
    pass_rate DOUBLE,
    prompt_tokens BIGINT,
    completion_tokens BIGINT,
    wall_s DOUBLE,
    tokens_per_s DOUBLE,
    summary VARCHAR                  -- JSON or text describing failures
);

CREATE TABLE IF NOT EXISTS instructions (
    run_id VARCHAR,
    shard_id VARCHAR,
    instruction_id VARCHAR,
    domain VARCHAR,
    source VARCHAR,
    source_row BIGINT,
    text VARCHAR,
    reference VARCHAR,
    difficulty BIGINT
);

CREATE TABLE IF NOT EXISTS nodes (
    run_id VARCHAR,
    shard_id VARCHAR,
    tree_id VARCHAR,
    node_id VARCHAR,
    parent_id VARCHAR,
    instruction_id VARCHAR,
    depth BIGINT,
    role VARCHAR,
    strategy VARCHAR,
    prompt STRUCT(role VARCHAR, content VARCHAR)[],
    text VARCHAR,
    verdict VARCHAR,
    score DOUBLE,
    verifier VARCHAR,
    verifier_detail VARCHAR,
    model VARCHAR,
    temperature DOUBLE,
    top_p DOUBLE,
    max_tokens BIGINT,
    sample_seed BIGINT,
    prompt_template_version VARCHAR,
    prompt_tokens BIGINT,
    completion_tokens BIGINT,
    finish_reason VARCHAR
);

CREATE TABLE IF NOT EXISTS pairs (
    run_id VARCHAR,
    shard_id VARCHAR,
    tree_id VARCHAR,
    pair_id VARCHAR,
    instruction_id VARCHAR,
    domain VARCHAR,
    method VARCHAR,
    prompt STRUCT(role VARCHAR, content VARCHAR)[],
    chosen_node_id VARCHAR,
    rejected_node_id VARCHAR,
    chosen_text VARCHAR,
    rejected_text VARCHAR,
    chosen_score DOUBLE,
    rejected_score DOUBLE,
    margin DOUBLE,
    shared_prefix_tokens BIGINT,
    difficulty BIGINT,
    pass_rate DOUBLE,
    strategy VARCHAR,
    model VARCHAR
);

-- One row per expectation per validated shard (passed and quarantined shards alike).
CREATE TABLE IF NOT EXISTS validations (
    run_id VARCHAR,
    shard_id VARCHAR,
    suite VARCHAR,
    expectation VARCHAR,
    "column" VARCHAR,                -- null for table-level expectations
    success BOOLEAN,
    observed VARCHAR                 -- the observed value, as text or JSON
);

-- TRL's conversational preference format: `prompt`, `chosen`, `rejected` are message lists, so
-- `DPOTrainer` applies the chat template itself. The other columns let a query select pairs
-- (by margin, shared prefix, difficulty) and trace them back.
CREATE OR REPLACE VIEW dpo_pairs AS
SELECT
    prompt,
    [{'role': 'assistant', 'content': chosen_text}] AS chosen,
    [{'role': 'assistant', 'content': rejected_text}] AS rejected,
    pair_id,
    run_id,
    domain,
    margin,
    shared_prefix_tokens,
    method,
    difficulty
FROM pairs;
