"""What does verification cost the process that asks for it? Per sandbox spawn, per verdict, per pool round trip.

The parent holds `--ballast-mb` of touched memory and `--threads` idle threads, as a growing shard does (Prefect,
the engine clients, the asyncio loop): a fork() copies the page tables of all of it, a vfork() none.

(a) spawn: `run_sandboxed("pass")` one at a time: wall, the calling thread's CPU, the whole parent's CPU.
(b) verdicts: `Verifiers.check` of one math, instruction-following (with a language constraint) or code item at a
    time, after a warm-up: wall, calling-thread CPU, parent CPU, and the CPU of the pool workers and sandboxes.
(c) pool: the worker process pool's own round trip for an item that does nothing (`len` of the strings a math or
    instruction-following check sends), one in flight and many in flight: what a batcher could save.
(d) loop: `--coroutines` coroutines on one asyncio loop each verify one IF item and one math item, the way a
    shard's trees do; a heartbeat that sleeps 1 ms records the loop's longest stall. With `Verifiers.verify`
    when the checkout has it (`await`), else with `Verifiers.check` called from the coroutine (the sync call).

Before/after: the same script against another checkout (it imports `orchard` and `tasks` from `--checkout`):
    PYTHONPATH=. .venv/bin/python bench/verify_cost.py                      # this checkout
    PYTHONPATH=. .venv/bin/python bench/verify_cost.py --checkout ../main   # main, for the "before" numbers
Run as root to measure the privilege drop a root deployment needs (the sandbox runs as `SandboxConfig.uid`).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import resource
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence


@dataclass(frozen=True)
class Cost:
    """Mean per-item cost of one measured operation, in milliseconds."""

    wall_ms: float
    caller_cpu_ms: float  # the thread that called: in a shard, the event loop's thread
    parent_cpu_ms: float  # every thread of this process: pool manager threads, sandbox threads, …
    helper_cpu_ms: float  # pool worker processes and reaped sandboxes

    def per(self, items: int) -> "Cost":
        """This cost spread over `items` items (an operation that handled that many)."""
        return Cost(self.wall_ms / items, self.caller_cpu_ms / items, self.parent_cpu_ms / items,
                    self.helper_cpu_ms / items)

    def row(self, name: str) -> str:
        return (f"{name:<34} wall {self.wall_ms:8.2f}  caller-thread cpu {self.caller_cpu_ms:7.2f}  "
                f"parent cpu {self.parent_cpu_ms:7.2f}  workers+sandboxes cpu {self.helper_cpu_ms:7.2f}")


def _process_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # scheduler-exact, unlike os.times' clock ticks
    return usage.ru_utime + usage.ru_stime


def _reaped_children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _live_children_cpu_s() -> float:
    """CPU of this process's live children (the pool's workers): they are reaped only when the pool shuts down."""
    total_ns = 0
    for task in Path("/proc/self/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                threads = list(Path(f"/proc/{pid}/task").iterdir())
                total_ns += sum(int((thread / "schedstat").read_text().split()[0]) for thread in threads)
            except FileNotFoundError:
                continue  # a sandbox that ended while we looked: RUSAGE_CHILDREN counts it once reaped
    return total_ns / 1e9


def _live_children_rss_mb() -> list[int]:
    """Resident memory of each live child (the pool's workers), in MiB."""
    sizes = []
    for task in Path("/proc/self/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except FileNotFoundError:
                continue
            rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
            sizes.append(rss_kb // 1024)
    return sizes


def measure(operation: Callable[[], object], repeat: int) -> Cost:
    """Run `operation` `repeat` times in this thread and return its mean cost."""
    wall0, thread0, proc0 = time.perf_counter(), time.thread_time(), _process_cpu_s()
    helpers0 = _reaped_children_cpu_s() + _live_children_cpu_s()
    for _ in range(repeat):
        operation()
    wall, thread, proc = time.perf_counter() - wall0, time.thread_time() - thread0, _process_cpu_s() - proc0
    helpers = _reaped_children_cpu_s() + _live_children_cpu_s() - helpers0
    return Cost(*(1000 * value / repeat for value in (wall, thread, proc, helpers)))


def hold_ballast(megabytes: int, threads: int) -> tuple[bytearray, threading.Event]:
    """Touch `megabytes` of memory and start `threads` idle threads; set the event to let the threads end."""
    ballast = bytearray(megabytes * 1024 * 1024)
    ballast[::4096] = b"\x01" * len(range(0, len(ballast), 4096))  # every page written, so every page is mapped
    stop = threading.Event()
    for n in range(threads):
        threading.Thread(target=stop.wait, name=f"idle-{n}", daemon=True).start()
    return ballast, stop


def _items():
    from schemas.plan import Instruction, instruction_id
    from tasks.constraints import constraints_reference

    def make(domain: str, text: str, reference: str) -> Instruction:
        return Instruction(instruction_id(domain, text, reference), domain, "bench", 0, text, reference, 1)

    math = make("math", "Compute 12 × 7.", "84")
    language = constraints_reference(["language:response_language", "punctuation:no_comma"],
                                     [{"language": "fr"}, {}])
    follow = make("instruction_following", "Describe the sea in French without commas.", language)
    code = make("code", "Write add(a, b).", "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n")
    # A common failure: an answer in English, 140 words, to a prompt that asks for French.
    english = " ".join(["The sea is wide and blue and the waves come to the beach and go back again without end "
                        "while the fishing boats return to the harbor in the evening when the sun goes down."] * 4)
    return {
        "math": (math, "12 × 7 = 84\nAnswer: 84"),
        "instruction_following": (follow, english),
        "code": (code, "```python\ndef add(a, b):\n    return a + b\n```"),
    }


def pool_round_trip(workers: int, repeat: int, in_flight: int) -> tuple[Cost, Cost]:
    """The spawn pool's cost of an item that does nothing: one at a time, and `in_flight` at once."""
    payload = ("12 × 7 = 84\nAnswer: 84", "84", "Compute 12 × 7.")
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(len, [payload] * workers * 2))  # start every worker first
        one = measure(lambda: pool.submit(len, payload).result(), repeat)

        def burst() -> None:
            for future in [pool.submit(len, payload) for _ in range(in_flight)]:
                future.result()

        many = measure(burst, 1).per(in_flight)
    return one, many


async def loop_stall(verifiers, items: Sequence, coroutines: int) -> tuple[float, float, str]:
    """Return (the loop's longest stall in ms, wall ms, which API) for `coroutines` callers verifying at once."""
    gaps: list[float] = []
    done = asyncio.Event()

    async def heartbeat() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    use_async = hasattr(verifiers, "verify")

    async def tree() -> None:
        if use_async:
            await verifiers.verify(items)
        else:
            verifiers.check(items)  # how a shard's trees call it when there is no async API

    beat = asyncio.create_task(heartbeat())
    await asyncio.sleep(0.01)
    started = time.perf_counter()
    await asyncio.gather(*(tree() for _ in range(coroutines)))
    wall = time.perf_counter() - started
    done.set()
    await beat
    return 1000 * max(gaps), 1000 * wall, "await Verifiers.verify" if use_async else "Verifiers.check in a coroutine"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkout", default=str(Path(__file__).resolve().parents[1]),
                        help="the Orchard checkout whose orchard/ and tasks/ are measured")
    parser.add_argument("--ballast-mb", type=int, default=800)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--coroutines", type=int, default=128)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(args.checkout).resolve()))

    import tasks.verify
    from orchard.sandbox import SandboxConfig, run_sandboxed
    from tasks.verify import Verifiers

    ballast, stop = hold_ballast(args.ballast_mb, args.threads)
    print(f"measuring {Path(tasks.verify.__file__).resolve().parents[1]}  python {sys.version.split()[0]}  euid {os.geteuid()}  "
          f"ballast {args.ballast_mb} MiB + {args.threads} threads  cpus {os.cpu_count()}  repeat {args.repeat}")
    print("per item, ms:")
    limits = SandboxConfig()
    run_sandboxed("pass", limits=limits)
    print(measure(lambda: run_sandboxed("pass", limits=limits), args.repeat).row("sandbox spawn (run_sandboxed)"))

    items = _items()
    with Verifiers(args.workers, limits) as verifiers:
        warm_up = measure(lambda: verifiers.check(list(items.values()) * args.workers), 1)
        print(f"pool start (every worker loads its checkers once): wall {warm_up.wall_ms:.0f} ms, "
              f"worker RSS {_live_children_rss_mb()} MiB")
        for domain, item in items.items():
            print(measure(lambda: verifiers.check([item]), args.repeat).row(f"verdict: {domain}"))
        batch = [items["math"], items["instruction_following"]] * (args.repeat * 2)
        print(measure(lambda: verifiers.check(batch), 1).per(len(batch)).row(f"{len(batch)} math+IF in one check"))
        stall, wall, api = asyncio.run(loop_stall(verifiers, [items["instruction_following"], items["math"]],
                                                  args.coroutines))
    one, many = pool_round_trip(args.workers, args.repeat * 5, in_flight=256)
    print(one.row("pool round trip, 1 in flight"))
    print(many.row("pool round trip, 256 in flight"))
    print(f"loop: {args.coroutines} coroutines x (IF + math) via {api}: longest loop stall {stall:.1f} ms, "
          f"all done in {wall:.0f} ms")
    stop.set()
    del ballast


if __name__ == "__main__":
    main()
