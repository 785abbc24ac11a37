"""A shard's stats and receipt (schemas/shards.py): what lands in its manifest reads back as it was written."""

import json

import pytest

from schemas.shards import ShardReceipt, ShardStats


def test_stats_land_in_the_manifest_as_json_and_read_back_equal():
    stats = ShardStats(trees=2, nodes=9, pairs=1, pairs_by_method={"rs": 1}, drops={"curation": {"low contrast": 2}},
                       requests={"sent": 12, "failed": 0, "failed_by_reason": {}}, grow_wall_s=1.5,
                       engine={"prompt_tokens": 300, "completion_tokens": 80},
                       prefix_cache={"prompt_tokens": 300, "cached_tokens": None, "cached_share": None, "metrics": None})
    assert ShardStats.from_dict(json.loads(json.dumps(stats.to_dict()))) == stats


def test_stats_without_prefix_cache_figures_land_without_the_key():
    assert "prefix_cache" not in ShardStats(trees=1).to_dict()


def test_a_manifest_landed_by_an_earlier_version_reads_with_what_it_counted():
    receipt = ShardReceipt.of_manifest("s1", "reused", {"stats": {"trees": 3, "pairs": 2, "retired_count": 7}})
    assert (receipt.stats.trees, receipt.stats.pairs, receipt.stats.trees_unanswered) == (3, 2, 0)
    assert receipt.stats.prefix_cache is None


def test_a_receipt_in_an_unknown_state_is_refused():
    with pytest.raises(ValueError, match="receipt state must be one of"):
        ShardReceipt("s1", "grown", {})
