"""Does a run survive SIGKILL? Kill `orchard run` at random points, re-run the same run id, check bucket and lake.

One SeaweedFS and one llama.cpp server are started here and shared by every run, so a killed run cannot take
them down; each `orchard run` gets a TOML config pointing at them, its own state dir and its own bucket.
(a) baseline: `orchard run --run-id crash-test` uninterrupted, then once more in a fresh bucket, to show that
    the same run id and seeds grow the same data (the counts every trial is compared with);
(b) trials: the same run started and SIGKILLed (its whole process group) during growth, landing or
    materialisation, then re-run to completion with the same run id.

After each re-run it checks: exit status 0; every planned shard landed once (one manifest, its files intact,
lake rows per shard = manifest rows), nothing quarantined; no orphan objects under a shard's prefix; no
duplicate ids in the lake; counts equal the baseline's; every lake snapshot holds none or all of the run; one
runs row. Prints a row per trial and exits non-zero if any check failed. Usage:
    .venv/bin/python bench/crash_resume.py [--trials 6] [--seed 1] [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import duckdb
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchard import lake  # noqa: E402
from orchard.config import Config, EngineConfig, ObjectStoreConfig, load_config  # noqa: E402
from orchard.store import ObjectStore, StoreError  # noqa: E402
from schemas.rows import SHARD_TABLES  # noqa: E402
from tasks.land import MANIFEST, LandingError, read_shard_table  # noqa: E402

RUN_ID = "crash-test"
PHASES = ("growth", "landing", "materialise")
ORCHARD = Path(sys.executable).with_name("orchard")
POLL_S = 0.02
# The id column of each shard table: count(*) must equal count(DISTINCT id).
ID_COLUMNS = {"instructions": "instruction_id", "nodes": "node_id", "pairs": "pair_id", "trees": "tree_id",
              "principle_examples": "example_id", "judgements": "judgement_id"}
GROWTH_MARK = re.compile(r"run \S+: \d+ shards of up to")  # the flow logs it as it submits the grow-shard tasks
PUBLISHED_MARK = "published as lake snapshot"
# Marks every process of one `orchard run`, so that any that outlive a killed process group can be found.
TAG_VAR = "CRASH_RESUME_RUN"

# Small enough that a run grows in well under a minute on 2 cores; one instruction per shard, so there
# are several shards to kill between. No open-ended seeds, so no jury is needed.
RUN_TOML = """\
[run]
instructions_per_shard = 1
strategies = ["step_by_step", "plan_first"]
code_strategies = ["direct", "plan_in_comments"]
samples_per_strategy = 1
turns = 2
refine_per_tree = 1
refine_samples = 2
critique_max_tokens = 32
max_tokens = 48
mcts_iterations = 1
mcts_step_tokens = 16
mcts_max_steps = 2
jury_pairs = 0
jury_canaries = 0
hard_negatives_per_tree = 1
verify_workers = 1

[[seeds]]
kind = "arithmetic"
count = 4
difficulty = 1
seed = 5

[[seeds]]
kind = "code"
count = 1
difficulty = 1
seed = 5
"""


# --- one `orchard run`, watched -----------------------------------------------------------------


@dataclass
class Watch:
    """What one `orchard run` has done so far, read from its log, its bucket and its state dir."""

    started: float
    events: dict[str, float] = field(default_factory=dict)  # first time seen, seconds after start
    landed: set[str] = field(default_factory=set)  # shards with a manifest
    landing: dict[str, int] = field(default_factory=dict)  # shards with objects but no manifest yet: how many
    log_text: str = ""

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def mark(self, event: str) -> None:
        self.events.setdefault(event, round(self.elapsed(), 2))


@dataclass
class Attempt:
    """How one `orchard run` ended: exit code (None if killed), wall time, what it had done, its log."""

    code: int | None
    wall_s: float
    watch: Watch
    log_path: Path
    stragglers: list[str] = field(default_factory=list)

    def summary_line(self, prefix: str) -> str:
        """The line of the printed run summary that starts with `prefix` (empty if absent)."""
        for line in self.watch.log_text.splitlines():
            if line.strip().startswith(prefix):
                return line.strip()
        return ""


@dataclass
class Target:
    """One `orchard run`: its config file, state dir, bucket and config."""

    name: str
    config_path: Path
    cfg: Config

    @functools.cached_property
    def store(self) -> ObjectStore:
        return ObjectStore(self.cfg.object_store)  # one client: making one costs more than a poll

    @property
    def catalog(self) -> Path:
        return Path(self.cfg.lake_catalog)


def make_target(work: Path, name: str, store: ObjectStoreConfig, model_url: str) -> Target:
    """Write `<work>/<name>/orchard.toml` for a fresh state dir and bucket that point at the running servers."""
    state = work / name
    state.mkdir(parents=True)
    bucket = f"crash-{name}"
    text = f"""state_dir = {json.dumps(str(state))}

{RUN_TOML}
[engines.embedded]
kind = "openai"
model = "SmolLM2-135M-Instruct"
base_urls = [{json.dumps(model_url)}]
structured_output = "json_object"

[object_store]
endpoint_url = {json.dumps(store.endpoint_url)}
bucket = {json.dumps(bucket)}
access_key_id = {json.dumps(store.access_key_id)}
secret_access_key = {json.dumps(store.secret_access_key)}
"""
    path = state / "orchard.toml"
    path.write_text(text)
    target = Target(name=name, config_path=path, cfg=load_config(path, environ={}))
    target.store.ensure_bucket()
    return target


def run_orchard(target: Target, log_path: Path, kill_when: Callable[[Watch], bool] | None = None,
                timeout_s: float = 900.0, poll_s: Callable[[Watch], float] = lambda watch: POLL_S) -> Attempt:
    """Run `orchard --config … run --run-id crash-test`; SIGKILL its process group once `kill_when` says so."""
    # Nothing of this process's Prefect or Orchard environment may leak into the run: it finds its own.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ORCHARD"))}
    env[TAG_VAR] = f"{target.name}:{log_path.name}"
    argv = [str(ORCHARD), "--config", str(target.config_path), "run", "--run-id", RUN_ID]
    watch = Watch(started=time.monotonic())
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    reader = open(log_path, errors="replace")
    try:
        while process.poll() is None:
            poll(target, watch, reader)
            if kill_when is not None and kill_when(watch):
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                wall = watch.elapsed()
                stragglers = kill_stragglers(env[TAG_VAR])
                poll(target, watch, reader)  # what the killed run left behind (no process of it writes any more)
                return Attempt(None, wall, watch, log_path, stragglers)
            if watch.elapsed() > timeout_s:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                raise RuntimeError(f"{target.name}: orchard run did not finish in {timeout_s:.0f} s; log {log_path}")
            time.sleep(poll_s(watch))
        watch.mark("exit")
        poll(target, watch, reader)
        return Attempt(process.returncode, watch.elapsed(), watch, log_path, kill_stragglers(env[TAG_VAR]))
    finally:
        reader.close()


def poll(target: Target, watch: Watch, reader) -> None:
    """Bring `watch` up to date: new log lines, the shards in the bucket, the lake catalog file."""
    new = reader.read()
    if new:
        recent = watch.log_text[-200:] + new  # a line may arrive in two reads
        watch.log_text += new
        if GROWTH_MARK.search(recent):
            watch.mark("growth")
        if PUBLISHED_MARK in recent:
            watch.mark("published")
    if target.catalog.exists():
        watch.mark("lake")
    shards: dict[str, set[str]] = {}
    prefix = f"runs/{RUN_ID}/shards/"
    for key in target.store.list_keys(prefix):
        shard, _, name = key[len(prefix):].partition("/")
        shards.setdefault(shard, set()).add(name)
    landed = {s for s, names in shards.items() if MANIFEST in names}
    for shard in landed - watch.landed:
        watch.mark(f"landed:{shard}")
    watch.landed = landed
    watch.landing = {s: len(names) for s, names in shards.items() if s not in landed}
    if watch.landing:
        watch.mark("landing")
    # Materialise writes the lake's data files into the bucket inside its transaction, before COMMIT.
    if "lake" in watch.events and "lake data" not in watch.events and target.store.list_keys("lake/"):
        watch.mark("lake data")


def kill_stragglers(tag: str) -> list[str]:
    """SIGKILL, by pid, any process of a run (found by its tag variable) that outlived it; return what they were."""
    found = []
    needle = f"{TAG_VAR}={tag}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            os.kill(int(entry.name), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        found.append(f"{entry.name} {command[:80]}")
    return found


def clear_prompt_cache(model_url: str) -> None:
    """Leave an unrelated prompt in the model server's cache, as it is when an uninterrupted run starts.

    llama-cpp-python answers a request whose whole prompt is still cached from the previous request
    differently from the same request (same seed) evaluated afresh. A killed run leaves its last prompt
    there; a re-run that sends that prompt first would grow other text than an uninterrupted run.
    """
    response = httpx.post(f"{model_url}/v1/chat/completions", timeout=300.0, json={
        "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "seed": 0, "temperature": 0.0})
    response.raise_for_status()


# --- where to kill ------------------------------------------------------------------------------


@dataclass
class KillPlan:
    """When to kill a trial's run: the phase aimed at and the random part of the moment."""

    phase: str
    anchor: str = ""  # growth, materialise: the event the delay counts from
    delay_s: float = 0.0
    after_landed: int = 0  # landing: kill while a shard is half-written once this many shards have landed ...
    files: int = 1  # ... and that shard has at least this many of its objects in the bucket (no manifest yet)

    def poll_s(self, watch: Watch) -> float:
        """How long to wait before looking again: a shard lands, and a transaction commits, within milliseconds."""
        tight = self.phase == "landing" or (self.phase == "materialise" and "lake" in watch.events)
        return 0.002 if tight else POLL_S

    def describe(self) -> str:
        if self.phase == "landing":
            return f"landing: {self.after_landed} landed, {self.files} file{'s' if self.files > 1 else ''}"
        return f"{self.phase}: {self.anchor} +{self.delay_s:.2f}s"

    def due(self, watch: Watch) -> bool:
        if self.phase == "landing":
            if len(watch.landed) > self.after_landed:
                self.files = 1  # the shard aimed at landed between two looks: take the next one at any stage
            return len(watch.landed) >= self.after_landed and max(watch.landing.values(), default=0) >= self.files
        return self.anchor in watch.events and watch.elapsed() >= watch.events[self.anchor] + self.delay_s


def kill_plans(trials: int, rng: random.Random, baseline: Watch, shards: int) -> list[KillPlan]:
    """One plan per trial, the phases taken in turn; moments drawn within the baseline's phase durations."""
    growth_s = max(t for e, t in baseline.events.items() if e.startswith("landed:")) - baseline.events["growth"]
    # From the catalog's creation to the first data file of the run's transaction (schema, BEGIN, reading shards).
    opening_s = baseline.events["lake data"] - baseline.events["lake"]
    plans = []
    for i in range(trials):
        phase = PHASES[i % len(PHASES)]
        if phase == "growth":
            plans.append(KillPlan(phase, "growth", delay_s=rng.uniform(0.0, 0.9 * growth_s)))
        elif phase == "landing":
            plans.append(KillPlan(phase, after_landed=rng.randrange(shards), files=rng.randint(1, len(SHARD_TABLES))))
        elif i // len(PHASES) % 2 == 0:
            plans.append(KillPlan(phase, "lake", delay_s=rng.uniform(0.0, opening_s)))
        else:  # the transaction has written data files and not committed yet
            plans.append(KillPlan(phase, "lake data", delay_s=rng.uniform(0.0, 0.02)))
    return plans


def phase_at_kill(watch: Watch, planned: int, committed: bool) -> str:
    """The phase the run was in when it was killed, from what it had written by then (and whether it committed)."""
    if "published" in watch.events:
        return "report"  # it had logged its snapshot: it was reporting
    if committed:
        return "materialise, committed"  # the snapshot was committed, the log line not yet written
    if "lake data" in watch.events:
        return "materialise, data files"
    if "lake" in watch.events:
        return "materialise, opening"
    if watch.landing:
        return "landing"
    if len(watch.landed) < planned:
        return "growth" if "growth" in watch.events else "startup"
    return "validation"


# --- checks -------------------------------------------------------------------------------------


def bucket_facts(target: Target, planned: list[str]) -> dict:
    """Per planned shard: manifests, orphan objects, intact files; quarantined and unplanned prefixes."""
    store = target.store
    keys = store.list_keys(f"runs/{RUN_ID}/")
    shard_keys: dict[str, list[str]] = {}
    quarantined, strays = [], []
    for key in keys:
        parts = key.split("/")
        if len(parts) >= 4 and parts[2] == "shards":
            shard_keys.setdefault(parts[3], []).append(key)
        elif len(parts) >= 4 and parts[2] == "quarantine":
            quarantined.append(key)
        else:
            strays.append(key)
    manifests, orphans, broken = {}, [], []
    for shard in planned:
        found = shard_keys.get(shard, [])
        manifest_key = f"runs/{RUN_ID}/shards/{shard}/{MANIFEST}"
        if manifest_key not in found:
            orphans += found
            continue
        manifest = store.get_json(manifest_key)
        manifests[shard] = manifest
        named = {manifest_key, *(entry["key"] for entry in manifest["files"].values())}
        orphans += [key for key in found if key not in named]
        for table in SHARD_TABLES:
            try:
                read_shard_table(store, manifest, table)  # size, sha256 and row count as the manifest says
            except LandingError as exc:
                broken.append(str(exc))
    unplanned = sorted(set(shard_keys) - set(planned))
    return {"manifests": manifests, "orphans": orphans, "broken": broken, "quarantined": quarantined,
            "unplanned": unplanned, "strays": strays}


def lake_facts(cfg: Config) -> dict:
    """The run's rows in the newest snapshot: counts, distinct ids, rows per shard, runs rows, node text digest."""
    facts: dict = {"rows": {}, "distinct": {}, "per_shard": {}}
    with lake.connect(cfg, read_only=True) as con:
        for table, column in ID_COLUMNS.items():
            rows, distinct = con.execute(f"SELECT count(*), count(DISTINCT {column}) FROM {table} WHERE run_id = ?",
                                         [RUN_ID]).fetchone()
            facts["rows"][table], facts["distinct"][table] = rows, distinct
            facts["per_shard"][table] = dict(con.execute(
                f"SELECT shard_id, count(*) FROM {table} WHERE run_id = ? GROUP BY 1", [RUN_ID]).fetchall())
        facts["runs"] = con.execute("SELECT status, snapshot_id FROM runs WHERE run_id = ?", [RUN_ID]).fetchall()
        facts["pairs_by_method"] = dict(con.execute(
            "SELECT method, count(*) FROM pairs WHERE run_id = ? GROUP BY 1 ORDER BY 1", [RUN_ID]).fetchall())
        # Identical data, not just identical counts: a digest of every node's id and text.
        facts["digest"] = con.execute(
            "SELECT md5(string_agg(node_id || ':' || coalesce(text, ''), '|' ORDER BY node_id)) FROM nodes "
            "WHERE run_id = ?", [RUN_ID]).fetchone()[0]
        facts["snapshots"] = [(s["snapshot_id"], s["commit_message"]) for s in lake.snapshot_rows(con)]
    return facts


def snapshot_counts(cfg: Config, version: int) -> tuple[int, ...]:
    """The run's rows in each shard table, and its runs rows, as of lake snapshot `version` (0 where no table yet)."""
    with lake.connect(cfg, version=version) as con:
        tables = {row[0] for row in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = ?", [lake.LAKE]).fetchall()}
        return tuple(
            con.execute(f"SELECT count(*) FROM {table} WHERE run_id = ?", [RUN_ID]).fetchone()[0]
            if table in tables else 0
            for table in (*SHARD_TABLES, "runs")
        )


def counts_of(facts: dict, shards: int) -> dict[str, int]:
    """The counts a run is compared by: shards, rows per table and distinct ids."""
    counts = {"shards": shards, **facts["rows"]}
    counts.update({f"distinct {ID_COLUMNS[t]}": n for t, n in facts["distinct"].items()})
    return counts


def check_run(target: Target, attempt: Attempt, planned: list[str], baseline: dict[str, int] | None) -> tuple[dict, list[str]]:
    """Check a finished run; return its counts and a list of failed checks (empty when all passed)."""
    failed = []
    if attempt.code != 0:
        errors = [line.strip() for line in attempt.watch.log_text.splitlines() if "Error" in line or "error:" in line]
        failed.append(f"exit status {attempt.code}: {errors[-1] if errors else 'no error line'} (log {attempt.log_path})")
    if not target.catalog.exists():
        return {}, failed + ["no lake catalog"]
    try:
        return _check_landed_and_published(target, planned, baseline, failed)
    except (lake.LakeError, StoreError, LandingError, duckdb.Error) as exc:
        return {}, failed + [f"checks cannot read the run: {type(exc).__name__}: {str(exc).splitlines()[0]}"]


def _check_landed_and_published(target: Target, planned: list[str], baseline: dict[str, int] | None,
                                failed: list[str]) -> tuple[dict, list[str]]:
    """The bucket and lake checks of `check_run`, appended to `failed`."""
    bucket = bucket_facts(target, planned)
    facts = lake_facts(target.cfg)
    missing = sorted(set(planned) - set(bucket["manifests"]))
    if missing:
        failed.append(f"shards without manifest: {missing}")
    for what in ("orphans", "broken", "quarantined", "unplanned", "strays"):
        if bucket[what]:
            failed.append(f"{what}: {bucket[what][:5]}")
    for shard, manifest in bucket["manifests"].items():
        for table in SHARD_TABLES:
            in_lake = facts["per_shard"][table].get(shard, 0)
            if in_lake != manifest["files"][table]["rows"]:
                failed.append(f"shard {shard} {table}: {in_lake} rows in the lake, manifest says "
                              f"{manifest['files'][table]['rows']}")
    extra = sorted(set().union(*facts["per_shard"].values()) - set(planned))
    if extra:
        failed.append(f"lake rows of unplanned shards {extra}")
    for table, column in ID_COLUMNS.items():
        if facts["rows"][table] != facts["distinct"][table]:
            failed.append(f"{table}: {facts['rows'][table]} rows, {facts['distinct'][table]} distinct {column}")
    if len(facts["runs"]) != 1 or facts["runs"][0][0] != "complete":
        failed.append(f"runs rows for {RUN_ID}: {facts['runs']}")
    final = (*(facts["rows"][t] for t in SHARD_TABLES), 1)
    for snapshot_id, _ in facts["snapshots"]:
        counts = snapshot_counts(target.cfg, snapshot_id)
        if any(counts) and counts != final:
            failed.append(f"snapshot {snapshot_id} is partial: {counts} rows of {final}")
    counts = counts_of(facts, len(bucket["manifests"]))
    if baseline is not None:
        differ = {k: (v, baseline[k]) for k, v in counts.items() if baseline.get(k) != v}
        if differ:
            failed.append(f"counts differ from the baseline (got, baseline): {differ}")
    return {"counts": counts, "facts": facts, "bucket": bucket}, failed


# --- output -------------------------------------------------------------------------------------


COLUMNS = ("trial", "aimed at", "killed in", "kill at", "landed at kill", "re-run", "reused", "shards",
           "nodes", "pairs", "trees", "instr", "judg", "snap/run", "same text", "checks")


def print_row(values: tuple) -> None:
    widths = (5, 26, 23, 7, 18, 10, 6, 6, 5, 5, 5, 5, 4, 8, 9, 6)
    print("  ".join(str(v).ljust(w) for v, w in zip(values, widths)), flush=True)


def reused_of(attempt: Attempt) -> str:
    """How many shards the run found already landed, from its printed summary."""
    match = re.search(r"(\d+) already landed", attempt.summary_line("shards:"))
    return match.group(1) if match else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6, help="killed-and-resumed runs (at least 5 for the issue)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the kill moments")
    parser.add_argument("--work-dir", type=Path, help="where state dirs, configs and logs go (default: a new temp dir)")
    parser.add_argument("--run-timeout", type=float, default=900.0, help="seconds one orchard run may take")
    args = parser.parse_args()

    began = time.monotonic()
    work = (args.work_dir or Path(tempfile.mkdtemp(prefix="orchard-crash-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    os.environ["PREFECT_HOME"] = str(work / "prefect")  # planning shards imports Prefect; keep its home here
    from orchard.services import start_llama_server, start_seaweedfs
    from tasks.seeds import load_seeds, plan_shards

    store_cfg = ObjectStoreConfig(bucket="crash-services", access_key_id="orchard",
                                  secret_access_key="orchard-crash-secret")
    services = []
    failures = 0
    try:
        seaweed = start_seaweedfs(store_cfg, work / "services")
        services.append(seaweed)
        store_cfg = dataclasses.replace(store_cfg, endpoint_url=seaweed.url)
        llama = start_llama_server(EngineConfig(kind="embedded", model="SmolLM2-135M-Instruct", n_ctx=2048),
                                   work / "services")
        services.append(llama)
        print(f"work dir {work}; SeaweedFS {seaweed.url}, llama.cpp {llama.url}; run id {RUN_ID}", flush=True)

        def target(name: str) -> Target:
            return make_target(work, name, store_cfg, llama.url)

        def run(target: Target, log_name: str, plan: KillPlan | None = None) -> Attempt:
            clear_prompt_cache(llama.url)
            if plan is None:
                return run_orchard(target, target.config_path.parent / log_name, timeout_s=args.run_timeout)
            return run_orchard(target, target.config_path.parent / log_name, plan.due, timeout_s=args.run_timeout,
                               poll_s=plan.poll_s)

        base = target("baseline")
        planned = [p.shard_id for p in plan_shards(load_seeds(base.cfg.seeds), per_shard=base.cfg.run.instructions_per_shard,
                                                   config_hash=base.cfg.content_hash())]
        first = run(base, "run.log")
        result, failed = check_run(base, first, planned, None)
        if failed:
            raise SystemExit("baseline run failed its checks:\n  " + "\n  ".join(failed))
        baseline, digest = result["counts"], result["facts"]["digest"]
        ev = first.watch.events
        print(f"baseline: {first.wall_s:.1f} s (growth from {ev['growth']:.1f} s, last shard landed at "
              f"{max(t for e, t in ev.items() if e.startswith('landed:')):.1f} s, lake catalog at {ev['lake']:.1f} s, "
              f"first lake data file at {ev['lake data']:.1f} s, published at {ev['published']:.1f} s); "
              f"{len(planned)} shards; pairs by method {result['facts']['pairs_by_method']}", flush=True)
        print(f"  counts {baseline}", flush=True)

        again = target("repeat")
        second = run(again, "run.log")
        result, failed = check_run(again, second, planned, baseline)
        same_text = result.get("facts", {}).get("digest") == digest
        print(f"repeat of the baseline in a fresh bucket: {second.wall_s:.1f} s; counts "
              f"{'equal' if not failed else 'DIFFER'}; node texts {'identical' if same_text else 'DIFFER'}"
              + "".join(f"\n  ! {f}" for f in failed), flush=True)
        if failed:
            raise SystemExit("an uninterrupted run does not reproduce the baseline, so counts cannot be compared")

        print()
        print_row(COLUMNS)
        for i, plan in enumerate(kill_plans(args.trials, rng, first.watch, len(planned)), start=1):
            trial = target(f"trial-{i}")
            killed = run(trial, "killed.log", plan)
            resumed = run(trial, "rerun.log")
            result, failed = check_run(trial, resumed, planned, baseline)
            counts, facts = result.get("counts", {}), result.get("facts", {})
            snapshots = facts.get("snapshots", [])
            # Commits of this run: 2 when the killed attempt had already committed (the re-run commits again).
            commits = sum(message == f"run {RUN_ID}" for _, message in snapshots)
            if killed.code is None:
                phase = phase_at_kill(killed.watch, len(planned), committed=commits >= 2)
                at_kill = f"{len(killed.watch.landed)}/{len(planned)}" + "".join(
                    f" +1 with {n} obj" for n in killed.watch.landing.values())
                kill_at = f"{killed.wall_s:.2f}s"
            else:
                phase, at_kill, kill_at = f"none (rc {killed.code})", "all", "-"
            failures += bool(failed)
            print_row((i, plan.describe(), phase, kill_at, at_kill, f"rc {resumed.code} {resumed.wall_s:.0f}s",
                       reused_of(resumed), counts.get("shards", "?"), counts.get("nodes", "?"), counts.get("pairs", "?"),
                       counts.get("trees", "?"), counts.get("instructions", "?"), counts.get("judgements", "?"),
                       f"{len(snapshots)}/{commits}", "?" if not facts else "yes" if facts["digest"] == digest else "no",
                       "ok" if not failed else "FAIL"))
            for problem in failed:
                print(f"        ! {problem}", flush=True)
            for stray in killed.stragglers:
                print(f"        (outlived the killed process group; killed by pid: {stray})", flush=True)
    finally:
        for service in reversed(services):
            service.stop()

    print(f"\n{args.trials} trials: {args.trials - failures} passed, {failures} failed; every re-run compared with the "
          f"baseline's {baseline['shards']} shards, {baseline['nodes']} nodes, {baseline['pairs']} pairs, "
          f"{baseline['trees']} trees; wall {time.monotonic() - began:.0f} s; logs and state in {work}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
