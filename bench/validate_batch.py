"""What does validating landed shards cost, one by one (validate_shard) or as one batch (validate_shards)?

In one process, after a warm-up (GX imported, its context and validation definitions built), for shards of about
`--instructions` instructions each (copies of tests/test_validate.py's valid shard, with injected errors and a jury,
every copy's ids its own) and batches of N shards: the CPU seconds per shard of validating each of N shards alone,
of validating the N shards as one batch, and their ratio. GX's cost is per expectation, not per row: batching pays
about one shard's GX work for the whole batch. A shard validated alone costs the same whatever N, so at most
`--alone` shards of each batch are validated alone to measure it. Usage:
    PYTHONPATH=. .venv/bin/python bench/validate_batch.py [--instructions 4 128] [--batches 1 8 32] [--alone 8]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schemas import rows  # noqa: E402
from tasks.validate import ShardTables, validate_shard, validate_shards  # noqa: E402
from tests.test_validate import relabel, shard_rows, with_injection_and_jury  # noqa: E402

INSTRUCTIONS_PER_COPY = 3  # the valid test shard with injection and jury: a math, a code and an open-ended tree


def shard(number: int, instructions: int) -> ShardTables:
    """Return shard `shard-<number>`: copies of the valid test shard, each copy's ids its own, about `instructions`
    instructions in all (its drop reasons once: a shard counts each reason once)."""
    copies = max(1, round(instructions / INSTRUCTIONS_PER_COPY))
    tables: dict[str, list[dict[str, Any]]] = {name: [] for name in rows.SHARD_TABLES}
    for copy in range(copies):
        rows_of_copy = shard_rows()
        with_injection_and_jury(rows_of_copy)
        for name, table_rows in relabel(rows_of_copy, f"s{number}c{copy}-", f"shard-{number}").items():
            if name == "drops" and copy:
                continue
            tables[name].extend(table_rows)
    return ShardTables({name: rows.table(name, table_rows) for name, table_rows in tables.items()}, f"shard-{number}")


def cpu_s(work: Any) -> float:
    """Return the CPU seconds this process spent on `work()`."""
    started = time.process_time()
    work()
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instructions", type=int, nargs="+", default=[4, 128])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--alone", type=int, default=8, help="shards of each batch validated alone, at most")
    args = parser.parse_args()

    warm = [shard(0, 3), shard(1, 3)]
    validate_shard(warm[0].tables, shard_id=warm[0].shard_id)
    validate_shards(warm)
    print(f"{'instructions':>12} {'rows':>6} {'N':>4} {'alone cpu s/shard':>18} {'batch cpu s/shard':>18} {'ratio':>6}")
    for instructions in args.instructions:
        for n in args.batches:
            batch = [shard(number, instructions) for number in range(n)]
            size = sum(batch[0].tables[name].num_rows for name in rows.SHARD_TABLES)
            measured = batch[: args.alone]
            alone = cpu_s(lambda: [validate_shard(s.tables, shard_id=s.shard_id) for s in measured]) / len(measured)
            results: list[Any] = []
            together = cpu_s(lambda: results.extend(validate_shards(batch))) / n
            assert all(v.success for v in results), [v.summary() for v in results if not v.success]
            print(f"{batch[0].tables['instructions'].num_rows:>12} {size:>6} {n:>4} {alone:>18.3f} {together:>18.3f} "
                  f"{alone / together:>6.1f}")


if __name__ == "__main__":
    main()
