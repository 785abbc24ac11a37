"""How long does the hygiene gate take at scale? Decontaminate and dedup 100,000 instructions against 10,000 eval items.

The instructions are generated word problems (tasks/seeds.py's arithmetic generator at every difficulty) and
synthetic paragraphs; a few hundred of them are paraphrases of eval items (must be flagged) and near-copies of
other instructions (must be dropped as near-duplicates). The eval items are written to a JSONL file and read
through `datasets`, as a `[[decontaminate]]` entry would be. With `--default-sets` the instructions are screened
against the default eval sets instead (GSM8K, MATH, MBPP, HumanEval, IFBench, MT-Bench: 7,437 items, read from
Orchard's cache as a run reads them), and the planted paraphrases are of their real items. Prints the wall time of
each part and rows/s. With `--from-dataset` it then writes the same instructions to a Parquet file, reads them
through a `kind = "dataset"` seed source and screens them against the default sets, and prints the ratio of the two
wall times (issue 25's bound: 1.5x). Usage:
    PYTHONPATH=. .venv/bin/python bench/hygiene.py [--instructions 100000] [--eval-items 10000] [--default-sets]
                                                   [--from-dataset]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchard.config import Config, EvalSet  # noqa: E402
from schemas.plan import Instruction, instruction_id  # noqa: E402
from tasks.hygiene import decontaminator_for, load_eval_set, ngrams, screen_seeds, tokens  # noqa: E402
from tasks.seeds import generate_arithmetic  # noqa: E402

VOCABULARY = [f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "su", "ta", "ve", "zo") for b in
              ("ri", "ban", "tel", "mor", "quin", "das", "fo", "gul", "hep", "jax", "pim", "rus")] + \
             ["the", "of", "and", "a", "to", "in", "is", "how", "many", "what", "each", "if", "has", "more"]


def paragraph(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(VOCABULARY) for _ in range(words)).capitalize() + "?"


def made(text: str, row: int) -> Instruction:
    return Instruction(instruction_id("math", text, ""), "math", "bench", row, text, "", 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instructions", type=int, default=100_000)
    parser.add_argument("--eval-items", type=int, default=10_000, help="synthetic eval items (without --default-sets)")
    parser.add_argument("--from-dataset", action="store_true",
                        help="then read the same instructions from a Parquet file as a dataset seed source and screen "
                             "them against the default eval sets; print the ratio of the two wall times")
    parser.add_argument("--default-sets", action="store_true",
                        help="screen against the default eval sets (fetched by `make evals`), not synthetic items")
    args = parser.parse_args()
    rng = random.Random(0)

    if args.default_sets:
        default = Config()
        # Only items with at least one n-gram can be flagged (211 of the 7,437 are shorter than 8 tokens).
        evals = [item.text for spec in default.decontaminate for item in load_eval_set(spec)
                 if ngrams(tokens(item.text), default.hygiene.ngram)]
    else:
        evals = [paragraph(rng, rng.randint(30, 80)) for _ in range(args.eval_items)]
    contaminated = max(1, args.instructions // 500)
    near = max(1, args.instructions // 500)
    seeds: list[Instruction] = []
    for s in range((args.instructions - contaminated - near) // 2 // 400):  # half of them word problems
        seeds += [i for d in range(2, 6) for i in generate_arithmetic(100, difficulty=d, seed=s)]
    seeds += [made(paragraph(rng, rng.randint(20, 60)), i) for i in range(args.instructions - contaminated - near
                                                                         - len(seeds))]
    for i in range(contaminated):  # an eval item with a new first and last sentence
        seeds.append(made(f"Please help. {evals[rng.randrange(len(evals))]} Show your work.", i))
    for i in range(near):  # an earlier instruction with one more word at its end
        seeds.append(made(seeds[rng.randrange(len(seeds) // 2, len(seeds))].text + " Briefly.", i))
    rng.shuffle(seeds)

    with tempfile.TemporaryDirectory() as folder:
        if args.default_sets:
            cfg = default
        else:
            path = Path(folder) / "eval.jsonl"
            path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(evals)))
            cfg = Config().replace(decontaminate=(EvalSet(name="bench", format="text", path=str(path), field="text"),))
        started = time.perf_counter()
        decontaminator_for(cfg)
        indexed = time.perf_counter() - started
        screened = screen_seeds(seeds, cfg)
        wall = time.perf_counter() - started
        report(seeds, cfg, screened, [("read + index the eval sets", indexed), ("decontaminate + dedup", wall - indexed)],
               f"{contaminated} paraphrased eval items and {near} near-copies planted")
        if args.from_dataset:
            from_dataset(seeds, Path(folder), wall)


def report(seeds: list[Instruction], cfg: Config, screened, parts: list[tuple[str, float]], planted: str) -> None:
    stages = screened.drops.by_stage()
    against = ", ".join(spec.name for spec in cfg.decontaminate)
    wall = sum(seconds for _, seconds in parts)
    print(f"instructions {len(seeds)}, eval items {len(decontaminator_for(cfg).items)} ({against}; {planted})")
    for name, seconds in parts:
        print(f"  {name + ':':<31}{seconds:.2f} s")
    print(f"  wall time {wall:.1f} s = {len(seeds) / wall:,.0f} instructions/s")
    print(f"  kept {len(screened.kept)}; dropped {json.dumps(stages)}")
    print(f"  flagged {len({c['instruction_id'] for c in screened.contamination})} instructions "
          f"({len(screened.contamination)} contamination rows)")


def from_dataset(seeds: list[Instruction], folder: Path, before: float) -> None:
    """The same instructions as a user's Parquet file (prompt, answer, domain), read through a `dataset` seed source
    and screened against the default eval sets, as `orchard run` and `orchard seeds` do; the ratio to the wall time
    above, measured in this run."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchard.config import SeedSource
    from tasks.seeds import read_seeds

    path = folder / "pool.parquet"
    pq.write_table(pa.table({"prompt": [s.text for s in seeds], "answer": [s.reference or None for s in seeds],
                             "domain": ["math" if s.reference else "open_ended" for s in seeds]}), path)
    cfg = Config()
    started = time.perf_counter()
    instructions, (count,) = read_seeds([SeedSource(kind="dataset", path=str(path), domain="domain")])
    read = time.perf_counter() - started
    decontaminator_for(cfg)
    indexed = time.perf_counter() - started - read
    screened = screen_seeds(instructions, cfg)
    wall = time.perf_counter() - started
    print(f"\nthe same rows as a Parquet file read through kind = \"dataset\", against the default eval sets: {count.read} "
          f"rows read, {count.kept} distinct instructions ({json.dumps(count.dropped)})")
    report(instructions, cfg, screened, [("read the dataset", read), ("read + index the eval sets", indexed),
                                         ("decontaminate + dedup", wall - read - indexed)], "as above")
    print(f"  ratio to the first figure: {wall / before:.2f}x")


if __name__ == "__main__":
    main()
