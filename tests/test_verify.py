import pytest

from tasks.verify import CORRECT, INCORRECT, UNPARSABLE, MathVerifier, answer_span, check_math_answer


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


def test_verifier_pool_checks_in_worker_processes_in_order():
    items = [(f"Answer: {n}", str(n if n % 2 else n + 1)) for n in range(6)]
    with MathVerifier(workers=2) as verifier:
        verdicts = verifier.check(items)
    assert [v.verdict for v in verdicts] == [INCORRECT, CORRECT] * 3
