"""Export a lake snapshot as a Hugging Face dataset directory: Parquet splits by tree and a dataset card.

`export_dataset` reads one format's rows at one lake snapshot as Arrow, puts each tree wholly in
`train` or `test` (a stable hash of its tree id decides), and writes `data/<split>-00000-of-00001.parquet`
and a `README.md` whose YAML front matter maps the splits, so `datasets.load_dataset(DIR)` loads it.
The directory is written beside its target and renamed into place, so a reader never sees half of it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from orchard import lake
from orchard.config import Config
from schemas.errors import OrchardError

SPLITS = ("train", "test")
# Columns the card breaks row counts down by, where a format has them.
BREAKDOWNS = ("source", "method", "domain", "role", "label")


class ExportError(OrchardError):
    """A dataset cannot be exported or pushed; the message names the view, snapshot, directory or repo."""


@dataclass(frozen=True)
class ExportFormat:
    """What one `--format` reads from the lake and how its card describes it."""

    name: str
    views: tuple[str, ...]  # the lake views its rows come from (named in errors and on the card)
    sql: str  # one query over those views; every row has a tree_id ({step_token}: the export's step token, quoted)
    description: str  # the card's "Format" paragraph
    # The trainer (and versions) a real run's export of this format was trained with in the test suite
    # (tests/test_real_run.py, `make train-check`); the card says so.
    checked_with: str = ""


# What the suite proved for a format TRL trains (tests/test_real_run.py asserts that the card says it).
TRAINED = ("TRL 1.16.0 `{trainer}` (transformers 5.19.0, torch 2.13.0+cpu): two optimizer steps on the export of a "
           "real run, every row read, in Orchard's test suite (tests/test_real_run.py)")

# Every published preference: the verifier-ranked pairs and the stable principle-grounded pairs. A principle pair's
# margin is the jury's: (votes for the response - votes for the antithesis) / judges.
PREFERENCES = """
    SELECT prompt, chosen, rejected, pair_id AS id, tree_id, run_id, 'pairs' AS source, method, domain, model, margin
    FROM dpo_pairs
    UNION ALL
    SELECT prompt, chosen, rejected, example_id AS id, tree_id, run_id, 'principle_pairs' AS source, NULL AS method,
           domain, model, (votes_response - votes_antithesis) / judges AS margin
    FROM principle_pairs
"""
# The labelled steps of prm_steps: each path cut before its first step without a label (too little evidence);
# a path with no labelled first step is left out. `prompt` is the user's request as text.
LABELLED_STEPS = """
    SELECT *, list_filter(prompt, m -> m.role = 'user')[-1].content AS prompt_text,
           coalesce(list_position(list_transform(hard_labels, x -> x IS NULL), true) - 1, len(hard_labels)) AS labelled
    FROM prm_steps
"""

FORMATS: dict[str, ExportFormat] = {
    f.name: f
    for f in (
        ExportFormat(
            name="trl-dpo",
            views=("dpo_pairs", "principle_pairs"),
            sql=f"SELECT * EXCLUDE (margin) FROM ({PREFERENCES}) ORDER BY tree_id, id",
            description=(
                "TRL's conversational preference format (`DPOTrainer` and other paired-preference trainers): "
                "`prompt`, `chosen` and `rejected` are message lists, so the trainer applies the chat template. "
                "Rows are the verifier-ranked pairs of `dpo_pairs` (`source = 'pairs'`; `method` rs, mcts or "
                "error_injection) and the stable principle-grounded pairs of `principle_pairs` "
                "(`source = 'principle_pairs'`, the principle as the system message, `method` null). `id` is the "
                "pair_id or the example_id."
            ),
            checked_with=TRAINED.format(trainer="DPOTrainer"),
        ),
        ExportFormat(
            name="trl-kto",
            views=("kto_rows",),
            sql="SELECT * FROM kto_rows ORDER BY tree_id, node_id",
            description=(
                "TRL's conversational unpaired preference format (`KTOTrainer`): `prompt` is the message list the "
                "model was sent, `completion` its answer as one assistant message, `label` true when the verifier "
                "found the answer correct. One row per verified answer: actions, refinements, injected hard "
                "negatives and finished MCTS answers (last steps and rollouts)."
            ),
            checked_with=TRAINED.format(trainer="KTOTrainer"),
        ),
        ExportFormat(
            name="sft",
            views=("sft_examples",),
            sql="SELECT * FROM sft_examples ORDER BY tree_id, node_id",
            description=(
                "TRL's conversational language-modeling format (`SFTTrainer`): `messages` is a trajectory that "
                "ends in a correct answer, its earlier turns, feedback and critique included."
            ),
            checked_with=TRAINED.format(trainer="SFTTrainer"),
        ),
        ExportFormat(
            name="ranked",
            views=("ranked_lists",),
            # The model of a list's best member: siblings of one prompt come from one request, so one model.
            sql="""
                SELECT r.*, n.model
                FROM ranked_lists r LEFT JOIN nodes n ON n.run_id = r.run_id AND n.node_id = r.node_ids[1]
                ORDER BY r.tree_id, r.node_ids[1]
            """,
            description=(
                "Listwise ranking: the scored answers to one prompt under one parent, best first. "
                "`completions[k]` is an assistant message list with score `scores[k]` and node id `node_ids[k]`."
            ),
        ),
        ExportFormat(
            name="trl-rm",
            views=("dpo_pairs", "principle_pairs"),
            sql=f"""
                SELECT list_concat(prompt, chosen) AS chosen, list_concat(prompt, rejected) AS rejected,
                       id, tree_id, run_id, source, method, domain, model, margin
                FROM ({PREFERENCES}) ORDER BY tree_id, id
            """,
            description=(
                "TRL's implicit-prompt conversational preference format (`RewardTrainer`): `chosen` and `rejected` "
                "are whole conversations (the prompt's messages, then the answer), so the trainer scores each "
                "conversation as a whole. The same rows as `trl-dpo`, with `margin` (the verifier's score "
                "difference, or the jury's vote margin for a principle pair)."
            ),
            checked_with=TRAINED.format(trainer="RewardTrainer"),
        ),
        ExportFormat(
            name="openrlhf-rm",
            views=("dpo_pairs", "principle_pairs"),
            sql=f"""
                SELECT list_concat(prompt, chosen) AS chosen, list_concat(prompt, rejected) AS rejected, margin,
                       id, tree_id, run_id, source, method, domain, model
                FROM ({PREFERENCES}) ORDER BY tree_id, id
            """,
            description=(
                "OpenRLHF's reward-model dataset (`openrlhf.cli.train_rm` with `--chosen_key chosen --rejected_key "
                "rejected --apply_chat_template`, and `--margin_loss` to use `margin`): `chosen` and `rejected` are "
                "whole conversations as message lists, `margin` the verifier's score difference or the jury's vote "
                "margin."
            ),
            checked_with=("the layout of OpenRLHF's reward-model datasets; not trained in Orchard's suite (OpenRLHF needs "
                          "DeepSpeed and a GPU); the same rows as trl-rm, which RewardTrainer reads"),
        ),
        ExportFormat(
            name="trl-stepwise",
            views=("prm_steps",),
            sql=f"""
                SELECT prompt_text AS prompt, steps[:labelled] AS completions, hard_labels[:labelled] AS labels,
                       soft_labels[:labelled] AS soft_labels, path_id AS id, kind AS source, tree_id, run_id,
                       domain, model
                FROM ({LABELLED_STEPS}) WHERE labelled > 0 ORDER BY tree_id, id
            """,
            description=(
                "TRL's stepwise-supervision format (process reward models): `prompt` is the request, `completions` "
                "the answer's steps in order and `labels` one boolean per step. Rows are the paths of `prm_steps`: "
                "each MCTS path (`source = 'mcts'`; a step is labelled true when some verified completion below it "
                "is correct, as in Math-Shepherd; `soft_labels` hold the share that is, as in OmegaPRM) and each "
                "multi-turn trajectory (`source = 'turns'`; a turn's answer labelled by its own verdict). A path "
                "is cut before its first step with too little evidence (`run.prm_min_rollouts`), whose label is "
                "null in the lake; paths without a labelled first step are left out."
            ),
            checked_with=("TRL 1.16.0's stepwise-supervision columns; TRL 1.16.0 has no process reward trainer, so the suite "
                          "(tests/test_real_run.py) checks the labels token by token with transformers 5.19.0 and the "
                          "SmolLM2 tokenizer: each label lands on the last token of its step"),
        ),
        ExportFormat(
            name="openrlhf-prm",
            views=("prm_steps",),
            sql=f"""
                SELECT prompt_text || '\n' || array_to_string(list_transform(steps[:labelled],
                           s -> trim(s) || ' ' || {{step_token}}), '\n') AS input,
                       list_transform(hard_labels[:labelled], x -> CASE WHEN x THEN '+' ELSE '-' END) AS value,
                       path_id AS id, kind AS source, tree_id, run_id, domain, model
                FROM ({LABELLED_STEPS}) WHERE labelled > 0 ORDER BY tree_id, id
            """,
            description=(
                "OpenRLHF's process-reward dataset (`openrlhf.cli.train_prm` with `--input_key input --label_key "
                "value --placeholder_token <step token> --reward_tokens + -`, the layout of Math-Shepherd): "
                "`input` is the request and the steps, each step followed by the step placeholder token, and "
                "`value` one `+` (correct below) or `-` per placeholder. Rows and labels as in `trl-stepwise`."
            ),
            checked_with=("the layout of OpenRLHF's process reward datasets (Math-Shepherd's); not trained in Orchard's "
                          "suite (OpenRLHF needs DeepSpeed and a GPU); its labels are those of trl-stepwise"),
        ),
    )
}

DEFAULT_STEP_TOKEN = "ки"  # OpenRLHF's and Math-Shepherd's step placeholder


def in_test_split(tree_id: str, test_share: float) -> bool:
    """Return whether tree `tree_id` goes to the test split: its sha256's first 8 bytes over 2^64 are < test_share."""
    digest = hashlib.sha256(tree_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < test_share


def split_by_tree(rows: pa.Table, test_share: float) -> dict[str, pa.Table]:
    """Return `rows` split into train and test so that all rows of one tree land in the same split."""
    tree_ids = rows.column("tree_id")
    if tree_ids.null_count:
        raise ExportError(f"{tree_ids.null_count} rows have no tree_id, so they cannot be split by tree")
    test_trees = [t for t in pc.unique(tree_ids).to_pylist() if in_test_split(t, test_share)]
    in_test = pc.is_in(tree_ids, value_set=pa.array(test_trees, type=tree_ids.type))
    return {"train": rows.filter(pc.invert(in_test)), "test": rows.filter(in_test)}


def check_target(out_dir: Path, force: bool = False) -> None:
    """Fail unless `out_dir` is absent, an empty directory, or a directory `force` allows to replace."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ExportError(f"{out_dir} exists and is not empty (pass --force to replace it)")


def export_dataset(
    config: Config,
    fmt: str,
    out_dir: str | Path,
    *,
    version: int | None = None,
    test_share: float = 0.1,
    force: bool = False,
    step_token: str = DEFAULT_STEP_TOKEN,
) -> dict[str, Any]:
    """Write format `fmt` of lake snapshot `version` (default: the newest) as a dataset directory; return its summary.

    The summary holds the directory, the snapshot id and time, the catalog, rows and trees per split,
    and the run ids and models of the rows.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; expected one of {sorted(FORMATS)}")
    if not 0.0 <= test_share <= 1.0:
        raise ExportError(f"--test-share must be between 0 and 1, got {test_share}")
    export = FORMATS[fmt]
    out_dir = Path(out_dir).resolve()
    check_target(out_dir, force)

    if not step_token.strip():
        raise ExportError("--step-token must not be blank")
    rows, snapshot = read_rows(config, export, version, step_token)
    splits = split_by_tree(rows, test_share)
    summary = {
        "format": fmt,
        "out_dir": str(out_dir),
        "snapshot_id": snapshot["snapshot_id"],
        "snapshot_time": _timestamp(snapshot["snapshot_time"]),
        "catalog": _public_catalog(config.lake_catalog),
        "data_path": config.lake_data_path,
        "test_share": test_share,
        "rows": {name: split.num_rows for name, split in splits.items()},
        "trees": {name: len(pc.unique(split.column("tree_id"))) for name, split in splits.items()},
        "run_ids": _distinct(rows, "run_id"),
        "models": _distinct(rows, "model"),
    }
    write_dataset(splits, dataset_card(export, splits, summary), out_dir, force=force)
    return summary


def read_rows(config: Config, export: ExportFormat, version: int | None,
              step_token: str = DEFAULT_STEP_TOKEN) -> tuple[pa.Table, dict[str, Any]]:
    """Return the format's rows at snapshot `version` (the newest if None) as Arrow, and that snapshot's row."""
    where = f"snapshot {version}" if version is not None else "the newest snapshot"
    views = " and ".join(export.views)
    with lake.connect(config, read_only=True, version=version) as con:
        # One transaction: the snapshot id recorded is the one the rows were read at, even if a writer commits.
        con.execute("BEGIN TRANSACTION")
        try:
            snapshot_id = con.execute(f"SELECT id FROM {lake.LAKE}.current_snapshot()").fetchone()[0]
            where = f"snapshot {snapshot_id}"
            sql = export.sql.replace("{step_token}", "'" + step_token.replace("'", "''") + "'")
            rows = con.execute(sql).to_arrow_table()
        except duckdb.Error as exc:
            # A view added to schemas/lake.sql, or a column added to one, reaches a lake when Orchard next writes to it
            # (the next run); an older snapshot keeps the views it was made with.
            missing = (isinstance(exc, duckdb.CatalogException) and "does not exist" in str(exc)
                       or isinstance(exc, duckdb.BinderException) and "not found" in str(exc))  # fmt: skip
            hint = (" (a view new or changed in schemas/lake.sql reaches the lake at its next run; a snapshot keeps the "
                    "views it was made with)") if missing else ""
            raise ExportError(f"{export.name}: cannot read {views} at lake {where}: {_first_line(exc)}{hint}") from None
        finally:
            lake.rollback(con)
        snapshot = next(s for s in lake.snapshot_rows(con) if s["snapshot_id"] == snapshot_id)
    if rows.num_rows == 0:
        raise ExportError(f"{export.name}: no rows in {views} at lake snapshot {snapshot_id}: nothing to export")
    return rows, snapshot


def write_dataset(splits: Mapping[str, pa.Table], card: str, out_dir: Path, *, force: bool = False) -> None:
    """Write the non-empty splits as Parquet and the card into `<out_dir>.tmp-<pid>`, then rename it to `out_dir`."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)  # left by an earlier attempt of a process with our pid
    try:
        (staging / "data").mkdir(parents=True)
        for name, split in splits.items():
            if split.num_rows:  # datasets cannot read an empty Parquet file: an empty split is left out
                pq.write_table(split, staging / "data" / f"{name}-00000-of-00001.parquet")
        (staging / "README.md").write_text(card)
        check_target(out_dir, force)  # again: something may have appeared there while we read the lake
        if out_dir.is_dir() and any(out_dir.iterdir()):
            replaced = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, replaced)
            try:
                os.replace(staging, out_dir)
            except BaseException:
                os.replace(replaced, out_dir)  # the old dataset back where it was
                raise
            shutil.rmtree(replaced)
        else:
            os.replace(staging, out_dir)  # replaces an empty directory too
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def dataset_card(export: ExportFormat, splits: Mapping[str, pa.Table], summary: Mapping[str, Any]) -> str:
    """Return an export's README.md: YAML front matter mapping the splits' files; format, counts and provenance."""
    present = [name for name in SPLITS if splits[name].num_rows]
    data_files = "".join(f"  - split: {name}\n    path: data/{name}-*.parquet\n" for name in present)
    schema = next(iter(splits.values())).schema
    lines = [
        "---",
        "configs:",
        "- config_name: default",
        "  data_files:",
        data_files.rstrip("\n"),
        "tags:",
        "- orchard",
        f"- {export.name}",
        "---",
        "",
        f"# Orchard export: {export.name}",
        "",
        f"Exported by `orchard export --format {export.name}` from lake snapshot **{summary['snapshot_id']}** "
        f"({summary['snapshot_time']}) of the DuckLake catalog `{summary['catalog']}` "
        f"(data path `{summary['data_path']}`), view{'s' if len(export.views) > 1 else ''} "
        + " and ".join(f"`{v}`" for v in export.views) + ".",
        "",
        "## Format",
        "",
        export.description,
        "",
        *([f"Checked with: {export.checked_with}.", ""] if export.checked_with else []),
        "Columns: " + ", ".join(f"`{field.name}` ({_type_name(field.type)})" for field in schema) + ".",
        "",
        "## Splits",
        "",
        f"By tree, so that siblings never straddle splits: a tree's rows go to `test` iff the first 8 bytes of "
        f"sha256(tree_id), read as a big-endian integer over 2^64, are below the test share ({summary['test_share']}). "
        "A split without rows has no file.",
        "",
        "| split | rows | trees |",
        "|---|---|---|",
        *(f"| {name} | {summary['rows'][name]} | {summary['trees'][name]} |" for name in SPLITS),
        "",
    ]
    for column in BREAKDOWNS:
        if column in schema.names:
            lines += [f"## Rows by {column}", "", f"| {column} | train | test |", "|---|---|---|"]
            lines += [f"| {value} | {n['train']} | {n['test']} |" for value, n in _breakdown(splits, column)]
            lines.append("")
    lines += [
        "## Provenance",
        "",
        f"- lake snapshot: {summary['snapshot_id']} ({summary['snapshot_time']})",
        f"- catalog: `{summary['catalog']}`",
        f"- data path: `{summary['data_path']}`",
        "- runs: " + ", ".join(f"`{r}`" for r in summary["run_ids"]),
        "- models: " + (", ".join(f"`{m}`" for m in summary["models"]) or "not recorded"),
        "",
        "## Loading",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        'dataset = load_dataset("path/to/this/directory")  # or the hub repo it was pushed to',
        "```",
        "",
    ]
    return "\n".join(lines)


def push_dataset(out_dir: str | Path, repo: str) -> str:
    """Upload the dataset directory `out_dir` to the hub dataset repo `repo`; return the repo's URL."""
    from huggingface_hub import HfApi, constants, get_token  # reads HF_ENDPOINT at import: only when pushing

    if get_token() is None:
        raise ExportError(f"push to {repo}: no Hugging Face token (set HF_TOKEN or run `hf auth login`)")
    try:
        HfApi().upload_folder(repo_id=repo, folder_path=str(out_dir), repo_type="dataset")
    except _hub_errors() as exc:
        raise ExportError(f"push to {repo} at {constants.ENDPOINT} failed: {_first_line(exc)}") from None
    return f"{constants.ENDPOINT}/datasets/{repo}"


# --- internals --------------------------------------------------------------------------------


def _hub_errors() -> tuple[type[BaseException], ...]:
    """The errors of a failed upload: the hub's HTTP errors (OSErrors), a bad repo id (ValueError), and the
    transport errors of its HTTP client, which are not OSErrors: httpx2 (huggingface_hub 2.x) or httpx (1.x)."""
    errors: list[type[BaseException]] = [OSError, ValueError, httpx.HTTPError]
    try:
        import httpx2  # huggingface_hub 2.x's client: not installed with 1.x

        errors.append(httpx2.HTTPError)
    except ImportError:
        pass  # an older huggingface_hub: httpx or requests (whose errors are OSErrors)
    return tuple(errors)


def _breakdown(splits: Mapping[str, pa.Table], column: str) -> list[tuple[str, dict[str, int]]]:
    """Return (value, rows per split) for each value of `column`, most rows first; null reads `—`."""
    counts: dict[str, dict[str, int]] = {}
    for name in SPLITS:
        grouped = splits[name].group_by(column).aggregate([([], "count_all")])
        for value, n in zip(grouped.column(column).to_pylist(), grouped.column("count_all").to_pylist()):
            key = "—" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
            counts.setdefault(key, dict.fromkeys(SPLITS, 0))[name] = n
    return sorted(counts.items(), key=lambda item: (-sum(item[1].values()), item[0]))


def _type_name(kind: pa.DataType) -> str:
    """An Arrow type in words: `list of {role: string, content: string}` rather than `list<l: struct<…>>`."""
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return f"list of {_type_name(kind.value_type)}"
    if pa.types.is_struct(kind):
        return "{" + ", ".join(f"{field.name}: {_type_name(field.type)}" for field in kind) + "}"
    return str(kind)


def _timestamp(value: Any) -> str:
    """A snapshot time as ISO 8601 to the second."""
    return value.isoformat(timespec="seconds") if hasattr(value, "isoformat") else str(value)


def _distinct(rows: pa.Table, column: str) -> list[str]:
    """The sorted non-null values of `column` (none if the rows lack it)."""
    if column not in rows.column_names:
        return []
    return sorted(v for v in pc.unique(rows.column(column)).to_pylist() if v is not None)


def _public_catalog(catalog: str) -> str:
    """The catalog string without a password, fit for a card that may be published."""
    return re.sub(r"(password=)\S+", r"\1…", catalog)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
