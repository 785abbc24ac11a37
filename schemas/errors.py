"""Orchard's one error base class: the CLI prints such an error as one line, and only a transient one is retried.

Every module's error type derives from `OrchardError`. `transient` says whether trying the same thing again can
help (an object store that is down, a catalog commit another writer won, an engine that timed out); schema,
config, checksum and ownership errors are not transient, so no retry hides them or delays their message.
It lives in the lowest layer, beside the row schemas and suites, so that every layer can derive from it.
"""

from __future__ import annotations

from typing import Any

from schemas.stopping import stop_requested


class OrchardError(Exception):
    """An error whose message alone tells the user what happened and what to fix (file, row, field or object)."""

    transient: bool = False


def is_transient(error: BaseException | None) -> bool:
    """Return whether `error`, or an error it was raised from, is one that a retry can help."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if getattr(error, "transient", False):
            return True
        error = error.__cause__
    return False


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry a failed task run only when its error is transient, and never in a process
    that is stopping."""
    if stop_requested():
        return False
    return is_transient(state.result(raise_on_failure=False) if state is not None else None)
