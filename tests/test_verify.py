import asyncio

import pytest

from builders import instruction
from orchard.sandbox import SandboxConfig
from schemas.domains import answer_span, extract_code
from tasks.verify import (
    CORRECT,
    INCORRECT,
    UNPARSABLE,
    VerificationError,
    Verifiers,
    check_code_answer,
    check_math_answer,
)


@pytest.fixture(scope="module")
def verifiers():
    """One set of pools for the module: a worker process loads math-verify, nltk and langdetect's profiles once,
    which takes seconds."""
    with Verifiers(workers=2) as shared:
        yield shared


@pytest.mark.parametrize(
    "text, reference, verdict",
    [
        ("12 × 7 = 84\nAnswer: 84", "84", CORRECT),
        ("12 × 7 = 88\nAnswer: 88", "84", INCORRECT),
        ("The answer is $\\boxed{-3}$", "-3", CORRECT),
        ("Answer: 1,234 apples", "1234", CORRECT),
        ("Answer: 0.5", "1/2", CORRECT),
        ("I am not sure.", "84", UNPARSABLE),
    ],
)
def test_math_answers_are_checked_by_math_verify(text, reference, verdict):
    result = check_math_answer(text, reference)
    assert result.verdict == verdict
    assert result.verifier == "math_verify"
    assert result.score == (1.0 if verdict == CORRECT else 0.0)
    assert reference in result.detail


def test_last_answer_line_wins():
    assert answer_span("Answer: 3\nwait, no.\nAnswer: 4") == "4"


def test_verifiers_return_math_verdicts_in_the_order_of_the_items(verifiers):
    items = [(instruction(reference=str(n if n % 2 else n + 1)), f"Answer: {n}") for n in range(6)]
    verdicts = verifiers.check(items)
    assert [v.verdict for v in verdicts] == [INCORRECT, CORRECT] * 3


# --- code answers and the dispatcher ------------------------------------------------------------

ADD_TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


@pytest.mark.parametrize(
    "text, code",
    [
        ("Here it is:\n```python\ndef f():\n    return 1\n```\nDone.", "def f():\n    return 1"),
        ("```python\nx = 1\n```\nBetter:\n```python\nx = 2\n```", "x = 2"),
        ("```\nx = 1\n```", "x = 1"),
        ("```python\ndef f():\n    return 1\n", "def f():\n    return 1"),  # ran out of tokens before the fence closed
        ("def f(): return 1", "def f(): return 1"),
        ("```text\nno code here\n```", ""),
    ],
)
def test_code_is_the_last_python_block_else_the_whole_text(text, code):
    assert extract_code(text) == code


def test_right_code_passes_and_wrong_code_fails_with_the_failing_test():
    right = check_code_answer("```python\ndef add(a, b):\n    return a + b\n```", ADD_TESTS)
    wrong = check_code_answer("```python\ndef add(a, b):\n    return a * b\n```", ADD_TESTS)
    assert (right.verdict, right.score, right.verifier, right.exit_code) == (CORRECT, 1.0, "sandbox_tests", 0)
    assert (wrong.verdict, wrong.failure_reason, wrong.exit_code) == (INCORRECT, "AssertionError", 1)
    assert "Failing test: assert add(2, 3) == 5" in wrong.feedback
    assert "add(-1, 1)" not in wrong.feedback  # the tests that did not run stay hidden


def test_answer_without_code_is_unparsable():
    verdict = check_code_answer("I would use a loop.\n```text\nsorry\n```", ADD_TESTS)
    assert (verdict.verdict, verdict.failure_reason) == (UNPARSABLE, "no code found")


def test_syntax_error_is_named():
    verdict = check_code_answer("```python\ndef add(a, b)\n    return a + b\n```", ADD_TESTS)
    assert verdict.failure_reason == "SyntaxError"
    assert "SyntaxError" in verdict.feedback


def test_verifiers_route_mixed_math_and_code_in_order(verifiers):
    math_item = instruction("Compute 2 × 3.", "6")
    code_item = instruction("Write add(a, b).", ADD_TESTS, domain="code")
    right_code = "```python\ndef add(a, b):\n    return a + b\n```"
    wrong_code = "```python\ndef add(a, b):\n    return 0\n```"
    items = [(math_item, "Answer: 6"), (code_item, wrong_code), (math_item, "Answer: 7"), (code_item, right_code),
             (code_item, right_code), (math_item, "Answer: 6")]
    verdicts = verifiers.check(items)
    assert [v.verdict for v in verdicts] == [CORRECT, INCORRECT, INCORRECT, CORRECT, CORRECT, CORRECT]
    assert [v.verifier for v in verdicts] == ["math_verify", "sandbox_tests", "math_verify", "sandbox_tests",
                                              "sandbox_tests", "math_verify"]


def test_math_only_runs_need_no_sandbox(tmp_path):
    no_bwrap = SandboxConfig(bwrap=str(tmp_path / "no-such-bwrap"))
    with Verifiers(workers=1, sandbox=no_bwrap) as verifiers:
        assert [v.verdict for v in verifiers.check([(instruction(), "Answer: 6")])] == [CORRECT]


def test_unknown_domain_is_refused_by_name(verifiers):
    poem = instruction("Write a poem.", "", domain="open_ended")
    with pytest.raises(VerificationError, match=r"domain 'open_ended'"):
        verifiers.check([(instruction(), "Answer: 6"), (poem, "Roses are red.")])


# --- instruction following: scored by the constraint checkers -------------------------------------

def test_instruction_following_answers_score_the_fraction_of_constraints_kept(verifiers):
    from schemas.plan import Instruction, instruction_id
    from tasks.constraints import constraints_reference

    reference = constraints_reference(["punctuation:no_comma", "change_case:english_lowercase"], [{}, {}])
    text = "Describe the sea. Do not use commas. Use only lowercase letters."
    ins = Instruction(instruction_id("instruction_following", text, reference), "instruction_following", "test", 1,
                      text, reference, 2)
    kept, half, none = verifiers.check([(ins, "the sea is wide and blue"), (ins, "the sea, wide and blue"),
                                        (ins, "The sea, wide and blue")])
    assert (kept.verdict, kept.score, kept.verifier) == ("correct", 1.0, "if_constraints")
    assert (half.verdict, half.score, half.failure_reason) == ("incorrect", 0.5, "punctuation:no_comma")
    assert none.score == 0.0 and "english_lowercase" in none.detail
    assert none.feedback and "Every constraint" not in none.feedback


def test_synthesized_instruction_following_seeds_carry_k_as_difficulty():
    from orchard.config import SeedSource
    from tasks.seeds import load_seeds

    seeds = load_seeds([SeedSource(kind="if_synth", count=5, difficulty=3, seed=1)])
    assert len(seeds) == 5
    assert all(s.domain == "instruction_following" and 1 <= s.difficulty <= 3 for s in seeds)
    assert seeds == load_seeds([SeedSource(kind="if_synth", count=5, difficulty=3, seed=1)])


def _if_instruction(constraint_ids: list[str], kwargs: list[dict], text: str):
    from schemas.plan import Instruction, instruction_id
    from tasks.constraints import constraints_reference

    reference = constraints_reference(constraint_ids, kwargs)
    return Instruction(instruction_id("instruction_following", text, reference), "instruction_following", "test", 1,
                       text, reference, 2)


def test_instruction_following_is_checked_in_a_worker_process_not_the_callers(verifiers, monkeypatch):
    import tasks.constraints
    import tasks.verify

    ins = _if_instruction(["language:response_language", "punctuation:no_comma"], [{"language": "fr"}, {}],
                          "Describe the sea in French without commas.")
    called_here = []

    def not_in_the_caller(*args, **kwargs):
        called_here.append(args)
        raise AssertionError("a constraint check ran in the calling process")

    # Spawned workers import these modules afresh: only a check in this process would meet the replacements.
    for module, name in [(tasks.constraints, "score_response"), (tasks.verify, "check_constraints_answer"),
                         (tasks.verify, "check_math_answer")]:
        monkeypatch.setattr(module, name, not_in_the_caller)
    kept, broken = verifiers.check([(ins, "La mer est grande et bleue et les vagues viennent sur la plage."),
                                    (ins, "The sea is wide, blue and calm under the evening sun.")])
    (again,) = asyncio.run(verifiers.verify([(ins, "The sea is wide, blue and calm under the evening sun.")]))
    assert called_here == []
    assert (kept.verdict, kept.score) == (CORRECT, 1.0)
    assert (broken.verdict, broken.score) == (INCORRECT, 0.0)
    assert "language:response_language" in broken.failure_reason
    assert again == broken


def test_language_checks_are_deterministic_across_worker_processes(verifiers):
    from tasks.verify import check_constraints_answer

    ins = _if_instruction(["language:response_language"], [{"language": "de"}], "Describe the sea in German.")
    # Mixed languages: langdetect's random sampling could tip either way here without its fixed seed.
    mixed = "Das Meer ist the sea, and die Wellen come to the beach und gehen zurück."
    here = check_constraints_answer(mixed, ins.reference, ins.text)
    assert verifiers.check([(ins, mixed)] * 8) == [here] * 8


def test_many_coroutines_verifying_at_once_get_the_verdicts_of_check(verifiers):
    math_item = instruction("Compute 2 × 3.", "6")
    code_item = instruction("Write add(a, b).", ADD_TESTS, domain="code")
    if_item = _if_instruction(["punctuation:no_comma", "change_case:english_lowercase"], [{}, {}],
                              "Describe the sea. Do not use commas. Use only lowercase letters.")
    items = [(math_item, "Answer: 6"), (math_item, "Answer: 7"), (if_item, "the sea is wide and blue"),
             (if_item, "The sea, wide and blue"), (code_item, "```python\ndef add(a, b):\n    return a + b\n```"),
             (code_item, "```python\ndef add(a, b):\n    return 0\n```")]
    # One tree's batch per coroutine: hundreds of math and IF trees, a few code trees, on one loop.
    batches = [[items[k % 4], items[(k + 1) % 4]] for k in range(200)] + [[items[4 + k % 2]] for k in range(6)]

    async def trees(verifiers: Verifiers) -> list[list]:
        return await asyncio.gather(*(verifiers.verify(batch) for batch in batches))

    expected = dict(zip(range(len(items)), verifiers.check(items)))
    verified = asyncio.run(trees(verifiers))
    by_item = {id(item): expected[i] for i, item in enumerate(items)}
    assert verified == [[by_item[id(item)] for item in batch] for batch in batches]
    assert [v.verdict for v in expected.values()] == [CORRECT, INCORRECT, CORRECT, INCORRECT, CORRECT, INCORRECT]


def test_verify_refuses_an_unknown_domain_before_anything_runs(verifiers):
    poem = instruction("Write a poem.", "", domain="open_ended")
    with pytest.raises(VerificationError, match=r"domain 'open_ended'"):
        asyncio.run(verifiers.verify([(instruction(), "Answer: 6"), (poem, "Roses are red.")]))
