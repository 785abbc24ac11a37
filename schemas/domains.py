"""The domain registry: one entry per domain, all that the stages know of a domain.

A domain (DESIGN.md: math, code, instruction_following, open_ended) is what an instruction's `domain` names. Its
entry says which verifier checks its answers, where in an answer that verifier reads, how turns ask for an answer
(strategies, prompts) and which growth methods apply; the stages read the entry instead of naming domains.

Adding a domain is adding one `Domain` to `DOMAINS`, with:
- `name`: what its seeds write in `Instruction.domain` (a seed kind that makes them goes in tasks/seeds.py);
- `verifier`: the name of the verifier that checks its answers (MATH_VERIFIER, CODE_VERIFIER, IF_VERIFIER; a new one
  is a new checker in tasks/verify.py). None: no verifier, so the domain is judged: its prompts are answered under
  principles and their antitheses (tasks/principles.py) and labelled by the jury, and nothing else grows them;
- `answer`: where in a response the verifier reads the answer (FINAL_ANSWER_LINE, PYTHON_CODE, WHOLE_TEXT);
- for a verified domain, what turns ask (tasks/turns.py): `strategies` (name -> planning instruction), `system` (the
  action's system prompt, with `{strategy}` and `{format}`), `answer_format` (how to lay out the answer) and
  `critic_reference` (what the critic is shown of the reference, with `{reference}`); optionally
  `strategies_setting`, the run setting (a RunConfig field) that picks the strategies a run uses; without one, a run
  uses all of them;
- `hard_negatives`: whether error injection (tasks/inject.py) edits its correct answers into wrong ones (it needs
  edit rules for the domain's `answer`);
- `counts_constraints`: whether its difficulty is k, the number of verifiable constraints (the `k` of pairs, trees).

A verified domain may be searched by MCTS (`run.mcts_domains` picks which); a judged one may not. Besides the entry,
the shard suites list the domain names a row may carry (the `domain` value sets of schemas/suites/instructions.json,
trees.json and pairs.json); tests/test_domains.py keeps them equal to `DOMAINS`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping

# The verifiers' names, as every verdict records them (nodes.verifier).
MATH_VERIFIER = "math_verify"
CODE_VERIFIER = "sandbox_tests"
IF_VERIFIER = "if_constraints"

# --- where an answer is read -------------------------------------------------------------------------------------

# A final-answer line, "Answer: 48" (or "The answer is: 48", "answer = 48"; any case): its group 1 is the answer.
ANSWER_LINE = re.compile(r"answer\s*(?:is)?\s*[:=]\s*(.+)", re.I)
# A fenced block: its language tag (maybe none) and its body; an unclosed last fence (the answer ran out of tokens)
# still counts, up to the end of the text.
FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
PYTHON_TAGS = frozenset({"python", "py", "python3"})


def final_answer_region(text: str) -> tuple[int, int]:
    """Return where in `text` its final answer lies: the rest of its last answer line, else all of it."""
    lines = list(ANSWER_LINE.finditer(text))
    return lines[-1].span(1) if lines else (0, len(text))


def answer_span(text: str) -> str:
    """Return the part of `text` that states the final answer (its last 'Answer: …' line, else all of it)."""
    found = ANSWER_LINE.findall(text)
    return found[-1].strip() if found else text


def code_region(text: str) -> tuple[int, int] | None:
    """Return where in `text` the code to run lies: its last ```python block, else its last untagged block, else the
    whole text when it has no fence at all; None when its only blocks are in another language."""
    blocks = list(FENCE.finditer(text))
    if not blocks:
        return 0, len(text)
    for wanted in (PYTHON_TAGS, {""}):
        chosen = [block for block in blocks if block.group(1).lower() in wanted]
        if chosen:
            return chosen[-1].span(2)
    return None


def extract_code(text: str) -> str:
    """Return the answer's code: its last ```python block, else its last untagged block, else the whole text."""
    region = code_region(text)
    return "" if region is None else text[region[0]:region[1]].strip("\n")


def whole_text_region(text: str) -> tuple[int, int]:
    """Return the span of all of `text`."""
    return 0, len(text)


@dataclass(frozen=True)
class Answer:
    """Where in a response its verifier reads the answer: `region(text)` is its (start, end), None when there is
    none to read."""

    name: str
    region: Callable[[str], tuple[int, int] | None]


FINAL_ANSWER_LINE = Answer("final_answer_line", final_answer_region)
PYTHON_CODE = Answer("python_code", code_region)
WHOLE_TEXT = Answer("whole_text", whole_text_region)


# --- the entries ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Domain:
    """One domain: its verifier, where that verifier reads an answer, what turns ask, and which methods grow it."""

    name: str
    verifier: str | None
    answer: Answer
    strategies: Mapping[str, str] = field(default_factory=dict)  # name -> planning instruction, in a fixed order
    strategies_setting: str = ""  # the RunConfig field that picks the strategies a run uses; "": all of them
    system: str = ""  # the action's system prompt: {strategy} and {format} are filled in
    answer_format: str = ""
    critic_reference: str = ""  # {reference} is filled in
    hard_negatives: bool = False
    counts_constraints: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "strategies", MappingProxyType(dict(self.strategies)))  # frozen all the way

    @property
    def judged(self) -> bool:
        """Whether the jury labels its answers: no verifier checks them, so principles grow its prompts, not turns."""
        return self.verifier is None

    @property
    def searchable(self) -> bool:
        """Whether MCTS can search it: a verifier values the search's answers."""
        return self.verifier is not None


MATH = Domain(
    name="math",
    verifier=MATH_VERIFIER,
    answer=FINAL_ANSWER_LINE,
    strategies={
        "step_by_step": "Solve the problem step by step, one short line per step.",
        "plan_first": "First write a one-line plan, then carry it out.",
        "work_backwards": "Start from what is asked and work backwards to the given numbers.",
        "program": "Write the calculation as one arithmetic expression, then evaluate it.",
        "estimate_then_check": "Estimate the answer first, then compute it exactly and check it.",
    },
    strategies_setting="strategies",
    system="You are a careful math tutor. {strategy} {format}",
    answer_format="End with a last line of the form 'Answer: <number>'.",
    critic_reference="The correct final answer is {reference}.",
    hard_negatives=True,
)

CODE = Domain(
    name="code",
    verifier=CODE_VERIFIER,
    answer=PYTHON_CODE,
    strategies={
        "direct": "Write the function directly.",
        "plan_in_comments": "Start the function body with a short plan as comments, then write the code.",
        "examples_first": "First work out two example calls and their results, then write the code.",
    },
    strategies_setting="code_strategies",
    system="You are a careful Python programmer. {strategy} {format}",
    answer_format="Reply with the complete function in one ```python code block.",
    critic_reference="The hidden tests are:\n{reference}",
    hard_negatives=True,
)

INSTRUCTION_FOLLOWING = Domain(
    name="instruction_following",
    verifier=IF_VERIFIER,
    answer=WHOLE_TEXT,
    strategies={
        "direct": "Answer the request directly.",
        "rules_first": "Read every rule in the request and follow each one exactly.",
        "draft_and_trim": "Keep the answer short and plain, and keep to the requested format.",
    },
    strategies_setting="if_strategies",
    system="You are a helpful writer. {strategy} {format}",
    answer_format="Reply with the response only.",
    critic_reference="The checker's constraints (ids and parameters) are: {reference}",
    counts_constraints=True,
)

OPEN_ENDED = Domain(name="open_ended", verifier=None, answer=WHOLE_TEXT)

DOMAINS: Mapping[str, Domain] = MappingProxyType({d.name: d for d in (MATH, CODE, INSTRUCTION_FOLLOWING, OPEN_ENDED)})
JUDGED_DOMAINS = tuple(name for name, domain in DOMAINS.items() if domain.judged)
