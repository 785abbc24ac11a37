"""Seeds from a user's own data (`kind = "dataset"`): any JSONL/JSON/Parquet/CSV file, a glob of them, a folder of
them or one written by `datasets.save_to_disk`, or a hub id where the network allows, read through `datasets`.

The source's `columns` map Orchard's fields (orchard.config.SEED_FIELDS) to the data's columns; a field left out is
looked for under its common names (FIELD_NAMES). What each row becomes depends on its domain:

- math: the prompt, and a reference answer: the `answer` column, else the final answer of the `solution` column (or
  of a chat row's assistant turn), read as `answer_format` says: gsm8k (the text after `####`), boxed (the last
  `\\boxed{...}`), plain, or auto (whichever the text shows). An answer math-verify cannot parse is an error: it could
  never be checked.
- code: the prompt and its tests: a list of assert statements (MBPP: the prompt shows the first, as MBPP's own prompt
  does, so the model knows the function's name) or a test program (HumanEval: with an `entry_point`, its `check` is
  called on it); `test_setup` runs first. Tests that are not valid Python are an error.
- instruction_following: the prompt and IFEval's `instruction_id_list` and `kwargs`, checked as an IFEval file's are.
- open_ended: the prompt alone (judged against principles, not checked).

A chat-format row (`messages`: role/content objects) gives its one user turn as the prompt; a `system` message or
column is put before it, separated by a blank line (an instruction has one text). A conversation of several user
turns is dropped with its reason: Orchard grows trees from one turn. `filter` is a SQL predicate (DuckDB) over the
data's columns; the rows it leaves out are dropped with that reason too.

Errors name the file (or folder and split), the line or row, and the field: one line, before anything is planned.
"""

from __future__ import annotations

import glob
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from orchard.config import SeedSource
from schemas.domains import DOMAINS
from schemas.plan import Instruction, instruction_id
from tasks.seed_files import SeedError, check_text_file

# Where a field left out of `columns` is looked for: the first of these column names the data has.
FIELD_NAMES: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt", "question", "problem", "instruction", "query", "input", "text"),
    "messages": ("messages", "conversations", "conversation"),
    "system": ("system", "system_prompt"),
    "answer": ("answer", "final_answer", "short_answer"),
    "solution": ("solution",),
    "tests": ("tests", "test_list", "test"),
    "test_setup": ("test_setup_code", "test_setup"),
    "entry_point": ("entry_point",),
    "instruction_id_list": ("instruction_id_list",),
    "kwargs": ("kwargs",),
    "id": ("id", "task_id", "key", "unique_id", "question_id", "category"),  # named in the instruction's source
    "difficulty": (),  # a column only when mapped: `level` means too many things to guess
}
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".parquet": "parquet", ".csv": "csv"}
MULTI_TURN = "multi-turn conversation (trees grow from one user turn)"
CODE_SHOWS_TEST = "Your function must pass this test:"
_ROW = "__orchard_row"


@dataclass
class DatasetRows:
    """What one dataset source gave: its instructions in order, the rows read, and the rows dropped by reason."""

    instructions: list[Instruction] = field(default_factory=list)
    read: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str, n: int = 1) -> None:
        if n:
            self.dropped[reason] = self.dropped.get(reason, 0) + n


@dataclass(frozen=True)
class _Part:
    """One table of the source: a file (or a saved split) and its rows, with how errors name them."""

    name: str  # the file, or "FOLDER (split S)"
    row_word: str  # "line" (JSONL) or "row"
    rows: Any  # a datasets.Dataset: its features decode what the Arrow table stores (JSON objects of mixed keys)

    @property
    def columns(self) -> list[str]:
        return list(self.rows.column_names)


def load_dataset_seeds(source: SeedSource, where: str = "seeds") -> DatasetRows:
    """Return the instructions of a `dataset` source, every row checked (`where` names the source in errors)."""
    result = DatasetRows()
    for part in _parts(source, where):
        result.read += part.rows.num_rows
        _rows(part, _filtered(part, source, where, result), source, where, result)
    if not result.read:
        raise SeedError(f"{where}: {source.path}: no rows")
    if source.filter and result.dropped.get(_filtered_reason(source)) == result.read:
        raise SeedError(f"{where}.filter: keeps none of the {result.read} rows of {source.path} ({source.filter})")
    return result


# --- reading -----------------------------------------------------------------------------------------


def _builder(path: str) -> str | None:
    name = path.lower()
    return next((b for suffix, b in FILE_BUILDERS.items() if name.endswith(suffix)), None)


def _parts(source: SeedSource, where: str) -> list[_Part]:
    """The source's tables: its files in order, a saved dataset's split, or a hub dataset's split."""
    spec = source.path.strip()
    if not spec:
        raise SeedError(f"{where}: a dataset source needs a path (a file, a glob, a folder or a hub id)")
    path = Path(spec).expanduser()
    if any(ch in spec for ch in "*?["):
        files = sorted(p for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise SeedError(f"{where}: {spec}: no file matches")
        return [_read_file(Path(f), where) for f in files]
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return [_read_saved(path, source.split, where)]
        files = sorted(p for p in path.iterdir() if p.is_file() and _builder(p.name))
        if not files:
            raise SeedError(f"{where}: {spec}: a folder with no data file ({', '.join(FILE_BUILDERS)}) and no dataset "
                            "saved by datasets.save_to_disk")
        return [_read_file(p, where) for p in files]
    if path.is_file():
        return [_read_file(path, where)]
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec) and not path.parent.exists():
        return [_read_hub(spec, source.split, where)]
    raise SeedError(f"{where}: {spec}: no such file or folder")


def _read_file(path: Path, where: str) -> _Part:
    builder = _builder(path.name)
    if builder is None:
        raise SeedError(f"{path}: unsupported seed file type (use {', '.join(FILE_BUILDERS)})")
    json_lines = path.name.lower().endswith((".jsonl", ".jsonl.gz"))
    if builder in ("json", "csv"):
        check_text_file(path, json_lines=json_lines)  # UTF-8 (and JSON objects) line by line, named before datasets
    datasets = _datasets()

    try:
        rows = datasets.load_dataset(builder, data_files=str(path), split="train", keep_in_memory=True)
    except Exception as exc:  # datasets raises many types for an unreadable file; report it as one seed error
        raise SeedError(f"{path}: cannot read as {builder}: {_first_line(exc)}") from None
    return _Part(str(path), "line" if json_lines else "row", rows)


def _read_saved(path: Path, split: str, where: str) -> _Part:
    datasets = _datasets()

    try:
        saved = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - one seed error, whatever datasets raised
        raise SeedError(f"{where}: {path}: cannot read as a saved dataset: {_first_line(exc)}") from None
    if isinstance(saved, datasets.DatasetDict):
        split = _split(list(saved), split, f"{where}: {path}")
        return _Part(f"{path} (split {split})", "row", saved[split])
    if split and split not in ("train", saved.split or "train"):
        raise SeedError(f"{where}.split: {path} holds one dataset, not a dict of splits; leave split out")
    return _Part(str(path), "row", saved)


def _read_hub(name: str, split: str, where: str) -> _Part:
    datasets = _datasets()

    try:
        found = datasets.load_dataset(name)
    except Exception as exc:  # noqa: BLE001 - the hub unreachable, the id unknown: one seed error either way
        raise SeedError(f"{where}: {name}: not a local file or folder, and the Hugging Face Hub cannot load it "
                        f"({type(exc).__name__}: {_first_line(exc)}); where the network allows, save it with "
                        f"datasets.load_dataset({name!r}).save_to_disk(DIR) and point path at DIR") from None
    split = _split(list(found), split, f"{where}: {name}")
    return _Part(f"{name} (split {split})", "row", found[split])


def _datasets() -> Any:
    """The `datasets` module (a slow import: only when a dataset source is read), its progress bars off: a seed
    source's console says what it read, not how fast."""
    import datasets

    datasets.disable_progress_bars()
    return datasets


def _split(splits: Sequence[str], wanted: str, where: str) -> str:
    if wanted:
        if wanted not in splits:
            raise SeedError(f"{where}: no split {wanted!r} (splits: {', '.join(splits)})")
        return wanted
    if len(splits) == 1:
        return splits[0]
    if "train" in splits:
        return "train"
    raise SeedError(f"{where}: several splits ({', '.join(splits)}); name one with split")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- filtering ---------------------------------------------------------------------------------------


def _filtered_reason(source: SeedSource) -> str:
    return f"left out by filter ({source.filter})"


def _filtered(part: _Part, source: SeedSource, where: str, result: DatasetRows) -> list[int]:
    """The 0-based numbers of the part's rows that `filter` keeps (all without one)."""
    total = part.rows.num_rows
    if not source.filter:
        return list(range(total))
    import duckdb
    import pyarrow as pa

    table = part.rows.data.table
    con = duckdb.connect()
    try:
        con.register("data", table.append_column(_ROW, pa.array(range(total), pa.int64())))
        keep = con.execute(f"SELECT {_ROW} FROM data WHERE {source.filter} ORDER BY {_ROW}").fetchnumpy()[_ROW]
    except duckdb.Error as exc:
        raise SeedError(f"{where}.filter: {source.filter!r} cannot run over {part.name}: {_first_line(exc)} "
                        f"(columns: {', '.join(table.column_names)})") from None
    finally:
        con.close()
    result.drop(_filtered_reason(source), total - len(keep))
    return keep.tolist()


# --- rows ----------------------------------------------------------------------------------------------


def _columns(part: _Part, source: SeedSource, where: str) -> dict[str, str]:
    """Orchard field -> the part's column: the source's `columns` (each must exist), then the common names."""
    names = part.columns
    found = {}
    for name, column in source.columns.items():
        if column not in names:
            raise SeedError(f"{where}.columns.{name}: {part.name} has no column {column!r} (its columns: "
                            f"{', '.join(names)})")
        found[name] = column
    taken = set(found.values())
    # A final answer mapped, or a solution: the other is not guessed beside it (an answer would win over the solution).
    mapped_answer = {"answer", "solution"} & set(found)
    for name, guesses in FIELD_NAMES.items():
        if name not in found and not (name in ("answer", "solution") and mapped_answer):
            column = next((c for c in guesses if c in names and c not in taken), None)
            if column is not None:
                found[name] = column
                taken.add(column)
    if "prompt" not in found and "messages" not in found:
        raise SeedError(f"{where}: {part.name}: no prompt column; map columns.prompt (or columns.messages) to one of "
                        f"{', '.join(names)}")
    if "prompt" in found and "messages" in found and "prompt" not in source.columns:
        del found["prompt"]  # a chat file's `prompt`-like column guessed beside its messages: the messages win
    return found


def _domain(columns: dict[str, str], source: SeedSource) -> str | None:
    """The source's domain, inferred from its columns when not configured; None when a column holds it per row."""
    if source.domain in DOMAINS:
        return source.domain
    if source.domain:
        return None
    if "instruction_id_list" in columns:
        return "instruction_following"
    if "tests" in columns:
        return "code"
    if {"answer", "solution"} & set(columns):
        return "math"
    return "open_ended"


def _rows(part: _Part, numbers: list[int], source: SeedSource, where: str, result: DatasetRows) -> None:
    columns = _columns(part, source, where)
    domain = _domain(columns, source)
    if domain is None and source.domain not in part.columns:
        raise SeedError(f"{where}.domain: {source.domain!r} is neither a domain ({', '.join(DOMAINS)}) nor a column "
                        f"of {part.name} (its columns: {', '.join(part.columns)})")
    wanted = sorted({*columns.values(), *([source.domain] if domain is None else [])})
    rows = part.rows.select_columns(wanted)
    if len(numbers) < rows.num_rows:
        rows = rows.select(numbers)
    values = rows[:]  # decoded by the dataset's features, column by column
    for k, number in enumerate(numbers):
        row = _Row(part, number + 1, {name: values[name][k] for name in wanted}, columns)
        made = row.instruction(domain or row.domain_of(source.domain), source)
        if isinstance(made, str):
            result.drop(made)
        else:
            result.instructions.append(made)


@dataclass
class _Row:
    part: _Part
    number: int
    record: dict[str, Any]
    columns: dict[str, str]

    def fail(self, problem: str) -> SeedError:
        return SeedError(f"{self.part.name}: {self.part.row_word} {self.number}: {problem}")

    def value(self, name: str) -> Any:
        column = self.columns.get(name)
        return None if column is None else self.record.get(column)

    def text(self, name: str, required: bool = True) -> str | None:
        """The field as stripped text (a number is written out); None when absent and not required."""
        value = self.value(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str) and value.strip():
            return value.strip()
        if not required and (value is None or isinstance(value, str)):  # an optional field left empty
            return None
        raise self.fail(f"field {self.columns.get(name, name)!r} is missing or empty")

    def domain_of(self, column: str) -> str:
        value = self.record.get(column)
        if value not in DOMAINS:
            raise self.fail(f"field {column!r} must name a domain ({', '.join(DOMAINS)}), got {value!r}")
        return value

    def instruction(self, domain: str, source: SeedSource) -> Instruction | str:
        """The row as an instruction of `domain`, or the reason it is dropped."""
        prompt, reply = self.prompt()
        if prompt is None:
            return MULTI_TURN
        if domain == "math":
            reference = self.math_reference(source.answer_format, reply)
            difficulty = self.difficulty(source.difficulty)
        elif domain == "code":
            prompt, reference = self.code(prompt)
            difficulty = self.difficulty(source.difficulty)
        elif domain == "instruction_following":
            from tasks.constraints import if_prompt  # imports nltk: only when asked for

            ids = self.value("instruction_id_list")
            if not isinstance(ids, list) or not ids or not all(isinstance(c, str) and c.strip() for c in ids):
                raise self.fail(f"field {self.columns.get('instruction_id_list', 'instruction_id_list')!r} is missing "
                                "or not a non-empty list of strings")
            made = if_prompt(f"{self.part.name}: {self.part.row_word} {self.number}", prompt, ids,
                             self.value("kwargs"), self.part.name, self.number, self.columns.get("kwargs", "kwargs"))
            reference, difficulty = made.reference(), made.k
        else:
            reference, difficulty = "", 1
        item_id = self.text("id", required=False)
        source_name = f"{self.part.name}#{item_id}" if item_id else self.part.name
        return Instruction(instruction_id(domain, prompt, reference), domain, source_name, self.number, prompt,
                           reference, difficulty)

    def prompt(self) -> tuple[str | None, str | None]:
        """(the prompt, a chat row's assistant reply after it if any); the prompt is None for a multi-turn chat."""
        system = self.text("system", required=False)
        if "messages" not in self.columns:
            prompt, reply = self.text("prompt"), None
        else:
            messages, name = self.value("messages"), self.columns["messages"]
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages):
                raise self.fail(f"field {name!r} must be a non-empty list of {{role, content}} objects")
            users = [i for i, m in enumerate(messages) if m["role"] == "user"]
            if len(users) > 1:
                return None, None
            if not users or not messages[users[0]]["content"].strip():
                raise self.fail(f"field {name!r} has no user turn with text")
            prompt = messages[users[0]]["content"].strip()
            system = system or next((m["content"].strip() for m in messages[:users[0]]
                                     if m["role"] == "system" and m["content"].strip()), None)
            reply = next((m["content"] for m in messages[users[0] + 1:] if m["role"] == "assistant"), None)
        return (f"{system}\n\n{prompt}" if system else prompt), reply

    def difficulty(self, default: int) -> int:
        value = self.value("difficulty")
        if value is None:
            return default
        match = re.fullmatch(r"(?:level\s*)?([1-5])", str(value).strip(), re.I)
        if not match:
            raise self.fail(f"field {self.columns['difficulty']!r} must be a difficulty 1-5 (or 'Level N'), got {value!r}")
        return int(match.group(1))

    def math_reference(self, answer_format: str, reply: str | None) -> str:
        """The final answer: the answer column, else the solution's (or the chat reply's), in `answer_format`."""
        if "answer" in self.columns:
            name, text, whole = self.columns["answer"], self.text("answer"), False
        elif "solution" in self.columns:
            name, text, whole = self.columns["solution"], self.text("solution"), True
        elif reply is not None and reply.strip():
            name, text, whole = self.columns["messages"], reply.strip(), True
        else:
            raise self.fail("no answer: map columns.answer (a final answer) or columns.solution (a worked solution)")
        reference = final_answer(text, answer_format, whole=whole)
        if reference is not None:
            reference = latex_spacing(reference)
        if reference is None:
            raise self.fail(f"field {name!r} has no final answer ({_FORMAT_SAYS[answer_format]}): {_clip(text)!r}")
        if not math_answer_parses(reference):
            raise self.fail(f"field {name!r}: math-verify cannot parse the answer {_clip(reference)!r}")
        return reference

    def code(self, prompt: str) -> tuple[str, str]:
        """(the prompt, the test program): asserts shown one in the prompt, a test program with its entry point."""
        name = self.columns.get("tests", "tests")
        tests, setup = self.value("tests"), self.text("test_setup", required=False) or ""
        if isinstance(tests, list) and tests and all(isinstance(t, str) and t.strip() for t in tests):
            tests = [t.strip() for t in tests]
            prompt = f"{prompt}\n{CODE_SHOWS_TEST}\n{tests[0]}"
            program = "\n".join([setup, *tests]).strip() + "\n"
        elif isinstance(tests, str) and tests.strip():
            entry = self.text("entry_point", required=False)
            program = "\n\n".join(filter(None, [setup, tests.strip()])) + "\n"
            if entry and re.search(r"^def check\(", tests, re.M):
                program += f"\n\ncheck({entry})\n"
        else:
            raise self.fail(f"field {name!r} is missing or not a test program or a non-empty list of asserts")
        try:
            compile(program, f"{self.part.name}:{self.number}", "exec")
        except SyntaxError as exc:
            raise self.fail(f"field {name!r} is not valid Python (line {exc.lineno} of the test program: "
                            f"{exc.msg})") from None
        return prompt, program


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- final answers ---------------------------------------------------------------------------------------

_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.S)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_FORMAT_SAYS = {"auto": "no '####' line or \\boxed{}", "gsm8k": "no '####' line", "boxed": "no \\boxed{}",
                "plain": "empty"}
_NUMBER = re.compile(r"-?\d[\d,]*(\.\d+)?|-?\.\d+|-?\d+/\d+")


def gsm8k_reference(answer: str) -> str:
    """Return the final answer of a GSM8K answer field (the text after '####', commas removed; all of it without)."""
    match = _GSM8K_FINAL.search(answer)
    final = match.group(1) if match else answer.strip()
    return final.replace(",", "").strip()


def last_boxed(text: str) -> str | None:
    """Return what the last `\\boxed{...}` (or `\\fbox{...}`) of `text` holds, braces matched; None without one."""
    starts = list(_BOXED.finditer(text))
    for match in reversed(starts):
        rest = text[match.end():]
        if not rest.startswith("{"):  # `\boxed 5`: the next token
            token = re.match(r"[^\s$]+", rest)
            if token:
                return token.group(0)
            continue
        depth = 0
        for i, ch in enumerate(rest):
            depth += (ch == "{") - (ch == "}")
            if depth == 0:
                return rest[1:i].strip() or None
    return None


def final_answer(text: str, answer_format: str, *, whole: bool = False) -> str | None:
    """The final answer in `text` read as `answer_format` (auto: `####`, else `\\boxed{}`, else the text); a whole
    solution (`whole`) must show one by `####` or `\\boxed{}`. None when there is none."""
    fmt = answer_format
    if fmt == "auto":
        fmt = "gsm8k" if "####" in text else "boxed" if _BOXED.search(text) else "plain"
    if fmt == "gsm8k":
        if whole and "####" not in text:
            return None
        found = gsm8k_reference(text)
    elif fmt == "boxed":
        found = last_boxed(text)
    else:
        if whole:
            return None
        found = text.strip()
        if len(found) > 1 and found.startswith("$") and found.endswith("$"):
            found = found.strip("$").strip()
    return found or None


_THOUSANDS = re.compile(r"(?<=\d),\\!(?=\d{3})")
_SPACING = re.compile(r"\\[!,;:](?![A-Za-z])|\\ ")


def latex_spacing(answer: str) -> str:
    """`answer` without LaTeX's spacing commands (`\\!`, `\\,`, `\\;`, `\\:`, `\\ `), a thousands separator
    written `5,\\!525` joined (MATH writes large numbers so; math-verify parses neither)."""
    return _SPACING.sub("", _THOUSANDS.sub("", answer)).strip()


def math_answer_parses(reference: str) -> bool:
    """Whether math-verify reads an expression in `reference` as the verifier will (tasks/verify.py: as LaTeX, else as
    an expression); its fallback, the text itself as a string, is no expression. A plain number passes without it
    (math-verify and sympy load only for the other answers)."""
    if _NUMBER.fullmatch(reference.replace(" ", "")):
        return True
    from math_verify import parse  # slow import: sympy and the LaTeX parser

    # No timeout: math-verify's is signal.alarm, which only a main thread may set; it warns of that on each call.
    quiet = logging.getLogger("math_verify")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return any(not isinstance(found, str) for text in (f"${reference}$", reference)
                   for found in parse(text, parsing_timeout=None))
    finally:
        quiet.setLevel(level)
