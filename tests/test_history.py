"""Dedup against earlier runs through the lake's index: which runs a plan compares with, the same drops as signing
every earlier instruction again, and runs published before the index (or under other settings) indexed once."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import pytest

from builders import put_shard
from orchard import lake
from orchard.config import Config, HygieneConfig
from orchard.store import ObjectStore
from schemas.plan import Instruction, instruction_id
from schemas.rows import SHARD_TABLES
from tasks.history import EarlierRuns, earlier_lookup, earlier_runs
from tasks.hygiene import Signing, fingerprints, normalized, screen_seeds, shingles
from tasks.materialise import materialise_run
from test_lake import run_row

LABEL = Signing.of(HygieneConfig()).label

# --- builders ---------------------------------------------------------------------------------


def snapshot(snapshot_id: int, **info: Any) -> dict[str, Any]:
    """A row of the lake's snapshots() whose commit info is `info`."""
    return {"snapshot_id": snapshot_id, "commit_extra_info": json.dumps(info) if info else None}


def published(snapshot_id: int, run_id: str, shards: tuple[str, ...] = ("s",), minhash: str | None = LABEL) -> dict:
    """The snapshot of a publishing transaction of `run_id` (minhash None: published before the index existed)."""
    info: dict[str, Any] = {"run_id": run_id, "shards_added": list(shards)}
    if minhash is not None:
        info["minhash"] = minhash
    return snapshot(snapshot_id, **info)


def indexed(snapshot_id: int, *runs: str, minhash: str = LABEL) -> dict:
    return snapshot(snapshot_id, indexed={"minhash": minhash, "runs": list(runs)})


def seed(text: str, reference: str = "", row: int = 1) -> Instruction:
    return Instruction(instruction_id("math", text, reference), "math", "hand", row, text, reference, 1)


@pytest.fixture
def config(store: ObjectStore, tmp_path: Path) -> Config:
    """A Config whose lake lives in the test's own bucket and a fresh state directory."""
    return Config(state_dir=str(tmp_path / "state"), object_store=store.cfg)


def land_instructions(config: Config, run_id: str, shard_id: str, instructions: list[Instruction]) -> dict:
    """Land a shard holding `instructions` (and no trees) in the bucket; return its manifest (tasks/land.py's shape)."""
    rows = {name: [] for name in SHARD_TABLES}
    rows["instructions"] = [{"run_id": run_id, "shard_id": shard_id, **i.as_row()} for i in instructions]
    return put_shard(config, run_id, shard_id, rows, {"trees": 0})


def publish(config: Config, run_id: str, instructions: list[Instruction]) -> None:
    shards = [land_instructions(config, run_id, f"{run_id}-s0", instructions)]
    materialise_run(config, run_row(run_id, shards), shards)


def rehash_every_earlier_instruction(seeds: list[Instruction], cfg: Config,
                                     earlier: list[tuple[str, str, str]]) -> dict[str, str | None]:
    """The reference: the dedup before the lake kept an index. Every earlier instruction ((id, text, run), oldest run
    first) is signed again and goes through one MinHashLSH before the seeds; a seed's verdict is its drop reason."""
    from datasketch import MinHash, MinHashLSH

    hygiene = cfg.hygiene
    lsh = MinHashLSH(threshold=hygiene.near_duplicate_jaccard, num_perm=hygiene.num_perm)
    exact: dict[str, str] = {}
    signatures: dict[str, Any] = {}
    runs = {iid: run for iid, _, run in earlier}

    def check(item_id: str, text: str) -> tuple[str, str] | None:
        key = hashlib.sha1(normalized(text).encode()).hexdigest()
        if key in exact:
            return "exact duplicate (normalized text)", exact[key]
        signature = MinHash.bulk([shingles(text, hygiene.shingle)], num_perm=hygiene.num_perm, seed=1)[0]
        for other in lsh.query(signature):
            if signature.jaccard(signatures[other]) >= hygiene.near_duplicate_jaccard:
                return f"near duplicate (MinHash Jaccard >= {hygiene.near_duplicate_jaccard:g})", other
        lsh.insert(item_id, signature)
        signatures[item_id] = signature
        exact[key] = item_id
        return None

    for iid, text, _ in earlier:
        check(iid, text)
    verdicts: dict[str, str | None] = {}
    for instruction in seeds:
        verdict = check(instruction.instruction_id, instruction.text)
        if verdict is not None and verdict[1] in runs:
            verdict = (f"{verdict[0]} of an instruction run {runs[verdict[1]]} published", verdict[1])
        verdicts[instruction.instruction_id] = verdict and verdict[0]
    return verdicts


def screened_verdicts(seeds: list[Instruction], cfg: Config, run_id: str) -> dict[str, str | None]:
    """Each seed's drop reason (None: kept) through the hygiene gate's dedup against the lake's index."""
    screened = screen_seeds(seeds, cfg.replace(decontaminate=()), earlier_lookup(cfg, run_id))
    verdicts: dict[str, str | None] = {i.instruction_id: None for i in screened.kept}
    for (_, reason), n in screened.drops.counts.items():
        for iid in screened.drops.examples[("dedup", reason)]:
            verdicts[iid] = reason
        assert n == len(screened.drops.examples[("dedup", reason)])  # few enough that every id is an example
    return {i.instruction_id: verdicts[i.instruction_id] for i in seeds}


def problem(rng: random.Random, words: int = 40) -> str:
    """A word problem of its own (distinct words, so two of them share no shingle)."""
    vocabulary = [f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "su", "ta", "ve", "zo", "ri", "pu")
                  for b in ("ban", "tel", "mor", "quin", "das", "fo", "gul", "hep", "jax", "pim", "rus", "wen")]
    return " ".join(rng.choice(vocabulary) for _ in range(words)).capitalize() + "?"


def edited(rng: random.Random, text: str, words: int) -> str:
    """`text` with `words` of its words replaced."""
    tokens = text.split()
    for position in rng.sample(range(len(tokens)), words):
        tokens[position] = f"new{rng.randrange(10**6)}"
    return " ".join(tokens)


# --- which runs a plan compares with ------------------------------------------------------------


def test_a_plan_compares_with_the_runs_that_first_published_before_its_own_oldest_first():
    snapshots = [snapshot(1), published(2, "b"), published(3, "a"), published(4, "empty", shards=()),
                 published(5, "me"), published(6, "later"), published(7, "a")]
    assert earlier_runs(snapshots, "new", LABEL) == EarlierRuns(("b", "a", "me", "later"), ())
    # A resumed run plans against the runs that first published before it did: not those after, not itself.
    assert earlier_runs(snapshots, "me", LABEL) == EarlierRuns(("b", "a"), ())


def test_runs_published_before_the_index_or_under_other_settings_are_unindexed_until_an_indexing_snapshot():
    other = Signing.of(HygieneConfig(near_duplicate_jaccard=0.7)).label
    snapshots = [published(1, "old", minhash=None), published(2, "other", minhash=other), published(3, "now")]
    assert earlier_runs(snapshots, "new", LABEL).unindexed == ("old", "other")
    assert earlier_runs(snapshots, "new", other).unindexed == ("old", "now")
    snapshots.append(indexed(4, "old", "other"))
    assert earlier_runs(snapshots, "new", LABEL).unindexed == ()
    assert earlier_runs(snapshots, "new", other).unindexed == ("old", "now")
    # A run that publishes more shards after it was indexed under other settings needs them indexed too.
    snapshots.append(published(5, "other", minhash=other))
    assert earlier_runs(snapshots, "new", LABEL).unindexed == ("other",)


# --- the same drops as signing every earlier instruction again ----------------------------------


def test_dedup_by_the_index_drops_what_signing_every_earlier_instruction_again_drops_reason_by_reason(config):
    rng = random.Random(7)
    run_a = [seed(problem(rng), str(k)) for k in range(8)]
    run_b = [seed(problem(rng), str(k)) for k in range(8)] + [seed(run_a[0].text, "another answer")]
    publish(config, "run-a", run_a)
    publish(config, "run-b", run_b)
    # A text sharing an LSH band with one of run B's whose estimated Jaccard stays below the threshold: a candidate
    # the Jaccard check rejects (found by trying edits, as the bands are a function of the text).
    signing = Signing.of(config.hygiene)
    target = fingerprints([run_b[5].text], signing)
    tries = [edited(random.Random(k), run_b[5].text, 1 + k % 4) for k in range(300)]
    prints = fingerprints(tries, signing)
    overlap = [float((prints.hashvalues[k] == target.hashvalues[0]).mean()) for k in range(len(tries))]
    rejected = next(tries[k] for k in range(len(tries)) if overlap[k] < 0.8
                    and set(prints.band_keys[k].tolist()) & set(target.band_keys[0].tolist()))
    fresh = problem(rng)
    seeds = [
        seed(run_a[1].text.upper() + "!!"),  # an exact copy of run A's (normalized)
        seed(run_b[2].text, "7"),  # an exact copy of run B's
        seed(run_a[0].text, "9"),  # an exact copy of what both published: run A's is the first
        seed(run_a[3].text + " Explain briefly."),  # near copies
        seed(run_b[4].text.replace("?", " in total?")),
        seed(rejected),  # a candidate, not a near copy
        seed(problem(rng)),  # no copies
        seed(fresh),
        seed(fresh + " Show your work."),  # a near copy of a seed kept before it
        seed(fresh.lower()),  # an exact copy of one
    ]
    earlier = [(i.instruction_id, i.text, "run-a") for i in sorted(run_a, key=lambda i: i.instruction_id)]
    earlier += [(i.instruction_id, i.text, "run-b") for i in sorted(run_b, key=lambda i: i.instruction_id)]

    by_index = screened_verdicts(seeds, config, "run-c")

    assert by_index == rehash_every_earlier_instruction(seeds, config, earlier)
    near = "near duplicate (MinHash Jaccard >= 0.8)"
    assert list(by_index.values()) == [
        "exact duplicate (normalized text) of an instruction run run-a published",
        "exact duplicate (normalized text) of an instruction run run-b published",
        "exact duplicate (normalized text) of an instruction run run-a published",
        f"{near} of an instruction run run-a published",
        f"{near} of an instruction run run-b published",
        None, None, None, near, "exact duplicate (normalized text)",
    ]
    # Run A plans against nothing earlier: it published first.
    assert set(screened_verdicts(seeds, config, "run-a").values()) == {None, near, "exact duplicate (normalized text)"}


# --- runs published before the index -----------------------------------------------------------


def publish_before_the_index(config: Config, run_id: str, instructions: list[Instruction]) -> None:
    """Publish `instructions` as the version before the index did: rows in `instructions`, a snapshot without
    `minhash`, no index rows."""
    with lake.connect(config) as con:
        con.execute("BEGIN")
        for i in instructions:
            con.execute("INSERT INTO instructions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [run_id, f"{run_id}-s0", i.instruction_id, i.domain, i.source, i.source_row, i.text,
                         i.reference, i.difficulty])
        con.execute("CALL lake.set_commit_message('orchard', ?, extra_info => ?)",
                    [f"run {run_id}", json.dumps({"run_id": run_id, "shards_added": [f"{run_id}-s0"]})])
        con.execute("COMMIT")


def test_runs_published_before_the_index_or_under_other_settings_are_indexed_once_by_the_first_plan(config):
    rng = random.Random(11)
    old = [seed(problem(rng), str(k)) for k in range(5)]
    publish_before_the_index(config, "old", old)
    other = config.replace(hygiene=HygieneConfig(near_duplicate_jaccard=0.7))
    recent = [seed(problem(rng), str(k)) for k in range(5)]
    publish(other, "recent", recent)
    seeds = [seed(old[0].text + " Be brief."), seed(recent[1].text), seed(problem(rng))]
    before = lake.snapshots(config)[-1]["snapshot_id"]

    verdicts = screened_verdicts(seeds, config, "new")

    assert list(verdicts.values()) == [
        "near duplicate (MinHash Jaccard >= 0.8) of an instruction run old published",
        "exact duplicate (normalized text) of an instruction run recent published", None]
    *_, indexing = lake.snapshots(config)
    assert indexing["snapshot_id"] == before + 1
    assert json.loads(indexing["commit_extra_info"]) == {"indexed": {"minhash": LABEL, "runs": ["old", "recent"]}}
    _, rows = lake.query(config, "SELECT run_id, minhash, count(*) FROM instruction_fingerprints GROUP BY ALL "
                                 "ORDER BY ALL")
    assert rows == [("old", LABEL, 5), ("recent", Signing.of(other.hygiene).label, 5), ("recent", LABEL, 5)]
    _, rows = lake.query(config, "SELECT run_id, count(*) FROM instruction_signatures WHERE minhash = "
                                 f"'{LABEL}' GROUP BY ALL ORDER BY ALL")
    assert rows == [("old", 5), ("recent", 5)]
    # The next plan finds them indexed: it writes nothing, and drops the same.
    assert screened_verdicts(seeds, config, "new") == verdicts
    assert lake.snapshots(config)[-1]["snapshot_id"] == before + 1


def test_without_near_duplicates_a_plan_finds_exact_copies_by_text_hash_alone(config):
    rng = random.Random(13)
    earlier = [seed(problem(rng), str(k)) for k in range(4)]
    publish(config, "first", earlier)
    exact_only = config.replace(hygiene=HygieneConfig(near_duplicate_jaccard=1.0))
    seeds = [seed(earlier[2].text.lower()), seed(earlier[3].text + " Be brief."), seed(problem(rng))]

    verdicts = screened_verdicts(seeds, exact_only, "second")

    assert list(verdicts.values()) == ["exact duplicate (normalized text) of an instruction run first published",
                                       None, None]
    _, rows = lake.query(config, "SELECT minhash, count(*), max(len(band_keys)) FROM instruction_fingerprints "
                                 "GROUP BY ALL ORDER BY ALL")
    assert rows == [(LABEL, 4, 9), ("off", 4, 0)]  # indexed once more, text hashes only
    _, rows = lake.query(config, "SELECT minhash, count(*) FROM instruction_signatures GROUP BY ALL")
    assert rows == [(LABEL, 4)]  # none for "off"
