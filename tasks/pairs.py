"""Pair extraction: (prompt, chosen, rejected) from sibling actions of one tree that were sent the same prompt."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Mapping, Sequence

from tasks.seeds import Instruction

# Rejection sampling: n responses to one prompt (siblings sent the same messages), paired by verifier score.
REJECTION_SAMPLING = "rs"
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


def extract_pairs(nodes: Sequence[Mapping], instructions: Mapping[str, Instruction]) -> list[dict]:
    """Return one pair for every (better, worse) combination of siblings that share parent and prompt.

    Siblings are first-turn actions under one strategy, or refinements under one critique. They were sent
    the same messages (for a refinement: the whole history), so that prompt is a shared prefix of chosen
    and rejected: `shared_prefix_tokens` is its token count as the engine reported it.
    """
    groups: dict[tuple, list[Mapping]] = defaultdict(list)
    for node in nodes:
        if node["role"] in ANSWER_ROLES and node["score"] is not None:
            groups[(node["parent_id"], _prompt_key(node))].append(node)
    rates = pass_rates(nodes)
    pairs = []
    for siblings in groups.values():
        ordered = sorted(siblings, key=lambda n: n["node_id"])
        for chosen in ordered:
            for rejected in ordered:
                margin = chosen["score"] - rejected["score"]
                if margin <= 0 or chosen["text"].strip() == rejected["text"].strip() or not chosen["text"].strip():
                    continue
                instruction = instructions[chosen["instruction_id"]]
                pairs.append(
                    {
                        "run_id": chosen["run_id"],
                        "shard_id": chosen["shard_id"],
                        "tree_id": chosen["tree_id"],
                        "pair_id": hashlib.sha256(
                            f"{chosen['node_id']}>{rejected['node_id']}".encode()
                        ).hexdigest()[:16],
                        "instruction_id": instruction.instruction_id,
                        "domain": instruction.domain,
                        "method": REJECTION_SAMPLING,
                        "prompt": list(chosen["prompt"]),
                        "chosen_node_id": chosen["node_id"],
                        "rejected_node_id": rejected["node_id"],
                        "chosen_text": chosen["text"],
                        "rejected_text": rejected["text"],
                        "chosen_score": chosen["score"],
                        "rejected_score": rejected["score"],
                        "margin": margin,
                        "shared_prefix_tokens": int(min(chosen["prompt_tokens"] or 0, rejected["prompt_tokens"] or 0)),
                        "difficulty": instruction.difficulty,
                        "pass_rate": rates[instruction.instruction_id],
                        "strategy": chosen["strategy"],
                        "model": chosen["model"],
                        "turn": chosen["turn"],
                    }
                )
    return pairs
