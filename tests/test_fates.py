"""A run's status, exit code and counts come from its shards' fates, computed once (schemas/fates.py)."""

import pytest

from builders import run_summary
from schemas.fates import (
    ShardCheck,
    ShardFate,
    exit_code,
    fate_counts,
    problems,
    run_status,
    settle,
    shard_fate,
)
from schemas.shards import ShardReceipt, ShardStats
from tasks.materialise import run_row


def fates(*names: str) -> list[ShardFate]:
    return [ShardFate(f"s{i}", name, "" if name in ("published", "reused") else "why") for i, name in enumerate(names)]


@pytest.mark.parametrize(("names", "status", "code"), [
    (("published", "reused"), "complete", 0),
    (("published", "quarantined"), "partial", 3),
    (("reused", "failed"), "partial", 3),
    (("failed", "quarantined"), "failed", 1),
    (("failed",), "failed", 1),
])
def test_status_and_exit_code_follow_the_fates(names, status, code):
    assert run_status(fates(*names), len(names)) == status
    assert exit_code(status) == code


def test_a_run_whose_fates_do_not_cover_every_planned_shard_has_no_status():
    with pytest.raises(ValueError, match="3 shards planned, 2 fates"):
        run_status(fates("published", "published"), 3)
    with pytest.raises(ValueError, match="2 shards"):
        run_status([ShardFate("s0", "published"), ShardFate("s0", "published")], 2)


def test_a_passing_shard_the_lake_already_holds_is_reused_and_counts_add_up_to_the_plan():
    settled = settle(fates("published", "published", "failed"), in_lake={"s1"})
    assert [f.fate for f in settled] == ["published", "reused", "failed"]
    counts = fate_counts(settled, 3)
    assert counts == {"status": "partial", "shards_planned": 3, "shards_published": 1, "shards_reused": 1,
                      "shards_quarantined": 0, "shards_failed": 1, "shards_healed": 0}
    assert sum(counts[f"shards_{f}"] for f in ("published", "reused", "quarantined", "failed")) == 3


def test_validation_that_could_not_run_or_corruption_never_reads_as_published():
    assert shard_fate(ShardCheck("s", "corrupt", "s3://b/k: 10 bytes, manifest says 12")).fate == "failed"
    assert shard_fate(ShardCheck("s", "quarantined", "validation could not run: boom")).fate == "quarantined"
    assert shard_fate(ShardCheck("s", "failed", "StoreUnavailable: down")).fate == "failed"


def test_a_healed_shard_is_published_and_says_what_it_was_grown_over():
    receipt = ShardReceipt("s", "landed", {}, ShardStats(trees=2, pairs=3), worker="gpu-0")
    fate = shard_fate(ShardCheck("s", "passed", "", receipt), healed="s3://b/k: not a readable Parquet file")
    assert (fate.fate, fate.trees, fate.pairs, fate.worker) == ("published", 2, 3, "gpu-0")
    summary = run_summary([fate])
    assert summary.status == "complete" and summary.counts["shards_healed"] == 1
    assert summary.problems == ["shard s was corrupt and was grown again: s3://b/k: not a readable Parquet file"]
    failed_again = shard_fate(ShardCheck("s", "corrupt", "still bad"), healed="bad")
    assert failed_again.fate == "failed" and "grown again after: bad" in failed_again.reason


def test_settling_against_the_lake_moves_counts_but_never_the_status():
    summary = run_summary(fates("published", "published", "failed"))
    settled = summary.settled(in_lake={"s0"})
    assert (summary.status, settled.status) == ("partial", "partial")
    assert [(s.counts["shards_published"], s.counts["shards_reused"]) for s in (summary, settled)] == [(2, 0), (1, 1)]
    assert settled.to_dict()["shards_reused"] == 1 and settled.to_dict()["status"] == "partial"


def test_the_runs_row_holds_the_settled_status_and_counts():
    row = run_row(run_summary(fates("published", "published", "failed")).settled(in_lake={"s0"}), "2026-01-01T01:00")
    assert (row["status"], row["shards_published"], row["shards_reused"], row["shards_failed"]) == ("partial", 1, 1, 1)
    assert [f["fate"] for f in row["summary"]["fates"]] == ["reused", "published", "failed"]
    assert row["summary"]["problems"] == ["shard s2 failed: why"]


def test_a_shard_that_failed_before_landing_has_no_counts():
    fate = shard_fate(ShardCheck("s", "failed", "StoreUnavailable: down"))
    assert (fate.trees, fate.pairs, fate.worker, fate.grow_wall_s) == (None, None, None, None)


def test_every_shard_left_out_is_a_problem_with_its_reason():
    assert problems(fates("published", "quarantined", "failed")) == ["shard s1 quarantined: why", "shard s2 failed: why"]


def test_an_unknown_fate_is_refused():
    with pytest.raises(ValueError, match="fate must be one of"):
        ShardFate("s", "landed")
