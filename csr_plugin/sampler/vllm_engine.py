"""Sentence engine on vLLM (>= 0.10, V1 engine), same contract as the transformers engine.

One ``expand`` is one ``llm.generate`` call: every (prompt, prefix) becomes a
request of ``n`` candidates that stop at a sentence-end token, EOS or
``max_new_tokens``. With prefix caching on, a prompt's image and response prefix
are computed once and shared by its candidates and by the next search step
(vLLM hashes the image into the cache key, so prompts with different images never
share blocks).

Log-probs: vLLM V1 reports raw log-probs, the model's own log-softmax before
temperature, top-p, penalties and logit bias (``logprobs_mode="raw_logprobs"``,
the default). That is the distribution R_T is defined on, as in the transformers
engine.

:class:`VllmSentenceRules` holds everything that is not the ``LLM`` itself, so
code that drives its own vLLM engines (OpenRLHF's rollout actors) builds its
requests and reads its outputs the same way. Importing this module never imports
vllm; :func:`import_vllm` does, when an engine is built.
"""
from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

from csr_plugin.config import ModelConfig, SearchConfig
from csr_plugin.multimodal import chat_prompt
from csr_plugin.sampler.engine import Continuation, EncodedPrompt, Expansion, FinishReason, never_sampled_ids
from csr_plugin.sampler.sentence_end import sentence_end_token_ids
from csr_plugin.sampler.transformers_engine import PromptTooLongError, TransformersEngine, _max_context


def import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(f"search.engine: vllm needs the vllm package ({exc}): pip install vllm (needs a CUDA GPU); "
                          "or set search.engine: transformers.") from exc
    return vllm


def _reject_group_beam(search: SearchConfig) -> None:
    if search.decoding == "group_beam":
        raise ValueError("search.decoding: group_beam is not available with search.engine: vllm (vLLM has no "
                         "diverse group beam search); use decoding: sample or engine: transformers.")


class VllmSentenceRules:
    """How a search expansion becomes vLLM sampling params, and a vLLM output becomes continuations."""

    # The same text bookkeeping as the transformers engine (it reads only self.tokenizer), so a
    # node's text never depends on which engine produced it.
    _decode_text = TransformersEngine._decode_text

    def __init__(self, tokenizer, search: SearchConfig, eos_ids: set[int], banned_ids: set[int]):
        self.tokenizer = tokenizer
        self.search = search
        self.eos_ids = set(eos_ids)
        self.banned_ids = set(banned_ids)
        # EOS is left to vLLM's own EOS handling, so its finish stays distinguishable from a sentence end.
        self.stop_ids = sentence_end_token_ids(tokenizer, search.delimiters) - self.eos_ids

    def sampling_params(self, expansion: Expansion, base=None, sampling_params_cls=None):
        """SamplingParams for one expansion; ``base`` (e.g. OpenRLHF's) keeps its temperature/top-p/top-k."""
        _reject_group_beam(self.search)
        if base is not None:
            params = copy.deepcopy(base)
        else:
            cls = sampling_params_cls or import_vllm().SamplingParams
            params = cls(temperature=self.search.temperature, top_p=self.search.top_p)
        params.n = expansion.n
        # vLLM seeds candidate k with seed + k: a request draws the same whatever shares the batch.
        params.seed = expansion.seed
        params.max_tokens = self.search.max_new_tokens
        # V1 checks stop_token_ids itself at every step, so setting them after construction is enough.
        params.stop_token_ids = sorted(self.stop_ids)
        # A bare EOS candidate is how the search learns a response is complete: OpenRLHF's default
        # min_tokens=1 would forbid it.
        params.min_tokens = 0
        params.logprobs = 0  # the sampled token's log-prob only
        params.skip_special_tokens = True
        # Image placeholder, pad and bos must never be sampled: one in a prefix would break the next
        # prefill. -100 is vLLM's strongest bias.
        params.logit_bias = {token: -100.0 for token in sorted(self.banned_ids)} or None
        return params

    def continuations(self, request_output, prefix_ids: list[int]) -> list[Continuation]:
        """One Continuation per candidate of ``request_output``, in candidate order."""
        results = []
        for output in sorted(request_output.outputs, key=lambda o: o.index):
            token_ids = list(output.token_ids)
            logprobs = [step[token].logprob for step, token in zip(output.logprobs, token_ids)]
            # vLLM keeps the EOS in token_ids; it adds no text.
            text_ids = token_ids[:-1] if token_ids and token_ids[-1] in self.eos_ids else token_ids
            results.append(Continuation(token_ids=token_ids, logprobs=logprobs,
                                        text=self._decode_text(prefix_ids, text_ids),
                                        finish=self._finish(output, token_ids)))
        return results

    def _finish(self, output, token_ids: list[int]) -> FinishReason:
        last = token_ids[-1] if token_ids else None
        # stop_reason None on a "stop" is vLLM's own EOS (one we may not list, e.g. from the HF config).
        if last in self.eos_ids or (output.finish_reason == "stop" and output.stop_reason is None):
            return "eos"
        # The last token decides over "length": some vLLM versions test the length limit before stop
        # tokens, and the transformers engine calls a sentence ending on the last allowed token a sentence.
        if output.finish_reason == "length" and last not in self.stop_ids:
            return "length"
        return "sentence"


def _checkpoint_eos_ids(llm) -> set[int]:
    """EOS ids of the checkpoint's generation_config.json, which vLLM stops at as well."""
    from transformers import GenerationConfig

    path = getattr(_model_config(llm), "model", None)
    if not path:
        return set()
    try:
        eos = GenerationConfig.from_pretrained(path).eos_token_id
    except (OSError, ValueError):  # no generation_config.json: the tokenizer's EOS is all there is
        return set()
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)


def _model_config(llm):
    return getattr(getattr(llm, "llm_engine", None), "model_config", None)


class VllmEngine:
    def __init__(self, llm, processor, search: SearchConfig):
        self.llm = llm
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.search = search
        self.max_context = self._max_context()
        eos_ids = _checkpoint_eos_ids(llm)
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        if not eos_ids:
            raise ValueError("the model's tokenizer defines no EOS token; set eos_token in its tokenizer config.")
        banned = never_sampled_ids(self.tokenizer, eos_ids, self._image_token_id(), len(self.tokenizer))
        self.rules = VllmSentenceRules(self.tokenizer, search, eos_ids, banned)

    @classmethod
    def from_config(cls, model_cfg: ModelConfig, search: SearchConfig, **llm_kwargs) -> "VllmEngine":
        """vllm.LLM for ``model_cfg.path``; ``llm_kwargs`` (max_model_len, gpu_memory_utilization, ...) go to it."""
        _reject_group_beam(search)  # before loading a model onto the GPU
        vllm = import_vllm()
        local = Path(model_cfg.path).expanduser()
        if not local.exists() and (model_cfg.path.startswith((".", "/", "~")) or model_cfg.path.count("/") > 1):
            raise FileNotFoundError(f"model.path {model_cfg.path!r} does not exist; give a local HF model folder "
                                    "or hub id.")
        from transformers import AutoProcessor

        # Our "auto" means bfloat16 on GPU; vLLM's own "auto" would turn a float32 checkpoint into float16.
        dtype = "bfloat16" if model_cfg.dtype == "auto" else model_cfg.dtype
        llm = vllm.LLM(model=model_cfg.path, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code,
                       enable_prefix_caching=True, limit_mm_per_prompt={"image": 1}, seed=search.seed, **llm_kwargs)
        processor = AutoProcessor.from_pretrained(model_cfg.path, trust_remote_code=model_cfg.trust_remote_code)
        return cls(llm, processor, search)

    def _max_context(self) -> int:
        model_config = _model_config(self.llm)
        limit = getattr(model_config, "max_model_len", None)
        if isinstance(limit, int) and limit > 0:
            return limit
        hf_config = getattr(model_config, "hf_config", None) or SimpleNamespace()
        return _max_context(SimpleNamespace(config=hf_config), self.tokenizer)

    def _image_token_id(self):
        token_id = getattr(self.processor, "image_token_id", None)
        if token_id is None and getattr(self.processor, "image_token", None):
            token_id = self.tokenizer.convert_tokens_to_ids(self.processor.image_token)
        return token_id

    def prompt_text(self, question: str) -> str:
        return chat_prompt(self.processor, question)

    def encode_prompt(self, question: str, image) -> EncodedPrompt:
        text = self.prompt_text(question)
        # The ids vLLM itself would make of this text: ONE image placeholder, which vLLM expands.
        token_ids = self.tokenizer(text)["input_ids"]
        # The context limit applies to the expanded prompt, so measure it as the HF processor expands it.
        expanded = len(self.processor(images=image, text=text)["input_ids"][0])
        if expanded + self.search.max_new_tokens > self.max_context:
            raise PromptTooLongError(
                f"prompt is {expanded} tokens with its image; with search.max_new_tokens="
                f"{self.search.max_new_tokens} it exceeds the model's context of {self.max_context}. "
                "Shorten the question.")
        return EncodedPrompt(token_ids=token_ids, image_inputs={"image": image}, context_length=expanded)

    def expand(self, requests: Sequence[Expansion]) -> list[list[Continuation]]:
        if not requests:
            return []
        prompts = [{"prompt_token_ids": r.prompt.token_ids + r.prefix_ids, "multi_modal_data": r.prompt.image_inputs}
                   for r in requests]
        params = [self.rules.sampling_params(r) for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [self.rules.continuations(out, r.prefix_ids) for out, r in zip(outputs, requests)]
