"""The fault suite: every fault of issue 12 against the real services, one line per fault, then `N passed, M failed`.

Each fault is a scenario `(work_dir) -> FaultResult`: it sets up its own bucket, state dir and TOML config on the
lab's shared SeaweedFS and llama.cpp server (bench/fault_lab.py), runs `orchard run` as a subprocess, injects the
fault, and checks the bucket and the lake: no row lost or duplicated, no snapshot holding part of a shard, the
status and exit code the fates call for, and that running the same run id again completes the work. Scenarios
of the cluster helper (bench/fault_cluster.py: `SCENARIOS`, name -> (work_dir) -> (expected, observed, passed))
run too when that file exists. Usage:

    .venv/bin/python bench/faults.py [--only NAME...] [--work-dir DIR] [--list]

Exit status 1 if any fault failed. Logs, configs and state of every run stay under the work dir.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fault_lab  # noqa: E402
from fault_lab import (  # noqa: E402
    FORWARD,
    RUN_ID,
    Attempt,
    Baseline,
    Check,
    FaultProxy,
    Lab,
    Target,
    body_share,
    check_complete,
    check_state,
    clean_run,
    counts_text,
)

from orchard.store import ObjectStore  # noqa: E402
from tasks.land import MANIFEST, VALIDATION, quarantine_prefix, shard_prefix  # noqa: E402


@dataclass(frozen=True)
class FaultResult:
    """One fault's line of the table: what was expected, what was seen, and whether they agree."""

    fault: str
    expected: str
    observed: str
    passed: bool

    def line(self) -> str:
        return f"{self.fault} | {self.expected} | {self.observed} | {'PASS' if self.passed else 'FAIL'}"


# The lab a scenario runs in: opened once per session by `lab_session` (the runner, a test fixture) and shared.
_LAB: Lab | None = None


@contextlib.contextmanager
def lab_session(work: Path, *, prefect_api: bool = False, model_threads: int = 0) -> Iterator[Lab]:
    """Start the shared servers under `work` (with `prefect_api`, a Prefect server that runs not killed report to;
    the model server with `model_threads` compute threads, 0: the default) for the scenarios run inside the block;
    stop them after."""
    global _LAB
    with Lab(work, prefect_api=prefect_api, model_threads=model_threads) as lab:
        _LAB = lab
        try:
            yield lab
        finally:
            _LAB = None


def lab_for(work_dir: Path) -> Lab:
    if _LAB is None or _LAB.work != Path(work_dir).resolve():
        raise RuntimeError(f"no lab session for {work_dir}: run scenarios inside faults.lab_session(work_dir)")
    return _LAB


def _problems(failed: list[str], limit: int = 2) -> str:
    return "; ".join(failed[:limit]) + (f" (+{len(failed) - limit} more)" if len(failed) > limit else "")


def _rerun_completes(lab: Lab, target: Target, baseline: Baseline | None, planned: list[str], log: str = "rerun.log",
                     *, quarantined: set[str] = frozenset(), same_counts_as: dict | None = None) -> tuple[Attempt, Check]:
    """Run the same run id again; check it completed (against `baseline`'s plan counts, or all of `same_counts_as`)."""
    again = lab.run(target, log)
    counts = baseline.plan_counts if baseline is not None else same_counts_as
    return again, check_complete(target, again, planned, counts, quarantined=quarantined)


def _exit_matches_status(attempt: Attempt, check: Check) -> str:
    """'' when the exit code is the one the summary's status calls for (0 / 3 / 1), else what disagrees."""
    status = check.summary.get("status") or attempt.status
    want = {"complete": 0, "partial": 3, "failed": 1}.get(status)
    if want is None:
        return f"no status in the summary (exit {attempt.code})"
    return "" if attempt.code == want else f"status {status} but exit {attempt.code}"


# --- corrupt landed shards ------------------------------------------------------------------------


def _rewrite_manifest(store: ObjectStore, shard: str, change: Callable[[dict], None]) -> dict:
    key = shard_prefix(RUN_ID, shard) + MANIFEST
    manifest = store.get_json(key)
    change(manifest)
    store.delete(key)
    store.put_new(key, json.dumps(manifest, indent=2, sort_keys=True).encode())
    return manifest


def _truncate(store: ObjectStore, shard: str) -> str:
    """nodes.parquet cut to half its bytes, the manifest made to agree (size and sha256): only Parquet can tell."""
    key = shard_prefix(RUN_ID, shard) + "nodes.parquet"
    body = store.get(key)
    body = body[: len(body) // 2]
    store.delete(key)
    store.put_new(key, body)

    def agree(manifest: dict) -> None:
        manifest["files"]["nodes"].update(bytes=len(body), sha256=hashlib.sha256(body).hexdigest())

    _rewrite_manifest(store, shard, agree)
    return key


def _wrong_checksum(store: ObjectStore, shard: str) -> str:
    """One hex digit of nodes.parquet's sha256 in the manifest changed; the file itself intact."""
    def alter(manifest: dict) -> None:
        digest = manifest["files"]["nodes"]["sha256"]
        manifest["files"]["nodes"]["sha256"] = ("0" if digest[0] != "0" else "1") + digest[1:]

    _rewrite_manifest(store, shard, alter)
    return shard_prefix(RUN_ID, shard) + "nodes.parquet"


def _missing_part(store: ObjectStore, shard: str) -> str:
    """pairs.parquet deleted; the manifest still lists it."""
    key = shard_prefix(RUN_ID, shard) + "pairs.parquet"
    store.delete(key)
    return key


def _other_run(store: ObjectStore, shard: str) -> str:
    """The manifest says it belongs to another run (everything else as landed)."""
    _rewrite_manifest(store, shard, lambda manifest: manifest.update(run_id="faults-other-run"))
    return shard_prefix(RUN_ID, shard) + MANIFEST


CORRUPTIONS: dict[str, Callable[[ObjectStore, str], str]] = {
    "truncated-parquet": _truncate,
    "wrong-checksum": _wrong_checksum,
    "missing-part": _missing_part,
    "other-run-manifest": _other_run,
}


@dataclass
class CorruptEpisode:
    """A run resumed on copies of a clean run's landed shards, some corrupted; then the same run id once more."""

    baseline: Baseline
    target: Target
    corrupted: dict[str, tuple[str, str]]  # kind -> (shard, key at fault)
    first: Attempt
    first_check: Check
    again: Attempt
    again_check: Check


def corrupt_episode(lab: Lab, kinds: tuple[str, ...]) -> CorruptEpisode:
    """Copy a clean run's landed shards into a fresh bucket (same run id), corrupt one shard per kind, run it
    to completion, and run it again (memoised: the per-kind faults of one episode share it)."""
    key = ("corrupt", kinds)
    if key in lab.memo:
        return lab.memo[key]
    baseline = clean_run(lab)
    target = lab.target("corrupt-" + "-".join(k.split("-")[0] for k in kinds))
    source, store = baseline.target.store, target.store
    for object_key in source.list_keys(f"runs/{RUN_ID}/shards/"):
        store.put_new(object_key, source.get(object_key))
    corrupted = {kind: (shard, CORRUPTIONS[kind](store, shard)) for kind, shard in zip(kinds, baseline.planned)}
    bad = {shard for shard, _ in corrupted.values()}
    first = lab.run(target, "run.log")
    first_check = check_complete(target, first, baseline.planned, baseline.plan_counts, quarantined=bad)
    # Nothing is grown again: the re-run's counts are the first run's, all of them.
    again, again_check = _rerun_completes(lab, target, None, baseline.planned, quarantined=bad,
                                          same_counts_as=first_check.counts)
    lab.memo[key] = episode = CorruptEpisode(baseline, target, corrupted, first, first_check, again, again_check)
    return episode


def judge_corruption(episode: CorruptEpisode, kind: str) -> FaultResult:
    """Did the shard corrupted by `kind` heal: quarantined with validation.json naming the object, regrown,
    published; the run complete with a clean run's plan counts (shards, instructions, trees); the re-run adding nothing?"""
    shard, at_fault = episode.corrupted[kind]
    expected = "exit 0 complete; quarantined with validation.json naming object+mismatch; regrown, published, " \
               "healed; plan counts = clean run; re-run adds nothing"
    failed = list(episode.first_check.failed)
    fate = episode.first_check.fate(shard)
    if fate.get("fate") != "published" or not fate.get("healed"):
        failed.append(f"fate {fate or 'missing from summary'}")
    store = episode.target.store
    validation_key = quarantine_prefix(RUN_ID, shard) + VALIDATION
    try:
        validation = store.get_json(validation_key)
    except Exception as exc:  # noqa: BLE001 — reported as what was seen
        validation = {}
        failed.append(f"no {validation_key}: {type(exc).__name__}")
    named = str(validation.get("object", ""))
    if validation and (validation.get("kind") != "integrity" or not named.endswith(at_fault)
                       or not validation.get("mismatch")):
        failed.append(f"validation.json kind={validation.get('kind')!r} object={named!r} "
                      f"mismatch={str(validation.get('mismatch'))[:80]!r}")
    if episode.again_check.failed:
        failed.append("re-run: " + _problems(episode.again_check.failed, 1))
    again_fates = [f.get("fate") for f in episode.again_check.summary.get("fates") or ()]
    if again_fates != ["reused"] * len(episode.baseline.planned):
        failed.append(f"re-run fates {again_fates}, expected every shard reused")
    observed = (f"{episode.first.brief()}; fate {fate.get('fate', '?')}, healed: {str(fate.get('healed'))[-70:]!r}; "
                f"validation.json mismatch={str(validation.get('mismatch', '-'))[:60]!r}; "
                f"{counts_text(episode.first_check.counts)}; re-run {episode.again.brief()}")
    if failed:
        observed += " ! " + _problems(failed)
    return FaultResult(kind, expected, observed, not failed)


def corruption_scenario(kind: str) -> Callable[[Path], FaultResult]:
    def scenario(work_dir: Path) -> FaultResult:
        return judge_corruption(corrupt_episode(lab_for(work_dir), (kind,)), kind)

    scenario.__doc__ = f"A landed shard corrupted as {kind} heals in the same run."
    return scenario


def all_corruptions(work_dir: Path) -> list[FaultResult]:
    """Every corruption at once, one shard each, in one resumed run (what the tests run: one episode, four faults)."""
    episode = corrupt_episode(lab_for(work_dir), tuple(CORRUPTIONS))
    return [judge_corruption(episode, kind) for kind in CORRUPTIONS]


# --- the object store down while a shard lands ---------------------------------------------------------


def s3_outage(work_dir: Path, seconds: float | None, *, name: str, store_retries: int | None = None) -> FaultResult:
    """SeaweedFS stopped when a shard writes its first Parquet file (another shard has landed), started again on
    the same ports `seconds` later (None: once the run has ended); the run goes through a proxy that sees the
    write (and drops what the stopped store cannot answer)."""
    lab = lab_for(work_dir)
    baseline = clean_run(lab)
    triggered: dict[str, str] = {}
    outage: list[threading.Thread] = []
    manifests_put = []
    lock = threading.Lock()

    def decide(method: str, path: str, body: bytes) -> str:
        if method == "PUT" and path.endswith("/" + MANIFEST) and f"/runs/{RUN_ID}/shards/" in path:
            manifests_put.append(path)
        with lock:
            if (not triggered and manifests_put and method == "PUT" and f"/runs/{RUN_ID}/shards/" in path
                    and path.split("?")[0].endswith(".parquet")):
                triggered["shard"] = path.split("/shards/")[1].split("/")[0]
                triggered["key"] = path.split("?")[0]
                if seconds is None:
                    lab.seaweed.stop()  # started again after the run
                else:
                    outage.append(lab.seaweed.outage(seconds))  # returns once the store has stopped
        return FORWARD

    with FaultProxy(lambda: lab.seaweed.url, decide) as proxy:
        target = lab.target(name, store_url=proxy.url, store_retries=store_retries)
        direct = ObjectStore(dataclasses.replace(target.cfg.object_store, endpoint_url=lab.seaweed.url, retries=0))
        first = lab.run(target, "run.log", store=direct)
        for thread in outage:
            thread.join(timeout=(seconds or 0) + 120)
        lab.seaweed.start()  # a no-op when the outage thread already did
        shard = triggered.get("shard", "?")
        failed = [] if triggered else ["the outage never began (no shard landed while another was landing)"]
        retried_out = seconds is None or seconds > 30
        if not retried_out:
            expected = "exit 0 complete (retries ride it out); plan counts = clean run; every shard landed once"
            check = check_complete(target, first, baseline.planned, baseline.plan_counts)
            failed += check.failed
            observed = (f"{first.brief()}; store down {lab.seaweed.down_s[-1] if outage else '-'} s from "
                        f"{triggered.get('key', '-')}; {counts_text(check.counts)}")
        else:
            expected = ("exit 1 or 3; nothing of the failed shard published, no partial snapshot; "
                        "re-run exit 0 complete, plan counts = clean run")
            check = check_state(target, baseline.planned)
            failed += check.failed
            if first.code not in (1, 3):
                failed.append(f"exit {first.code}")
            if any(shard in rows for rows in check.facts.get("per_shard", {}).values()):
                failed.append(f"rows of shard {shard} published")
            again, again_check = _rerun_completes(lab, target, baseline, baseline.planned)
            failed += ["re-run: " + p for p in again_check.failed]
            down = f"{lab.seaweed.down_s[-1]} s" if outage else "until the run ended"
            observed = (f"{first.brief()}: {first.error_line()[:90]!r}; store down {down} from "
                        f"{triggered.get('key', '-')}: shard {shard} published "
                        f"{'no' if not any(shard in r for r in check.facts.get('per_shard', {}).values()) else 'YES'}"
                        f" rows; re-run {again.brief()}, {counts_text(again_check.counts)}")
    if failed:
        observed += " ! " + _problems(failed)
    return FaultResult(name, expected, observed, not failed)


# --- the model server: killed and restarted; answering 500, 400, garbage -------------------------------

# One shard of 6 instructions × 4 strategies: 24 requests, so one failed request (4 %) stays under
# run.max_failed_request_share (5 %). No hard negatives: every node is a request's answer or a root, so the
# nodes a failed request drops can be counted.
MODEL_RUN = """\
[run]
instructions_per_shard = 6
strategies = ["step_by_step", "plan_first", "work_backwards", "program"]
samples_per_strategy = 1
turns = 1
max_tokens = 32
mcts_iterations = 0
jury_pairs = 0
jury_canaries = 0
hard_negatives_per_tree = 0

[orchestration]
verify_workers = 1

[[seeds]]
kind = "arithmetic"
count = 6
difficulty = 1
seed = 9
"""
MODEL_REQUESTS, MODEL_TREES = 24, 6


def model_server_killed(work_dir: Path) -> FaultResult:
    """The llama.cpp server SIGKILLed once the first shard has landed (others mid-growth), restarted on the same
    port 1 s later."""
    lab = lab_for(work_dir)
    baseline = clean_run(lab)
    target = lab.target("model-killed")
    restarts: list[threading.Thread] = []

    def act(watch: fault_lab.Watch) -> None:
        if not restarts and watch.landed and len(watch.landed) < len(baseline.planned):
            restarts.append(lab.llama.outage(1.0, kill=True))

    first = lab.run(target, "run.log", act=act)
    for thread in restarts:
        thread.join(timeout=120)
    lab.llama.start()
    check = check_state(target, baseline.planned)
    failed = [] if restarts else ["the server was never killed (every shard landed between two looks)"]
    failed += check.failed
    mismatch = _exit_matches_status(first, check)
    failed += [mismatch] if mismatch else []
    requests = check.summary.get("requests") or {}
    expected = ("exit 0 complete (failed requests counted) or 3/1 with the shards past 5 % failed requests "
                "failed; no partial snapshot; then (re-run if needed) exit 0 complete, every shard landed once")
    if first.code == 0:
        again, again_check = first, check_complete(target, first, baseline.planned, None)
    else:
        again, again_check = _rerun_completes(lab, target, None, baseline.planned)
    failed += ["completion: " + p for p in again_check.failed]
    observed = (f"{first.brief()}; server down {lab.llama.down_s[-1] if lab.llama.down_s else '-'} s; requests "
                f"failed {requests.get('failed', '?')} {requests.get('failed_by_reason', '')}; then {again.brief()}, {counts_text(again_check.counts)}")
    if failed:
        observed += " ! " + _problems(failed)
    return FaultResult("model-server-killed", expected, observed, not failed)


def _chat_faults(pick: Callable[[bytes], str]) -> tuple[Callable[[str, str, bytes], str], set[bytes]]:
    """A proxy decision faulting the chat/completion requests `pick` chooses; and the set of faulted bodies."""
    faulted: set[bytes] = set()
    lock = threading.Lock()

    def decide(method: str, path: str, body: bytes) -> str:
        if method != "POST" or not path.startswith("/v1/") or "completions" not in path:
            return FORWARD
        with lock:
            action = pick(body)
            if action != FORWARD:
                faulted.add(body)
        return action

    return decide, faulted


def first_request_faulted(action: str) -> Callable[[bytes], str]:
    """Fault the first request body seen, and every retry of it; forward everything else."""
    chosen: list[bytes] = []

    def pick(body: bytes) -> str:
        if not chosen:
            chosen.append(body)
        return action if body == chosen[0] else FORWARD

    return pick


def model_answers_once(work_dir: Path, action: str) -> FaultResult:
    """One request of 24 answered `action` on every attempt: it is counted as failed, its node is dropped, the
    run completes."""
    lab = lab_for(work_dir)
    healthy = threading.Event()
    once = first_request_faulted(action)
    decide, faulted = _chat_faults(lambda body: FORWARD if healthy.is_set() else once(body))
    name = f"model-{action}-one-request"
    with FaultProxy(lambda: lab.llama.url, decide) as proxy:
        target = lab.target(name, run_toml=MODEL_RUN, model_url=proxy.url)
        planned = lab.planned(target)
        first = lab.run(target, "run.log")
        answered = dict(proxy.answered)
        check = check_complete(target, first, planned, None)
        healthy.set()  # a re-run of a completed run sends nothing; one of a failed run gets a healthy server
        again = lab.run(target, "rerun.log")
    failed = list(check.failed)
    requests = check.summary.get("requests") or {}
    if requests.get("failed") != 1 or sum((requests.get("failed_by_reason") or {}).values()) != 1:
        failed.append(f"summary requests {requests or 'missing'}")
    nodes = MODEL_TREES + MODEL_REQUESTS - 1  # roots + one answer per request, less the failed one
    if check.counts.get("nodes") != nodes:
        failed.append(f"{check.counts.get('nodes')} nodes, expected {nodes}")
    again_check = check_complete(target, again, planned, check.counts if not check.failed else None)
    failed += ["re-run: " + p for p in again_check.failed]
    expected = f"exit 0 complete; requests.failed 1 with its reason; {nodes} nodes (1 dropped); re-run adds nothing"
    observed = (f"{first.brief()}; proxy answered {answered}; requests failed {requests.get('failed', '?')} "
                f"{requests.get('failed_by_reason', '')}; {counts_text(check.counts)}; re-run {again.brief()}")
    if failed:
        observed += " ! " + _problems(failed)
    return FaultResult(name, expected, observed, not failed)


def model_answers_many(work_dir: Path) -> FaultResult:
    """Half the requests (by body hash) answered 500, 400 or garbage on every attempt: the shard fails; the
    re-run against a healthy server completes."""
    lab = lab_for(work_dir)
    healthy = threading.Event()

    def pick(body: bytes) -> str:
        if healthy.is_set() or not body_share(body, 0.5):
            return FORWARD
        return ("500", "400", "garbage")[int(hashlib.sha256(body).hexdigest()[8:10], 16) % 3]

    decide, faulted = _chat_faults(pick)
    name = "model-500-400-garbage-many"
    with FaultProxy(lambda: lab.llama.url, decide) as proxy:
        target = lab.target(name, run_toml=MODEL_RUN, model_url=proxy.url)
        planned = lab.planned(target)
        first = lab.run(target, "run.log")
        answered = dict(proxy.answered)
        check = check_state(target, planned)
        failed = list(check.failed)
        if first.code != 1:
            failed.append(f"exit {first.code}")
        if any(check.facts.get("per_shard", {}).values()):
            failed.append("rows published")
        requests = check.summary.get("requests") or {}
        fates = [f.get("fate") for f in check.summary.get("fates") or ()]
        reasons = [str(f.get("reason", ""))[:110] for f in check.summary.get("fates") or ()]
        healthy.set()
        nodes = MODEL_TREES + MODEL_REQUESTS
        again = lab.run(target, "rerun.log")
    again_check = check_complete(target, again, planned, None)
    failed += ["re-run: " + p for p in again_check.failed]
    if again_check.counts.get("nodes") != nodes:
        failed.append(f"re-run: {again_check.counts.get('nodes')} nodes, expected {nodes}")
    expected = "exit 1 failed (shard past 5 % failed requests), nothing published; re-run on a healthy server " \
               f"exit 0 complete, {nodes} nodes"
    observed = (f"{first.brief()}; {len(faulted)} of {MODEL_REQUESTS} requests faulted, proxy answered {answered}; "
                f"fates {fates or '?'} ({'; '.join(reasons)}); summary requests.failed {requests.get('failed', '?')}; "
                f"re-run {again.brief()}, "
                f"{counts_text(again_check.counts)}")
    if failed:
        observed += " ! " + _problems(failed)
    return FaultResult(name, expected, observed, not failed)


# --- the nightly flow SIGKILLed at each stage (was bench/crash_resume.py) ----------------------------


def _kill_growth(baseline: Baseline) -> Callable[[fault_lab.Watch], bool]:
    """Half-way through the clean run's growth (from the growth log line to its last landing)."""
    events = baseline.attempt.watch.events
    growth_s = max(t for e, t in events.items() if e.startswith("landed:")) - events["growth"]
    return lambda watch: "growth" in watch.events and watch.elapsed() >= watch.events["growth"] + growth_s / 2


def _kill_landing(baseline: Baseline) -> Callable[[fault_lab.Watch], bool]:
    """While a shard is half-written (some Parquet files, no manifest), once another has landed."""
    return lambda watch: bool(watch.landed) and bool(watch.landing)


def _kill_validation(baseline: Baseline) -> Callable[[fault_lab.Watch], bool]:
    """Every shard landed, the lake not yet opened: the GX suites are running."""
    def due(watch: fault_lab.Watch) -> bool:
        landed_all = len(watch.landed) == len(baseline.planned)
        last = max((t for e, t in watch.events.items() if e.startswith("landed:")), default=0.0)
        return landed_all and "lake" not in watch.events and watch.elapsed() >= last + 0.5

    return due


def _kill_materialise(baseline: Baseline) -> Callable[[fault_lab.Watch], bool]:
    """Inside the publishing transaction: its data files are in the bucket, the commit not yet made."""
    return lambda watch: "lake data" in watch.events


KILL_POINTS = {"growth": _kill_growth, "landing": _kill_landing, "validation": _kill_validation,
               "materialise": _kill_materialise}


def _phase_at_kill(watch: fault_lab.Watch, planned: int) -> str:
    if "published" in watch.events:
        return "report"
    if "lake data" in watch.events:
        return "materialise (data files written)"
    if "lake" in watch.events:
        return "materialise (opening)"
    if watch.landing:
        return "landing"
    if len(watch.landed) < planned:
        return "growth" if "growth" in watch.events else "startup"
    return "validation"


def sigkill_at(work_dir: Path, stage: str) -> FaultResult:
    """`orchard run` and all its processes SIGKILLed at `stage`; the same run id run again to completion."""
    lab = lab_for(work_dir)
    baseline = clean_run(lab)
    target = lab.target(f"sigkill-{stage}")
    due = KILL_POINTS[stage](baseline)
    tight = stage in ("landing", "materialise")  # a shard lands, and a transaction commits, within milliseconds
    killed = lab.run(target, "killed.log", kill_when=due, poll_s=lambda watch: 0.002 if tight else fault_lab.POLL_S)
    failed = []
    if killed.code is not None:
        failed.append(f"never killed: the run ended first (rc {killed.code})")
        phase = "-"
    else:
        phase = _phase_at_kill(killed.watch, len(baseline.planned))
    after_kill = check_state(target, baseline.planned)
    failed += ["after the kill: " + p for p in after_kill.failed]
    again, again_check = _rerun_completes(lab, target, baseline, baseline.planned)
    failed += ["re-run: " + p for p in again_check.failed]
    same_text = again_check.facts.get("digest") == baseline.digest
    expected = "re-run exit 0 complete; every shard landed once, intact; plan counts = clean run; no partial snapshot"
    observed = (f"killed in {phase} at {killed.wall_s:.1f} s with {len(killed.watch.landed)}/{len(baseline.planned)} "
                f"landed{' +1 half-landed' if killed.watch.landing else ''}; re-run {again.brief()}, "
                f"{counts_text(again_check.counts)}, node texts {'identical' if same_text else 'differ'}")
    if killed.stragglers:
        observed += f"; {len(killed.stragglers)} processes outlived the group (killed by pid)"
    if failed:
        observed += " ! " + _problems(failed)
    return FaultResult(f"sigkill-{stage}", expected, observed, not failed)


# --- stopped by a signal, and killed alone (issue 26) --------------------------------------------------

STOP_BOUND_S = 15.0


def stopped_by_signal(work_dir: Path, sig: signal.Signals, *, group: bool) -> FaultResult:
    """SIGTERM to `orchard run` (as systemd, a container runtime or Prefect sends it), or SIGINT to its whole process
    group (a terminal's Ctrl-C), half-way through growth; then the same run id again."""
    name = f"{sig.name.lower()}-growth"
    lab = lab_for(work_dir)
    baseline = clean_run(lab)
    target = lab.target(name)
    half_way, at = _kill_growth(baseline), {}

    def due(watch: fault_lab.Watch) -> bool:
        if half_way(watch):
            at.update(phase=_phase_at_kill(watch, len(baseline.planned)), landed=len(watch.landed))
            return True
        return False

    stopped = lab.run(target, "stopped.log", signal_when=due, stop_signal=sig, signal_group=group)
    events, failed = stopped.watch.events, []
    want = 128 + sig
    if "signalled" not in events:
        failed.append(f"never signalled: the run ended first (rc {stopped.code})")
    took = events.get("exit", 0.0) - events.get("signalled", 0.0)
    if stopped.code != want:
        failed.append(f"exit {stopped.code}, not {want}")
    if took > STOP_BOUND_S:
        failed.append(f"stopped {took:.1f} s after the signal (bound {STOP_BOUND_S:g} s)")
    if stopped.stragglers:
        failed.append(f"{len(stopped.stragglers)} processes outlived it: {stopped.stragglers[0]}")
    said = [line for line in stopped.watch.log_text.splitlines() if line.startswith("orchard: run") and "stopped by" in line]
    if not said:
        failed.append("the console did not say the run stopped")
    after = check_state(target, baseline.planned)
    failed += ["after the stop: " + p for p in after.failed]
    again, again_check = _rerun_completes(lab, target, baseline, baseline.planned)
    failed += ["re-run: " + p for p in again_check.failed]
    expected = (f"exit {want} within {STOP_BOUND_S:g} s of the signal, the console says so, nothing left running, "
                "nothing partial; re-run exit 0 complete, plan counts = clean run")
    observed = (f"{sig.name} {'to the group' if group else 'to orchard run'} in {at.get('phase', '-')} at "
                f"{events.get('signalled', 0.0):.1f} s ({at.get('landed', 0)}/{len(baseline.planned)} landed); exit "
                f"{stopped.code} {took:.1f} s later, "
                f"{len(stopped.stragglers)} processes left; re-run {again.brief()}, {counts_text(again_check.counts)}")
    if failed:
        observed += " ! " + _problems(failed)
    return FaultResult(name, expected, observed, not failed)


def sigkill_alone(work_dir: Path) -> FaultResult:
    """SIGKILL of `orchard run` alone, not its process group (the OOM killer, a crashed host process), mid-growth, in a
    run that started its own model server and Prefect API: they, its verification and validation processes must end
    by themselves; the same run id again completes (before, the orphaned servers held the store's lock)."""
    lab = lab_for(work_dir)
    baseline = clean_run(lab)
    target = lab.target("sigkill-alone")
    own = target.config_path.read_text().replace('kind = "openai"', 'kind = "embedded"\nthreads = 1', 1)
    own = re.sub(r"base_urls = .*\nstructured_output = .*\n", "", own, count=1)
    target.config_path.write_text(own)
    target = dataclasses.replace(target, cfg=fault_lab.load_config(target.config_path, environ={}))
    killed = lab.run(target, "killed.log", kill_when=_kill_growth(baseline), kill_group=False, api_url=None)
    failed = []
    if killed.code is not None:
        failed.append(f"never killed: the run ended first (rc {killed.code})")
    if killed.stragglers:
        failed.append(f"{len(killed.stragglers)} processes outlived it by {fault_lab.ORPHAN_GRACE_S:g} s: "
                      f"{killed.stragglers[0]}")
    after = check_state(target, baseline.planned)
    failed += ["after the kill: " + p for p in after.failed]
    again, again_check = _rerun_completes(lab, target, baseline, baseline.planned)
    failed += ["re-run: " + p for p in again_check.failed]
    expected = (f"its model server, Prefect API and worker processes end by themselves within "
                f"{fault_lab.ORPHAN_GRACE_S:g} s; nothing partial; re-run exit 0 complete, plan counts = clean run")
    observed = (f"killed at {killed.wall_s:.1f} s with {len(killed.watch.landed)}/{len(baseline.planned)} landed; "
                f"{len(killed.stragglers)} processes left after {fault_lab.ORPHAN_GRACE_S:g} s; re-run {again.brief()}, "
                f"{counts_text(again_check.counts)}")
    if failed:
        observed += " ! " + _problems(failed)
    return FaultResult("sigkill-alone", expected, observed, not failed)


def disk_full(work_dir: Path) -> FaultResult:
    """The disk under the state directory (a 256 MB tmpfs: its logs, the lake's catalog) filled up once growth has
    started; then space freed and the same run id run again. Where the machine cannot mount a tmpfs, it says so."""
    lab = lab_for(work_dir)
    baseline = clean_run(lab)
    target = lab.target("disk-full")
    disk = target.config_path.parent / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode:
        return FaultResult("disk-full", "a full disk under the state directory", "not run: this machine cannot mount "
                           f"a tmpfs ({mounted.stderr.strip()[:100]})", True)
    filler = disk / "filler"
    try:
        toml = re.sub(r"^state_dir = .*$", f"state_dir = {json.dumps(str(disk))}", target.config_path.read_text(),
                      count=1, flags=re.M)
        target.config_path.write_text(toml)
        target = dataclasses.replace(target, cfg=fault_lab.load_config(target.config_path, environ={}))

        def fill(watch: fault_lab.Watch) -> None:
            if "growth" in watch.events and "filled" not in watch.events:
                with open(filler, "wb") as out, contextlib.suppress(OSError):  # until ENOSPC
                    while True:
                        out.write(b"\0" * (1 << 20))
                watch.mark("filled")

        full = lab.run(target, "full.log", act=fill)
        failed = []
        said = [line for line in full.watch.log_text.splitlines() if line.startswith("orchard: ")]
        space = bool(said) and ("is full" in said[-1] or "No space left" in said[-1])
        if full.code == 0:
            failed.append("exit 0 on a full disk")
        if not space:
            failed.append("its last line does not name the full disk")
        after = check_state(target, baseline.planned)
        failed += ["after the full disk: " + p for p in after.failed]
        filler.unlink()
        again, again_check = _rerun_completes(lab, target, baseline, baseline.planned)
        failed += ["re-run: " + p for p in again_check.failed]
        expected = ("exit non-zero (nothing published) with one line naming the cause; nothing partial; space freed, "
                    "re-run exit 0 complete, plan counts = clean run")
        observed = (f"filled at {full.watch.events.get('filled', 0.0):.1f} s; {full.brief()}: "
                    f"{(said[-1] if said else 'nothing said')[:160]}; "
                    f"re-run {again.brief()}, {counts_text(again_check.counts)}")
        if failed:
            observed += " ! " + _problems(failed)
        return FaultResult("disk-full", expected, observed, not failed)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def prefect_api_gone(work_dir: Path) -> FaultResult:
    """The Prefect API the run started for itself SIGKILLed once growth has started: the run ends with a truthful exit
    code and status, nothing partial is published, and the same run id run again completes."""
    from orchard import services

    lab = lab_for(work_dir)
    baseline = clean_run(lab)
    target = lab.target("prefect-api-gone")

    def kill_api(watch: fault_lab.Watch) -> None:
        if "growth" in watch.events and "api killed" not in watch.events:
            for record in services.services_of(target.cfg.state_path):
                if record["name"] == "prefect-api":
                    os.kill(record["pid"], signal.SIGKILL)
                    watch.mark("api killed")

    gone = lab.run(target, "api-gone.log", act=kill_api, api_url=None)
    failed = []
    if "api killed" not in gone.watch.events:
        failed.append(f"the API was never killed (rc {gone.code})")
    after = check_state(target, baseline.planned)
    failed += ["after the outage: " + p for p in after.failed]
    status = after.summary.get("status") or gone.status
    if gone.code == 0 and status != "complete":
        failed.append(f"exit 0 but status {status or 'none'}")
    if gone.code != 0 and status == "complete":
        failed.append(f"status complete but exit {gone.code}")
    if gone.stragglers:
        failed.append(f"{len(gone.stragglers)} processes outlived it: {gone.stragglers[0]}")
    said = [line for line in gone.watch.log_text.splitlines() if line.startswith("orchard: ")]
    again, again_check = _rerun_completes(lab, target, baseline, baseline.planned)
    failed += ["re-run: " + p for p in again_check.failed]
    expected = ("exit code and status agree (0 complete, else non-zero and nothing published); nothing partial; nothing "
                "left running; re-run exit 0 complete, plan counts = clean run")
    observed = (f"API killed at {gone.watch.events.get('api killed', 0.0):.1f} s; {gone.brief()}"
                f"{': ' + said[-1][:120] if said else ''}; re-run {again.brief()}, {counts_text(again_check.counts)}")
    if failed:
        observed += " ! " + _problems(failed)
    return FaultResult("prefect-api-gone", expected, observed, not failed)


# --- seed text screened before planning (issue 26) ------------------------------------------------------

def _seed_file(target: Target, lines: list[bytes]) -> Path:
    path = target.config_path.parent / "seeds.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def _seeded(lab: Lab, name: str, lines: list[bytes]) -> tuple[Target, Path]:
    """A target whose seeds are a GSM8K-format file of `lines` instead of the small run's arithmetic."""
    target = lab.target(name)
    path = _seed_file(target, lines)
    arithmetic = "[[seeds]]\nkind = \"arithmetic\"\ncount = 4\ndifficulty = 1\nseed = 5\n"
    toml = target.config_path.read_text()
    assert arithmetic in toml, "the small run's seeds changed: update _seeded"
    target.config_path.write_text(toml.replace(arithmetic, f"[[seeds]]\nkind = \"gsm8k\"\npath = {json.dumps(str(path))}\n"))
    return dataclasses.replace(target, cfg=fault_lab.load_config(target.config_path, environ={})), path


def _gsm8k(question: str, answer: int) -> bytes:
    return json.dumps({"question": question, "answer": f"#### {answer}"}).encode()


def seed_not_utf8(work_dir: Path) -> FaultResult:
    """A GSM8K-format file with one line of Latin-1: one error naming the file, the line and the byte; nothing planned
    or landed; fixed, the same run id completes."""
    lab = lab_for(work_dir)
    good = [_gsm8k("What is 12 + 30?", 42), _gsm8k("What is 6 times 7?", 42)]
    bad = b'{"question": "How many caf\xe9s are on a street of 3 blocks with 2 each?", "answer": "#### 6"}'
    target, path = _seeded(lab, "seed-not-utf8", [good[0], bad, good[1]])
    first = lab.run(target, "bad-seeds.log")
    failed = []
    errors = [line for line in first.watch.log_text.splitlines() if line.startswith("orchard: ")]
    at = bad.index(0xE9) + 1
    want = f"{path}: line 2: not valid UTF-8 at byte {at} of the line"
    if first.code == 0 or not any(want in line for line in errors):
        failed.append(f"rc {first.code}, said {errors[-1][:160] if errors else 'nothing'}")
    if "Traceback" in first.watch.log_text.split("orchard: ")[0][-2000:]:
        failed.append("a traceback on the console")
    landed = target.store.list_keys(f"runs/{RUN_ID}/shards/")
    if landed:
        failed.append(f"{len(landed)} objects landed from a bad seed file")
    _seed_file(target, [good[0], bad.replace(b"\xe9", "é".encode()), good[1]])
    planned = lab.planned(target)
    again, again_check = _rerun_completes(lab, target, None, planned, same_counts_as={"instructions": 3})
    failed += ["re-run: " + p for p in again_check.failed]
    expected = "exit non-zero with one line naming file, line and byte; nothing landed; fixed, re-run exit 0 complete"
    observed = (f"rc {first.code}: {(errors[-1] if errors else '')[:150]}; "
                f"{len(landed)} objects landed; fixed, re-run {again.brief()}, {counts_text(again_check.counts)}")
    if failed:
        observed += " ! " + _problems(failed)
    return FaultResult("seed-not-utf8", expected, observed, not failed)


def seed_too_long(work_dir: Path) -> FaultResult:
    """A GSM8K-format file with a 20 MB question (millions of tokens) between two short ones: dropped at the seed
    stage with its reason in `drops`, never sent; the run completes with the other two."""
    lab = lab_for(work_dir)
    huge = "How many apples are there? " + "apple " * 3_500_000  # ~21 MB
    target, _ = _seeded(lab, "seed-too-long",
                        [_gsm8k("What is 12 + 30?", 42), _gsm8k(huge, 7), _gsm8k("What is 6 times 7?", 42)])
    planned = lab.planned(target)
    run = lab.run(target, "run.log")
    check = check_complete(target, run, planned, {"instructions": 2})
    failed = list(check.failed)
    from orchard import lake

    drops = lake.query(target.cfg, f"SELECT reason, count FROM drops WHERE run_id = '{RUN_ID}' AND stage = 'seeds'")[1]
    too_long = [(reason, n) for reason, n in drops if reason.startswith("prompt too long")]
    if not too_long:
        failed.append(f"no 'prompt too long' drop (drops: {drops})")
    longest = lake.query(target.cfg, "SELECT max(length(text)) FROM instructions")[1][0][0]
    if longest and longest > 1000:
        failed.append(f"an instruction of {longest} characters was grown")
    expected = "the 20 MB row dropped at the seed stage with its reason in drops; run exit 0 complete with the other 2"
    observed = (f"{run.brief()}, {counts_text(check.counts)}; drops: "
                f"{too_long[0][0][:100] + '…' if too_long else 'none'}")
    if failed:
        observed += " ! " + _problems(failed)
    return FaultResult("seed-too-long", expected, observed, not failed)


# --- the Postgres catalog stopped during a publish ----------------------------------------------


def postgres_down_in_publish(work_dir: Path) -> FaultResult:
    """The lake's Postgres catalog stopped (immediate) once the publishing transaction has written data files;
    started again after the run; the re-run publishes the landed shards without growing them again."""
    lab = lab_for(work_dir)
    baseline = clean_run(lab)
    postgres = lab.postgres
    target = lab.target("postgres-down", catalog=postgres.create_database())
    stopped: list[float] = []

    def act(watch: fault_lab.Watch) -> None:
        if not stopped and "lake data" in watch.events:
            postgres.stop()
            stopped.append(watch.elapsed())

    try:
        first = lab.run(target, "run.log", act=act,
                        poll_s=lambda w: 0.002 if len(w.landed) == len(baseline.planned) else fault_lab.POLL_S)
    finally:
        postgres.start()
    failed = [] if stopped else ["the catalog was never stopped (no publish seen writing data files)"]
    check = check_state(target, baseline.planned)
    failed += check.failed
    if first.code in (0, None):
        failed.append(f"exit {first.code}")
    if first.code == 2 and not any(line.startswith("orchard: error:") for line in first.watch.log_text.splitlines()):
        failed.append("exit 2 without the CLI's one-line error")
    if any(check.facts.get("per_shard", {}).values()) or check.facts.get("runs"):
        failed.append("something of the run was published")
    before = {s: m.get("landed_at") for s, m in check.bucket.get("manifests", {}).items()}
    again, again_check = _rerun_completes(lab, target, baseline, baseline.planned)
    failed += ["re-run: " + p for p in again_check.failed]
    after = {s: m.get("landed_at") for s, m in again_check.bucket.get("manifests", {}).items()}
    regrown = sorted(s for s in before if after.get(s) != before[s])
    if regrown:
        failed.append(f"re-run grew landed shards again: {regrown}")
    expected = "exit non-zero, nothing published; re-run (catalog back) exit 0 complete reusing the landed shards " \
               "(not regrown), plan counts = clean run"
    observed = (f"{first.brief()}: {first.error_line()[:90]!r}; catalog stopped at {round(stopped[0], 1) if stopped else '-'} s, {len(before)} shards "
                f"landed then; published rows {sum(sum(t.values()) for t in check.facts.get('per_shard', {}).values())}"
                f"; re-run {again.brief()}, regrown {len(regrown)}, {counts_text(again_check.counts)}")
    if failed:
        observed += " ! " + _problems(failed)
    return FaultResult("postgres-down-in-publish", expected, observed, not failed)


# --- the suite ---------------------------------------------------------------------------------------

SCENARIOS: dict[str, Callable[[Path], FaultResult]] = {
    **{kind: corruption_scenario(kind) for kind in CORRUPTIONS},
    "s3-down-1s": lambda work: s3_outage(work, 1.0, name="s3-down-1s"),
    "s3-down-2min": lambda work: s3_outage(work, 120.0, name="s3-down-2min"),
    # What the tests can afford: a store that stays down until the run gives up, with one retry (~2 s) per call.
    "s3-down-past-retries": lambda work: s3_outage(work, None, name="s3-down-past-retries", store_retries=1),
    "model-server-killed": model_server_killed,
    "model-500-one-request": lambda work: model_answers_once(work, "500"),
    "model-400-one-request": lambda work: model_answers_once(work, "400"),
    "model-garbage-one-request": lambda work: model_answers_once(work, "garbage"),
    "model-500-400-garbage-many": model_answers_many,
    **{f"sigkill-{stage}": (lambda stage: lambda work: sigkill_at(work, stage))(stage) for stage in KILL_POINTS},
    "postgres-down-in-publish": postgres_down_in_publish,
    "sigterm-growth": lambda work: stopped_by_signal(work, signal.SIGTERM, group=False),
    "sigint-growth": lambda work: stopped_by_signal(work, signal.SIGINT, group=True),
    "sigkill-alone": sigkill_alone,
    "disk-full": disk_full,
    "prefect-api-gone": prefect_api_gone,
    "seed-not-utf8": seed_not_utf8,
    "seed-too-long": seed_too_long,
}


def cluster_scenarios() -> dict[str, Callable[[Path], FaultResult]]:
    """The cluster helper's scenarios (bench/fault_cluster.py), when that file exists, as FaultResult scenarios."""
    path = Path(__file__).with_name("fault_cluster.py")
    if not path.exists():
        return {}
    module = importlib.import_module("fault_cluster")  # bench/ is on sys.path (see the top of this file)

    def wrap(name: str, scenario: Callable[[Path], tuple[str, str, bool]]) -> Callable[[Path], FaultResult]:
        def run(work: Path) -> FaultResult:
            (work / name).mkdir(parents=True, exist_ok=True)
            expected, observed, passed = scenario(work / name)
            return FaultResult(name, expected, observed, bool(passed))

        return run

    return {name: wrap(name, scenario) for name, scenario in module.SCENARIOS.items()}


def run_scenario(name: str, scenario: Callable[[Path], FaultResult], work: Path) -> FaultResult:
    """Run one scenario; a scenario that raises is a failed fault with the error as what was observed."""
    try:
        return scenario(work)
    except Exception as exc:  # noqa: BLE001 — the suite reports it and goes on with the next fault
        traceback.print_exc(file=sys.stderr)
        return FaultResult(name, "(scenario ran)", f"scenario raised {type(exc).__name__}: {str(exc)[:300]}", False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these faults")
    parser.add_argument("--work-dir", type=Path, help="state, configs and logs (default: a new temporary dir)")
    parser.add_argument("--list", action="store_true", help="list the faults and exit")
    args = parser.parse_args(argv)
    ours, theirs = dict(SCENARIOS), cluster_scenarios()
    every = {**ours, **theirs}
    if args.list:
        print("\n".join(every))
        return 0
    unknown = sorted(set(args.only or ()) - set(every))
    if unknown:
        parser.error(f"unknown fault(s) {unknown}; --list shows them")
    chosen = [n for n in every if not args.only or n in args.only]
    work = (args.work_dir or Path(tempfile.mkdtemp(prefix="orchard-faults-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))  # planning shards imports Prefect: its home here
    began = time.monotonic()
    results: list[FaultResult] = []
    print(f"work dir {work}", flush=True)
    with lab_session(work) as lab:
        print(f"SeaweedFS {lab.seaweed.url}, llama.cpp {lab.llama.url}", flush=True)
        print("fault | expected | observed | PASS/FAIL", flush=True)
        for name in chosen:
            if name in ours:
                result = run_scenario(name, ours[name], work)
            else:  # the cluster scenarios start their own servers
                result = run_scenario(name, theirs[name], work)
            results.append(result)
            print(result.line(), flush=True)
    passed = sum(r.passed for r in results)
    print(f"(wall {time.monotonic() - began:.0f} s; logs and state in {work})", file=sys.stderr)
    print(f"{passed} passed, {len(results) - passed} failed", flush=True)
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
