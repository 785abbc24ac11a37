"""How does planning grow with the lake's history? Screen 10,000 new seeds against 0, 100,000 and 1,000,000
instructions earlier runs published.

Each history goes into a fresh local lake of its own (a DuckDB-file catalog, its data in a SeaweedFS bucket started
here, as the embedded default has it) in bulk, not through the run flow: runs of 30,000 instructions (a night's worth
when a year holds ~11M), each one snapshot as a publish makes it, its `instructions`, `instruction_fingerprints` and
`instruction_signatures` rows inserted from Arrow through DuckDB, its commit info naming the run and the hygiene
settings. Their MinHash values are random numpy draws of the right shape (signing a million texts with datasketch
would take minutes) and their band keys are computed from those as for real signatures; their text hashes are random.
Among them, real fingerprints of exact and near copies of some new seeds (`--copies` of each, in the first runs), so
that the join finds something and the plan drops them. The new seeds are bench/hygiene.py's mix: generated word
problems and paragraphs.

Timed: the screen step as plan_shards_task runs it (decontamination against the default eval set, the seeds'
fingerprints, the lake reads, dedup), each opening the lake afresh: once as a new process does it, building the eval
sets' index first, and once with that index built. The sizes take turns for `--repeats` rounds; medians. Prints a
table with the ratios to the empty lake. Usage:
    PYTHONPATH=. .venv/bin/python bench/plan_history.py [--seeds 10000] [--sizes 0,100000,1000000]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.hygiene import made, paragraph  # noqa: E402
from orchard import lake  # noqa: E402
from orchard.config import Config, LakeConfig, ObjectStoreConfig  # noqa: E402
from orchard.services import start_seaweedfs  # noqa: E402
from schemas.plan import Instruction  # noqa: E402
from schemas.rows import INSTRUCTIONS  # noqa: E402
from tasks.history import MINHASH, earlier_lookup, index_tables  # noqa: E402
from tasks.hygiene import (  # noqa: E402
    Fingerprints,
    Published,
    Signing,
    band_keys,
    decontaminator,
    fingerprints,
    screen_seeds,
)
from tasks.seeds import generate_arithmetic  # noqa: E402

STORE = ObjectStoreConfig(bucket="plan-history", access_key_id="orchard", secret_access_key="orchard-bench-secret")
NEW_RUN = "bench-new"  # the planning run: it has not published, so it compares with every run


@dataclass(frozen=True)
class Timing:
    """Planning against one history size: median wall times, the part spent reading the lake, what it dropped."""

    history: int
    runs: int
    plan_s: float  # as plan_shards_task runs it: its process builds the eval sets' index first
    warm_s: float  # with that index already built
    lake_s: float  # of warm_s, in the lookup of what earlier runs published
    copies_dropped: int  # seeds dropped as copies of an instruction an earlier run published


def new_seeds(count: int, rng: random.Random) -> list[Instruction]:
    """Half word problems (every difficulty), half paragraphs of 20-60 words."""
    seeds = [i for s in range(count // 2 // 400 + 1) for d in range(2, 6)
             for i in generate_arithmetic(100, difficulty=d, seed=s)][: count // 2]
    return seeds + [made(paragraph(rng, rng.randint(20, 60)), i) for i in range(count - len(seeds))]


def planted_copies(seeds: list[Instruction], copies: int, rng: random.Random) -> list[tuple[str, str]]:
    """(id, text) of `copies` exact copies (case and punctuation changed) and `copies` near copies (two words added)
    of long seeds, for the history."""
    long = [s for s in seeds if len(s.text.split()) >= 40]
    chosen = rng.sample(long, 2 * copies)
    return ([(f"copy-{k:04d}", s.text.upper() + "!") for k, s in enumerate(chosen[:copies])]
            + [(f"near-{k:04d}", s.text + " Explain briefly.") for k, s in enumerate(chosen[copies:])])


def synthetic_run(run_id: str, size: int, signing: Signing, rng: np.random.Generator,
                  real: list[tuple[str, str]]) -> dict[str, pa.Table]:
    """The rows a publish of `size` instructions writes: random signatures, and real ones for the (id, text) `real`."""
    n = size - len(real)
    ids = [f"{value:016x}" for value in rng.integers(0, 2**63, size=n)] + [iid for iid, _ in real]
    values = rng.integers(0, 2**32, size=(n, signing.num_perm), dtype=np.uint32)
    drawn = Fingerprints(signing, [f"{value:040x}" for value in rng.integers(0, 2**63, size=n)], values,
                         band_keys(values, signing.bands, signing.rows))
    planted = fingerprints([text for _, text in real], signing)
    prints = Fingerprints(signing, drawn.text_sha1 + planted.text_sha1, np.concatenate([values, planted.hashvalues]),
                          np.concatenate([drawn.band_keys, planted.band_keys]))
    fingerprint_rows, signature_rows = index_tables(run_id, ids, prints)
    texts = [f"history instruction {iid}" for iid in ids[:n]] + [text for _, text in real]
    instructions = pa.table({"run_id": [run_id] * size, "shard_id": [f"{run_id}-s0"] * size, "instruction_id": ids,
                             "domain": ["math"] * size, "source": ["bench"] * size, "source_row": list(range(size)),
                             "text": texts, "reference": [""] * size, "difficulty": [1] * size}, schema=INSTRUCTIONS)
    return {"instructions": instructions,  # the index sorted by id, as a publish writes it
            "instruction_fingerprints": fingerprint_rows.sort_by("instruction_id"),
            "instruction_signatures": signature_rows.sort_by("instruction_id")}


def publish_history(cfg: Config, sizes: list[int], signing: Signing, rng: np.random.Generator,
                    real: list[tuple[str, str]]) -> None:
    """Publish runs of `sizes` instructions, one snapshot each, `real` spread over the first four of them."""
    spread = min(4, len(sizes))
    with lake.connect(cfg) as con:
        for k, size in enumerate(sizes):
            run_id = f"bench-{k:04d}"
            tables = synthetic_run(run_id, size, signing, rng, real[k::spread] if k < spread else [])
            con.execute("BEGIN")
            for name, rows in tables.items():
                lake.insert_arrow(con, name, rows)
            con.execute(f"CALL {lake.LAKE}.set_commit_message('orchard', ?, extra_info => ?)",
                        [f"run {run_id}", json.dumps({"run_id": run_id, "shards_added": [f"{run_id}-s0"],
                                                      MINHASH: signing.label})])
            con.execute("COMMIT")


def time_screen(cfg: Config, seeds: list[Instruction], *, index_built: bool) -> tuple[float, float, int]:
    """Screen `seeds` as plan_shards_task does; return its wall time, the part spent in the lake lookup, and how many
    seeds it dropped as copies of instructions earlier runs published."""
    if not index_built:
        decontaminator.cache_clear()
    lookup = earlier_lookup(cfg, NEW_RUN)
    spent = [0.0]

    def timed(prints: Fingerprints) -> Sequence[Published]:
        started = time.perf_counter()
        try:
            return lookup(prints)
        finally:
            spent[0] += time.perf_counter() - started

    started = time.perf_counter()
    screened = screen_seeds(seeds, cfg, timed)
    wall = time.perf_counter() - started
    return wall, spent[0], sum(n for (_, reason), n in screened.drops.counts.items() if reason.endswith(" published"))


def plan_history(sizes: list[int], *, seeds: int = 10_000, per_run: int = 30_000, copies: int = 10,
                 repeats: int = 3, work_dir: Path | None = None) -> list[Timing]:
    """Time planning `seeds` new seeds against a lake of each history size; the sizes take turns, `repeats` rounds,
    so that a load that comes and goes on the machine weighs on each alike."""
    rng = random.Random(0)
    instructions = new_seeds(seeds, rng)
    real = planted_copies(instructions, copies, rng)
    with tempfile.TemporaryDirectory(dir=work_dir) as folder:
        service = start_seaweedfs(STORE, Path(folder) / "services")
        try:
            store = dataclasses.replace(STORE, endpoint_url=service.url)
            lakes = {size: Config(state_dir=str(Path(folder) / f"lake-{size}"), object_store=store,
                                  lake=LakeConfig(data_path=f"s3://{STORE.bucket}/lake-{size}/")) for size in sizes}
            runs = {}
            for size, cfg in lakes.items():
                started = time.perf_counter()
                chunks = [per_run] * (size // per_run) + ([size % per_run] if size % per_run else [])
                lake.connect(cfg).close()
                publish_history(cfg, chunks, Signing.of(cfg.hygiene), np.random.default_rng(size), real)
                runs[size] = len(chunks)
                print(f"  history of {size:,} instructions in {len(chunks)} runs written in "
                      f"{time.perf_counter() - started:.0f} s", flush=True)
            samples: dict[int, list[tuple[float, float, float, int]]] = {size: [] for size in sizes}
            for _ in range(repeats):
                for size, cfg in lakes.items():
                    plan_s, _, _ = time_screen(cfg, instructions, index_built=False)
                    warm_s, lake_s, dropped = time_screen(cfg, instructions, index_built=True)
                    samples[size].append((plan_s, warm_s, lake_s, dropped))
        finally:
            service.stop()
    return [Timing(size, runs[size], *(statistics.median(column) for column in list(zip(*rows))[:3]), rows[-1][3])
            for size, rows in samples.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10_000)
    parser.add_argument("--sizes", default="0,100000,1000000", help="history sizes, comma-separated")
    parser.add_argument("--per-run", type=int, default=30_000, help="instructions per published run")
    parser.add_argument("--copies", type=int, default=10, help="exact and near copies of new seeds planted, each")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    timings = plan_history([int(s) for s in args.sizes.split(",")], seeds=args.seeds, per_run=args.per_run,
                           copies=args.copies, repeats=args.repeats)
    base = timings[0]
    print(f"screening {args.seeds:,} new seeds, median of {args.repeats}; {args.copies} exact and {args.copies} near "
          "copies of them planted in each history")
    print("  plan s: as plan_shards_task runs it (its process builds the eval sets' index first); warm s: with the "
          "index built; lake s: of warm s, reading the lake")
    print(f"{'history':>11} {'runs':>5} {'plan s':>7} {'ratio':>6} {'warm s':>7} {'ratio':>6} {'lake s':>7} "
          f"{'copies dropped':>15}")
    for t in timings:
        print(f"{t.history:>11,} {t.runs:>5} {t.plan_s:>7.2f} {t.plan_s / base.plan_s:>6.2f} {t.warm_s:>7.2f} "
              f"{t.warm_s / base.warm_s:>6.2f} {t.lake_s:>7.2f} {t.copies_dropped:>15}")


if __name__ == "__main__":
    main()
