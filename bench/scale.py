"""What a run costs against its shape: the same instructions grown as shards of several sizes, side by side.

Each configuration (engine × shard size) runs the nightly flow in a fresh child process (its peak RSS is its own)
against a fresh simulated engine of bench/gpu_sim.py (a process of its own, left out of every figure), with
SeaweedFS started by `embedded_services` and Prefect's ephemeral API started before the measurement. The child
samples its process tree (itself and every descendant: Prefect's server, SeaweedFS, verification workers,
sandboxes) every 0.25 s and prints one JSON line; this process prints the table.

Columns:
- failed: planned shards whose fate is not published (or reused);
- peak RSS: the most resident memory the process tree held at once (a sum of RSS, shared pages counted per process);
- peak fds: the most descriptors the flow's own process held open, and the whole tree;
- conns: TCP connections the engine accepted (completions, health checks and /metrics scrapes alike), and those
  that carried completion requests;
- peak in flight: the most completion requests the engine held at once (its `max_concurrency` is the bound);
- occupancy: busy slot time ÷ (slots × the engine's window, first request to last answer);
- nodes/s: nodes landed ÷ the whole `nightly()` wall (planning, growth, validation, publishing, report).

`stages` runs 1,000, 4,000 and 16,000 seeds (small trees, instant engine) and prints each stage's wall: plan (seeds
through the hygiene gate), grow (to the last landing), validate (after the last landing, until every shard is validated
and checked), publish, data docs, report; and the wall per seed and per tree.

`planning` is bench/plan_history.py: 10,000 new seeds planned against lakes holding 0, 100,000 and 1,000,000
published instructions.

Usage:
    PYTHONPATH=. .venv/bin/python bench/scale.py planning [--repeats 3]
    PYTHONPATH=. .venv/bin/python bench/scale.py [--instructions 1024] [--per-shard 4 32 128] [--engine gpu instant]
    PYTHONPATH=. .venv/bin/python bench/scale.py stages [--instructions 1000 4000 16000] [--per-shard 128]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpu_sim  # noqa: E402  (bench/gpu_sim.py: the simulated engine)

ENGINES = {"gpu": gpu_sim.SimSettings(), "instant": gpu_sim.SimSettings.instant()}
PAGE = os.sysconf("SC_PAGE_SIZE")


def tree_pids(exclude: set[int]) -> list[int]:
    """This process and its live descendants, the subtrees of `exclude` left out."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [os.getpid()]
    while todo:
        pid = todo.pop()
        if pid in exclude:
            continue
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * PAGE
    except OSError:
        return 0


def process_name(pid: int) -> str:
    """The process's command line, shortened: enough to tell Prefect's server, SeaweedFS and a worker apart."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            words = cmdline.read().decode(errors="replace").split("\0")
    except OSError:
        return "?"
    interesting = [w for w in words if w and not w.startswith("-")][:4]
    return " ".join(Path(interesting[0]).name.split() + [w[-40:] for w in interesting[1:]]) if interesting else "?"


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


class Footprint:
    """Samples the process tree's RSS and descriptors on a thread; keeps the peaks."""

    def __init__(self, exclude: set[int], every_s: float = 0.25) -> None:
        self.exclude, self.every_s = exclude, every_s
        self.peak_rss = self.peak_fds_self = self.peak_fds_tree = self.peak_processes = 0
        self.at_peak: list[tuple[str, int]] = []  # (process, RSS bytes) when the tree held the most
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        pids = tree_pids(self.exclude)
        rss = {pid: rss_bytes(pid) for pid in pids}
        if sum(rss.values()) > self.peak_rss:
            self.peak_rss = sum(rss.values())
            self.at_peak = [(process_name(pid), size) for pid, size in sorted(rss.items(), key=lambda p: -p[1])]
        self.peak_fds_self = max(self.peak_fds_self, open_fds(os.getpid()))
        self.peak_fds_tree = max(self.peak_fds_tree, sum(open_fds(pid) for pid in pids))
        self.peak_processes = max(self.peak_processes, len(pids))

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def __enter__(self) -> "Footprint":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def measure(engine: str, instructions: int, per_shard: int, state: Path) -> dict[str, Any]:
    """Run the nightly flow once (in this process) and return its figures."""
    from flows.nightly import nightly
    from orchard.services import embedded_services
    from tasks.grow import shards_in_flight

    settings = ENGINES[engine]
    gpu_sim.warm_prefect()
    with gpu_sim.sim_process(settings, gpu_sim.references_of(instructions), state) as (url, sim_pid):
        cfg = gpu_sim.sim_config(state, url, instructions, per_shard, settings.slots)
        with embedded_services(cfg) as live:
            gpu_sim.sim_call(url, "POST", "/sim/reset")  # embedded_services' own checks are not the run's
            with Footprint({sim_pid}) as footprint:
                started = time.monotonic()
                result = nightly(config=live.to_dict(), run_id=f"scale-{engine}-{per_shard}")
                wall_s = time.monotonic() - started
            sim = gpu_sim.sim_call(url, "GET", "/sim/stats")
    summary = result if isinstance(result, dict) else result.data
    fates = summary.get("fates") or []
    return {
        "engine": engine, "slots": settings.slots, "max_concurrency": settings.slots, "per_shard": per_shard,
        "trees": summary.get("trees"), "shards": len(fates), "in_flight": shards_in_flight(live),
        "failed": sum(f["fate"] not in ("published", "reused") for f in fates),
        "failures": sorted({f["reason"][:120] for f in fates if f["fate"] not in ("published", "reused")})[:3],
        "peak_rss_gb": footprint.peak_rss / 1e9,
        "at_peak": [f"{name}: {size / 1e6:.0f} MB" for name, size in footprint.at_peak[:6]], "peak_fds_self": footprint.peak_fds_self,
        "peak_fds_tree": footprint.peak_fds_tree, "peak_processes": footprint.peak_processes,
        "accepted": sim["accepted"], "connections": sim["connections"], "peak_in_flight": sim["peak_in_flight"],
        "occupancy": sim.get("occupancy") or 0.0, "profile": sim.get("profile") or [], "nodes": summary.get("nodes") or 0, "wall_s": wall_s,
        "nodes_per_s": (summary.get("nodes") or 0) / wall_s, "status": summary.get("status"),
    }


def in_child(command: str, state: Path, options: Sequence[str], first_key: str, what: str) -> dict[str, Any]:
    """Run `scale.py command options --state state` in a fresh process (its own Prefect home); return the JSON line it
    prints (the one starting with `first_key`), its whole output kept in state/child.log."""
    state.mkdir(parents=True)
    env = {**os.environ, "PREFECT_HOME": str(state / "prefect"), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90"}
    argv = [sys.executable, __file__, command, *options, "--state", str(state)]
    done = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    (state / "child.log").write_text(done.stdout)
    lines = [line for line in done.stdout.splitlines() if line.startswith(f'{{"{first_key}"')]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{what}: the run exited {done.returncode}; log: {state / 'child.log'}")
    return json.loads(lines[-1])


def run_child(engine: str, instructions: int, per_shard: int, root: Path) -> dict[str, Any]:
    """Measure one configuration in a fresh process; return its figures."""
    return in_child("one", root / f"{engine}-{per_shard}", ["--engine", engine, "--instructions", str(instructions),
                                                           "--per-shard", str(per_shard)],
                    "engine", f"{engine}, shards of {per_shard}")


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    head = (f"{'engine':<8} {'shards of':>9} {'shards':>6} {'at once':>7} {'failed':>6} {'peak RSS GB':>11} "
            f"{'fds self/tree':>13} {'procs':>5} {'conns acc/compl':>15} {'peak in flight':>14} {'occupancy':>9} "
            f"{'nodes':>6} {'wall s':>7} {'nodes/s':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['engine']:<8} {r['per_shard']:>9} {r['shards']:>6} {r['in_flight']:>7} {r['failed']:>6} "
              f"{r['peak_rss_gb']:>11.2f} {str(r['peak_fds_self']) + '/' + str(r['peak_fds_tree']):>13} "
              f"{r['peak_processes']:>5} {str(r['accepted']) + '/' + str(r['connections']):>15} "
              f"{str(r['peak_in_flight']) + ' of ' + str(r['max_concurrency']):>14} {r['occupancy']:>9.3f} "
              f"{r['nodes']:>6} {r['wall_s']:>7.1f} {r['nodes_per_s']:>7.1f}")
    print()
    for engine in dict.fromkeys(r["engine"] for r in rows):
        mine = [r for r in rows if r["engine"] == engine]
        smallest, largest = min(mine, key=lambda r: r["per_shard"]), max(mine, key=lambda r: r["per_shard"])
        ratio = smallest["peak_rss_gb"] / largest["peak_rss_gb"] if largest["peak_rss_gb"] else float("nan")
        print(f"{engine}: failed shards {sum(r['failed'] for r in mine)}; in flight never above max_concurrency: "
              f"{all(r['peak_in_flight'] <= r['max_concurrency'] for r in mine)}; peak RSS at most "
              f"{max(r['peak_rss_gb'] for r in mine):.2f} GB, shards of {smallest['per_shard']} ÷ shards of "
              f"{largest['per_shard']}: {ratio:.2f}x; occupancy at least {min(r['occupancy'] for r in mine):.3f}")
        for r in mine:
            print(f"  shards of {r['per_shard']}, RSS at the peak: {'; '.join(r['at_peak'])}")
            print(f"  shards of {r['per_shard']}, occupancy in 20 parts of the engine's window: {r['profile']}")
            if r["failures"]:
                print(f"  shards of {r['per_shard']}: {r['failures']}")


# --- stages: where a run's wall goes as it grows (instant engine, small trees) ------------------------------------

STAGE_DIFFICULTY = 5  # the arithmetic generator's largest numbers: the fewest near-duplicates for the hygiene gate
STAGE_CHUNK = 1000  # instructions per generator seed
STAGE_PER_SHARD = 128


def stage_config(state: Path, url: str, instructions: int, per_shard: int) -> Any:
    """A run of `instructions` arithmetic seeds grown as small trees (two strategies × two samples, one turn, no
    MCTS, no hard negatives, no jury comparisons), every role on the instant engine."""
    from orchard.config import SeedSource

    slots = ENGINES["instant"].slots
    cfg = gpu_sim.sim_config(state, url, instructions, per_shard, slots)
    seeds = tuple(SeedSource(kind="arithmetic", count=min(STAGE_CHUNK, instructions - start),
                             difficulty=STAGE_DIFFICULTY, seed=1000 + i)
                  for i, start in enumerate(range(0, instructions, STAGE_CHUNK)))
    run = dataclasses.replace(cfg.run, strategies=("step_by_step", "plan_first"), samples_per_strategy=2, turns=1,
                              mcts_domains=(), hard_negatives_per_tree=0, jury_pairs=0, jury_canaries=0)
    return cfg.replace(seeds=seeds, run=run)


def measure_stages(instructions: int, per_shard: int, state: Path) -> dict[str, Any]:
    """Run the nightly flow once (in this process) on the instant engine; return its stages' walls."""
    from flows.nightly import nightly
    from orchard.services import embedded_services
    from tasks.seeds import generate_arithmetic

    gpu_sim.warm_prefect()
    probe = stage_config(state, "http://127.0.0.1:1/v1", instructions, per_shard)
    references = {i.text: i.reference for source in probe.seeds
                  for i in generate_arithmetic(source.count, difficulty=source.difficulty, seed=source.seed)}
    with gpu_sim.sim_process(ENGINES["instant"], references, state) as (url, _):
        cfg = stage_config(state, url, instructions, per_shard)
        with embedded_services(cfg) as live:
            started = time.monotonic()
            result = nightly(config=live.to_dict(), run_id=f"stages-{instructions}")
            wall_s = time.monotonic() - started
    summary = result if isinstance(result, dict) else result.data
    return {"instructions": instructions, "per_shard": per_shard, "shards": summary.get("shards_planned"),
            "trees": summary.get("trees") or 0, "nodes": summary.get("nodes") or 0, "status": summary.get("status"),
            "stages": summary.get("stages") or {}, "wall_s": wall_s}


def stages_child(instructions: int, per_shard: int, root: Path) -> dict[str, Any]:
    return in_child("stages-one", root / f"stages-{instructions}",
                    ["--instructions", str(instructions), "--per-shard", str(per_shard)],
                    "instructions", f"stages, {instructions} instructions")


def print_stages(rows: Sequence[dict[str, Any]]) -> None:
    names = list(dict.fromkeys(name for r in rows for name in r["stages"]))
    head = (f"{'seeds':>6} {'shards':>6} {'trees':>6} {'nodes':>7} " + " ".join(f"{n.removesuffix('_s'):>9}" for n in names)
            + f" {'wall s':>7} {'ms/seed':>8} {'ms/tree':>8} {'tail/grow':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        st = r["stages"]
        tail = st.get("validate_s", 0.0) / st["grow_s"] if st.get("grow_s") else float("nan")
        print(f"{r['instructions']:>6} {r['shards']:>6} {r['trees']:>6} {r['nodes']:>7} "
              + " ".join(f"{st.get(n, 0.0):>9.1f}" for n in names)
              + f" {r['wall_s']:>7.1f} {1000 * r['wall_s'] / r['instructions']:>8.1f} "
              f"{1000 * r['wall_s'] / max(1, r['trees']):>8.1f} {tail:>9.3f}")
    small, large = rows[0], rows[-1]
    print(f"\nwall per seed, {large['instructions']} ÷ {small['instructions']} seeds: "
          f"{(large['wall_s'] / large['instructions']) / (small['wall_s'] / small['instructions']):.2f}x; per tree: "
          f"{(large['wall_s'] / max(1, large['trees'])) / (small['wall_s'] / max(1, small['trees'])):.2f}x; "
          f"validation after the last landing at most "
          f"{max(r['stages'].get('validate_s', 0.0) / r['stages']['grow_s'] for r in rows if r['stages'].get('grow_s')):.1%}"
          f" of growth")


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["planning"]:  # planning against the lake's history: bench/plan_history.py, its options as they are
        import plan_history

        sys.argv = [plan_history.__file__, *argv[1:]]
        plan_history.main()
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", choices=("bench", "one", "stages", "stages-one"), default="bench")
    parser.add_argument("--instructions", type=int, nargs="+", default=[1024])
    parser.add_argument("--per-shard", type=int, nargs="+", default=[4, 32, 128])
    parser.add_argument("--engine", nargs="+", choices=sorted(ENGINES), default=["gpu", "instant"])
    parser.add_argument("--state", default="", help="one: the state directory")
    args = parser.parse_args(argv)
    if args.command == "one":
        print(json.dumps(measure(args.engine[0], args.instructions[0], args.per_shard[0], Path(args.state))), flush=True)
        return
    if args.command == "stages-one":
        print(json.dumps(measure_stages(args.instructions[0], args.per_shard[0], Path(args.state))), flush=True)
        return
    if args.command == "stages":
        sizes = args.instructions if args.instructions != [1024] else [1000, 4000, 16000]
        per_shard = args.per_shard[0] if args.per_shard != [4, 32, 128] else STAGE_PER_SHARD
        root = Path(tempfile.mkdtemp(prefix="orchard-stages-"))
        print(f"stages of runs of {sizes} arithmetic seeds (difficulty {STAGE_DIFFICULTY}) as shards of {per_shard}, "
              f"small trees (2 strategies x 2 samples, 1 turn, no MCTS, no hard negatives, no jury comparisons), "
              f"instant engine ({ENGINES['instant'].slots} slots); state under {root}", flush=True)
        rows = []
        for size in sizes:
            rows.append(stages_child(size, per_shard, root))
            print(f"  {size} seeds: {rows[-1]['status']}, {rows[-1]['wall_s']:.0f} s", flush=True)
        print()
        print_stages(rows)
        return
    args.instructions = args.instructions[0]
    root = Path(tempfile.mkdtemp(prefix="orchard-scale-"))
    print(f"{args.instructions} instructions (arithmetic, run defaults: turns 2, MCTS, jury of three, hard negatives); "
          f"engines: " + "; ".join(f"{e}: {ENGINES[e].slots} slots, {ENGINES[e].per_token_s * 1000:g} ms/token"
                                   for e in args.engine) + f"; state under {root}", flush=True)
    rows = []
    for engine in args.engine:
        for per_shard in args.per_shard:
            rows.append(run_child(engine, args.instructions, per_shard, root))
            r = rows[-1]
            print(f"  {engine}, shards of {per_shard}: {r['status']}, {r['wall_s']:.0f} s", flush=True)
    print()
    print_table(rows)


if __name__ == "__main__":
    main()
