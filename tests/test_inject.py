import ast
import random

import pytest

from schemas.domains import answer_span, extract_code
from tasks.inject import Edit, edit_distance, error_candidates
from tasks.verify import INCORRECT, check_math_answer

KINDS = {"number", "off_by_one", "operator", "comparison", "condition", "boolean"}

MATH = "Tom has 6 boxes with 8 apples each.\nSo he has 6 × 8 = 48 apples.\nAnswer: 48"

COUNT_ABOVE = '''Count the items above k:

```python
def count_above(xs, k):
    return sum(1 for x in xs if x > k)
```

It counts x > k once each.'''

BODY = '''Here is my solution, "a > b" style:
```python
def score(xs, k=0, *args):
    """Sum of x > k, less 1 == 1."""  # k > 0 and True
    total = 0
    for i in range(len(xs)):
        if xs[i] > k and True:
            total += xs[i] * 2
    return total // 2
```
Note: k > 0 and True.'''


def _levenshtein(a: str, b: str) -> int:
    """The textbook DP on the whole strings: the reference the trimmed one must agree with."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _outside_code(text: str) -> tuple[str, str]:
    start = text.index("```python\n") + len("```python\n")
    end = text.rindex("```")
    return text[:start], text[end:]


def _defined(code: str, name: str):
    namespace: dict = {}
    exec(code, namespace)  # our own test code, not a model's: no sandbox needed here
    return namespace[name]


# --- edit distance ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "a, b, distance",
    [
        ("kitten", "sitting", 3),
        ("", "", 0),
        ("", "abc", 3),
        ("abc", "", 3),
        ("same text", "same text", 0),
        ("abc", "abcd", 1),  # shared prefix
        ("xabc", "abc", 1),  # shared suffix
        ("abcabc", "abc", 3),  # prefix and suffix overlap
        ("flaw", "lawn", 2),
        ("intention", "execution", 5),
    ],
)
def test_edit_distance_matches_hand_computed_values(a, b, distance):
    assert edit_distance(a, b) == distance
    assert edit_distance(b, a) == distance


def test_edit_distance_of_one_change_in_a_long_text_is_one():
    text = "step " * 400 + "Answer: 48"
    assert edit_distance(text, text.replace("48", "49")) == 1
    assert edit_distance(text, text[:1000] + text[1001:]) == 1


def test_trimming_prefix_and_suffix_keeps_the_distance_exact():
    rng = random.Random(0)
    for _ in range(300):
        a = "".join(rng.choice("ab") for _ in range(rng.randrange(9)))
        b = "".join(rng.choice("ab") for _ in range(rng.randrange(9)))
        assert edit_distance(a, b) == _levenshtein(a, b), (a, b)


# --- math -------------------------------------------------------------------------------------------------------


def test_final_answer_off_by_one_comes_first_and_changes_only_that_number():
    first = error_candidates(MATH, "math")[0]
    assert first.kind == "off_by_one"
    assert first.text in {MATH[:-2] + "47", MATH[:-2] + "49"}
    assert first.edit_distance == 1
    assert answer_span(first.text) in {"47", "49"}  # where the verifier reads the answer
    assert "48 -> " in first.description and "Answer: 48" in first.description


def test_math_candidates_go_off_by_one_then_slips_then_operator_swaps():
    edits = error_candidates(MATH, "math", limit=20)
    assert [edit.kind for edit in edits] == ["off_by_one", "off_by_one", "number", "number", "operator"]
    assert {edit.text.rsplit("Answer: ", 1)[1] for edit in edits[:4]} == {"47", "49", "84", "480"}
    # the swapped computation, its result and the answer move together
    assert edits[-1].text == "Tom has 6 boxes with 8 apples each.\nSo he has 6 + 8 = 14 apples.\nAnswer: 14"


def test_math_verify_judges_every_math_candidate_wrong():
    assert check_math_answer(MATH, "48").verdict != INCORRECT
    for edit in error_candidates(MATH, "math", limit=20):
        assert check_math_answer(edit.text, "48").verdict == INCORRECT, edit.description


def test_math_without_answer_line_edits_the_last_number():
    edits = error_candidates("3 bags of 4 make 12", "math")
    assert edits[0].text in {"3 bags of 4 make 11", "3 bags of 4 make 13"}


def test_math_answer_keeps_its_thousands_separator():
    texts = {edit.text for edit in error_candidates("Answer: 1,234 apples", "math", limit=20)}
    assert {"Answer: 1,233 apples", "Answer: 1,235 apples", "Answer: 12,340 apples"} <= texts


def test_text_without_numbers_has_no_math_candidates():
    assert error_candidates("I do not know.", "math") == []


def test_candidates_are_a_function_of_text_domain_and_seed():
    for domain, text in (("math", MATH), ("code", BODY)):
        assert error_candidates(text, domain, seed=3) == error_candidates(text, domain, seed=3)
    # the seed only picks between equally good slips, here n+1 or n-1 first
    firsts = {error_candidates(MATH, "math", seed=seed)[0].text for seed in range(20)}
    assert firsts == {MATH[:-2] + "47", MATH[:-2] + "49"}


# --- code -------------------------------------------------------------------------------------------------------


def test_comparison_swap_comes_first_and_only_the_code_changes():
    edits = error_candidates(COUNT_ABOVE, "code")
    assert edits[0].kind == "comparison"
    assert "x >= k" in edits[0].text and edits[0].edit_distance == 1
    for edit in edits:
        assert _outside_code(edit.text) == _outside_code(COUNT_ABOVE)
        assert "def count_above(xs, k):\n" in edit.text


def test_edited_comparison_is_really_wrong():
    original = _defined(extract_code(COUNT_ABOVE), "count_above")
    edited = _defined(extract_code(error_candidates(COUNT_ABOVE, "code")[0].text), "count_above")
    cases = [([1, 2, 3], 2), ([5, 5], 5), ([], 0)]
    assert [original(*case) for case in cases] == [1, 0, 0]
    assert [edited(*case) for case in cases] == [2, 2, 0]


def test_code_candidates_cover_every_kind_and_never_touch_strings_comments_or_signature():
    edits = error_candidates(BODY, "code", limit=100)
    assert {edit.kind for edit in edits} == {"comparison", "off_by_one", "operator", "condition", "boolean"}
    texts = {edit.text for edit in edits}
    assert BODY.replace("range(len(xs))", "range(len(xs) + 1)") in texts
    assert BODY.replace("if xs[i] > k and True:", "if not (xs[i] > k and True):") in texts
    assert BODY.replace("return total // 2", "return total / 2") in texts
    for edit in edits:
        assert edit.text.startswith(BODY.split("    total = 0")[0])  # prose, signature, docstring, comment
        assert edit.text.endswith("```\nNote: k > 0 and True.")
        assert "*args" in edit.text
        ast.parse(extract_code(edit.text))


def test_kinds_come_in_priority_order_then_by_position():
    edits = error_candidates(BODY, "code", limit=100)
    order = ["comparison", "off_by_one", "operator", "condition", "boolean"]
    assert [edit.kind for edit in edits] == sorted((edit.kind for edit in edits), key=order.index)


def test_only_the_block_the_verifier_runs_is_edited():
    text = "For example:\n```python\nprint(1 < 2)\n```\nMy answer:\n```python\ndef f(x):\n    return x + 1\n```"
    for edit in error_candidates(text, "code"):
        assert edit.text.startswith("For example:\n```python\nprint(1 < 2)\n```\nMy answer:\n")
        assert extract_code(edit.text) != extract_code(text)


@pytest.mark.parametrize("domain, text", [("math", MATH), ("code", BODY), ("code", COUNT_ABOVE)])
def test_candidates_are_distinct_wrong_texts_with_exact_distances(domain, text):
    edits = error_candidates(text, domain, limit=100)
    assert edits and all(isinstance(edit, Edit) for edit in edits)
    assert len({edit.text for edit in edits}) == len(edits)
    assert text not in {edit.text for edit in edits}
    for edit in edits:
        assert edit.kind in KINDS
        assert edit.edit_distance == edit_distance(text, edit.text) > 0


def test_limit_is_respected():
    assert len(error_candidates(BODY, "code", limit=3)) == 3
    assert len(error_candidates(MATH, "math", limit=1)) == 1
    assert error_candidates(BODY, "code", limit=0) == []


@pytest.mark.parametrize(
    "domain, text",
    [
        ("instruction_following", MATH),
        ("code", '```python\ndef f(x):\n    return """never closed\n```'),  # does not tokenize
        ("code", "```python\ndef f(x:\n    return x\n```"),  # does not parse
        ("code", "```bash\necho 1 > 2\n```"),  # no Python for the verifier to run
    ],
)
def test_no_candidates_where_there_is_nothing_sound_to_edit(domain, text):
    assert error_candidates(text, domain) == []
