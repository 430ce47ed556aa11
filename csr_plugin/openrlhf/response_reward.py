"""CSR's calibrated reward of a whole response, for OpenRLHF's reward hooks.

CSR (arXiv 2405.14622) rewards sentences: R(s) = lambda * R_I(s) + (1 - lambda) * R_T(s).
OpenRLHF takes one scalar per response (dense rewards are not supported), so a
response is cut into sentences the way the search cuts them, each sentence is
scored as in the search, and the response gets their mean
(``curation.length_normalize: true``) or their sum.

R_T comes from the recipe's ``model.path``, a frozen reward model, not from the
actor being trained. Its per-token log-probs come from ONE teacher-forced
forward per batch: prompt ids (the processor expands the image placeholder)
followed by the response ids, right-padded so every real token keeps its
position, with the family's per-token inputs built for the full rows.

A response that comes with the ids the policy sampled (``ResponseItem.response_ids``)
is scored on exactly those ids: the text is re-tokenized only when no ids are
given, and a re-tokenized response can differ from the sampled one (a SentencePiece
tokenizer writes "▁There" at a word start but "The" "re" after ':').

Tokens are mapped to sentences by character offsets (a fast tokenizer's
``offset_mapping``, or for given ids the length each token adds to the decoded
text): a token belongs to the sentence its first character falls in. That
matches the search, where a sentence ends at the token carrying the delimiter
and the next sentence's leading space rides on its first word; it is also
linear, where decoding every cumulative prefix is quadratic per response.
"""
from __future__ import annotations

import functools
import json
import math
import re
from bisect import bisect_right
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

from csr_plugin.config import Recipe
from csr_plugin.reward import calibrated_reward, instruction_score
from csr_plugin.reward.source import SentenceInContext, visual_scorer
from csr_plugin.sampling.sentence_end import sentence_spans

# Distinct images kept decoded (and prompts kept encoded): a PPO batch revisits each
# prompt n_samples_per_prompt times, close together.
_CACHE_SIZE = 64


@dataclass(frozen=True)
class ResponseItem:
    prompt_text: str    # the templated prompt as OpenRLHF decodes it, image placeholder included
    response_text: str  # ignored when response_ids is given (the text is decoded from them)
    image: str          # image path
    response_ids: Optional[tuple[int, ...]] = None  # the sampled ids, when the caller has them


@dataclass
class ScoredResponse:
    reward: float
    sentences: list[dict]  # {text, r_t, r_i, reward} per sentence

    @property
    def r_i(self) -> float:
        """Mean image relevance of the sentences (0.0 for an empty response), for logging."""
        return math.fsum(s["r_i"] for s in self.sentences) / len(self.sentences) if self.sentences else 0.0

    @property
    def r_t(self) -> float:
        """Mean instruction score of the sentences (0.0 for an empty response), for logging."""
        return math.fsum(s["r_t"] for s in self.sentences) / len(self.sentences) if self.sentences else 0.0


def token_offsets(tokenizer, ids: Sequence[int], context: int = 6) -> list[tuple[int, int]]:
    """Character span of each token in ``tokenizer.decode(ids, skip_special_tokens=True)``.

    A token's text is what it adds to the decode of the few tokens before it (linear; a
    SentencePiece "▁" piece keeps its space after context, and loses it first in both
    decodes alike). Where that does not rebuild the whole decode (a character split over
    byte tokens), every prefix is decoded instead.
    """
    decode = functools.partial(tokenizer.decode, skip_special_tokens=True)
    ids = list(ids)
    text, pieces = decode(ids), []
    for k in range(len(ids)):
        start = max(0, k - context)
        before, upto = decode(ids[start:k]), decode(ids[start:k + 1])
        if not upto.startswith(before):
            break
        pieces.append(upto[len(before):])
    if len(pieces) != len(ids) or "".join(pieces) != text:
        lengths = [len(decode(ids[:k])) for k in range(len(ids) + 1)]
        return [(a, b) for a, b in zip(lengths, lengths[1:])]
    spans, pos = [], 0
    for piece in pieces:
        spans.append((pos, pos + len(piece)))
        pos += len(piece)
    return spans


def response_from_query(query: str, prompt: str, image_token: str | None) -> str:
    """The response inside OpenRLHF's ``query`` (its prompt + response tokens decoded).

    For a VLM the decoded query holds the processor's expansion of the image
    placeholder (LLaVA-1.5: 576 ``<image>``), so runs of the image token are
    collapsed on both sides before the prefix is compared.
    """
    if query.startswith(prompt):
        return query[len(prompt):]
    if image_token:
        collapse = re.compile(f"(?:{re.escape(image_token)})+")
        query, prompt = collapse.sub(image_token, query), collapse.sub(image_token, prompt)
        if query.startswith(prompt):
            return query[len(prompt):]
    raise ValueError(f"query does not start with its prompt {prompt[:80]!r}; send the decoded prompt + response "
                     "as the query and the prompt text unchanged, as OpenRLHF does.")


def image_from_label(label: Any) -> str:
    """The image path a label carries: JSON ``{"image": "<path>"}`` (or that dict) or a plain path."""
    image = label
    if isinstance(label, str) and label.lstrip().startswith("{"):
        try:
            label = json.loads(label)
        except json.JSONDecodeError as exc:
            raise ValueError(f"label {label[:80]!r} is not valid JSON ({exc}); give {{\"image\": \"<path>\"}} "
                             "or a plain image path.") from None
    if isinstance(label, dict):
        image = label.get("image")
    if not isinstance(image, str) or not image.strip():
        raise ValueError(f"label {str(label)[:80]!r} carries no image; give {{\"image\": \"<path>\"}} "
                         "or a plain image path.")
    return image.strip()


def openrlhf_items(queries: Any, prompts: Any, labels: Any, image_token: str | None) -> list[ResponseItem]:
    """OpenRLHF's (query, prompts, labels) lists -> items, with errors that name the bad input."""
    for name, value in (("query", queries), ("prompts", prompts), ("labels", labels)):
        if not isinstance(value, list):
            raise ValueError(f"`{name}` must be a list, got {type(value).__name__}.")
    if not len(queries) == len(prompts) == len(labels):
        raise ValueError(f"`query`, `prompts` and `labels` must have one entry per response, got "
                         f"{len(queries)}, {len(prompts)} and {len(labels)}.")
    items = []
    for i, (query, prompt, label) in enumerate(zip(queries, prompts, labels)):
        if not isinstance(query, str) or not isinstance(prompt, str):
            raise ValueError(f"entry {i}: query and prompt must be strings, got {type(query).__name__} "
                             f"and {type(prompt).__name__}.")
        try:
            items.append(ResponseItem(prompt, response_from_query(query, prompt, image_token),
                                      image_from_label(label)))
        except ValueError as exc:
            raise ValueError(f"entry {i}: {exc}") from None
    return items


def _require_paper_fusion(recipe: Recipe) -> None:
    if recipe.reward.fusion != "paper":
        raise ValueError(f"reward.fusion: {recipe.reward.fusion} ranks sibling candidates against each other, which "
                         "a lone response does not have; set reward.fusion: paper for the OpenRLHF reward.")


class ResponseRewardScorer:
    """Scores whole responses; not thread-safe (feed it from one thread, see reward_server.BatchingScorer)."""

    def __init__(self, model, processor, clip, recipe: Recipe):
        _require_paper_fusion(recipe)
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.clip = clip
        self.visual = visual_scorer(clip)   # a ClipRelevance (or fake) still scores exactly as before
        self.reward = recipe.reward
        self.delimiters = list(recipe.search.delimiters)
        self.length_normalize = recipe.curation.length_normalize
        self.image_token: str | None = getattr(processor, "image_token", None)
        self.special_ids = set(self.tokenizer.all_special_ids)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id
        # vLLM output is decoded with skip_special_tokens=False: the EOS text ends most responses.
        specials = "|".join(re.escape(t) for t in self.tokenizer.all_special_tokens if t)
        self._trailing_special = re.compile(rf"(?:{specials}|\s)+\Z" if specials else r"\s+\Z")
        from csr_plugin.sampling.prompts import load_image

        # lru_cache is thread-safe: HTTP handlers pre-load images to reject bad ones early.
        self.image = functools.lru_cache(maxsize=_CACHE_SIZE)(load_image)
        self._encode_prompt = functools.lru_cache(maxsize=_CACHE_SIZE)(self._encode_prompt_uncached)

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> "ResponseRewardScorer":
        from csr_plugin.reward.source import build_visual_scorer
        from csr_plugin.sampling.transformers_engine import load_vlm

        _require_paper_fusion(recipe)  # before minutes of model loading
        visual = build_visual_scorer(recipe)   # a bad reward.mrm fails before the VLM loads
        model, processor = load_vlm(recipe.model)
        return cls(model, processor, visual, recipe)

    def score(self, items: Sequence[ResponseItem]) -> list[ScoredResponse]:
        """Calibrated reward per response: one VLM forward and one CLIP batch for all of ``items``."""
        results = [ScoredResponse(0.0, []) for _ in items]
        live = [(i, self._strip_end(item)) for i, item in enumerate(items)]
        live = [(i, item) for i, item in live if item.response_text.strip()]
        if not live:
            return results
        token_logprobs = self._response_logprobs([item for _, item in live])
        sentences = [self._sentences(item.response_text, offsets, logprobs)
                     for (_, item), (offsets, logprobs) in zip(live, token_logprobs)]
        contexts = [self._in_context(items[i], item, offsets, [text for text, _ in group])
                    for (i, item), (offsets, _), group in zip(live, token_logprobs, sentences)]
        r_i = iter(self.visual.visual([c for group in contexts for c in group]))
        for (i, _), group in zip(live, sentences):
            scored = []
            for text, logprobs in group:
                r_t = instruction_score(logprobs, self.reward.instruction_score)
                relevance = next(r_i)
                scored.append({"text": text, "r_t": r_t, "r_i": relevance,
                               "reward": calibrated_reward(relevance, r_t, self.reward.lambda_)})
            total = math.fsum(s["reward"] for s in scored)
            results[i] = ScoredResponse(total / len(scored) if self.length_normalize else total, scored)
        return results

    def _in_context(self, original: ResponseItem, item: ResponseItem, offsets: Sequence[tuple[int, int]],
                    texts: list[str]) -> list[SentenceInContext]:
        """Each sentence with the response ids before it and its own ids (the reward model's gain needs them).

        A sentence's tokens are those `_sentences` gives it (token indices grouped like the log-probs); the
        end-of-turn ids `_strip_end` removed go back on the last sentence, as the search's last sentence
        carries its EOS (text-only items have no ids to give back)."""
        image = self.image(item.image)
        if not getattr(self.visual, "needs_ids", False):   # CLIP reads the text alone: no tokenizing
            return [SentenceInContext(item.image, image, text, item.prompt_text, templated=True, first=k == 0)
                    for k, text in enumerate(texts)]
        ids = list(item.response_ids) if item.response_ids is not None else \
            self.tokenizer(item.response_text, add_special_tokens=False)["input_ids"]
        tail = list(original.response_ids[len(ids):]) if original.response_ids is not None else []
        ends, end = [], 0
        for _, indices in self._sentences(item.response_text, offsets, list(range(len(offsets)))):
            end = max([end, *(k + 1 for k in indices)])
            ends.append(end)
        if ends:
            ends[-1] = len(ids)   # tokens of a whitespace-only tail are in no sentence: the last one keeps them
        out, start = [], 0
        for k, (text, end) in enumerate(zip(texts, ends)):
            out.append(SentenceInContext(item.image, image, text, item.prompt_text, tuple(ids[:start]),
                                         tuple(ids[start:end]) + (tuple(tail) if k == len(texts) - 1 else ()),
                                         templated=True, first=k == 0))
            start = end
        return out

    def _strip_end(self, item: ResponseItem) -> ResponseItem:
        """Without the EOS that ends most responses (text or ids): it belongs to no sentence."""
        if item.response_ids is None:
            return replace(item, response_text=self._trailing_special.sub("", item.response_text))
        ids = list(item.response_ids)
        while ids and ids[-1] in self.special_ids:
            ids.pop()
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return replace(item, response_ids=tuple(ids), response_text=text)

    def _sentences(self, text: str, offsets: Sequence[tuple[int, int]],
                   logprobs: Sequence[float]) -> list[tuple[str, list[float]]]:
        """(sentence text, its tokens' log-probs); tokens of a whitespace-only tail are in no sentence."""
        spans = sentence_spans(text, self.delimiters)
        starts = [start for start, _ in spans]
        groups: list[list[float]] = [[] for _ in spans]
        for (token_start, _), logprob in zip(offsets, logprobs):
            k = bisect_right(starts, token_start) - 1
            if k >= 0 and token_start < spans[k][1]:
                groups[k].append(logprob)
        merged: list[list] = []
        for (start, end), group in zip(spans, groups):
            if group or not merged:
                merged.append([start, end, group])
            else:  # no token starts here: the token covering it began in the previous sentence
                merged[-1][1] = end
        return [(text[start:end].strip(), group) for start, end, group in merged]

    def _encode_prompt_uncached(self, prompt_text: str, image_path: str) -> tuple[list[int], dict]:
        # add_special_tokens=False as OpenRLHF's rollout: the templated text already holds any BOS.
        inputs = self.processor(images=self.image(image_path), text=prompt_text, add_special_tokens=False,
                                return_tensors="pt")
        token_ids = inputs.pop("input_ids")[0].tolist()
        # per-token tensors cover the prompt only: batch_inputs rebuilds them for prompt + response
        return token_ids, {k: v for k, v in inputs.items()
                           if k not in ("attention_mask", "token_type_ids", "mm_token_type_ids")}

    def _response_logprobs(self, items: Sequence[ResponseItem]) -> list[tuple[list, list[float]]]:
        """Per item: (character offsets, log-prob) of each response token, from one teacher-forced forward."""
        import torch

        from csr_plugin.multimodal import batch_inputs

        encoded = [self._encode_prompt(item.prompt_text, item.image) for item in items]
        texts = [i for i, item in enumerate(items) if item.response_ids is None]
        tokenized = self.tokenizer([items[i].response_text for i in texts], add_special_tokens=False,
                                   return_offsets_mapping=True) if texts else {"input_ids": [], "offset_mapping": []}
        responses = {"input_ids": [], "offset_mapping": []}
        by_text = dict(zip(texts, zip(tokenized["input_ids"], tokenized["offset_mapping"])))
        for i, item in enumerate(items):
            ids, offsets = by_text[i] if i in by_text else (list(item.response_ids),
                                                            token_offsets(self.tokenizer, item.response_ids))
            responses["input_ids"].append(ids)
            responses["offset_mapping"].append(offsets)
        rows = [prompt_ids + response_ids for (prompt_ids, _), response_ids in zip(encoded, responses["input_ids"])]
        device = next(self.model.parameters()).device
        # Right padding keeps every real token at its position; per-image tensors are batched (tiles
        # padded) and per-token ones (token types, Qwen's M-RoPE positions) built for the full rows.
        kwargs = {k: v.to(device) for k, v in batch_inputs(self.model.config, rows, [inputs for _, inputs in encoded],
                                                           self.pad_id, padding_side="right").items()}
        if "pixel_values" in kwargs:
            kwargs["pixel_values"] = kwargs["pixel_values"].to(self.model.dtype)
        # Only positions that predict a response token go through the LM head: vocabulary-wide
        # logits over hundreds of image tokens per prompt would dominate memory.
        first = min(len(prompt_ids) for prompt_ids, _ in encoded) - 1
        keep = torch.arange(first, kwargs["input_ids"].shape[1] - 1, device=device)
        with torch.inference_mode():
            logits = self.model(**kwargs, logits_to_keep=keep).logits
            out = []
            for i, ((prompt_ids, _), response_ids) in enumerate(zip(encoded, responses["input_ids"])):
                start = len(prompt_ids) - 1 - first
                logp = logits[i, start:start + len(response_ids)].float().log_softmax(-1)
                targets = torch.tensor(response_ids, device=device)[:, None]
                out.append((responses["offset_mapping"][i], logp.gather(-1, targets).squeeze(-1).tolist()))
        return out
