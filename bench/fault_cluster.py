"""Cluster faults of issue 12: under `orchard up`, a GPU worker (its whole process group, so the flow run it runs
too), or separately its model server, is SIGKILLed while it grows a shard of the `nightly` deployment's run.

Each scenario brings a cluster up in its work dir (or uses one it is given), starts the nightly deployment, waits
until a grow-shard run is mid-shard (its worker's model server decoding one of its requests), kills, and then
checks what a user checks: the nightly run ends (it does not hang) Completed with status `complete`; the killed
grow-shard run ends Crashed (worker) or Failed (model server) and its shard is grown by another worker; the lake
holds every planned shard once, as many rows per shard as its manifest says, no duplicate id, no snapshot with
part of the run; one `runs` row; and a second run of the same id completes again, reusing every shard and adding
no row.

    SCENARIOS: name -> (work_dir) -> (expected, observed, passed)     (bench/faults.py imports it)

Usage on its own: .venv/bin/python bench/fault_cluster.py [--only NAME...] [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.fault_lab import ID_COLUMNS  # noqa: E402
from orchard import lake  # noqa: E402
from orchard.cluster import Process, down, read_up, start_time, up  # noqa: E402
from orchard.config import Config, load_config  # noqa: E402
from orchard.services import free_ports  # noqa: E402
from orchard.store import ObjectStore  # noqa: E402
from schemas.rows import SHARD_TABLES  # noqa: E402
from tasks.land import landed_manifest  # noqa: E402

SHARDS = 3  # enough that both workers are busy when one is killed, and the survivor has more than its own to grow
RUN_TIMEOUT_S = 420.0  # a nightly run not final by then is hung: the worst outcome, and a failed scenario
MID_SHARD_TIMEOUT_S = 240.0

# One instruction per shard, one turn, one sample per strategy, one MCTS round, no jury: seconds per shard.
CLUSTER_RUN = """
state_dir = "{state}"
[run]
instructions_per_shard = 1
samples_per_strategy = 1
turns = 1
mcts_iterations = 1
max_tokens = 48
jury_pairs = 0
jury_canaries = 0
hard_negatives_per_tree = 0
[[seeds]]
kind = "arithmetic"
count = {shards}
difficulty = 1
[hygiene]
# One cluster's lake takes several runs of these same seeds (each scenario checks its own run): a later run must
# grow them again, not drop them as published by an earlier one.
dedup_against_lake = false
[orchestration]
api_port = {port}
gpu_workers = {gpu_workers}
crashed_after_s = {crashed_after_s}
"""


@contextlib.contextmanager
def cluster_up(work_dir: Path, *, gpu_workers: int = 2, shards: int = SHARDS,
               crashed_after_s: int = 60) -> Iterator[Config]:
    """`orchard up` in `work_dir` (its config a tiny run of `shards` shards); `orchard down` at the end."""
    work_dir.mkdir(parents=True, exist_ok=True)
    (port,) = free_ports(1)
    config_path = work_dir / "orchard.toml"
    config_path.write_text(CLUSTER_RUN.format(state=work_dir / "state", port=port, gpu_workers=gpu_workers,
                                              shards=shards, crashed_after_s=crashed_after_s))
    cfg = load_config(config_path, environ={})
    up(cfg, config_path, say=lambda _: None)
    try:
        yield cfg
    finally:
        down(cfg, say=lambda _: None)


@contextlib.contextmanager
def _api(cfg: Config) -> Iterator[object]:
    """A Prefect sync client on the cluster's API."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: read_up(cfg)["api_url"]}), get_client(sync_client=True) as client:
        yield client


def live_config(cfg: Config) -> Config:
    """`cfg` pointing at the cluster's store."""
    store_url = next(p.url for p in read_up(cfg)["processes"] if p.name == "seaweedfs")
    return cfg.replace(object_store=dataclasses.replace(cfg.object_store, endpoint_url=store_url))


# --- the faults ---------------------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    """The pids of every process below `pid` (read from /proc), found before a kill so none escapes it."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_worker(cfg: Config, worker: str, run: object = None) -> str:
    """SIGKILL GPU worker `worker`'s process group and every process below it (its flow-run subprocess)."""
    process = _process(cfg, f"worker-{worker}")
    below = _descendants(process.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    for pid in below:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return f"SIGKILLed worker {worker} (pid {process.pid}) and {len(below)} process(es) below it"


def kill_model_server(cfg: Config, worker: str, run: object = None) -> str:
    """SIGKILL the llama.cpp server(s) `orchard up` started for GPU worker `worker` (its worker keeps running)."""
    index = worker.rsplit("-", 1)[1]
    servers = [p for p in read_up(cfg)["processes"] if p.name.startswith(f"llama-gpu-{index}-") and p.running]
    for server in servers:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
    return f"SIGKILLed {', '.join(s.name for s in servers)} of worker {worker}"


CANCEL_TIMEOUT_S = 60.0  # a cancelled run not Cancelled by then: the scenario says how long it waited


def cancel_grow_run(cfg: Config, worker: str, run: object) -> dict[str, float | str]:
    """Cancel grow-shard run `run` through the Prefect API, as the UI's Cancel button does (state Cancelling; its
    worker sees it and sends its flow-run process SIGTERM); wait until it is final and that process is gone. Return
    its final state and how long each took (None: not within CANCEL_TIMEOUT_S)."""
    from prefect.states import Cancelling

    below = _descendants(_process(cfg, f"worker-{worker}").pid)
    started = time.monotonic()
    final = gone = None
    with _api(cfg) as client:
        client.set_flow_run_state(run.id, Cancelling(message="fault scenario: cancelled, as the UI's Cancel does"))
        while time.monotonic() - started < CANCEL_TIMEOUT_S and (gone is None or final is None):
            if gone is None and not any(start_time(pid) for pid in below):
                gone = time.monotonic() - started
            state = client.read_flow_run(run.id).state
            if final is None and state.is_final():
                final = time.monotonic() - started
            time.sleep(0.25)
    return {"state": f"{state.type.value} {state.name!r}", "final_s": final, "gone_s": gone}


def _seconds(value: float | str | None) -> str:
    return "never" if value is None else f"{float(value):.1f} s"


def _process(cfg: Config, name: str) -> Process:
    return next(p for p in read_up(cfg)["processes"] if p.name == name)


# --- one faulted run ----------------------------------------------------------------------------


@dataclass
class FaultedRun:
    """What a nightly deployment run with a fault did, as the Prefect API and the lake tell it."""

    run_id: str
    injected: str = ""
    victim: str = ""  # the GPU worker whose process or model server was killed
    killed_run: str = ""  # the grow-shard flow run that was growing on it
    nightly_state: str = ""
    hung: bool = False
    grow_states: list[tuple[str, str, str, str]] = field(default_factory=list)  # (name, state, worker, message)
    problems: list[str] = field(default_factory=list)


def _mid_shard(client: object, cfg: Config, run_id: str, alive: Callable[[str], bool]) -> tuple[object, str] | None:
    """A grow-shard run of `run_id` that is Running on a worker for which `alive` holds while that worker's model
    server decodes a request (so mid-shard, however fast its shard grows), and that worker's name; None if there is
    none yet."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterName,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    running = client.read_flow_runs(flow_run_filter=FlowRunFilter(
        name=FlowRunFilterName(like_=f"{run_id}-"),
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))))
    for run in running:
        worker = (run.labels or {}).get("prefect.worker.name")
        if worker and alive(worker) and _model_busy(cfg, worker):
            return run, worker
    return None


def _model_busy(cfg: Config, worker: str) -> bool:
    """Whether a model server of GPU worker `worker` (`orchard up`'s llama-gpu-<i>-…) is decoding a request now: its
    GET /slots has a slot processing. Only that worker's shard sends it requests."""
    index = worker.rsplit("-", 1)[1]
    for process in read_up(cfg)["processes"]:
        if not process.name.startswith(f"llama-gpu-{index}-"):
            continue
        try:
            slots = httpx.get(process.url + "/slots", timeout=2.0).json()
        except (httpx.HTTPError, ValueError):
            continue
        if any(slot.get("is_processing") for slot in slots):
            return True
    return False


def faulted_run(cfg: Config, run_id: str, inject: Callable[[Config, str, object], str], *,
                spare: Callable[[str], bool] = lambda _: True, max_shards: int | None = None) -> FaultedRun:
    """Start the nightly deployment for `run_id`, `inject` the fault into the first worker (for which `spare`
    holds) seen mid-shard, and wait, bounded, for the nightly run to end."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.deployments import run_deployment
    from prefect.states import Cancelled

    seen = FaultedRun(run_id)
    with _api(cfg) as client:
        nightly = run_deployment("nightly/nightly", parameters={"run_id": run_id, "max_shards": max_shards}, timeout=0,
                                 as_subflow=False)
        deadline = time.monotonic() + MID_SHARD_TIMEOUT_S
        found = None
        while found is None and time.monotonic() < deadline:
            found = _mid_shard(client, cfg, run_id, spare)
            if found is None:
                if client.read_flow_run(nightly.id).state.is_final():
                    break
                time.sleep(0.5)
        if found is None:
            seen.problems.append(f"no grow-shard run was seen mid-shard within {MID_SHARD_TIMEOUT_S:.0f} s")
        else:
            run, seen.victim = found
            seen.killed_run = run.name
            seen.injected = inject(cfg, seen.victim, run)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        state = client.read_flow_run(nightly.id).state
        while not state.is_final() and time.monotonic() < deadline:
            time.sleep(2.0)
            state = client.read_flow_run(nightly.id).state
        seen.nightly_state = f"{state.type.value} {state.name!r}"
        if not state.is_final():
            seen.hung = True
            seen.problems.append(f"the nightly run is still {state.name} {RUN_TIMEOUT_S:.0f} s after the fault: hung")
        grown = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_=f"{run_id}-")))
        for run in sorted(grown, key=lambda r: r.created):
            seen.grow_states.append((run.name, run.state.type.value if run.state else "?",
                                     (run.labels or {}).get("prefect.worker.name") or "-",
                                     (run.state.message or "")[:160] if run.state else ""))
        if seen.hung:  # stop what is left, so the cluster can go down and the next scenario starts clean
            for run in [nightly, *grown]:
                current = client.read_flow_run(run.id).state
                if current is not None and not current.is_final():
                    client.set_flow_run_state(run.id, Cancelled(message="fault scenario: hung"), force=True)
    return seen


# --- checks -------------------------------------------------------------------------------------


def lake_problems(cfg: Config, run_id: str, shards: int, *, reused: bool = False,
                  runs_row: tuple[str, int, int, int] | None = None,
                  earlier: dict[str, int] | None = None) -> tuple[list[str], dict[str, int]]:
    """What is wrong with `run_id` in the store and lake (empty: every shard in it once, whole; each snapshot holds
    none of the run's rows, all of them, or all an `earlier` publish of it had; its `runs` row (status, planned,
    published, reused) is `runs_row`: by default complete, with every shard published, or with `reused`, every shard
    reused), and the run's row counts per table."""
    want = runs_row or (("complete", shards, 0, shards) if reused else ("complete", shards, shards, 0))
    live = live_config(cfg)
    store = ObjectStore(live.object_store)
    problems: list[str] = []
    with lake.connect(live, read_only=True) as con:
        counts = {}
        per_shard: dict[str, dict[str, int]] = {}
        for table, column in ID_COLUMNS.items():
            rows, distinct = con.execute(f"SELECT count(*), count(DISTINCT {column}) FROM {table} WHERE run_id = ?",
                                         [run_id]).fetchone()
            counts[table] = rows
            if rows != distinct:
                problems.append(f"{table}: {rows} rows, {distinct} distinct {column}")
        for table in SHARD_TABLES:  # rows per shard (a run's own drops, before shards, have none: left out)
            per_shard[table] = dict(con.execute(f"SELECT shard_id, count(*) FROM {table} WHERE run_id = ? AND "
                                                "shard_id IS NOT NULL GROUP BY 1", [run_id]).fetchall())
        runs = con.execute("SELECT status, shards_planned, shards_published, shards_reused FROM runs WHERE run_id = ?",
                           [run_id]).fetchall()
        snapshots = [s["snapshot_id"] for s in lake.snapshot_rows(con)]
    shard_ids = sorted(per_shard["trees"])
    if len(shard_ids) != want[2] + want[3]:
        problems.append(f"{len(shard_ids)} shards in the lake, {want[2] + want[3]} expected")
    for shard_id in shard_ids:
        manifest = landed_manifest(store, run_id, shard_id)
        if manifest is None:
            problems.append(f"shard {shard_id} is in the lake without a landed manifest")
            continue
        for table in SHARD_TABLES:
            if per_shard[table].get(shard_id, 0) != manifest["files"][table]["rows"]:
                problems.append(f"shard {shard_id} {table}: {per_shard[table].get(shard_id, 0)} rows in the lake, "
                                f"manifest says {manifest['files'][table]['rows']}")
    got = [tuple(r) for r in runs]
    if got != [want]:
        problems.append(f"runs rows of {run_id} (status, planned, published, reused): {got}")
    for version in snapshots:  # every snapshot holds none or all of the run's rows
        with lake.connect(live, read_only=True, version=version) as con:
            tables = {row[0] for row in con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = ?",
                                                    [lake.LAKE]).fetchall()}
            for table in ID_COLUMNS:
                if table not in tables:
                    continue
                (rows,) = con.execute(f"SELECT count(*) FROM {table} WHERE run_id = ?", [run_id]).fetchone()
                if rows not in (0, counts[table], (earlier or {}).get(table, 0)):
                    problems.append(f"snapshot {version} holds {rows} of the run's {counts[table]} {table} rows")
                    break
    return problems, counts


def rerun_problems(cfg: Config, run_id: str, shards: int, counts: dict[str, int],
                   max_shards: int | None = None, *, left: int = 0) -> tuple[list[str], str]:
    """Run the nightly deployment for `run_id` again: it must complete, grow the `left` shards the first run did not
    publish, reuse every other and change none of its rows (with nothing left: add no row)."""
    from prefect.deployments import run_deployment

    with _api(cfg):
        again = run_deployment("nightly/nightly", parameters={"run_id": run_id, "max_shards": max_shards},
                               timeout=RUN_TIMEOUT_S,
                               poll_interval=2, as_subflow=False)
    problems = []
    if not (again.state.is_completed() and again.state.name == "Completed"):
        problems.append(f"the re-run ended {again.state.type.value} {again.state.name!r}: {again.state.message}")
    found, after = lake_problems(cfg, run_id, shards, runs_row=("complete", shards, left, shards - left),
                                 earlier=counts)
    problems += [f"after the re-run: {p}" for p in found]
    if (after != counts) if not left else any(after[t] < counts[t] for t in counts):
        problems.append(f"the re-run changed the run's rows: {counts} became {after}")
    return problems, again.state.name


def judge(seen: FaultedRun, cfg: Config, shards: int, killed_state: str,
          max_shards: int | None = None) -> tuple[str, str, bool]:
    """Compare a faulted run with what the fault suite expects of it; return (expected, observed, passed)."""
    expected = (f"nightly Completed (complete, {shards}/{shards} shards published); the killed grow-shard run "
                f"{killed_state} and its shard grown on another worker; no row lost or duplicated, no partial "
                f"snapshot; a re-run completes, reusing every shard")
    problems = list(seen.problems)
    if not seen.hung and seen.nightly_state != "COMPLETED 'Completed'":
        problems.append(f"nightly ended {seen.nightly_state}")
    killed = [s for s in seen.grow_states if s[0] == seen.killed_run]
    if seen.killed_run:
        states = [s[1] for s in killed]
        if killed_state.upper() not in states:
            problems.append(f"grow-shard runs named {seen.killed_run}: {states}, none {killed_state}")
        elsewhere = [s for s in killed if s[1] == "COMPLETED" and s[2] != seen.victim]
        if not elsewhere:
            problems.append(f"shard of {seen.killed_run} not grown on another worker: {killed}")
    counts: dict[str, int] = {}
    again = "not run"
    if not seen.hung:
        found, counts = lake_problems(cfg, seen.run_id, shards)
        problems += found
        if not found:
            rerun, again = rerun_problems(cfg, seen.run_id, shards, counts, max_shards)
            problems += rerun
    attempts = ", ".join(f"{s[1].lower()} on {s[2]}" for s in killed) or "none"
    observed = (f"{seen.injected or 'no fault injected'}; nightly {seen.nightly_state}; {seen.killed_run or '?'}: "
                f"{attempts}; lake {counts.get('trees', 0)} trees, {counts.get('nodes', 0)} nodes, "
                f"{counts.get('pairs', 0)} pairs; re-run {again}")
    if problems:
        observed += "; PROBLEMS: " + "; ".join(problems)[:900]
    return expected, observed, not problems


def gpu_worker_killed_on(cfg: Config, run_id: str = "fault-gpu-worker", *,
                         max_shards: int | None = None) -> tuple[str, str, bool]:
    """On a running cluster: SIGKILL a GPU worker's process group mid-shard; judge the run."""
    seen = faulted_run(cfg, run_id, kill_worker, max_shards=max_shards)
    return judge(seen, cfg, _planned(cfg, max_shards), "Crashed", max_shards)


def model_server_killed_on(cfg: Config, run_id: str = "fault-gpu-model", *, max_shards: int | None = None,
                           restart: bool = False) -> tuple[str, str, bool]:
    """On a running cluster: SIGKILL one GPU worker's model server mid-shard; judge the run. With `restart`,
    start the server again afterwards (same port), so the cluster has both workers for what comes next."""
    seen = faulted_run(cfg, run_id, kill_model_server, max_shards=max_shards)
    try:
        return judge(seen, cfg, _planned(cfg, max_shards), "Failed", max_shards)
    finally:
        if restart and seen.victim:
            restart_model_server(cfg, seen.victim)


def grow_run_cancelled_on(cfg: Config, run_id: str = "fault-gpu-cancel", *,
                          max_shards: int | None = None) -> tuple[str, str, bool]:
    """On a running cluster: cancel a grow-shard run mid-shard through the Prefect API; judge the run."""
    from orchard.stop import STOP_DEADLINE_S

    bound = STOP_DEADLINE_S + 3  # the stop's deadline, and the worker's poll for cancellations
    cancel: dict[str, float | str] = {}

    def inject(cfg: Config, worker: str, run: object) -> str:
        cancel.update(cancel_grow_run(cfg, worker, run))
        return (f"cancelled {run.name} on {worker}: its process gone after {_seconds(cancel['gone_s'])}, the run "
                f"{cancel['state']} after {_seconds(cancel['final_s'])}")

    seen = faulted_run(cfg, run_id, inject, max_shards=max_shards)
    shards = _planned(cfg, max_shards)
    expected = (f"the cancelled grow-shard run's process gone within {bound:.0f} s and the run Cancelled, its shard not "
                f"grown again; nightly Completed 'Partial' (partial, {shards - 1}/{shards} shards published); no row "
                f"lost or duplicated, no partial snapshot; a re-run completes, growing the cancelled shard and reusing "
                f"the rest")
    problems = list(seen.problems)
    if cancel and (cancel["gone_s"] is None or cancel["gone_s"] > bound):
        problems.append(f"its process was still running {bound:.0f} s after the cancel")
    if cancel and cancel["final_s"] is None:  # the state is Prefect's bookkeeping after the process ends (~10 s)
        problems.append(f"the run was not final {CANCEL_TIMEOUT_S:.0f} s after the cancel")
    if cancel and not str(cancel["state"]).startswith("CANCELLED"):
        problems.append(f"the cancelled run ended {cancel['state']}")
    attempts = [s for s in seen.grow_states if s[0] == seen.killed_run]
    if [a[1] for a in attempts] != ["CANCELLED"]:
        problems.append(f"grow-shard runs of the cancelled shard: {attempts}")
    if not seen.hung and seen.nightly_state != "COMPLETED 'Partial'":
        problems.append(f"nightly ended {seen.nightly_state}")
    counts: dict[str, int] = {}
    again = "not run"
    if not seen.hung:
        found, counts = lake_problems(cfg, run_id, shards, runs_row=("partial", shards, shards - 1, 0))
        problems += found
        if not found:
            rerun, again = rerun_problems(cfg, run_id, shards, counts, max_shards, left=1)
            problems += rerun
    observed = (f"{seen.injected or 'nothing cancelled'}; nightly {seen.nightly_state}; lake "
                f"{counts.get('trees', 0)} trees, {counts.get('pairs', 0)} pairs; re-run {again}")
    if problems:
        observed += "; PROBLEMS: " + "; ".join(problems)[:900]
    return expected, observed, not problems


def restart_model_server(cfg: Config, worker: str) -> None:
    """Start the killed llama.cpp server(s) of `worker` again, as `orchard up` did (same command, same port), and
    record them in up.json so `orchard down` stops them."""
    from orchard.services import _launch, _models_answer, _wait_healthy, keep_running

    path = cfg.state_path / "up.json"
    record = json.loads(path.read_text())
    index = worker.rsplit("-", 1)[1]
    for entry in record["processes"]:
        process = Process(**{**entry, "leftovers": tuple(entry.get("leftovers", ()))})
        if not process.name.startswith(f"llama-gpu-{index}-") or process.running:
            continue
        argv = Path(process.log).read_text(errors="replace").splitlines()[0].removeprefix("$ ").split(" ")
        service = _launch(process.name, argv, cfg.state_path, url=process.url)
        _wait_healthy(service, _models_answer(process.url), 60.0)
        keep_running(service)
        entry["pid"] = service.process.pid
        entry["started"] = start_time(service.process.pid)
    path.write_text(json.dumps(record, indent=2))


def _planned(cfg: Config, max_shards: int | None = None) -> int:
    planned = sum(source.count for source in cfg.seeds) // cfg.run.instructions_per_shard
    return min(planned, max_shards) if max_shards else planned


def gpu_worker_killed(work_dir: Path) -> tuple[str, str, bool]:
    """A GPU worker SIGKILLed (its process group) while it grows a shard, on a cluster of two."""
    with cluster_up(work_dir) as cfg:
        return gpu_worker_killed_on(cfg)


def model_server_killed(work_dir: Path) -> tuple[str, str, bool]:
    """One GPU worker's llama.cpp server SIGKILLed while that worker grows a shard, on a cluster of two."""
    with cluster_up(work_dir) as cfg:
        return model_server_killed_on(cfg)


def grow_run_cancelled(work_dir: Path) -> tuple[str, str, bool]:
    """A grow-shard run cancelled through the Prefect API (the UI's Cancel) while it grows, on a cluster of two."""
    with cluster_up(work_dir) as cfg:
        return grow_run_cancelled_on(cfg)


SCENARIOS: dict[str, Callable[[Path], tuple[str, str, bool]]] = {
    "gpu-worker-sigkilled-mid-dispatch": gpu_worker_killed,
    "gpu-model-server-sigkilled-mid-shard": model_server_killed,
    "grow-shard-cancelled-mid-shard": grow_run_cancelled,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(SCENARIOS), metavar="NAME")
    parser.add_argument("--work-dir", type=Path)
    args = parser.parse_args(argv)
    work = (args.work_dir or Path(tempfile.mkdtemp(prefix="orchard-cluster-faults-"))).resolve()
    passed = failed = 0
    for name, scenario in SCENARIOS.items():
        if args.only and name not in args.only:
            continue
        started = time.monotonic()
        expected, observed, ok = scenario(work / name)
        print(f"{name} | {expected} | {observed} | {'PASS' if ok else 'FAIL'} ({time.monotonic() - started:.0f} s)",
              flush=True)
        passed, failed = passed + ok, failed + (not ok)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
