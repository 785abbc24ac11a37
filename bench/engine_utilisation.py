"""How busy does the nightly flow keep the embedded engine? The same requests, two ways, side by side in one run.

(a) factory: the nightly flow (plan → grow every tree through its phases: turns with critiques and refinements,
    MCTS steps, rollouts and self-evaluations, the jury's verdicts → verify → land → validate → materialise) on
    `--instructions` trees, with its engine behind a recording proxy (bench/fault_lab.py: FaultProxy);
    The flow is started as `orchard run` starts it: Prefect's API launched first (its start overlaps the object
    store's and the model server's), the whole flow timed from the moment the model is ready;
(b) raw: every request body the flow sent, in the order it was sent, sent again with the engine's concurrency
    (bench/gpu_sim.py: replay), all ready at once, with nothing else to do, to a FRESH llama-server started as the
    flow's was (same model, slots, threads; warmed with the same one short request): llama-server keeps prompts in
    host memory (--cache-ram), so a replay on the flow's own server finds most prompts already evaluated and runs
    ~20 % faster than the flow could (issue 29).

Prints completion tokens/s of both and their ratio (factory ÷ raw), over the growth phase (the flow's first
request to its last answer) and over the whole flow, the share of prompt tokens each side's server served from its
cache, and where the rest goes: the engine's slot occupancy over time (GET /slots, sampled), the tail after the
slots were last all busy, and the CPU each part of the process tree took (model server, this process, Prefect's
server, the object store, verification and validation workers with their sandboxes).

    PYTHONPATH=. .venv/bin/python bench/engine_utilisation.py [--instructions 32] [--per-shard 32] [--profile]

`--profile` also samples every Python process of the tree with py-spy (10 Hz, CPU time only) over the flow and prints
the functions each part spends its samples in (py-spy's own CPU is printed as the part "profiler").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fault_lab import FORWARD, FaultProxy  # noqa: E402
from bench.gpu_sim import proc_tree, replay  # noqa: E402
from orchard.config import Config, RunConfig, SeedSource  # noqa: E402

COMPLETIONS = ("/v1/chat/completions", "/v1/completions")


class Recorder:
    """What the proxy saw: every completion request's path and body, and when the first came."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.first: float | None = None
        self._lock = threading.Lock()

    def __call__(self, method: str, path: str, body: bytes) -> str:
        if method == "POST" and path in COMPLETIONS:
            with self._lock:
                self.first = self.first or time.monotonic()
                self.bodies.append({"path": path, "body": json.loads(body)})
        return FORWARD


# --- where the time goes -----------------------------------------------------------------------------------------


def part_of(cmdline: str, pid: int) -> str:
    """The part of Orchard's process tree a process is, by its command line."""
    if pid == os.getpid():
        return "orchard (this process)"
    if "llama-server" in cmdline:
        return "model server"
    if "prefect" in cmdline and ("server" in cmdline or "uvicorn" in cmdline):
        return "prefect server"
    if "weed" in cmdline:
        return "object store"
    if "py-spy" in cmdline:
        return "profiler"
    if "multiprocessing" in cmdline or "forkserver" in cmdline:
        return "workers + sandboxes"  # verification and validation processes; a sandbox's CPU is its worker's cutime
    return "other"


def tree_cpu() -> dict[str, float]:
    """CPU seconds (own + reaped children's) of each part of this process's tree, from /proc."""
    parents, cpu = proc_tree()
    parts: dict[str, float] = {}
    todo = [os.getpid()]
    while todo:
        pid = todo.pop()
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        part = part_of(cmdline, pid)
        parts[part] = parts.get(part, 0.0) + cpu.get(pid, 0.0)
        todo.extend(parents.get(pid, []))
    return parts


@dataclasses.dataclass
class Sample:
    at: float
    busy: int  # slots processing a request
    slots: int
    cpu: dict[str, float]


class Watcher:
    """Samples a llama-server's slots (GET /slots) and the process tree's CPU every `every_s` on a thread."""

    def __init__(self, server: str, every_s: float = 0.25) -> None:
        self.server, self.every_s = server, every_s
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=2.0) as client:
            while not self._stop.is_set():
                try:
                    slots = client.get(self.server + "/slots").json()
                    busy, total = sum(bool(s.get("is_processing")) for s in slots), len(slots)
                except (httpx.HTTPError, ValueError):
                    busy, total = -1, 0
                self.samples.append(Sample(time.monotonic(), busy, total, tree_cpu()))
                self._stop.wait(self.every_s)

    def __enter__(self) -> "Watcher":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def between(self, start: float, end: float) -> dict:
        """Slot occupancy, the tail and CPU by part over [start, end]."""
        inside = [s for s in self.samples if start <= s.at <= end and s.slots > 0]
        if len(inside) < 2:
            return {"samples": len(inside)}
        slots = inside[0].slots
        full = [s.at for s in inside if s.busy == slots]
        last_full = full[-1] if full else start
        tail = [s for s in inside if s.at > last_full]
        first, last = inside[0].cpu, inside[-1].cpu
        span = inside[-1].at - inside[0].at
        return {
            "samples": len(inside),
            "occupancy": sum(s.busy for s in inside) / (slots * len(inside)),
            "all_busy_share": sum(s.busy == slots for s in inside) / len(inside),
            "idle_share": sum(s.busy == 0 for s in inside) / len(inside),
            "tail_s": end - last_full,
            "tail_occupancy": (sum(s.busy for s in tail) / (slots * len(tail))) if tail else None,
            "cpu_s": {part: last.get(part, 0.0) - first.get(part, 0.0) for part in sorted(set(first) | set(last))},
            "span_s": span,
        }


def describe(side: str, figures: dict) -> list[str]:
    if figures.get("samples", 0) < 2:
        return [f"{side}: too few samples"]
    cpu = figures["cpu_s"]
    total = sum(cpu.values())
    cores = os.cpu_count() or 1
    lines = [f"{side}: slots busy {100 * figures['occupancy']:.1f}% of the time (all busy {100 * figures['all_busy_share']:.1f}%,"
             f" none {100 * figures['idle_share']:.1f}%); tail after the slots were last all busy: {figures['tail_s']:.1f} s"
             + (f" at {100 * figures['tail_occupancy']:.1f}% occupancy" if figures["tail_occupancy"] is not None else "")]
    lines.append(f"{side}: CPU over {figures['span_s']:.1f} s on {cores} cores ({cores * figures['span_s']:.1f} core-s): "
                 + ", ".join(f"{part} {seconds:.1f} s ({100 * seconds / max(total, 1e-9):.0f}%)"
                             for part, seconds in sorted(cpu.items(), key=lambda kv: -kv[1]) if seconds > 0.05))
    return lines


class Profiler:
    """py-spy sampling this process and its Python children (CPU time only) while the block runs."""

    def __init__(self, out: Path, rate: int = 10) -> None:
        self.out = out
        self.argv = [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(os.getpid()),
                     "--subprocesses", "--rate", str(rate), "--format", "raw", "--nonblocking", "-o", str(out)]
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "Profiler":
        self.process = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGINT)  # py-spy writes what it sampled on SIGINT
        self.process.wait(timeout=60)

    def summary(self, top: int = 6) -> list[str]:
        """Each part's samples and its `top` leaf functions (where the CPU went), from py-spy's raw stacks."""
        leaves: dict[str, Counter] = {}
        for stack, count in _raw_stacks(self.out.read_text(errors="replace")):
            process = [frame for frame in stack if frame.startswith("process ")][-1:]
            pid, _, cmdline = process[0][len("process "):].partition(":") if process else ("0", "", "")
            part = part_of(cmdline, int(pid))
            code = [frame for frame in stack if not frame.startswith("process ")]
            leaves.setdefault(part, Counter())[code[-1] if code else "(no Python frame)"] += count
        lines = []
        for part, counter in sorted(leaves.items(), key=lambda kv: -sum(kv[1].values())):
            total = sum(counter.values())
            lines.append(f"profile: {part}: {total} samples ({total / 10:.1f} CPU-s at 10 Hz); where: "
                         + "; ".join(f"{frame} {100 * n / total:.0f}%" for frame, n in counter.most_common(top)))
        return lines


def _raw_stacks(text: str) -> list[tuple[list[str], int]]:
    """py-spy's raw format: `frame;frame;... COUNT` per line (a command line may hold newlines: joined back)."""
    stacks, pending = [], ""
    for line in text.splitlines():
        pending = f"{pending}\n{line}" if pending else line
        head, _, count = pending.rpartition(" ")
        if count.isdigit():
            stacks.append((head.split(";"), int(count)))
            pending = ""
    return stacks


# --- the bench ---------------------------------------------------------------------------------------------------


async def _warm(engine: object) -> None:
    """The model's first answer loads it: not part of either side."""
    from orchard.engine import EngineClient, Sampling

    async with EngineClient(engine) as client:
        await client.chat([{"role": "user", "content": "Say hi."}], Sampling(max_tokens=8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instructions", type=int, default=32)
    parser.add_argument("--per-shard", type=int, default=32)
    parser.add_argument("--profile", action="store_true", help="sample the process tree with py-spy over the flow")
    args = parser.parse_args()

    state = Path(tempfile.mkdtemp(prefix="orchard-bench-"))
    os.environ["PREFECT_HOME"] = str(state / "prefect")
    from orchard.cluster import start_prefect_api, wait_prefect
    from orchard.services import embedded_services, start_llama_server
    from tasks.verify import warm_workers

    run = RunConfig(instructions_per_shard=args.per_shard, samples_per_strategy=2, turns=2, refine_per_tree=1,
                    refine_samples=2, max_tokens=96, critique_max_tokens=64)
    cfg = Config(state_dir=str(state), run=run,
                 seeds=(SeedSource(kind="arithmetic", count=args.instructions, difficulty=1, seed=3),))
    # Started as `orchard run` starts them (flows/cli.py): its own Prefect API launched first and waited for last,
    # the workers' fork server, then the object store and the model server, warmed. The whole flow is timed from the
    # moment the model is ready: Prefect's start counts where the services' start does not hide it.
    launched = time.monotonic()
    api = start_prefect_api(state, wait=False)
    warm_workers()
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.nightly import nightly

    with embedded_services(cfg) as live, temporary_settings(updates={PREFECT_API_URL: f"{api.url}/api"}):
        engine = live.engines["embedded"]
        server = engine.base_urls[0]
        asyncio.run(_warm(engine))
        recorder = Recorder()
        profiler = Profiler(state / "profile.txt") if args.profile else None
        with FaultProxy(lambda: server, recorder) as proxy, Watcher(server) as flow_watch, \
                (profiler or contextlib.nullcontext()):
            proxied = live.replace(engines={"embedded": dataclasses.replace(engine, base_urls=(proxy.url,))})
            flow_started = time.monotonic()
            wait_prefect(api)
            api_ready = time.monotonic()
            summary = nightly(config=proxied.to_dict(), run_id="bench")
            flow_wall = time.monotonic() - flow_started
    api.stop()
    # The raw side: a fresh server, as cold as the flow's was (the flow's is stopped with the block above).
    fresh = start_llama_server(engine, state, name="llama-replay")
    try:
        raw_engine = dataclasses.replace(engine, base_urls=(fresh.url,))
        asyncio.run(_warm(raw_engine))
        with Watcher(fresh.url) as raw_watch:
            raw_started = time.monotonic()
            raw = asyncio.run(replay(fresh.url, recorder.bodies, engine.max_concurrency))
            raw_wall = time.monotonic() - raw_started
    finally:
        fresh.stop()

    tokens = summary["completion_tokens"]
    raw_rate, factory, whole = raw["completion_tokens"] / raw_wall, tokens / summary["wall_s"], tokens / flow_wall
    flow_cache = summary["prefix_cache"]
    raw_share = raw["cached_tokens"] / raw["prompt_tokens"] if raw["prompt_tokens"] else None
    print(f"shape: {args.instructions} trees in shards of {args.per_shard}; {len(recorder.bodies)} requests "
          f"(actions, critiques, refinements over {run.turns} turns; MCTS steps, rollouts, self-evaluations; verdicts)")
    print(f"raw replay        : {raw['completion_tokens']} completion tokens in {raw_wall:.1f} s = {raw_rate:.1f} "
          f"tokens/s (a fresh server; prompt tokens from its cache: {_share(raw_share)})")
    print(f"nightly flow      : {tokens} completion tokens in {summary['wall_s']:.1f} s of growth = {factory:.1f} "
          f"tokens/s ({flow_wall:.1f} s for the whole flow = {whole:.1f} tokens/s; prompt tokens from its cache: "
          f"{_share(flow_cache.get('cached_share'))})")
    print(f"ratio factory/raw : {factory / raw_rate:.3f} (growth phase), {whole / raw_rate:.3f} (whole flow)")
    print(f"start: the model ready {flow_started - launched:.1f} s after Prefect's API was launched, the API answering "
          f"{api_ready - launched:.1f} s after it ({max(0.0, api_ready - flow_started):.1f} s of the whole flow); "
          f"the first request {(recorder.first or flow_started) - flow_started:.1f} s into the whole flow")
    growth_start = recorder.first or flow_started
    growth_end, flow_end = growth_start + summary["wall_s"], flow_started + flow_wall
    for side, window in (("flow before growth (start, plan)", (flow_started, growth_start)),
                         ("flow growth", (growth_start, growth_end)),
                         ("flow after growth (validate, publish, report)", (growth_end, flow_end))):
        for line in describe(side, flow_watch.between(*window)):
            print(line)
    for line in describe("raw replay", raw_watch.between(raw_started, raw_started + raw_wall)):
        print(line)
    for line in profiler.summary() if profiler else []:
        print(line)
    (state / "utilisation.json").write_text(json.dumps({
        "flow": [dataclasses.asdict(s) for s in flow_watch.samples], "raw": [dataclasses.asdict(s) for s in raw_watch.samples],
        "growth": [growth_start, growth_start + summary["wall_s"]], "flow_wall": [flow_started, flow_started + flow_wall],
        "raw_wall": [raw_started, raw_started + raw_wall]}))
    print(f"(samples in {state / 'utilisation.json'})")


def _share(value: float | None) -> str:
    return "not reported" if value is None else f"{100 * value:.1f}%"


if __name__ == "__main__":
    main()
