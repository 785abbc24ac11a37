"""The cheap faults of the fault suite (bench/faults.py), run through the suite's own scenario code.

Every corruption of a landed shard at once (truncated Parquet, wrong checksum, missing part, a manifest of another
run: one shard each, in one resumed run), one model request answered HTTP 400, and SIGTERM mid-growth (exit 143
within 15 s, nothing left running, the re-run completes): real SeaweedFS, the real
llama.cpp server, `orchard run` as a subprocess. The slow faults (store outages, kills at each stage, the model
server killed, Postgres) run in the bench only: together these two tests take about 2½ minutes on 2 cores (their
runs report to the lab's one Prefect server instead of starting their own).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from builders import MODEL_THREADS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import faults  # noqa: E402


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fault lab (SeaweedFS, llama.cpp and a Prefect server that its runs report to: none of these faults is in
    Prefect's path) for this module; its servers stop when the module ends."""
    path = tmp_path_factory.mktemp("faults")
    with faults.lab_session(path, prefect_api=True, model_threads=MODEL_THREADS):
        yield path


def _table(results: list[faults.FaultResult]) -> str:
    return "\n".join(result.line() for result in results)


def test_fault_lines_read_fault_expected_observed_verdict():
    result = faults.FaultResult("wrong-checksum", "exit 0", "exit 2", passed=False)
    assert result.line() == "wrong-checksum | exit 0 | exit 2 | FAIL"
    assert set(faults.CORRUPTIONS) <= set(faults.SCENARIOS)


def test_the_suite_prints_a_line_per_fault_then_the_tally_and_fails_if_any_fault_failed(monkeypatch, capsys, tmp_path):
    server = SimpleNamespace(url="http://127.0.0.1:1")

    @contextlib.contextmanager
    def no_servers(work):
        yield SimpleNamespace(seaweed=server, llama=server)

    def broken(work):
        raise RuntimeError("store gone")

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))  # main() sets it when unset: undone after
    monkeypatch.setattr(faults, "lab_session", no_servers)
    monkeypatch.setattr(faults, "cluster_scenarios", dict)
    monkeypatch.setattr(faults, "SCENARIOS", {
        "calm": lambda work: faults.FaultResult("calm", "exit 0", "exit 0", True),
        "storm": lambda work: faults.FaultResult("storm", "exit 1", "exit 0", False),
        "broken": broken,
    })

    code = faults.main(["--work-dir", str(tmp_path)])

    lines = capsys.readouterr().out.splitlines()
    assert code == 1
    assert lines[-4:] == ["calm | exit 0 | exit 0 | PASS", "storm | exit 1 | exit 0 | FAIL",
                          "broken | (scenario ran) | scenario raised RuntimeError: store gone | FAIL",
                          "1 passed, 2 failed"]
    assert faults.main(["--work-dir", str(tmp_path), "--only", "calm"]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == ["calm | exit 0 | exit 0 | PASS", "1 passed, 0 failed"]


@pytest.mark.integration
def test_every_kind_of_corrupt_landed_shard_is_quarantined_and_regrown_in_the_same_run(work):
    results = faults.all_corruptions(work)
    assert [r.fault for r in results] == list(faults.CORRUPTIONS)
    assert all(r.passed for r in results), _table(results)


@pytest.mark.integration
def test_a_request_answered_400_is_counted_its_node_dropped_and_the_run_completes(work):
    result = faults.model_answers_once(work, "400")
    assert result.passed, result.line()



@pytest.mark.integration
def test_sigterm_mid_growth_stops_the_run_in_seconds_leaves_nothing_running_and_the_rerun_completes(work):
    result = faults.stopped_by_signal(work, faults.signal.SIGTERM, group=False)
    assert result.passed, result.line()
