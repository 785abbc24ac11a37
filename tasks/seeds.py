"""Seed instructions: a generator of verifiable arithmetic word problems, a GSM8K-format loader, shard planning."""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE

from orchard.config import Config, SeedSource

DOMAINS = ("math", "code", "instruction_following", "open_ended")


class SeedError(ValueError):
    """A seed source is unreadable or malformed; the message names the file and line (or row) and field."""


@dataclass(frozen=True)
class Instruction:
    """One task to solve, with its exact reference answer."""

    instruction_id: str
    domain: str
    source: str
    source_row: int
    text: str
    reference: str
    difficulty: int

    def as_row(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ShardPlan:
    """A batch of instructions that is grown, landed, validated and published as one unit."""

    shard_id: str
    index: int
    instructions: tuple[Instruction, ...]


def instruction_id(domain: str, text: str, reference: str) -> str:
    """Return a stable id from what the instruction says, so the same seed gets the same id in every run."""
    return hashlib.sha256(f"{domain}\x1f{text}\x1f{reference}".encode()).hexdigest()[:16]


def _make(domain: str, source: str, row: int, text: str, reference: str, difficulty: int) -> Instruction:
    return Instruction(instruction_id(domain, text, reference), domain, source, row, text, reference, difficulty)


# --- the arithmetic generator --------------------------------------------------------------------
# Each template draws its numbers from `rng` scaled by difficulty and returns (question, exact answer).
# Difficulty 1 is one operation; every level adds a step or bigger numbers.

Template = Callable[[random.Random, int], tuple[str, int]]

_NAMES = ("Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena")
_ITEMS = ("apples", "pencils", "stickers", "marbles", "books", "cookies", "coins", "shells")


def _n(rng: random.Random, difficulty: int, low: int = 2) -> int:
    return rng.randint(low, 5 + 6 * difficulty)


def _buy_more(rng: random.Random, d: int) -> tuple[str, int]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b, c = _n(rng, d), _n(rng, d), rng.randint(2, 3 + d)
    return (f"{name} has {a} {item}. {name} buys {b} bags with {c} {item} in each bag. "
            f"How many {item} does {name} have now?", a + b * c)


def _share(rng: random.Random, d: int) -> tuple[str, int]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    friends, each, left = rng.randint(2, 2 + d), _n(rng, d), rng.randint(0, 3 + d)
    total = friends * each + left
    return (f"{name} shares {total} {item} equally among {friends} friends and keeps the {left} left over. "
            f"How many {item} does each friend get?", each)


def _shop(rng: random.Random, d: int) -> tuple[str, int]:
    name = rng.choice(_NAMES)
    price, count, paid_extra = _n(rng, d), rng.randint(2, 2 + d), rng.randint(1, 20)
    cost = price * count
    paid = cost + paid_extra
    return (f"{name} buys {count} notebooks at {price} dollars each and pays with {paid} dollars. "
            f"How many dollars of change does {name} get?", paid - cost)


def _trip(rng: random.Random, d: int) -> tuple[str, int]:
    speed, hours, extra = _n(rng, d, 10), rng.randint(2, 2 + d), _n(rng, d)
    return (f"A bus drives at {speed} km per hour for {hours} hours, then drives {extra} km more. "
            f"How many km does it drive in total?", speed * hours + extra)


def _expression(rng: random.Random, d: int) -> tuple[str, int]:
    terms = [_n(rng, d, 1) for _ in range(d + 1)]
    ops = [rng.choice("+-*") for _ in range(d)]
    expr = str(terms[0])
    for op, term in zip(ops, terms[1:]):
        expr += f" {op} {term}"
    value = eval(expr, {"__builtins__": {}})  # noqa: S307 - built from our own digits and + - *
    return f"Compute {expr.replace('*', '×')}.", value


TEMPLATES: tuple[Template, ...] = (_buy_more, _share, _shop, _trip, _expression)


def generate_arithmetic(count: int, *, difficulty: int = 2, seed: int = 0) -> list[Instruction]:
    """Return `count` distinct word problems with exact integer answers, the same for the same seed."""
    if not 1 <= difficulty <= 5:
        raise SeedError(f"arithmetic: difficulty must be 1..5, got {difficulty}")
    rng = random.Random(seed * 1_000_003 + difficulty)
    instructions: dict[str, Instruction] = {}
    attempts = 0
    while len(instructions) < count:
        attempts += 1
        if attempts > 50 * count + 100:
            raise SeedError(f"arithmetic: could not draw {count} distinct problems at difficulty {difficulty}")
        template = TEMPLATES[len(instructions) % len(TEMPLATES)]
        question, answer = template(rng, difficulty)
        made = _make("math", f"arithmetic:d{difficulty}:s{seed}", len(instructions), question, str(answer), difficulty)
        instructions.setdefault(made.instruction_id, made)
    return list(instructions.values())


# --- GSM8K-format files -------------------------------------------------------------------------

_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.S)


def gsm8k_reference(answer: str) -> str:
    """Return the final answer of a GSM8K answer field (the text after '####', commas removed)."""
    match = _GSM8K_FINAL.search(answer)
    final = match.group(1) if match else answer.strip()
    return final.replace(",", "").strip()


def load_gsm8k(path: str | Path, *, difficulty: int = 3) -> list[Instruction]:
    """Return the instructions of a GSM8K-format file (`question`, `answer`; JSONL or Parquet) read through `datasets`."""
    path = Path(path)
    if not path.is_file():
        raise SeedError(f"{path}: no such seed file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        _check_jsonl(path, ("question", "answer"))
        builder, row_word = "json", "line"
    elif suffix == ".parquet":
        builder, row_word = "parquet", "row"
    else:
        raise SeedError(f"{path}: unsupported seed file type {suffix!r} (use .jsonl or .parquet)")

    import datasets  # slow import: only when a file source is used

    try:
        rows = datasets.load_dataset(builder, data_files=str(path), split="train", keep_in_memory=True)
    except Exception as exc:  # datasets raises many types for an unreadable file; report it as one seed error
        raise SeedError(f"{path}: cannot read as {builder}: {exc}") from None
    instructions = []
    for i, row in enumerate(rows, start=1):
        for name in ("question", "answer"):
            value = row.get(name)
            if not isinstance(value, str) or not value.strip():
                raise SeedError(f"{path}: {row_word} {i}: field {name!r} is missing or empty")
        reference = gsm8k_reference(row["answer"])
        if not reference:
            raise SeedError(f"{path}: {row_word} {i}: field 'answer' has no final answer after '####'")
        instructions.append(_make("math", str(path), i, row["question"].strip(), reference, difficulty))
    return instructions


def _check_jsonl(path: Path, required: Sequence[str]) -> None:
    """Fail on the first line that is not a JSON object with every required field."""
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SeedError(f"{path}: line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict):
                raise SeedError(f"{path}: line {number}: expected a JSON object, got {type(record).__name__}")
            for name in required:
                if not isinstance(record.get(name), str) or not record[name].strip():
                    raise SeedError(f"{path}: line {number}: field {name!r} is missing or empty")


# --- sources and shards -------------------------------------------------------------------------


def load_seeds(sources: Iterable[SeedSource]) -> list[Instruction]:
    """Return the instructions of every configured source, first occurrence of a duplicate kept."""
    seen: dict[str, Instruction] = {}
    for i, source in enumerate(sources):
        if source.kind == "arithmetic":
            found = generate_arithmetic(source.count, difficulty=source.difficulty, seed=source.seed)
        elif source.kind == "gsm8k":
            if not source.path:
                raise SeedError(f"seeds[{i}]: a gsm8k source needs a path")
            found = load_gsm8k(source.path, difficulty=source.difficulty)
            if source.count:
                found = found[: source.count]
        else:
            raise SeedError(f"seeds[{i}].kind: unknown seed kind {source.kind!r} (known: arithmetic, gsm8k)")
        for instruction in found:
            seen.setdefault(instruction.instruction_id, instruction)
    return list(seen.values())


def plan_shards(instructions: Sequence[Instruction], *, per_shard: int, config_hash: str) -> list[ShardPlan]:
    """Split instructions into shards whose ids derive from their instruction ids and the config hash."""
    if per_shard < 1:
        raise SeedError(f"run.instructions_per_shard must be at least 1, got {per_shard}")
    plans = []
    for index, start in enumerate(range(0, len(instructions), per_shard)):
        batch = tuple(instructions[start : start + per_shard])
        digest = hashlib.sha256(config_hash.encode())
        for instruction in batch:
            digest.update(instruction.instruction_id.encode())
        plans.append(ShardPlan(shard_id=digest.hexdigest()[:16], index=index, instructions=batch))
    return plans


@task(name="plan-shards", cache_policy=NO_CACHE)
def plan_shards_task(config: dict) -> list[ShardPlan]:
    """Load every seed source and split the instructions into shards."""
    cfg = Config.from_dict(config)
    instructions = load_seeds(cfg.seeds)
    if not instructions:
        raise SeedError("seeds: the configured sources produced no instructions")
    return plan_shards(instructions, per_shard=cfg.run.instructions_per_shard, config_hash=cfg.content_hash())
