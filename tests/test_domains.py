"""The domain registry (schemas/domains.py): complete for every seed kind, every entry whole, one way to read an
answer for the verifiers and error injection alike."""

import dataclasses
import json

import pytest

from orchard.config import ConfigError, RunConfig, SeedSource, load_config
from schemas.domains import (
    CODE_VERIFIER,
    DOMAINS,
    FENCE,
    MATH_VERIFIER,
    WHOLE_TEXT,
    Domain,
    answer_span,
    code_region,
    extract_code,
    final_answer_region,
)
from schemas.suites import SUITES_DIR
from tasks import turns
from tasks.inject import EDIT_RULES
from tasks.seeds import SEED_KINDS, read_seeds
from tasks.verify import WORKER_VERIFIERS

# --- complete ------------------------------------------------------------------------------------------------------


def _sources(tmp_path) -> list[SeedSource]:
    """One small source of every seed kind."""
    gsm8k, mbpp, ifeval = tmp_path / "gsm8k.jsonl", tmp_path / "mbpp.jsonl", tmp_path / "ifeval.jsonl"
    gsm8k.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "1 + 1 = 2\n#### 2"}) + "\n")
    mbpp.write_text(json.dumps({"text": "Write add(a, b).", "test_list": ["assert add(1, 2) == 3"]}) + "\n")
    ifeval.write_text(json.dumps({"key": 1, "prompt": "Write a haiku. Do not use any commas.",
                                  "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}) + "\n")
    return [SeedSource(kind="arithmetic", count=1), SeedSource(kind="gsm8k", path=str(gsm8k)),
            SeedSource(kind="code", count=1), SeedSource(kind="humaneval", count=1),
            SeedSource(kind="mbpp", path=str(mbpp)), SeedSource(kind="if_synth", count=1),
            SeedSource(kind="ifeval", path=str(ifeval)), SeedSource(kind="open_ended", count=1),
            SeedSource(kind="dataset", path=str(mbpp))]


def test_every_domain_a_seed_kind_makes_has_an_entry(tmp_path):
    sources = _sources(tmp_path)
    assert sorted(s.kind for s in sources) == sorted(SEED_KINDS), "a new seed kind needs a source here"
    made = {source.kind: {i.domain for i in read_seeds([source])[0]} for source in sources}
    assert all(len(domains) == 1 for domains in made.values()), made
    assert {domain for domains in made.values() for domain in domains} == set(DOMAINS)


@pytest.mark.parametrize("name", [name for name, domain in DOMAINS.items() if not domain.judged])
def test_a_verified_domain_has_strategies_with_prompts_and_a_run_setting_for_them(name):
    domain = DOMAINS[name]
    assert domain.strategies and all(text.strip() for text in domain.strategies.values())
    assert "{strategy}" in domain.system and "{format}" in domain.system
    assert domain.answer_format.strip() and "{reference}" in domain.critic_reference
    assert domain.verifier in (*WORKER_VERIFIERS, CODE_VERIFIER)  # a verifier tasks/verify.py runs
    assert domain.searchable
    if domain.strategies_setting:
        default = getattr(RunConfig(), domain.strategies_setting)  # a run setting that exists
        assert default and set(default) <= set(domain.strategies)


def test_a_domain_without_a_run_setting_of_its_own_uses_all_its_strategies(monkeypatch):
    poetry = Domain("poetry", MATH_VERIFIER, WHOLE_TEXT, {"rhyme": "Rhyme.", "free": "Do not rhyme."},
                    system="You are a poet. {strategy} {format}", answer_format="Reply with the poem only.",
                    critic_reference="A good poem: {reference}")
    monkeypatch.setattr(turns, "DOMAINS", {**DOMAINS, "poetry": poetry})
    assert turns.strategies_for(RunConfig(), "poetry") == ("rhyme", "free")
    assert turns.strategies_for(RunConfig(code_strategies=("direct",)), "code") == ("direct",)


@pytest.mark.parametrize("name", [name for name, domain in DOMAINS.items() if domain.judged])
def test_a_judged_domain_is_grown_under_principles_only(name):
    domain = DOMAINS[name]
    assert domain.verifier is None and not domain.strategies and not domain.strategies_setting
    assert not domain.searchable and not domain.hard_negatives
    # A section built directly raises pydantic's ValidationError (a ValueError); load_config turns it into a ConfigError.
    with pytest.raises(ValueError, match=f"run.mcts_domains: {name} has no verifier to search with"):
        RunConfig(mcts_domains=("math", name))


def test_an_unknown_domain_to_search_is_named_with_the_known_ones(tmp_path):
    path = tmp_path / "orchard.toml"
    path.write_text('[run]\nmcts_domains = ["maths"]\n')
    with pytest.raises(ConfigError, match="run.mcts_domains: unknown domain 'maths'; the domains are math, code"):
        load_config(path, environ={})


def test_hard_negatives_are_made_only_where_error_injection_has_edit_rules():
    assert [name for name, domain in DOMAINS.items() if domain.hard_negatives] == ["math", "code"]
    assert all(domain.answer in EDIT_RULES for domain in DOMAINS.values() if domain.hard_negatives)


def test_an_entry_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DOMAINS["math"].verifier = None
    with pytest.raises(TypeError):
        DOMAINS["math"].strategies["guess"] = "Guess."
    with pytest.raises(TypeError):
        DOMAINS["poetry"] = DOMAINS["math"]


@pytest.mark.parametrize("suite", ["instructions", "trees", "pairs"])
def test_the_suites_accept_exactly_the_registered_domains(suite):
    spec = json.loads((SUITES_DIR / f"{suite}.json").read_text())
    (value_set,) = [e["kwargs"]["value_set"] for e in spec["expectations"]
                    if e["type"] == "expect_column_values_to_be_in_set" and e["kwargs"]["column"] == "domain"]
    assert value_set == list(DOMAINS)


# --- one way to read an answer ---------------------------------------------------------------------------------------

# What the two copies of the answer-line pattern (tasks/verify.py and tasks/inject.py) read, before they became one.
ANSWER_LINES = [
    ("Answer: 3\nwait, no.\nAnswer: 4", "4"),  # the last line wins
    ("So 6 × 8 = 48 apples.\nAnswer: 48", "48"),
    ("ANSWER IS: 9", "9"),  # any case, "is" allowed
    ("answer = 5 apples", "5 apples"),
    ("  Answer:   7  \n", "7"),
    ("The answer is 12", "The answer is 12"),  # no ':' or '=': no answer line, the whole text is read
    ("I do not know.", "I do not know."),
]


@pytest.mark.parametrize("text, answer", ANSWER_LINES)
def test_the_verifier_reads_the_last_answer_line_where_error_injection_edits(text, answer):
    assert answer_span(text) == answer
    start, end = final_answer_region(text)
    assert text[start:end].strip() == answer.strip()


# What the two copies of the fence pattern read (tasks/verify.py: extract_code; tasks/inject.py: the code region).
FENCED = [
    ("Here it is:\n```python\ndef f():\n    return 1\n```\nDone.", "def f():\n    return 1"),
    ("```python\nx = 1\n```\nBetter:\n```python\nx = 2\n```", "x = 2"),  # the last python block
    ("```py\na = 1\n```\n```\nb = 2\n```", "a = 1"),  # a python block before a later untagged one
    ("```Python3 extra words\nc = 3\n```", "c = 3"),  # tags in any case; the rest of the fence line is not code
    ("```c++\nint x;\n```\n```\nz = 0\n```", "z = 0"),  # no python block: the last untagged one
    ("```python\ndef f():\n    return 1\n", "def f():\n    return 1"),  # ran out of tokens before the fence closed
    ("\n\ndef g(): pass\n\n", "def g(): pass"),  # no fence: the whole text
]


@pytest.mark.parametrize("text, code", FENCED)
def test_the_sandbox_runs_the_code_error_injection_edits(text, code):
    assert extract_code(text) == code
    start, end = code_region(text)
    assert text[start:end].strip("\n") == code


def test_an_answer_whose_only_blocks_are_another_language_has_no_code():
    text = "```bash\necho 1 > 2\n```"
    assert extract_code(text) == "" and code_region(text) is None
    assert [tag for tag, _ in FENCE.findall(text)] == ["bash"]
