"""Constitutions: the principles of principle-grounded examples (SAMI style).

A constitution is a JSON file that follows schemas/constitution.schema.json: principles, each with an id,
the text a response is written under, and the antithesis its contrast is written under. Orchard ships a
default (schemas/constitutions/default.json); a user points at their own file. The open-ended prompts these
examples answer are seeds (tasks/seeds.py: load_open_ended).

Growth (`Principled`): each open-ended prompt is answered under each of its sampled principles, under their
antitheses, and under no principle; each (prompt, principle) becomes one principle example for the jury
(tasks/jury.py) to label.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from orchard.config import RunConfig
from schemas.domains import DOMAINS
from schemas.errors import OrchardError
from schemas.plan import Instruction
from tasks.growth import Phase, Request, Shard, Tree, all_of, node_id, sample_seed

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


# --- growth: the responses an example compares ---------------------------------------------------------------

PRINCIPLED_TEMPLATE = "principled/v1"
PRINCIPLED_SYSTEM = "You are a helpful assistant. Write your answer under this principle: {principle}"
UNCONDITIONED_SYSTEM = "You are a helpful assistant."


def answered_by_principles(instruction: Instruction) -> bool:
    """Whether principles answer `instruction`: a judged domain's prompt (open-ended), which no checker verifies."""
    domain = DOMAINS.get(instruction.domain)
    return domain is not None and domain.judged


class Principled(Phase):
    """Principle examples: an open-ended prompt answered under sampled principles, their antitheses, and none."""

    name = "principles"

    def __init__(self, constitution: Constitution) -> None:
        self.constitution = constitution

    def levels(self, instruction: Instruction, run: RunConfig) -> int:
        return 1 if answered_by_principles(instruction) else 0

    async def grow(self, shard: Shard, tree: Tree) -> None:
        """Write the tree's responses and add one principle_examples row per (prompt, principle), not yet judged."""
        if not answered_by_principles(tree.instruction):
            return
        run, root, tree_id = shard.run, tree.root, tree.tree_id
        rng = random.Random(sample_seed(run.seed, tree_id, "principles"))
        sampled = rng.sample(self.constitution.principles, min(run.principles_per_prompt, len(self.constitution.principles)))
        user = {"role": "user", "content": tree.instruction.text}
        generator = shard.engine("generator")

        def request(role: str, system: str, strategy: str | None, *seed_parts: str) -> Request:
            return Request(tree, root, role, [{"role": "system", "content": system}, user],
                           shard.sampling(run.principle_max_tokens, tree_id, *seed_parts), 1, strategy,
                           PRINCIPLED_TEMPLATE, 1, generator, priority=1)  # the jury's verdicts follow

        requests = [request("unconditioned", UNCONDITIONED_SYSTEM, None, "unconditioned")]
        for principle in sampled:
            for role, text in (("principled", principle.text), ("antithesis", principle.antithesis)):
                requests.append(request(role, PRINCIPLED_SYSTEM.format(principle=text), principle.principle_id,
                                        principle.principle_id, role))
        written = [node for nodes in await all_of(shard.grow_nodes(r) for r in requests) for node in nodes]
        by_key = {(n["role"], n["strategy"]): n for n in written}
        plain = by_key.get(("unconditioned", None))
        for principle in sampled:
            response = by_key.get(("principled", principle.principle_id))
            contrast = by_key.get(("antithesis", principle.principle_id))
            if plain is None or response is None or contrast is None:
                continue  # one of its requests failed (counted in the shard's requests): no example
            shard.examples.append({
                **shard.common, "tree_id": tree_id, "example_id": node_id(tree_id, principle.principle_id),
                "instruction_id": root["instruction_id"], "prompt": root["text"],
                "constitution": self.constitution.label, "principle_id": principle.principle_id,
                "principle": principle.text, "antithesis": principle.antithesis,
                "response_node_id": response["node_id"], "response": response["text"],
                "antithesis_node_id": contrast["node_id"], "antithesis_response": contrast["text"],
                "unconditioned_node_id": plain["node_id"], "unconditioned_response": plain["text"],
                "model": response["model"], "label": None, "jury_winner": None, "votes_response": None,
                "votes_antithesis": None, "votes_tie": None, "judges": None,
            })
        shard.level_done(tree)
