"""How long a run's view takes to build, and its pages to open, for a run of many trees (issue 28).

Synthesises a lake holding one run of N trees of the shape a real run grows (per tree: the instruction, 6 first-turn
actions under 3 strategies, a critique and 2 refinements, 8 MCTS steps and 6 rollouts, an injected hard negative; 6
pairs of three methods; one tree in ten open-ended, with 2 principle examples and 12 jury verdicts; drops whose example
ids name pairs of the trees), in a DuckLake catalog with local data files (no object store). Then builds the view
(tasks/view.py, as `orchard view` does) and opens the run page and a tree page from disk in headless Chromium, reading
the time from navigation start to the table (or tree) drawn from the pages' performance marks.

    PYTHONPATH=. .venv/bin/python bench/view.py [--trees 10000 1000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.browser import chromium
from orchard import lake
from orchard.config import Config, LakeConfig, ObjectStoreConfig
from tasks.view import view_run

RUN = "bench-view"
# Node j of every tree: its parent (index), role and strategy.
PARENTS = [None, 0, 0, 0, 0, 0, 0, 3, 7, 7, 0, 0, 10, 10, 12, 12, 11, 11, 12, 13, 14, 15, 16, 17, 0]
ROLES = (["instruction"] + ["action"] * 6 + ["critique", "refinement", "refinement"] + ["step"] * 8 + ["rollout"] * 6
         + ["injected"])
STRATEGIES = [None] + ["step_by_step", "plan_first", "work_backwards"] * 2
PAIRS = [(1, 4, "rs"), (2, 5, "rs"), (8, 9, "rs"), (12, 13, "mcts"), (14, 15, "mcts"), (1, 24, "error_injection")]


def _sql_list(values: list) -> str:
    return "[" + ", ".join("NULL" if v is None else repr(v) for v in values) + "]"


def synthesise(cfg: Config, trees: int) -> dict[str, int]:
    """Write one run of `trees` trees into the lake of `cfg`, one snapshot; return the row counts."""
    nodes_per_tree = len(PARENTS)
    with lake.connect(cfg) as con:
        con.execute("BEGIN")
        con.execute(f"""
            INSERT INTO instructions (run_id, shard_id, instruction_id, domain, source, source_row, text, reference,
                                      difficulty)
            SELECT '{RUN}', 's' || (t // 128), 'i' || t, CASE WHEN t % 10 = 9 THEN 'open_ended' ELSE 'math' END,
                   'arithmetic', t + 1, 'What is ' || t || ' + ' || (t % 97) || '? Answer with a number.',
                   (t + t % 97)::VARCHAR, 1 + t % 5
            FROM range({trees}) r(t)""")
        con.execute(f"""
            INSERT INTO nodes (run_id, shard_id, tree_id, node_id, parent_id, instruction_id, depth, role, strategy,
                               prompt, text, verdict, score, verifier, verifier_detail, model, temperature, top_p,
                               max_tokens, sample_seed, prompt_template_version, prompt_tokens, completion_tokens,
                               finish_reason, turn, feedback, failure_reason, visits, q_value, self_eval, value, edit)
            SELECT '{RUN}', 's' || (t // 128), 't' || t, 't' || t || '-n' || j,
                   CASE WHEN {_sql_list(PARENTS)}[j + 1] IS NOT NULL THEN 't' || t || '-n' || {_sql_list(PARENTS)}[j + 1] END,
                   'i' || t, CASE WHEN j = 0 THEN 0 WHEN j < 7 OR j IN (10, 11, 24) THEN 1 ELSE 2 END,
                   {_sql_list(ROLES)}[j + 1], CASE WHEN j BETWEEN 1 AND 6 THEN {_sql_list(STRATEGIES)}[j + 1] END,
                   [{{'role': 'user', 'content': 'What is ' || t || '?'}}],
                   repeat('Let us add the numbers step by step, carrying the tens. ', 7) || 'The answer is ' || (t + j),
                   CASE WHEN j = 0 OR j = 7 OR j BETWEEN 10 AND 17 THEN NULL WHEN (t + j) % 3 = 0 THEN 'correct'
                        ELSE 'incorrect' END,
                   CASE WHEN j = 0 OR j = 7 THEN NULL ELSE ((t + j) % 3 = 0)::INT::DOUBLE END, 'math_verify',
                   'expected ' || t || ', got ' || (t + j), 'smol', 0.8, 0.95, 256, j, 'v3', 120, 60, 'stop',
                   CASE WHEN j BETWEEN 1 AND 6 THEN 1 WHEN j IN (8, 9) THEN 2 END,
                   CASE WHEN j = 3 THEN 'expected ' || t || ', got ' || (t + j) END,
                   CASE WHEN (t + j) % 3 <> 0 THEN 'wrong answer' END,
                   CASE WHEN j BETWEEN 10 AND 17 THEN 1 + (j % 3) END,
                   CASE WHEN j BETWEEN 10 AND 17 THEN ((t + j) % 5) / 4.0 END,
                   CASE WHEN j BETWEEN 10 AND 17 THEN 0.5 END, CASE WHEN j BETWEEN 10 AND 17 THEN 0.4 END,
                   CASE WHEN j = 24 THEN '''+'' -> ''-'' on line 1' END
            FROM range({trees}) r(t), range({nodes_per_tree}) q(j)""")
        pairs = " UNION ALL ".join(f"SELECT {c} AS c, {r} AS r, '{m}' AS m" for c, r, m in PAIRS)
        con.execute(f"""
            INSERT INTO pairs (run_id, shard_id, tree_id, pair_id, instruction_id, domain, method, prompt,
                               chosen_node_id, rejected_node_id, chosen_text, rejected_text, chosen_score,
                               rejected_score, margin, shared_prefix_tokens, difficulty, pass_rate, strategy, model,
                               turn, contrast, k, edit_distance, jury_label, jury_winner)
            SELECT '{RUN}', 's' || (t // 128), 't' || t, sha256('t' || t || '-n' || c || '>t' || t || '-n' || r)[1:16],
                   'i' || t, 'math', m, [{{'role': 'user', 'content': 'What is ' || t || '?'}}],
                   't' || t || '-n' || c, 't' || t || '-n' || r, 'right', 'wrong', 1.0, 0.0, 1.0, 40, 1, 0.5,
                   'step_by_step', 'smol', 1, 'high', NULL, NULL,
                   CASE WHEN c = 1 AND m = 'rs' AND t % 50 = 0 THEN 'non_attitude' END, NULL
            FROM range({trees}) r(t), ({pairs}) p WHERE t % 10 <> 9""")
        con.execute(f"""
            INSERT INTO trees (run_id, shard_id, tree_id, instruction_id, domain, strategies, turns, nodes, actions,
                               correct, pass_rate, pairs, prompt_tokens, completion_tokens, k)
            SELECT '{RUN}', 's' || (t // 128), 't' || t, 'i' || t,
                   CASE WHEN t % 10 = 9 THEN 'open_ended' ELSE 'math' END,
                   ['step_by_step', 'plan_first', 'work_backwards'], 2, {nodes_per_tree}, 8, 3, (t % 7) / 7.0,
                   {len(PAIRS)}, 3000, 1500, NULL
            FROM range({trees}) r(t)""")
        con.execute(f"""
            INSERT INTO principle_examples
            SELECT '{RUN}', 's' || (t // 128), 't' || t, 't' || t || '-e' || e, 'i' || t, 'Write a short note.',
                   'default@1', 'p' || e, 'Be honest.', 'Be evasive.', 't' || t || '-n1', 'An honest note.',
                   't' || t || '-n2', 'An evasive note.', 't' || t || '-n3', 'A note.', 'smol',
                   CASE WHEN e = 0 THEN 'stable' ELSE 'non_attitude' END, CASE WHEN e = 0 THEN 'response' END,
                   3, 0, 0, 3
            FROM range({trees}) r(t), range(2) q(e) WHERE t % 10 = 9""")
        con.execute(f"""
            INSERT INTO judgements (run_id, shard_id, tree_id, judgement_id, comparison_id, kind, criterion, judge,
                                    rubric, model, presented, first_id, second_id, prompt, raw, status, winner,
                                    preference, reason, expected, position_consistent, label, structured,
                                    prompt_tokens, completion_tokens, finish_reason)
            SELECT '{RUN}', 's' || (t // 128), 't' || t, 't' || t || '-j' || e || g || o, 't' || t || '-e' || e,
                   'principle', 'p' || e, 'judge' || g, 'rubric', 'smol',
                   CASE WHEN o = 0 THEN 'first_as_a' ELSE 'second_as_a' END, 't' || t || '-n1', 't' || t || '-n2',
                   [], '{{"winner": "A", "reason": "clearer"}}', 'ok', 'A',
                   CASE WHEN o = 0 THEN 'first' ELSE 'second' END, 'clearer', NULL, false, 'non_attitude', true,
                   300, 20, 'stop'
            FROM range({trees}) r(t), range(2) q(e), range(3) u(g), range(2) v(o) WHERE t % 10 = 9""")
        con.execute(f"""
            INSERT INTO drops VALUES
              ('{RUN}', 's0', 'curation', 'mid contrast', 40,
               [sha256('t0-n1>t0-n2')[1:16], sha256('t1-n3>t1-n5')[1:16]]),
              ('{RUN}', NULL, 'dedup', 'duplicate instruction', 12, ['seed-a', 'seed-b'])""")
        con.execute(f"""
            INSERT INTO runs (run_id, snapshot_id, status, trees, nodes, pairs, pass_rate, shards_planned,
                              shards_published, shards_quarantined, shards_failed, summary)
            VALUES ('{RUN}', NULL, 'complete', {trees}, {trees * nodes_per_tree}, {trees * len(PAIRS)}, 0.33,
                    {trees // 128 + 1}, {trees // 128 + 1}, 0, 0, '{{}}')""")
        con.execute("COMMIT")
        return {"trees": trees, "nodes": con.execute("SELECT count(*) FROM nodes").fetchone()[0],
                "pairs": con.execute("SELECT count(*) FROM pairs").fetchone()[0]}


def page_load_ms(index: Path, tree_file: str) -> tuple[float, float]:
    """Open the run page and a tree page from disk in headless Chromium; return the ms from navigation start to each
    page's 'rendered' mark."""
    from selenium.webdriver.support.ui import WebDriverWait

    with chromium() as browser:
        def rendered(url: str, page: str, mark: str) -> float:
            browser.get(url)
            WebDriverWait(browser, 60).until(
                lambda b: b.find_element("tag name", "body").get_attribute("data-ready") == page)
            return browser.execute_script(f"return performance.getEntriesByName('{mark}')[0].startTime")

        rendered(index.as_uri(), "run", "orchard-table-rendered")  # a first, cold load: the browser's own start
        run_ms = rendered(index.as_uri(), "run", "orchard-table-rendered")
        tree_ms = rendered(index.with_name("tree.html").as_uri() + "#" + tree_file, "tree", "orchard-tree-rendered")
        return run_ms, tree_ms


def measure(trees: int, root: Path) -> dict[str, float]:
    root.mkdir(parents=True)
    cfg = Config(state_dir=str(root / "state"), lake=LakeConfig(data_path=f"{root / 'lake-data'}/"),
                 object_store=ObjectStoreConfig(endpoint_url="http://127.0.0.1:9"))
    started = time.monotonic()
    counts = synthesise(cfg, trees)
    synthesised = time.monotonic() - started
    started = time.monotonic()
    view = view_run(cfg, root / "view")
    build_s = time.monotonic() - started
    site = root / "view"
    size = sum(p.stat().st_size for p in site.rglob("*") if p.is_file())
    index_kb = (site / "data" / "index.js").stat().st_size / 1024
    run_ms, tree_ms = page_load_ms(view.index, "t0")
    return {**counts, "synthesise_s": synthesised, "build_s": build_s, "site_mb": size / 2**20, "index_kb": index_kb,
            "files": sum(1 for _ in site.rglob("*.js")), "run_page_ms": run_ms, "tree_page_ms": tree_ms}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", type=int, nargs="+", default=[10000, 1000])
    parser.add_argument("--keep", type=Path, help="keep the lakes and views here (default: a temporary folder)")
    args = parser.parse_args(argv)
    root = args.keep or Path(tempfile.mkdtemp(prefix="orchard-view-bench-"))
    try:
        rows = [measure(n, root / f"trees-{n}") for n in args.trees]
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    header = ("trees", "nodes", "pairs", "synthesise_s", "build_s", "site_mb", "index_kb", "files", "run_page_ms",
              "tree_page_ms")
    print(" | ".join(f"{h:>12}" for h in header))
    for row in rows:
        print(" | ".join(f"{row[h]:>12.1f}" if isinstance(row[h], float) else f"{row[h]:>12}" for h in header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
