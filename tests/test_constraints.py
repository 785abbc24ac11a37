import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.constraints import (
    BASE_TASKS,
    CONSTRAINTS,
    END_PHRASES,
    LIBRARY,
    OURS,
    POSTSCRIPT_MARKERS,
    RARE_LETTERS,
    START_PHRASES,
    WORD_POOL,
    ConstraintError,
    combination_problem,
    normalize_kwargs,
    parse_constraints_reference,
    score_response,
    synthesize_if_prompts,
)
from tasks.seed_files import SeedError
from tasks.seeds import load_ifeval

STORY = ("The keeper climbed the tower every night. He lit the lamp for the ships at sea. "
         "In the morning he wrote about the storms in his small notebook.")

# constraint id -> (kwargs, a response that satisfies it, a response that breaks it). Written by hand.
CASES = {
    "keywords:existence": (
        {"keywords": ["lantern", "river"]},
        "A lantern hung above the river all night.",
        "A lamp hung above the stream all night."),
    "keywords:frequency": (
        {"keyword": "ocean", "frequency": 3, "relation": "at least"},
        "The ocean is wide. The ocean is deep. I love the Ocean.",
        "The ocean is wide. The ocean is deep."),
    "keywords:forbidden_words": (
        {"forbidden_words": ["storm", "dark"]},
        "The night was calm and bright. Storms-free? Not quite: stormy weather came later.",
        "The night was calm until the Storm arrived."),
    "keywords:letter_frequency": (
        {"letter": "z", "let_frequency": 2, "let_relation": "less than"},
        "A quiet dog sat by the fire.",
        "The lazy zebra dozed."),
    "language:response_language": (
        {"language": "es"},
        "El guardián del faro subía las escaleras cada noche para encender la lámpara de los barcos.",
        "The keeper climbed the stairs every night to light the lamp for the ships."),
    "length_constraints:number_sentences": (
        {"num_sentences": 4, "relation": "less than"},
        "Dr. Smith walked 3.5 km to the lighthouse. Wow!! He was tired.",  # three: abbreviations are no ends
        STORY + " Then it rained."),
    "length_constraints:number_paragraphs": (
        {"num_paragraphs": 2},
        "The keeper woke early.\n***\nHe lit the lamp at dusk.",
        "The keeper woke early.\n\nHe lit the lamp at dusk."),
    "length_constraints:number_words": (
        {"num_words": 10, "relation": "less than"},
        "The keeper lit the lamp.",
        "The old keeper climbed all the stairs to light the great lamp tonight."),
    "length_constraints:nth_paragraph_first_word": (
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "later"},
        "The keeper woke early.\n\n\"Later, he lit the lamp.",
        "The keeper woke early.\n\nThen he lit the lamp."),
    "detectable_content:number_placeholders": (
        {"num_placeholders": 2},
        "Dear [name], meet me at [address].",
        "Dear [name], meet me at the harbor."),
    "detectable_content:postscript": (
        {"postscript_marker": "P.S."},
        "See you soon.\n\nP.S. Bring a coat.",
        "See you soon. Bring a coat."),
    "detectable_format:number_bullet_lists": (
        {"num_bullets": 2},
        "Tips:\n* Water it weekly.\n- Keep it in the sun.",
        "Tips:\n* Water it weekly.\n* Keep it in the sun.\n* Talk to it."),
    "detectable_format:constrained_response": (
        {},
        "My answer is yes.",
        "Yes, I think so."),
    "detectable_format:number_highlighted_sections": (
        {"num_highlights": 2},
        "This is *very important* and **also this**.",
        "This is *very important* and this is not."),
    "detectable_format:multiple_sections": (
        {"section_spliter": "Section", "num_sections": 2},
        "Section 1\nThe keeper.\nSection 2\nThe lamp.",
        "Section 1\nThe keeper and the lamp."),
    "detectable_format:json_format": (
        {},
        '```json\n{"story": "The keeper lit the lamp."}\n```',
        "story: The keeper lit the lamp."),
    "detectable_format:title": (
        {},
        "<<The Last Keeper>>\nHe lit the lamp.",
        "The Last Keeper\nHe lit the lamp. <<>>"),
    "combination:two_responses": (
        {},
        "The keeper lit the lamp.\n******\nThe lamp was lit by the keeper.",
        "The keeper lit the lamp.\n******\nThe keeper lit the lamp."),
    "combination:repeat_prompt": (
        {"prompt_to_repeat": "Write a story about a keeper."},
        "Write a story about a keeper. Once upon a time a keeper lit the lamp.",
        "Once upon a time a keeper lit the lamp."),
    "startend:end_checker": (
        {"end_phrase": "Any other questions?"},
        "The sky is blue because of scattering. Any other questions?",
        "Any other questions? The sky is blue because of scattering."),
    "change_case:capital_word_frequency": (
        {"capital_frequency": 2, "capital_relation": "at least"},
        "This is VERY important and REALLY urgent.",
        "This is VERY important and really urgent."),
    "change_case:english_capital": (
        {},
        "THE KEEPER CLIMBED THE TOWER EVERY NIGHT TO LIGHT THE LAMP FOR THE SHIPS AT SEA.",
        "THE KEEPER CLIMBED THE TOWER EVERY NIGHT TO LIGHT THE LAMP FOR THE Ships AT SEA."),
    "change_case:english_lowercase": (
        {},
        "the keeper climbed the tower every night to light the lamp for the ships at sea.",
        "The keeper climbed the tower every night to light the lamp for the ships at sea."),
    "punctuation:no_comma": (
        {},
        "The keeper lit the lamp and went to sleep.",
        "The keeper lit the lamp, then went to sleep."),
    "startend:quotation": (
        {},
        '  "The keeper lit the lamp."\n',
        '"The keeper lit the lamp.'),
    "startend:start_checker": (
        {"start_phrase": "In short"},
        '"in short: the keeper lit the lamp."',
        "The keeper lit the lamp. In short it was bright."),
}


def test_every_constraint_has_a_pinned_case_and_there_are_at_least_23():
    assert set(CASES) == set(CONSTRAINTS)
    assert len(CONSTRAINTS) >= 23


@pytest.mark.parametrize("constraint_id", sorted(CASES))
def test_checker_accepts_the_satisfying_response(constraint_id):
    kwargs, satisfied, _ = CASES[constraint_id]
    ok, reason = CONSTRAINTS[constraint_id].check(satisfied, normalize_kwargs(constraint_id, kwargs))
    assert ok, reason
    assert reason


@pytest.mark.parametrize("constraint_id", sorted(CASES))
def test_checker_rejects_the_violating_response(constraint_id):
    kwargs, _, violated = CASES[constraint_id]
    ok, reason = CONSTRAINTS[constraint_id].check(violated, normalize_kwargs(constraint_id, kwargs))
    assert not ok, reason
    assert reason


def test_reasons_say_what_the_response_shows():
    _, reason = CONSTRAINTS["length_constraints:number_words"].check(
        "one two three four five", {"num_words": 3, "relation": "less than"})
    assert reason == "found 5 words, needs less than 3"
    _, reason = CONSTRAINTS["keywords:forbidden_words"].check("A dark night.", {"forbidden_words": ["dark", "cold"]})
    assert "dark" in reason and "cold" not in reason
    _, reason = CONSTRAINTS["length_constraints:number_sentences"].check(
        STORY, {"num_sentences": 3, "relation": "less than"})
    assert reason == "found 3 sentences, needs less than 3"


def test_library_and_own_checkers_are_labelled():
    ours = {cid for cid, spec in CONSTRAINTS.items() if spec.source == OURS}
    assert ours == {"length_constraints:number_sentences", "change_case:capital_word_frequency",
                    "startend:start_checker"}
    assert all(spec.source == LIBRARY for cid, spec in CONSTRAINTS.items() if cid not in ours)


def test_keyword_checks_read_keywords_literally():
    ok, _ = CONSTRAINTS["keywords:existence"].check("I write c and c plus plus.", {"keywords": ["c++"]})
    assert not ok
    ok, _ = CONSTRAINTS["keywords:existence"].check("I write c++ daily.", {"keywords": ["c++"]})
    assert ok


def test_letter_frequency_counts_a_symbol_as_ifeval_rows_ask():
    # IFEval's own rows ask for '#' and '!'; its checker would silently check a random letter instead.
    kwargs = {"letter": "#", "let_frequency": 2, "let_relation": "at least"}
    assert CONSTRAINTS["keywords:letter_frequency"].check("#summer #sun", kwargs)[0]
    assert not CONSTRAINTS["keywords:letter_frequency"].check("#summer sun", kwargs)[0]


def test_ifeval_rows_may_repeat_an_instruction_id():
    ids = ["length_constraints:number_words", "length_constraints:number_words"]
    kwargs = [{"num_words": 3, "relation": "at least"}, {"num_words": 6, "relation": "less than"}]
    assert score_response("one two three four", ids, kwargs).strict
    assert score_response("one two", ids, kwargs).fraction == 0.5


def test_language_detection_is_deterministic():
    text = "ok fine"
    verdicts = {CONSTRAINTS["change_case:english_lowercase"].check(text, {})[0] for _ in range(20)}
    assert len(verdicts) == 1


# --- conflicts and synthesis ----------------------------------------------------------------------


@pytest.mark.parametrize("ids, kwargs", [
    (["change_case:english_lowercase", "change_case:english_capital"], [{}, {}]),
    (["change_case:english_lowercase", "change_case:capital_word_frequency"],
     [{}, {"capital_frequency": 3, "capital_relation": "at least"}]),
    (["detectable_format:json_format", "detectable_format:number_bullet_lists"], [{}, {"num_bullets": 3}]),
    (["detectable_format:json_format", "detectable_format:multiple_sections"],
     [{}, {"section_spliter": "Section", "num_sections": 2}]),
    (["length_constraints:number_words", "length_constraints:number_sentences"],
     [{"num_words": 30, "relation": "less than"}, {"num_sentences": 12, "relation": "at least"}]),
    (["length_constraints:number_words", "length_constraints:number_sentences"],
     [{"num_words": 300, "relation": "at least"}, {"num_sentences": 3, "relation": "less than"}]),
    (["length_constraints:number_sentences", "length_constraints:number_paragraphs"],
     [{"num_sentences": 3, "relation": "less than"}, {"num_paragraphs": 4}]),
    (["startend:end_checker", "detectable_content:postscript"],
     [{"end_phrase": "I hope this helps."}, {"postscript_marker": "P.S."}]),
    (["detectable_format:constrained_response", "punctuation:no_comma"], [{}, {}]),
])
def test_contradicting_combinations_are_named(ids, kwargs):
    assert combination_problem(ids, kwargs)
    assert combination_problem(list(reversed(ids)), list(reversed(kwargs)))


def test_compatible_combination_has_no_problem():
    ids = ["length_constraints:number_words", "length_constraints:number_sentences", "punctuation:no_comma",
           "detectable_content:postscript"]
    kwargs = [{"num_words": 150, "relation": "less than"}, {"num_sentences": 5, "relation": "at least"}, {},
              {"postscript_marker": "P.S."}]
    assert combination_problem(ids, kwargs) is None


def test_conflicts_are_symmetric():
    for cid, spec in CONSTRAINTS.items():
        assert cid in spec.conflicts
        for other in spec.conflicts:
            assert cid in CONSTRAINTS[other].conflicts, (cid, other)


def test_drawn_words_and_phrases_cannot_trip_each_other():
    phrases = [*START_PHRASES, *END_PHRASES, *POSTSCRIPT_MARKERS, *BASE_TASKS]
    for text in [*phrases, *WORD_POOL]:
        assert "," not in text and '"' not in text, text
    for text in [*START_PHRASES, *END_PHRASES, *POSTSCRIPT_MARKERS, *WORD_POOL]:
        assert not set(text.lower()) & set(RARE_LETTERS), text
        assert not any(word in text.lower().split() for word in WORD_POOL if text not in WORD_POOL), text


@pytest.fixture(scope="module")
def many_prompts():
    return [p for seed in range(40) for p in synthesize_if_prompts(10, k_min=1, k_max=6, seed=seed)]


def test_synthesis_never_draws_a_conflicting_combination(many_prompts):
    assert len(many_prompts) == 400
    for prompt in many_prompts:
        assert combination_problem(prompt.constraint_ids, prompt.kwargs) is None, prompt.constraint_ids
        assert len(set(prompt.constraint_ids)) == prompt.k == len(prompt.kwargs)
        assert 1 <= prompt.k <= 6


def test_every_synthesized_prompt_states_each_of_its_constraints(many_prompts):
    for prompt in many_prompts:
        assert prompt.text.startswith(prompt.base_task)
        for cid, kwargs in zip(prompt.constraint_ids, prompt.kwargs):
            assert CONSTRAINTS[cid].describe(kwargs) in prompt.text, (cid, prompt.text)


def test_synthesized_kwargs_are_json_safe_and_complete(many_prompts):
    for prompt in many_prompts:
        ids, kwargs = parse_constraints_reference(prompt.reference())
        assert ids == list(prompt.constraint_ids) and kwargs == list(prompt.kwargs)
        for cid, kw in zip(ids, kwargs):
            assert normalize_kwargs(cid, kw) == kw


def test_synthesis_draws_every_constraint_it_may(many_prompts):
    drawn = {cid for prompt in many_prompts for cid in prompt.constraint_ids}
    assert drawn == {cid for cid, spec in CONSTRAINTS.items() if spec.synthesize}


def test_repeat_request_is_everything_before_its_instruction(many_prompts):
    repeats = [p for p in many_prompts if "combination:repeat_prompt" in p.constraint_ids]
    assert repeats
    for prompt in repeats:
        assert prompt.constraint_ids[-1] == "combination:repeat_prompt"
        request = prompt.kwargs[-1]["prompt_to_repeat"]
        assert prompt.text.startswith(request + "\n")
        assert score_response(request + "\nHere is my answer.", prompt.constraint_ids[-1:], prompt.kwargs[-1:]).strict


def test_synthesis_is_reproducible_by_seed():
    first = synthesize_if_prompts(12, k_min=2, k_max=4, seed=3)
    assert first == synthesize_if_prompts(12, k_min=2, k_max=4, seed=3)
    assert first[:5] == synthesize_if_prompts(5, k_min=2, k_max=4, seed=3)
    assert first != synthesize_if_prompts(12, k_min=2, k_max=4, seed=4)


def test_synthesis_refuses_impossible_k():
    with pytest.raises(ConstraintError, match="k_min"):
        synthesize_if_prompts(3, k_min=3, k_max=2)


# --- scoring --------------------------------------------------------------------------------------

IDS = ["punctuation:no_comma", "length_constraints:number_words", "keywords:existence", "startend:end_checker"]
KWARGS = [{}, {"num_words": 20, "relation": "less than"}, {"keywords": ["lantern"]},
          {"end_phrase": "Any other questions?"}]


def test_score_is_the_fraction_satisfied_with_feedback_naming_the_broken_ones():
    score = score_response("The keeper lit the lamp, then slept. Any other questions?", IDS, KWARGS)
    assert score.fraction == pytest.approx(0.5)
    assert not score.strict
    assert score.violated == ("punctuation:no_comma", "keywords:existence")
    assert "does not follow 2 of the 4 instructions" in score.feedback
    assert "refrain from the use of any commas" in score.feedback and "found 1 commas" in score.feedback
    assert "lantern" in score.feedback
    assert "less than 20 words" not in score.feedback and "Any other questions" not in score.feedback


def test_a_response_that_follows_everything_is_strict():
    score = score_response("The keeper lit the lantern. Any other questions?", IDS, KWARGS)
    assert score.fraction == 1.0 and score.strict and score.violated == ()
    assert score.feedback == "Your response follows all 4 instructions."


def test_pinned_combination_has_a_response_that_satisfies_it():
    ids = ["change_case:english_lowercase", "detectable_format:title", "detectable_format:number_bullet_lists",
           "detectable_content:postscript", "length_constraints:number_words", "punctuation:no_comma"]
    kwargs = [{}, {}, {"num_bullets": 2}, {"postscript_marker": "P.S."}, {"num_words": 60, "relation": "less than"},
              {}]
    assert combination_problem(ids, kwargs) is None
    response = ("<<the keeper and the lamp>>\n* the keeper climbs the tower every night\n"
                "* he lights the lamp so the ships stay safe\np.s. he never misses a night")
    assert score_response(response, ids, kwargs).strict


def test_repeat_prompt_without_kwargs_repeats_the_prompt_text():
    score = score_response("Tell me a joke. Why did the chicken cross the road?", ["combination:repeat_prompt"], [{}],
                           prompt_text="Tell me a joke.")
    assert score.strict


def test_scoring_refuses_unknown_ids_and_malformed_kwargs():
    with pytest.raises(ConstraintError, match="unknown constraint id 'nope:x'"):
        score_response("hi", ["nope:x"], [{}])
    with pytest.raises(ConstraintError, match="'relation' must be one of"):
        score_response("hi", ["length_constraints:number_words"], [{"num_words": 5, "relation": "about"}])
    with pytest.raises(ConstraintError, match="'num_words' is missing"):
        score_response("hi", ["length_constraints:number_words"], [{"relation": "at least"}])
    with pytest.raises(ConstraintError, match="2 constraint ids but 1 kwargs"):
        score_response("hi", IDS[:2], KWARGS[:1])


# --- IFEval-format files --------------------------------------------------------------------------


def _ifeval_rows():
    return [
        {"key": 1, "prompt": "Write a haiku about rain. Do not use any commas.",
         "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
         "kwargs": [{}, {"num_words": 30, "relation": "less than"}]},
        {"key": 2, "prompt": "Write a riddle. Include the keywords river and moon.",
         "instruction_id_list": ["keywords:existence"], "kwargs": [{"keywords": ["river", "moon"]}]},
    ]


def test_ifeval_jsonl_loads_and_scores_with_the_same_checkers(tmp_path):
    path = tmp_path / "ifeval.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in _ifeval_rows()) + "\n")
    prompts = load_ifeval(path)
    constraints = [parse_constraints_reference(p.reference) for p in prompts]
    assert [ids for ids, _ in constraints] == [["punctuation:no_comma", "length_constraints:number_words"],
                                               ["keywords:existence"]]
    assert constraints[0][1] == [{}, {"num_words": 30, "relation": "less than"}]
    assert prompts[1].difficulty == 1 and prompts[1].source == f"{path}#2" and prompts[1].source_row == 2
    ids, kwargs = constraints[0]
    assert score_response("Rain on the roof\nsoft and slow", ids, kwargs, prompts[0].text).strict


def test_ifeval_parquet_drops_the_null_fields_of_its_kwargs_structs(tmp_path):
    # Hugging Face's IFEval Parquet stores kwargs as structs with every key: the unused ones are null.
    rows = _ifeval_rows()
    keys = ["num_words", "relation", "keywords"]
    for row in rows:
        row["kwargs"] = [{key: kw.get(key) for key in keys} for kw in row["kwargs"]]
    path = tmp_path / "ifeval.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    prompts = load_ifeval(path)
    assert parse_constraints_reference(prompts[0].reference)[1] == [{}, {"num_words": 30, "relation": "less than"}]
    assert parse_constraints_reference(prompts[1].reference)[1] == [{"keywords": ["river", "moon"]}]


def test_ifeval_bad_line_is_named(tmp_path):
    path = tmp_path / "ifeval.jsonl"
    path.write_text(json.dumps(_ifeval_rows()[0]) + "\n{not json\n")
    with pytest.raises(SeedError, match=r"ifeval\.jsonl: line 2: not valid JSON"):
        load_ifeval(path)


def test_ifeval_unknown_instruction_id_names_file_line_and_id(tmp_path):
    rows = _ifeval_rows()
    rows[1]["instruction_id_list"] = ["keywords:existence", "detectable_format:rephrase"]
    rows[1]["kwargs"].append({})
    path = tmp_path / "ifeval.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    with pytest.raises(SeedError, match=r"ifeval\.jsonl: line 2: unknown instruction id 'detectable_format:rephrase'"):
        load_ifeval(path)


def test_ifeval_bad_kwargs_name_the_instruction_and_parameter(tmp_path):
    rows = _ifeval_rows()
    rows[0]["kwargs"][1] = {"num_words": "thirty", "relation": "less than"}
    path = tmp_path / "ifeval.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    with pytest.raises(SeedError, match=r"line 1: instruction length_constraints:number_words: parameter 'num_words'"):
        load_ifeval(path)


def test_ifeval_kwargs_must_match_the_instruction_ids(tmp_path):
    rows = _ifeval_rows()
    rows[0]["kwargs"] = [{}]
    path = tmp_path / "ifeval.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    with pytest.raises(SeedError, match=r"line 1: field 'kwargs' must be a list of objects, one per instruction id"):
        load_ifeval(path)
