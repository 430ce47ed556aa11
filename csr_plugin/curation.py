"""Search trees -> preference pairs (CSR: chosen = best complete response, rejected = worst).

A response is the path from the root to a final node; its score is the mean
(``length_normalize``) or the sum of its sentences' calibrated rewards, each optionally
less the mean reward of the prompt's candidate sentences (``reward_baseline``). Pairs
are written in the conversational preference format TRL and OpenRLHF read, with
the sampled token ids beside the text: training on them reproduces exactly the
sequence the policy generated and the rewards were computed for (a response
tokenized apart from its prompt can start with another token, docs/data-contracts.md).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from csr_plugin.config import CurationConfig
from csr_plugin.jsonl import read_jsonl, write_jsonl_atomic
from csr_plugin.sampling.search import path_score, record_path

CUT_FINISHES = ("stop", "cut")   # responses ended by curation.stop_at_any_sentence, not by the search


@dataclass
class Response:
    text: str
    reward: float
    r_i: float      # mean image relevance of its sentences
    node_id: int
    token_ids: list[int]  # the sampled ids, EOS included when the model generated it in a kept node
    finish: str           # eos | max_sentences | context | stop or cut (ended by curation, trained with / without EOS)
    sentences: int = 0
    first_node: int = -1  # the node of its first sentence


@dataclass
class PreferencePair:
    id: str
    image: str
    question: str
    chosen: Response
    rejected: Response
    kind: str = "best_worst"   # or "go_on": the chosen response against its own early stop

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "kind": self.kind,
            "images": [self.image],
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.question}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": self.chosen.text}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": self.rejected.text}]}],
            "chosen_reward": self.chosen.reward,
            "rejected_reward": self.rejected.reward,
            "chosen_r_i": self.chosen.r_i,
            "rejected_r_i": self.rejected.r_i,
            "chosen_token_ids": self.chosen.token_ids,
            "rejected_token_ids": self.rejected.token_ids,
            "chosen_finish": self.chosen.finish,
            "rejected_finish": self.rejected.finish,
        }


def complete_responses(tree: dict, length_normalize: bool, reward_baseline: str = "none",
                       stop_at_any_sentence: bool = False, cut_finish: str = "stop") -> list[Response]:
    """Every complete response of a tree (trees.jsonl record) with its cumulative calibrated reward;
    with ``stop_at_any_sentence`` also every response cut after one of its sentences (finish
    ``cut_finish``: "stop", trained with EOS, or "cut", trained without)."""
    nodes = {node["id"]: node for node in tree["nodes"]}
    baseline = 0.0
    if reward_baseline == "prompt_mean":
        sentences = [node["reward"] for node in tree["nodes"] if node["parent"] is not None]
        baseline = sum(sentences) / len(sentences) if sentences else 0.0
    responses = []
    for node in tree["nodes"]:
        if node["parent"] is None or not (node["final"] or stop_at_any_sentence and node["finish"] == "sentence"):
            continue
        try:
            path = record_path(nodes, node)
        except KeyError as missing:
            raise ValueError(f"tree {tree.get('id')!r}: node {node['id']} has a missing ancestor {missing}.") from None
        responses.append(Response(
            text="".join(n["text"] for n in path).strip(),
            reward=path_score([n["reward"] - baseline for n in path], length_normalize),
            r_i=sum(n["r_i"] for n in path) / len(path),
            node_id=node["id"],
            token_ids=[t for n in path for t in n["token_ids"]],
            finish=node["finish"] if node["final"] else cut_finish,
            sentences=len(path), first_node=path[0]["id"]))
    return responses


def curate_tree(tree: dict, cfg: CurationConfig, control_ids: frozenset[int] = frozenset()
                ) -> tuple[Optional[PreferencePair], str]:
    """(pair, "") or (None, why it was skipped): the best-worst pair only."""
    pairs, reason = curate_tree_pairs(tree, cfg, control_ids)
    return (pairs[0] if pairs else None), reason


def curate_tree_pairs(tree: dict, cfg: CurationConfig, control_ids: frozenset[int] = frozenset()
                      ) -> tuple[list[PreferencePair], str]:
    """The tree's best-worst pair, then its go-on pair when ``cfg.go_on_pairs``; ([], why) if none.

    ``control_ids`` (multimodal.control_token_ids): a pair whose responses hold one is refused, since
    training cannot take a sampled image or video token (the engines never sample them; trees from
    elsewhere, or from before that rule, may hold them)."""
    responses = complete_responses(tree, cfg.length_normalize, cfg.reward_baseline, cfg.stop_at_any_sentence,
                                   "stop" if cfg.stop_with_eos else "cut")
    if len(responses) < 2:
        return [], "fewer than 2 complete responses"
    chosen = max(responses, key=lambda r: r.reward)
    others = [r for r in responses if r.text != chosen.text]
    if not others:
        return [], "chosen and rejected texts are identical"
    if cfg.rejected == "lowest_same_length":
        # the nearest sentence count first: the pair then differs in what it says, not in how much
        rejected = min(others, key=lambda r: (abs(r.sentences - chosen.sentences), r.reward))
    elif cfg.rejected == "lowest_same_start":
        same_start = [r for r in others if r.first_node == chosen.first_node]
        rejected = min(same_start or others, key=lambda r: r.reward)
    else:
        rejected = min(others, key=lambda r: r.reward)
    if chosen.text == rejected.text:
        return [], "chosen and rejected texts are identical"
    if chosen.reward - rejected.reward < cfg.min_margin:
        return [], f"reward margin below curation.min_margin={cfg.min_margin}"
    sampled_control = control_ids.intersection(chosen.token_ids + rejected.token_ids)
    if sampled_control:
        return [], f"a response holds a multimodal control token (id {min(sampled_control)}), which training cannot take"
    pairs = [PreferencePair(tree["id"], tree["image"], tree["prompt"], chosen, rejected)]
    if cfg.go_on_pairs:
        early = _lowest_early_stop(responses, chosen)
        if (early is not None and early.text != rejected.text
                and chosen.reward - early.reward > max(cfg.min_margin, 0.0)
                and not control_ids.intersection(early.token_ids)):
            pairs.append(PreferencePair(tree["id"], tree["image"], tree["prompt"], chosen, early, kind="go_on"))
    return pairs, ""


def _lowest_early_stop(responses: list[Response], chosen: Response) -> Optional[Response]:
    """The lowest-scoring response that is the chosen one cut after an earlier sentence, if any.

    The chosen response scores at least as high as each of its prefixes, so what the cut drops
    scores above the baseline: the pair teaches to go on while there is more to see. It is the
    counterpart of a best-worst pair whose chosen side stopped before a hallucination, which
    alone teaches stopping early whatever the image holds."""
    prefixes = [r for r in responses if r.finish in CUT_FINISHES and r.sentences < chosen.sentences
                and chosen.token_ids[:len(r.token_ids)] == r.token_ids]
    return min(prefixes, key=lambda r: r.reward) if prefixes else None


@dataclass
class CurationSummary:
    pairs: int
    skipped: Counter

    def __str__(self) -> str:
        lines = [f"curated {self.pairs} pairs; skipped {sum(self.skipped.values())} trees"]
        lines += [f"  skipped {count}: {reason}" for reason, count in self.skipped.most_common()]
        return "\n".join(lines)


def curate_file(trees_path: str | Path, out_path: str | Path, cfg: CurationConfig,
                control_ids: frozenset[int] = frozenset()) -> CurationSummary:
    """trees.jsonl -> pairs JSONL, written atomically (rerunning rewrites the same file)."""
    trees_path = Path(trees_path)
    if not trees_path.is_file():
        raise FileNotFoundError(f"trees file {str(trees_path)!r} not found; run `csr sample` first.")
    pairs, skipped = [], Counter()
    for _, tree, problem in read_jsonl(trees_path):
        if tree is None:
            skipped[problem.split(" is ")[-1]] += 1  # a torn line from a killed run, for instance
            continue
        try:
            tree_pairs, reason = curate_tree_pairs(tree, cfg, control_ids)
        except (KeyError, TypeError, ValueError) as exc:
            tree_pairs, reason = [], f"malformed tree ({type(exc).__name__}: {exc})"
        if not tree_pairs:
            skipped[reason] += 1
        pairs += [pair.to_json() for pair in tree_pairs]
    write_jsonl_atomic(out_path, pairs)
    return CurationSummary(len(pairs), skipped)
