"""The run's view: a static site, built from one lake snapshot, that shows every tree of a run, its pairs and verdicts.

`index.html` is the run page (its summary figures, its drops, and a row per tree in a sortable, filterable, paginated
table); `tree.html#<file>` draws one tree. The data travel as small JavaScript files that call a callback the page
registered (`data/index.js`, and `data/trees/<file>.js` loaded when a tree is opened), so the site opens straight from
disk (Chromium refuses fetch() of file:// URLs) and is served as is by `orchard up`. The pages are the files of
tasks/view_assets/, written by hand; they put model text on the page as text (textContent), never as HTML.

Each table is read once for the whole run (grouped by tree in DuckDB, which also writes each tree's JSON), never once
per tree: 10,000 trees build in seconds (bench/view.py).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import re
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from orchard.config import Config
from orchard.lake import LakeError, connect
from schemas.errors import OrchardError

ASSETS = ("index.html", "tree.html", "view.css", "view.js")
VIEWS_DIR = "views"  # under the state directory: one folder per run, which `orchard up` serves
CALLBACK = "Orchard.loaded"  # what each data file calls: Orchard.loaded(kind, value)
# Roles whose nodes are answers a pair can be made of: a pair's two nodes are siblings (same parent) of these roles.
ANSWER_ROLES = ("action", "refinement", "step", "rollout", "injected")
# The stages that drop seeds before they are grown: their example ids are instruction ids.
SEED_STAGES = ("seeds", "decontamination", "dedup")

# Each node as the tree page shows it: everything but the prompt it was sent (a refinement's holds the whole history,
# which the tree itself shows), the model's text whole.
_NODE_JSON = """to_json(list({
    'id': node_id, 'parent': parent_id, 'depth': depth, 'role': role, 'strategy': strategy, 'turn': turn,
    'text': text, 'verdict': verdict, 'score': score, 'verifier': verifier, 'verifier_detail': verifier_detail,
    'feedback': feedback, 'failure_reason': failure_reason, 'sandbox_exit_code': sandbox_exit_code,
    'sandbox_stdout': sandbox_stdout, 'sandbox_stderr': sandbox_stderr,
    'visits': visits, 'q_value': q_value, 'self_eval': self_eval, 'value': value, 'edit': edit,
    'model': model, 'temperature': temperature, 'top_p': top_p, 'max_tokens': max_tokens, 'seed': sample_seed,
    'template': prompt_template_version, 'prompt_tokens': prompt_tokens, 'completion_tokens': completion_tokens,
    'cached_tokens': cached_tokens, 'finish_reason': finish_reason,
    'system': CASE WHEN len(prompt) > 0 AND prompt[1].role = 'system' THEN prompt[1].content END
} ORDER BY depth, strategy NULLS FIRST, role, node_id))"""

_PAIR_JSON = """to_json(list({
    'id': pair_id, 'method': method, 'chosen': chosen_node_id, 'rejected': rejected_node_id,
    'chosen_score': chosen_score, 'rejected_score': rejected_score, 'margin': margin, 'contrast': contrast,
    'shared_prefix_tokens': shared_prefix_tokens, 'turn': turn, 'strategy': strategy, 'edit_distance': edit_distance,
    'jury_label': jury_label, 'jury_winner': jury_winner
} ORDER BY method, pair_id))"""

_EXAMPLE_JSON = """to_json(list({
    'id': example_id, 'constitution': constitution, 'principle_id': principle_id, 'principle': principle,
    'antithesis': antithesis, 'prompt': prompt, 'response_node': response_node_id, 'response': response,
    'antithesis_node': antithesis_node_id, 'antithesis_response': antithesis_response,
    'unconditioned_node': unconditioned_node_id, 'unconditioned_response': unconditioned_response,
    'label': label, 'jury_winner': jury_winner, 'votes_response': votes_response,
    'votes_antithesis': votes_antithesis, 'votes_tie': votes_tie, 'judges': judges
} ORDER BY principle_id, example_id))"""

_JUDGEMENT_JSON = """to_json(list({
    'comparison': comparison_id, 'kind': kind, 'criterion': criterion, 'judge': judge, 'rubric': rubric,
    'presented': presented, 'first': first_id, 'second': second_id, 'status': status, 'winner': winner,
    'preference': preference, 'reason': reason, 'expected': expected, 'position_consistent': position_consistent,
    'label': label, 'raw': raw
} ORDER BY kind, comparison_id, judge, presented))"""


class ViewError(OrchardError):
    """The view cannot be built: no such run in the snapshot, or its folder cannot be written."""


@dataclass(frozen=True)
class View:
    """A built view: where its run page is, which run and snapshot it shows, and what it took."""

    run_id: str
    snapshot_id: int | None
    index: Path
    trees: int
    seconds: float


def view_dir(cfg: Config, run_id: str) -> Path:
    """Return the folder a run's view is written to by default: `<state>/views/<run id>`."""
    return cfg.state_path / VIEWS_DIR / tree_file(run_id)


def tree_file(name: str) -> str:
    """Return a file name for a tree (or run) id: the id itself when it is a plain name, else a hash of it."""
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
        return name
    return hashlib.sha1(name.encode()).hexdigest()[:20]


def latest_run(con: duckdb.DuckDBPyConnection) -> str:
    """Return the run id of the latest run in the attached snapshot."""
    row = con.execute("SELECT run_id FROM runs ORDER BY snapshot_id DESC NULLS LAST, finished_at DESC LIMIT 1").fetchone()
    if row is None:
        raise ViewError("the lake holds no run yet: `orchard run` publishes one")
    return row[0]


def run_page(con: duckdb.DuckDBPyConnection, run_id: str) -> dict[str, Any]:
    """Return the run page's data: the run's figures, its drops, the seeds not grown and a row per tree."""
    columns, rows = _rows(con, "SELECT * FROM runs WHERE run_id = ? ORDER BY snapshot_id DESC NULLS LAST LIMIT 1",
                          run_id)
    if not rows:
        raise ViewError(f"run {run_id!r} is not in this lake snapshot")
    run = {c: _plain(v) for c, v in zip(columns, rows[0])}
    summary = _json_or_none(run.pop("summary", None)) or {}
    run["agreement"] = _json_or_none(run.get("agreement"))
    run["fates"] = summary.get("fates", [])
    run["seeds"] = summary.get("seeds", [])
    run["stages"] = summary.get("stages")
    run["pairs_by_method"] = dict(con.execute(
        "SELECT method, count(*) FROM pairs WHERE run_id = ? GROUP BY 1 ORDER BY 1", [run_id]).fetchall())
    run["principle_labels"] = dict(con.execute(
        "SELECT coalesce(label, 'unjudged'), count(*) FROM principle_examples WHERE run_id = ? GROUP BY 1 ORDER BY 1",
        [run_id]).fetchall())
    drops = [{"stage": s, "reason": r, "count": n, "examples": list(e or [])[:10]} for s, r, n, e in con.execute(
        "SELECT stage, reason, sum(count)::BIGINT, flatten(list(example_ids)) FROM drops WHERE run_id = ? "
        "GROUP BY 1, 2 ORDER BY 1, 3 DESC, 2", [run_id]).fetchall()]
    return {"run": run, "drops": drops, "trees": tree_rows(con, run_id) + not_grown_rows(con, run_id)}


def tree_rows(con: duckdb.DuckDBPyConnection, run_id: str) -> list[dict[str, Any]]:
    """Return a row per tree of the run, as the run page's table lists it (one pass per table, grouped by tree)."""
    strategies: dict[str, dict[str, list[int]]] = defaultdict(dict)
    for tree_id, strategy, actions, correct in con.execute(
            "SELECT tree_id, strategy, count(*), count(*) FILTER (verdict = 'correct') FROM nodes "
            "WHERE run_id = ? AND role = 'action' GROUP BY 1, 2", [run_id]).fetchall():
        strategies[tree_id][strategy or "none"] = [correct, actions]
    roles: dict[str, Counter] = defaultdict(Counter)
    for tree_id, role, n in con.execute(
            "SELECT tree_id, role, count(*) FROM nodes WHERE run_id = ? GROUP BY 1, 2", [run_id]).fetchall():
        roles[tree_id][role] = n
    methods: dict[str, Counter] = defaultdict(Counter)
    labels: dict[str, Counter] = defaultdict(Counter)
    for tree_id, method, label, n in con.execute(
            "SELECT tree_id, method, jury_label, count(*) FROM pairs WHERE run_id = ? GROUP BY 1, 2, 3",
            [run_id]).fetchall():
        methods[tree_id][method] += n
        if label:
            labels[tree_id][label] += n
    for tree_id, label, n in con.execute(
            "SELECT tree_id, label, count(*) FROM principle_examples WHERE run_id = ? AND label IS NOT NULL "
            "GROUP BY 1, 2", [run_id]).fetchall():
        labels[tree_id][label] += n
    out = []
    for (tree_id, shard_id, domain, turns, nodes, actions, correct, pass_rate, k, prompt_tokens, completion_tokens,
         text, reference, difficulty, source) in con.execute(
            """SELECT t.tree_id, t.shard_id, t.domain, t.turns, t.nodes, t.actions, t.correct, t.pass_rate, t.k,
                      t.prompt_tokens, t.completion_tokens, i.text, i.reference, i.difficulty, i.source
               FROM trees t LEFT JOIN instructions i
                 ON i.run_id = t.run_id AND i.shard_id = t.shard_id AND i.instruction_id = t.instruction_id
               WHERE t.run_id = ? ORDER BY t.shard_id, t.tree_id""", [run_id]).fetchall():
        out.append({
            "tree": tree_id, "file": tree_file(tree_id), "shard": shard_id, "domain": domain, "instruction": text,
            "reference": reference, "difficulty": difficulty, "source": source, "strategies": strategies.get(tree_id, {}), "k": k,
            "pass_rate": pass_rate, "turns": turns, "nodes": nodes, "actions": actions, "correct": correct,
            "critiques": roles[tree_id]["critique"], "steps": roles[tree_id]["step"],
            "injected": roles[tree_id]["injected"], "pairs": dict(sorted(methods[tree_id].items())),
            "jury": dict(sorted(labels[tree_id].items())), "tokens": (prompt_tokens or 0) + (completion_tokens or 0),
        })
    return out


def not_grown_rows(con: duckdb.DuckDBPyConnection, run_id: str) -> list[dict[str, Any]]:
    """Return a row per seed the run did not grow whose id the lake kept: every contaminated seed (with the eval item
    it matched) and the example ids of the hygiene gate's other drops (a few per reason)."""
    rows: dict[str, dict[str, Any]] = {}
    for instruction_id, eval_set, item, coverage in con.execute(
            "SELECT instruction_id, eval_set, eval_item_id, coverage FROM contamination WHERE run_id = ? "
            "ORDER BY instruction_id, coverage DESC", [run_id]).fetchall():
        rows.setdefault(instruction_id, {"instruction_id": instruction_id, "not_grown": (
            f"contaminated: {eval_set} {item} (coverage {coverage:.2f})")})
    placeholders = ", ".join("?" for _ in SEED_STAGES)
    for stage, reason, ids in con.execute(
            f"SELECT stage, reason, flatten(list(example_ids)) FROM drops WHERE run_id = ? AND stage IN ({placeholders}) "
            "GROUP BY 1, 2 ORDER BY 1, 2", [run_id, *SEED_STAGES]).fetchall():
        for instruction_id in ids or []:
            rows.setdefault(instruction_id, {"instruction_id": instruction_id, "not_grown": f"{stage}: {reason}"})
    return list(rows.values())


def tree_documents(con: duckdb.DuckDBPyConnection, run_id: str, trees: list[dict[str, Any]]) -> dict[str, str]:
    """Return each tree's page data as a JSON text, by tree id: its row, nodes, pairs, pairs left out, principle
    examples and judgements. DuckDB writes the JSON of each table's rows, grouped by tree, in one query per table."""
    parts: dict[str, dict[str, str]] = defaultdict(dict)
    queries = {
        "nodes": f"SELECT tree_id, {_NODE_JSON} FROM nodes WHERE run_id = ? GROUP BY 1",
        "pairs": f"SELECT tree_id, {_PAIR_JSON} FROM pairs WHERE run_id = ? GROUP BY 1",
        "examples": f"SELECT tree_id, {_EXAMPLE_JSON} FROM principle_examples WHERE run_id = ? GROUP BY 1",
        "judgements": f"SELECT tree_id, {_JUDGEMENT_JSON} FROM judgements WHERE run_id = ? GROUP BY 1",
        "left_out": f"SELECT tree_id, to_json(list(pair ORDER BY stage, id)) FROM ({_LEFT_OUT}) GROUP BY 1",
    }
    for name, sql in queries.items():
        params = [run_id, run_id] if name == "left_out" else [run_id]
        for tree_id, text in con.execute(sql, params).fetchall():
            parts[tree_id][name] = text
    documents = {}
    for row in trees:
        if "tree" not in row:
            continue
        own = parts.get(row["tree"], {})
        documents[row["tree"]] = ("{" + f'"tree":{json.dumps(row, ensure_ascii=False)}' + "".join(
            f',"{name}":{own.get(name, "[]")}' for name in queries) + "}")
    return documents


# Pairs the run left out, traced back to their nodes: a pair id is a hash of its chosen and rejected node ids
# (tasks/pairs.py pair_row), and the two are siblings, so the drops' example ids are matched against sibling pairs.
_LEFT_OUT = f"""
WITH dropped AS (
    SELECT DISTINCT d.stage, d.reason, unnest(d.example_ids) AS id FROM drops d
    WHERE d.run_id = ? AND d.stage NOT IN ({", ".join(repr(s) for s in SEED_STAGES)})
),
answers AS (
    SELECT tree_id, node_id, parent_id FROM nodes WHERE run_id = ? AND role IN ({", ".join(repr(r) for r in ANSWER_ROLES)})
),
candidates AS (
    SELECT a.tree_id, a.node_id AS chosen, b.node_id AS rejected,
           sha256(a.node_id || '>' || b.node_id)[1:16] AS id
    FROM answers a JOIN answers b ON a.tree_id = b.tree_id AND a.parent_id = b.parent_id AND a.node_id <> b.node_id
)
SELECT c.tree_id, d.stage, c.id,
       {{'id': c.id, 'chosen': c.chosen, 'rejected': c.rejected, 'stage': d.stage, 'reason': d.reason}} AS pair
FROM candidates c JOIN dropped d ON d.id = c.id
"""


def write_site(out_dir: Path, page: dict[str, Any], documents: dict[str, str]) -> Path:
    """Write the site (pages, data files) into `out_dir`, replacing what was there whole; return its index.html."""
    out_dir = Path(out_dir)
    partial = out_dir.with_name(f".{out_dir.name}.building")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "data" / "trees").mkdir(parents=True)
    assets = importlib.resources.files("tasks").joinpath("view_assets")
    for name in ASSETS:
        (partial / name).write_bytes(assets.joinpath(name).read_bytes())
    (partial / "data" / "index.js").write_text(_call("index", json.dumps(page, ensure_ascii=False)), encoding="utf-8")
    trees_dir = partial / "data" / "trees"
    for tree_id, document in documents.items():
        (trees_dir / f"{tree_file(tree_id)}.js").write_text(_call("tree", document), encoding="utf-8")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial.rename(out_dir)
    return out_dir / "index.html"


def _call(kind: str, json_text: str) -> str:
    # JSON is a JavaScript expression; U+2028/2029 are legal in JS strings since ES2019, so no escaping is needed.
    return f'{CALLBACK}("{kind}", {json_text});\n'


def build_view(con: duckdb.DuckDBPyConnection, out_dir: Path | None, *, run_id: str | None = None,
               views_root: Path | None = None) -> View:
    """Build the view of `run_id` (default: the latest run) from the snapshot `con` has attached; return it.

    It is written to `out_dir`, or to `views_root/<run id>` when `out_dir` is None."""
    started = time.monotonic()
    run_id = run_id or latest_run(con)
    page = run_page(con, run_id)
    documents = tree_documents(con, run_id, page["trees"])
    if out_dir is None:
        if views_root is None:
            raise ViewError("build_view: give out_dir or views_root")
        out_dir = views_root / tree_file(run_id)
    try:
        index = write_site(out_dir, page, documents)
    except OSError as exc:
        raise ViewError(f"{out_dir}: the view cannot be written ({exc})") from None
    return View(run_id, page["run"].get("snapshot_id"), index, len(documents), time.monotonic() - started)


def view_run(cfg: Config, out_dir: Path | None = None, *, run_id: str | None = None,
             version: int | None = None) -> View:
    """Build a run's view from the lake (snapshot `version`, default the newest), by default into `<state>/views`."""
    with connect(cfg, read_only=True, version=version) as con:
        return build_view(con, out_dir, run_id=run_id, views_root=cfg.state_path / VIEWS_DIR)


@task(name="view", cache_policy=NO_CACHE)
def view_task(config: dict, run_id: str, snapshot_id: int | None) -> str | None:
    """Build the run's view from the snapshot it published; return its index.html path (None: nothing published, or
    the view could not be built, which the log says; the run is published either way)."""
    if snapshot_id is None:
        return None
    try:
        view = view_run(Config.from_dict(config), run_id=run_id, version=snapshot_id)
    except (OrchardError, LakeError, duckdb.Error, OSError) as exc:
        get_run_logger().warning("run %s: no view: %s", run_id, exc)
        return None
    get_run_logger().info("run %s: view of %d trees in %.1f s: %s", run_id, view.trees, view.seconds, view.index)
    return str(view.index)


def _rows(con: duckdb.DuckDBPyConnection, sql: str, *params: Any) -> tuple[list[str], list[tuple]]:
    cursor = con.execute(sql, list(params))
    return [d[0] for d in cursor.description], cursor.fetchall()


def _plain(value: Any) -> Any:
    """A JSON-safe value: timestamps as ISO text."""
    return value.isoformat() if hasattr(value, "isoformat") else value


def _json_or_none(text: str | None) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None
