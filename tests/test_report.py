"""The printed summary and the markdown report say each shard's fate, the failed requests and what seeds gave."""

import dataclasses
from datetime import datetime, timezone

from builders import run_summary as summary_of
from orchard.config import Config
from schemas.fates import ShardFate
from schemas.plan import SourceCount
from schemas.run import RunSummary
from schemas.shards import ShardReceipt, ShardStats
from tasks.report import report_markdown, run_summary, summary_text


def summary() -> RunSummary:
    fates = [ShardFate("s0", "published", trees=2, pairs=3, worker="gpu-0"),
             ShardFate("s1", "published", healed="s3://b/runs/r/shards/s1/nodes.parquet: not a readable Parquet file"),
             ShardFate("s2", "failed", "GrowError: 9 of 10 requests failed")]
    return summary_of(
        fates, trees=4, nodes=20, pairs=3, pass_rate=0.5, prompt_tokens=10, completion_tokens=5, wall_s=1.0,
        tokens_per_s=5.0, snapshot_id=7,
        requests={"sent": 40, "failed": 10, "failed_by_reason": {"HTTP 400": 1, "HTTP 503 after retries": 9}},
        trees_unanswered=1,
        prefix_cache={"prompt_tokens": 10, "cached_tokens": 4, "cached_share": 0.4,
                      "metrics": {"hits": 3, "queries": 8, "hit_rate": 0.375}},
        prefix_cache_by_shard={
            "s0": {"prompt_tokens": 6, "cached_tokens": 4, "cached_share": 0.6667,
                   "metrics": {"hits": 3, "queries": 8, "hit_rate": 0.375}},
            "s1": {"prompt_tokens": 4, "cached_tokens": None, "cached_share": None, "metrics": None}},
        seeds=[SourceCount("seeds[0] gsm8k train.jsonl", 11, 8, {"beyond count": 3})])


def test_the_summary_says_what_happened_to_every_shard_request_and_seed_row():
    text = summary_text(summary())
    assert text.splitlines()[0] == "run r: partial"
    assert "3 planned, 2 published, 0 already in the lake, 0 quarantined, 1 failed (1 grown again after corruption)" in text
    assert "requests: 10 of 40 failed after retries (HTTP 400 1, HTTP 503 after retries 9)" in text
    assert "trees without an answer (no pairs): 1" in text
    assert "seeds: seeds[0] gsm8k train.jsonl: 11 read, 8 kept, 3 dropped (beyond count)" in text
    assert "! shard s2 failed: GrowError: 9 of 10 requests failed" in text


def test_the_report_has_a_row_per_shard_fate_with_its_reason():
    report = report_markdown(summary())
    assert "| `s0` | published | 2 | 3 | gpu-0 | 4 of 6 (66.7%) | 3 of 8 (37.5%) |  |" in report
    assert "| `s1` | published (grown again) |" in report and "not a readable Parquet file" in report
    assert "| `s2` | failed |" in report and "9 of 10 requests failed" in report
    assert "10 of 40 requests failed" in report and "| seeds[0] gsm8k train.jsonl | 11 | 8 | beyond count 3 |" in report


def shard_receipt(shard_id: str, prompt_tokens: int, cached_tokens: int | None, metrics: dict | None,
                  state: str = "landed") -> ShardReceipt:
    return ShardReceipt(shard_id, state, {}, ShardStats(
        trees=1, engine={"prompt_tokens": prompt_tokens, "completion_tokens": 1},
        prefix_cache={"prompt_tokens": prompt_tokens, "cached_tokens": cached_tokens, "cached_share": None,
                      "metrics": metrics}))


def test_the_run_prefix_cache_share_sums_the_shards_grown_now_and_keeps_each_shards_figures():
    receipts = [shard_receipt("s0", 300, 120, {"hits": 128, "queries": 300, "hit_rate": 0.4267}),
                shard_receipt("s1", 100, None, None),  # its server did not report cached tokens
                shard_receipt("s2", 500, 500, {"hits": 500, "queries": 500, "hit_rate": 1.0}, state="reused")]
    fates = [ShardFate("s0", "published"), ShardFate("s1", "published"), ShardFate("s2", "reused")]
    summary = run_summary("r", None, Config(), datetime.now(timezone.utc), 3, fates, receipts, receipts, 2.0, [])
    # What this run's requests got: shard s2 was grown by an earlier attempt and is not counted.
    assert summary.prefix_cache == {"prompt_tokens": 400, "cached_tokens": 120, "cached_share": 0.3,
                                    "metrics": {"hits": 128, "queries": 300, "hit_rate": 0.4267}}
    assert set(summary.prefix_cache_by_shard) == {"s0", "s1"}
    assert summary.prefix_cache_by_shard["s1"]["cached_tokens"] is None
    text = summary_text(dataclasses.replace(summary, snapshot_id=1))
    assert ("prefix cache: 120 of 400 prompt tokens cached (30.0%); server metrics: 128 of 300 queried tokens hit "
            "(42.7%)") in text
    report = report_markdown(dataclasses.replace(summary, snapshot_id=1))
    assert "| 400 | 120 of 400 (30.0%) | 128 of 300 (42.7%) |" in report  # the run's row
    assert "| `s1` | published |  |  | in-process | not reported | – |" in report
    assert "| `s2` | reused |  |  | in-process | – | – |" in report  # not grown now: no figures of this run


def test_a_run_whose_servers_never_reported_the_cache_says_so():
    receipts = [shard_receipt("s0", 50, None, None)]
    summary = run_summary("r", None, Config(), datetime.now(timezone.utc), 1, [ShardFate("s0", "published")],
                          receipts, receipts, 1.0, [])
    assert summary.prefix_cache == {"prompt_tokens": 50, "cached_tokens": None, "cached_share": None,
                                    "metrics": None}
    assert ("prefix cache: not reported in usage (vLLM: --enable-prompt-tokens-details); no server metrics"
            in summary_text(summary))
