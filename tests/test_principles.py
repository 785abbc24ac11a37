"""Constitutions (format, default, errors naming the field) and open-ended prompt seeds."""

import json

import pytest

from tasks.principles import DEFAULT_CONSTITUTION, ConstitutionError, load_constitution
from tasks.seed_files import SeedError
from tasks.seeds import load_open_ended


def test_default_constitution_has_at_least_ten_principles_each_with_an_antithesis():
    constitution = load_constitution()
    assert constitution.name == "orchard-default" and constitution.path == str(DEFAULT_CONSTITUTION)
    assert len(constitution.principles) >= 10
    ids = [p.principle_id for p in constitution.principles]
    assert len(set(ids)) == len(ids)
    assert {"honesty", "helpfulness", "keep_voice", "admit_uncertainty", "brevity"} <= set(ids)
    assert all(p.text != p.antithesis for p in constitution.principles)
    assert constitution.get("brevity").text.startswith("Be brief")


def write(tmp_path, value):
    path = tmp_path / "constitution.json"
    path.write_text(value if isinstance(value, str) else json.dumps(value))
    return path


GOOD = {"id": "honesty", "text": "Say only what is true.", "antithesis": "Say what sounds good."}


@pytest.mark.parametrize(("value", "message"), [
    ({"name": "c", "version": "1", "principles": [{"id": "honesty", "text": "Say only what is true."}]},
     "principles[0]: 'antithesis' is a required property"),
    ({"name": "c", "version": "1", "principles": [GOOD | {"id": "Bad Id"}]}, "principles[0].id: 'Bad Id' does not match"),
    ({"name": "c", "version": "1", "principles": []}, "principles: [] should be non-empty"),
    ({"name": "c", "principles": [GOOD]}, "top level: 'version' is a required property"),
    ({"name": "c", "version": "1", "principles": [GOOD, GOOD]}, "principles[1].id: 'honesty' appears twice"),
    ("{not json", "not JSON: line 1 column 2"),
], ids=["missing-antithesis", "bad-id", "no-principles", "no-version", "duplicate-id", "not-json"])
def test_a_bad_constitution_names_file_and_field(tmp_path, value, message):
    path = write(tmp_path, value)
    with pytest.raises(ConstitutionError) as caught:
        load_constitution(path)
    assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value)


def test_a_missing_constitution_file_is_named(tmp_path):
    with pytest.raises(ConstitutionError, match="no-such.json: cannot read constitution"):
        load_constitution(tmp_path / "no-such.json")


def test_shipped_open_ended_prompts_cover_writing_advice_explanation_and_rewriting():
    prompts = load_open_ended()
    assert len(prompts) >= 20 and {p.domain for p in prompts} == {"open_ended"}
    categories = {p.source.rsplit("#", 1)[1] for p in prompts}
    assert categories == {"writing", "advice", "explanation", "rewriting"}
    assert len({p.instruction_id for p in prompts}) == len(prompts)
    assert [p.text for p in load_open_ended(count=3)] == [p.text for p in prompts[:3]]


def test_a_local_prompt_file_loads_and_a_bad_row_is_named(tmp_path):
    good = tmp_path / "prompts.jsonl"
    good.write_text('{"prompt": "Describe a sunrise."}\n{"prompt": "Give me advice on sleep.", "category": "advice"}\n')
    assert [p.text for p in load_open_ended(good)] == ["Describe a sunrise.", "Give me advice on sleep."]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    with pytest.raises(SeedError, match=r"bad.jsonl: line 2: .*prompt"):
        load_open_ended(bad)
