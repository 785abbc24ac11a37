"""Seeds from a user's own data (`kind = "dataset"`, tasks/dataset_seeds.py): outside layouts read through the real
loader and checked by the real verifiers, and one-line errors that name the file, the row and the field."""

from __future__ import annotations

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.cli import main
from orchard.config import Config, SeedSource
from tasks.dataset_seeds import MULTI_TURN, final_answer, last_boxed, load_dataset_seeds
from tasks.seed_files import SeedError
from tasks.seeds import read_seeds
from tasks.verify import CORRECT, INCORRECT, check_answer, check_code_answer

MATH_ROWS = [
    {"problem": "What is $\\frac{1}{4} + \\frac{1}{4}$?", "level": "Level 1", "type": "Prealgebra",
     "solution": "Add the numerators: $\\frac{2}{4} = \\boxed{\\frac{1}{2}}$."},
    {"problem": "Simplify $\\sqrt{12}$.", "level": "Level 2", "type": "Algebra",
     "solution": "$\\sqrt{12} = \\sqrt{4 \\cdot 3} = \\boxed{2\\sqrt{3}}$."},
    {"problem": "Solve $x - 3 \\le 0$. Give your answer in interval notation.", "level": "Level 3", "type": "Algebra",
     "solution": "So $x \\le 3$, that is $x \\in \\boxed{(-\\infty, 3]}$."},
]


def dataset(path, **options) -> SeedSource:
    return SeedSource(kind="dataset", path=str(path), **options)


def jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_boxed_answers_are_read_with_their_braces_matched():
    assert last_boxed("so \\boxed{\\frac{1}{2}} and then \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.") == \
        "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert last_boxed("the answer is \\boxed 5.") == "5."
    assert last_boxed("no box here") is None
    assert final_answer("She has 3+4=7\n#### 1,234", "auto") == "1234"
    assert final_answer("$\\frac{3}{4}$", "plain") == "\\frac{3}{4}"
    assert final_answer("a worked solution without a final mark", "auto", whole=True) is None


def test_a_math_file_with_boxed_solutions_is_checked_by_math_verify_as_latex(tmp_path):
    path = jsonl(tmp_path / "math.jsonl", MATH_ROWS)
    rows = load_dataset_seeds(dataset(path, columns={"difficulty": "level"}))
    half, root, interval = rows.instructions
    assert [i.domain for i in rows.instructions] == ["math"] * 3 and rows.read == 3 and not rows.dropped
    assert (half.reference, root.reference, interval.reference) == ("\\frac{1}{2}", "2\\sqrt{3}", "(-\\infty, 3]")
    assert [i.difficulty for i in rows.instructions] == [1, 2, 3] and half.text == MATH_ROWS[0]["problem"]
    assert (half.source, half.source_row) == (path, 1)
    for instruction, right, wrong in ((half, "Answer: 1/2", "Answer: 0.25"),
                                      (root, "Answer: $2\\sqrt{3}$", "Answer: $3\\sqrt{2}$"),
                                      (interval, "Answer: $(-\\infty, 3]$", "Answer: $(-\\infty, 3)$")):
        assert check_answer("math", right, instruction.reference).verdict == CORRECT, right
        assert check_answer("math", wrong, instruction.reference).verdict == INCORRECT, wrong


def test_a_chat_format_parquet_gives_its_user_turn_and_the_answer_in_its_assistant_turn(tmp_path):
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"messages": [{"role": "system", "content": "You are a careful tutor."},
                      {"role": "user", "content": "What is 7 times 6?"},
                      {"role": "assistant", "content": "7 x 6 = 42, so the answer is \\boxed{42}."}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                      {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "\\boxed{4}"}]},
    ]), path)
    rows = load_dataset_seeds(dataset(path, domain="math"))
    (only,) = rows.instructions
    assert only.text == "You are a careful tutor.\n\nWhat is 7 times 6?" and only.reference == "42"
    assert rows.read == 2 and rows.dropped == {MULTI_TURN: 1}
    assert check_answer("math", "Answer: 42", only.reference).verdict == CORRECT


def test_a_save_to_disk_folder_is_read_by_split_and_an_unknown_split_lists_the_splits(tmp_path):
    folder = tmp_path / "saved"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"question": "What is 1 + 1?", "final_answer": "2"}]),
        "test": datasets.Dataset.from_list([{"question": "What is 2 + 3?", "final_answer": "5"},
                                            {"question": "What is 3 + 4?", "final_answer": "7"}]),
    }).save_to_disk(str(folder))
    rows = load_dataset_seeds(dataset(folder, split="test"))
    assert [(i.reference, i.source) for i in rows.instructions] == [("5", f"{folder} (split test)")] * 1 + \
        [("7", f"{folder} (split test)")]
    assert [i.reference for i in load_dataset_seeds(dataset(folder)).instructions] == ["2"]  # train by default
    with pytest.raises(SeedError, match=r"no split 'dev' \(splits: train, test\)"):
        load_dataset_seeds(dataset(folder, split="dev"))


def test_a_csv_is_filtered_by_a_sql_predicate_and_the_rows_left_out_say_why(tmp_path):
    path = tmp_path / "pool.csv"
    path.write_text("id,prompt,answer,grade\n"
                    "a1,What is 10 - 4?,6,2\n"
                    "a2,What is 9 + 9?,18,5\n"
                    "a3,What is 3 * 5?,15,4\n")
    source = dataset(path, filter="grade >= 4", count=1)
    instructions, counts = read_seeds([source])
    assert [i.reference for i in instructions] == ["18"] and instructions[0].source == f"{path}#a2"
    (count,) = counts
    assert (count.read, count.kept) == (3, 1)
    assert count.dropped == {"left out by filter (grade >= 4)": 1, "beyond count": 1}
    with pytest.raises(SeedError, match=r"seeds\.filter: keeps none of the 3 rows"):
        load_dataset_seeds(dataset(path, filter="grade > 9"))
    with pytest.raises(SeedError, match=r"seeds\.filter: 'nope > 1' cannot run over .*pool\.csv: .*"
                                        r"\(columns: id, prompt, answer, grade\)"):
        load_dataset_seeds(dataset(path, filter="nope > 1"))


def test_a_code_file_with_a_tests_column_runs_in_the_sandbox(tmp_path):
    path = jsonl(tmp_path / "code.jsonl", [
        {"task": "Write a function `double(x)` that returns twice x.",
         "checks": ["assert double(2) == 4", "assert double(-1) == -2"]},
        {"task": "Complete the function.\n\ndef triple(x):\n    ...", "entry_point": "triple",
         "checks": "def check(candidate):\n    assert candidate(2) == 6\n"},
    ])
    double, triple = load_dataset_seeds(dataset(path, columns={"prompt": "task", "tests": "checks"})).instructions
    assert double.domain == triple.domain == "code"
    assert double.text.endswith("Your function must pass this test:\nassert double(2) == 4")
    assert triple.reference.rstrip().endswith("check(triple)")
    right = "```python\ndef double(x):\n    return 2 * x\n```"
    assert check_code_answer(right, double.reference).verdict == CORRECT
    assert check_code_answer(right.replace("2 * x", "x + 2"), double.reference).verdict == INCORRECT
    assert check_code_answer("```python\ndef triple(x):\n    return 3 * x\n```", triple.reference).verdict == CORRECT


def test_an_ifeval_style_file_is_checked_by_the_constraint_checkers(tmp_path):
    path = jsonl(tmp_path / "if.jsonl", [
        {"key": 7, "prompt": "Describe rain without using any commas.",
         "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    ])
    (only,) = load_dataset_seeds(dataset(path)).instructions
    assert (only.domain, only.difficulty, only.source) == ("instruction_following", 1, f"{path}#7")
    assert check_answer("instruction_following", "Rain falls soft and grey.", only.reference, only.text).verdict == \
        CORRECT
    assert check_answer("instruction_following", "Rain, soft, grey.", only.reference, only.text).verdict != CORRECT


def test_a_domain_column_picks_each_rows_domain(tmp_path):
    path = jsonl(tmp_path / "mixed.jsonl", [
        {"prompt": "What is 2 + 2?", "answer": "4", "kind": "math"},
        {"prompt": "Write a haiku about tea.", "answer": None, "kind": "open_ended"},
    ])
    rows = load_dataset_seeds(dataset(path, domain="kind"))
    assert [(i.domain, i.reference) for i in rows.instructions] == [("math", "4"), ("open_ended", "")]


# --- errors a user can act on ----------------------------------------------------------------------


def test_a_mapping_to_a_missing_column_lists_the_columns_the_file_has(tmp_path):
    path = jsonl(tmp_path / "math.jsonl", MATH_ROWS)
    with pytest.raises(SeedError) as raised:
        load_dataset_seeds(dataset(path, columns={"answer": "final"}), "seeds[2]")
    assert str(raised.value) == (f"seeds[2].columns.answer: {path} has no column 'final' (its columns: problem, level, "
                                 "type, solution)")


@pytest.mark.parametrize(("row", "message"), [
    ({"problem": "What is 1+1?", "solution": ""}, "line 2: field 'solution' is missing or empty"),
    ({"problem": "What is 1+1?", "solution": "It is two."}, "line 2: field 'solution' has no final answer"),
    ({"problem": "What is 1+1?", "solution": "So \\boxed{\\frac{1}{}}."},
     "line 2: field 'solution': math-verify cannot parse the answer"),
])
def test_a_bad_math_row_names_the_file_the_line_and_the_field(tmp_path, row, message):
    path = jsonl(tmp_path / "math.jsonl", [MATH_ROWS[0], row])
    with pytest.raises(SeedError, match=rf"^{path}: {message}"):
        load_dataset_seeds(dataset(path))


def test_malformed_tests_name_the_row_and_the_field(tmp_path):
    path = tmp_path / "code.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "Write f.", "tests": "assert f(1) == 1\n"},
                                         {"prompt": "Write g.", "tests": "assert g(1) = = 1\n"}]), path)
    with pytest.raises(SeedError, match=rf"^{path}: row 2: field 'tests' is not valid Python \(line 1 of the test "):
        load_dataset_seeds(dataset(path))


def test_an_empty_file_and_a_file_without_a_prompt_say_so(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SeedError, match="no rows|cannot read"):
        load_dataset_seeds(dataset(empty))
    path = jsonl(tmp_path / "odd.jsonl", [{"body": "text", "label": 1}])
    with pytest.raises(SeedError, match=r"no prompt column; map columns\.prompt .* to one of body, label"):
        load_dataset_seeds(dataset(path))


def test_a_hub_id_that_cannot_be_reached_is_one_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as without a network, but at once
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(SeedError, match=r"openai/gsm8k: not a local file or folder, and the Hugging Face Hub "
                                        r"cannot load it .*save_to_disk"):
        load_dataset_seeds(dataset("openai/gsm8k"))


# --- `orchard seeds` -----------------------------------------------------------------------------------


def test_orchard_seeds_prints_what_a_run_would_read_and_exits_non_zero_on_bad_input(tmp_path, capsys):
    pool = jsonl(tmp_path / "pool.jsonl", [
        {"question": "What is 12 + 30?", "answer": "42"},
        {"question": "What is 12 + 30?", "answer": "42"},  # an exact duplicate
        {"question": "A farmer has 12 cows and buys 30 more cows at the market today; how many cows now?",
         "answer": "42"},
        {"question": "A farmer has 12 cows and buys 30 more cows at the market today; how many cows now??",
         "answer": "42"},
    ])
    config = tmp_path / "orchard.toml"
    config.write_text(f'[[seeds]]\nkind = "dataset"\npath = "{pool}"\n\n[run]\ninstructions_per_shard = 1\n')
    assert main(["--config", str(config), "seeds", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (source,) = report["sources"]
    assert (source["read"], source["kept"], source["dropped"]) == (4, 3, {"duplicate instruction id": 1})
    assert report["kept"] == 2 and report["shards"]["count"] == 2
    (cluster,) = report["near_duplicate_clusters"]
    assert cluster["kept"]["row"] == 3 and [d["row"] for d in cluster["duplicates"]] == [4]
    assert main(["--config", str(config), "seeds"]) == 0
    printed = capsys.readouterr().out
    assert "seeds[0] dataset" in printed and "read 4, kept 3, dropped 1" in printed
    assert "duplicate clusters: 1 (1 dropped)" in printed and "planned: 2 instructions in 2 shards" in printed

    bad = jsonl(tmp_path / "bad.jsonl", [{"question": "What is 1+1?", "answer": "1+1=2\n#### 2"}, {"question": "x"}])
    config.write_text(f'[[seeds]]\nkind = "dataset"\npath = "{bad}"\nanswer_format = "gsm8k"\n')
    assert main(["--config", str(config), "seeds"]) == 2
    assert capsys.readouterr().err.strip() == f"orchard: error: {bad}: line 2: field 'answer' is missing or empty"


def test_a_default_config_still_reads_every_shipped_kind():
    instructions, counts = read_seeds(Config().seeds)
    assert [c.kept for c in counts] == [5, 2, 3, 2, 4] and len(instructions) == 16


# --- a benchmark's test split as seeds -------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "options", "share"), [
    ("gsm8k", {}, 1.0),  # question, and the answer after ####
    ("math", {"columns": {"solution": "solution"}}, 0.95),  # \boxed{} solutions; 199 one-line problems have no 8-gram
    ("mbpp", {}, 0.98),  # text and test_list: code
    ("ifbench", {"domain": "open_ended"}, 1.0),  # IFBench's constraints are not IFEval's: its prompts alone
    ("mt_bench", {}, 0.95),  # one row per turn: open-ended
])
def test_a_benchmark_test_split_as_seeds_is_flagged_almost_entirely_by_the_default_gate(name, options, share):
    from orchard.benchmarks import set_path
    from tasks.hygiene import screen_seeds

    instructions, (count,) = read_seeds([dataset(set_path(name), **options)])
    assert count.read == len(instructions) + sum(count.dropped.values())
    screened = screen_seeds(instructions, Config())
    flagged = {flag["instruction_id"] for flag in screened.contamination if flag["eval_set"] == name}
    assert len(flagged) >= share * len(instructions), (name, len(flagged), len(instructions))
    assert len(screened.kept) <= (1 - share) * len(instructions) + 1
