"""Run report: the numbers a person checks after a nightly run, as text and as Prefect artifacts."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from datetime import datetime
from typing import Any, Mapping, Sequence

import duckdb
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from orchard.config import Config, CostConfig
from orchard.engine import PrefixCache
from orchard.lake import LakeError, connect
from schemas.fates import ShardFate
from schemas.plan import SourceCount
from schemas.run import RunReport, RunSummary
from schemas.shards import ShardReceipt, ShardStats
from tasks.hygiene import Drops

MARGIN_BINS = (0.25, 0.5, 0.75, 1.0)  # upper edges of the margin histogram's bins


def run_totals(grown_stats: Sequence[ShardStats], growth_wall_s: float) -> dict[str, Any]:
    """Return trees, nodes, pairs, pass rate and token throughput summed over the shards' stats."""
    actions = sum(s.actions for s in grown_stats)
    correct = sum(s.correct for s in grown_stats)
    prompt_tokens = sum(s.engine.get("prompt_tokens", 0) for s in grown_stats)
    completion_tokens = sum(s.engine.get("completion_tokens", 0) for s in grown_stats)
    by_method: dict[str, int] = {}
    for stats in grown_stats:
        for method, count in stats.pairs_by_method.items():
            by_method[method] = by_method.get(method, 0) + count
    return {
        "trees": sum(s.trees for s in grown_stats),
        "nodes": sum(s.nodes for s in grown_stats),
        "pairs": sum(s.pairs for s in grown_stats),
        "pairs_by_method": dict(sorted(by_method.items())),
        "pass_rate": round(correct / actions, 4) if actions else None,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "wall_s": round(growth_wall_s, 2),
        "tokens_per_s": round(completion_tokens / growth_wall_s, 2) if growth_wall_s > 0 else None,
        "prefix_cache": PrefixCache.combined([PrefixCache.from_dict(s.prefix_cache) for s in grown_stats]).as_dict(),
    }


def run_summary(run_id: str, flow_run_id: str | None, cfg: Config, started_at: datetime, planned: int,
                fates: Sequence[ShardFate], receipts: Sequence[ShardReceipt], passed: Sequence[ShardReceipt],
                growth_wall_s: float, seeds: Sequence[SourceCount], run_drops: Sequence[Mapping[str, Any]] = (),
                contamination: Sequence[Mapping[str, Any]] = ()) -> RunSummary:
    """Return a run's summary before it is published: its fates, the rows of the shards that passed (`passed`
    receipts), what the shards grown now cost (`receipts` whose state is `landed`), failed requests, and what each
    seed source gave."""
    grown_now = [r for r in receipts if r.state == "landed"]
    fresh = [r.stats for r in grown_now]
    passing = run_totals([r.stats for r in passed], growth_wall_s)
    # What this run paid for: tokens and GPU time of the shards grown now, not of reused ones.
    paid = run_totals(fresh, growth_wall_s)
    before = Drops.from_rows(run_drops)
    # A run whose every instruction the hygiene gate dropped plans nothing: its summary says why.
    nothing = (f"nothing to grow: the hygiene gate dropped all {before.total()} instructions "
               f"({'; '.join(f'{stage}: {n}' for stage, n in _stage_totals(before).items())})" if not planned else None)
    return RunSummary(
        run_id=run_id, flow_run_id=flow_run_id, config_hash=cfg.content_hash(), started_at=started_at.isoformat(),
        shards_planned=planned, fates=tuple(fates), nothing_planned=nothing,
        trees=passing["trees"], nodes=passing["nodes"], pairs=passing["pairs"],
        pairs_by_method=passing["pairs_by_method"], pass_rate=passing["pass_rate"],
        prompt_tokens=paid["prompt_tokens"], completion_tokens=paid["completion_tokens"], wall_s=passing["wall_s"],
        tokens_per_s=paid["tokens_per_s"], prefix_cache=paid["prefix_cache"],
        **cost_estimate(fresh, cfg.cost),
        requests=request_totals(fresh),
        # Each shard grown now: how much of its prompt the servers answered from their prefix cache.
        prefix_cache_by_shard={r.shard_id: r.stats.prefix_cache for r in grown_now if r.stats.prefix_cache},
        trees_unanswered=sum(r.stats.trees_unanswered for r in passed),
        seeds=tuple(seeds),
        prm_min_rollouts=cfg.run.prm_min_rollouts,
        # The hygiene gate's: rows dropped before growth by stage and reason, and the instructions flagged.
        drops_before_growth=before.by_stage(),
        contaminated={"instructions": len({c["instruction_id"] for c in contamination}),
                      "by_eval_set": dict(sorted(Counter(c["eval_set"] for c in contamination).items()))},
    )


def _stage_totals(drops: Drops) -> dict[str, int]:
    return {stage: sum(reasons.values()) for stage, reasons in drops.by_stage().items()}


def request_totals(grown_stats: Sequence[ShardStats]) -> dict[str, Any]:
    """Return the requests sent and failed over the shards' stats, with the failures by reason."""
    by_reason: dict[str, int] = {}
    for stats in grown_stats:
        for reason, count in stats.requests.get("failed_by_reason", {}).items():
            by_reason[reason] = by_reason.get(reason, 0) + count
    return {"sent": sum(s.requests.get("sent", 0) for s in grown_stats),
            "failed": sum(by_reason.values()), "failed_by_reason": dict(sorted(by_reason.items()))}


def cost_estimate(grown_stats: Sequence[ShardStats], cost: CostConfig) -> dict[str, Any]:
    """Return what growing these shards cost at `cost`'s prices: tokens at API prices plus GPU hours (one slot per
    shard for its growth time)."""
    totals = run_totals(grown_stats, 0.0)
    gpu_hours = sum(s.grow_wall_s for s in grown_stats) / 3600
    usd = (totals["prompt_tokens"] * cost.usd_per_million_prompt_tokens
           + totals["completion_tokens"] * cost.usd_per_million_completion_tokens) / 1e6 + gpu_hours * cost.usd_per_gpu_hour
    return {"gpu_hours": round(gpu_hours, 4), "cost_usd": round(usd, 4),
            "priced": any(dataclasses.astuple(cost))}


def summary_text(summary: RunSummary) -> str:
    """Return the run summary the CLI prints: what was grown, what was published, and how to query it."""
    counts = summary.counts
    report = summary.report or RunReport()
    lines = [
        f"run {summary.run_id}: {summary.status}",
        f"  shards: {summary.shards_planned} planned, {counts['shards_published']} published, "
        f"{counts['shards_reused']} already in the lake, {counts['shards_quarantined']} quarantined, "
        f"{counts['shards_failed']} failed" + (f" ({counts['shards_healed']} grown again after corruption)"
                                                if counts["shards_healed"] else ""),
        f"  trees {summary.trees}, nodes {summary.nodes}, pairs {summary.pairs}"
        f"{_methods(summary.pairs_by_method)}, pass rate {_pct(summary.pass_rate)}",
        f"  tokens: {summary.prompt_tokens} prompt + {summary.completion_tokens} completion "
        f"in {summary.wall_s} s of growth = {summary.tokens_per_s} tokens/s",
        f"  cost estimate: {_cost(summary)}",
        f"  prefix cache: {prefix_cache_text(summary.prefix_cache)}",
        *_request_lines(summary),
        *_seed_lines(summary.seeds),
        f"  lake snapshot: {summary.snapshot_id}",
    ]
    for method, m in report.curation.items():
        c = m["contrast"]
        lines.append(f"  {method} pairs: {m['pairs']} (contrast high {c['high']} / mid {c['mid']} / low {c['low']}), "
                     f"median margin {m['margin']['median']:.3f}, "
                     f"median shared prefix {m['shared_prefix_tokens']['median']:.0f} tokens, "
                     f"median length ratio chosen/rejected {_num(m.get('length_ratio_median'))}")
    lines += jury_lines(report.jury)
    lines += drop_lines(report.dropped)
    for kind, k in report.prm_steps.items():
        lines.append(f"  prm_steps {kind}: {k['paths']} paths, {k['steps']} steps ({k['labelled']} labelled, "
                     f"{k['positive']} positive; {k['unlabelled']} unlabelled: fewer than {k['min_rollouts']} "
                     f"verified completions below)")
    for problem in summary.problems:
        lines.append(f"  ! {problem}")
    if summary.data_docs:
        lines.append(f"  data docs: {summary.data_docs}")
    if summary.view:
        lines.append(f"  view: {summary.view}   (its trees, pairs and verdicts; `orchard up` serves it)")
    if summary.stages:
        lines.append("  stages: " + ", ".join(f"{name.removesuffix('_s').replace('_', ' ')} {wall:.1f} s"
                                            for name, wall in summary.stages.items()))
    lines.append('  query it: orchard sql "SELECT domain, count(*) FROM pairs GROUP BY 1"')
    if summary.snapshot_id is not None:
        lines.append(f'            orchard sql --version {summary.snapshot_id} "SELECT count(*) FROM dpo_pairs"')
    return "\n".join(lines)


def prefix_cache_text(figures: Mapping[str, Any] | None) -> str:
    """Return the share of prompt tokens served from the prefix cache, as the answers' usage and the servers'
    metrics give it: `1200 of 4000 prompt tokens cached (30.0%); server metrics: 1100 of 3900 queried tokens hit
    (28.2%)`."""
    if not figures:
        return "–"
    if figures.get("cached_tokens") is None:
        usage = "not reported in usage (vLLM: --enable-prompt-tokens-details)"
    else:
        usage = (f"{figures['cached_tokens']} of {figures['prompt_tokens']} prompt tokens cached "
                 f"({_pct(figures.get('cached_share'))})")
    metrics = figures.get("metrics")
    served = ("no server metrics" if not metrics else f"server metrics: {metrics['hits']} of {metrics['queries']} "
              f"queried tokens hit ({_pct(metrics['hit_rate'])})")
    return f"{usage}; {served}"


def _cache_cells(figures: Mapping[str, Any] | None) -> str:
    """The report's two prefix-cache cells of a shard: usage's cached share, the metrics' hit rate."""
    if not figures:
        return "– | –"
    cached = ("not reported" if figures.get("cached_tokens") is None else
              f"{figures['cached_tokens']} of {figures['prompt_tokens']} ({_pct(figures.get('cached_share'))})")
    metrics = figures.get("metrics")
    hits = f"{metrics['hits']} of {metrics['queries']} ({_pct(metrics['hit_rate'])})" if metrics else "–"
    return f"{cached} | {hits}"


def _request_lines(summary: RunSummary) -> list[str]:
    requests = summary.requests
    lines = []
    if requests.get("failed"):
        reasons = ", ".join(f"{reason} {n}" for reason, n in requests["failed_by_reason"].items())
        lines.append(f"  requests: {requests['failed']} of {requests['sent']} failed after retries ({reasons}); "
                     "their nodes were not grown")
    if summary.trees_unanswered:
        lines.append(f"  trees without an answer (no pairs): {summary.trees_unanswered}")
    return lines


def _seed_lines(seeds: Sequence[SourceCount]) -> list[str]:
    return [f"  seeds: {s.source}: {s.read} read, {s.kept} kept"
            + "".join(f", {n} dropped ({reason})" for reason, n in s.dropped.items()) for s in seeds]


def jury_lines(jury: Mapping[str, Any] | None) -> list[str]:
    """Return the summary lines about the jury: labels, agreement, position consistency and canaries per judge."""
    if not jury:
        return []
    labels = jury.get("labels", {})
    lines = [f"  jury: {len(jury['judges'])} judges, Fleiss' κ {_num(jury['fleiss_kappa'])} over {jury['kappa_items']} "
             f"(comparison, order) items; " + "; ".join(
                 f"{kind} {sum(c.values())} (stable {c['stable']} / non-attitude {c['non_attitude']} / tie {c['tie']})"
                 for kind, c in labels.items())]
    for name, judge in jury["judges"].items():
        lines.append(f"    judge {name}: position consistency {_pct(judge['position_consistency'])}, says A "
                     f"{_pct(judge['says_a'])}, canary accuracy {_pct(judge['canary_accuracy'])} of {judge['canaries']}, "
                     f"{judge['unread']} of {judge['verdicts']} verdicts unread")
    if jury.get("verifiable_judged"):
        lines.append(f"    jury agrees with the verifier on {_pct(jury['verifier_agreement'])} of "
                     f"{jury['verifiable_judged']} verifiable pairs")
    return lines


def jury_markdown(jury: Mapping[str, Any] | None) -> str:
    """Return the judge-agreement section of the run report."""
    if not jury:
        return "Nothing was judged."
    lines = [f"Fleiss' κ: **{_num(jury['fleiss_kappa'])}** over {jury['kappa_items']} (comparison, order) items. "
             f"Jury agrees with the verifier: {_pct(jury['verifier_agreement'])} of {jury['verifiable_judged']} "
             "verifiable pairs.", "",
             "| judge | verdicts | unread | position consistency | says A | canary accuracy |",
             "|---|---|---|---|---|---|"]
    for name, j in jury["judges"].items():
        lines.append(f"| {name} | {j['verdicts']} | {j['unread']} | {_pct(j['position_consistency'])} | "
                     f"{_pct(j['says_a'])} | {_pct(j['canary_accuracy'])} of {j['canaries']} |")
    lines += ["", "| judges | Cohen's κ |", "|---|---|"]
    lines += [f"| {pair} | {_num(kappa)} |" for pair, kappa in jury["cohen_kappa"].items()]
    lines += ["", "| comparisons | stable | non-attitude | tie |", "|---|---|---|---|"]
    lines += [f"| {kind} | {c['stable']} | {c['non_attitude']} | {c['tie']} |" for kind, c in jury["labels"].items()]
    return "\n".join(lines)


def jury_stats(con: duckdb.DuckDBPyConnection, run_id: str) -> dict[str, Any] | None:
    """Return the jury statistics materialise wrote on run `run_id`'s row (None when nothing was judged)."""
    row = con.execute("SELECT agreement FROM runs WHERE run_id = ?", [run_id]).fetchone()
    return json.loads(row[0]) if row and row[0] else None


def _cost(summary: RunSummary) -> str:
    if summary.cost_usd is None:
        return "–"
    unpriced = "" if summary.priced else " (no prices set under [cost])"
    return f"${summary.cost_usd:.2f} for {summary.gpu_hours:.3f} GPU-slot hours of growth{unpriced}"


def _blank(value: Any) -> str:
    return "" if value is None else str(value)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _methods(by_method: Mapping[str, int] | None) -> str:
    return f" ({', '.join(f'{m} {n}' for m, n in by_method.items())})" if by_method else ""


def curation_stats(con: duckdb.DuckDBPyConnection, run_id: str) -> dict[str, Any]:
    """Return, per pair method of run `run_id` in the lake: pair and contrast counts, the margin and shared-prefix
    distributions, and the pass rate of the pairs' prompts by k (number of constraints; null outside
    instruction following)."""
    bins = ", ".join(
        f"count(*) FILTER (WHERE margin > {low} AND margin <= {high})"
        for low, high in zip((0.0, *MARGIN_BINS[:-1]), MARGIN_BINS)
    )
    methods = {}
    for row in con.execute(
        f"""SELECT method, count(*),
                   count(*) FILTER (WHERE contrast = 'high'), count(*) FILTER (WHERE contrast = 'mid'),
                   count(*) FILTER (WHERE contrast = 'low'),
                   min(margin), quantile_cont(margin, 0.5), max(margin), {bins},
                   min(shared_prefix_tokens), quantile_cont(shared_prefix_tokens, 0.5), max(shared_prefix_tokens),
                   quantile_cont(length(chosen_text) / nullif(length(rejected_text), 0), 0.5)
            FROM pairs WHERE run_id = ? GROUP BY method ORDER BY method""",
        [run_id],
    ).fetchall():
        method, pairs, high, mid, low, m_min, m_med, m_max, *rest = row
        hist, (p_min, p_med, p_max, length_ratio) = rest[: len(MARGIN_BINS)], rest[len(MARGIN_BINS):]
        methods[method] = {
            "pairs": pairs, "contrast": {"high": high, "mid": mid, "low": low},
            "margin": {"min": m_min, "median": m_med, "max": m_max, "histogram": list(hist)},
            "shared_prefix_tokens": {"min": p_min, "median": p_med, "max": p_max},
            # Length bias (open-instruct reports it): median len(chosen) / len(rejected) in characters.
            "length_ratio_median": length_ratio,
            "pass_rate_by_k": [],
        }
    for method, k, prompts, pairs, rate in con.execute(
        """SELECT method, k, count(DISTINCT instruction_id), count(*), avg(pass_rate)
           FROM pairs WHERE run_id = ? GROUP BY method, k ORDER BY method, k NULLS FIRST""",
        [run_id],
    ).fetchall():
        methods[method]["pass_rate_by_k"].append({"k": k, "prompts": prompts, "pairs": pairs, "pass_rate": rate})
    return methods


def drop_stats(con: duckdb.DuckDBPyConnection, run_id: str) -> dict[str, Any]:
    """Return what run `run_id` dropped, from the lake's `drops` table: per (stage, reason) the count and a few ids
    (run-level stages first, in pipeline order), and why each published shard without pairs has none."""
    order = {stage: i for i, stage in enumerate(DROP_STAGES)}
    reasons = [{"stage": stage, "reason": reason, "count": int(count), "examples": list(examples or [])[:3]}
               for stage, reason, count, examples in con.execute(
                   """SELECT stage, reason, sum("count"), flatten(list(example_ids)) FROM drops WHERE run_id = ?
                      GROUP BY stage, reason""", [run_id]).fetchall()]
    reasons.sort(key=lambda r: (order.get(r["stage"], len(order)), -r["count"], r["reason"]))
    empty = {}
    for shard_id, answers, rate in con.execute(
            "SELECT shard_id, sum(actions), sum(correct) / nullif(sum(actions), 0) FROM trees WHERE run_id = ? "
            "GROUP BY 1 HAVING sum(pairs) = 0 ORDER BY 1", [run_id]).fetchall():
        why = con.execute("""SELECT stage, reason, "count" FROM drops WHERE run_id = ? AND shard_id = ?
                             AND stage IN ('pair_hygiene', 'curation') ORDER BY "count" DESC, reason""",
                          [run_id, shard_id]).fetchall()
        if why:
            empty[shard_id] = "; ".join(f"{n} dropped by {stage}: {reason}" for stage, reason, n in why)
        elif not answers:
            empty[shard_id] = "no verified answers (open-ended prompts: their pairs are in principle_pairs)"
        else:
            empty[shard_id] = (f"no candidate pair: no two answers to one prompt scored differently (pass rate "
                               f"{_pct(rate)} over {answers} answers)")
    return {"reasons": reasons, "shards_without_pairs": empty}


def prm_stats(con: duckdb.DuckDBPyConnection, run_id: str) -> dict[str, Any]:
    """Per kind of prm_steps path (mcts, turns) of run `run_id`: paths and steps, how many steps are labelled
    (positive) and how many are not (too little evidence: counted, never guessed)."""
    return {kind: {"paths": paths, "steps": int(steps), "labelled": int(labelled), "positive": int(positive),
                   "unlabelled": int(steps - labelled), "min_rollouts": min_rollouts}
            for kind, paths, steps, labelled, positive, min_rollouts in con.execute(
                """SELECT kind, count(*), sum(len(steps)), sum(len(list_filter(hard_labels, x -> x IS NOT NULL))),
                          sum(len(list_filter(hard_labels, x -> x))), any_value(min_rollouts)
                   FROM prm_steps WHERE run_id = ? GROUP BY kind ORDER BY kind""", [run_id]).fetchall()}


def prm_markdown(steps: Mapping[str, Any] | None) -> str:
    if not steps:
        return "No step-level data (no MCTS path or refined trajectory)."
    lines = ["| kind | paths | steps | labelled | positive | unlabelled (too little evidence) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {kind} | {k['paths']} | {k['steps']} | {k['labelled']} | {k['positive']} | {k['unlabelled']} "
              f"(< {k['min_rollouts']} verified completions) |" for kind, k in steps.items()]
    return "\n".join(lines)


# The stages a row can be dropped at, in the order a run passes them.
DROP_STAGES = ("seeds", "decontamination", "dedup", "pair_hygiene", "curation", "jury")


def drop_lines(dropped: Mapping[str, Any] | None) -> list[str]:
    """The summary's lines about dropped rows: per stage, each reason and its count; shards without pairs."""
    if not dropped or not (dropped.get("reasons") or dropped.get("shards_without_pairs")):
        return []
    stages: dict[str, list[str]] = {}
    for r in dropped["reasons"]:
        stages.setdefault(r["stage"], []).append(f"{r['reason']} {r['count']}")
    lines = [f"  dropped at {stage}: {'; '.join(items)}" for stage, items in stages.items()]
    lines += [f"  shard {shard} has no pairs: {why}" for shard, why in dropped["shards_without_pairs"].items()]
    return lines


def drops_markdown(dropped: Mapping[str, Any] | None) -> str:
    """The report's "What was dropped, and why" section."""
    if not dropped or not (dropped.get("reasons") or dropped.get("shards_without_pairs")):
        return "Nothing was dropped."
    lines = ["| stage | reason | rows | e.g. |", "|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['reason']} | {r['count']} | {', '.join(f'`{e}`' for e in r['examples'])} |"
              for r in dropped["reasons"]]
    if dropped.get("shards_without_pairs"):
        lines += ["", "Shards without pairs:", ""]
        lines += [f"- `{shard}`: {why}" for shard, why in dropped["shards_without_pairs"].items()]
    return "\n".join(lines)


def curation_markdown(methods: Mapping[str, Any]) -> str:
    """Return the per-method curation section of the run report."""
    if not methods:
        return "No pairs were published."
    edges = " | ".join(f"≤{high}" for high in MARGIN_BINS)
    lines = [
        f"| method | pairs | high / mid / low contrast | margin min / median / max | margin {edges} "
        "| shared prefix tokens min / median / max | median len(chosen) / len(rejected) |",
        "|---|---|---|---|" + "---|" * len(MARGIN_BINS) + "---|---|",
    ]
    for method, m in methods.items():
        c, g, p = m["contrast"], m["margin"], m["shared_prefix_tokens"]
        lines.append(
            f"| {method} | {m['pairs']} | {c['high']} / {c['mid']} / {c['low']} "
            f"| {g['min']:.3f} / {g['median']:.3f} / {g['max']:.3f} | {' | '.join(map(str, g['histogram']))} "
            f"| {p['min']} / {p['median']:.0f} / {p['max']} | {_num(m.get('length_ratio_median'))} |"
        )
    lines += ["", "Pass rate of the pairs' prompts by k (constraints per prompt; – outside instruction following):", "",
              "| method | k | prompts | pairs | mean pass rate |", "|---|---|---|---|---|"]
    for method, m in methods.items():
        for row in m["pass_rate_by_k"]:
            k = "–" if row["k"] is None else row["k"]
            lines.append(f"| {method} | {k} | {row['prompts']} | {row['pairs']} | {_pct(row['pass_rate'])} |")
    return "\n".join(lines)


def report_markdown(summary: RunSummary, report: RunReport | None = None) -> str:
    """Return the markdown report of a run: totals, pairs per curation method (`report`: read back from its
    snapshot; default the summary's), then each shard's fate."""
    report = report or summary.report or RunReport()
    counts = summary.counts
    cache = summary.prefix_cache_by_shard
    rows = "\n".join(
        f"| `{f.shard_id}` | {f.fate}{' (grown again)' if f.healed else ''} | {_blank(f.trees)} "
        f"| {_blank(f.pairs)} | {f.worker or 'in-process'} | {_cache_cells(cache.get(f.shard_id))} "
        f"| {f.reason or f.healed or ''} |"
        for f in summary.fates
    )
    requests = summary.requests
    failed = "; ".join(f"{reason}: {n}" for reason, n in (requests.get("failed_by_reason") or {}).items()) or "none"
    seeds = "\n".join(f"| {s.source} | {s.read} | {s.kept} | "
                      f"{', '.join(f'{reason} {n}' for reason, n in s.dropped.items()) or '–'} |"
                      for s in summary.seeds)
    problems = "\n".join(f"- {p}" for p in summary.problems) or "- none"
    docs = f"[Data Docs]({summary.data_docs})" if summary.data_docs else "no Data Docs"
    view = f"[the run's trees, pairs and verdicts]({summary.view})" if summary.view else "no view"
    return f"""# Orchard run `{summary.run_id}` — {summary.status}

| trees | nodes | pairs | pass rate | prompt tokens | prompt tokens cached | server prefix-cache hits | completion tokens | tokens/s | cost estimate | snapshot |
|---|---|---|---|---|---|---|---|---|---|---|
| {summary.trees} | {summary.nodes} | {summary.pairs} | {_pct(summary.pass_rate)} | {summary.prompt_tokens} | {_cache_cells(summary.prefix_cache)} | {summary.completion_tokens} | {summary.tokens_per_s} | {_cost(summary)} | {summary.snapshot_id} |

## Pairs by method
{curation_markdown(report.curation)}

## Judge agreement
{jury_markdown(report.jury)}

## What was dropped, and why
{drops_markdown(report.dropped)}

## Step-level reward data (`prm_steps`)
{prm_markdown(report.prm_steps)}

## Shards
{summary.shards_planned} planned: {counts['shards_published']} published, {counts['shards_reused']} already in the lake, {counts['shards_quarantined']} quarantined, {counts['shards_failed']} failed.

| shard | fate | trees | pairs | grown by | prompt tokens cached | server prefix-cache hits | reason |
|---|---|---|---|---|---|---|---|
{rows}

Prefix cache (shards grown in this run): {prefix_cache_text(summary.prefix_cache)}. "Prompt tokens cached" is
what the answers' `usage.prompt_tokens_details.cached_tokens` said; "server prefix-cache hits" is the growth of the
servers' `vllm:prefix_cache_hits` / `vllm:prefix_cache_queries` counters over the shard, which also counts requests
of other shards served meanwhile.

## Requests
{requests.get('failed', 0)} of {requests.get('sent', 0)} requests failed after the engine's retries ({failed}); their nodes were not grown. Trees without an answer (no pairs): {summary.trees_unanswered}.

## Seeds
| source | read | kept | dropped |
|---|---|---|---|
{seeds}

## Problems
{problems}

Validation: {docs}

View: {view}
"""


@task(name="report", cache_policy=NO_CACHE)
def report_task(config: dict, summary: RunSummary) -> RunReport:
    """Publish the run's summary table and markdown report as Prefect artifacts; return the curation, jury, drop
    and prm_steps statistics.

    They are read from the snapshot the run published, so they describe what trainers see.
    """
    report = RunReport()
    if summary.snapshot_id is not None:
        try:
            with connect(Config.from_dict(config), version=summary.snapshot_id) as con:
                report = RunReport(curation=curation_stats(con, summary.run_id), jury=jury_stats(con, summary.run_id),
                                   dropped=drop_stats(con, summary.run_id), prm_steps=prm_stats(con, summary.run_id))
        except (LakeError, duckdb.Error) as exc:
            get_run_logger().warning("run %s: no curation statistics: %s", summary.run_id, exc)
    values = summary.to_dict()
    key = "orchard-run-" + "".join(c if c.isalnum() else "-" for c in summary.run_id.lower())
    create_table_artifact(
        key=key[:100],
        table=[{**{k: v for k, v in values.items() if not isinstance(v, list | dict)},
                "cached_share": summary.cached_share,
                "prefix_cache_hit_rate": (summary.prefix_cache.get("metrics") or {}).get("hit_rate")}],
        description=f"Orchard run {summary.run_id}",
    )
    create_markdown_artifact(key=f"{key}-report"[:100], markdown=report_markdown(summary, report))
    return report
