"""Does one night's data improve the model that grew it? Grow, train, evaluate on held-out prompts, compare.

    PYTHONPATH=. .venv/bin/python bench/improve.py [--work-dir DIR] [--pairs SQL] [--skip-grow] [sizes...]

Stages (each prints its wall time; each writes its result under the work dir and is reused by the same command run
again, so a long run resumes where it stopped; a changed setting redoes the stages it changes):

1. seeds: the held-out prompts, Orchard's own generators (arithmetic at several difficulties, code tasks,
   instruction-following prompts) with other generator seeds than the training run's, written with their references
   to `heldout.jsonl`; a held-out prompt whose normalized text equals a training seed's is left out (the 8-gram
   gate cannot see prompts shorter than 8 tokens). The training run's config `train.toml` decontaminates against
   that file (its `[[decontaminate]]` list: the six default sets and `held-out`), so the hygiene gate drops every
   training seed that covers half of a held-out prompt's 8-grams.
2. grow: `orchard run` on the training config, its own state dir (SeaweedFS, lake, llama-server) under the work dir.
3. export: `trl-dpo` and `sft` exports of the run's snapshot (all trees in train); `--pairs` keeps the DPO rows
   whose pair satisfies an SQL predicate over the lake's `pairs` table.
4. train (the train venv, bench/improve_model.py): SFT on `sft`, DPO on `trl-dpo`, from the float32 SmolLM2
   checkpoint `make train-check` builds.
5. gguf: each model (base, SFT, DPO) written as GGUF and re-encoded as Q8_0, as Orchard serves the embedded model
   (the base's file is tensor for tensor the one `orchard run` served: checked).
6. eval: each model served by llama-server (orchard.services.start_llama_server) and asked every held-out prompt
   through Orchard's engine client, in the messages a turn-1 action is grown from (the run's strategies in turn);
   once greedy and `--samples` times at the run's temperature; verified by Orchard's verifiers (math-verify, the
   sandbox, the constraint checkers).
7. report: pass@1 per domain and overall with 95 % percentile-bootstrap intervals over prompts, and the paired
   bootstrap of SFT - base and DPO - base; the pairs by method and contrast; the wall of every stage.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchard import llama_build  # noqa: E402
from orchard.config import Config, EngineConfig, SeedSource, load_config  # noqa: E402
from orchard.engine import EngineClient, Sampling  # noqa: E402
from orchard.lake import query  # noqa: E402
from orchard.services import embedded_services, start_llama_server  # noqa: E402
from schemas.plan import Instruction  # noqa: E402
from tasks.hygiene import normalized  # noqa: E402
from tasks.seeds import read_seeds  # noqa: E402
from tasks.turns import action_messages, strategies_for  # noqa: E402
from tasks.verify import CORRECT, Verifiers  # noqa: E402

TRAIN_PY = REPO / ".venv-train" / "bin" / "python"
MODEL_PY = Path(__file__).with_name("improve_model.py")
RUN_ID = "improve-train"
MODELS = ("base", "sft", "dpo")
DOMAIN_ORDER = ("math", "code", "instruction_following")

# Sized for about an hour on a 2-core machine (README: "Does the data help?"). Training counts are before the
# hygiene gate, which drops the training seeds that near-copy a held-out prompt (generated tasks share templates).
TRAIN_SEEDS = "arithmetic:1:14,arithmetic:2:14,arithmetic:3:8,code:1:14,code:2:8,if_synth:2:8,if_synth:3:8"
HELDOUT_SEEDS = "arithmetic:1:30,arithmetic:2:30,arithmetic:3:20,code:1:20,code:2:10,if_synth:2:20,if_synth:3:20"


# --- the work dir: stages whose results are kept and reused --------------------------------------------------------


class Stages:
    """Runs each stage unless the work dir holds its result for the same inputs; records each stage's wall."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.walls: dict[str, float] = {}

    def run(self, name: str, inputs: Any, step: Callable[[], dict]) -> dict:
        """Return the stage's result: the kept one if its inputs are unchanged, else `step()`'s (then kept)."""
        key = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]
        marker = self.work / "stages" / f"{name}.json"
        if marker.is_file():
            kept = json.loads(marker.read_text())
            if kept["key"] == key:
                print(f"[{name}] reused (inputs unchanged; {kept['wall_s']:.1f} s when it ran)", flush=True)
                self.walls[name] = kept["wall_s"]
                return kept["result"]
        print(f"[{name}] ...", flush=True)
        started = time.monotonic()
        result = step()
        wall = time.monotonic() - started
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"key": key, "wall_s": wall, "result": result}, indent=1, default=str))
        self.walls[name] = wall
        print(f"[{name}] done in {wall:.1f} s", flush=True)
        return result


# --- seeds --------------------------------------------------------------------------------------------------------


def sources(spec: str, seed: int) -> list[SeedSource]:
    """`kind:difficulty:count,...` as seed sources, each with its own generator seed (seed, seed + 1, ...)."""
    made = []
    for i, part in enumerate(p for p in spec.split(",") if p.strip()):
        kind, difficulty, count = part.strip().split(":")
        made.append(SeedSource(kind=kind, difficulty=int(difficulty), count=int(count), seed=seed + i))
    return made


def toml_sources(found: Sequence[SeedSource]) -> str:
    return "".join(f'\n[[seeds]]\nkind = "{s.kind}"\ncount = {s.count}\ndifficulty = {s.difficulty}\nseed = {s.seed}\n'
                   for s in found)


def write_seeds(args: argparse.Namespace, work: Path) -> dict:
    """Write heldout.jsonl and train.toml; return the held-out counts."""
    train, _ = read_seeds(sources(args.train_seeds, args.train_seed))
    held, _ = read_seeds(sources(args.heldout_seeds, args.heldout_seed))
    train_texts = {normalized(i.text) for i in train}
    kept = [i for i in held if normalized(i.text) not in train_texts]
    with (work / "heldout.jsonl").open("w") as out:
        for instruction in kept:
            out.write(json.dumps(instruction.as_row()) + "\n")
    decontaminate = "".join(f'\n[[decontaminate]]\nname = "{s}"\nformat = "{"humaneval" if s == "humaneval" else "benchmark"}"\n'
                            for s in ("gsm8k", "math", "mbpp", "humaneval", "ifbench", "mt_bench"))
    decontaminate += f'\n[[decontaminate]]\nname = "held-out"\nformat = "text"\npath = "{work / "heldout.jsonl"}"\nfield = "text"\n'
    settings = "".join(f"{line}\n" for line in args.set)
    (work / "train.toml").write_text(
        f'state_dir = "{work / "state"}"\n\n[run]\n'
        "# no open-ended prompts, so the jury would only judge canaries and a few verifiable pairs: nothing a pair needs\n"
        f"jury_pairs = 0\njury_canaries = 0\n{settings}"
        f"{toml_sources(sources(args.train_seeds, args.train_seed))}{decontaminate}")
    return {"heldout": len(kept), "heldout_exact_overlap_dropped": len(held) - len(kept),
            "heldout_by_domain": _count(i.domain for i in kept), "train_seeds": len(train)}


def heldout(work: Path) -> list[Instruction]:
    with (work / "heldout.jsonl").open() as lines:
        return [Instruction(**json.loads(line)) for line in lines]


# --- grow and export ----------------------------------------------------------------------------------------------


def grow(work: Path, key: str) -> dict:
    """Run `orchard run` on train.toml; its output goes to grow.log. A partial run (exit 3) still has pairs.

    The same seeds resume the run the state dir holds (an interrupted grow); other seeds start a new state dir."""
    state, mark = work / "state", work / "state.key"
    if state.exists() and (not mark.is_file() or mark.read_text() != key):
        shutil.rmtree(state)
    mark.write_text(key)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ORCHARD"))}
    env["PYTHONPATH"] = str(REPO)
    with (work / "grow.log").open("wb") as log:
        done = subprocess.run([sys.executable, "-m", "flows.cli", "--config", str(work / "train.toml"), "run",
                               "--run-id", RUN_ID], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    tail = (work / "grow.log").read_text(errors="replace").splitlines()
    if done.returncode not in (0, 3):
        raise SystemExit(f"orchard run failed (exit {done.returncode}); log {work / 'grow.log'}:\n" + "\n".join(tail[-15:]))
    summary = [line for line in tail if line.startswith(("run ", "  trees", "  tokens", "  stages", "  seeds",
                                                          "  mcts pairs", "  rs pairs", "  error_injection pairs"))]
    print("\n".join(summary), flush=True)
    return {"exit": done.returncode, "summary": summary}


def export(cfg: Config, work: Path, pairs: str) -> dict:
    """Export trl-dpo and sft (every tree in train), keep the DPO rows `pairs` selects; return what the lake says of
    the run: seeds, contamination against the held-out set, pairs by method and contrast."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from tasks.export import export_dataset

    out = work / "exports"
    shutil.rmtree(out, ignore_errors=True)
    selected = f"({pairs})" if pairs else "true"
    with embedded_services(cfg, model=False) as live:
        def rows(sql: str) -> list[dict]:
            columns, found = query(live, sql)
            return [dict(zip(columns, row)) for row in found]

        for fmt in ("trl-dpo", "sft"):
            export_dataset(live, fmt, out / f"{fmt}-all", test_share=0.0)
        ids = {r["pair_id"] for r in rows(f"SELECT pair_id FROM pairs WHERE {selected}")}
        by_method = rows(f"""
            SELECT method, contrast, count(*) AS pairs, round(median(margin), 3) AS median_margin,
                   round(median(length(chosen_text) / length(rejected_text)), 3) AS length_ratio,
                   round(avg(pass_rate), 3) AS mean_pass_rate
            FROM pairs WHERE {selected} GROUP BY ALL ORDER BY ALL""")
        by_domain = rows(f"SELECT domain, count(*) AS pairs FROM pairs WHERE {selected} GROUP BY ALL ORDER BY ALL")
        trees = rows("SELECT domain, count(*) AS trees, round(avg(pass_rate), 3) AS pass_rate FROM trees "
                     "GROUP BY ALL ORDER BY ALL")
        flagged = rows("SELECT count(DISTINCT instruction_id) AS n FROM contamination WHERE eval_set = 'held-out'")
        overlap = rows("SELECT text FROM instructions")
    held = {normalized(i.text) for i in heldout(work)}
    leaked = sum(normalized(r["text"]) in held for r in overlap)
    if leaked:
        raise SystemExit(f"{leaked} training instructions equal a held-out prompt: the held-out set is not held out")
    for fmt, keep in (("trl-dpo", ids), ("sft", None)):
        table = pq.read_table(out / f"{fmt}-all" / "data" / "train-00000-of-00001.parquet")
        if keep is not None:
            table = table.filter(pc.is_in(table.column("id"), value_set=pa.array(sorted(keep))))
        if table.num_rows == 0:
            raise SystemExit(f"--pairs {pairs!r} selects no {fmt} rows")
        target = out / fmt / "data"
        target.mkdir(parents=True)
        pq.write_table(table, target / "train-00000-of-00001.parquet")
    return {"dpo_rows": pq.read_table(out / "trl-dpo" / "data").num_rows,
            "sft_rows": pq.read_table(out / "sft" / "data").num_rows, "pairs_by_method": by_method,
            "pairs_by_domain": by_domain, "trees": trees, "train_instructions": len(overlap),
            "train_seeds_flagged_by_heldout": flagged[0]["n"], "train_equal_to_heldout": leaked}


# --- train, convert -----------------------------------------------------------------------------------------------


def train(method: str, work: Path, args: argparse.Namespace, tag: str) -> dict:
    out = work / "models" / f"{method}-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    record = work / "models" / f"{method}-{tag}.json"
    lr = args.dpo_lr if method == "dpo" else args.sft_lr
    export_dir = work / "exports" / ("trl-dpo" if method == "dpo" else "sft")
    argv = [str(TRAIN_PY), str(MODEL_PY), "train", method, str(llama_build.train_model()), str(export_dir), str(out),
            str(record), "--epochs", str(args.epochs), "--lr", str(lr), "--beta", str(args.beta),
            "--batch", str(args.batch), "--accumulation", str(args.accumulation), "--max-steps", str(args.max_steps)]
    with (work / f"train-{method}.log").open("wb") as log:
        done = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    if done.returncode:
        tail = (work / f"train-{method}.log").read_text(errors="replace").splitlines()[-15:]
        raise SystemExit(f"training {method} failed (exit {done.returncode}):\n" + "\n".join(tail))
    return {**json.loads(record.read_text()), "model_dir": str(out)}


def gguf(name: str, model_dir: Path, work: Path) -> dict:
    """Write `model_dir` as F32 GGUF, re-encode it as the embedded quantization (Q8_0); return the served file."""
    folder = work / "gguf"
    folder.mkdir(exist_ok=True)
    f32, served = folder / f"{name}.f32.gguf", folder / f"{name}.{llama_build.EMBEDDED_QUANT}.gguf"
    for stale in (f32, served):
        stale.unlink(missing_ok=True)
    argv = [str(TRAIN_PY), str(MODEL_PY), "gguf", str(model_dir), str(llama_build.shipped_model()), str(f32)]
    done = subprocess.run(argv + (["--check"] if name == "base" else []), capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        raise SystemExit(f"gguf {name} failed: {done.stderr[-1500:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if name == "base" and result["max_abs_diff_to_template"] != 0.0:
        raise SystemExit(f"the base checkpoint does not round-trip to the shipped GGUF: {result}")
    quantize = subprocess.run([str(llama_build.find_binary("llama-quantize")), str(f32), str(served),
                               llama_build.EMBEDDED_QUANT], capture_output=True, text=True)
    if quantize.returncode:
        raise SystemExit(f"llama-quantize {name} failed: {quantize.stderr[-1500:]}")
    f32.unlink()
    if name == "base":  # the file `orchard run` served, rebuilt from the checkpoint the trainers start from
        result["same_as_served"] = _same_tensors(served, llama_build.served_model())
        if not result["same_as_served"]:
            raise SystemExit(f"{served} differs from {llama_build.served_model()}: base is not the model that grew")
    return {**result, "gguf": str(served)}


def _same_tensors(a: Path, b: Path) -> bool:
    done = subprocess.run([str(TRAIN_PY), "-c", (
        "import sys, gguf, numpy as np\n"
        "a, b = (gguf.GGUFReader(p) for p in sys.argv[1:])\n"
        "tb = {t.name: t for t in b.tensors}\n"
        "print(all(t.name in tb and t.tensor_type == tb[t.name].tensor_type and np.array_equal(t.data, tb[t.name].data)"
        " for t in a.tensors) and len(a.tensors) == len(b.tensors))"), str(a), str(b)], capture_output=True, text=True)
    return done.stdout.strip() == "True"


# --- evaluate -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """One answer to a held-out prompt: which model, greedy or which sample, its verdict and length."""

    model: str
    instruction_id: str
    domain: str
    sample: int  # -1: greedy; 0..k-1: the samples at the run's temperature
    correct: bool
    verdict: str
    completion_tokens: int
    finish_reason: str
    text: str


def evaluate(name: str, served: Path, prompts: list[Instruction], cfg: Config, work: Path, samples: int) -> dict:
    """Serve `served` with llama-server, answer every prompt greedily and `samples` times at the run's temperature
    through Orchard's engine client, verify with Orchard's verifiers; write answers-<name>.jsonl."""
    engine = EngineConfig(kind="embedded", model=f"improve-{name}")
    server = start_llama_server(engine, work / "eval-state", name=f"improve-{name}", model=served)
    try:
        engine = EngineConfig(kind="embedded", model=engine.model, base_urls=(server.url,))
        completions = asyncio.run(_answers(engine, prompts, cfg, samples))
    finally:
        server.stop()
    items = [(prompts[i], c.text) for i, _, c in completions]
    with Verifiers(workers=os.cpu_count() or 2, sandbox=cfg.sandbox) as verifiers:
        verdicts = verifiers.check(items)
    answers = [Answer(name, prompts[i].instruction_id, prompts[i].domain, sample, v.verdict == CORRECT, v.verdict,
                      c.completion_tokens, c.finish_reason, c.text)
               for (i, sample, c), v in zip(completions, verdicts)]
    path = work / f"answers-{name}.jsonl"
    with path.open("w") as out:
        for answer in answers:
            out.write(json.dumps(asdict(answer)) + "\n")
    return {"answers": str(path), "n": len(answers)}


async def _answers(engine: EngineConfig, prompts: list[Instruction], cfg: Config, samples: int) -> list:
    run = cfg.run
    rotation: dict[str, int] = {}

    def messages(instruction: Instruction) -> list[dict[str, str]]:
        # The run's strategies in turn over each domain's prompts: the same prompt gets the same one for every model.
        strategies = strategies_for(run, instruction.domain)
        index = rotation.get(instruction.domain, 0)
        rotation[instruction.domain] = index + 1
        return action_messages(instruction, strategies[index % len(strategies)])

    greedy = Sampling(temperature=0.0, top_p=1.0, max_tokens=run.max_tokens, seed=0)
    async with EngineClient(engine) as client:
        async def ask(i: int, chat: list[dict[str, str]]) -> list[tuple[int, int, Any]]:
            found = [(i, -1, c) for c in await client.chat(chat, greedy)]
            if samples:
                sampled = Sampling(temperature=run.temperature, top_p=run.top_p, max_tokens=run.max_tokens,
                                   seed=run.seed + 1000 * i)
                found += [(i, k, c) for k, c in enumerate(await client.chat(chat, sampled, n=samples))]
            return found

        chats = [messages(p) for p in prompts]
        done = await asyncio.gather(*(ask(i, chat) for i, chat in enumerate(chats)))
    return [answer for part in done for answer in part]


# --- statistics and the printout ----------------------------------------------------------------------------------


def per_prompt(work: Path, name: str, greedy: bool) -> dict[str, float]:
    """Each prompt's pass@1 for model `name`: its greedy answer's 0/1, or the share of its samples that pass."""
    scores: dict[str, list[float]] = {}
    with (work / f"answers-{name}.jsonl").open() as lines:
        for row in map(json.loads, lines):
            if (row["sample"] < 0) == greedy:
                scores.setdefault(row["instruction_id"], []).append(float(row["correct"]))
    return {k: sum(v) / len(v) for k, v in scores.items()}


def bootstrap(values: np.ndarray, rounds: int, rng: np.random.Generator) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the mean of `values` over resampled prompts."""
    if len(values) == 0:
        return float("nan"), float("nan")
    means = values[rng.integers(0, len(values), size=(rounds, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def table(work: Path, prompts: list[Instruction], greedy: bool, rounds: int) -> tuple[list[str], dict]:
    """Rows of pass@1 per domain and overall for each model with intervals, and the paired differences to base."""
    rng = np.random.default_rng(0)
    scores = {m: per_prompt(work, m, greedy) for m in MODELS}
    groups = [(d, [p for p in prompts if p.domain == d]) for d in DOMAIN_ORDER] + [("overall", prompts)]
    head = f"  {'domain':<22}{'n':>4}  " + "".join(f"{m:<22}" for m in MODELS) + "sft - base             dpo - base"
    lines, figures = [head], {}
    for label, members in groups:
        if not members:
            continue
        ids = [p.instruction_id for p in members]
        columns = {m: np.array([scores[m][i] for i in ids]) for m in MODELS}
        cells, figures[label] = [], {}
        for m in MODELS:
            low, high = bootstrap(columns[m], rounds, rng)
            figures[label][m] = [float(columns[m].mean()), low, high]
            cells.append(f"{columns[m].mean():.3f} [{low:.3f},{high:.3f}]".ljust(22))
        for m in ("sft", "dpo"):
            diff = columns[m] - columns["base"]
            low, high = bootstrap(diff, rounds, rng)  # paired: the same resampled prompts for both models
            figures[label][f"{m}-base"] = [float(diff.mean()), low, high]
            cells.append(f"{diff.mean():+.3f} [{low:+.3f},{high:+.3f}]".ljust(23))
        lines.append(f"  {label:<22}{len(members):>4}  " + "".join(cells))
    return lines, figures


def lengths(work: Path) -> list[str]:
    """Mean answer length and share cut at max_tokens, per model: a DPO model that learned length shows it here."""
    out = []
    for m in MODELS:
        with (work / f"answers-{m}.jsonl").open() as lines:
            rows = [json.loads(line) for line in lines]
        cut = sum(r["finish_reason"] == "length" for r in rows) / max(1, len(rows))
        by_verdict = _count(r["verdict"] for r in rows)
        out.append(f"  {m}: mean {statistics.fmean(r['completion_tokens'] for r in rows):.1f} tokens, "
                   f"{cut:.1%} cut at max_tokens; verdicts {by_verdict}")
    return out


def _count(values: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[str(value)] = counts.get(str(value), 0) + 1
    return dict(sorted(counts.items()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=REPO / ".orchard-improve",
                        help="where the runs, exports, models, answers and report go (default: .orchard-improve)")
    parser.add_argument("--pairs", default="", help="SQL predicate over the lake's pairs table: train DPO only on "
                        "the pairs it selects, e.g. \"method = 'mcts' AND contrast = 'high'\" (default: every pair)")
    parser.add_argument("--skip-grow", action="store_true", help="reuse the lake in the work dir as it is")
    parser.add_argument("--train-seeds", default=TRAIN_SEEDS, help="training sources, kind:difficulty:count,... "
                        f"(before the hygiene gate; default {TRAIN_SEEDS})")
    parser.add_argument("--heldout-seeds", default=HELDOUT_SEEDS, help=f"held-out sources (default {HELDOUT_SEEDS})")
    parser.add_argument("--train-seed", type=int, default=7, help="first generator seed of the training sources")
    parser.add_argument("--heldout-seed", type=int, default=1001, help="first generator seed of the held-out sources")
    parser.add_argument("--set", action="append", default=[], metavar="KEY = VALUE",
                        help="a TOML line added under the training run's [run] table, e.g. 'pair_contrast = \"high\"'")
    parser.add_argument("--samples", type=int, default=2, help="answers per held-out prompt at the run's temperature")
    # One epoch: on 2 cores an SFT epoch of ~160 rows takes ~5 min and a DPO epoch of ~260 pairs ~20 min (float32).
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1, help="optimizer steps per trainer (-1: whole epochs)")
    parser.add_argument("--dpo-lr", type=float, default=5e-6)
    parser.add_argument("--sft-lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.1, help="DPO's beta")
    parser.add_argument("--batch", type=int, default=2, help="rows per device batch")
    parser.add_argument("--accumulation", type=int, default=4, help="gradient accumulation steps")
    parser.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples")
    args = parser.parse_args(argv)
    if not TRAIN_PY.is_file() or not llama_build.train_model().is_dir():
        raise SystemExit("the train venv or the float32 model is missing: run `make train-check` first")

    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    stages = Stages(work)
    started = time.monotonic()
    seed_inputs = [args.train_seeds, args.heldout_seeds, args.train_seed, args.heldout_seed, args.set]
    seeds = stages.run("seeds", seed_inputs, lambda: write_seeds(args, work))
    cfg = load_config(work / "train.toml", environ={})
    grown = stages.run("grow", "kept" if args.skip_grow else seed_inputs, lambda: grow(work, json.dumps(seed_inputs)))
    exported = stages.run("export", [seed_inputs, args.pairs, grown], lambda: export(cfg, work, args.pairs))
    steps = [args.epochs, args.max_steps, args.batch, args.accumulation]
    # SFT reads no pairs: a `--pairs` run reuses its model and figures (the sft export is the same), and redoes DPO.
    sft_tag = hashlib.sha256(json.dumps(seed_inputs).encode()).hexdigest()[:8]
    dpo_tag = hashlib.sha256(json.dumps([args.pairs, seed_inputs]).encode()).hexdigest()[:8]
    trained = {
        "sft": stages.run("train-sft", [seed_inputs, grown, steps, args.sft_lr, exported["sft_rows"]],
                          lambda: train("sft", work, args, sft_tag)),
        "dpo": stages.run("train-dpo", [exported, steps, args.dpo_lr, args.beta],
                          lambda: train("dpo", work, args, dpo_tag)),
    }
    dirs = {"base": str(llama_build.train_model()), **{m: trained[m]["model_dir"] for m in ("sft", "dpo")}}
    served = {m: stages.run(f"gguf-{m}", [dirs[m], trained.get(m)], lambda m=m: gguf(m, Path(dirs[m]), work))
              for m in MODELS}
    prompts = heldout(work)
    for m in MODELS:
        # The served file's name is the model's ("dpo.Q8_0.gguf"), whatever trained it: its training is in the key.
        stages.run(f"eval-{m}", [seeds, served[m], trained.get(m), args.samples, cfg.run.max_tokens,
                                 cfg.run.temperature],
                   lambda m=m: evaluate(m, Path(served[m]["gguf"]), prompts, cfg, work, args.samples))

    out = [f"bench/improve.py: SmolLM2-135M-Instruct, trained from the float32 checkpoint, served as "
           f"{llama_build.EMBEDDED_QUANT} GGUF by llama-server; work dir {work}",
           f"training run {RUN_ID}: sources {args.train_seeds} (seeds from {args.train_seed}); "
           f"{exported['train_instructions']} instructions grown after the hygiene gate "
           f"({exported['train_seeds_flagged_by_heldout']} seeds flagged against the held-out set, "
           f"{exported['train_equal_to_heldout']} equal to a held-out prompt)",
           "  trees: " + ", ".join(f"{t['domain']} {t['trees']} (pass rate {t['pass_rate']})" for t in exported["trees"]),
           f"  [run] settings: {'; '.join(args.set) or 'defaults'} (jury off)",
           f"pairs for DPO ({args.pairs or 'all'}): {exported['dpo_rows']} rows; SFT rows: {exported['sft_rows']}",
           *[f"  {p['method']:<16}{p['contrast']:<5}{p['pairs']:>5} pairs, median margin {p['median_margin']}, "
             f"median len ratio chosen/rejected {p['length_ratio']}, mean prompt pass rate {p['mean_pass_rate']}"
             for p in exported["pairs_by_method"]],
           "  by domain: " + ", ".join(f"{p['domain']} {p['pairs']}" for p in exported["pairs_by_domain"]),
           f"held-out: {seeds['heldout']} prompts {seeds['heldout_by_domain']} from {args.heldout_seeds} "
           f"(seeds from {args.heldout_seed}; {seeds['heldout_exact_overlap_dropped']} equal to a training seed left out)"]
    for m in ("sft", "dpo"):
        t = trained[m]
        out.append(f"train {m}: {t['rows_kept']} rows, {t['steps']} steps of {t['batch']} ({t['epochs']} epochs), "
                   f"lr {t['learning_rate']}" + (f", beta {t['beta']}" if m == "dpo" else "") +
                   f", loss {t['first_losses'][0] if t['first_losses'] else float('nan'):.3f} -> {t['loss']:.3f} (mean)"
                   + (f", last reward accuracy {t['last_reward_accuracy']}" if t.get("last_reward_accuracy") is not None
                      else ""))
    figures = {}
    for greedy, label in ((True, "greedy"), (False, f"T={cfg.run.temperature}, {args.samples} samples per prompt")):
        if not greedy and not args.samples:
            continue
        lines, figures[label] = table(work, prompts, greedy, args.bootstrap)
        out += [f"pass@1 on held-out prompts, {label} (95% bootstrap intervals; differences paired by prompt):", *lines]
    out += ["answers:", *lengths(work)]
    out.append("stages: " + ", ".join(f"{name} {wall:.1f} s" for name, wall in stages.walls.items()) +
               f"; this invocation {time.monotonic() - started:.1f} s")
    text = "\n".join(out)
    print(text)
    (work / "report.txt").write_text(text + "\n")
    (work / "report.json").write_text(json.dumps({"figures": figures, "exported": exported, "trained": trained,
                                                  "seeds": seeds, "walls": stages.walls, "args": vars(args)},
                                                 indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
