"""Validate a shard's tables with Great Expectations: a suite per table, outcomes keyed by expectation, HTML Data Docs.

The suites live in schemas/suites/*.json (see schemas/suites.py). A shard is validated where it was grown, right after
it lands (tasks/grow.py), in an in-memory GX context built once per process: one pandas datasource and one
ValidationDefinition per table. Its record (outcomes, lake rows and GX's own results) is written beside the shard, or
beside its quarantined copy. The nightly flow checks each shard's bytes against its manifest (`check_shard_task`) and
renders the run's Data Docs once, at its end (`build_data_docs`), in a GX file project at `gx_dir`. GX is imported
inside functions: it takes seconds to import, and other modules import this one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import math
import threading
import time
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Iterable, Iterator, Mapping, NamedTuple, Sequence

import pandas as pd
import pyarrow as pa
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from orchard.config import Config
from orchard.store import ObjectMissing, ObjectStore
from schemas.errors import OrchardError, is_transient, retry_transient
from schemas.fates import ShardCheck
from schemas.rows import SHARD_TABLES
from schemas.shards import RecordedValidation, ShardReceipt
from schemas.suites import SUITES_DIR, ExpectationSpec, SuiteError, SuiteSpec, columns_of, load_suites, with_checks
from tasks.hygiene import flagged_ids
from tasks.land import (
    VALIDATION,
    ShardIntegrityError,
    quarantine_corrupt,
    quarantine_prefix,
    quarantine_shard,
    read_shard,
    shard_prefix,
    write_validation,
)

if TYPE_CHECKING:
    from great_expectations.core import ExpectationSuiteValidationResult
    from great_expectations.core.expectation_validation_result import ExpectationValidationResult
    from great_expectations.data_context import AbstractDataContext, FileDataContext
    from great_expectations.execution_engine import PandasExecutionEngine

DATASOURCE = "orchard_shards"
BATCH_DEFINITION = "whole_table"
# Suite parameter the suites use for "rows name the shard being validated" ({"$PARAMETER": "this_shard"}).
THIS_SHARD = "this_shard"
# Suite parameter: the ids of the shard's instructions that the run's eval sets flag (tasks/hygiene.py: flagged_ids).
CONTAMINATED = "contaminated"
EXAMPLES = 3  # unexpected rows quoted per failed expectation
LOCK_FILE = "orchard-validate.lock"
# Data Docs show every quarantined shard of a run and this many passed ones: rendering costs ~0.1 s a page, and every
# shard's outcomes are rows of the lake's `validations` table.
DOCS_PASSED_SHARDS = 3
DOCS_SITE = "local_site"
# The Data Docs index reads every validation result it lists (~2 ms each): without a limit each shard's
# validation gets slower as results pile up. 90 results are the last 30 shards; older pages stay on disk.
DOCS_INDEX_LIMIT = 90
DOCS_SITE_CONFIG = {
    "class_name": "SiteBuilder",
    "show_how_to_buttons": False,
    "store_backend": {
        "class_name": "TupleFilesystemStoreBackend",
        "base_directory": f"uncommitted/data_docs/{DOCS_SITE}/",
    },
    "site_index_builder": {"class_name": "DefaultSiteIndexBuilder", "validation_results_limit": DOCS_INDEX_LIMIT},
}


class ShardValidationError(OrchardError, ValueError):
    """A shard cannot be validated at all (a table is missing or has the wrong columns); the message names it."""


@dataclass(frozen=True)
class ExpectationOutcome:
    """What one expectation of one suite concluded about one shard table."""

    suite: str
    expectation: str
    columns: tuple[str, ...]
    success: bool
    observed: str
    unexpected_count: int | None = None
    element_count: int | None = None
    condition: str | None = None  # the row condition, e.g. "role == action", when the expectation has one
    raised: bool = False  # the expectation could not be evaluated (GX caught an exception)

    @property
    def label(self) -> str:
        """Return `expectation(columns)`, the name a reader looks for in a report."""
        return f"{self.expectation}({', '.join(self.columns)})"

    def describe(self) -> str:
        """Return one line saying how this expectation fared, e.g. `pairs: expect_x(margin) failed on 1 of 12 rows`."""
        verdict = "passed" if self.success else "failed"
        where = f" where {self.condition}" if self.condition else ""
        if self.raised:
            return f"{self.suite}: {self.label} raised: {self.observed}"
        if self.unexpected_count is not None and self.element_count is not None:
            counted = f"{self.unexpected_count} of {self.element_count} rows{where}"
            return f"{self.suite}: {self.label} {verdict} on {counted}"
        return f"{self.suite}: {self.label} {verdict}: {self.observed}"

    def to_dict(self) -> dict[str, Any]:
        """Return this outcome as JSON-safe values."""
        return {
            "suite": self.suite,
            "expectation": self.expectation,
            "columns": list(self.columns),
            "success": self.success,
            "observed": self.observed,
            "unexpected_count": self.unexpected_count,
            "element_count": self.element_count,
            "condition": self.condition,
            "raised": self.raised,
        }


@dataclass
class ShardValidation:
    """The outcome of every expectation of every suite on one shard, and where its Data Docs are."""

    shard_id: str
    success: bool
    results: list[ExpectationOutcome]
    run_time: str = ""  # when GX ran it (ISO 8601, UTC): with the shard id, the run GX files it under
    gx_results: dict[str, dict[str, Any]] = field(default_factory=dict)  # table -> {batch_id, result}: for Data Docs
    seconds: float = 0.0

    def failed(self) -> list[ExpectationOutcome]:
        """Return the outcomes that failed, in suite order."""
        return [r for r in self.results if not r.success]

    def summary(self) -> str:
        """Return one line naming each failed expectation, or saying that all passed."""
        failed = self.failed()
        if not failed:
            return f"shard {self.shard_id}: all {len(self.results)} expectations passed"
        return f"shard {self.shard_id}: " + "; ".join(r.describe() for r in failed)

    def to_dict(self) -> dict[str, Any]:
        """Return the whole validation as JSON-safe values (what quarantine/validation.json holds)."""
        return {
            "shard_id": self.shard_id,
            "success": self.success,
            "summary": self.summary(),
            "seconds": round(self.seconds, 3),
            "results": [r.to_dict() for r in self.results],
            "run_time": self.run_time,
            "gx_results": self.gx_results,
        }

    def rows(self, run_id: str) -> list[dict[str, Any]]:
        """Return one row per outcome for the lake table `validations`."""
        return [
            {
                "run_id": run_id,
                "shard_id": self.shard_id,
                "suite": r.suite,
                "expectation": r.expectation,
                "column": ", ".join(r.columns) or None,
                "success": r.success,
                "observed": r.observed,
            }
            for r in self.results
        ]


def validate_shard(
    tables: Mapping[str, pa.Table],
    *,
    shard_id: str,
    suites_dir: Path = SUITES_DIR,
    contaminated: Sequence[str] = (),
    only: Collection[str] = (),
) -> ShardValidation:
    """Return how a shard's tables fare against the suites, with GX's own results (for Data Docs) as JSON; with
    `only`, against the suites of those tables alone (what one table's expectations say of the shard, at a fraction
    of the work: a shard is landed and published only after every suite).

    GX runs in this process's in-memory context, built on first use and kept (suites, datasource, validation
    definitions): nothing is written to disk and no lock is shared with another process. One validation runs at a
    time per process (GX's objects are not thread-safe).
    """
    started = time.perf_counter()
    if not shard_id:
        raise ShardValidationError("shard_id is empty")
    suites = load_suites(suites_dir)
    if only:
        unknown = sorted(set(only) - set(suites))
        if unknown:
            raise ShardValidationError(f"no suite for table(s) {', '.join(unknown)}; suites: {', '.join(suites)}")
        suites = {table: suite for table, suite in suites.items() if table in only}
    checked = _checked(tables, shard_id, suites)

    from great_expectations.core.run_identifier import RunIdentifier

    with _CONTEXT_LOCK:
        context = _memory_context()
        definitions, _ = _sync(context, suites)
        # Not one Checkpoint: in GX 1.24 a Checkpoint hands the same batch_parameters to all its validation
        # definitions and a dataframe asset takes exactly {"dataframe": df}, so one run cannot carry several tables;
        # each suite also wants its own row id in result_format. So: one run per table under one run id.
        # The run name carries the shard id, so Data Docs list validations by shard.
        run_time = dt.datetime.now(dt.timezone.utc)
        run_id = RunIdentifier(run_name=shard_id, run_time=run_time)
        suite_results: dict[str, ExpectationSuiteValidationResult] = {}
        for table, suite in suites.items():
            parameters = {THIS_SHARD: [shard_id], CONTAMINATED: list(contaminated)}
            # BASIC has every count and observed value of SUMMARY at ~70% of its CPU; only a table that fails is
            # validated again, with SUMMARY, for the ids of the rows at fault.
            suite_results[table] = _run(definitions[table], checked[table], parameters, BASIC, run_id)
            if not suite_results[table].success:
                suite_results[table] = _run(definitions[table], checked[table], parameters,
                                            {**BASIC, "result_format": "SUMMARY",
                                             "unexpected_index_column_names": [suite.row_id]}, run_id)
        _forget_results(context)
        gx_results = {table: {"batch_id": result.batch_id, "result": result.to_json_dict()}
                      for table, result in suite_results.items()}

    outcomes = _in_suite_order(
        (table, result.expectation_config.meta.get("position", 0), _outcome(table, result, suites[table]))
        for table, suite_result in suite_results.items()
        for result in suite_result.results
    )
    return ShardValidation(
        shard_id=shard_id,
        success=all(o.success for o in outcomes),
        results=outcomes,
        run_time=run_time.isoformat(),
        gx_results=gx_results,
        seconds=time.perf_counter() - started,
    )


BASIC = {"result_format": "BASIC", "partial_unexpected_count": EXAMPLES}
# The suite suffixes of the two parts of a table's suite in a batch (see _parts): its GX suite and definition names.
TOGETHER, ALONE = ".together", ".alone"
# Map expectations that judge each row by its own values against fixed kwargs: they pass on a batch's rows exactly
# when they pass on each shard's. Others (a z-score, an order) may not: they are run on each shard alone.
ROW_LOCAL = frozenset({
    "expect_column_values_to_not_be_null", "expect_column_values_to_be_null",
    "expect_column_values_to_be_in_set", "expect_column_values_to_not_be_in_set",
    "expect_column_values_to_be_between", "expect_column_value_lengths_to_be_between",
    "expect_column_values_to_match_regex", "expect_column_values_to_not_match_regex",
    "expect_column_pair_values_a_to_be_greater_than_b", "expect_column_pair_values_to_be_equal",
})
# Uniqueness is judged within each shard on a batch: a value is keyed by its shard (two shards may share a drop
# reason, never a row of one shard another's id). Column -> what the batch's suite checks instead (see _together).
UNIQUE, COMPOUND_UNIQUE = "expect_column_values_to_be_unique", "expect_compound_columns_to_be_unique"
IN_SHARD = "\x00in shard"  # a batch table's column: the position in the batch of the row's shard
# In a batch, each row's shard_id that names its own shard is replaced by this before GX sees it, and the batch's
# "this shard" is [OWN_SHARD]: one in-set check over the batch then says of every row what validating its shard
# alone says (a row of shard A naming shard B of the same batch still fails). Shard ids hold no NUL.
OWN_SHARD = "\x00own shard"


class ShardTables(NamedTuple):
    """One landed shard waiting for validation: its tables, its id, and its instructions that the eval sets flag."""

    tables: Mapping[str, pa.Table]
    shard_id: str
    contaminated: Sequence[str] = ()


def validate_shards(batch: Sequence[ShardTables], suites_dir: Path = SUITES_DIR) -> list[ShardValidation]:
    """Return each shard's validation, in batch order: exactly what `validate_shard` returns for it alone (outcomes,
    success, summary), for little more GX work than one shard's.

    GX's cost is per expectation, not per row, so each table is validated once for the whole batch (its shards'
    tables concatenated, each with the check columns derived from its own shard) against the expectations that judge
    rows on their own and want every row to pass (see _parts): those pass on the batch exactly when they pass on
    every shard, and for each shard they then report `0 of <its rows> unexpected`. The rest (row counts, distinct
    counts) are run on each shard's own tables: a handful of expectations. An expectation that fails sends the shards
    it may concern to `validate_shard`, alone, for GX's exact findings and examples: every shard when it is one of
    the batch's, else the shard whose own part failed.

    A shard that passes in a batch of several has no GX result of its own: its `gx_results` is empty (Data Docs
    render shards validated alone) and its `seconds` is its share of the batch's.
    """
    if len(batch) == 1:
        (shard,) = batch
        return [validate_shard(shard.tables, shard_id=shard.shard_id, suites_dir=suites_dir,
                               contaminated=shard.contaminated)]
    started = time.perf_counter()
    for shard in batch:
        if not shard.shard_id:
            raise ShardValidationError("shard_id is empty")
    suites = load_suites(suites_dir)
    checked = [_checked(shard.tables, shard.shard_id, suites) for shard in batch]
    parts = {table: _parts(suite) for table, suite in suites.items()}

    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.execution_engine import PandasExecutionEngine

    with _CONTEXT_LOCK:
        context = _memory_context()
        together, alone = _batch_definitions(context, suites)
        run_time = dt.datetime.now(dt.timezone.utc)
        run_id = RunIdentifier(run_name=f"{batch[0].shard_id} and {len(batch) - 1} more", run_time=run_time)
        # Being flagged is a property of an instruction, not of a shard: the batch's union flags no row of a shard
        # that the shard's own list does not, unless the row names another shard's instruction (which fails
        # check_instruction_exists alone, and here sends the batch to validate_shard).
        parameters = {THIS_SHARD: [OWN_SHARD], CONTAMINATED: sorted({i for s in batch for i in s.contaminated})}
        passed = True
        for table in together:
            frame = _together([shard_checked[table] for shard_checked in checked], [s.shard_id for s in batch],
                              parts[table][0])
            passed = _nothing_unexpected(_run(together[table], frame, parameters, BASIC, run_id))
            if not passed:
                break
        own: list[dict[str, ExpectationSuiteValidationResult]] = [{} for _ in batch]
        for shard, shard_checked, shard_results in zip(batch, checked, own):
            for table in alone if passed else ():
                shard_results[table] = _run(alone[table], shard_checked[table],
                                            {THIS_SHARD: [shard.shard_id], CONTAMINATED: list(shard.contaminated)},
                                            BASIC, run_id)
                if not shard_results[table].success:
                    break
        _forget_results(context)

    engine = PandasExecutionEngine()
    share = (time.perf_counter() - started) / len(batch)
    validations = []
    for shard, shard_checked, shard_results in zip(batch, checked, own):
        if not passed or not all(result.success for result in shard_results.values()):
            validations.append(validate_shard(shard.tables, shard_id=shard.shard_id, suites_dir=suites_dir,
                                              contaminated=shard.contaminated))
            continue
        outcomes = _in_suite_order([
            *((table, position, _passed_in_batch(table, suites[table].expectations[position],
                                                 shard_checked[table], engine))
              for table, (rows, _) in parts.items() for position in rows),
            *((table, result.expectation_config.meta.get("position", 0), _outcome(table, result, suites[table]))
              for table, suite_result in shard_results.items() for result in suite_result.results),
        ])
        validations.append(ShardValidation(shard_id=shard.shard_id, success=all(o.success for o in outcomes),
                                           results=outcomes, run_time=run_time.isoformat(), seconds=share))
    return validations


def _checked(tables: Mapping[str, pa.Table], shard_id: str, suites: Mapping[str, SuiteSpec]) -> dict[str, pd.DataFrame]:
    """Return each table of a shard as GX validates it: the columns its suite reads, and its check columns."""
    frames = _frames(tables, shard_id=shard_id, suites=suites)
    return {table: with_checks(suite, frames) for table, suite in suites.items()}


def _run(definition: Any, frame: pd.DataFrame, parameters: Mapping[str, Any], result_format: Mapping[str, Any],
         run_id: Any) -> ExpectationSuiteValidationResult:
    """Return GX's result of one table's validation definition on `frame`; hold _CONTEXT_LOCK."""
    return definition.run(batch_parameters={"dataframe": frame}, expectation_parameters=dict(parameters),
                          result_format=dict(result_format), run_id=run_id)


def _forget_results(context: AbstractDataContext) -> None:
    """Drop the results ValidationDefinition.run keeps in the context's store (in memory here); hold _CONTEXT_LOCK."""
    store = context.validation_results_store
    for key in store.list_keys():
        store.remove_key(key)


def _in_suite_order(outcomes: Iterable[tuple[str, int, ExpectationOutcome]]) -> list[ExpectationOutcome]:
    """Return (table, suite-file position, outcome) triples' outcomes in table then suite-file order."""
    order = {table: i for i, table in enumerate(SHARD_TABLES)}
    return [outcome for _, outcome in sorted((((order[t], p), o) for t, p, o in outcomes), key=lambda k: k[0])]


def _parts(suite: SuiteSpec) -> tuple[dict[int, ExpectationSpec], tuple[int, ...]]:
    """Return how a batch of shards is validated against a suite: the expectations run on the batch's rows at once
    (by suite-file position, as the batch's suite states them), and the positions of those run on each shard alone.

    At once: ROW_LOCAL expectations and uniqueness (made uniqueness within each shard: see _together) that every
    row must meet (no `mostly`) and that read no column where "this shard" is a parameter except the in-set check
    itself and not_be_null (in a batch that column holds OWN_SHARD). Alone: the rest (a row count, a distinct count).
    """
    marked = {column for e in suite.expectations if _names_this_shard(e.kwargs) for column in e.columns}
    together, alone = {}, []
    for position, expectation in enumerate(suite.expectations):
        kwargs = expectation.kwargs
        reads_marked = bool(set(expectation.columns) & marked) and not (
            _names_this_shard(kwargs) or expectation.type == "expect_column_values_to_not_be_null")
        if kwargs.get("mostly", 1) != 1 or reads_marked:
            alone.append(position)
        elif expectation.type == UNIQUE:
            together[position] = ExpectationSpec(UNIQUE, {**kwargs, "column": kwargs["column"] + IN_SHARD})
        elif expectation.type == COMPOUND_UNIQUE:
            together[position] = ExpectationSpec(COMPOUND_UNIQUE, {**kwargs, "column_list": [*kwargs["column_list"], IN_SHARD]})
        elif expectation.type in ROW_LOCAL:
            together[position] = expectation
        else:
            alone.append(position)
    return together, tuple(alone)


def _names_this_shard(kwargs: Mapping[str, Any]) -> bool:
    """Whether an expectation's kwargs take "this shard" ({"$PARAMETER": THIS_SHARD}) as a value."""
    return any(value == {"$PARAMETER": THIS_SHARD} for value in kwargs.values())


def _batch_definitions(context: AbstractDataContext, suites: Mapping[str, SuiteSpec]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return each table's validation definitions for a batch: of the expectations run at once, and of those run on
    each shard alone (a table with none has none); hold _CONTEXT_LOCK."""
    parts = {table: _parts(suite) for table, suite in suites.items()}
    together, _ = _sync(context, suites, TOGETHER, {table: rows for table, (rows, _) in parts.items()})
    alone, _ = _sync(context, suites, ALONE,
                     {table: {p: suites[table].expectations[p] for p in own} for table, (_, own) in parts.items()})
    return together, alone


def _together(frames: Sequence[pd.DataFrame], shard_ids: Sequence[str], expectations: Mapping[int, ExpectationSpec],
              ) -> pd.DataFrame:
    """Return one table of a batch's shards as its batch suite reads it: their checked tables one after the other,
    shard_id naming its own shard as OWN_SHARD, each row's shard (IN_SHARD) and the columns keyed by it that
    uniqueness within a shard reads (`<column>` + IN_SHARD: (shard, value), null where the value is)."""
    marked = []
    for position, (frame, shard_id) in enumerate(zip(frames, shard_ids)):
        frame = frame.copy()
        if "shard_id" in frame.columns:
            frame["shard_id"] = frame["shard_id"].astype(object).mask(frame["shard_id"].eq(shard_id).fillna(False),
                                                                      OWN_SHARD)
        frame[IN_SHARD] = position
        for expectation in expectations.values():
            if expectation.type == UNIQUE:
                column = expectation.kwargs["column"].removesuffix(IN_SHARD)
                frame[column + IN_SHARD] = [None if pd.isna(v) else (position, v) for v in frame[column]]
        marked.append(frame)
    with warnings.catch_warnings():
        # pandas warns that an empty or all-null table will stop widening a column's dtype; the values are the same.
        warnings.simplefilter("ignore", FutureWarning)
        return pd.concat(marked, ignore_index=True)


def _nothing_unexpected(suite_result: ExpectationSuiteValidationResult) -> bool:
    """Whether every expectation of a batch's table passed with nothing unexpected: each shard's outcome follows."""
    return bool(suite_result.success) and all(
        result.success and (result.result or {}).get("unexpected_count") == 0 and "element_count" in result.result
        for result in suite_result.results
    )


def _passed_in_batch(table: str, expectation: ExpectationSpec, frame: pd.DataFrame,
                     engine: PandasExecutionEngine) -> ExpectationOutcome:
    """Return what validating one shard alone reports of a map expectation that nothing of its batch failed:
    nothing unexpected among the rows of the shard's table it judges (element_count: all of them, or those meeting
    its row condition, filtered as GX's pandas engine filters them)."""
    condition = expectation.kwargs.get("row_condition")
    # A private method of the pinned GX: the very filter a validation applies, for any kind of condition.
    rows = len(engine._apply_row_condition_filter(frame, condition, expectation.kwargs)) if condition else len(frame)
    where = _condition_text(condition)
    return ExpectationOutcome(table, expectation.type, expectation.columns, True, _counted(0, rows, where), 0, rows,
                              where)


_CONTEXT_LOCK = threading.Lock()
_CONTEXT: list[AbstractDataContext] = []  # this process's in-memory GX context, once built


def warm_validation(suites_dir: Path = SUITES_DIR) -> None:
    """Build this process's GX context and validation definitions (of a shard and of a batch) now (GX's imports and
    objects take seconds), so the first shards that land here are validated at once."""
    suites = load_suites(suites_dir)
    with _CONTEXT_LOCK:
        context = _memory_context()
        _sync(context, suites)
        _batch_definitions(context, suites)


def _memory_context() -> AbstractDataContext:
    """Return this process's in-memory GX context (progress bars off), built on first use; hold _CONTEXT_LOCK."""
    if not _CONTEXT:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)  # tqdm floods logs
        _CONTEXT.append(context)
    return _CONTEXT[0]


def _frames(
    tables: Mapping[str, pa.Table], *, shard_id: str, suites: Mapping[str, SuiteSpec]
) -> dict[str, pd.DataFrame]:
    """Return each shard table as a DataFrame, nested columns left out unless a suite reads them."""
    frames = {}
    for name, schema in SHARD_TABLES.items():
        if name not in tables:
            raise ShardValidationError(f"shard {shard_id}: table {name!r} is missing (got {sorted(tables)})")
        table = tables[name]
        missing = [c for c in schema.names if c not in table.column_names]
        if missing:
            raise ShardValidationError(f"shard {shard_id}: table {name!r} lacks column(s) {missing}")
        wanted = set(suites[name].data_columns) if name in suites else set()
        # Message lists are the bulk of a shard; converting them to Python objects buys nothing here.
        keep = [c for c in schema.names if c in wanted or not pa.types.is_nested(table.schema.field(c).type)]
        frames[name] = table.select(keep).to_pandas()
    return frames


@contextlib.contextmanager
def _project_lock(gx_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the GX project: its file stores are not safe for concurrent writers."""
    gx_dir.mkdir(parents=True, exist_ok=True)
    # A fresh descriptor per call makes flock exclude other threads of this process as well as other processes.
    with open(gx_dir / LOCK_FILE, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _open_context(gx_dir: Path) -> FileDataContext:
    """Return the GX file context at `gx_dir`, created on first use, with progress bars off and a bounded docs index."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="file", project_root_dir=gx_dir)
    bars = context.variables.progress_bars
    # A freshly set config is an object; one read back from great_expectations.yml is a plain dict.
    settings = bars if isinstance(bars, dict) else vars(bars) if bars is not None else {}
    if settings.get("globally", True) or settings.get("metric_calculations", True):
        # tqdm bars per expectation flood task logs.
        context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        context.variables.save()
    sites = context.variables.data_docs_sites or {}
    if sites.get(DOCS_SITE) != DOCS_SITE_CONFIG:
        if DOCS_SITE in sites:
            context.update_data_docs_site(DOCS_SITE, DOCS_SITE_CONFIG)
        else:
            context.add_data_docs_site(DOCS_SITE, DOCS_SITE_CONFIG)
    return context


def _sync(
    context: AbstractDataContext, suites: Mapping[str, SuiteSpec], part: str = "",
    expectations: Mapping[str, Mapping[int, ExpectationSpec]] | None = None,
) -> tuple[dict[str, Any], set[str]]:
    """Return a ValidationDefinition per table and the suites rewritten, adding or updating GX objects as needed.

    With a `part` (a name suffix), each table's suite and definition hold `expectations[table]` instead of its suite
    file's (by file position; a table with none has no definition): see validate_shards.
    """
    import great_expectations as gx

    try:
        datasource = context.data_sources.get(DATASOURCE)
    except KeyError:
        datasource = context.data_sources.add_pandas(DATASOURCE)
    definitions, changed = {}, set()
    for table, spec in suites.items():
        kept = None if expectations is None else expectations.get(table, {})
        if kept is not None and not kept:
            continue
        asset_names = {asset.name for asset in datasource.assets}
        asset = datasource.get_asset(table) if table in asset_names else datasource.add_dataframe_asset(table)
        batch_names = {b.name for b in asset.batch_definitions}
        batch = (
            asset.get_batch_definition(BATCH_DEFINITION)
            if BATCH_DEFINITION in batch_names
            else asset.add_batch_definition_whole_dataframe(BATCH_DEFINITION)
        )
        suite, rewritten = _stored_suite(context, spec, table + part, kept)
        if rewritten:
            changed.add(table)
        try:
            definition = context.validation_definitions.get(table + part)
            fresh = definition.data.id == batch.id and definition.suite.id == suite.id and definition.is_fresh().success
        except gx.exceptions.DataContextError:
            fresh = False
        if not fresh:
            definition = context.validation_definitions.add_or_update(
                gx.ValidationDefinition(name=table + part, data=batch, suite=suite)
            )
        definitions[table] = definition
    return definitions, changed


def _stored_suite(context: AbstractDataContext, spec: SuiteSpec, name: str,
                  expectations: Mapping[int, ExpectationSpec] | None = None) -> tuple[Any, bool]:
    """Return the GX suite `name` for `spec` (or for `expectations`, by suite-file position, instead of the file's)
    and whether it was (re)written: only when the suite file says something else."""
    import great_expectations as gx
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    wanted = gx.ExpectationSuite(name=name, meta={"source": str(spec.path), "description": spec.description})
    for position, expectation in (enumerate(spec.expectations) if expectations is None else expectations.items()):
        try:
            configuration = ExpectationConfiguration(
                type=expectation.type,
                kwargs=expectation.kwargs,
                notes=expectation.notes or None,
                meta={"position": position},  # outcomes are sorted back into suite-file order with it
            )
            wanted.expectations.append(configuration.to_domain_obj())
        except Exception as error:  # GX raises several unrelated types for an unknown name or a bad kwarg
            raise SuiteError(
                f"{spec.path}: expectations[{position}] ({expectation.type}): GX rejects it: {error}"
            ) from error
    try:
        stored = context.suites.get(name)
    except gx.exceptions.DataContextError:
        return context.suites.add(wanted), True
    if _suite_content(stored) == _suite_content(wanted) and stored.meta == wanted.meta:
        return stored, False
    return context.suites.add_or_update(wanted), True


def _suite_content(suite: Any) -> list[tuple[str, str]]:
    """Return a suite's expectations as comparable (type, configuration) pairs, ids left out."""
    content = []
    for expectation in suite.expectations:
        configuration = expectation.configuration
        content.append(
            (
                configuration.type,
                json.dumps(
                    {"kwargs": configuration.kwargs, "notes": configuration.notes, "meta": configuration.meta},
                    sort_keys=True,
                    default=str,
                ),
            )
        )
    return sorted(content)


def build_data_docs(gx_dir: Path, validations: Sequence[Mapping[str, Any]],
                    suites_dir: Path = SUITES_DIR) -> tuple[str | None, dict[str, dict[str, str]]]:
    """Render the Data Docs site of the GX file project at `gx_dir` for `validations` (shard validation records, as
    ShardValidation.to_dict() writes them), in one build; return the index.html path and each shard's page per table.

    A run calls this once, at its end, for the shards it shows; a record without GX results is left out. The project
    is created on first use; a lock file keeps two runs of one state directory from writing its stores at once.
    """
    from great_expectations.core.expectation_validation_result import ExpectationSuiteValidationResultSchema
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )

    suites = load_suites(suites_dir)
    schema = ExpectationSuiteValidationResultSchema()
    gx_dir = Path(gx_dir)
    with _project_lock(gx_dir):
        context = _open_context(gx_dir)
        _, changed_suites = _sync(context, suites)
        store = context.validation_results_store
        shown: dict[str, dict[str, Any]] = {}
        for record in validations:
            results = record.get("gx_results") or {}
            if not results:
                continue
            run_id = RunIdentifier(run_name=record["shard_id"], run_time=dt.datetime.fromisoformat(record["run_time"]))
            for table, entry in results.items():
                identifier = ValidationResultIdentifier(
                    expectation_suite_identifier=ExpectationSuiteIdentifier(name=table),
                    run_id=run_id,
                    batch_identifier=entry["batch_id"],
                )
                store.set(identifier, schema.load(entry["result"]))
                shown.setdefault(record["shard_id"], {})[table] = identifier
        site_dir = _site_dir(context)
        # A suite page only changes with its suite: render it when rewritten or missing, not for every run.
        suite_pages = [
            ExpectationSuiteIdentifier(name=table)
            for table in suites
            if table in changed_suites or site_dir is None or not (site_dir / "expectations" / f"{table}.html").exists()
        ]
        identifiers = [identifier for tables in shown.values() for identifier in tables.values()]
        sites = context.build_data_docs(site_names=[DOCS_SITE], resource_identifiers=[*identifiers, *suite_pages])
        index = _file_path(sites.get(DOCS_SITE))
        pages: dict[str, dict[str, str]] = {}
        for shard_id, tables in shown.items():
            for table, identifier in tables.items():
                for site in context.get_docs_sites_urls(resource_identifier=identifier, site_name=DOCS_SITE):
                    page = _file_path(site.get("site_url"))
                    if page:
                        pages.setdefault(shard_id, {})[table] = page
    return index, pages


def _site_dir(context: FileDataContext) -> Path | None:
    """Return the directory the Data Docs site is written to, when it is on the local filesystem."""
    root = context.root_directory
    return Path(root) / DOCS_SITE_CONFIG["store_backend"]["base_directory"] if root else None


def _file_path(url: str | None) -> str | None:
    """Return the local path of a file:// URL, or None for any other URL."""
    if not url:
        return None
    parsed = urllib.parse.urlparse(url)
    return urllib.request.url2pathname(parsed.path) if parsed.scheme == "file" else None


def _outcome(table: str, result: ExpectationValidationResult, spec: SuiteSpec) -> ExpectationOutcome:
    """Return the outcome of one expectation, read from its own configuration (never from its position)."""
    configuration = result.expectation_config
    kwargs = configuration.kwargs
    columns = columns_of(kwargs)
    condition = _condition_text(kwargs.get("row_condition"))
    info = result.exception_info or {}
    if info.get("raised_exception"):
        message = str(info.get("exception_message") or "unknown error").strip().splitlines()[0][:300]
        return ExpectationOutcome(table, configuration.type, columns, False, message, condition=condition, raised=True)
    details = result.result or {}
    if "unexpected_count" in details and "element_count" in details:
        unexpected, total = int(details["unexpected_count"] or 0), int(details["element_count"] or 0)
        observed = _counted(unexpected, total, condition)
        examples = _examples(details, spec.row_id, columns)
        if unexpected and examples:
            observed += f"; e.g. {examples}"
        return ExpectationOutcome(
            table, configuration.type, columns, bool(result.success), observed, unexpected, total, condition
        )
    observed = f"observed {_short(details.get('observed_value'))}" if "observed_value" in details else ""
    return ExpectationOutcome(table, configuration.type, columns, bool(result.success), observed, condition=condition)


def _counted(unexpected: int, total: int, condition: str | None) -> str:
    """Return how many rows a map expectation found unexpected, e.g. `0 of 8 rows unexpected where role == step`."""
    return f"{unexpected} of {total} rows unexpected" + (f" where {condition}" if condition else "")


def _examples(details: Mapping[str, Any], row_id: str, columns: tuple[str, ...]) -> str:
    """Return up to EXAMPLES unexpected rows as `row_id=… column=…` (check columns left out: they say False)."""
    shown = []
    by_index = details.get("partial_unexpected_index_list") or []
    if by_index and isinstance(by_index[0], dict):
        for row in by_index[:EXAMPLES]:
            parts = [f"{row_id}={_short(row.get(row_id))}"]
            quoted = [c for c in columns if c != row_id and not c.startswith("check_") and c in row]
            parts += [f"{c}={_short(row[c])}" for c in quoted]
            shown.append(" ".join(parts))
    else:
        shown = [_short(v) for v in (details.get("partial_unexpected_list") or [])[:EXAMPLES]]
    return ", ".join(shown)


def _condition_text(condition: Any) -> str | None:
    """Return a row condition as GX prints it (`role == action`), or None."""
    if condition is None or condition == "":
        return None
    from great_expectations.expectations.row_conditions import deserialize_row_condition

    return repr(deserialize_row_condition(condition))


def _short(value: Any, limit: int = 40) -> str:
    """Return a value as a short, JSON-safe string (null for missing values)."""
    if hasattr(value, "item") and not isinstance(value, (list, tuple, dict)):
        value = value.item()  # numpy scalar -> Python
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "null"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- where a shard is validated, and the flow's check of it -------------------------------------------------


def record_validation(store: ObjectStore, run_id: str, shard_id: str,
                      validation: ShardValidation) -> RecordedValidation:
    """Write a landed shard's validation record (quarantining the shard when an expectation failed); return what its
    receipt says of it: the outcome (passed or quarantined), why, the lake's rows, the record's key and whether the
    record holds GX's own results (a shard passed in a batch has none, see validate_shards)."""
    rows = validation.rows(run_id)
    record = {**validation.to_dict(), "passed": validation.success, "rows": rows}
    if validation.success:
        key = write_validation(store, run_id, shard_id, record)
        return RecordedValidation("passed", "", tuple(rows), key, bool(validation.gx_results))
    quarantine_shard(store, run_id, shard_id, record)
    return RecordedValidation("quarantined", validation.summary(), tuple(rows),
                              quarantine_prefix(run_id, shard_id) + VALIDATION, bool(validation.gx_results))


def record_unvalidated(store: ObjectStore, run_id: str, shard_id: str, error: BaseException) -> RecordedValidation:
    """Quarantine a landed shard whose validation could not run (not transiently), with why; return its receipt's
    validation."""
    summary = f"validation could not run: {type(error).__name__}: {error}"
    quarantine_shard(store, run_id, shard_id, {"shard_id": shard_id, "passed": False, "summary": summary, "rows": []})
    return RecordedValidation("quarantined", summary, (), quarantine_prefix(run_id, shard_id) + VALIDATION)


def stored_validation(store: ObjectStore, run_id: str, shard_id: str) -> RecordedValidation | None:
    """Return the receipt's validation of a landed shard validated by an earlier attempt, or None."""
    key = shard_prefix(run_id, shard_id) + VALIDATION
    try:
        record = store.get_json(key)
    except ObjectMissing:
        return None
    return RecordedValidation("passed" if record.get("passed") else "quarantined", record.get("summary", ""),
                              tuple(record.get("rows") or ()), key, bool(record.get("gx_results")))


def shard_contamination(cfg: Config, tables: Mapping[str, pa.Table]) -> list[str]:
    """The gate's own check of the hygiene stage: the shard's instructions flagged again, against the same sets."""
    return flagged_ids(cfg, tables["instructions"].select(["instruction_id", "text", "reference"]).to_pylist())


@task(name="check-shard", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient)
def check_shard_task(config: dict, run_id: str, receipt: ShardReceipt) -> ShardCheck:
    """Check a landed shard before it may be published: its files against its manifest (a corrupt one is quarantined
    and its outcome is `corrupt`: it is grown again) and its validation where it was grown. A shard landed without
    a validation record (an earlier version, or a crash between landing and validating) is validated here.

    Only a transient error (the store unreachable) is retried, and it quarantines nothing.
    """
    cfg = Config.from_dict(config)
    store = ObjectStore(cfg.object_store)
    shard_id, manifest = receipt.shard_id, receipt.manifest
    logger = get_run_logger()
    validated = receipt.validation
    if receipt.state == "quarantined":  # quarantined where it was grown, or by an earlier attempt of this run
        if validated is None:
            stored = store.get_json(manifest["validation_key"])
            validated = RecordedValidation("quarantined", stored["summary"], tuple(stored.get("rows") or ()))
        return ShardCheck(shard_id, "quarantined", validated.summary, receipt, validated.rows,
                          validated.key or manifest.get("validation_key"))
    try:
        tables = read_shard(store, manifest)
    except ShardIntegrityError as error:
        where = quarantine_corrupt(store, run_id, shard_id, error)
        logger.warning("shard %s is corrupt, quarantined at %s: %s", shard_id, where, error)
        return ShardCheck(shard_id, "corrupt", str(error), receipt)
    if validated is None:
        try:
            validated = record_validation(store, run_id, shard_id, validate_shard(
                tables, shard_id=shard_id, contaminated=shard_contamination(cfg, tables)))
        except Exception as error:  # noqa: BLE001 - a validation that cannot run is a fate: quarantined, with why
            if is_transient(error):
                raise
            logger.error("shard %s: validation could not run", shard_id, exc_info=True)
            validated = record_unvalidated(store, run_id, shard_id, error)
    if validated.outcome == "passed":
        return ShardCheck(shard_id, "passed", "", receipt, validated.rows, validated.key)
    logger.warning("shard %s quarantined at %s: %s", shard_id, store.uri(validated.key), validated.summary)
    return ShardCheck(shard_id, "quarantined", validated.summary, receipt, validated.rows, validated.key)


@task(name="data-docs", cache_policy=NO_CACHE)
def data_docs_task(config: dict, checks: Sequence[ShardCheck]) -> str | None:
    """Render the run's Data Docs once, at its end: every quarantined shard's validation and the first passed
    ones (DOCS_PASSED_SHARDS) that were validated alone; return the site's index.html path, or None when no shard
    was validated.

    Every shard's outcomes are rows of the lake's `validations` table; the site shows what a reader opens it for. A
    shard passed in a batch (validate_shards) has no GX result of its own to render: its receipt says so (`gx`),
    and the first shards of a run, landing while validation processes are free, are validated alone.
    """
    cfg = Config.from_dict(config)
    store = ObjectStore(cfg.object_store)
    keys = [c.record for c in checks if c.outcome == "quarantined" and c.record]
    keys += [c.record for c in checks if c.outcome == "passed" and c.record and _rendered_alone(c)][:DOCS_PASSED_SHARDS]
    records = []
    for key in keys:
        try:
            records.append(store.get_json(key))
        except ObjectMissing:
            get_run_logger().warning("no validation record at %s: not in the Data Docs", store.uri(key))
    if not records:
        return None
    try:
        index, _ = build_data_docs(cfg.state_path / "gx", records)
    except Exception:  # noqa: BLE001 - the run is published; its report says there are no Data Docs
        get_run_logger().warning("the run's Data Docs could not be built", exc_info=True)
        return None
    return index


def _rendered_alone(check: ShardCheck) -> bool:
    """Whether a checked shard's validation record holds GX's own results: a receipt without a validation (validated
    by check_shard_task) was validated alone."""
    return check.receipt is None or check.receipt.validation is None or check.receipt.validation.gx
