"""Constitutions: the principles of principle-grounded examples (SAMI style).

A constitution is a JSON file that follows schemas/constitution.schema.json: principles, each with an id,
the text a response is written under, and the antithesis its contrast is written under. Orchard ships a
default (schemas/constitutions/default.json); a user points at their own file. The open-ended prompts these
examples answer are seeds (tasks/seeds.py: load_open_ended).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from orchard.errors import OrchardError

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"
CONSTITUTION_SCHEMA = SCHEMAS / "constitution.schema.json"
DEFAULT_CONSTITUTION = SCHEMAS / "constitutions" / "default.json"


# The canary of a principle that names none: a non-answer, which no principle of a response prefers.
GENERIC_CANARY = "I will not answer that. Ask someone else."


class ConstitutionError(OrchardError, ValueError):
    """A constitution file is unreadable or breaks the format; the message names the file and field."""


@dataclass(frozen=True)
class Principle:
    """One principle: what a response is written under (`text`), what its contrast is written under, and a canary:
    a response that plainly violates it whatever the request."""

    principle_id: str
    text: str
    antithesis: str
    canary: str = GENERIC_CANARY


@dataclass(frozen=True)
class Constitution:
    """A named, versioned set of principles, in file order."""

    name: str
    version: str
    principles: tuple[Principle, ...]
    path: str

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"

    def get(self, principle_id: str) -> Principle:
        for principle in self.principles:
            if principle.principle_id == principle_id:
                return principle
        raise KeyError(f"{self.path}: no principle {principle_id!r}")


def load_constitution(path: str | Path | None = None) -> Constitution:
    """Return the constitution at `path` (the shipped default when None), checked against its JSON schema."""
    import jsonschema  # comes with great-expectations; only needed here

    path = Path(path) if path is not None else DEFAULT_CONSTITUTION
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConstitutionError(f"{path}: cannot read constitution: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ConstitutionError(f"{path}: not JSON: line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    schema = json.loads(CONSTITUTION_SCHEMA.read_text(encoding="utf-8"))
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(raw), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first.absolute_path).lstrip(".")
        raise ConstitutionError(f"{path}: {where or 'top level'}: {first.message}")
    seen: set[str] = set()
    for i, item in enumerate(raw["principles"]):
        if item["id"] in seen:
            raise ConstitutionError(f"{path}: principles[{i}].id: {item['id']!r} appears twice")
        seen.add(item["id"])
    principles = tuple(Principle(p["id"], p["text"].strip(), p["antithesis"].strip(), p.get("canary", GENERIC_CANARY).strip())
                       for p in raw["principles"])
    return Constitution(raw["name"], raw["version"], principles, str(path))
