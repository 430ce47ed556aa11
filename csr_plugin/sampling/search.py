"""Sentence-level beam search with calibrated rewards (CSR, arXiv 2405.14622, sec. 3).

Every step expands all active beams of all prompts in one engine call (K
candidate sentences each), scores the candidates in one batch of the visual
term (CLIP, or the reward model's gain with reward.source: mrm), and keeps
per prompt the ``keep_top`` best and ``keep_bottom`` worst by cumulative score:
the bad beams are kept on purpose, they become the rejected responses.

A candidate that ends with EOS is a complete response and needs no beam slot:
it is recorded as final and never competes for one. A candidate that is only
EOS (or punctuation then EOS) adds no sentence, so instead its parent is marked
as a complete response.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Callable, Hashable, Mapping, Optional, Sequence, TypeVar

from csr_plugin.config import CurationConfig, RewardConfig, SearchConfig
from csr_plugin.reward.calibration import calibrated_reward, rank_fusion_reward
from csr_plugin.reward.instruction import instruction_score
from csr_plugin.reward.source import SentenceInContext, visual_scorer
from csr_plugin.sampling.engine import (WORD_CHARS, Continuation, EncodedPrompt, Expansion, SentenceEngine,
                                       stable_seed)


@dataclass
class Node:
    id: int
    parent: Optional[int]
    text: str
    token_ids: list[int]
    logprobs: list[float]
    r_t: float
    r_i: float
    reward: float
    final: bool = False
    finish: str = ""  # sentence | eos | length (cut at max_new_tokens) | max_sentences | context


@dataclass
class PromptJob:
    id: str
    image: str                # path as given in the prompts file, resolved
    question: str
    image_data: object        # PIL image, shared by the engine and CLIP
    encoded: EncodedPrompt
    # the templated prompt text when the caller has it (OpenRLHF's agent); the reward model of
    # reward.source: mrm then reads it as the policy did, instead of templating `question` itself
    prompt_text: Optional[str] = None


@dataclass
class SearchTree:
    id: str
    image: str
    prompt: str
    nodes: list[Node] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"id": self.id, "image": self.image, "prompt": self.prompt, "nodes": [asdict(n) for n in self.nodes]}


N = TypeVar("N")


def root_path(nodes: Mapping[int, N], node: N, parent: Callable[[N], Optional[int]]) -> list[N]:
    """The sentences of the response ending at ``node``: the nodes below the root down to it, in order.

    Works on `Node` objects (``parent=lambda n: n.parent``) and on trees.jsonl dicts
    (``parent=lambda n: n["parent"]``); a parent id missing from ``nodes`` raises KeyError.
    """
    path = []
    while (up := parent(node)) is not None:
        path.append(node)
        node = nodes[up]
    return path[::-1]


def record_path(nodes: Mapping[int, dict], node: dict) -> list[dict]:
    """`root_path` over a trees.jsonl record's nodes."""
    return root_path(nodes, node, lambda n: n["parent"])


def path_score(values: Sequence[float], length_normalize: bool) -> float:
    """Cumulative score of a response from its sentences' scores: the mean or the sum."""
    total = sum(values)
    return total / len(values) if length_normalize and values else total


_REPEATED_WORD = re.compile(r"(\b\w+\b)(?:\s+\1){5,}")       # one word 6+ times in a row
_REPEATED_CHAR = re.compile(r"(\S)(?:\s*\1){10,}")            # one character 11+ times in a row


def _normalised(text: str) -> str:
    return " ".join(text.lower().split())


def is_degenerate(text: str, earlier: Sequence[str]) -> bool:
    """The official code's degeneration filters, plus a sentence repeated within its response."""
    return bool(_REPEATED_WORD.search(text) or _REPEATED_CHAR.search(text) or text.count("\n") > 5
                or _normalised(text) in map(_normalised, earlier))


@dataclass
class _Beam:
    job: PromptJob
    tree: SearchTree
    active: list[int]
    prefix: dict[int, list[int]]          # node id -> response token ids up to and including it
    path_values: dict[int, list[float]]   # node id -> per-sentence values the pruning ranks by
    path_texts: dict[int, list[str]]


class SentenceBeamSearch:
    def __init__(self, engine: SentenceEngine, clip, search: SearchConfig, reward: RewardConfig,
                 curation: CurationConfig):
        self.engine = engine
        self.clip = clip
        self.visual = visual_scorer(clip)   # a ClipRelevance (or fake) still scores exactly as before
        self.search = search
        self.reward = reward
        self.curation = curation
        self.stats = {"candidates": 0, "filtered_short": 0, "filtered_degenerate": 0}

    def run(self, jobs: Sequence[PromptJob]) -> list[SearchTree]:
        beams = []
        for job in jobs:
            root = Node(id=0, parent=None, text="", token_ids=[], logprobs=[], r_t=0.0, r_i=0.0, reward=0.0)
            tree = SearchTree(id=job.id, image=job.image, prompt=job.question, nodes=[root])
            beams.append(_Beam(job, tree, active=[0], prefix={0: []}, path_values={0: []}, path_texts={0: []}))
        for depth in range(1, self.search.max_sentences + 1):
            live = [b for b in beams if b.active]
            if not live:
                break
            width = self.search.first_candidates if depth == 1 and self.search.first_candidates else \
                self.search.candidates
            requests = [Expansion(b.job.encoded, b.prefix[nid], width,
                                  seed=stable_seed(self.search.seed, b.job.id, nid))
                        for b in live for nid in b.active]
            results = iter(self.engine.expand(requests))
            scored = []
            for b in live:
                children = []
                for parent in b.active:
                    children.extend(self._accept(b, parent, next(results)))
                scored.append(children)
            self._score([(b, c) for b, cs in zip(live, scored) for c in cs])
            for b, children in zip(live, scored):
                self._prune(b, children, last_step=depth == self.search.max_sentences)
        return [b.tree for b in beams]

    # ------------------------------------------------------------------ steps
    def _accept(self, beam: _Beam, parent: int, continuations: list[Continuation]) -> list[Node]:
        """Candidate nodes from one beam's continuations, after the optional filters."""
        accepted = []
        for cont in continuations:
            self.stats["candidates"] += 1
            if cont.eos_only:
                if parent != 0:  # the response ending at the parent is complete
                    node = beam.tree.nodes[parent]
                    node.final, node.finish = True, "eos"
                continue
            # a sentence without a letter or digit gives CLIP nothing to score: always dropped
            if len(WORD_CHARS.findall(cont.text)) < max(self.search.min_sentence_chars, 1):
                self.stats["filtered_short"] += 1
                continue
            if self.search.drop_degenerate and is_degenerate(cont.text, beam.path_texts[parent]):
                self.stats["filtered_degenerate"] += 1
                continue
            accepted.append(Node(id=-1, parent=parent, text=cont.text, token_ids=cont.token_ids,
                                 logprobs=cont.logprobs, r_t=0.0, r_i=0.0, reward=0.0, finish=cont.finish))
        return accepted

    def _score(self, pairs: list[tuple[_Beam, Node]]) -> None:
        """R_T from each sentence's own log-probs, R_I in one batch of the visual term, then the calibrated reward."""
        if not pairs:
            return
        relevance = self.visual.visual([self._in_context(b, n) for b, n in pairs])
        for (_, node), r_i in zip(pairs, relevance):
            node.r_t = instruction_score(node.logprobs, self.reward.instruction_score)
            node.r_i = r_i
            node.reward = calibrated_reward(r_i, node.r_t, self.reward.lambda_)
        if self.reward.fusion == "rank":
            siblings: dict[tuple[int, Hashable], list[Node]] = {}
            for b, node in pairs:
                siblings.setdefault((id(b), node.parent), []).append(node)
            for group in siblings.values():
                fused = rank_fusion_reward([n.r_i for n in group], [n.r_t for n in group], self.reward.lambda_)
                for node, value in zip(group, fused):
                    node.reward = value

    @staticmethod
    def _in_context(beam: _Beam, node: Node) -> SentenceInContext:
        job = beam.job
        templated = job.prompt_text is not None
        return SentenceInContext(job.image, job.image_data, node.text.strip(),
                                 job.prompt_text if templated else job.question,
                                 tuple(beam.prefix[node.parent]), tuple(node.token_ids), templated,
                                 first=not beam.path_texts[node.parent])

    def _prune(self, beam: _Beam, children: list[Node], last_step: bool) -> None:
        pool = []
        for node in children:
            node.id = len(beam.tree.nodes)
            beam.tree.nodes.append(node)
            parent = node.parent
            beam.prefix[node.id] = beam.prefix[parent] + node.token_ids
            # online (paper): the calibrated reward guides the search; posthoc (official code): LM score only
            value = node.reward if self.search.calibration == "online" else node.r_t
            beam.path_values[node.id] = beam.path_values[parent] + [value]
            beam.path_texts[node.id] = beam.path_texts[parent] + [node.text]
            if node.finish == "eos":
                node.final = True
            else:
                pool.append(node)
        keep = self.select(pool, [path_score(beam.path_values[n.id], self.curation.length_normalize) for n in pool])
        beam.active = []
        context_left = self.engine.max_context - beam.job.encoded.length - self.search.max_new_tokens
        for node in keep:
            if last_step:
                node.final, node.finish = True, "max_sentences"
            elif len(beam.prefix[node.id]) > context_left:
                node.final, node.finish = True, "context"
            else:
                beam.active.append(node.id)

    def select(self, pool: list[Node], scores: list[float]) -> list[Node]:
        """Top ``keep_top`` and bottom ``keep_bottom`` of ``pool`` by score (all of it if it is small)."""
        if len(pool) <= self.search.keep_top + self.search.keep_bottom:
            return list(pool)
        order = sorted(range(len(pool)), key=lambda i: -scores[i])
        chosen = order[:self.search.keep_top] + order[len(order) - self.search.keep_bottom:]
        return [pool[i] for i in sorted(chosen)]
