"""`orchard`: run the nightly flow on the embedded default (or a config file), query the lake, export datasets, see a
run's trees (`view`), and bring up a local Prefect server with workers (`up`, `down`, `status`)."""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

import httpx

from orchard.cluster import down, joined, start_prefect_api, status, status_text, up, wait_prefect
from orchard.config import Config, load_config
from orchard.lake import query
from orchard.services import embedded_services
from orchard.stop import RunStopped, exit_now, stop_on_signals
from schemas.errors import OrchardError
from schemas.fates import exit_code
from tasks.export import check_target, export_dataset, push_dataset


def _prefect_env(cfg: Config) -> None:
    """Point Prefect at the state directory unless the user already chose an API or a home."""
    home = cfg.state_path / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(home))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "true")
    # The ephemeral API needs a little longer than the default 20 s to start on 2 busy cores.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


def _log_to_file(cfg: Config) -> Path:
    """Send every log record, tracebacks included, to `<state>/logs/orchard.log`; leave the console one line per
    record (a failed task's traceback is in the file, not on the screen). Return the log file's path."""
    path = cfg.state_path / "logs" / "orchard.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "orchard_log_file", False)]:
        root.removeHandler(handler)  # an earlier run in this process (tests call main() repeatedly)
        handler.close()
    handler = _LogFile(path, encoding="utf-8")
    handler.orchard_log_file = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"))
    root.addHandler(handler)
    for console in root.handlers:
        if console is not handler and not isinstance(console.formatter, _WithoutTraceback):
            console.setFormatter(_WithoutTraceback(console.formatter))
    return path


class _LogFile(logging.FileHandler):
    """The run's log file. When it cannot be written (a full disk), it says so once on the console and stops trying:
    logging's own report of a failed write is a traceback printed through `print`, which Prefect turns back into a
    log record, and so on without end."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        if self.failed:
            return
        self.failed = True
        error = sys.exc_info()[1]
        os.write(2, f"orchard: warning: cannot write the log file {self.baseFilename} ({error}); the console keeps "
                    f"logging\n".encode())


class _WithoutTraceback:
    """A console formatter that leaves tracebacks out of what another formatter writes."""

    def __init__(self, inner: object) -> None:
        self.inner = inner or logging.Formatter()

    def format(self, record: object) -> str:
        brief = copy.copy(record)
        brief.exc_info, brief.exc_text, brief.stack_info = None, None, None  # type: ignore[attr-defined]
        return self.inner.format(brief)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def warn_of_literal_secrets(cfg: Config) -> None:
    """A secret held as a value is still accepted (files written before references), but said out loud."""
    for key in cfg.literal_secrets():
        print(f"orchard: warning: {key} holds the secret itself, which travels with the config into flow parameters "
              f"and the Prefect UI: write env:NAME or prefect-secret:BLOCK instead", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    cfg, api = joined(load_config(args.config))
    warn_of_literal_secrets(cfg)
    _prefect_env(cfg)
    from flows.nightly import default_run_id  # imports Prefect: after its environment

    run_id = args.run_id or default_run_id()
    with stop_on_signals():
        try:
            code = _run(cfg, api, args.run_id)
        except httpx.HTTPError as exc:  # only Prefect's client speaks httpx in a run: its API went away or broke
            # On a line of its own: Prefect's client leaves its last complaint ("All connection attempts failed")
            # without a line end.
            print(f"\norchard: run {run_id} failed: the Prefect API stopped answering ({type(exc).__name__}: "
                  f"{str(exc).splitlines()[0][:200]}); nothing half-landed was published; `orchard run --run-id "
                  f"{run_id}` resumes it (details: {cfg.state_path / 'logs' / 'orchard.log'})", file=sys.stderr)
            code = exit_code("failed")
        except RunStopped as stopped:
            print(f"orchard: run {run_id} stopped by {stopped.name}: growth cancelled, the servers it started stopped; "
                  f"nothing half-landed was published (a shard lands whole or not at all, the lake takes one snapshot "
                  f"or none); `orchard run --run-id {run_id}` resumes it", file=sys.stderr)
            exit_now(stopped.code)  # the run's threads may still wait on what was stopped: they are not waited for
    full = disk_full(cfg.state_path) if code else None
    if full:  # what failed first (the Prefect API's database, a log, the catalog) hid the cause: say it last, once
        print(f"orchard: run {run_id}: {full}; free space there, then `orchard run --run-id {run_id}` resumes it",
              file=sys.stderr)
    return code


DISK_FULL_BYTES = 1 << 20  # under this much free space the state's disk takes no SQLite page, log line or catalog


def disk_full(path: Path) -> str | None:
    """Say that the disk holding `path` is full (under DISK_FULL_BYTES free to this user); None when it is not."""
    try:
        disk = os.statvfs(path)
    except OSError:
        return None
    free = disk.f_bavail * disk.f_frsize
    return f"the disk under {path} is full ({free // 1024} KiB free)" if free < DISK_FULL_BYTES else None


def _run(cfg: Config, api: str | None, run_id: str | None) -> int:
    with contextlib.ExitStack() as running:
        # The Prefect API: $PREFECT_API_URL, else the one `orchard up` runs here, else one started for this run (as
        # Orchard starts its other servers: it dies with the run, however the run dies).
        api = os.environ.get("PREFECT_API_URL") or api
        server = None
        if api is None:  # started first, answering last: its seconds of start overlap the imports and servers below
            server = start_prefect_api(cfg.state_path, wait=False)
            running.callback(server.stop)
            running.callback(_drain_to_api)  # before it stops: what the run logged and emitted reaches it
            api = f"{server.url}/api"
        if cfg.orchestration.grow == "inline":
            from tasks.verify import warm_workers

            warm_workers()  # the verification workers' fork server imports its checkers meanwhile
        from prefect.settings import PREFECT_API_URL, temporary_settings  # imports Prefect: after its environment

        running.enter_context(temporary_settings(updates={PREFECT_API_URL: api}))
        from flows.nightly import RunFailed, nightly

        log_file = _log_to_file(cfg)
        # The config travels as the flow's parameter: its secrets are references.
        live = running.enter_context(embedded_services(cfg))
        if server is not None:
            wait_prefect(server)
        state = nightly(config=live.to_dict(), run_id=run_id, return_state=True)
    summary = state.result(raise_on_failure=False)
    if isinstance(summary, RunFailed):  # the run ended without publishing a shard: its report said why
        return exit_code(summary.summary.get("status", "failed"))
    if isinstance(summary, OrchardError):  # the flow itself failed: nothing was published
        print(f"orchard: run failed, nothing published: {summary} (details: {log_file})", file=sys.stderr)
        return exit_code("failed")
    if isinstance(summary, BaseException):  # a defect, not a failed run: its traceback helps
        raise summary
    return exit_code(summary["status"])


def _drain_to_api(timeout_s: float = 5.0) -> None:
    """Send the logs and events Prefect still holds to the API (its workers would at interpreter exit, after the API
    this run started is gone)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout_s)


def cmd_sql(args: argparse.Namespace) -> int:
    cfg, _ = joined(load_config(args.config))
    with embedded_services(cfg, model=False) as live:
        columns, rows = query(live, args.query, version=args.version)
    print(_format_table(columns, rows))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    cfg, _ = joined(load_config(args.config))
    check_target(args.dir.resolve(), args.force)  # before starting the store: a refusal costs nothing
    with embedded_services(cfg, model=False) as live:
        summary = export_dataset(live, args.format, args.dir, version=args.version, test_share=args.test_share,
                                 force=args.force, step_token=args.step_token)
    rows, trees = summary["rows"], summary["trees"]
    print(f"exported {summary['format']} from lake snapshot {summary['snapshot_id']} to {summary['out_dir']}")
    print("  " + ", ".join(f"{split}: {n} rows ({trees[split]} trees)" for split, n in rows.items()))
    if args.push:
        print(f"pushed to {push_dataset(summary['out_dir'], args.push)}")
    return 0


def cmd_view(args: argparse.Namespace) -> int:
    from tasks.view import view_run  # imports Prefect (its task): only for this command, after nothing else needs it

    cfg, _ = joined(load_config(args.config))
    with embedded_services(cfg, model=False) as live:
        view = view_run(live, args.out_dir, run_id=args.run, version=args.version)
    print(f"view of run {view.run_id} (lake snapshot {view.snapshot_id}, {view.trees} trees) in {view.seconds:.1f} s: "
          f"{view.index}")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    changes = {k: v for k, v in (("gpu_workers", args.workers), ("api_port", args.port)) if v is not None}
    if changes:
        cfg = cfg.replace(orchestration=dataclasses.replace(cfg.orchestration, **changes))
    try:
        with stop_on_signals():  # a stop mid-start stops what was started (up's own undo)
            record = up(cfg, args.config)
    except RunStopped:
        down(cfg, say=lambda line: None)  # a stop that arrived as `up` finished: undo what it recorded
        raise
    print(f"Prefect UI: {record['ui_url']}")
    print(f"Run views:  {record['views_url']}   (each run's trees, pairs and verdicts)")
    print(f"  a run now:  PREFECT_API_URL={record['api_url']} .venv/bin/prefect deployment run nightly/nightly --watch")
    print("  or:         .venv/bin/orchard run   (in-process, shown in the UI)")
    print("  stop it:    .venv/bin/orchard down")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    try:
        with stop_on_signals():
            down(cfg)
    except RunStopped:  # asked to stop while it stops the cluster: the rest is stopped now, without its grace period
        down(cfg)
        raise
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    report = status(load_config(args.config))
    print(status_text(report))
    return 0 if report["up"] else 1


def cmd_seeds(args: argparse.Namespace) -> int:
    from tasks.seeds import seed_report  # reads `datasets` and the eval sets: only for this command

    report = seed_report(load_config(args.config))
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else seeds_text(report, args.show))
    return 0


def seeds_text(report: dict, show: int = 10) -> str:
    """`orchard seeds`'s printout: per source, the gate, its contamination hits and near-duplicate clusters (the first
    `show` of each), the planned shards."""
    def quoted(text: str, width: int = 70) -> str:
        text = " ".join(text.split())
        return repr(text if len(text) <= width else text[: width - 1] + "…")

    def where(seed: dict) -> str:
        return f"{seed['source']} row {seed['row']}"

    out = []
    for source in report["sources"]:
        dropped = sum(source["dropped"].values())
        out.append(f"{source['source']}: read {source['read']}, kept {source['kept']}, dropped {dropped}")
        out += [f"    {n:>6}  {reason}" for reason, n in source["dropped"].items()]
    gate = [row for row in report["drops"] if row["stage"] != "seeds"]
    out.append(f"hygiene gate: {report['read']} instructions in, {report['kept']} kept")
    out += [f"    {row['count']:>6}  {row['stage']}: {row['reason']}" for row in gate]
    sets = ", ".join(f"{s['name']} ({s['items']} items)" for s in report["eval_sets"]) or "none"
    hits = report["contamination"]
    out.append(f"contamination: {len({h['instruction_id'] for h in hits})} instructions flagged against {sets}")
    for hit in hits[:show]:
        out.append(f"    {where(hit)} {quoted(hit['text'], 50)} ~ {hit['eval_set']} {hit['eval_item_id']} "
                   f"(coverage {hit['coverage']:.2f})")
    clusters = report["near_duplicate_clusters"]
    out.append(f"duplicate clusters: {len(clusters)} ({sum(len(c['duplicates']) for c in clusters)} dropped)")
    for cluster in clusters[:show]:
        out.append(f"    kept {where(cluster['kept'])} {quoted(cluster['kept']['text'])}")
        out += [f"      dropped {where(d)} {quoted(d['text'], 50)}: {d['reason']}" for d in cluster["duplicates"][:show]]
    if len(hits) > show or len(clusters) > show:
        out.append(f"    (the first {show} of each; --show N for more, --json for all)")
    shards = report["shards"]
    out.append(f"planned: {report['kept']} instructions in {shards['count']} shards of up to "
               f"{shards['instructions_per_shard']}")
    out.append(f"earlier runs: {report['earlier_runs']}")
    return "\n".join(out)


def _format_table(columns: Sequence[str], rows: Sequence[Sequence[object]], width: int = 60) -> str:
    def cell(value: object) -> str:
        text = "NULL" if value is None else str(value).replace("\n", "\\n")
        return text if len(text) <= width else text[: width - 1] + "…"

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = lambda values: " | ".join(v.ljust(w) for v, w in zip(values, widths))  # noqa: E731
    out = [line(columns), "-+-".join("-" * w for w in widths), *map(line, cells)]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orchard", description=__doc__)
    parser.add_argument("--config", type=Path, default=os.environ.get("ORCHARD_CONFIG"),
                        help="TOML config file (default: $ORCHARD_CONFIG, else the embedded preset)")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the nightly flow once")
    run.add_argument("--run-id", help="run id (default: nightly-<UTC date>; the same id resumes that run)")
    run.set_defaults(func=cmd_run)
    sql = sub.add_parser("sql", help="query the lake with SQL")
    sql.add_argument("query")
    sql.add_argument("--version", type=int, help="answer as of this lake snapshot")
    sql.set_defaults(func=cmd_sql)
    export = sub.add_parser("export", help="write a lake snapshot as a Hugging Face dataset directory")
    export.add_argument("dir", type=Path, metavar="DIR",
                        help="the dataset directory to write (datasets.load_dataset(DIR) reads it)")
    export.add_argument("--format", required=True, choices=("trl-dpo", "trl-kto", "sft", "ranked", "trl-rm",
                                                              "openrlhf-rm", "trl-stepwise", "openrlhf-prm"))
    export.add_argument("--step-token", default="ки",
                        help="openrlhf-prm: the placeholder after each step (default: ки, as Math-Shepherd)")
    export.add_argument("--version", type=int, help="export this lake snapshot (default: the newest)")
    export.add_argument("--test-share", type=float, default=0.1,
                        help="share of trees in the test split, chosen by a hash of the tree id (default: 0.1)")
    export.add_argument("--force", action="store_true", help="replace DIR if it exists and is not empty")
    export.add_argument("--push", metavar="REPO", help="upload the directory to this Hugging Face dataset repo")
    export.set_defaults(func=cmd_export)
    view = sub.add_parser("view", help="write a static site of a run's trees, pairs and verdicts")
    view.add_argument("out_dir", type=Path, nargs="?", metavar="OUT_DIR",
                      help="the folder to write (default: <state>/views/<run id>, which `orchard up` serves)")
    view.add_argument("--run", help="the run to show (default: the latest run in the snapshot)")
    view.add_argument("--version", type=int, help="read this lake snapshot (default: the newest)")
    view.set_defaults(func=cmd_view)
    start = sub.add_parser("up", help="start the Prefect server and UI, the store, work pools, deployments and workers")
    start.add_argument("--workers", type=int, help="process workers on the GPU pool (default: orchestration.gpu_workers)")
    start.add_argument("--port", type=int, help="the Prefect API and UI port (default: orchestration.api_port)")
    start.set_defaults(func=cmd_up)
    seeds = sub.add_parser("seeds", help="read and screen the configured seeds without growing anything")
    seeds.add_argument("--json", action="store_true", help="print the whole report as JSON")
    seeds.add_argument("--show", type=int, default=10, help="contamination hits and clusters printed (default: 10)")
    seeds.set_defaults(func=cmd_seeds)
    sub.add_parser("down", help="stop what `orchard up` started").set_defaults(func=cmd_down)
    sub.add_parser("status", help="say what `orchard up` started and what runs").set_defaults(func=cmd_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt as exc:  # Ctrl-C, or RunStopped: SIGTERM or SIGINT
        print(f"orchard: {'stopped by ' + exc.name if isinstance(exc, RunStopped) else 'interrupted'}", file=sys.stderr)
        return exc.code if isinstance(exc, RunStopped) else 130
    except Exception as exc:  # one clear line for the user; the traceback is in the logs
        if isinstance(exc, OrchardError):
            print(f"orchard: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
