"""TEST-ONLY stand-in for the vllm package, backed by transformers on CPU; never shipped or installed.

vLLM needs a CUDA GPU, so tests put ``tests/stand_in_vllm`` on sys.path to run
our vLLM code through the same interface: ``LLM.generate`` with token-id prompts
and one image each, per-request seeds, stop token ids, logit bias and raw
log-probs. It is a simple, independent implementation (one sequence at a time,
its own sampling), not a copy of the transformers engine, so agreeing with it
means something. Behaviour it copies from vLLM V1:

* the prompt carries ONE image placeholder, expanded here as the HF processor
  expands it;
* candidate ``k`` of a request with ``seed`` samples with seed ``seed + k``;
* log-probs are the raw log-softmax of the model, before logit bias,
  temperature, top-k and top-p (``logprobs_mode="raw_logprobs"``);
* a stop token or EOS is kept in ``token_ids`` but not in ``text``;
  ``stop_reason`` is the stop token id, None for EOS.
"""
from __future__ import annotations

import asyncio
import copy
from types import SimpleNamespace
from typing import Optional, Sequence, Union

import torch

from vllm.inputs import TokensPrompt
from vllm.outputs import CompletionOutput, Logprob, RequestOutput
from vllm.sampling_params import SamplingParams
from vllm.utils import random_uuid

__version__ = "0.10.2"
__all__ = ["LLM", "AsyncStandInEngine", "AsyncEngineArgs", "AsyncLLMEngine", "SamplingParams", "RequestOutput",
           "CompletionOutput", "Logprob", "TokensPrompt"]


class LLM:
    """``LLM(model=path, ...)`` loads the checkpoint; ``LLM.from_loaded(model, processor)`` reuses one.

    Options that only concern a GPU engine (enable_prefix_caching, gpu_memory_utilization,
    limit_mm_per_prompt, ...) are accepted and kept in ``engine_kwargs`` for tests to inspect.
    """

    def __init__(self, model: str, *, dtype: str = "auto", trust_remote_code: bool = False,
                 max_model_len: Optional[int] = None, **engine_kwargs):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code)
        hf_model = AutoModelForImageTextToText.from_pretrained(
            model, dtype=dtype if dtype == "auto" else getattr(torch, dtype), trust_remote_code=trust_remote_code)
        self._setup(hf_model.eval(), processor, max_model_len)
        self.engine_kwargs = engine_kwargs

    @classmethod
    def from_loaded(cls, model, processor, max_model_len: Optional[int] = None) -> "LLM":
        llm = cls.__new__(cls)
        llm._setup(model, processor, max_model_len)
        llm.engine_kwargs = {}
        return llm

    def _setup(self, model, processor, max_model_len: Optional[int]) -> None:
        self.model, self.processor = model, processor
        self.tokenizer = processor.tokenizer
        text_config = getattr(model.config, "text_config", model.config)
        # vLLM's model_config: the checkpoint path and the context it serves (the HF limit by default)
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(
            model=model.name_or_path, max_model_len=max_model_len or text_config.max_position_embeddings))
        # vLLM stops at the tokenizer's EOS and at every EOS of the checkpoint's generation config
        generation_eos = model.generation_config.eos_token_id if model.generation_config else None
        eos = {generation_eos} if isinstance(generation_eos, int) else set(generation_eos or ())
        self.eos_ids = (eos | {self.tokenizer.eos_token_id}) - {None}
        self.image_token_id = model.config.image_token_id

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts: Union[TokensPrompt, Sequence[TokensPrompt]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        prompts = [prompts] if isinstance(prompts, dict) else list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(sampling_params)} sampling params")
        results = []
        for prompt, params in zip(prompts, sampling_params):
            if params.stop:
                raise NotImplementedError("the vllm stand-in does not implement stop strings; use stop_token_ids")
            ids, image_inputs = self._expand_image(prompt)
            max_model_len = self.llm_engine.model_config.max_model_len
            if len(ids) >= max_model_len:
                raise ValueError(f"The decoder prompt (length {len(ids)}) is longer than the maximum model length "
                                 f"of {max_model_len}.")
            outputs = self._complete(ids, image_inputs, params)
            results.append(RequestOutput(request_id=random_uuid(), prompt=None, prompt_token_ids=ids,
                                         prompt_logprobs=None, outputs=outputs, finished=True))
        return results

    def _expand_image(self, prompt: TokensPrompt) -> tuple[list[int], dict]:
        ids = list(prompt["prompt_token_ids"])
        image = (prompt.get("multi_modal_data") or {}).get("image")
        if image is None:
            return ids, {}
        if isinstance(image, list):  # vLLM takes one image or a list (OpenRLHF sends a list)
            if len(image) != 1:
                raise ValueError("limit_mm_per_prompt is {'image': 1}: give one image per prompt")
            image = image[0]
        places = [i for i, token in enumerate(ids) if token == self.image_token_id]
        if len(places) != 1:
            raise ValueError(f"expected one image placeholder (id {self.image_token_id}) in the prompt, "
                             f"found {len(places)}")
        processed = self.processor(images=image, text=self.processor.image_token, return_tensors="pt")
        n_image_tokens = int((processed.pop("input_ids") == self.image_token_id).sum())
        processed.pop("attention_mask", None)
        at = places[0]
        return ids[:at] + [self.image_token_id] * n_image_tokens + ids[at + 1:], dict(processed)

    @torch.inference_mode()
    def _complete(self, prompt_ids: list[int], image_inputs: dict, params: SamplingParams) -> list[CompletionOutput]:
        """The request's n candidates, decoded as one batch after one shared prefill."""
        from transformers import DynamicCache

        n = params.n
        generators = [torch.Generator() for _ in range(n)]
        for index, generator in enumerate(generators):
            if params.seed is None:
                generator.seed()
            else:
                generator.manual_seed(params.seed + index)
        stop_ids = set(params.stop_token_ids or ())
        ends = stop_ids | (set() if params.ignore_eos else self.eos_ids)
        room = self.llm_engine.model_config.max_model_len - len(prompt_ids)
        limit = room if params.max_tokens is None else min(params.max_tokens, room)
        cache = DynamicCache()
        out = self.model(input_ids=torch.tensor([prompt_ids]), past_key_values=cache, use_cache=True,
                         **image_inputs)
        cache.batch_repeat_interleave(n)
        logits = out.logits[:, -1].float().expand(n, -1)
        tokens: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[dict[int, Logprob]]] = [[] for _ in range(n)]
        stopped: list[Optional[int]] = [None] * n    # the stop token or EOS that ended each candidate
        for step in range(limit):
            logp = logits.log_softmax(-1)
            for k in range(n):
                if stopped[k] is not None:
                    continue
                token = self._draw(logits[k], params, ends if step < params.min_tokens else set(), generators[k])
                tokens[k].append(token)
                rank = int((logp[k] > logp[k, token]).sum()) + 1
                logprobs[k].append({token: Logprob(logp[k, token].item(), rank, self.tokenizer.decode([token]))})
                if token in ends:  # never before min_tokens: _draw masked them
                    stopped[k] = token
            if all(s is not None for s in stopped) or step == limit - 1:
                break
            # a finished candidate keeps feeding its last token; nothing it computes is read
            out = self.model(input_ids=torch.tensor([[row[-1]] for row in tokens]), past_key_values=cache,
                             use_cache=True)
            logits = out.logits[:, -1].float()
        return [self._completion(k, tokens[k], logprobs[k], stopped[k], stop_ids, params) for k in range(n)]

    def _completion(self, index: int, tokens: list[int], logprobs: list[dict[int, Logprob]], stopped: Optional[int],
                    stop_ids: set[int], params: SamplingParams) -> CompletionOutput:
        text_ids = tokens if stopped is None else tokens[:-1]
        return CompletionOutput(
            index=index, text=self.tokenizer.decode(text_ids, skip_special_tokens=params.skip_special_tokens),
            token_ids=tokens, cumulative_logprob=sum(d[t].logprob for d, t in zip(logprobs, tokens)),
            logprobs=logprobs if params.logprobs is not None else None,
            finish_reason="length" if stopped is None else "stop",
            stop_reason=stopped if stopped in stop_ids else None)

    @staticmethod
    def _draw(logits: torch.Tensor, params: SamplingParams, masked: set[int], generator: torch.Generator) -> int:
        """vLLM's order: logit bias (and min_tokens masking), temperature, top-k, top-p, then sample."""
        logits = logits.clone()
        for token, bias in (params.logit_bias or {}).items():
            logits[token] += bias
        if masked:
            logits[list(masked)] = float("-inf")
        if params.temperature < 1e-5:  # vLLM: temperature 0 is greedy
            return int(logits.argmax())
        logits = logits / params.temperature
        if 0 < params.top_k < logits.numel():
            logits[logits < logits.topk(params.top_k).values[-1]] = float("-inf")
        if params.top_p < 1.0:
            probs, order = logits.softmax(-1).sort(descending=True)
            beyond = probs.cumsum(-1) - probs >= params.top_p   # the mass before it already reaches top_p
            logits[order[beyond]] = float("-inf")
        return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


class AsyncStandInEngine:
    """What OpenRLHF's ``RolloutRayActor.generate`` offers agent executors, over a stand-in LLM."""

    def __init__(self, llm: LLM):
        self.llm = llm

    async def generate(self, prompt_token_ids: list[int], sampling_params: SamplingParams,
                       multi_modal_data: Optional[dict] = None) -> RequestOutput:
        prompt = TokensPrompt(prompt_token_ids=list(prompt_token_ids))
        if multi_modal_data:
            prompt["multi_modal_data"] = multi_modal_data
        outputs = await asyncio.to_thread(self.llm.generate, [prompt], [copy.deepcopy(sampling_params)],
                                          use_tqdm=False)
        return outputs[0]


class AsyncEngineArgs:
    """``vllm.AsyncEngineArgs(**kwargs)`` as OpenRLHF's RolloutRayActor builds it: the kwargs, kept."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs


class _OutputProcessor:
    def __init__(self):
        self.unfinished = 0

    def get_num_unfinished_requests(self) -> int:
        return self.unfinished


class AsyncLLMEngine:
    """The slice of ``vllm.AsyncLLMEngine`` OpenRLHF's RolloutRayActor uses to serve agent executors:
    ``from_engine_args``, ``is_sleeping``, ``generate`` (an async generator of RequestOutputs, here
    just the final one) and ``output_processor.get_num_unfinished_requests``. Requests run in threads,
    so concurrent ones overlap as they do in vLLM."""

    def __init__(self, llm: LLM):
        self.llm = llm
        self.output_processor = _OutputProcessor()

    @classmethod
    def from_engine_args(cls, args: AsyncEngineArgs) -> "AsyncLLMEngine":
        kwargs = dict(args.kwargs)
        model = kwargs.pop("model")
        # GPU-only options (placement, sleep mode, worker extensions) mean nothing here
        keep = {k: kwargs[k] for k in ("dtype", "trust_remote_code", "max_model_len") if k in kwargs}
        return cls(LLM(model=model, **keep))

    async def is_sleeping(self) -> bool:
        return False

    async def generate(self, prompt: TokensPrompt, sampling_params: SamplingParams, request_id: str):
        self.output_processor.unfinished += 1
        try:
            outputs = await asyncio.to_thread(self.llm.generate, [prompt], [copy.deepcopy(sampling_params)],
                                              use_tqdm=False)
        finally:
            self.output_processor.unfinished -= 1
        yield outputs[0]
