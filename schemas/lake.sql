-- The lake's DDL that schemas/rows.py does not give: the `runs` table (one row per run) and the views training code
-- reads. The tables rows.py describes (the shard tables, validations, contamination, the instruction index) are
-- created and migrated from it by orchard.lake.tables_sql, ahead of this file: a column appended there reaches
-- existing lakes by itself.
--
-- Applied by orchard.lake.connect in one transaction whenever the DDL's hash differs from the one
-- recorded on the `runs` table, so it must stay idempotent. Tables use IF NOT EXISTS, so a new table
-- reaches existing lakes as is; a new column of `runs` must be appended here AND get an
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

-- Migrations of `runs`: columns appended after the first lakes were made.
-- A no-op on a lake that has them; on an older lake they are added at the end.
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
    jury_label,
    tree_id,
    model
FROM pairs;

-- Principle-grounded preference pairs in TRL's conversational format, the principle placed in the system message:
-- only examples whose jury label is stable and whose stable winner is the response written under the principle.
-- The others (non-attitudes, ties, a jury that preferred the antithesis) stay in principle_examples.
CREATE OR REPLACE VIEW principle_pairs AS
SELECT
    [{'role': 'system', 'content': e.principle}, {'role': 'user', 'content': e.prompt}] AS prompt,
    [{'role': 'assistant', 'content': e.response}] AS chosen,
    [{'role': 'assistant', 'content': e.antithesis_response}] AS rejected,
    e.example_id,
    e.run_id,
    e.principle_id,
    e.constitution,
    e.votes_response,
    e.votes_antithesis,
    e.judges,
    e.model,
    e.tree_id,
    i.domain
FROM principle_examples e
LEFT JOIN instructions i
    ON i.run_id = e.run_id AND i.shard_id = e.shard_id AND i.instruction_id = e.instruction_id
WHERE e.label = 'stable' AND e.jury_winner = 'response';

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
