"""The visual term R_I of sentences in context, from one object built by :func:`build_visual_scorer`.

``reward.source: clip`` (the paper): R_I(s) = max(100 * cos(F_I(image), F_T(s)), 0), the sentence alone.
``reward.source: mrm``: R_I(s_k) = mrm_scale * (r(x, y_<k + s_k) - r(x, y_<k)), the gain of a `csr
train-rm` reward model from the response prefix to prefix + sentence; r(x, y_<1) is the prompt with an
empty response. The search, the OpenRLHF agent and the response scorer all ask ``visual(items)``.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Hashable, Optional, Sequence

from csr_plugin.config import Recipe


@dataclass(frozen=True)
class SentenceInContext:
    image_key: Hashable                 # caches the image's encoding (its path)
    image: Any                          # PIL image
    text: str                           # the sentence as CLIP reads it (stripped)
    prompt: str = ""                    # the question, or the templated prompt when ``templated``
    prefix_ids: tuple[int, ...] = ()    # response token ids before the sentence
    sentence_ids: tuple[int, ...] = ()  # the sentence's own token ids (EOS included when it ended there)
    templated: bool = False
    first: bool = True                  # the response's first sentence: where an answer to a yes/no question is


class ClipVisual:
    """CLIP relevance of each sentence alone: exactly ClipRelevance.score (context is ignored)."""

    def __init__(self, clip):
        self.clip = clip

    def visual(self, items: Sequence[SentenceInContext]) -> list[float]:
        return self.clip.score([(i.image_key, i.image, i.text) for i in items])


def visual_scorer(obj):
    """``obj`` as a visual scorer: one already, or a CLIP-like object with ``score(triples)`` (tests, callers
    that still pass a ClipRelevance) wrapped so it scores exactly as before."""
    return obj if hasattr(obj, "visual") else ClipVisual(obj)


class SerialVisual:
    """One scorer shared by concurrent searches (the agent): its caches are not thread-safe."""

    def __init__(self, scorer):
        self.scorer = scorer
        self.lock = threading.Lock()

    @property
    def needs_ids(self) -> bool:
        return getattr(self.scorer, "needs_ids", False)

    def visual(self, items: Sequence[SentenceInContext]) -> list[float]:
        with self.lock:
            return self.scorer.visual(items)


class RewardModelVisual:
    """R_I as a reward model's gain. Per call: every prefix and prefix + sentence not scored yet goes
    through ONE forward (chunks of ``max_batch`` rows bound the memory); scores are cached by
    (image, prompt, response ids), so a node's score as a candidate is its children's prefix score and each
    prefix is scored once. Response ids are the policy's: `csr train-rm` trains on the sampled ids verbatim,
    so the reward model shares the policy's tokenizer."""

    needs_ids = True   # callers must fill prefix_ids / sentence_ids (CLIP reads the text alone)

    def __init__(self, model, processor, scale: float = 1.0, max_batch: int = 64, cache_size: int = 8192):
        self.model = model
        self.processor = processor
        self.scale = scale
        self.max_batch = max_batch
        self.forwards = 0   # RM forward passes run, for tests and logs
        tokenizer = getattr(processor, "tokenizer", processor)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.vocab = int(model.backbone.get_input_embeddings().weight.shape[0])
        self._scores: OrderedDict[tuple, float] = OrderedDict()
        self._prompts: OrderedDict[tuple, tuple[list[int], dict]] = OrderedDict()
        self._cache_size = cache_size

    def visual(self, items: Sequence[SentenceInContext]) -> list[float]:
        keys = [(self._prompt_key(i), i.prefix_ids, i.prefix_ids + i.sentence_ids) for i in items]
        found: dict[tuple, float] = {}
        todo: dict[tuple, SentenceInContext] = {}
        for item, (prompt, before, after) in zip(items, keys):
            for ids in (before, after):
                key = (prompt, ids)
                if key in self._scores:
                    self._scores.move_to_end(key)
                    found[key] = self._scores[key]
                else:
                    todo.setdefault(key, item)
        if todo:
            values = self.rewards([(item, key[1]) for key, item in todo.items()])
            for key, value in zip(todo, values):
                found[key] = value
                self._remember(self._scores, key, value)
        return [self.scale * (found[(p, after)] - found[(p, before)]) for p, before, after in keys]

    def rewards(self, rows: Sequence[tuple[SentenceInContext, tuple[int, ...]]]) -> list[float]:
        """r(x, response ids) per (item giving the prompt and image, response ids), unscaled, uncached."""
        import torch

        from csr_plugin.multimodal import batch_inputs

        out: list[float] = []
        device = next(self.model.parameters()).device
        dtype = self.model.head_weight_dtype()
        for start in range(0, len(rows), self.max_batch):
            chunk = rows[start:start + self.max_batch]
            encoded = [self._encode(item) for item, _ in chunk]
            ids = [prompt_ids + list(response) for (prompt_ids, _), (_, response) in zip(encoded, chunk)]
            if any(t >= self.vocab or t < 0 for _, response in chunk for t in response):
                raise ValueError(f"a token id is outside the reward model's vocabulary ({self.vocab}): reward.mrm "
                                 "must be trained from this policy's family (it reads the policy's token ids).")
            kwargs = {k: v.to(device) for k, v in batch_inputs(self.model.backbone.config, ids,
                                                               [inputs for _, inputs in encoded], self.pad_id).items()}
            if "pixel_values" in kwargs:
                kwargs["pixel_values"] = kwargs["pixel_values"].to(dtype)
            with torch.inference_mode():
                out.extend(self.model(**kwargs).tolist())
            self.forwards += 1
        return out

    @staticmethod
    def _prompt_key(item: SentenceInContext) -> tuple:
        return (item.image_key, item.prompt, item.templated)

    def _encode(self, item: SentenceInContext) -> tuple[list[int], dict]:
        key = self._prompt_key(item)
        if key not in self._prompts:
            from csr_plugin.multimodal import _IMAGE_KEYS, chat_prompt, encode_prompt

            if item.templated:   # OpenRLHF's templated text already holds any BOS, as in its rollout
                inputs = self.processor(images=item.image, text=item.prompt, add_special_tokens=False,
                                        return_tensors="pt")
                encoded = (inputs["input_ids"][0].tolist(), {k: v for k, v in inputs.items() if k in _IMAGE_KEYS})
            else:                # as `csr train-rm` encodes a pair's prompt
                encoded = encode_prompt(self.processor, chat_prompt(self.processor, item.prompt), item.image)
            self._remember(self._prompts, key, encoded, 64)
            return encoded
        self._prompts.move_to_end(key)
        return self._prompts[key]

    def _remember(self, cache: OrderedDict, key, value, size: Optional[int] = None) -> None:
        cache[key] = value
        if len(cache) > (size or self._cache_size):
            cache.popitem(last=False)


def chance_level_warning(info: dict, folder: str) -> Optional[str]:
    """A warning when the reward model's held-out accuracy (reward_model.json) is within 2 binomial standard
    errors of a coin flip: such a model ranks CSR's candidates at random, and the loop would learn from noise."""
    held = info.get("held_out") or {}
    n, acc = held.get("eval_pairs"), held.get("eval_acc")
    if not n or acc is None:
        return None
    bar = 0.5 + 2 * (0.25 / n) ** 0.5
    if acc > bar:
        return None
    return (f"WARNING: reward.mrm {folder} ranked {acc:.1%} of its {n} held-out pairs right, not above chance "
            f"(needs > {bar:.1%}): its rewards are mostly noise. Train it longer or with a higher rm.lr, on more "
            "pairs, or keep reward.source: clip (docs/reward-model.md).")


def load_mrm_visual(recipe: Recipe) -> RewardModelVisual:
    """The reward model of ``reward.mrm`` on ``clip.device`` (the device of the visual term)."""
    import json
    from pathlib import Path

    import torch

    from csr_plugin.accelerator import resolve_device
    from csr_plugin.reward_model.model import CONFIG_FILE, load_reward_model
    from csr_plugin.run_logs import say

    folder = Path(recipe.reward.mrm)
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"reward.mrm {recipe.reward.mrm!r} holds no {CONFIG_FILE}: give the final/ folder "
                                "`csr train-rm` wrote (e.g. runs/rm/final), or set reward.source: clip.")
    from transformers import AutoProcessor

    if warning := chance_level_warning(json.loads((folder / CONFIG_FILE).read_text()), recipe.reward.mrm):
        say(warning)
    device = resolve_device(recipe.clip.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    trust = recipe.model.trust_remote_code
    model = load_reward_model(folder, dtype=dtype, trust_remote_code=trust).to(device)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=trust)
    return RewardModelVisual(model, processor, recipe.reward.mrm_scale)


def build_visual_scorer(recipe: Recipe):
    """The visual term ``recipe.reward.source`` asks for: CLIP (``clip:``, its yes/no answers read as claims
    with ``reward.yes_no: claim``) or the reward model (``reward.mrm``)."""
    if recipe.reward.source == "mrm":
        return load_mrm_visual(recipe)
    from csr_plugin.reward.clip_relevance import ClipRelevance

    visual = ClipVisual(ClipRelevance(recipe.clip))
    if recipe.reward.yes_no == "claim":
        from csr_plugin.eval.objects import ObjectVocabulary
        from csr_plugin.reward.yes_no import ClaimVisual

        try:
            vocabulary = ObjectVocabulary.from_json(recipe.reward.claim_vocabulary)
        except (OSError, ValueError) as e:
            raise ValueError(f"reward.claim_vocabulary: {e}") from None
        visual = ClaimVisual(visual, vocabulary.objects, recipe.reward.claim_question, recipe.reward.claim_templates)
    return visual
