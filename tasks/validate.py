"""Validate a shard's tables with Great Expectations: a suite per table, outcomes keyed by expectation, HTML Data Docs.

The suites live in schemas/suites/*.json (see schemas/suites.py). Great Expectations keeps its own copy of them in a
file context at `gx_dir`, together with one pandas datasource, one ValidationDefinition per table, every validation
result and the Data Docs site. GX is imported inside functions: it takes seconds to import, and other modules import
this one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import math
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import pandas as pd
import pyarrow as pa
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from orchard.config import Config
from orchard.errors import OrchardError, is_transient, retry_transient
from orchard.store import ObjectStore
from schemas.rows import SHARD_TABLES
from schemas.suites import SUITES_DIR, SuiteError, SuiteSpec, columns_of, load_suites, with_checks
from tasks.fates import ShardCheck
from tasks.hygiene import flagged_ids
from tasks.land import ShardIntegrityError, quarantine_corrupt, quarantine_shard, read_shard

if TYPE_CHECKING:
    from great_expectations.core import ExpectationSuiteValidationResult
    from great_expectations.core.expectation_validation_result import ExpectationValidationResult
    from great_expectations.data_context import FileDataContext

DATASOURCE = "orchard_shards"
BATCH_DEFINITION = "whole_table"
# Suite parameter the suites use for "rows name the shard being validated" ({"$PARAMETER": "this_shard"}).
THIS_SHARD = "this_shard"
# Suite parameter: the ids of the shard's instructions that the run's eval sets flag (tasks/hygiene.py: flagged_ids).
CONTAMINATED = "contaminated"
EXAMPLES = 3  # unexpected rows quoted per failed expectation
LOCK_FILE = "orchard-validate.lock"
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
    data_docs_index: str | None
    data_docs_pages: dict[str, str] = field(default_factory=dict)  # table -> this shard's validation page
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
            "data_docs_index": self.data_docs_index,
            "data_docs_pages": dict(self.data_docs_pages),
            "results": [r.to_dict() for r in self.results],
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
    gx_dir: Path,
    suites_dir: Path = SUITES_DIR,
    data_docs: bool = True,
    contaminated: Sequence[str] = (),
) -> ShardValidation:
    """Return how a shard's tables fare against the suites, recorded with Data Docs in the GX project at `gx_dir`.

    The GX project is created on first use and reused after, from this process or another; a lock file keeps
    concurrent validations from writing its stores at once. `data_docs=False` skips rendering, about half of the
    ~0.8 s a small shard takes.
    """
    started = time.perf_counter()
    if not shard_id:
        raise ShardValidationError("shard_id is empty")
    suites = load_suites(suites_dir)
    frames = _frames(tables, shard_id=shard_id, suites=suites)
    checked = {table: with_checks(suite, frames) for table, suite in suites.items()}

    gx_dir = Path(gx_dir)
    with _project_lock(gx_dir):
        context = _open_context(gx_dir)
        definitions, changed_suites = _sync(context, suites)
        from great_expectations.core.run_identifier import RunIdentifier

        # Not one Checkpoint: in GX 1.24 a Checkpoint hands the same batch_parameters to all its validation
        # definitions and a dataframe asset takes exactly {"dataframe": df}, so one run cannot carry several tables;
        # each suite also wants its own row id in result_format. So: one run per table under one run id, then one
        # Data Docs build for all their results (what UpdateDataDocsAction would do per definition).
        # The run name carries the shard id, so Data Docs list validations by shard.
        run_id = RunIdentifier(run_name=shard_id, run_time=dt.datetime.now(dt.timezone.utc))
        suite_results: dict[str, ExpectationSuiteValidationResult] = {}
        for table, suite in suites.items():
            suite_results[table] = definitions[table].run(
                batch_parameters={"dataframe": checked[table]},
                expectation_parameters={THIS_SHARD: [shard_id], CONTAMINATED: list(contaminated)},
                result_format={
                    "result_format": "SUMMARY",
                    "partial_unexpected_count": EXAMPLES,
                    "unexpected_index_column_names": [suite.row_id],
                },
                run_id=run_id,
            )
        index, pages = _build_data_docs(context, suite_results, run_id, changed_suites) if data_docs else (None, {})

    # GX returns results in its own order; each carries its suite-file position in meta.
    keyed = [
        ((order, result.expectation_config.meta.get("position", 0)), _outcome(table, result, suites[table]))
        for order, (table, suite_result) in enumerate(suite_results.items())
        for result in suite_result.results
    ]
    outcomes = [outcome for _, outcome in sorted(keyed, key=lambda k: k[0])]
    return ShardValidation(
        shard_id=shard_id,
        success=all(o.success for o in outcomes),
        results=outcomes,
        data_docs_index=index,
        data_docs_pages=pages,
        seconds=time.perf_counter() - started,
    )


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


def _sync(context: FileDataContext, suites: Mapping[str, SuiteSpec]) -> tuple[dict[str, Any], set[str]]:
    """Return a ValidationDefinition per table and the suites rewritten, adding or updating GX objects as needed."""
    import great_expectations as gx

    try:
        datasource = context.data_sources.get(DATASOURCE)
    except KeyError:
        datasource = context.data_sources.add_pandas(DATASOURCE)
    definitions, changed = {}, set()
    for table, spec in suites.items():
        asset_names = {asset.name for asset in datasource.assets}
        asset = datasource.get_asset(table) if table in asset_names else datasource.add_dataframe_asset(table)
        batch_names = {b.name for b in asset.batch_definitions}
        batch = (
            asset.get_batch_definition(BATCH_DEFINITION)
            if BATCH_DEFINITION in batch_names
            else asset.add_batch_definition_whole_dataframe(BATCH_DEFINITION)
        )
        suite, rewritten = _stored_suite(context, spec)
        if rewritten:
            changed.add(table)
        try:
            definition = context.validation_definitions.get(table)
            fresh = definition.data.id == batch.id and definition.suite.id == suite.id and definition.is_fresh().success
        except gx.exceptions.DataContextError:
            fresh = False
        if not fresh:
            definition = context.validation_definitions.add_or_update(
                gx.ValidationDefinition(name=table, data=batch, suite=suite)
            )
        definitions[table] = definition
    return definitions, changed


def _stored_suite(context: FileDataContext, spec: SuiteSpec) -> tuple[Any, bool]:
    """Return the GX suite for `spec` and whether it was (re)written: only when the suite file says something else."""
    import great_expectations as gx
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    wanted = gx.ExpectationSuite(name=spec.table, meta={"source": str(spec.path), "description": spec.description})
    for position, expectation in enumerate(spec.expectations):
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
        stored = context.suites.get(spec.table)
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


def _build_data_docs(
    context: FileDataContext,
    suite_results: Mapping[str, ExpectationSuiteValidationResult],
    run_id: Any,
    changed_suites: set[str],
) -> tuple[str | None, dict[str, str]]:
    """Render this shard's validation pages and the site index; return the index.html path and the page per table."""
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )

    site_dir = _site_dir(context)
    validations = {
        table: ValidationResultIdentifier(
            expectation_suite_identifier=ExpectationSuiteIdentifier(name=table),
            run_id=run_id,
            batch_identifier=result.batch_id,
        )
        for table, result in suite_results.items()
    }
    # A suite page only changes with its suite: render it when rewritten or missing, not for every shard.
    suite_pages = [
        ExpectationSuiteIdentifier(name=table)
        for table in suite_results
        if table in changed_suites or site_dir is None or not (site_dir / "expectations" / f"{table}.html").exists()
    ]
    sites = context.build_data_docs(site_names=[DOCS_SITE], resource_identifiers=[*validations.values(), *suite_pages])
    index = _file_path(sites.get(DOCS_SITE))
    pages = {}
    for table, identifier in validations.items():
        for site in context.get_docs_sites_urls(resource_identifier=identifier, site_name=DOCS_SITE):
            page = _file_path(site.get("site_url"))
            if page:
                pages[table] = page
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
        observed = f"{unexpected} of {total} rows unexpected" + (f" where {condition}" if condition else "")
        examples = _examples(details, spec.row_id, columns)
        if unexpected and examples:
            observed += f"; e.g. {examples}"
        return ExpectationOutcome(
            table, configuration.type, columns, bool(result.success), observed, unexpected, total, condition
        )
    observed = f"observed {_short(details.get('observed_value'))}" if "observed_value" in details else ""
    return ExpectationOutcome(table, configuration.type, columns, bool(result.success), observed, condition=condition)


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


# --- Prefect task: one per shard --------------------------------------------------------------


@task(name="validate-shard", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient)
def validate_shard_task(config: dict, run_id: str, receipt: dict) -> ShardCheck:
    """Validate a landed shard: quarantine it if it is corrupt (outcome `corrupt`: it is grown again) or an
    expectation fails, or if its validation cannot run (`quarantined`, with the reason); return the outcome.

    Only a transient error (the store unreachable) is retried, and it quarantines nothing.
    """
    cfg = Config.from_dict(config)
    store = ObjectStore(cfg.object_store)
    shard_id, manifest = receipt["shard_id"], receipt["manifest"]
    logger = get_run_logger()
    if receipt["state"] == "quarantined":  # quarantined by an earlier attempt of this run: report it again
        stored = store.get_json(manifest["validation_key"])
        return ShardCheck(shard_id, "quarantined", stored["summary"], receipt, tuple(stored.get("rows") or ()),
                          stored.get("data_docs_index"))
    try:
        tables = read_shard(store, manifest)
    except ShardIntegrityError as error:
        where = quarantine_corrupt(store, run_id, shard_id, error)
        logger.warning("shard %s is corrupt, quarantined at %s: %s", shard_id, where, error)
        return ShardCheck(shard_id, "corrupt", str(error), receipt)
    try:
        # The gate's own check of the hygiene stage: the shard's instructions flagged again, against the same sets.
        contaminated = flagged_ids(cfg, tables["instructions"].select(["instruction_id", "text", "reference"]).to_pylist())
        validation = validate_shard(tables, shard_id=shard_id, gx_dir=cfg.state_path / "gx", contaminated=contaminated)
    except Exception as error:  # noqa: BLE001 - a validation that cannot run is a fate: quarantined, with why
        if is_transient(error):
            raise
        summary = f"validation could not run: {type(error).__name__}: {error}"
        logger.error("shard %s: %s", shard_id, summary, exc_info=True)
        where = quarantine_shard(store, run_id, shard_id, {"shard_id": shard_id, "passed": False, "summary": summary,
                                                            "rows": []})
        logger.warning("shard %s quarantined at %s", shard_id, where)
        return ShardCheck(shard_id, "quarantined", summary, receipt)
    rows = tuple(validation.rows(run_id))
    if validation.success:
        return ShardCheck(shard_id, "passed", "", receipt, rows, validation.data_docs_index)
    outcome = {"shard_id": shard_id, "passed": False, "summary": validation.summary(), "rows": list(rows),
               "data_docs": validation.data_docs_index}
    where = quarantine_shard(store, run_id, shard_id, {**validation.to_dict(), **outcome})
    logger.warning("shard %s quarantined at %s: %s", shard_id, where, outcome["summary"])
    return ShardCheck(shard_id, "quarantined", validation.summary(), receipt, rows, validation.data_docs_index)
