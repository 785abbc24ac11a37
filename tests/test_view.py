"""The run view (tasks/view.py): the run page's rows and each tree's data, built from a lake snapshot; and, in headless
Chromium, that model text is shown as text. The real run's view is checked in a browser in tests/test_real_run.py
(`test_the_view_of_the_real_run_shows_its_trees_pairs_and_a_nodes_feedback`), where that run is grown."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from bench.browser import chromium
from builders import run_summary
from orchard import lake
from orchard.config import Config
from tasks.report import report_markdown, summary_text
from tasks.view import CALLBACK, ViewError, tree_file, view_run
from test_lake import _open_ended_rows, _tree_rows, insert_rows

SCREENSHOTS = Path(__file__).resolve().parents[1] / "view-screenshots"  # gitignored: what the browser tests saw
PLANTED = '<script>window.planted = 1</script><img src="x" onerror="window.planted = 2">'


def pair_id(chosen: str, rejected: str) -> str:
    return hashlib.sha256(f"{chosen}>{rejected}".encode()).hexdigest()[:16]


def publish(config: Config, run_id: str, shard: dict[str, list[dict]], trees: int) -> int:
    """Insert a shard's rows and the run's `runs` row in one snapshot each; return the run's snapshot id."""
    snapshot = insert_rows(config, shard)
    with lake.connect(config) as con:
        con.execute("INSERT INTO runs (run_id, snapshot_id, status, trees, nodes, pairs, pass_rate, summary) "
                    "VALUES (?, ?, 'complete', ?, ?, ?, 0.6, ?)",
                    [run_id, snapshot + 1, trees, len(shard.get("nodes", [])), len(shard.get("pairs", [])),
                     json.dumps({"fates": [{"shard_id": "s1", "fate": "published", "trees": trees}]})])
    return snapshot + 1


def small_run(run_id: str = "r1", *, planted: bool = False) -> dict[str, list[dict]]:
    """Two multi-turn math trees and an open-ended tree with principle examples (tests/test_lake.py's rows); a seed
    dropped as a duplicate, one contaminated, and a pair of siblings left out by curation."""
    shard: dict[str, list[dict]] = {"instructions": [], "nodes": [], "pairs": [], "trees": [], "principle_examples": []}
    for rows in (_tree_rows(run_id, "s1", 0), _tree_rows(run_id, "s1", 1), _open_ended_rows(run_id, "s1", 2)):
        for name, values in rows.items():
            shard[name].extend(values)
    if planted:  # the model wrote markup: a wrong answer holding a script and an image whose error handler runs code
        for node in shard["nodes"]:
            if node["node_id"] == "s1-t0-a3":
                node["text"] = PLANTED
                node["verifier_detail"] = "expected 2, got " + PLANTED
    shard["trees"].append(dict(run_id=run_id, shard_id="s1", tree_id="s1-o2", instruction_id="s1-oi2",
                               domain="open_ended", strategies=[], turns=0, nodes=0, actions=0, correct=0,
                               pass_rate=None, pairs=0, prompt_tokens=0, completion_tokens=0, k=None))
    shard["drops"] = [
        dict(run_id=run_id, shard_id="s1", stage="curation", reason="mid contrast", count=1,
             example_ids=[pair_id("s1-t0-a1", "s1-t0-a2")]),
        dict(run_id=run_id, shard_id=None, stage="dedup", reason="duplicate instruction", count=1,
             example_ids=["seed-dup"]),
    ]
    return shard


def built(config: Config, out: Path, **kwargs: Any) -> tuple[dict, dict[str, dict]]:
    """Build the view into `out`; return the run page's data and each tree's, read back from the data files."""
    view_run(config, out, **kwargs)
    page = read_data(out / "data" / "index.js", "index")
    trees = {row["tree"]: read_data(out / "data" / "trees" / f"{row['file']}.js", "tree")
             for row in page["trees"] if "tree" in row}
    return page, trees


def read_data(path: Path, kind: str) -> Any:
    text = path.read_text(encoding="utf-8")
    prefix = f'{CALLBACK}("{kind}", '
    assert text.startswith(prefix) and text.endswith(");\n"), text[:80]
    return json.loads(text[len(prefix):-3])


@pytest.fixture
def run_lake(local_config: Config) -> Config:
    publish(local_config, "r1", small_run("r1"), trees=3)
    with lake.connect(local_config) as con:
        con.execute("INSERT INTO contamination VALUES ('r1', 'seed-gsm', 'gsm8k', 'test-17', 40, 50, 0.8)")
    return local_config


def test_the_run_page_lists_every_tree_with_its_strategies_pass_rate_pairs_and_jury_labels(run_lake, tmp_path):
    page, _ = built(run_lake, tmp_path / "view")
    assert page["run"]["run_id"] == "r1" and page["run"]["status"] == "complete"
    assert page["run"]["pairs_by_method"] == {"rs": 6}
    rows = {row.get("tree") or row["instruction_id"]: row for row in page["trees"]}
    math = rows["s1-t0"]
    assert (math["domain"], math["instruction"], math["reference"]) == ("math", "What is 0 + 2?", "2")
    assert math["strategies"] == {"step_by_step": [2, 3]}  # correct / first-turn actions, per strategy
    assert (math["pass_rate"], math["nodes"], math["critiques"], math["pairs"]) == (0.6, 7, 1, {"rs": 3})
    assert rows["s1-o2"]["jury"] == {"non_attitude": 1, "stable": 1}
    # Seeds the run did not grow, with why: a contaminated one (all of them are kept) and a dropped duplicate.
    assert rows["seed-gsm"]["not_grown"] == "contaminated: gsm8k test-17 (coverage 0.80)"
    assert rows["seed-dup"]["not_grown"] == "dedup: duplicate instruction"
    assert {(d["stage"], d["reason"], d["count"]) for d in page["drops"]} == {
        ("curation", "mid contrast", 1), ("dedup", "duplicate instruction", 1)}


def test_a_tree_holds_its_nodes_pairs_and_the_pairs_left_out_traced_to_their_nodes(run_lake, tmp_path):
    _, trees = built(run_lake, tmp_path / "view")
    tree = trees["s1-t0"]
    by_id = {node["id"]: node for node in tree["nodes"]}
    assert len(by_id) == 7 and by_id["s1-t0-c1"]["parent"] == "s1-t0-a3"
    wrong = by_id["s1-t0-a3"]
    assert (wrong["verdict"], wrong["verifier"], wrong["failure_reason"]) == ("incorrect", "math_verify", "wrong answer")
    assert (wrong["model"], wrong["temperature"], wrong["seed"]) == ("smol", 0.9, 3)
    assert {(p["chosen"], p["rejected"], p["margin"]) for p in tree["pairs"]} == {
        ("s1-t0-a1", "s1-t0-a3", 1.0), ("s1-t0-a2", "s1-t0-a3", 1.0), ("s1-t0-r1", "s1-t0-r2", 1.0)}
    # The dropped pair id is a hash of its two nodes: found again among the tree's siblings, with the drop's reason.
    assert tree["left_out"] == [{"id": pair_id("s1-t0-a1", "s1-t0-a2"), "chosen": "s1-t0-a1", "rejected": "s1-t0-a2",
                                 "stage": "curation", "reason": "mid contrast"}]
    assert trees["s1-t1"]["left_out"] == []
    examples = trees["s1-o2"]["examples"]
    assert [(e["principle_id"], e["label"], e["response"]) for e in examples] == [
        ("p1", "stable", "Kind note."), ("p2", "non_attitude", "Kind note.")]


def test_the_view_shows_the_snapshot_it_is_given_and_by_default_the_latest_run(local_config, tmp_path):
    first = publish(local_config, "r1", small_run("r1"), trees=3)
    publish(local_config, "r2", small_run("r2"), trees=3)
    assert built(local_config, tmp_path / "latest")[0]["run"]["run_id"] == "r2"
    assert built(local_config, tmp_path / "old", version=first)[0]["run"]["run_id"] == "r1"
    page, trees = built(local_config, tmp_path / "named", run_id="r1")
    assert set(trees) == {"s1-t0", "s1-t1", "s1-o2"} and page["run"]["run_id"] == "r1"
    with pytest.raises(ViewError, match="'r9' is not in this lake snapshot"):
        view_run(local_config, tmp_path / "none", run_id="r9")


def test_the_run_summary_prints_the_view_and_the_report_links_to_it():
    summary = run_summary([], view="/state/views/r/index.html")
    assert "  view: /state/views/r/index.html" in summary_text(summary)
    assert "View: [the run's trees, pairs and verdicts](/state/views/r/index.html)" in report_markdown(summary)


def test_a_tree_id_that_is_not_a_plain_name_gets_a_hashed_file_name():
    assert tree_file("s1-t0") == "s1-t0"
    assert tree_file("../../etc/passwd") == tree_file("../../etc/passwd") and "/" not in tree_file("../../etc/passwd")


# --- in a real browser -------------------------------------------------------------------------------------------


def wait_ready(browser: Any, page: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 30).until(lambda b: b.find_element("tag name", "body").get_attribute("data-ready") == page)


def screenshot(browser: Any, name: str) -> None:
    SCREENSHOTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


@pytest.mark.integration
def test_model_text_holding_markup_is_shown_as_text_and_nothing_in_it_runs(local_config, tmp_path):
    from selenium.webdriver.common.by import By

    publish(local_config, "r1", small_run("r1", planted=True), trees=3)
    index = view_run(local_config, tmp_path / "view").index
    with chromium() as browser:
        browser.get(index.as_uri())  # straight from disk: no server
        wait_ready(browser, "run")
        rows = browser.find_elements(By.CSS_SELECTOR, "#trees tbody tr")
        assert len(rows) == 4  # three trees and the dropped seed
        browser.find_element(By.ID, "filter").send_keys("s1-t1")
        assert [r.get_attribute("data-tree") for r in browser.find_elements(By.CSS_SELECTOR, "#trees tbody tr")] == [
            "s1-t1"]
        browser.get(index.with_name("tree.html").as_uri() + "#s1-t0")
        wait_ready(browser, "tree")
        browser.find_element(By.CSS_SELECTOR, 'svg .node[data-node="s1-t0-a3"] > :first-child').click()
        details = browser.find_element(By.ID, "details")
        assert PLANTED in details.find_element(By.CSS_SELECTOR, '[data-field="text"]').text
        assert "expected 2, got " + PLANTED in details.find_element(By.CSS_SELECTOR, '[data-field="verifier detail"]').text
        assert details.find_elements(By.TAG_NAME, "script") == [] and details.find_elements(By.TAG_NAME, "img") == []
        assert browser.execute_script("return window.planted === undefined")
        screenshot(browser, "planted-script-shown-as-text")
