"""Verifiers: turn an action's text into a verdict and a score, and say which verifier said so.

math-verify's timeouts use `signal.alarm`, which only works in a main thread, so answers are checked in
worker processes (each worker's main thread), never in the flow's threads.
"""

from __future__ import annotations

import multiprocessing
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Sequence

MATH_VERIFIER = "math_verify"

CORRECT, INCORRECT, UNPARSABLE = "correct", "incorrect", "unparsable"

# The strategies ask for a last line "Answer: <number>"; when a model forgets, math-verify reads the whole text.
_ANSWER_LINE = re.compile(r"answer\s*(?:is)?\s*[:=]\s*(.+)", re.I)


@dataclass(frozen=True)
class Verdict:
    """What a verifier said of one action."""

    verdict: str
    score: float
    verifier: str
    detail: str


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
        return Verdict(UNPARSABLE, 0.0, MATH_VERIFIER, f"expected {reference}, found no answer")
    shown = str(given[-1])
    if verify(gold, given, timeout_seconds=timeout_s):
        return Verdict(CORRECT, 1.0, MATH_VERIFIER, f"expected {reference}, got {shown}")
    return Verdict(INCORRECT, 0.0, MATH_VERIFIER, f"expected {reference}, got {shown}")


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
