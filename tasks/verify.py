"""Verifiers: turn an action's text into a verdict and a score, and say which verifier said so.

Each domain's entry (schemas/domains.py) names its verifier and where in an answer that verifier reads.
Math and instruction following: checked in worker processes (`check_answer`), never in the caller's thread.
Math-verify's timeouts use `signal.alarm`, which only works in a main thread (each worker's); the constraint
checkers are pure Python but slow (langdetect takes milliseconds per language check), and the caller is a shard's
event loop. Workers fork from a fork server that imported math-verify and the checkers once per process
(`WORKER_PRELOAD`), so a shard's pool starts in milliseconds instead of seconds of imports per worker; a worker
loads langdetect's profiles on its first language check.
Code: the answer's code and the instruction's test program run together in a bubblewrap sandbox
(orchard/sandbox.py); the answer is correct iff the program exits 0. Never outside the sandbox. A thread waits
on each sandbox.

`Verifiers.verify` (async) and `Verifiers.check` (sync) submit every item to its pool and wait on the futures,
so hundreds of coroutines on one loop can verify at once without blocking it.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.forkserver
import re
import threading
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

from orchard.sandbox import PROGRAM_PATH, SandboxConfig, run_sandboxed, sandbox_self_check
from orchard.services import die_with_owner, owner
from schemas.domains import CODE_VERIFIER, DOMAINS, IF_VERIFIER, MATH_VERIFIER, answer_span, extract_code
from schemas.errors import OrchardError
from schemas.plan import Instruction

CORRECT, INCORRECT, UNPARSABLE = "correct", "incorrect", "unparsable"


@dataclass(frozen=True)
class Verdict:
    """What a verifier said of one action."""

    verdict: str
    score: float
    verifier: str
    detail: str  # for the record: may name the reference ("expected 84, got 88")
    # What the environment tells the next turn. Never the reference itself, or refinements learn to copy it.
    feedback: str = ""
    failure_reason: str | None = None
    exit_code: int | None = None  # code: the sandboxed program's exit status
    stdout: str | None = None
    stderr: str | None = None


def check_math_answer(text: str, reference: str, timeout_s: int = 5) -> Verdict:
    """Return the verdict of `text` against the exact `reference`, checked by math-verify (call in a main thread)."""
    from math_verify import parse, verify  # slow import: the fork server preloads it (WORKER_PRELOAD)

    gold = parse(f"${reference}$", parsing_timeout=timeout_s)
    if not gold:
        gold = parse(reference, parsing_timeout=timeout_s)
    # The strategies ask for a last line "Answer: <number>"; when a model forgets, math-verify reads the whole text.
    given = parse(answer_span(text), parsing_timeout=timeout_s)
    if not given:
        given = parse(text, parsing_timeout=timeout_s)
    if not given:
        return Verdict(UNPARSABLE, 0.0, MATH_VERIFIER, f"expected {reference}, found no answer",
                       feedback="No final answer found: end with a line 'Answer: <number>'.",
                       failure_reason="no answer")
    shown = str(given[-1])
    if verify(gold, given, timeout_seconds=timeout_s):
        return Verdict(CORRECT, 1.0, MATH_VERIFIER, f"expected {reference}, got {shown}", feedback="Your answer is correct.")
    return Verdict(INCORRECT, 0.0, MATH_VERIFIER, f"expected {reference}, got {shown}",
                   feedback=f"Your answer {shown} is incorrect.", failure_reason="wrong answer")


# --- code ---------------------------------------------------------------------------------------

_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+)')
_EXCEPTION = re.compile(r"^(?P<name>[A-Za-z_][\w.]*)(?::\s|:?$)")
# What a verdict keeps of the program's streams: the start of stdout, the end of stderr (where the error is).
VERDICT_STREAM_CHARS = 4000
FEEDBACK_LINES = 6


def check_code_answer(text: str, reference: str, limits: SandboxConfig = SandboxConfig()) -> Verdict:
    """Return the verdict of the code in `text` (schemas/domains.py: extract_code) run with the test program
    `reference` in the sandbox (exit 0 passes)."""
    code = extract_code(text)
    if not code.strip():
        return Verdict(UNPARSABLE, 0.0, CODE_VERIFIER, "no code found in the answer",
                       feedback="No code found: reply with the complete function in one ```python code block.",
                       failure_reason="no code found")
    result = run_sandboxed(code + "\n\n" + reference, limits=limits)
    stdout, stderr = result.stdout[:VERDICT_STREAM_CHARS], result.stderr[-VERDICT_STREAM_CHARS:]
    if result.exit_code == 0 and result.killed_reason is None:
        return Verdict(CORRECT, 1.0, CODE_VERIFIER, "exit 0: all tests passed",
                       feedback="All tests passed.", exit_code=0, stdout=stdout, stderr=stderr)
    reason = result.killed_reason or _exception_name(result.stderr) or f"exit code {result.exit_code}"
    failing, below = _failing_test(result.stderr, first_test_line=code.count("\n") + 3)
    detail = f"exit {result.exit_code}: {reason}" + (f" at `{failing}`" if failing else "")
    return Verdict(INCORRECT, 0.0, CODE_VERIFIER, detail, feedback=_code_feedback(reason, failing, below, limits),
                   failure_reason=reason, exit_code=result.exit_code, stdout=stdout, stderr=stderr)


def _exception_name(stderr: str) -> str | None:
    """The exception a Python traceback ends with, e.g. AssertionError (None when stderr holds no traceback)."""
    lines = stderr.splitlines()
    frames = [i for i, line in enumerate(lines) if _FRAME.match(line)]
    if not frames:
        return None
    # The exception line is the first unindented line after the last frame (a SyntaxError's after its caret).
    for line in lines[frames[-1] + 1:]:
        match = _EXCEPTION.match(line)
        if match:
            return match.group("name").rsplit(".", 1)[-1]
    return None


def _failing_test(stderr: str, *, first_test_line: int) -> tuple[str | None, list[str]]:
    """The source line of the innermost traceback frame in the test part of the program (after the answer's
    code), and the stderr lines below it (deeper frames in the answer's code, then the exception)."""
    lines = stderr.splitlines()
    found, below = None, lines
    for i, line in enumerate(lines):
        match = _FRAME.match(line)
        if match and match.group("file") == PROGRAM_PATH and int(match.group("line")) >= first_test_line:
            if i + 1 < len(lines) and not _FRAME.match(lines[i + 1]):
                found, below = lines[i + 1].strip(), lines[i + 2:]
    return found, below


def _code_feedback(reason: str, failing: str | None, below: list[str], limits: SandboxConfig) -> str:
    """What the next turn sees: the failing test line and the end of the traceback, never the whole test program."""
    if reason == "timeout":
        return f"Your code did not finish within {limits.wall_timeout_s:g} s (an endless loop?)."
    if reason == "cpu limit":
        return f"Your code used more than {limits.cpu_s} s of CPU time (an endless loop or a slow algorithm?)."
    if reason == "memory limit":
        return f"Your code ran out of memory (limit {limits.memory_mb} MiB)."
    if reason == "output limit":
        return f"Your code printed more than {limits.output_bytes} bytes."
    # Caret lines (^^^^) only point into the line above; drop them to keep the useful lines.
    tail = [line.rstrip()[:200] for line in below if line.strip() and set(line.strip()) - set("^~")]
    parts = [f"Your code failed a test.\nFailing test: {failing}" if failing else f"Your code failed ({reason})."]
    if tail:
        parts.append("\n".join(tail[-FEEDBACK_LINES:]))
    return "\n".join(parts)


# --- instruction following ------------------------------------------------------------------------


def check_constraints_answer(text: str, reference: str, prompt: str = "") -> Verdict:
    """Return the verdict of `text` against the constraints `reference` of the instruction-following `prompt`.

    The score is the fraction of constraints satisfied; the verdict is correct only when all are. `prompt` is the
    request text that `combination:repeat_prompt` asks to repeat.
    """
    from tasks.constraints import parse_constraints_reference, score_response  # imports nltk: only when needed

    ids, kwargs = parse_constraints_reference(reference)
    scored = score_response(text, ids, kwargs, prompt)
    detail = f"{sum(r.satisfied for r in scored.results)}/{len(scored.results)} constraints satisfied"
    if scored.violated:
        detail += "; violated: " + ", ".join(scored.violated)
    return Verdict(CORRECT if scored.strict else INCORRECT, scored.fraction, IF_VERIFIER, detail,
                   feedback=scored.feedback or "Every constraint is satisfied.",
                   failure_reason=", ".join(scored.violated) or None)


# --- the worker processes -------------------------------------------------------------------------

# The verifiers a worker process runs; CODE_VERIFIER's program runs in the sandbox, which a thread waits on.
WORKER_VERIFIERS = (MATH_VERIFIER, IF_VERIFIER)
# The domains (schemas/domains.py) a worker process checks, and every domain a verifier checks.
PROCESS_DOMAINS = tuple(sorted(name for name, domain in DOMAINS.items() if domain.verifier in WORKER_VERIFIERS))
VERIFIED_DOMAINS = tuple(sorted(name for name, domain in DOMAINS.items() if domain.verifier is not None))


def check_answer(domain: str, text: str, reference: str, prompt: str = "") -> Verdict:
    """Return the verdict of `text` on an item of a domain a worker verifier checks: what a worker process runs.

    Plain strings cross to the worker, not an Instruction: they are all a checker reads.
    """
    verifier = DOMAINS[domain].verifier if domain in DOMAINS else None
    if verifier == MATH_VERIFIER:
        return check_math_answer(text, reference)
    if verifier == IF_VERIFIER:
        return check_constraints_answer(text, reference, prompt)
    raise VerificationError(f"check_answer: no worker verifier for domain {domain!r} "
                            f"(known: {', '.join(PROCESS_DOMAINS)})")


# What the fork server imports once, for every worker it forks: math-verify (sympy, the LaTeX parser) and the
# constraint checkers (nltk, if-verifiable; the module also fixes langdetect's seed) for verification, and GX with
# the validation module (about 3 s of imports) for the growth host's validation processes, which fork from the same
# server: a run's validation processes start in a fraction of a second instead of 3-4 s each.
WORKER_PRELOAD = ["math_verify", "tasks.constraints", "great_expectations", "tasks.grow"]


def _answered() -> None:
    """A call that does nothing: its answer says a worker runs."""


def warm_workers() -> None:
    """Start the workers' fork server now, and return at once: it imports WORKER_PRELOAD (seconds of CPU) while this
    process goes on (starting servers, planning), so the first shard's workers fork from it without waiting. It ends
    when this process does (multiprocessing's fork server exits when its parent's end of its pipe closes)."""
    worker_context()
    multiprocessing.forkserver.ensure_running()


def worker_context() -> multiprocessing.context.BaseContext:
    """The worker processes' start method: forkserver. Not fork: the parent runs threads (Prefect, asyncio, other
    shards) that a fork would copy mid-flight; the fork server is a fresh single-threaded process. Not spawn: every
    worker of every shard would import math-verify and the checkers again (seconds of CPU each)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WORKER_PRELOAD)  # read when the fork server starts, once per process
    return context


class VerificationError(OrchardError, ValueError):
    """An item cannot be verified: no verifier knows its domain."""


class Verifiers:
    """Check (instruction, response text) items by the verifier their domain names (schemas/domains.py): math by
    math-verify, code in the sandbox, instruction following by its constraint checkers.

    Pools start on first use, and the sandbox is checked on the first code item, so a math-only run needs no
    bubblewrap; without a working sandbox, code items raise SandboxUnavailable and nothing runs unsandboxed.
    `workers` is the size of each pool: worker processes for math and instruction following, and threads that
    wait on sandboxes (each sandbox is one process busy on a CPU).
    """

    def __init__(self, workers: int = 2, sandbox: SandboxConfig = SandboxConfig()) -> None:
        self.workers = max(1, workers)
        self.sandbox = sandbox
        self._processes: ProcessPoolExecutor | None = None
        self._threads: ThreadPoolExecutor | None = None
        self._started: Future[None] | None = None  # the worker pool's first answer (see _processes_running)
        self._sandbox_checked = False
        self._lock = threading.Lock()  # guards pool creation, from any thread or loop
        self._sandbox_lock = threading.Lock()  # held through the one self-check: other sandbox threads wait for it

    def __enter__(self) -> "Verifiers":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=True, cancel_futures=True)
        if self._processes is not None:
            self._processes.shutdown(wait=True, cancel_futures=True)

    def check(self, items: Sequence[tuple[Instruction, str]]) -> list[Verdict]:
        """Return one verdict per (instruction, text), in order, waiting in this thread; all items run concurrently."""
        return [future.result() for future in self.submit(items)]

    async def verify(self, items: Sequence[tuple[Instruction, str]]) -> list[Verdict]:
        """Return one verdict per (instruction, text), in order, without blocking the running event loop.

        Cancelling the caller cancels the checks that have not started yet.
        """
        if any(instruction.domain in PROCESS_DOMAINS for instruction, _ in items):
            await asyncio.wrap_future(self._processes_running())
        return list(await asyncio.gather(*(asyncio.wrap_future(future) for future in self.submit(items))))

    def _processes_running(self) -> Future[None]:
        """Return a future done once the worker pool has answered a first call. The first caller starts the pool in
        a thread of its own: the fork server imports math-verify and the checkers before it forks a worker (seconds),
        and a submit from the event loop would hold the loop, and every tree's next request, that long."""
        with self._lock:
            if self._started is None:
                self._started = Future()
                threading.Thread(target=self._start_processes, name="verify-pool-start", daemon=True).start()
            return self._started

    def _start_processes(self) -> None:
        try:
            self._process_pool().submit(_answered).result()
        except BaseException as exc:  # handed to every verify call, which raises it
            self._started.set_exception(exc)
        else:
            self._started.set_result(None)

    def submit(self, items: Sequence[tuple[Instruction, str]]) -> list[Future[Verdict]]:
        """Start checking every item in its pool and return their futures, in order; waits for no check.

        Raises VerificationError, before anything starts, when an item's domain has no verifier.
        """
        for instruction, _ in items:
            if instruction.domain not in VERIFIED_DOMAINS:
                raise VerificationError(f"instruction {instruction.instruction_id}: no verifier for domain "
                                        f"{instruction.domain!r} (known: {', '.join(VERIFIED_DOMAINS)})")
        # One future per item, no batching: the process pool's round trip costs this process 0.06-0.2 ms of CPU
        # per item, off the caller's thread (bench/verify_cost.py), against ~4 ms for an IF check.
        futures = []
        for instruction, text in items:
            if DOMAINS[instruction.domain].verifier == CODE_VERIFIER:
                futures.append(self._thread_pool().submit(self._check_code, text, instruction.reference))
            else:
                futures.append(self._process_pool().submit(check_answer, instruction.domain, text,
                                                           instruction.reference, instruction.text))
        return futures

    def _check_code(self, text: str, reference: str) -> Verdict:
        # The self-check runs in a sandbox thread, not in the submitting one: it starts a sandbox, and the caller
        # may be an event loop.
        with self._sandbox_lock:
            if not self._sandbox_checked:
                sandbox_self_check(self.sandbox)
                self._sandbox_checked = True
        return check_code_answer(text, reference, self.sandbox)

    def _thread_pool(self) -> ThreadPoolExecutor:
        # Threads are enough: each sandbox is its own process, the thread only waits on it.
        with self._lock:
            if self._threads is None:
                self._threads = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="sandbox")
            return self._threads

    def _process_pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._processes is None:
                self._processes = ProcessPoolExecutor(max_workers=self.workers, mp_context=worker_context(),
                                                      initializer=die_with_owner, initargs=owner())
            return self._processes
