"""Verifiers: turn an action's text into a verdict and a score, and say which verifier said so.

Math: math-verify's timeouts use `signal.alarm`, which only works in a main thread, so answers are checked
in worker processes (each worker's main thread), never in the flow's threads.
Code: the answer's code and the instruction's test program run together in a bubblewrap sandbox
(orchard/sandbox.py); the answer is correct iff the program exits 0. Never outside the sandbox.
"""

from __future__ import annotations

import multiprocessing
import re
import threading
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from orchard.errors import OrchardError
from orchard.sandbox import PROGRAM_PATH, SandboxConfig, run_sandboxed, sandbox_self_check

if TYPE_CHECKING:
    from tasks.seeds import Instruction

MATH_VERIFIER = "math_verify"
CODE_VERIFIER = "sandbox_tests"

CORRECT, INCORRECT, UNPARSABLE = "correct", "incorrect", "unparsable"

# The strategies ask for a last line "Answer: <number>"; when a model forgets, math-verify reads the whole text.
_ANSWER_LINE = re.compile(r"answer\s*(?:is)?\s*[:=]\s*(.+)", re.I)


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


def answer_span(text: str) -> str:
    """Return the part of `text` that states the final answer (its last 'Answer: …' line, else all of it)."""
    found = _ANSWER_LINE.findall(text)
    return found[-1].strip() if found else text


def check_math_answer(text: str, reference: str, timeout_s: int = 5) -> Verdict:
    """Return the verdict of `text` against the exact `reference`, checked by math-verify (call in a main thread)."""
    from math_verify import parse, verify

    gold = parse(f"${reference}$", parsing_timeout=timeout_s)
    if not gold:
        gold = parse(reference, parsing_timeout=timeout_s)
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


def _check_one(item: tuple[str, str]) -> Verdict:
    return check_math_answer(*item)


def _warm_up() -> None:
    import math_verify  # noqa: F401  (import once per worker, not per answer)


class MathVerifier:
    """A pool of worker processes that check (text, reference) items with math-verify."""

    def __init__(self, workers: int = 2) -> None:
        # spawn, not fork: the parent runs threads (Prefect, asyncio) that a fork would copy mid-flight.
        self._pool = ProcessPoolExecutor(
            max_workers=max(1, workers), mp_context=multiprocessing.get_context("spawn"), initializer=_warm_up
        )

    def __enter__(self) -> "MathVerifier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def check(self, items: Sequence[tuple[str, str]]) -> list[Verdict]:
        """Return one verdict per (text, reference), in order."""
        return list(self._pool.map(_check_one, items, chunksize=max(1, len(items) // 8)))


# --- code ---------------------------------------------------------------------------------------

# A fenced block: its language tag (maybe none) and its body; an unclosed last fence (the answer ran out of
# tokens) still counts, up to the end of the text.
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_PYTHON_TAGS = {"python", "py", "python3"}
_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+)')
_EXCEPTION = re.compile(r"^(?P<name>[A-Za-z_][\w.]*)(?::\s|:?$)")
# What a verdict keeps of the program's streams: the start of stdout, the end of stderr (where the error is).
VERDICT_STREAM_CHARS = 4000
FEEDBACK_LINES = 6


def extract_code(text: str) -> str:
    """Return the answer's code: its last ```python block, else its last untagged block, else the whole text."""
    blocks = _FENCE.findall(text)
    for wanted in (_PYTHON_TAGS, {""}):
        chosen = [body for tag, body in blocks if tag.lower() in wanted]
        if chosen:
            return chosen[-1].strip("\n")
    return text.strip("\n") if not blocks else ""


def check_code_answer(text: str, reference: str, limits: SandboxConfig = SandboxConfig()) -> Verdict:
    """Return the verdict of the code in `text` run with the test program `reference` in the sandbox (exit 0 passes)."""
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


# --- dispatch by domain ---------------------------------------------------------------------------


IF_VERIFIER = "if_constraints"


def check_constraints_answer(text: str, instruction: Instruction) -> Verdict:
    """Return the verdict of `text` against the verifiable constraints of an instruction-following prompt.

    The score is the fraction of constraints satisfied; the verdict is correct only when all are.
    """
    from tasks.constraints import parse_constraints_reference, score_response  # imports nltk: only when needed

    ids, kwargs = parse_constraints_reference(instruction.reference)
    scored = score_response(text, ids, kwargs, instruction.text)
    detail = f"{sum(r.satisfied for r in scored.results)}/{len(scored.results)} constraints satisfied"
    if scored.violated:
        detail += "; violated: " + ", ".join(scored.violated)
    return Verdict(CORRECT if scored.strict else INCORRECT, scored.fraction, IF_VERIFIER, detail,
                   feedback=scored.feedback or "Every constraint is satisfied.",
                   failure_reason=", ".join(scored.violated) or None)


class VerificationError(OrchardError, ValueError):
    """An item cannot be verified: no verifier knows its domain."""


class Verifiers:
    """Check (instruction, response text) items by their domain: math by math-verify, code in the sandbox,
    instruction following by its constraint checkers.

    Pools start on first use, and the sandbox is checked on the first code item, so a math-only run needs no
    bubblewrap; without a working sandbox, code items raise SandboxUnavailable and nothing runs unsandboxed.
    """

    DOMAINS = ("code", "instruction_following", "math")

    def __init__(self, workers: int = 2, sandbox: SandboxConfig = SandboxConfig()) -> None:
        self.workers = max(1, workers)
        self.sandbox = sandbox
        self._math: MathVerifier | None = None
        self._threads: ThreadPoolExecutor | None = None
        self._sandbox_checked = False
        self._lock = threading.Lock()

    def __enter__(self) -> "Verifiers":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=True, cancel_futures=True)
        if self._math is not None:
            self._math.close()

    def check(self, items: Sequence[tuple[Instruction, str]]) -> list[Verdict]:
        """Return one verdict per (instruction, text), in order; code runs concurrently with math."""
        for instruction, _ in items:
            if instruction.domain not in self.DOMAINS:
                raise VerificationError(f"instruction {instruction.instruction_id}: no verifier for domain "
                                        f"{instruction.domain!r} (known: {', '.join(self.DOMAINS)})")
        code = [i for i, (instruction, _) in enumerate(items) if instruction.domain == "code"]
        math = [i for i, (instruction, _) in enumerate(items) if instruction.domain == "math"]
        verdicts: list[Verdict | None] = [None] * len(items)
        running: dict[int, Future[Verdict]] = {}
        if code:
            pool = self._code_pool()
            running = {i: pool.submit(check_code_answer, items[i][1], items[i][0].reference, self.sandbox)
                       for i in code}
        if math:
            checked = self._math_pool().check([(items[i][1], items[i][0].reference) for i in math])
            for i, verdict in zip(math, checked):
                verdicts[i] = verdict
        for i, (instruction, text) in enumerate(items):
            if instruction.domain == "instruction_following":  # pure Python and fast: checked in this thread
                verdicts[i] = check_constraints_answer(text, instruction)
        for i, future in running.items():
            verdicts[i] = future.result()
        return verdicts  # type: ignore[return-value]  (every index was filled above)

    async def verify(self, items: Sequence[tuple[Instruction, str]]) -> list[Verdict]:
        """Return one verdict per (instruction, text), in order, without blocking the event loop."""
        import asyncio

        return await asyncio.to_thread(self.check, items)

    def _code_pool(self) -> ThreadPoolExecutor:
        # Threads are enough: each sandbox is its own process, the thread only waits on it.
        with self._lock:
            if not self._sandbox_checked:
                sandbox_self_check(self.sandbox)
                self._sandbox_checked = True
            if self._threads is None:
                self._threads = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="sandbox")
            return self._threads

    def _math_pool(self) -> MathVerifier:
        with self._lock:
            if self._math is None:
                self._math = MathVerifier(self.workers)
            return self._math
