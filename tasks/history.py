"""Dedup against earlier runs through the lake's index of the instructions they published.

Each published instruction has a row in `instruction_fingerprints` (the sha1 of its normalized text and its LSH band
keys) and, near duplicates on, one in `instruction_signatures` (its MinHash values). The publishing transaction writes
them (tasks/materialise.py) under the run's hygiene settings, whose label (tasks.hygiene.Signing) the rows and the
publishing snapshot's commit info record. A plan fingerprints its own seeds only, finds the earlier instructions that
have a seed's text hash or share one of its band keys in one scan of the fingerprints, and reads the signatures of
those candidates only, for the Jaccard check (tasks.hygiene.Deduplicator). The earlier runs are those that first
published before the planning run did (all others, when it has not published yet): a resumed run plans against the
same runs as its first attempt did, so its plan does not change under it.

A plan compares rows made under its own settings only. Earlier runs with instructions that have none (published
before the index existed, or under other settings) get them once, made from their instructions' text, in a lake
transaction of the plan's own before it reads (`index_earlier_runs`); its snapshot's commit info says which.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from orchard import lake
from orchard.config import Config
from schemas.rows import INSTRUCTION_FINGERPRINTS, INSTRUCTION_SIGNATURES
from tasks.hygiene import EarlierLookup, Fingerprints, Published, Signing, fingerprints

_log = logging.getLogger(__name__)

# Keys of the commit info: a publishing snapshot's MINHASH is the label its instructions were indexed under; an
# indexing snapshot's INDEXED holds the label and the runs whose instructions it indexed (all they had published).
MINHASH = "minhash"
INDEXED = "indexed"


# --- the rows of the index ---------------------------------------------------------------------------------------


def index_tables(run_id: str, instruction_ids: Sequence[str], prints: Fingerprints) -> tuple[pa.Table, pa.Table]:
    """Return the instruction_fingerprints and instruction_signatures rows of run `run_id`'s instructions, in the order
    given, from their fingerprints (no signatures with near duplicates off)."""
    n, label = len(instruction_ids), prints.signing.label
    common = {"run_id": [run_id] * n, "instruction_id": list(instruction_ids), "minhash": [label] * n}
    fingerprint_rows = pa.table({**common, "text_sha1": prints.text_sha1,
                                 "band_keys": _lists(prints.band_keys, pa.uint64())}, schema=INSTRUCTION_FINGERPRINTS)
    if not prints.signing.near:
        return fingerprint_rows, INSTRUCTION_SIGNATURES.empty_table()
    signature_rows = pa.table({**common, "hashvalues": _lists(prints.hashvalues, pa.uint32())},
                              schema=INSTRUCTION_SIGNATURES)
    return fingerprint_rows, signature_rows


def _lists(matrix: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    """The rows of a 2-D array as an Arrow list column."""
    rows, width = matrix.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(rows + 1, dtype=np.int32) * width),
                                    pa.array(matrix.ravel(), value_type))


def index_instructions(con: duckdb.DuckDBPyConnection, run_id: str, instructions: Sequence[tuple[str, str]],
                       signing: Signing) -> None:
    """Fingerprint the (instruction id, text) run `run_id` published and insert their index rows, sorted by id (the
    order signature reads skip row groups by), in the caller's transaction."""
    instructions = sorted(instructions)
    prints = fingerprints([text for _, text in instructions], signing)
    fingerprint_rows, signature_rows = index_tables(run_id, [iid for iid, _ in instructions], prints)
    lake.insert_arrow(con, "instruction_fingerprints", fingerprint_rows)
    lake.insert_arrow(con, "instruction_signatures", signature_rows)


def index_shards(con: duckdb.DuckDBPyConnection, run_id: str, shard_ids: Sequence[str], signing: Signing) -> None:
    """Index the instructions of run `run_id`'s shards `shard_ids`, inserted in the caller's (publishing) transaction."""
    if not shard_ids:
        return
    instructions = con.execute("SELECT instruction_id, text FROM instructions WHERE run_id = ? "
                               "AND list_contains(?, shard_id)", [run_id, list(shard_ids)]).fetchall()
    index_instructions(con, run_id, instructions, signing)


# --- which runs a plan compares with -----------------------------------------------------------------------------


@dataclass(frozen=True)
class EarlierRuns:
    """The runs that first published before a run did, oldest first, that published instructions; and those of them
    with instructions the index lacks under a label."""

    runs: tuple[str, ...]
    unindexed: tuple[str, ...]


def earlier_runs(snapshots: Sequence[Mapping[str, Any]], run_id: str, label: str) -> EarlierRuns:
    """Read from the lake's snapshots (oldest first) which runs a plan of `run_id` compares with under `label`.

    A run's instructions are indexed under `label` when each of its snapshots that added shards was published under
    `label`, or is followed by an indexing snapshot of that run under it.
    """
    infos = [(row["snapshot_id"], json.loads(row["commit_extra_info"] or "{}")) for row in snapshots]
    firsts: dict[str, int] = {}
    added: dict[str, list[tuple[int, str | None]]] = {}  # run -> (snapshot, label) of each publish that added shards
    indexed: dict[str, int] = {}  # run -> the last snapshot that indexed all it had published under `label`
    for snapshot_id, info in infos:
        run = info.get("run_id")
        if run is not None:
            firsts.setdefault(run, snapshot_id)
            if info.get("shards_added"):
                added.setdefault(run, []).append((snapshot_id, info.get(MINHASH)))
        index = info.get(INDEXED) or {}
        if index.get(MINHASH) == label:
            indexed.update(dict.fromkeys(index.get("runs", []), snapshot_id))
    mine = firsts.get(run_id)
    runs = tuple(run for run, first in sorted(firsts.items(), key=lambda item: item[1])
                 if run != run_id and (mine is None or first < mine) and run in added)
    unindexed = tuple(run for run in runs
                      if any(made != label and snapshot > indexed.get(run, -1) for snapshot, made in added[run]))
    return EarlierRuns(runs, unindexed)


def index_earlier_runs(config: Config, run_id: str, signing: Signing) -> dict[str, int]:
    """Index, under `signing`, the instructions of the runs a plan of `run_id` compares with that the index lacks, in
    one lake transaction; return how many of each run's instructions it indexed (nothing when none lacked any)."""

    def write() -> dict[str, int]:
        earlier = earlier_runs(lake.snapshot_rows(con), run_id, signing.label)
        if not earlier.unindexed:  # another plan indexed them since this one looked
            return {}
        missing = con.execute(
            "SELECT run_id, instruction_id, text FROM instructions i WHERE list_contains($runs, run_id) "
            "AND NOT EXISTS (SELECT 1 FROM instruction_fingerprints f WHERE f.run_id = i.run_id "
            "AND f.instruction_id = i.instruction_id AND f.minhash = $label)",
            {"runs": list(earlier.unindexed), "label": signing.label}).fetchall()
        counts: dict[str, int] = dict.fromkeys(earlier.unindexed, 0)
        by_run: dict[str, list[tuple[str, str]]] = {}
        for run, iid, text in missing:
            by_run.setdefault(run, []).append((iid, text))
            counts[run] += 1
        for run, instructions in by_run.items():
            index_instructions(con, run, instructions, signing)
        con.execute(f"CALL {lake.LAKE}.set_commit_message('orchard', ?, extra_info => ?)",
                    [f"index instructions of {len(counts)} earlier runs",
                     json.dumps({INDEXED: {MINHASH: signing.label, "runs": sorted(counts)}})])
        return counts

    with lake.connect(config) as con:
        return lake.commit_alone(con, write, what=f"run {run_id}: indexing earlier runs' instructions")


# --- finding what the seeds duplicate ----------------------------------------------------------------------------


def earlier_lookup(config: Config, run_id: str) -> EarlierLookup | None:
    """What a plan of run `run_id` dedups against: the instructions earlier runs published (None when the config
    turns dedup against the lake off)."""
    if not (config.hygiene.dedup and config.hygiene.dedup_against_lake):
        return None
    return functools.partial(find_earlier, config, run_id)


def find_earlier(config: Config, run_id: str, prints: Fingerprints) -> list[Published]:
    """Return the instructions earlier runs published that the seeds (`prints`) may duplicate: those with a seed's
    text hash and, for the other seeds, those sharing one of its LSH bands, with their signatures."""
    if not lake.exists(config):
        return []
    label = prints.signing.label
    with lake.connect(config, read_only=True) as con:
        earlier = earlier_runs(lake.snapshot_rows(con), run_id, label)
        if earlier.runs and not earlier.unindexed:
            return _published_matches(con, earlier.runs, prints)
    if not earlier.runs:
        return []
    indexed = index_earlier_runs(config, run_id, prints.signing)
    if indexed:
        _log.info("run %s: indexed %d instructions of earlier runs %s under %r", run_id, sum(indexed.values()),
                  ", ".join(indexed), label)
    with lake.connect(config, read_only=True) as con:
        return _published_matches(con, earlier.runs, prints)


def _published_matches(con: duckdb.DuckDBPyConnection, runs: Sequence[str], prints: Fingerprints) -> list[Published]:
    """The instructions of `runs` with a seed's text hash or (near duplicates on) sharing one of its band keys: one
    scan of instruction_fingerprints, then the signatures of the candidates of seeds that have no exact duplicate."""
    signing, n = prints.signing, len(prints)
    if signing.near:
        con.register("seed_keys", pa.table({"seed": np.repeat(np.arange(n, dtype=np.int64), signing.bands),
                                            "band_key": prints.band_keys.ravel()}))
        found = con.execute(
            "SELECT DISTINCT s.seed, f.run_id, f.instruction_id, f.text_sha1 FROM "
            "(SELECT run_id, instruction_id, text_sha1, unnest(band_keys) AS band_key FROM instruction_fingerprints "
            " WHERE minhash = ?) f JOIN seed_keys s USING (band_key)", [signing.label]).fetchall()
    else:
        con.register("seed_keys", pa.table({"seed": np.arange(n, dtype=np.int64), "text_sha1": prints.text_sha1}))
        found = con.execute(
            "SELECT DISTINCT s.seed, f.run_id, f.instruction_id, f.text_sha1 FROM instruction_fingerprints f "
            "JOIN seed_keys s USING (text_sha1) WHERE f.minhash = ?", [signing.label]).fetchall()
    con.unregister("seed_keys")
    order = {run: i for i, run in enumerate(runs)}
    # Other runs (later ones, and the planning run's own when it resumes) are left out of the few matches, not out of
    # every row of the scan: a filter on the scan would compare each row's run with every earlier run.
    matches = [match for match in found if match[1] in order]
    exact = {seed for seed, _, _, sha1 in matches if sha1 == prints.text_sha1[seed]}
    near = [(seed, run, iid, sha1) for seed, run, iid, sha1 in matches if seed not in exact]
    values = _signatures(con, signing.label, {(run, iid) for _, run, iid, _ in near})
    return ([Published(seed, order[run], run, iid, sha1, None) for seed, run, iid, sha1 in matches if seed in exact
             and sha1 == prints.text_sha1[seed]]
            + [Published(seed, order[run], run, iid, sha1, values[run, iid]) for seed, run, iid, sha1 in near])


def _signatures(con: duckdb.DuckDBPyConnection, label: str,
                wanted: set[tuple[str, str]]) -> dict[tuple[str, str], np.ndarray]:
    """The MinHash values of the (run id, instruction id) `wanted`, read under `label`."""
    if not wanted:
        return {}
    # Constant IN lists, so that the scan skips the files of other runs and the row groups of other ids.
    runs = ", ".join(lake.quote(run) for run in sorted({run for run, _ in wanted}))
    ids = ", ".join(lake.quote(iid) for iid in sorted({iid for _, iid in wanted}))
    table = con.execute(f"SELECT run_id, instruction_id, hashvalues FROM instruction_signatures "
                        f"WHERE minhash = {lake.quote(label)} AND run_id IN ({runs}) AND instruction_id IN ({ids})"
                        ).to_arrow_table()
    keys = zip(table.column("run_id").to_pylist(), table.column("instruction_id").to_pylist())
    values = table.column("hashvalues").combine_chunks().flatten().to_numpy()
    found = dict(zip(keys, values.reshape(table.num_rows, -1) if table.num_rows else ()))
    missing = wanted - found.keys()
    if missing:
        raise lake.LakeError(f"instruction_signatures: no {label!r} signature for {len(missing)} indexed "
                             f"instructions, e.g. {sorted(missing)[0]}")
    return found
