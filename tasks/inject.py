"""Error injection: minimally edited wrong versions of a correct math or code solution, for hard negatives.

UltraInteract pairs a correct solution with a wrong one that differs from it as little as possible, so that what
separates chosen from rejected is the error and nothing else. Here such wrong versions are made by rule: each
candidate is one small, plausible slip (an answer off by one, a swapped comparison, a negated condition, …)
applied to the correct text, best first. `error_candidates` does not verify: the `Injection` phase checks each
candidate with the real verifier and keeps the first that is wrong (a slip can be harmless, e.g. `<` -> `<=` where
equality never occurs), once the tree's turns are verified.
"""

from __future__ import annotations

import ast
import io
import itertools
import keyword
import operator
import random
import re
import tokenize
from dataclasses import dataclass
from decimal import Decimal, localcontext
from fractions import Fraction
from typing import Callable, Iterator

from schemas.domains import DOMAINS, FINAL_ANSWER_LINE, PYTHON_CODE, Answer
from tasks.growth import Phase, Shard, Tree, node_id, sample_seed
from tasks.pairs import ANSWER_ROLES, ERROR_INJECTION, pair_row, pass_rates

# Math: the number edited is the last one where the verifier reads the answer (schemas/domains.py: FINAL_ANSWER_LINE).
_NUMBER = r"\d+(?:,\d{3})*(?:\.\d+)?"
_SIGNED_NUMBER = re.compile(rf"(?:(?<![\w)])-)?{_NUMBER}")
_MATH_OPERATOR = re.compile(r"\\times|\\cdot|\\div|[-+*/×÷−]")
# A plain computation such as "6 × 8 = 48": numbers and operators only; its result (after "=") is optional.
_COMPUTATION = re.compile(
    rf"(?P<expr>{_NUMBER}(?:\s*(?:{_MATH_OPERATOR.pattern})\s*{_NUMBER})+)(?:\s*=\s*(?P<result>{_NUMBER}))?")
_AS_PYTHON = {"\\times": "*", "\\cdot": "*", "\\div": "/", "×": "*", "÷": "/", "−": "-"}
_MATH_SWAP = {"+": "-", "-": "+", "−": "+", "*": "+", "×": "+", "\\times": "+", "\\cdot": "+", "/": "*",
              "÷": "×", "\\div": "\\times"}
_ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_MATH_PRIORITY = {"off_by_one": 0, "number": 1, "operator": 2}

# Code: only the code the verifier runs is edited (schemas/domains.py: PYTHON_CODE).
_COMPARISON_SWAP = {"<": "<=", "<=": "<", ">": ">=", ">=": ">", "==": "!=", "!=": "=="}
_OPERATOR_SWAP = {"+": "-", "-": "+", "*": "+", "//": "/", "+=": "-=", "-=": "+=", "*=": "+=", "//=": "/="}
_BOOLEAN_SWAP = {"and": "or", "or": "and", "True": "False", "False": "True"}
_CODE_PRIORITY = {"comparison": 0, "off_by_one": 1, "operator": 2, "condition": 3, "boolean": 4}
_OPEN, _CLOSE = {"(", "[", "{"}, {")", "]", "}"}
_STATEMENT_START = {tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}


@dataclass(frozen=True)
class Edit:
    """One wrong candidate: the whole edited solution, the kind of slip, and how far it is from the original."""

    text: str
    kind: str  # number | off_by_one | operator | comparison | condition | boolean
    description: str  # e.g. "'+' -> '-' on line 3" or "48 -> 49 in 'Answer: 48'"
    edit_distance: int  # Levenshtein distance in characters between the original and `text`


@dataclass(frozen=True)
class _Slip:
    priority: int  # of its kind
    offset: int  # where in the original text it is: orders slips of one kind
    kind: str
    spans: frozenset[tuple[int, int, str]]  # (start, end, replacement) in the original text, never overlapping
    description: str


def edit_distance(a: str, b: str) -> int:
    """Return the Levenshtein distance between `a` and `b` (character insertions, deletions, substitutions)."""
    # Stripping a common prefix and suffix keeps the distance exact, and leaves little for one local edit.
    start, shortest = 0, min(len(a), len(b))
    while start < shortest and a[start] == b[start]:
        start += 1
    end_a, end_b = len(a), len(b)
    while end_a > start and end_b > start and a[end_a - 1] == b[end_b - 1]:
        end_a, end_b = end_a - 1, end_b - 1
    longer, shorter = sorted((a[start:end_a], b[start:end_b]), key=len, reverse=True)
    previous = list(range(len(shorter) + 1))
    for i, char_a in enumerate(longer, 1):
        current = [i]
        for j, char_b in enumerate(shorter, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def error_candidates(text: str, domain: str, *, seed: int = 0, limit: int = 8) -> list[Edit]:
    """Return up to `limit` distinct wrong candidates of the correct solution `text`, best first.

    Math edits the final answer (the last number of the last "Answer:" line, else of the text): first off by one
    (n+1, n-1), then a slip (two adjacent digits swapped, n*10), then an operator swapped in the last plain
    computation that gives the answer, its result and the answer changed to what the swapped computation gives.
    Code edits only the code the verifier runs, never a string, a comment or a `def` signature, and every
    candidate still parses. Its kinds in order: comparison (`<`<->`<=`, `>`<->`>=`, `==`<->`!=`), off_by_one
    (integer literal k -> k+1 or k-1, `range(...)` stop + 1), operator (`+`<->`-`, `*` -> `+`, `//` -> `/`, and
    their augmented forms), condition (`if c:` -> `if not (c):`), boolean (`and`<->`or`, `True`<->`False`).
    Within a kind, candidates go by position in the text; those at one position (n+1 and n-1) in an order drawn
    from `random.Random(seed)`.

    Args:
        text: a correct solution, as the model wrote it.
        domain: a domain whose answer (schemas/domains.py) has edit rules here: where the verifier reads a final
            answer line (math) or Python code (code); any other domain has no candidates.
        seed: orders equally good candidates, so that the result is a function of (text, domain, seed).
        limit: the most candidates returned.
    """
    entry = DOMAINS.get(domain)
    rules = EDIT_RULES.get(entry.answer) if entry is not None else None
    region = rules and entry.answer.region(text)
    if not region:
        return []
    slips_in, sound = rules
    with localcontext(prec=len(text) + 28):  # exact: no number in `text` has more digits, so n+1 never rounds
        slips = slips_in(text, *region)
    rng = random.Random(seed)
    ties = [rng.random() for _ in slips]
    edits: list[Edit] = []
    seen = {text}
    for index in sorted(range(len(slips)), key=lambda i: (slips[i].priority, slips[i].offset, ties[i])):
        if len(edits) >= limit:
            break
        slip = slips[index]
        edited = _apply(text, slip.spans)
        part = edited[region[0]:len(edited) - (len(text) - region[1])]  # the region, edited
        if edited not in seen and (sound is None or sound(part)):
            seen.add(edited)
            edits.append(Edit(edited, slip.kind, slip.description, edit_distance(text, edited)))
    return edits


def _apply(text: str, spans: frozenset[tuple[int, int, str]]) -> str:
    for start, end, replacement in sorted(spans, reverse=True):
        text = text[:start] + replacement + text[end:]
    return text


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


# --- math -------------------------------------------------------------------------------------------------------


def _math_slips(text: str, start: int, end: int) -> list[_Slip]:
    """The slips of the final answer, the last number between `start` and `end`, and of the computation that gives
    it."""
    numbers = list(_SIGNED_NUMBER.finditer(text, start, end))
    if not numbers:
        return []
    answer = numbers[-1]
    written = answer.group()
    value = Decimal(written.replace(",", ""))
    context = (text[:answer.start()].rsplit("\n", 1)[-1] + text[answer.start():].split("\n", 1)[0]).strip()[:60]

    def spell(new: Decimal) -> str:
        return f"{new:,}" if "," in written else str(new)

    def answer_slip(kind: str, new: Decimal) -> _Slip:
        return _Slip(_MATH_PRIORITY[kind], answer.start(), kind, frozenset({(*answer.span(), spell(new))}),
                     f"{written} -> {spell(new)} in '{context}'")

    slips = [answer_slip("off_by_one", value + 1), answer_slip("off_by_one", value - 1)]
    digits = written.lstrip("-").replace(",", "")
    if digits.isdigit():
        for i in range(len(digits) - 1):
            swapped = digits[:i] + digits[i + 1] + digits[i] + digits[i + 2:]
            if swapped != digits and swapped[0] != "0":
                slips.append(answer_slip("number", Decimal(swapped).copy_sign(value)))
    slips.append(answer_slip("number", value * 10))
    return slips + _computation_slips(text, answer, Fraction(value), spell)


def _computation_slips(text: str, answer: re.Match, target: Fraction, spell: Callable[[Decimal], str]) -> list[_Slip]:
    """Swap one operator of the last computation that gives the answer; its result and the answer follow it."""
    computations = [found for found in _COMPUTATION.finditer(text, 0, answer.end())
                    if found.end("expr") <= answer.start() and _evaluate(found.group("expr")) == target]
    if not computations:
        return []
    found, slips = computations[-1], []
    for sign in _MATH_OPERATOR.finditer(text, found.start("expr"), found.end("expr")):
        swap = _MATH_SWAP[sign.group()]
        new = _evaluate(text[found.start("expr"):sign.start()] + swap + text[sign.end():found.end("expr")])
        if new is None or new.denominator != 1 or new == target:
            continue
        result = spell(Decimal(new.numerator))
        spans = {(*sign.span(), swap), (*answer.span(), result)}
        if found.group("result") and Fraction(Decimal(found.group("result").replace(",", ""))) == target:
            spans.add((*found.span("result"), result))
        slips.append(_Slip(_MATH_PRIORITY["operator"], sign.start(), "operator", frozenset(spans),
                           f"'{sign.group()}' -> '{swap}' on line {_line_of(text, sign.start())}, "
                           f"answer {answer.group()} -> {result}"))
    return slips


def _evaluate(computation: str) -> Fraction | None:
    """Return the exact value of a computation of plain numbers with + - * /, or None."""
    for written, python in _AS_PYTHON.items():
        computation = computation.replace(written, python)
    try:
        return _value(ast.parse(computation.replace(",", ""), mode="eval").body)
    except (SyntaxError, ValueError, RecursionError):  # not a plain computation after all, or an absurd one
        return None


def _value(node: ast.expr) -> Fraction | None:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return Fraction(str(node.value))
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
        left, right = _value(node.left), _value(node.right)
        if left is None or right is None or (isinstance(node.op, ast.Div) and right == 0):
            return None
        return _ARITHMETIC[type(node.op)](left, right)
    return None


# --- code -------------------------------------------------------------------------------------------------------


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def _code_slips(text: str, start: int, end: int) -> list[_Slip]:
    code = text[start:end]
    if not _parses(code):
        return []
    try:
        tokens = [token for token in tokenize.generate_tokens(io.StringIO(code).readline)
                  if token.type not in (tokenize.NL, tokenize.COMMENT)]
    except (tokenize.TokenError, SyntaxError):
        return []
    line_starts = list(itertools.accumulate((len(line) for line in io.StringIO(code)), initial=start))
    slips: list[_Slip] = []

    def at(position: tuple[int, int]) -> int:
        return line_starts[position[0] - 1] + position[1]

    def colon_after(index: int) -> int | None:
        """Return the index of the statement's ':' from `index` on, outside brackets (None past the line's end)."""
        for k, depth in _depths(tokens, index):
            if tokens[k].type == tokenize.NEWLINE or depth < 0:
                return None
            if depth == 0 and tokens[k].type == tokenize.OP and tokens[k].string == ":":
                return k
        return None

    def slip(kind: str, first: int, last: int, replacement: str, what: str, anchor: int | None = None) -> None:
        offset = at(tokens[first].start) if anchor is None else anchor
        slips.append(_Slip(_CODE_PRIORITY[kind], offset, kind,
                           frozenset({(at(tokens[first].start), at(tokens[last].end), replacement)}),
                           f"{what} on line {_line_of(text, offset)}"))

    signature_end = -1  # the tests call the function by name: its `def` line, up to its own ':', stays as it is
    for k, token in enumerate(tokens):
        word, previous, is_op = token.string, tokens[k - 1] if k else None, token.type == tokenize.OP
        if token.type == tokenize.NAME and word == "def":
            signature_end = colon_after(k) or len(tokens)
        if k <= signature_end:
            continue
        if is_op and word in _COMPARISON_SWAP:
            slip("comparison", k, k, _COMPARISON_SWAP[word], f"'{word}' -> '{_COMPARISON_SWAP[word]}'")
        elif is_op and word in _OPERATOR_SWAP and (word != "*" or _ends_operand(previous)):
            slip("operator", k, k, _OPERATOR_SWAP[word], f"'{word}' -> '{_OPERATOR_SWAP[word]}'")
        elif token.type == tokenize.NUMBER and word.replace("_", "").isdigit():
            for new in (int(word) + 1, int(word) - 1) if int(word) > 0 else (1,):
                slip("off_by_one", k, k, str(new), f"{word} -> {new}")
        elif word == "range" and k + 1 < len(tokens) and tokens[k + 1].string == "(":
            # The stop of range(stop) or range(start, stop); a stop ending in a literal has the literal's own slip.
            inside = list(itertools.takewhile(lambda pair: pair[1] >= 0, _depths(tokens, k + 2)))
            last = k + 1 + len(inside)  # the last token before range's ')'
            commas = sum(depth == 0 and tokens[i].string == "," for i, depth in inside)
            if inside and tokens[last].type != tokenize.NUMBER and tokens[last].string != "," and commas <= 1:
                slip("off_by_one", last, last, tokens[last].string + " + 1", "range(...) stop + 1", at(token.start))
        elif word in ("if", "elif") and (previous is None or previous.type in _STATEMENT_START):
            colon = colon_after(k + 1)
            if colon is not None and colon > k + 1:
                condition = text[at(tokens[k + 1].start):at(tokens[colon - 1].end)]
                slip("condition", k + 1, colon - 1, f"not ({condition})",
                     f"'{word} {' '.join(condition.split())[:40]}:' negated")
        elif token.type == tokenize.NAME and word in _BOOLEAN_SWAP:
            slip("boolean", k, k, _BOOLEAN_SWAP[word], f"'{word}' -> '{_BOOLEAN_SWAP[word]}'")
    return slips


def _depths(tokens: list[tokenize.TokenInfo], first: int) -> Iterator[tuple[int, int]]:
    """Yield (index, bracket depth relative to `first`) of the tokens from `first` on; a bracket counts as outside
    the pair it opens or closes, so the ')' of a call opened before `first` sits at depth -1."""
    depth = 0
    for k in range(first, len(tokens)):
        depth -= tokens[k].type == tokenize.OP and tokens[k].string in _CLOSE
        yield k, depth
        depth += tokens[k].type == tokenize.OP and tokens[k].string in _OPEN


def _ends_operand(token: tokenize.TokenInfo | None) -> bool:
    """Whether `token` can end an operand, so that a `*` after it multiplies (not `*args`, `[*xs]`, `import *`)."""
    if token is None:
        return False
    if token.type == tokenize.NAME:
        return not keyword.iskeyword(token.string) or token.string in ("True", "False", "None")
    return token.type in (tokenize.NUMBER, tokenize.STRING) or token.string in _CLOSE


# The edit rules, by where the verifier reads the answer: the slips within the answer's (start, end) in a text, and
# what an edited answer must still be for its verdict to mean "wrong" (None: anything).
EDIT_RULES: dict[Answer, tuple[Callable[[str, int, int], list[_Slip]], Callable[[str], bool] | None]] = {
    FINAL_ANSWER_LINE: (_math_slips, None),
    PYTHON_CODE: (_code_slips, _parses),  # code that does not parse fails for that, not for the slip
}


# --- the phase: hard negatives for each tree's correct answers --------------------------------------------------

INJECT_TEMPLATE = "inject/v1"
INJECT_TRIES = 4  # edited candidates verified per correct answer; the first the verifier fails is kept


class Injection(Phase):
    """For up to `hard_negatives_per_tree` correct answers of a tree of a domain that has hard negatives (math, code),
    the first minimally edited copy the verifier fails becomes an `injected` sibling, paired with the answer it was
    made from."""

    name = "inject"
    needs = ("turns",)  # it edits the tree's verified answers

    async def grow(self, shard: Shard, tree: Tree) -> None:
        run = shard.run
        per_tree = run.hard_negatives_per_tree
        if per_tree == 0 or not DOMAINS[tree.instruction.domain].hard_negatives:
            return
        sources = [n for n in sorted(tree.nodes, key=lambda n: n["node_id"])
                   if n["role"] in ANSWER_ROLES and n["verdict"] == "correct"][: 2 * per_tree]
        candidates = []
        for source in sources:
            for edit in error_candidates(source["text"], tree.instruction.domain,
                                         seed=sample_seed(run.seed, source["node_id"]), limit=INJECT_TRIES):
                node = {**source, "node_id": node_id(source["node_id"], "injected", edit.text), "role": "injected",
                        "text": edit.text, "edit": edit.description, "prompt_template_version": INJECT_TEMPLATE,
                        "completion_tokens": None, "finish_reason": None, "cached_tokens": None}
                candidates.append((source, node, edit))
        await shard.verify([node for _, node, _ in candidates])
        kept: list[str] = []
        rate = pass_rates(tree.nodes).get(tree.instruction.instruction_id)
        for source, node, edit in candidates:
            if node["verdict"] == "correct" or source["node_id"] in kept or len(kept) >= per_tree:
                continue
            kept.append(source["node_id"])
            shard.add_nodes(tree, [node])
            pair = pair_row(source, node, tree.instruction, method=ERROR_INJECTION, chosen_score=source["score"],
                            rejected_score=node["score"], chosen_text=source["text"], rejected_text=node["text"],
                            pass_rate=rate)
            pair["edit_distance"] = edit.edit_distance
            tree.injected_pairs.append(pair)
