import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchard.config import SeedSource
from orchard.sandbox import SandboxConfig
from tasks.seed_files import SeedError
from tasks.seeds import (
    CODE_TEMPLATES,
    generate_arithmetic,
    generate_code_tasks,
    gsm8k_reference,
    load_gsm8k,
    load_humaneval,
    load_mbpp,
    load_seeds,
    plan_shards,
    read_seeds,
)
from tasks.verify import CORRECT, INCORRECT, check_code_answer


def test_generator_is_reproducible_and_distinct():
    first = generate_arithmetic(20, difficulty=2, seed=1)
    again = generate_arithmetic(20, difficulty=2, seed=1)
    other = generate_arithmetic(20, difficulty=2, seed=2)
    assert first == again
    assert len({i.instruction_id for i in first}) == 20
    assert first != other


def _solve(question: str) -> int:
    """Work out a generated problem's answer again from its text alone, one way per template."""
    numbers = [int(n) for n in re.findall(r"\d+", question)]
    if question.startswith("Compute "):
        expression = question.removeprefix("Compute ").removesuffix(".").replace("×", "*")
        assert re.fullmatch(r"[\d +*-]+", expression), question
        return eval(expression, {"__builtins__": {}})  # noqa: S307 - digits and + - * only (checked above)
    if " buys " in question and " bags with " in question:
        have, bags, each = numbers
        return have + bags * each
    if " shares " in question:
        total, friends, left = numbers
        assert (total - left) % friends == 0, question  # shared out exactly
        return (total - left) // friends
    if " notebooks at " in question:
        count, price, paid = numbers
        return paid - count * price
    if " km per hour " in question:
        speed, hours, extra = numbers
        return speed * hours + extra
    raise AssertionError(f"no template reads {question!r}")


@pytest.mark.parametrize("difficulty", [1, 3, 5])
def test_generated_answers_are_what_the_question_works_out_to(difficulty):
    items = generate_arithmetic(30, difficulty=difficulty, seed=9)
    for item in items:
        assert item.reference == str(_solve(item.text)), item.text  # a canonical integer, and the right one
        assert item.domain == "math" and item.difficulty == difficulty
    assert all(int(item.reference) > 0 for item in items if "change" in item.text)  # paid more than it cost


def test_difficulty_adds_steps():
    easy = [i.text for i in generate_arithmetic(5, difficulty=1, seed=0) if i.text.startswith("Compute")]
    hard = [i.text for i in generate_arithmetic(5, difficulty=4, seed=0) if i.text.startswith("Compute")]
    assert easy and hard
    assert max(t.count(" ") for t in easy) < min(t.count(" ") for t in hard)


def test_difficulty_out_of_range_is_refused():
    with pytest.raises(SeedError, match="difficulty"):
        generate_arithmetic(3, difficulty=9)


def test_gsm8k_reference_takes_the_text_after_the_marks():
    assert gsm8k_reference("She has 3+4=7 ...\n#### 1,234") == "1234"


def test_gsm8k_jsonl_loads_through_datasets(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text(
        "\n".join(json.dumps({"question": f"What is {i}+1?", "answer": f"{i}+1={i+1}\n#### {i+1}"}) for i in range(3))
    )
    loaded = load_gsm8k(path)
    assert [i.reference for i in loaded] == ["1", "2", "3"]
    assert [i.source_row for i in loaded] == [1, 2, 3]


def test_gsm8k_parquet_loads_through_datasets(tmp_path):
    path = tmp_path / "gsm8k.parquet"
    pq.write_table(pa.table({"question": ["What is 6*7?"], "answer": ["6*7=42\n#### 42"]}), path)
    assert load_gsm8k(path)[0].reference == "42"


def test_malformed_json_line_is_named(tmp_path):
    path = tmp_path / "seeds.jsonl"
    path.write_text('{"question": "a?", "answer": "#### 1"}\n{"question": "b?", "answer": \n')
    with pytest.raises(SeedError, match=r"seeds\.jsonl: line 2: not valid JSON"):
        load_gsm8k(path)


def test_a_line_that_is_not_utf8_is_named_with_its_byte_offset(tmp_path):
    path = tmp_path / "seeds.jsonl"
    first = '{"question": "a?", "answer": "#### 1"}\n'.encode()
    path.write_bytes(first + b'{"question": "caf\xe9?", "answer": "#### 2"}\n')  # Latin-1, not UTF-8
    with pytest.raises(SeedError) as raised:
        load_gsm8k(path)
    assert str(raised.value) == (f"{path}: line 2: not valid UTF-8 at byte 18 of the line (byte {len(first) + 18} of "
                                 "the file): invalid continuation byte")


def test_missing_field_is_named(tmp_path):
    path = tmp_path / "seeds.jsonl"
    path.write_text('{"question": "a?", "answer": "#### 1"}\n{"question": "b?"}\n')
    with pytest.raises(SeedError, match=r"line 2: field 'answer' is missing"):
        load_gsm8k(path)


def test_missing_field_in_parquet_names_the_row(tmp_path):
    path = tmp_path / "seeds.parquet"
    pq.write_table(pa.table({"question": ["a?", "b?"], "answer": ["#### 1", ""]}), path)
    with pytest.raises(SeedError, match=r"row 2: field 'answer'"):
        load_gsm8k(path)


def test_unknown_seed_kind_is_named():
    with pytest.raises(SeedError, match=r"seeds\[0\]\.kind"):
        load_seeds([SeedSource(kind="poetry")])


def test_shard_ids_follow_instructions_and_config():
    instructions = generate_arithmetic(10, seed=4)
    plans = plan_shards(instructions, per_shard=4, config_hash="abc")
    assert [len(p.instructions) for p in plans] == [4, 4, 2]
    assert plans == plan_shards(instructions, per_shard=4, config_hash="abc")
    assert plans[0].shard_id != plan_shards(instructions, per_shard=4, config_hash="abd")[0].shard_id



# --- code seeds -----------------------------------------------------------------------------------


def test_humaneval_ships_164_problems_whose_reference_runs_their_tests():
    problems = load_humaneval()
    assert len(problems) == 164
    first = problems[0]
    assert (first.domain, first.source, first.source_row, first.difficulty) == ("code", "humaneval:HumanEval/0", 1, 3)
    assert "def has_close_elements(numbers: List[float], threshold: float) -> bool:" in first.text
    assert first.reference.rstrip().endswith("check(has_close_elements)")
    assert "def check(candidate):" in first.reference
    assert len(load_humaneval(5)) == 5


def _mbpp_rows() -> list[dict]:
    return [
        {"task_id": 1, "text": "Write a function to add two numbers.", "code": "def add(a, b): return a + b",
         "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(-1, 1) == 0"],
         "test_setup_code": ""},
        {"task_id": 2, "text": "Write a function that returns the constant K.", "code": "def k(): return K",
         "test_list": ["assert k() == 7"], "test_setup_code": "K = 7"},
    ]


def test_mbpp_jsonl_loads_with_one_test_shown_and_all_tests_run(tmp_path):
    path = tmp_path / "mbpp.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in _mbpp_rows()))
    first, second = load_mbpp(path)
    assert first.domain == "code" and first.source_row == 1
    assert "assert add(1, 2) == 3" in first.text and "assert add(-1, 1) == 0" not in first.text
    assert first.reference.count("assert") == 3
    assert second.reference.startswith("K = 7\n")
    assert check_code_answer("```python\ndef add(a, b):\n    return a + b\n```", first.reference).verdict == CORRECT


def test_mbpp_parquet_loads_through_datasets(tmp_path):
    path = tmp_path / "mbpp.parquet"
    pq.write_table(pa.Table.from_pylist(_mbpp_rows()), path)
    assert [i.source_row for i in load_mbpp(path)] == [1, 2]


def test_mbpp_row_without_tests_is_named(tmp_path):
    path = tmp_path / "mbpp.jsonl"
    path.write_text(json.dumps(_mbpp_rows()[0]) + "\n" + json.dumps({"text": "Write f.", "test_list": []}) + "\n")
    with pytest.raises(SeedError, match=r"mbpp\.jsonl: line 2: field 'test_list' is missing"):
        load_mbpp(path)


def test_mbpp_parquet_row_without_text_is_named(tmp_path):
    path = tmp_path / "mbpp.parquet"
    rows = _mbpp_rows()
    rows[1]["text"] = ""
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(SeedError, match=r"row 2: field 'text'"):
        load_mbpp(path)


def test_code_generator_is_reproducible_and_distinct():
    first = generate_code_tasks(25, seed=1)
    assert first == generate_code_tasks(25, seed=1)
    assert first != generate_code_tasks(25, seed=2)
    assert len({i.instruction_id for i in first}) == 25
    assert {i.domain for i in first} == {"code"}


def test_every_code_template_asks_for_a_named_function_with_three_to_five_tests():
    tasks = generate_code_tasks(3 * len(CODE_TEMPLATES), seed=5)
    for task in tasks:
        name = task.text.split("`")[1].split("(")[0]
        asserts = task.reference.strip().splitlines()
        assert 3 <= len(asserts) <= 5
        assert all(line.startswith(f"assert {name}(") for line in asserts)
        # The example in the prompt is the first test.
        example_call, example_result = task.text.split("For example, `")[1].split("` returns `")
        assert asserts[0] == f"assert {example_call} == {example_result.rstrip('.`')}"


def test_code_difficulty_one_leaves_out_loops():
    assert {i.difficulty for i in generate_code_tasks(20, seed=0, difficulty=1)} == {1}
    assert {i.difficulty for i in generate_code_tasks(20, seed=0, difficulty=2)} == {1, 2}


def test_generated_code_tasks_pass_right_code_and_fail_wrong_code():
    limits = SandboxConfig(wall_timeout_s=5)
    by_name = {i.text.split("`")[1].split("(")[0]: i for i in generate_code_tasks(len(CODE_TEMPLATES), seed=3)}
    even = next(i for name, i in by_name.items() if "even" in name)
    name = even.text.split("`")[1].split("(")[0]
    right = f"```python\ndef {name}(n):\n    return n % 2 == 0\n```"
    always = f"```python\ndef {name}(n):\n    return True\n```"
    assert check_code_answer(right, even.reference, limits).verdict == CORRECT
    assert check_code_answer(always, even.reference, limits).verdict == INCORRECT  # both answers are tested


def test_code_seed_kinds_load():
    found = load_seeds([SeedSource(kind="code", count=4, seed=1), SeedSource(kind="humaneval", count=2)])
    assert [i.source.split(":")[0] for i in found] == ["code"] * 4 + ["humaneval"] * 2


def test_mbpp_source_needs_a_path():
    with pytest.raises(SeedError, match=r"seeds\[0\]: a mbpp source needs a path"):
        load_seeds([SeedSource(kind="mbpp")])


def _gsm8k_file(tmp_path, rows: int):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"}) + "\n"
                            for i in range(rows)))
    return path


def test_a_file_source_without_count_reads_every_row(tmp_path):
    path = _gsm8k_file(tmp_path, 11)
    instructions, (source,) = read_seeds([SeedSource(kind="gsm8k", path=str(path))])
    assert len(instructions) == 11
    assert (source.read, source.kept, source.dropped) == (11, 11, {})
    assert source.source == f"seeds[0] gsm8k {path}"


def test_seed_counts_say_what_count_and_duplicates_dropped(tmp_path):
    path = _gsm8k_file(tmp_path, 11)
    instructions, (first, second) = read_seeds([SeedSource(kind="gsm8k", path=str(path), count=4),
                                                SeedSource(kind="gsm8k", path=str(path))])
    assert len(instructions) == 11
    assert (first.read, first.kept, first.dropped) == (11, 4, {"beyond count": 7})
    assert (second.read, second.kept, second.dropped) == (11, 7, {"duplicate instruction id": 4})
    # The rows that went missing are exactly the ones the reasons account for.
    for source in (first, second):
        assert source.read - source.kept == sum(source.dropped.values())


def test_a_generator_without_count_is_refused_with_the_field():
    with pytest.raises(SeedError, match=r"seeds\[0\]\.count: a generated source \(arithmetic\) needs a count"):
        read_seeds([SeedSource(kind="arithmetic")])
