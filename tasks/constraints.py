"""Verifiable instruction-following constraints: checkers, prompt synthesis, scoring, and IFEval-format files.

Every constraint is an IFEval instruction id (`length_constraints:number_words`, `punctuation:no_comma`, …) plus
one of our own (`startend:start_checker`), so IFEval files map onto the registry one to one. The checkers are
Google's IFEval checkers as the `if-verifiable` package ships them, except where they need nltk's `punkt` data:
nltk downloads that at run time (no network here), and `nltk-extratokenizers` 0.1.2, which claims to package it,
is an empty placeholder (its entry points name a module it does not contain). Those two checkers
(`length_constraints:number_sentences`, `change_case:capital_word_frequency`) are ours, built on tokenizers that
need no data: IFEval's own regex sentence splitter and nltk's Treebank word tokenizer. `keywords:letter_frequency`
counts a non-letter ('#', '!') itself, which IFEval's checker would swap for a random letter. `if_verifiable.ifbench`
is never imported: it calls `nltk.download` at import time.

A constraint's checker returns (satisfied, reason); `score_response` turns the checkers of one prompt into the
fraction satisfied, the strict all-satisfied flag and feedback for a refinement turn.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import langdetect
from if_verifiable.ifeval import instructions_registry as ifeval_registry
from if_verifiable.ifeval import instructions_util as ifeval_util
from nltk.tokenize import NLTKWordTokenizer

from schemas.errors import OrchardError
from tasks.seed_files import SeedError

# langdetect draws random samples while it detects: without a fixed seed the same text can get a different
# language on another call, and a response's score would change between runs.
langdetect.DetectorFactory.seed = 0

LIBRARY, OURS = "if-verifiable", "orchard"
RELATIONS = ("less than", "at least")  # IFEval's comparison words, in its order
MAX_K = 10


class ConstraintError(OrchardError, ValueError):
    """A constraint id is unknown, its parameters are malformed, or prompts cannot be drawn as asked."""


# --- the parts the samplers draw from -------------------------------------------------------------
# Everything a prompt mentions is drawn so that no two of its constraints contradict each other by their words:
# keywords come from one pool without replacement (a forbidden word is never also a required one); the phrases
# and markers hold no comma (no_comma), no word of the pool (forbidden_words) and none of the RARE_LETTERS
# that "less than" letter-frequency constraints limit.

WORD_POOL = (
    "river", "lantern", "harvest", "compass", "velvet", "meadow", "silver", "thunder", "garden", "mirror",
    "candle", "ocean", "pebble", "maple", "orbit", "ribbon", "canyon", "honey", "falcon", "island",
    "whistle", "blanket", "anchor", "cotton", "marble", "tunnel", "feather", "pepper", "saddle", "button",
    "violin", "carpet", "rocket", "tulip", "walnut", "harbor", "pillow", "ladder", "spider", "coral",
)
COMMON_LETTERS = ("e", "t", "a", "o", "n", "s", "r", "i")
RARE_LETTERS = ("z", "x", "j")
START_PHRASES = ("Here is my answer", "Sure thing", "To begin with", "In short", "Well then", "Let me tell you")
# Each ends in "?": IFEval's end instruction puts a period after the phrase ("… this exact phrase {phrase}.").
END_PHRASES = (
    "Any other questions?", "Is there anything else I can help with?", "Does that answer your question?",
    "What do you think?", "Shall we talk more about it?",
)
POSTSCRIPT_MARKERS = ("P.S.", "P.P.S")
SECTION_SPLITTERS = ("Section", "SECTION")
LANGUAGES = ("es", "fr", "de", "it", "pt")  # languages langdetect tells apart reliably from a few sentences

# Short tasks that suit every constraint: no commas (a repeated request must be able to follow no_comma),
# no double quotes, and open enough that a response can be long or short.
BASE_TASKS = (
    "Write a short story about a lighthouse keeper.",
    "Explain how vaccines work to a child.",
    "Describe your ideal weekend.",
    "Write a poem about the first snow of winter.",
    "Give advice to someone starting their first job.",
    "Explain why the sky is blue.",
    "Write a product description for a reusable water bottle.",
    "Describe how to plant a tree.",
    "Write a letter to a friend who moved to another city.",
    "Explain what a budget is and why it helps.",
    "Write a short review of a movie you would like to see.",
    "Describe a busy market on a Saturday morning.",
    "Explain how bees make honey.",
    "Write a motivational speech for a school sports team.",
    "Describe the life cycle of a butterfly.",
    "Write a short blog post about learning to cook.",
    "Explain how a bicycle stays upright.",
    "Write an invitation to a neighborhood picnic.",
    "Describe what makes a good teacher.",
    "Explain the water cycle in simple terms.",
    "Write a short biography of an imaginary inventor.",
    "Give tips for keeping a houseplant alive.",
)


class _Draw:
    """The random source of one prompt: numbers and choices, and pool words never drawn twice in the prompt."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self._unused = list(WORD_POOL)

    def words(self, n: int) -> list[str]:
        chosen = self.rng.sample(self._unused, n)
        for word in chosen:
            self._unused.remove(word)
        return chosen


# --- what a combination of constraints needs ------------------------------------------------------
# Word and sentence budgets catch length constraints that contradict each other ("less than 50 words" with
# "at least 12 sentences" or 5 paragraphs). Needs add up (conservative: they might overlap in a real answer);
# caps are the tightest limit any constraint sets.

WORDS_PER_SENTENCE = 4  # the fewest words we count on for a sentence that a need asks for
MAX_WORDS_PER_SENTENCE = 40  # more than this per sentence is a run-on, not an answer


@dataclass(frozen=True)
class Budget:
    """The words and sentences a constraint needs, and the most it allows (None: no limit)."""

    words: int = 0
    sentences: int = 0
    max_words: int | None = None
    max_sentences: int | None = None


def _needs(words: int = 0, sentences: int = 0) -> Budget:
    return Budget(words=words + WORDS_PER_SENTENCE * sentences, sentences=sentences)


def budget_problem(budgets: Sequence[Budget]) -> str | None:
    """Say why constraints with these budgets cannot all hold (None when they can)."""
    words, sentences = sum(b.words for b in budgets), sum(b.sentences for b in budgets)
    caps_w = [b.max_words for b in budgets if b.max_words is not None]
    caps_s = [b.max_sentences for b in budgets if b.max_sentences is not None]
    if caps_w and words > min(caps_w):
        return f"needs at least {words} words but allows at most {min(caps_w)}"
    if caps_s and sentences > min(caps_s):
        return f"needs at least {sentences} sentences but allows at most {min(caps_s)}"
    if caps_s and words > MAX_WORDS_PER_SENTENCE * max(min(caps_s), 1):
        return f"needs at least {words} words in at most {min(caps_s)} sentences"
    return None


def _relation_budget(unit: str, kwargs: Mapping[str, Any], count_key: str, relation_key: str) -> Budget:
    n, relation = kwargs[count_key], kwargs[relation_key]
    if relation == "less than":
        return Budget(**{f"max_{unit}": max(n - 1, 0)})
    return _needs(**{unit: n})


# --- the constraint registry ----------------------------------------------------------------------

Params = Mapping[str, str]  # parameter name -> kind: int, str, str_list, relation, letter, language


@dataclass(frozen=True)
class Constraint:
    """One verifiable constraint: its checker, parameter sampler, instruction text and conflicts."""

    constraint_id: str
    source: str  # LIBRARY: the verdict is if-verifiable's IFEval checker; OURS: written here
    params: Params
    verdict: Callable[[str, dict], bool]
    observe: Callable[[str, dict], str]  # what the response shows, for the reason: "87 words"
    sample: Callable[[_Draw], dict]
    describe: Callable[[dict], str]  # the instruction text the prompt states
    budget: Callable[[dict], Budget] = lambda kwargs: Budget()
    conflicts: frozenset[str] = frozenset()
    synthesize: bool = True  # False: scored when a file asks for it, never drawn into synthetic prompts
    optional: frozenset[str] = frozenset()

    def check(self, response: str, kwargs: Mapping[str, Any]) -> tuple[bool, str]:
        """Return (satisfied, reason) for `response` under this constraint with `kwargs` (checked first)."""
        kwargs = normalize_kwargs(self.constraint_id, kwargs)
        return bool(self.verdict(response, kwargs)), self.observe(response, kwargs)


def _library_verdict(constraint_id: str) -> Callable[[str, dict], bool]:
    """The IFEval checker of `constraint_id`: built with the kwargs (all given, so it draws nothing), then run."""
    checker_class = ifeval_registry.INSTRUCTION_DICT[constraint_id]

    def verdict(response: str, kwargs: dict) -> bool:
        checker = checker_class(constraint_id)
        checker.build_description(**_literal_keywords(kwargs))
        return checker.check_following(response)

    return verdict


def _literal_keywords(kwargs: dict) -> dict:
    # IFEval's keyword checkers put the keyword into a regular expression unescaped; escaping keeps "c++" a word.
    escaped = dict(kwargs)
    for key in ("keyword",):
        if key in escaped:
            escaped[key] = re.escape(escaped[key])
    for key in ("keywords", "forbidden_words"):
        if key in escaped:
            escaped[key] = [re.escape(word) for word in escaped[key]]
    return escaped


def _library_text(constraint_id: str) -> Callable[[dict], str]:
    """IFEval's own instruction text for `constraint_id` with these kwargs."""
    checker_class = ifeval_registry.INSTRUCTION_DICT[constraint_id]
    return lambda kwargs: checker_class(constraint_id).build_description(**kwargs)


# Observations: what the response shows, phrased for the feedback a refinement turn reads.

def _clip(text: str, n: int = 40) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _holds(found: int, relation: str, n: int) -> bool:
    return found < n if relation == "less than" else found >= n


def _relation_note(found: int, relation: str, n: int, unit: str) -> str:
    return f"found {found} {unit}, needs {relation} {n}"


def _count_sentences(text: str) -> int:
    # IFEval's regex splitter knows abbreviations, decimals and acronyms like punkt does; a piece without a word
    # ("!" of "Wow!!") is not a sentence.
    return sum(1 for s in ifeval_util.split_into_sentences(text) if re.search(r"\w", s))


_WORD_TOKENIZER = NLTKWordTokenizer()


def _capital_words(text: str) -> int:
    # IFEval counts word_tokenize tokens with word.isupper(); word_tokenize needs punkt only to find sentences
    # first, which changes no token's case, so the Treebank tokenizer over the whole text counts the same.
    return sum(1 for token in _WORD_TOKENIZER.tokenize(text) if token.isupper())


def _detected(text: str) -> str:
    try:
        return langdetect.detect(text)
    except langdetect.LangDetectException:
        return "unknown"


def _bullets(text: str) -> int:
    return (len(re.findall(r"^\s*\*[^\*].*$", text, flags=re.MULTILINE))
            + len(re.findall(r"^\s*-.*$", text, flags=re.MULTILINE)))


def _highlights(text: str) -> int:
    single = [h for h in re.findall(r"\*[^\n\*]*\*", text) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", text) if h[2:-2].strip()]
    return len(single) + len(double)


def _star_paragraphs(text: str) -> int:
    parts = re.split(r"\s?\*\*\*\s?", text)
    return sum(1 for part in parts if part.strip())


def _blank_line_paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\n", text) if p.strip()]


def _first_word(paragraph: str) -> str:
    word = paragraph.split()[0].lstrip("'\"") if paragraph.split() else ""
    return re.split(r"[.,?!'\"]", word, maxsplit=1)[0].lower()


def _observe_existence(text: str, kwargs: dict) -> str:
    missing = [word for word in kwargs["keywords"] if not re.search(re.escape(word), text, re.I)]
    return f"missing {missing}" if missing else f"contains all of {kwargs['keywords']}"


def _observe_forbidden(text: str, kwargs: dict) -> str:
    used = [word for word in kwargs["forbidden_words"] if re.search(rf"\b{re.escape(word)}\b", text, re.I)]
    return f"uses forbidden {used}" if used else f"uses none of {sorted(kwargs['forbidden_words'])}"


def _observe_title(text: str, kwargs: dict) -> str:
    titles = [title for title in re.findall(r"<<[^\n]+>>", text) if title.lstrip("<").rstrip(">").strip()]
    return f"has the title {titles[0]}" if titles else "no title in <<double angular brackets>>"


def _observe_repeat(text: str, kwargs: dict) -> str:
    if text.strip().lower().startswith(kwargs["prompt_to_repeat"].strip().lower()):
        return "starts with the request"
    return f"starts with {_clip(text.strip())!r}, not with the request"


def _observe_json(text: str, kwargs: dict) -> str:
    body = (text.strip().removeprefix("```json").removeprefix("```Json").removeprefix("```JSON")
            .removeprefix("```").removesuffix("```").strip())
    try:
        json.loads(body)
    except ValueError as exc:
        return f"not valid JSON ({exc})"
    return "valid JSON"


def _observe_two_responses(text: str, kwargs: dict) -> str:
    parts = [part.strip() for part in text.split("******") if part.strip()]
    if len(parts) == 2 and parts[0] == parts[1]:
        return "the two responses are the same"
    return f"found {len(parts)} responses separated by ******, needs 2 different ones"


def _observe_case(text: str, upper: bool) -> str:
    if not any(c.isalpha() for c in text):
        return "the response has no letters"
    wrong = [c for c in text if (c.islower() if upper else c.isupper())]
    if wrong:
        return f"found {len(wrong)} {'lowercase' if upper else 'capital'} letters"
    language = _detected(text)
    if language in ("en", "unknown"):
        return "all letters fit, language English"
    return f"detected language {language!r}, not English"


def _observe_nth_paragraph(text: str, kwargs: dict) -> str:
    paragraphs, nth = _blank_line_paragraphs(text), kwargs["nth_paragraph"]
    first = repr(_first_word(paragraphs[nth - 1])) if nth <= len(paragraphs) else "nothing"
    return (f"found {len(paragraphs)} paragraphs separated by blank lines (needs {kwargs['num_paragraphs']}); "
            f"paragraph {nth} starts with {first} (needs {kwargs['first_word']!r})")


def _start_verdict(text: str, kwargs: dict) -> bool:
    # Leading quotes are skipped like IFEval's end checker strips them, so "wrap in quotes" and a start phrase agree.
    return text.strip().lstrip('"').lower().startswith(kwargs["start_phrase"].strip().lower())


def _relation_sampler(count_key: str, relation_key: str, at_least: Sequence[int], less_than: Sequence[int],
                      **fixed: Callable[[_Draw], Any]) -> Callable[[_Draw], dict]:
    def sample(draw: _Draw) -> dict:
        relation = draw.rng.choice(RELATIONS)
        kwargs = {name: make(draw) for name, make in fixed.items()}
        kwargs[count_key] = draw.rng.choice(at_least if relation == "at least" else less_than)
        kwargs[relation_key] = relation
        return kwargs

    return sample


def _letter_verdict(text: str, kwargs: dict) -> bool:
    # IFEval's checker swaps anything but a-z for a random letter, yet IFEval's own rows ask for '#' and '!':
    # those are counted here, as the checker counts a letter (case-insensitive).
    if kwargs["letter"].isascii() and kwargs["letter"].isalpha():
        return _library_verdict("keywords:letter_frequency")(text, kwargs)
    return _holds(text.lower().count(kwargs["letter"].lower()), kwargs["let_relation"], kwargs["let_frequency"])


def _letter_sample(draw: _Draw) -> dict:
    # "At least" asks for a common letter, "less than" limits a rare one that no drawn word or phrase contains.
    if draw.rng.random() < 0.5:
        return {"letter": draw.rng.choice(COMMON_LETTERS), "let_frequency": draw.rng.randint(5, 15),
                "let_relation": "at least"}
    return {"letter": draw.rng.choice(RARE_LETTERS), "let_frequency": draw.rng.randint(2, 4),
            "let_relation": "less than"}


def _nth_paragraph_sample(draw: _Draw) -> dict:
    paragraphs = draw.rng.randint(2, 4)
    return {"num_paragraphs": paragraphs, "nth_paragraph": draw.rng.randint(1, paragraphs),
            "first_word": draw.words(1)[0]}


def _no_params(draw: _Draw) -> dict:
    return {}


def _constraints() -> dict[str, Constraint]:
    """Build the registry: IFEval's 25 instructions (two checked by our code) and our own start-phrase check."""
    c: list[Constraint] = []

    def library(constraint_id: str, params: Params, observe: Callable[[str, dict], str],
                sample: Callable[[_Draw], dict], budget: Callable[[dict], Budget] = lambda k: Budget(),
                **more: Any) -> None:
        c.append(Constraint(constraint_id, LIBRARY, params, _library_verdict(constraint_id), observe, sample,
                            _library_text(constraint_id), budget, **more))

    library(
        "keywords:existence", {"keywords": "str_list"},
        _observe_existence,
        lambda d: {"keywords": sorted(d.words(d.rng.randint(1, 3)))},
        lambda k: _needs(words=len(k["keywords"])))
    library(
        "keywords:frequency", {"keyword": "str", "frequency": "int", "relation": "relation"},
        lambda t, k: _relation_note(len(re.findall(re.escape(k["keyword"]), t, re.I)), k["relation"],
                                    k["frequency"], f"times {k['keyword']!r}"),
        _relation_sampler("frequency", "relation", range(2, 5), range(1, 4), keyword=lambda d: d.words(1)[0]),
        lambda k: _needs(words=k["frequency"]) if k["relation"] == "at least" else Budget())
    library(
        "keywords:forbidden_words", {"forbidden_words": "str_list"},
        _observe_forbidden,
        lambda d: {"forbidden_words": sorted(d.words(d.rng.randint(1, 3)))})
    c.append(Constraint(
        "keywords:letter_frequency", LIBRARY, {"letter": "letter", "let_frequency": "int", "let_relation": "relation"},
        _letter_verdict,
        lambda t, k: _relation_note(t.lower().count(k["letter"].lower()), k["let_relation"], k["let_frequency"],
                                    f"times the letter {k['letter']!r}"),
        _letter_sample, _library_text("keywords:letter_frequency"),
        lambda k: _needs(words=k["let_frequency"]) if k["let_relation"] == "at least" else Budget()))
    library(
        "language:response_language", {"language": "language"},
        lambda t, k: f"detected language {_detected(t)!r}, needs {k['language']!r}",
        lambda d: {"language": d.rng.choice(LANGUAGES)})
    c.append(Constraint(
        "length_constraints:number_sentences", OURS, {"num_sentences": "int", "relation": "relation"},
        lambda t, k: _holds(_count_sentences(t), k["relation"], k["num_sentences"]),
        lambda t, k: _relation_note(_count_sentences(t), k["relation"], k["num_sentences"], "sentences"),
        _relation_sampler("num_sentences", "relation", range(2, 11), range(3, 13)),
        _library_text("length_constraints:number_sentences"),
        lambda k: _relation_budget("sentences", k, "num_sentences", "relation")))
    library(
        "length_constraints:number_paragraphs", {"num_paragraphs": "int"},
        lambda t, k: f"found {_star_paragraphs(t)} paragraphs separated by ***, needs {k['num_paragraphs']}",
        lambda d: {"num_paragraphs": d.rng.randint(2, 5)},
        lambda k: _needs(sentences=k["num_paragraphs"]))
    library(
        "length_constraints:number_words", {"num_words": "int", "relation": "relation"},
        lambda t, k: _relation_note(ifeval_util.count_words(t), k["relation"], k["num_words"], "words"),
        _relation_sampler("num_words", "relation", (50, 100, 150, 200, 300), (50, 80, 100, 150, 200)),
        lambda k: _relation_budget("words", k, "num_words", "relation"))
    library(
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": "int", "nth_paragraph": "int", "first_word": "str"},
        _observe_nth_paragraph,
        _nth_paragraph_sample,
        lambda k: _needs(sentences=k["num_paragraphs"]))
    library(
        "detectable_content:number_placeholders", {"num_placeholders": "int"},
        lambda t, k: _relation_note(len(re.findall(r"\[.*?\]", t)), "at least", k["num_placeholders"],
                                    "[placeholders]"),
        lambda d: {"num_placeholders": d.rng.randint(1, 4)},
        lambda k: _needs(words=k["num_placeholders"]))
    library(
        "detectable_content:postscript", {"postscript_marker": "str"},
        lambda t, k: (f"has a postscript starting with {k['postscript_marker']}"
                      if _library_verdict("detectable_content:postscript")(t, k)
                      else f"no postscript starting with {k['postscript_marker']}"),
        lambda d: {"postscript_marker": d.rng.choice(POSTSCRIPT_MARKERS)},
        lambda k: _needs(sentences=1))
    library(
        "detectable_format:number_bullet_lists", {"num_bullets": "int"},
        lambda t, k: f"found {_bullets(t)} bullet points, needs exactly {k['num_bullets']}",
        lambda d: {"num_bullets": d.rng.randint(2, 6)},
        lambda k: _needs(words=2 * k["num_bullets"]))
    library(
        "detectable_format:constrained_response", {},
        lambda t, k: ("gives one of the options" if _library_verdict("detectable_format:constrained_response")(t, k)
                      else "gives none of the options"),
        _no_params, synthesize=False)  # a yes/no/maybe answer fits none of the open-ended base tasks
    library(
        "detectable_format:number_highlighted_sections", {"num_highlights": "int"},
        lambda t, k: _relation_note(_highlights(t), "at least", k["num_highlights"], "*highlighted* sections"),
        lambda d: {"num_highlights": d.rng.randint(1, 4)},
        lambda k: _needs(words=2 * k["num_highlights"]))
    library(
        "detectable_format:multiple_sections", {"section_spliter": "str", "num_sections": "int"},
        lambda t, k: _relation_note(len(re.split(r"\s?" + re.escape(k["section_spliter"]) + r"\s?\d+\s?", t)) - 1,
                                    "at least", k["num_sections"], f"'{k['section_spliter']} X' sections"),
        lambda d: {"section_spliter": d.rng.choice(SECTION_SPLITTERS), "num_sections": d.rng.randint(2, 5)},
        lambda k: _needs(sentences=k["num_sections"]))
    library("detectable_format:json_format", {}, _observe_json, _no_params)
    library(
        "detectable_format:title", {},
        _observe_title,
        _no_params, lambda k: _needs(words=2))
    library("combination:two_responses", {}, _observe_two_responses, _no_params, lambda k: _needs(sentences=2))
    library(
        "combination:repeat_prompt", {"prompt_to_repeat": "str"},
        _observe_repeat,
        _no_params,  # the request is known only once the prompt is built: synthesis fills prompt_to_repeat
        lambda k: _needs(words=ifeval_util.count_words(k.get("prompt_to_repeat", "")),
                         sentences=_count_sentences(k.get("prompt_to_repeat", ""))),
        optional=frozenset({"prompt_to_repeat"}))
    library(
        "startend:end_checker", {"end_phrase": "str"},
        lambda t, k: f"ends with {_clip(t.strip()[-40:])!r}, needs {k['end_phrase']!r}",
        lambda d: {"end_phrase": d.rng.choice(END_PHRASES)},
        lambda k: _needs(sentences=1))
    c.append(Constraint(
        "change_case:capital_word_frequency", OURS, {"capital_frequency": "int", "capital_relation": "relation"},
        lambda t, k: _holds(_capital_words(t), k["capital_relation"], k["capital_frequency"]),
        lambda t, k: _relation_note(_capital_words(t), k["capital_relation"], k["capital_frequency"],
                                    "words in capital letters"),
        # "Less than" leaves room for the capitals other constraints bring (SECTION 1…5, P.S., "I").
        _relation_sampler("capital_frequency", "capital_relation", range(2, 9), range(10, 16)),
        _library_text("change_case:capital_word_frequency"),
        lambda k: (_needs(words=k["capital_frequency"]) if k["capital_relation"] == "at least" else Budget())))
    library("change_case:english_capital", {}, lambda t, k: _observe_case(t, upper=True), _no_params)
    library("change_case:english_lowercase", {}, lambda t, k: _observe_case(t, upper=False), _no_params)
    library("punctuation:no_comma", {}, lambda t, k: f"found {t.count(',')} commas", _no_params)
    library(
        "startend:quotation", {},
        lambda t, k: (f"starts with {t.strip()[:1]!r} and ends with {t.strip()[-1:]!r}" if t.strip()
                      else "the response is empty"),
        _no_params)
    c.append(Constraint(
        "startend:start_checker", OURS, {"start_phrase": "str"}, _start_verdict,
        lambda t, k: f"starts with {_clip(t.strip())!r}, needs {k['start_phrase']!r}",
        lambda d: {"start_phrase": d.rng.choice(START_PHRASES)},
        lambda k: f"Start your response with the phrase '{k['start_phrase']}'.",
        lambda k: _needs(words=len(k["start_phrase"].split()))))

    registry = {constraint.constraint_id: constraint for constraint in c}
    conflicts = _conflicts(registry)
    return {cid: _with_conflicts(constraint, conflicts[cid]) for cid, constraint in registry.items()}


def _with_conflicts(constraint: Constraint, conflicts: set[str]) -> Constraint:
    return replace(constraint, conflicts=frozenset(conflicts))


# Conflicts IFEval's table does not have: our start checker, and pairs whose words or formats contradict.
_EXTRA_CONFLICTS = {
    # Our start checker cannot share the response's opening with these.
    "startend:start_checker": {
        "combination:repeat_prompt", "combination:two_responses", "detectable_format:json_format",
        "detectable_format:constrained_response", "length_constraints:nth_paragraph_first_word",
        "language:response_language",
    },
    # IFEval's section marker is matched case-sensitively ("Section 1"): it cannot be all lowercase, and
    # "Section" cannot be all capitals.
    "detectable_format:multiple_sections": {
        "change_case:english_lowercase", "change_case:english_capital", "length_constraints:nth_paragraph_first_word",
    },
    # The first word of paragraph 1 would be the title or an English word in another language.
    "length_constraints:nth_paragraph_first_word": {"detectable_format:title", "language:response_language"},
    # A postscript at the end and "no words after this phrase" ask for two different endings.
    "startend:end_checker": {"detectable_content:postscript"},
    # The repeated request states its constraints with commas ("Include keywords ['a', 'b']").
    "combination:repeat_prompt": {"punctuation:no_comma"},
}


def _conflicts(registry: Mapping[str, Constraint]) -> dict[str, set[str]]:
    """IFEval's conflict table (copied: its conflict_make edits in place) plus ours, made symmetric."""
    ids = set(registry)
    conflicts = {cid: set(ifeval_registry.INSTRUCTION_CONFLICTS.get(cid, set())) & ids for cid in ids}
    # IFEval's table computes "conflicts with everything" from its own ids: ours belong in it too.
    conflicts["detectable_format:constrained_response"] = set(ids)
    for cid, extra in _EXTRA_CONFLICTS.items():
        conflicts[cid] |= extra
    for cid in list(conflicts):
        conflicts[cid].add(cid)
        for other in conflicts[cid]:
            conflicts[other].add(cid)
    return conflicts


CONSTRAINTS: dict[str, Constraint] = _constraints()


def constraint(constraint_id: str) -> Constraint:
    """Return the registered constraint `constraint_id`, or fail naming it and the known ids."""
    try:
        return CONSTRAINTS[constraint_id]
    except KeyError:
        known = ", ".join(sorted(CONSTRAINTS))
        raise ConstraintError(f"unknown constraint id {constraint_id!r} (known: {known})") from None


# --- parameters -----------------------------------------------------------------------------------


def _param_problem(kind: str, value: Any) -> str | None:
    if kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        return None if ok else f"must be a whole number >= 0, got {value!r}"
    if kind == "str":
        return None if isinstance(value, str) and value.strip() else f"must be a non-empty string, got {value!r}"
    if kind == "str_list":
        ok = isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value)
        return None if ok else f"must be a non-empty list of strings, got {value!r}"
    if kind == "relation":
        return None if value in RELATIONS else f"must be one of {list(RELATIONS)}, got {value!r}"
    if kind == "letter":
        ok = isinstance(value, str) and len(value) == 1 and not value.isspace()
        return None if ok else f"must be one character, got {value!r}"
    if kind == "language":
        codes = ifeval_util.LANGUAGE_CODES
        return None if value in codes else f"must be one of the codes {sorted(codes)}, got {value!r}"
    raise AssertionError(f"unknown parameter kind {kind!r}")


def normalize_kwargs(constraint_id: str, kwargs: Mapping[str, Any] | None) -> dict:
    """Return the kwargs of one constraint with null values dropped, or fail naming the bad parameter.

    IFEval's checkers invent a random value for a missing or invalid parameter; every one is required here instead,
    so a score never depends on a draw.
    """
    spec = constraint(constraint_id)
    given = {key: value for key, value in (kwargs or {}).items() if value is not None}
    unknown = sorted(set(given) - set(spec.params))
    if unknown:
        raise ConstraintError(f"{constraint_id}: unknown parameter {unknown[0]!r} "
                              f"(takes: {', '.join(spec.params) or 'none'})")
    for name, kind in spec.params.items():
        if name not in given:
            if name in spec.optional:
                continue
            raise ConstraintError(f"{constraint_id}: parameter {name!r} is missing")
        problem = _param_problem(kind, given[name])
        if problem:
            raise ConstraintError(f"{constraint_id}: parameter {name!r} {problem}")
    if constraint_id == "length_constraints:nth_paragraph_first_word" and not (
            1 <= given["nth_paragraph"] <= given["num_paragraphs"]):
        raise ConstraintError(f"{constraint_id}: parameter 'nth_paragraph' must be 1..num_paragraphs "
                              f"({given['num_paragraphs']}), got {given['nth_paragraph']}")
    return given


def combination_problem(constraint_ids: Sequence[str], kwargs_list: Sequence[Mapping[str, Any]]) -> str | None:
    """Say why these constraints cannot all be satisfied by one response (None when no conflict is known)."""
    for i, first in enumerate(constraint_ids):
        for second in constraint_ids[i + 1:]:
            if second in constraint(first).conflicts:
                return f"{first} conflicts with {second}"
    budgets = [constraint(cid).budget(dict(kwargs)) for cid, kwargs in zip(constraint_ids, kwargs_list)]
    problem = budget_problem(budgets)
    return f"{', '.join(constraint_ids)}: {problem}" if problem else None


# --- prompts --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IFPrompt:
    """A prompt with k verifiable constraints: its text, the task it starts from, and each constraint's kwargs."""

    text: str
    base_task: str  # for an IFEval file row: the whole prompt (IFEval does not separate the task)
    constraint_ids: tuple[str, ...]
    kwargs: tuple[dict, ...]  # one JSON-safe dict per constraint id, in the same order
    k: int
    source: str = "synthetic"
    source_row: int = 0

    def reference(self) -> str:
        """Return the constraints as canonical JSON: what a verifier needs besides the response and prompt."""
        return constraints_reference(self.constraint_ids, self.kwargs)


def constraints_reference(constraint_ids: Sequence[str], kwargs_list: Sequence[Mapping[str, Any]]) -> str:
    """Return canonical JSON of constraint ids and their kwargs (the inverse of parse_constraints_reference)."""
    return json.dumps({"constraint_ids": list(constraint_ids), "kwargs": [dict(k) for k in kwargs_list]},
                      sort_keys=True, ensure_ascii=False)


def parse_constraints_reference(reference: str) -> tuple[list[str], list[dict]]:
    """Return (constraint ids, kwargs list) of a reference written by constraints_reference."""
    try:
        parsed = json.loads(reference)
        ids, kwargs_list = parsed["constraint_ids"], parsed["kwargs"]
    except (ValueError, TypeError, KeyError) as exc:
        raise ConstraintError(f"not a constraints reference ({exc}): {_clip(reference, 80)!r}") from None
    if not isinstance(ids, list) or not isinstance(kwargs_list, list) or len(ids) != len(kwargs_list):
        raise ConstraintError(f"constraints reference needs equally long lists: {_clip(reference, 80)!r}")
    return ids, kwargs_list


def synthesize_if_prompts(count: int, *, k_min: int = 1, k_max: int = 3, seed: int = 0) -> list[IFPrompt]:
    """Return `count` prompts of a base task and k in k_min..k_max constraints that do not conflict.

    The same seed gives the same prompts, and prompt i depends only on (seed, i): asking for more keeps the first.
    """
    if not 1 <= k_min <= k_max <= MAX_K:
        raise ConstraintError(f"synthesis: need 1 <= k_min <= k_max <= {MAX_K}, got k_min={k_min}, k_max={k_max}")
    if count < 0:
        raise ConstraintError(f"synthesis: count must be >= 0, got {count}")
    return [_synthesize_one(random.Random(f"if-prompt:{seed}:{i}"), k_min, k_max, seed, i) for i in range(count)]


_ATTEMPTS = 200


def _synthesize_one(rng: random.Random, k_min: int, k_max: int, seed: int, row: int) -> IFPrompt:
    k = rng.randint(k_min, k_max)
    base_task = rng.choice(BASE_TASKS)
    candidates = sorted(cid for cid, spec in CONSTRAINTS.items() if spec.synthesize)
    for _ in range(_ATTEMPTS):
        drawn = _draw_constraints(rng, candidates, k)
        if drawn is not None:
            ids, kwargs_list = drawn
            return _compose(base_task, ids, kwargs_list, seed, row)
    raise ConstraintError(f"synthesis: found no {k} constraints that fit together in {_ATTEMPTS} attempts")


def _draw_constraints(rng: random.Random, candidates: list[str], k: int) -> tuple[list[str], list[dict]] | None:
    """Add constraints in random order while they fit with the ones chosen; None if fewer than k fit."""
    draw = _Draw(rng)
    order = list(candidates)
    rng.shuffle(order)
    ids: list[str] = []
    kwargs_list: list[dict] = []
    for cid in order:
        if len(ids) == k:
            break
        if any(cid in CONSTRAINTS[chosen].conflicts for chosen in ids):
            continue
        kwargs = CONSTRAINTS[cid].sample(draw)
        if cid != "combination:repeat_prompt" and combination_problem([*ids, cid], [*kwargs_list, kwargs]):
            continue
        ids.append(cid)
        kwargs_list.append(kwargs)
    return (ids, kwargs_list) if len(ids) == k else None


def _compose(base_task: str, ids: list[str], kwargs_list: list[dict], seed: int, row: int) -> IFPrompt:
    """The prompt text: the task, then each constraint's instruction; the repeat instruction last, since the
    request it asks to repeat is everything before it."""
    order = sorted(range(len(ids)), key=lambda i: ids[i] == "combination:repeat_prompt")
    ids, kwargs_list = [ids[i] for i in order], [kwargs_list[i] for i in order]
    lines = [base_task]
    for cid, kwargs in zip(ids, kwargs_list):
        if cid == "combination:repeat_prompt":
            kwargs["prompt_to_repeat"] = "\n".join(lines)
        lines.append(CONSTRAINTS[cid].describe(kwargs))
    return IFPrompt("\n".join(lines), base_task, tuple(ids), tuple(kwargs_list), len(ids), f"synthetic:s{seed}", row)


# --- scoring --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConstraintResult:
    """One checker's verdict on a response."""

    constraint_id: str
    satisfied: bool
    reason: str
    instruction: str  # the instruction text the prompt stated


@dataclass(frozen=True)
class ConstraintScore:
    """How well a response follows its prompt's constraints."""

    results: tuple[ConstraintResult, ...]
    fraction: float  # constraints satisfied / constraints
    strict: bool  # every constraint satisfied
    feedback: str = ""  # names the broken constraints, for a refinement turn

    @property
    def violated(self) -> tuple[str, ...]:
        return tuple(r.constraint_id for r in self.results if not r.satisfied)


def score_response(response: str, constraint_ids: Sequence[str], kwargs_list: Sequence[Mapping[str, Any] | None],
                   prompt_text: str = "") -> ConstraintScore:
    """Return every constraint's verdict on `response`, the fraction satisfied, the strict flag and feedback.

    `prompt_text` is the request that `combination:repeat_prompt` asks to repeat when its kwargs do not say it.
    """
    if not constraint_ids:
        raise ConstraintError("score_response: no constraints to check")
    if len(constraint_ids) != len(kwargs_list):
        raise ConstraintError(f"score_response: {len(constraint_ids)} constraint ids but {len(kwargs_list)} kwargs")
    results = []
    for cid, raw in zip(constraint_ids, kwargs_list):
        kwargs = normalize_kwargs(cid, raw)
        if cid == "combination:repeat_prompt" and "prompt_to_repeat" not in kwargs:
            if not prompt_text.strip():
                raise ConstraintError(f"{cid}: no prompt_to_repeat and no prompt text to repeat")
            kwargs["prompt_to_repeat"] = prompt_text
        spec = CONSTRAINTS[cid]
        satisfied, reason = spec.check(response, kwargs)
        results.append(ConstraintResult(cid, satisfied, reason, spec.describe(kwargs)))
    passed = sum(r.satisfied for r in results)
    return ConstraintScore(tuple(results), passed / len(results), passed == len(results), _feedback(results))


def _feedback(results: Sequence[ConstraintResult]) -> str:
    broken = [r for r in results if not r.satisfied]
    if not broken:
        return f"Your response follows all {len(results)} instructions."
    lines = [f"Your response does not follow {len(broken)} of the {len(results)} instructions:"]
    for r in broken:
        instruction = " ".join(r.instruction.split())
        lines.append(f"- {_clip(instruction, 160)} (yours: {r.reason})")
    return "\n".join(lines)


# --- IFEval-format files --------------------------------------------------------------------------


def if_prompt(where: str, prompt: str, ids: Sequence[str], kwargs_list: Any, source: str, row: int,
              kwargs_field: str = "kwargs") -> IFPrompt:
    """Return the IFEval-format row (`where`: its file and line or row) as a prompt with its constraints checked: every
    id known and one kwargs object (or none at all) per id, each with parameters its checker takes."""
    if kwargs_list is None:
        kwargs_list = [{} for _ in ids]
    if not isinstance(kwargs_list, list) or len(kwargs_list) != len(ids):
        raise SeedError(f"{where}: field {kwargs_field!r} must be a list of objects, one per instruction id "
                        f"({len(ids)}), got {_clip(repr(kwargs_list), 80)}")
    normalized = []
    for cid, kwargs in zip(ids, kwargs_list):
        if cid not in CONSTRAINTS:
            raise SeedError(f"{where}: unknown instruction id {cid!r} (known: {', '.join(sorted(CONSTRAINTS))})")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise SeedError(f"{where}: instruction {cid!r}: kwargs must be an object, "
                            f"got {_clip(repr(kwargs), 80)}")
        try:
            normalized.append(normalize_kwargs(cid, kwargs))
        except ConstraintError as exc:
            raise SeedError(f"{where}: instruction {exc}") from None
    text = prompt.strip()
    return IFPrompt(text, text, tuple(ids), tuple(normalized), len(ids), source, row)


__all__ = [
    "BASE_TASKS", "CONSTRAINTS", "Budget", "Constraint", "ConstraintError", "ConstraintResult", "ConstraintScore",
    "IFPrompt", "combination_problem", "constraint", "constraints_reference", "if_prompt", "normalize_kwargs",
    "parse_constraints_reference", "score_response", "synthesize_if_prompts",
]
