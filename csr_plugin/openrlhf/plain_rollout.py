"""``search.candidates: 1`` and ``beam_width: 1``: one plain vLLM rollout, split into sentences afterwards.

With one candidate and one beam the sentence-level search is on-policy sampling, but run
sentence by sentence it costs one request per sentence and it censors what it samples: a
sentence without a letter or digit was dropped, the only beam died and the response was
empty. Here the whole response is one request (OpenRLHF's temperature / top-p / top-k and
min_tokens, no sentence stop tokens, EOS as usual, budget ``max_new_tokens * max_sentences``),
and every generated token is kept: the response is cut into sentences (``sentence_spans``),
each scored as the search scores one, R_T from its own tokens' log-probs.

A stretch without a letter or digit ("...", a lone bullet, trailing whitespace, the EOS) is
not a sentence of its own: it joins the sentence before it (the first one when it leads),
so the sentences partition the generated tokens exactly. A response with no letter or digit
at all has no sentence and earns nothing (docs/ppo.md, "The step reward").
"""
from __future__ import annotations

import copy
from typing import Sequence

from csr_plugin.config import Recipe
from csr_plugin.reward.calibration import calibrated_reward
from csr_plugin.reward.instruction import instruction_score
from csr_plugin.reward.source import SentenceInContext, visual_scorer
from csr_plugin.sampling.engine import WORD_CHARS, added_text, stable_seed
from csr_plugin.sampling.search import Node, PromptJob, SearchTree
from csr_plugin.sampling.sentence_end import sentence_spans


def is_plain(recipe: Recipe) -> bool:
    return recipe.search.candidates == 1 and recipe.search.beam_width == 1


def sentence_token_ends(tokenizer, ids: Sequence[int], delimiters: Sequence[str], eos_ids: set[int]) -> list[int]:
    """Exclusive token ends of the sentences of the generated ``ids``; the last is ``len(ids)``, [] without any.

    Token-exact: a sentence ends with the token that completes its delimiter (a merged '.\\n'
    token belongs to the sentence it ends). Prefixes are decoded as a whole, as the search's
    ``added_text`` does, since SentencePiece drops a leading space of a piece decoded alone.
    """
    text_ids = list(ids[:-1]) if ids and ids[-1] in eos_ids else list(ids)
    decode = lambda toks: tokenizer.decode(toks, skip_special_tokens=True)  # noqa: E731
    full = decode(text_ids)
    char_ends: list[int] = []
    for start, end in sentence_spans(full, delimiters):
        if WORD_CHARS.search(full[start:end]):
            char_ends.append(end)
        elif char_ends:  # no word of its own: it joins the sentence before it
            char_ends[-1] = end
    if not char_ends:
        return []
    token_ends, i = [], 0
    for end in char_ends[:-1]:
        # the first prefix whose text reaches the sentence end; a prefix that splits a multi-byte
        # character decodes to a replacement character and is no prefix of the text: skip it
        while i < len(text_ids) and not _reaches(decode(text_ids[:i]), full, end):
            i += 1
        if i < len(text_ids) and (not token_ends or i > token_ends[-1]):
            token_ends.append(i)
    return token_ends + [len(ids)]


def _reaches(prefix: str, full: str, end: int) -> bool:
    return len(prefix) >= end and full.startswith(prefix)


def plain_params(base, recipe: Recipe, seed_key: str, budget: int, banned_ids: set[int]):
    """OpenRLHF's sampling params for the whole response: one sample, seeded, with log-probs, never
    sampling the image placeholder / pad / bos (one in the response would break the training forward)."""
    from vllm.sampling_params import RequestOutputKind

    params = copy.deepcopy(base)
    params.n = 1
    params.output_kind = RequestOutputKind.FINAL_ONLY
    params.seed = stable_seed(recipe.search.seed, seed_key, 0)
    params.max_tokens = budget
    params.logprobs = 0  # the sampled token's log-prob: R_T, and OpenRLHF's rollout log-probs
    params.logit_bias = {token: -100.0 for token in sorted(banned_ids)} or None
    return params


def response_tree(job: PromptJob, tokenizer, ids: list[int], logprobs: list[float], finish: str, recipe: Recipe,
                  visual, eos_ids: set[int]) -> SearchTree:
    """A one-path tree: the root, then one node per sentence, whose token ids partition ``ids``; scored."""
    if recipe.reward.fusion != "paper":
        raise ValueError("reward.fusion: rank ranks sibling candidates, and a plain rollout (search.candidates: 1) "
                         "has none; set reward.fusion: paper.")
    root = Node(id=0, parent=None, text="", token_ids=[], logprobs=[], r_t=0.0, r_i=0.0, reward=0.0)
    tree = SearchTree(id=job.id, image=job.image, prompt=job.question, nodes=[root])
    ends = sentence_token_ends(tokenizer, ids, recipe.search.delimiters, eos_ids)
    start = 0
    for end in ends:
        sentence = ids[start:end]
        text_ids = sentence[:-1] if sentence[-1] in eos_ids else sentence
        tree.nodes.append(Node(id=len(tree.nodes), parent=len(tree.nodes) - 1,
                               text=added_text(tokenizer, ids[:start], text_ids), token_ids=sentence,
                               logprobs=logprobs[start:end], r_t=0.0, r_i=0.0, reward=0.0, finish="sentence"))
        start = end
    nodes = tree.nodes[1:]
    if nodes:
        nodes[-1].final, nodes[-1].finish = True, finish
    items, prefix = [], []
    for node in nodes:
        items.append(SentenceInContext(job.image, job.image_data, node.text.strip(), job.prompt_text or job.question,
                                       tuple(prefix), tuple(node.token_ids), job.prompt_text is not None,
                                       first=not items))
        prefix += node.token_ids
    for node, r_i in zip(nodes, visual_scorer(visual).visual(items) if items else []):
        node.r_i = r_i
        node.r_t = instruction_score(node.logprobs, recipe.reward.instruction_score)
        node.reward = calibrated_reward(r_i, node.r_t, recipe.reward.lambda_)
    return tree
