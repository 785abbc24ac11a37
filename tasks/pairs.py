"""Pairs: (prompt, chosen, rejected) from siblings of one tree, by rejection sampling, MCTS or error injection, and
the run's curation.

Every pair's two answers were sent the same prompt (and, for MCTS, continue the same partial answer), so that
prompt is a shared prefix. `curate` labels contrast (by margin) and keeps what the run asks for: a band of
prompt difficulty (pass rate) and high, low or a mix of contrasts.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from typing import Mapping, Sequence

from orchard.config import RunConfig
from schemas.domains import DOMAINS
from schemas.plan import Instruction
from tasks.hygiene import Drops

# Rejection sampling: n responses to one prompt (siblings sent the same messages), paired by verifier score.
REJECTION_SAMPLING = "rs"
# Monte Carlo tree search: the best and the worst child (by Q) of one expanded step node.
MCTS = "mcts"
# Error injection: a correct answer and a minimally edited copy of it that the verifier fails (a hard negative).
ERROR_INJECTION = "error_injection"
ANSWER_ROLES = ("action", "refinement")  # the verified nodes; critiques are not answers


def _prompt_key(node: Mapping) -> tuple:
    return tuple((m["role"], m["content"]) for m in node["prompt"])


def pass_rates(nodes: Sequence[Mapping]) -> dict[str, float]:
    """Return each instruction's fraction of correct first-turn actions: how hard its prompt is."""
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for node in nodes:
        if node["role"] == "action":
            totals[node["instruction_id"]][0] += node["verdict"] == "correct"
            totals[node["instruction_id"]][1] += 1
    return {iid: correct / count for iid, (correct, count) in totals.items()}


def pair_row(chosen: Mapping, rejected: Mapping, instruction: Instruction, *, method: str, chosen_score: float,
          rejected_score: float, chosen_text: str, rejected_text: str, pass_rate: float | None) -> dict:
    return {
        "run_id": chosen["run_id"],
        "shard_id": chosen["shard_id"],
        "tree_id": chosen["tree_id"],
        "pair_id": hashlib.sha256(f"{chosen['node_id']}>{rejected['node_id']}".encode()).hexdigest()[:16],
        "instruction_id": instruction.instruction_id,
        "domain": instruction.domain,
        "method": method,
        "prompt": list(chosen["prompt"]),
        "chosen_node_id": chosen["node_id"],
        "rejected_node_id": rejected["node_id"],
        "chosen_text": chosen_text,
        "rejected_text": rejected_text,
        "chosen_score": chosen_score,
        "rejected_score": rejected_score,
        "margin": chosen_score - rejected_score,
        # Both were sent the same prompt (for MCTS: the same prompt and partial answer): the engine's count of it.
        "shared_prefix_tokens": int(min(chosen["prompt_tokens"] or 0, rejected["prompt_tokens"] or 0)),
        "difficulty": instruction.difficulty,
        "pass_rate": pass_rate,
        "strategy": chosen["strategy"],
        "model": chosen["model"],
        "turn": chosen["turn"],
        "contrast": None,  # set by curate() from the run's thresholds
        "k": constraint_count(instruction),
        "edit_distance": None,  # set for error_injection pairs
        "jury_label": None,  # set when the jury judged the pair too
        "jury_winner": None,
    }


def constraint_count(instruction: Instruction) -> int | None:
    """Return k, the number of verifiable constraints of an instruction-following prompt (None elsewhere): the
    difficulty of a domain whose difficulty counts its constraints."""
    return instruction.difficulty if DOMAINS[instruction.domain].counts_constraints else None


def extract_pairs(nodes: Sequence[Mapping], instructions: Mapping[str, Instruction],
                  rates: Mapping[str, float] | None = None) -> list[dict]:
    """Return one rejection-sampling pair for every (better, worse) combination of siblings that share parent and prompt.

    Siblings are first-turn actions under one strategy, or refinements under one critique. They were sent
    the same messages (for a refinement: the whole history), so that prompt is a shared prefix of chosen
    and rejected: `shared_prefix_tokens` is its token count as the engine reported it.
    """
    groups: dict[tuple, list[Mapping]] = defaultdict(list)
    for node in nodes:
        if node["role"] in ANSWER_ROLES and node["score"] is not None:
            groups[(node["parent_id"], _prompt_key(node))].append(node)
    rates = pass_rates(nodes) if rates is None else rates
    pairs = []
    for siblings in groups.values():
        ordered = sorted(siblings, key=lambda n: n["node_id"])
        for chosen in ordered:
            for rejected in ordered:
                if chosen["score"] - rejected["score"] <= 0:  # not a pair; texts are checked by pair hygiene
                    continue
                instruction = instructions[chosen["instruction_id"]]
                pairs.append(pair_row(chosen, rejected, instruction, method=REJECTION_SAMPLING,
                                   chosen_score=chosen["score"], rejected_score=rejected["score"],
                                   chosen_text=chosen["text"], rejected_text=rejected["text"],
                                   pass_rate=rates.get(instruction.instruction_id)))
    return pairs


def mcts_pairs(nodes: Sequence[Mapping], instructions: Mapping[str, Instruction],
               rates: Mapping[str, float] | None = None) -> list[dict]:
    """Return one MCTS pair per expanded node: its children with the best and the worst Q.

    Both children continue the same partial answer (their parent's text), so chosen and rejected share the
    prompt and that prefix. Each side's text is its whole answer: the step's own text when it finished,
    otherwise its rollout to the end. Scores are Q values, so margin = Q(best) - Q(worst).
    """
    rollout_of = {n["parent_id"]: n for n in nodes if n["role"] == "rollout"}
    children: dict[str, list[Mapping]] = defaultdict(list)
    for node in nodes:
        if node["role"] == "step" and node["visits"]:
            children[node["parent_id"]].append(node)
    rates = pass_rates(nodes) if rates is None else rates

    def answer(step: Mapping) -> str | None:
        rollout = rollout_of.get(step["node_id"])
        return step["text"] if rollout is None else rollout["text"]

    pairs = []
    for siblings in children.values():
        if len(siblings) < 2:
            continue
        ordered = sorted(siblings, key=lambda n: (-n["q_value"], n["node_id"]))
        chosen, rejected = ordered[0], ordered[-1]
        chosen_text, rejected_text = answer(chosen), answer(rejected)
        if chosen["q_value"] - rejected["q_value"] <= 1e-9:  # not a pair; texts are checked by pair hygiene
            continue
        instruction = instructions[chosen["instruction_id"]]
        pairs.append(pair_row(chosen, rejected, instruction, method=MCTS, chosen_score=chosen["q_value"],
                           rejected_score=rejected["q_value"], chosen_text=chosen_text, rejected_text=rejected_text,
                           pass_rate=rates.get(instruction.instruction_id)))
    return pairs


def found_pairs(nodes: Sequence[Mapping], instructions: Mapping[str, Instruction], injected: Sequence[dict]) -> list[dict]:
    """Return every pair the trees of `nodes` hold, before curation: rejection-sampling and MCTS pairs, then the
    error-injection pairs made for them (`injected`)."""
    rates = pass_rates(nodes)
    return extract_pairs(nodes, instructions, rates) + mcts_pairs(nodes, instructions, rates) + list(injected)


def contrast_of(margin: float, run: RunConfig) -> str:
    """Return `high`, `low` or `mid` for a pair's margin under the run's thresholds."""
    if margin >= run.contrast_high_min:
        return "high"
    if margin <= run.contrast_low_max:
        return "low"
    return "mid"


def may_keep(pair: Mapping, run: RunConfig) -> bool:
    """Whether curation can keep `pair` on its own merits: its prompt's pass rate lies in the difficulty band, and
    its contrast is the one asked for (under `mix`, the shard-wide proportion decides the rest)."""
    low, high = run.difficulty_band
    if pair["pass_rate"] is not None and not low <= pair["pass_rate"] <= high:
        return False
    return run.pair_contrast not in ("high", "low") or contrast_of(pair["margin"], run) == run.pair_contrast


def curate(pairs: Sequence[dict], run: RunConfig, drops: Drops | None = None) -> list[dict]:
    """Label each pair's contrast, then keep the pairs the run asks for; say in `drops` why each other one went.

    Difficulty: only prompts whose pass rate lies in `run.difficulty_band`. Contrast: `all`, only `high`,
    only `low`, or `mix` — high and low pairs in the proportion `contrast_mix_high`, as many as the scarcer
    kind allows, chosen by pair id (a stable, content-derived order).
    """
    drops = drops if drops is not None else Drops()
    kept = []
    low, high = run.difficulty_band
    for pair in pairs:
        pair["contrast"] = contrast_of(pair["margin"], run)
        if may_keep(pair, run):
            kept.append(pair)
        elif pair["pass_rate"] is not None and not low <= pair["pass_rate"] <= high:
            drops.add("curation", f"pass rate outside run.difficulty_band [{low:g}, {high:g}]", pair["pair_id"])
        else:
            drops.add("curation", f"{pair['contrast']} contrast (run.pair_contrast = {run.pair_contrast})", pair["pair_id"])
    if run.pair_contrast == "mix":
        share = run.contrast_mix_high
        highs = sorted((p for p in kept if p["contrast"] == "high"), key=lambda p: p["pair_id"])
        lows = sorted((p for p in kept if p["contrast"] == "low"), key=lambda p: p["pair_id"])
        total = min(len(highs) / share if share > 0 else math.inf, len(lows) / (1 - share) if share < 1 else math.inf)
        n_high = min(len(highs), math.floor(total * share + 1e-9))
        n_low = min(len(lows), math.floor(total * (1 - share) + 1e-9))
        chosen = {p["pair_id"] for p in highs[:n_high] + lows[:n_low]}
        for pair in kept:
            if pair["pair_id"] not in chosen:
                reason = ("mid contrast (run.pair_contrast = mix keeps high and low)" if pair["contrast"] == "mid" else
                          f"{pair['contrast']} contrast beyond the mix's share (run.contrast_mix_high = {share:g})")
                drops.add("curation", reason, pair["pair_id"])
        return [p for p in kept if p["pair_id"] in chosen]
    return kept
