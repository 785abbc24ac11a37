"""The printed summary and the markdown report say each shard's fate, the failed requests and what seeds gave."""

from tasks.fates import ShardFate, with_fates
from tasks.report import report_markdown, summary_text


def summary() -> dict:
    fates = [ShardFate("s0", "published", trees=2, pairs=3, worker="gpu-0"),
             ShardFate("s1", "published", healed="s3://b/runs/r/shards/s1/nodes.parquet: not a readable Parquet file"),
             ShardFate("s2", "failed", "GrowError: 9 of 10 requests failed")]
    return {"run_id": "r", **with_fates({"shards_planned": 3}, fates), "trees": 4, "nodes": 20, "pairs": 3,
            "pass_rate": 0.5, "prompt_tokens": 10, "completion_tokens": 5, "wall_s": 1.0, "tokens_per_s": 5.0,
            "snapshot_id": 7, "requests": {"sent": 40, "failed": 10, "failed_by_reason": {"HTTP 400": 1, "HTTP 503 after retries": 9}},
            "trees_unanswered": 1,
            "seeds": [{"source": "seeds[0] gsm8k train.jsonl", "read": 11, "kept": 8, "dropped": {"beyond count": 3}}]}


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
    assert "| `s0` | published | 2 | 3 | gpu-0 |  |" in report
    assert "| `s1` | published (grown again) |" in report and "not a readable Parquet file" in report
    assert "| `s2` | failed |" in report and "9 of 10 requests failed" in report
    assert "10 of 40 requests failed" in report and "| seeds[0] gsm8k train.jsonl | 11 | 8 | beyond count 3 |" in report
