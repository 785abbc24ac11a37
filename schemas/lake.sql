-- The DuckLake lake: one table per shard file (mirroring schemas/rows.py column for column, in order),
-- one row per run, the validation results, and the views training code reads.
--
-- Applied by orchard.lake.connect in one transaction whenever this file's hash differs from the one
-- recorded on the `runs` table, so it must stay idempotent. Tables use IF NOT EXISTS, so a new table
-- reaches existing lakes as is; a new column must be appended here (as in schemas/rows.py) AND get an
-- `ALTER TABLE … ADD COLUMN IF NOT EXISTS` in the migrations below, which is what reaches a lake made
-- before it (rows already there read NULL for it). Views are replaced, so editing a view here reaches
-- existing lakes on their next connect.

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
    summary VARCHAR,                 -- JSON: each shard's fate and reason, problems, failed requests, seeds read/kept
    fleiss_kappa DOUBLE,             -- the jury's Fleiss' κ over this run's judgements (null: nothing judged)
    agreement VARCHAR,               -- JSON: per judge position consistency, A-share and canary accuracy; pairwise
                                     -- Cohen's κ; label counts; how often a stable jury agrees with the verifier
    shards_reused BIGINT,            -- shards already in the lake from an earlier attempt of the same run id
    cached_share DOUBLE              -- share of the prompt tokens of the shards grown now that the model servers
                                     -- answered from their prompt cache (null: no server reported it)
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
    finish_reason VARCHAR,
    turn BIGINT,                     -- 1 for first actions, t + 1 for a refinement of turn t; null for roots, critiques
    feedback VARCHAR,
    failure_reason VARCHAR,
    sandbox_exit_code BIGINT,
    sandbox_stdout VARCHAR,
    sandbox_stderr VARCHAR,
    cached_tokens BIGINT,
    visits BIGINT,                   -- MCTS: values backed up through this node
    q_value DOUBLE,                  -- MCTS: their mean
    self_eval DOUBLE,                -- MCTS: the model's own P(Yes) that the partial answer is on track
    value DOUBLE,                    -- MCTS: the step's own value, (1 - λ) · verifier + λ · self_eval
    edit VARCHAR                     -- role injected: what was changed in the correct answer it copies
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
    model VARCHAR,
    turn BIGINT,
    contrast VARCHAR,                -- high | mid | low (by margin)
    k BIGINT,                        -- instruction following: number of constraints
    edit_distance BIGINT,            -- error_injection: characters changed between chosen and rejected
    jury_label VARCHAR,              -- when the jury judged the pair too: stable | non_attitude | tie
    jury_winner VARCHAR              -- chosen | rejected | tie (stable or tie labels only)
);

-- One row per tree: what was grown for one instruction in one run.
CREATE TABLE IF NOT EXISTS trees (
    run_id VARCHAR,
    shard_id VARCHAR,
    tree_id VARCHAR,
    instruction_id VARCHAR,
    domain VARCHAR,
    strategies VARCHAR[],
    turns BIGINT,
    nodes BIGINT,
    actions BIGINT,                  -- actions and refinements
    correct BIGINT,
    pass_rate DOUBLE,
    pairs BIGINT,
    prompt_tokens BIGINT,
    completion_tokens BIGINT,
    k BIGINT
);

-- Open-ended prompts answered under a principle, under its antithesis and under neither, with the jury's label.
CREATE TABLE IF NOT EXISTS principle_examples (
    run_id VARCHAR,
    shard_id VARCHAR,
    tree_id VARCHAR,
    example_id VARCHAR,
    instruction_id VARCHAR,
    prompt VARCHAR,
    constitution VARCHAR,            -- name@version
    principle_id VARCHAR,
    principle VARCHAR,
    antithesis VARCHAR,
    response_node_id VARCHAR,
    response VARCHAR,                -- written under the principle
    antithesis_node_id VARCHAR,
    antithesis_response VARCHAR,     -- written under the antithesis
    unconditioned_node_id VARCHAR,
    unconditioned_response VARCHAR,  -- written under no principle
    model VARCHAR,
    label VARCHAR,                   -- stable | non_attitude | tie
    jury_winner VARCHAR,             -- response | antithesis | tie; null for a non-attitude
    votes_response BIGINT,
    votes_antithesis BIGINT,
    votes_tie BIGINT,
    judges BIGINT
);

-- One judge's verdict on one comparison in one presentation order (principle examples, verifiable pairs, canaries).
CREATE TABLE IF NOT EXISTS judgements (
    run_id VARCHAR,
    shard_id VARCHAR,
    tree_id VARCHAR,
    judgement_id VARCHAR,
    comparison_id VARCHAR,
    kind VARCHAR,                    -- principle | verifiable | canary
    criterion VARCHAR,
    judge VARCHAR,
    rubric VARCHAR,
    model VARCHAR,
    presented VARCHAR,               -- first_as_a | second_as_a
    first_id VARCHAR,
    second_id VARCHAR,
    prompt STRUCT(role VARCHAR, content VARCHAR)[],
    raw VARCHAR,
    status VARCHAR,                  -- ok | truncated | unparseable | invalid
    winner VARCHAR,                  -- A | B | tie
    preference VARCHAR,              -- first | second | tie
    reason VARCHAR,
    expected VARCHAR,
    position_consistent BOOLEAN,
    label VARCHAR,
    structured BOOLEAN,
    prompt_tokens BIGINT,
    completion_tokens BIGINT,
    finish_reason VARCHAR
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

-- Rows dropped on the way, with the reason: a run's seeds stages (seeds, decontamination, dedup; shard_id null)
-- and each shard's (pair_hygiene, curation, jury). "What went missing, and why" is a GROUP BY here.
CREATE TABLE IF NOT EXISTS drops (
    run_id VARCHAR,
    shard_id VARCHAR,                -- null: a run-level stage, before shards were planned
    stage VARCHAR,
    reason VARCHAR,
    "count" BIGINT,
    example_ids VARCHAR[]            -- the first few ids dropped for this reason
);

-- Every instruction the hygiene gate flagged: which eval item it covers, by how many n-grams. Never grown.
CREATE TABLE IF NOT EXISTS contamination (
    run_id VARCHAR,
    instruction_id VARCHAR,
    eval_set VARCHAR,
    eval_item_id VARCHAR,
    matched_ngrams BIGINT,
    eval_ngrams BIGINT,
    coverage DOUBLE
);

-- The index of published instructions that dedup against earlier runs reads (tasks/history.py), one row per
-- instruction a run published and per hygiene settings (`minhash`), written by the publishing transaction (and once,
-- by a plan, for runs published before it or under other settings). Each plan scans instruction_fingerprints whole:
-- the text hash finds exact duplicates, a shared LSH band key near-duplicate candidates.
CREATE TABLE IF NOT EXISTS instruction_fingerprints (
    run_id VARCHAR,
    instruction_id VARCHAR,
    minhash VARCHAR,                 -- the settings, e.g. 'affine32 seed=1 shingle=5 perm=128 bands=9x13'; 'off': no
                                     -- near-duplicate detection, text hash only
    text_sha1 VARCHAR,               -- hex sha1 of the normalized text
    band_keys UBIGINT[]              -- band i's key (a 64-bit hash of i and its MinHash values) at position i + 1
);

-- The MinHash signature of each near-duplicate candidate is read by instruction id: each insert is sorted by it, and
-- small row groups (schemas/rows.py TABLE_OPTIONS) let a lookup read one of them instead of its run's whole file.
CREATE TABLE IF NOT EXISTS instruction_signatures (
    run_id VARCHAR,
    instruction_id VARCHAR,
    minhash VARCHAR,
    hashvalues UINTEGER[]            -- the MinHash values (num_perm of them) the Jaccard check compares
);

-- Migrations: columns appended after the first lakes were made (multi-turn trees, sandboxed code).
-- A no-op on a lake that has them; on an older lake they are added at the end, as in schemas/rows.py.
ALTER TABLE nodes ADD COLUMN IF NOT EXISTS turn BIGINT;
ALTER TABLE nodes ADD COLUMN IF NOT EXISTS feedback VARCHAR;
ALTER TABLE nodes ADD COLUMN IF NOT EXISTS failure_reason VARCHAR;
ALTER TABLE nodes ADD COLUMN IF NOT EXISTS sandbox_exit_code BIGINT;
ALTER TABLE nodes ADD COLUMN IF NOT EXISTS sandbox_stdout VARCHAR;
ALTER TABLE nodes ADD COLUMN IF NOT EXISTS sandbox_stderr VARCHAR;
ALTER TABLE nodes ADD COLUMN IF NOT EXISTS cached_tokens BIGINT;
ALTER TABLE pairs ADD COLUMN IF NOT EXISTS turn BIGINT;
ALTER TABLE nodes ADD COLUMN IF NOT EXISTS visits BIGINT;
ALTER TABLE nodes ADD COLUMN IF NOT EXISTS q_value DOUBLE;
ALTER TABLE nodes ADD COLUMN IF NOT EXISTS self_eval DOUBLE;
ALTER TABLE nodes ADD COLUMN IF NOT EXISTS value DOUBLE;
ALTER TABLE pairs ADD COLUMN IF NOT EXISTS contrast VARCHAR;
ALTER TABLE pairs ADD COLUMN IF NOT EXISTS k BIGINT;
ALTER TABLE trees ADD COLUMN IF NOT EXISTS k BIGINT;
ALTER TABLE nodes ADD COLUMN IF NOT EXISTS edit VARCHAR;
ALTER TABLE pairs ADD COLUMN IF NOT EXISTS edit_distance BIGINT;
ALTER TABLE pairs ADD COLUMN IF NOT EXISTS jury_label VARCHAR;
ALTER TABLE pairs ADD COLUMN IF NOT EXISTS jury_winner VARCHAR;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS fleiss_kappa DOUBLE;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS agreement VARCHAR;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS shards_reused BIGINT;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS cached_share DOUBLE;

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
    contrast,
    difficulty,
    k,
    pass_rate,
    turn,
    edit_distance,
    jury_label
FROM pairs;

-- Principle-grounded preference pairs in TRL's conversational format, the principle placed in the system message:
-- only examples whose jury label is stable and whose stable winner is the response written under the principle.
-- The others (non-attitudes, ties, a jury that preferred the antithesis) stay in principle_examples.
CREATE OR REPLACE VIEW principle_pairs AS
SELECT
    [{'role': 'system', 'content': principle}, {'role': 'user', 'content': prompt}] AS prompt,
    [{'role': 'assistant', 'content': response}] AS chosen,
    [{'role': 'assistant', 'content': antithesis_response}] AS rejected,
    example_id,
    run_id,
    principle_id,
    constitution,
    votes_response,
    judges,
    model
FROM principle_examples
WHERE label = 'stable' AND jury_winner = 'response';

-- TRL's conversational language-modeling format: one row per trajectory that ends in a correct
-- attempt (an action, a refinement whose prompt already holds the earlier turns, the environment
-- feedback and the critique, or a finished MCTS answer: a last step or a rollout), `messages` being that
-- history plus the attempt itself.
CREATE OR REPLACE VIEW sft_examples AS
SELECT
    list_append(n.prompt, {'role': 'assistant', 'content': n.text}) AS messages,
    n.node_id,
    n.tree_id,
    n.run_id,
    i.domain,
    n.turn,
    n.strategy,
    n.model
FROM nodes n
LEFT JOIN instructions i
    ON i.run_id = n.run_id AND i.shard_id = n.shard_id AND i.instruction_id = n.instruction_id
WHERE n.role IN ('action', 'refinement', 'step', 'rollout') AND n.verdict = 'correct';

-- Listwise ranking: the scored attempts that answer one prompt under one parent (siblings with the
-- same history), best first. `completions[k]` is an assistant message list with score `scores[k]`;
-- ties keep node_id order so the list is stable.
CREATE OR REPLACE VIEW ranked_lists AS
SELECT
    n.prompt,
    list([{'role': 'assistant', 'content': n.text}] ORDER BY n.score DESC, n.node_id) AS completions,
    list(n.score ORDER BY n.score DESC, n.node_id) AS scores,
    list(n.node_id ORDER BY n.score DESC, n.node_id) AS node_ids,
    n.parent_id,
    n.tree_id,
    n.run_id,
    i.domain,
    n.turn
FROM nodes n
LEFT JOIN instructions i
    ON i.run_id = n.run_id AND i.shard_id = n.shard_id AND i.instruction_id = n.instruction_id
WHERE n.role IN ('action', 'refinement') AND n.score IS NOT NULL AND n.parent_id IS NOT NULL
GROUP BY n.run_id, n.shard_id, n.tree_id, n.parent_id, n.prompt, i.domain, n.turn
HAVING count(*) >= 2;

-- TRL's conversational unpaired preference format (KTOTrainer): one row per verified answer (an action, a
-- refinement, an injected hard negative, or a finished MCTS answer: a last step or a rollout), `completion`
-- being the answer and `label` whether the verifier found it correct (incorrect and unparsable answers are the
-- undesirable rows). Unfinished MCTS steps have no verdict of their own (their rollouts do) and stay out.
CREATE OR REPLACE VIEW kto_rows AS
SELECT
    n.prompt,
    [{'role': 'assistant', 'content': n.text}] AS completion,
    n.verdict = 'correct' AS label,
    n.node_id,
    n.tree_id,
    n.run_id,
    i.domain,
    n.role,
    n.turn,
    n.strategy,
    n.model
FROM nodes n
LEFT JOIN instructions i
    ON i.run_id = n.run_id AND i.shard_id = n.shard_id AND i.instruction_id = n.instruction_id
WHERE n.role IN ('action', 'refinement', 'injected', 'step', 'rollout') AND n.verdict IS NOT NULL;

-- Step-level reward data (process reward models). One row per MCTS path (a leaf step and its ancestors, kind
-- 'mcts') and per multi-turn trajectory (an action and the refinements that followed it, kind 'turns').
-- `steps[k]` is step k's own text (an MCTS step: what it added to its parent's answer; a turn: that answer).
-- MCTS labels follow Math-Shepherd / OmegaPRM from the verified completions below the step (its finished answer,
-- its rollout, and those of the steps under it): hard = some is correct, soft = the share that is. A turn is
-- labelled by its own verdict (one verified completion). A step with fewer verified completions than the run's
-- `run.prm_min_rollouts` (kept in runs.summary) has null labels: not guessed.
CREATE OR REPLACE VIEW prm_steps AS
WITH RECURSIVE
below(step_id, node_id) AS (
    SELECT node_id, node_id FROM nodes WHERE role = 'step'
    UNION ALL
    SELECT b.step_id, n.node_id FROM below b JOIN nodes n ON n.parent_id = b.node_id AND n.role IN ('step', 'rollout')
),
evidence AS (
    SELECT b.step_id, count(n.verdict) AS verified, count(*) FILTER (WHERE n.verdict = 'correct') AS correct
    FROM below b JOIN nodes n ON n.node_id = b.node_id GROUP BY 1
),
mcts_path(leaf_id, node_id) AS (
    SELECT s.node_id, s.node_id FROM nodes s WHERE s.role = 'step'
        AND NOT EXISTS (SELECT 1 FROM nodes c WHERE c.parent_id = s.node_id AND c.role = 'step')
    UNION ALL
    SELECT p.leaf_id, s.parent_id FROM mcts_path p JOIN nodes s ON s.node_id = p.node_id AND s.role = 'step'
),
turn_path(leaf_id, node_id) AS (
    SELECT r.node_id, r.node_id FROM nodes r WHERE r.role = 'refinement'
        AND NOT EXISTS (SELECT 1 FROM nodes c WHERE c.parent_id = r.node_id AND c.role = 'critique')
    UNION ALL
    SELECT p.leaf_id, n.parent_id FROM turn_path p JOIN nodes n ON n.node_id = p.node_id
        AND n.role IN ('refinement', 'critique')
),
steps AS (
    SELECT 'mcts' AS kind, p.leaf_id, s.*, e.verified, e.correct,
           CASE WHEN parent.role = 'step' THEN s.text[length(parent.text) + 1:] ELSE s.text END AS step_text
    FROM mcts_path p JOIN nodes s ON s.node_id = p.node_id AND s.role = 'step'
    JOIN nodes parent ON parent.node_id = s.parent_id
    JOIN evidence e ON e.step_id = s.node_id
    UNION ALL
    SELECT 'turns' AS kind, p.leaf_id, a.*, CASE WHEN a.verdict IS NULL THEN 0 ELSE 1 END AS verified,
           CASE WHEN a.verdict = 'correct' THEN 1 ELSE 0 END AS correct, a.text AS step_text
    FROM turn_path p JOIN nodes a ON a.node_id = p.node_id AND a.role IN ('action', 'refinement')
),
labelled AS (
    SELECT s.*, coalesce(try_cast(json_extract_string(r.summary, '$.prm_min_rollouts') AS BIGINT), 1) AS min_rollouts
    FROM steps s LEFT JOIN runs r ON r.run_id = s.run_id
)
SELECT
    any_value(l.kind) AS kind,
    any_value(l.run_id) AS run_id,
    any_value(l.shard_id) AS shard_id,
    any_value(l.tree_id) AS tree_id,
    any_value(l.instruction_id) AS instruction_id,
    any_value(i.domain) AS domain,
    l.leaf_id AS path_id,
    arg_min(l.prompt, l.depth) AS prompt,                 -- the messages the first step answered
    list(l.step_text ORDER BY l.depth) AS steps,
    list(CASE WHEN l.verified >= l.min_rollouts THEN l.correct > 0 END ORDER BY l.depth) AS hard_labels,
    list(CASE WHEN l.verified >= l.min_rollouts THEN l.correct / l.verified END ORDER BY l.depth) AS soft_labels,
    list(l.verified ORDER BY l.depth) AS verified_completions,
    list(l.visits ORDER BY l.depth) AS visits,
    list(l.q_value ORDER BY l.depth) AS q_values,
    list(l.node_id ORDER BY l.depth) AS step_node_ids,
    any_value(l.min_rollouts) AS min_rollouts,
    any_value(l.model) AS model
FROM labelled l
LEFT JOIN instructions i ON i.run_id = l.run_id AND i.shard_id = l.shard_id AND i.instruction_id = l.instruction_id
GROUP BY l.leaf_id;
