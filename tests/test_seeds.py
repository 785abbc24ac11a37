import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchard.config import SeedSource
from tasks.seeds import SeedError, generate_arithmetic, gsm8k_reference, load_gsm8k, load_seeds, plan_shards


def test_generator_is_reproducible_and_distinct():
    first = generate_arithmetic(20, difficulty=2, seed=1)
    again = generate_arithmetic(20, difficulty=2, seed=1)
    other = generate_arithmetic(20, difficulty=2, seed=2)
    assert first == again
    assert len({i.instruction_id for i in first}) == 20
    assert first != other


def test_generated_answers_are_exact_integers():
    for item in generate_arithmetic(30, difficulty=3, seed=9):
        assert int(item.reference) == int(item.reference)
        assert item.domain == "math" and item.difficulty == 3


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
