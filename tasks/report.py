"""Run report: the numbers a person checks after a nightly run, as text and as Prefect artifacts."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE


def run_totals(grown_stats: Sequence[Mapping[str, Any]], growth_wall_s: float) -> dict[str, Any]:
    """Return trees, nodes, pairs, pass rate and token throughput summed over the shards' stats."""
    trees = sum(s.get("trees", 0) for s in grown_stats)
    actions = sum(s.get("actions", 0) for s in grown_stats)
    correct = sum(s.get("correct", 0) for s in grown_stats)
    prompt_tokens = sum(s.get("engine", {}).get("prompt_tokens", 0) for s in grown_stats)
    completion_tokens = sum(s.get("engine", {}).get("completion_tokens", 0) for s in grown_stats)
    return {
        "trees": trees,
        "nodes": sum(s.get("nodes", 0) for s in grown_stats),
        "pairs": sum(s.get("pairs", 0) for s in grown_stats),
        "pass_rate": round(correct / actions, 4) if actions else None,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "wall_s": round(growth_wall_s, 2),
        "tokens_per_s": round(completion_tokens / growth_wall_s, 2) if growth_wall_s > 0 else None,
    }


def summary_text(summary: Mapping[str, Any]) -> str:
    """Return the run summary the CLI prints: what was grown, what was published, and how to query it."""
    lines = [
        f"run {summary['run_id']}: {summary['status']}",
        f"  shards: {summary['shards_planned']} planned, {summary['shards_published']} published, "
        f"{summary['shards_reused']} already landed, {summary['shards_quarantined']} quarantined, "
        f"{summary['shards_failed']} failed",
        f"  trees {summary['trees']}, nodes {summary['nodes']}, pairs {summary['pairs']}, "
        f"pass rate {_pct(summary['pass_rate'])}",
        f"  tokens: {summary['prompt_tokens']} prompt + {summary['completion_tokens']} completion "
        f"in {summary['wall_s']} s of growth = {summary['tokens_per_s']} tokens/s",
        f"  lake snapshot: {summary['snapshot_id']}",
    ]
    for problem in summary.get("problems", []):
        lines.append(f"  ! {problem}")
    if summary.get("data_docs"):
        lines.append(f"  data docs: {summary['data_docs']}")
    lines.append('  query it: orchard sql "SELECT domain, count(*) FROM pairs GROUP BY 1"')
    if summary.get("snapshot_id") is not None:
        lines.append(f'            orchard sql --version {summary["snapshot_id"]} "SELECT count(*) FROM dpo_pairs"')
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def report_markdown(summary: Mapping[str, Any], shards: Sequence[Mapping[str, Any]]) -> str:
    """Return the markdown report of a run: totals, then one line per shard."""
    rows = "\n".join(
        f"| `{s['shard_id']}` | {s['state']} | {s.get('trees', '')} | {s.get('pairs', '')} | {s.get('reason', '')} |"
        for s in shards
    )
    problems = "\n".join(f"- {p}" for p in summary.get("problems", [])) or "- none"
    docs = f"[Data Docs]({summary['data_docs']})" if summary.get("data_docs") else "no Data Docs"
    return f"""# Orchard run `{summary['run_id']}` — {summary['status']}

| trees | nodes | pairs | pass rate | prompt tokens | completion tokens | tokens/s | snapshot |
|---|---|---|---|---|---|---|---|
| {summary['trees']} | {summary['nodes']} | {summary['pairs']} | {_pct(summary['pass_rate'])} | {summary['prompt_tokens']} | {summary['completion_tokens']} | {summary['tokens_per_s']} | {summary['snapshot_id']} |

## Shards
| shard | state | trees | pairs | reason |
|---|---|---|---|---|
{rows}

## Problems
{problems}

Validation: {docs}
"""


@task(name="report", cache_policy=NO_CACHE)
def report_task(summary: dict, shards: list[dict]) -> None:
    """Publish the run's summary table and markdown report as Prefect artifacts."""
    key = "orchard-run-" + "".join(c if c.isalnum() else "-" for c in summary["run_id"].lower())
    create_table_artifact(
        key=key[:100],
        table=[{k: v for k, v in summary.items() if not isinstance(v, list | dict)}],
        description=f"Orchard run {summary['run_id']}",
    )
    create_markdown_artifact(key=f"{key}-report"[:100], markdown=report_markdown(summary, shards))
