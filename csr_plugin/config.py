"""Recipes: YAML files mapped onto typed, validated config dataclasses.

A recipe is read with ``yaml.safe_load``, overridden by ``key.sub=value`` pairs
from the command line, then built into :class:`Recipe`. Unknown keys, wrong
types and out-of-range values raise :class:`ConfigError` naming the key path,
the value received and the fix, before any model is loaded.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A recipe key is unknown, mistyped or out of range. ``unknown_key``: the dotted key a recipe or an
    override named that does not exist (for the CLI's OpenRLHF-flag hints), else None."""

    unknown_key: Optional[str] = None


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


def _at_least(section: Any, where: str, minimum: int, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(section, name) < minimum:
            raise ConfigError(f"`{where}.{name}` must be >= {minimum}, got {getattr(section, name)}.")


@dataclass
class ModelConfig:
    path: str = _help("HF VLM folder or hub id (AutoModelForImageTextToText + AutoProcessor).", default="")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _help(
        "Weights dtype; auto = bfloat16 on GPU, float32 on CPU.", default="auto")
    device: str = _help("torch device for the transformers engine; auto = cuda if available.", default="auto")
    trust_remote_code: bool = _help("Allow model code from the checkpoint. Off unless you trust it.", default=False)

    def validate(self, where: str) -> None:
        if not self.path:
            raise ConfigError(f"`{where}.path` is required: a local HF model folder or a hub id.")


@dataclass
class ClipConfig:
    model: str = _help("open_clip model name, e.g. ViT-L-14-336.", default="ViT-L-14-336")
    pretrained: Optional[str] = _help("open_clip pretrained tag (openai) or a local weights file.", default="openai")
    config: Optional[str] = _help("Local open_clip model-config JSON; registers `model` from this file.", default=None)
    device: str = _help("torch device for CLIP; auto = cuda if available.", default="auto")
    cache_images: int = _help("How many image embeddings to keep cached (one per image is enough).", default=1024)

    def validate(self, where: str) -> None:
        if self.cache_images < 1:
            raise ConfigError(f"`{where}.cache_images` must be >= 1, got {self.cache_images}.")


@dataclass
class DataConfig:
    prompts: str = _help("Prompts JSONL with {id, image, question}; relative images resolve against its folder.",
                         default="prompts.jsonl")
    limit: Optional[int] = _help("Use only the first N prompts (null = all).", default=None)
    truth: str = _help("Optional ground truth of these prompts, JSONL {id, objects}: the pair diagnostics then "
                       "add CHAIR of chosen and rejected responses (the object vocabulary is eval.vocabulary).",
                       default="")

    def validate(self, where: str) -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"`{where}.limit` must be >= 1 or null, got {self.limit}.")


@dataclass
class RewardConfig:
    lambda_: float = _help("Weight of CLIP image relevance in the calibrated reward (paper: 0.9).", default=0.9)
    fusion: Literal["paper", "rank"] = _help(
        "paper: lambda*R_I + (1-lambda)*R_T on raw scores; rank: the official code's sibling-rank fusion.",
        default="paper")
    instruction_score: Literal["mean", "sum"] = _help(
        "R_T from the sentence's token log-probs: mean (length-normalised, like the official code) or sum.",
        default="mean")
    source: Literal["clip", "mrm"] = _help(
        "The visual term R_I: clip (CLIP image relevance, the paper) or mrm (the gain of a `csr train-rm` reward "
        "model from the response prefix to prefix + sentence; docs/reward-model.md).", default="clip")
    mrm: str = _help("The reward model's final/ folder (`csr train-rm` output); required with source: mrm.",
                     default="")
    mrm_scale: float = _help("R_I = mrm_scale * (r(prefix + sentence) - r(prefix)); 1 keeps the gain in nats, "
                             "the unit of R_T.", default=1.0)
    yes_no: Literal["off", "claim"] = _help(
        "A yes/no answer to an object question: off (CLIP reads the answer itself, as the paper; 'Yes.' names "
        "nothing) or claim (CLIP reads the claim: R_I(yes) = c(object) - b, R_I(no) = b - c(object), c the mean "
        "R_I of claim_templates, b the image's mean c over claim_vocabulary; reward/yes_no.py).", default="off")
    claim_vocabulary: str = _help('Objects JSON ({"objects": {name: [forms]}}, as eval.vocabulary) whose claims '
                                  "set the yardstick b; required with yes_no: claim.", default="")
    claim_question: str = _help("Regex (case-insensitive) finding an object question in the prompt; its group "
                                "'object' is the object asked about.",
                                default=r"\bis there an? (?P<object>[a-z][a-z -]*?) in the (?:image|picture|photo)\?")
    claim_templates: list = _help(
        "The claims CLIP reads for an object, {object} replaced; an object's score is their mean (a prompt "
        "ensemble, as CLIP zero-shot classifiers use).", default_factory=lambda: ["There is a {object}."])

    def validate(self, where: str) -> None:
        if not 0.0 <= self.lambda_ <= 1.0:
            raise ConfigError(f"`{where}.lambda` must be in [0, 1], got {self.lambda_}.")
        if self.source == "mrm" and not self.mrm:
            raise ConfigError(f"`{where}.mrm` is required with `{where}.source: mrm`: give the final/ folder "
                              "`csr train-rm` wrote, or set source: clip.")
        if not self.mrm_scale > 0:
            raise ConfigError(f"`{where}.mrm_scale` must be > 0, got {self.mrm_scale}.")
        if self.yes_no == "claim":
            self._validate_claim(where)

    def _validate_claim(self, where: str) -> None:
        if self.source != "clip":
            raise ConfigError(f"`{where}.yes_no: claim` reads claims with CLIP: set `{where}.source: clip` or "
                              f"`{where}.yes_no: off`.")
        if not self.claim_vocabulary:
            raise ConfigError(f"`{where}.claim_vocabulary` is required with `{where}.yes_no: claim`: give an "
                              'objects JSON ({"objects": {"cat": ["cats"]}}), e.g. the one eval.vocabulary uses.')
        try:
            question = re.compile(self.claim_question)
        except re.error as e:
            raise ConfigError(f"`{where}.claim_question` is not a valid regex: {e}.") from None
        if "object" not in question.groupindex:
            raise ConfigError(f"`{where}.claim_question` needs a group named 'object', e.g. "
                              f"'is there an? (?P<object>[a-z ]+?) in the image', got {self.claim_question!r}.")
        if not isinstance(self.claim_templates, list) or not self.claim_templates or \
                not all(isinstance(t, str) and "{object}" in t for t in self.claim_templates):
            raise ConfigError(f"`{where}.claim_templates` must be a non-empty list of strings each containing "
                              f"{{object}}, e.g. ['a photo of a {{object}}.'], got {self.claim_templates!r}.")


@dataclass
class SearchConfig:
    beam_width: int = _help("Beams carried from one sentence to the next; must equal keep_top + keep_bottom.",
                            default=3)
    candidates: int = _help("Candidate next sentences generated from each beam (K).", default=5)
    first_candidates: int = _help(
        "Candidates for the first sentence, sampled from the prompt alone (0 = candidates). The first step has "
        "one beam where later steps have beam_width, so beam_width x candidates spends the same per step; the "
        "first sentence sets what the description is about, and a prior the model learned (a trigger object "
        "named first) can fill all K samples (docs/method.md).", default=0)
    keep_top: int = _help("Beams kept with the highest cumulative score.", default=1)
    keep_bottom: int = _help("Beams kept with the lowest cumulative score (they yield the rejected responses).",
                             default=2)
    max_sentences: int = _help("Sentences per response before the search stops it.", default=8)
    max_new_tokens: int = _help("Tokens per sentence before it is cut.", default=70)
    calibration: Literal["online", "posthoc"] = _help(
        "online: the calibrated reward guides pruning (paper); posthoc: the LM score prunes, CLIP only picks the "
        "pair (official code).", default="online")
    decoding: Literal["sample", "group_beam", "pargs"] = _help(
        "sample: temperature/top-p sampling; group_beam: diverse group beam search, one beam per group "
        "(official code); pargs: PARGS reward-guided sampling with search.rm (search.pargs; "
        "docs/reward-model.md).", default="sample")
    temperature: float = _help("Sampling temperature (decoding: sample; pargs: divides the policy's logits "
                               "before w * reward is added).", default=1.0)
    top_p: float = _help("Nucleus sampling mass (decoding: sample; pargs takes search.pargs.top_k instead).",
                         default=1.0)
    rm: str = _help("Reward model folder (`csr train-rm` final/, rm.partial: true) for decoding: pargs; "
                    "`csr sample --rm` sets it.", default="")
    pargs: PargsConfig = field(default_factory=lambda: PargsConfig())
    diversity_penalty: float = _help("Group beam search diversity penalty (official: 3.0).", default=3.0)
    delimiters: list = _help("Characters that end a sentence; matched inside merged tokens too.",
                             default_factory=lambda: [".", "!", "?"])
    min_sentence_chars: int = _help("Drop candidate sentences with fewer letters/digits than this (0 = off).",
                                    default=0)
    drop_degenerate: bool = _help(
        "Drop degenerate candidates as the official code does: a word 6+ times in a row, a character 11+ times "
        "in a row, more than 5 line breaks, or a sentence already in its response.", default=False)
    batch_prompts: int = _help("Prompts searched together; all their beams share one engine call per step.",
                               default=8)
    max_batch_tokens: int = _help(
        "KV budget of one transformers-engine decode, in tokens: each prompt's KV once (its rows share it) plus "
        "every row's own prefix and new tokens. A step needing more is split into batches within it (same "
        "trees); an out-of-memory error halves it, logged once. 0 = from free GPU memory at start (60%), or "
        "4 GiB worth on CPU.", default=0)
    engine: Literal["transformers", "vllm"] = _help("Generation engine.", default="transformers")
    vllm: dict = _help(
        "vLLM engine arguments (vllm.EngineArgs names) for search.engine: vllm and `csr sample --ray --openrlhf`, "
        "e.g. {max_model_len: 4096, gpu_memory_utilization: 0.8}. On vLLM's CPU build the defaults are "
        "enforce_eager: true, enable_chunked_prefill: false, kv_cache_memory_bytes: 1 GiB; on a GPU "
        "gpu_memory_utilization: search.vllm_gpu_memory and max_model_len: the model's context.", default_factory=dict)
    vllm_gpu_memory: float = _help(
        "Share of the GPU vLLM takes (its gpu_memory_utilization, weights + KV cache) with search.engine: vllm and "
        "`csr sample --ray --openrlhf`. vLLM refuses to start unless that share is free; the rest is for CLIP or "
        "reward.mrm on the same GPU (a 7B reward model in bf16 needs about 16 GB: 0.7 on an 80 GB card).",
        default=0.7)
    seed: int = _help("Random seed for sampling.", default=0)
    stop_after_failures: int = _help(
        "Stop `csr sample` when this many prompts in a row fail with the same error (a setup problem such as "
        "an unsupported model or a wrong image folder); 0 = never stop, set them all aside.", default=10)

    def validate(self, where: str) -> None:
        _at_least(self, where, 1, ("beam_width", "candidates", "max_sentences", "max_new_tokens", "batch_prompts"))
        _at_least(self, where, 0, ("keep_top", "keep_bottom", "min_sentence_chars", "stop_after_failures",
                                   "first_candidates"))
        if self.keep_top + self.keep_bottom != self.beam_width:
            raise ConfigError(
                f"`{where}.beam_width` ({self.beam_width}) must equal keep_top + keep_bottom "
                f"({self.keep_top} + {self.keep_bottom}); set beam_width: {self.keep_top + self.keep_bottom}.")
        if self.temperature <= 0:
            raise ConfigError(f"`{where}.temperature` must be > 0, got {self.temperature}; "
                              "use decoding: group_beam for deterministic candidates.")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"`{where}.top_p` must be in (0, 1], got {self.top_p}.")
        if self.diversity_penalty < 0:
            raise ConfigError(f"`{where}.diversity_penalty` must be >= 0, got {self.diversity_penalty}.")
        if not self.delimiters or not all(isinstance(d, str) and d for d in self.delimiters):
            raise ConfigError(f"`{where}.delimiters` must be a non-empty list of non-empty strings, "
                              f"got {self.delimiters!r}.")
        if not 0.0 < self.vllm_gpu_memory < 1.0:
            raise ConfigError(f"`{where}.vllm_gpu_memory` must be in (0, 1), got {self.vllm_gpu_memory}; it is the "
                              "share of the GPU vLLM takes (e.g. 0.7).")
        if self.max_batch_tokens < 0:
            raise ConfigError(f"`{where}.max_batch_tokens` must be >= 0 (0 = from free memory), "
                              f"got {self.max_batch_tokens}.")
        if self.decoding == "pargs" and not self.rm:
            raise ConfigError(f"`{where}.decoding` is pargs: set `{where}.rm` (or `csr sample --rm`) to a reward "
                              "model folder from `csr train-rm`, or use decoding: sample.")
        if self.decoding == "pargs" and self.engine == "vllm":
            raise ConfigError(f"`{where}.decoding: pargs` needs `{where}.engine: transformers`: vLLM cannot run "
                              f"the reward model at every token. Set {where}.engine: transformers (or keep vllm "
                              f"with {where}.decoding: sample).")


@dataclass
class CurationConfig:
    min_margin: float = _help("Drop pairs whose chosen-minus-rejected reward is below this.", default=0.0)
    length_normalize: bool = _help("Score a response by the mean sentence reward (true) or the sum (false).",
                                   default=True)
    reward_baseline: Literal["none", "prompt_mean"] = _help(
        "With the sum: prompt_mean counts each sentence by how far its calibrated reward is above the mean "
        "of all candidate sentences sampled for the same prompt, so a sentence below the average (typically "
        "a hallucinated one) lowers the response's score and length alone earns nothing; none = raw rewards "
        "(the paper).", default="none")
    stop_at_any_sentence: bool = _help(
        "Also consider every response cut after one of its sentences (trained with EOS): stopping becomes a "
        "scored choice, so a chosen response can end before the sentence where every sampled continuation "
        "hallucinated. false = complete responses only (the paper).", default=False)
    stop_with_eos: bool = _help(
        "With stop_at_any_sentence: train a cut response with EOS (finish \"stop\": the pair also teaches "
        "stopping there) or without it (finish \"cut\", like a length limit: the pair teaches what was said, "
        "and ending is left to the model).", default=True)
    rejected: Literal["lowest", "lowest_same_length", "lowest_same_start"] = _help(
        "lowest: the lowest-scoring response (the paper); lowest_same_length: the lowest among those with the "
        "chosen one's sentence count (the nearest count if none), so DPO learns what to say, not how much; "
        "lowest_same_start: the lowest among those that begin with the chosen one's first sentence (the lowest "
        "of all if none does), so the pair differs where the two responses part, not in an opening the model "
        "already gets right.", default="lowest")
    go_on_pairs: bool = _help(
        "With stop_at_any_sentence and prompt_mean: also pair each chosen response against itself cut after an "
        "earlier sentence (the lowest-scoring such cut), when what the cut drops scores above the baseline. A "
        "best-worst pair whose chosen side stops before a hallucination teaches stopping whatever the image "
        "holds; this pair teaches going on while the image holds more. false = one pair per prompt (the paper).",
        default=False)

    def validate(self, where: str) -> None:
        if self.reward_baseline != "none" and self.length_normalize:
            raise ConfigError(f"`{where}.reward_baseline: {self.reward_baseline}` changes nothing with "
                              f"`{where}.length_normalize: true` (a constant shifts every mean alike): set "
                              f"`{where}.length_normalize: false`.")
        if self.go_on_pairs and not (self.stop_at_any_sentence and self.reward_baseline == "prompt_mean"):
            raise ConfigError(f"`{where}.go_on_pairs: true` needs `{where}.stop_at_any_sentence: true` (the cut "
                              f"responses) and `{where}.reward_baseline: prompt_mean` (without a baseline every "
                              f"sentence adds reward, so the pair would teach length, not content).")


@dataclass
class DPOConfig:
    pairs: str = _help("Preference pairs JSONL (conversational format with images); `csr run` sets it per "
                       "iteration.", default="")
    loss: Literal["dpo", "ipo", "tdpo1", "tdpo2"] = _help("Preference loss.", default="dpo")
    beta: float = _help("KL strength beta (official CSR: 0.1).", default=0.1)
    alpha: float = _help("TDPO2 weight of the sequential KL term.", default=0.5)
    label_smoothing: float = _help("Conservative DPO label smoothing (0 = plain DPO).", default=0.0)
    nll_loss_coef: float = _help(
        "Weight of the chosen responses' negative log-likelihood (mean per token) added to the preference loss "
        "(OpenRLHF's --model.nll_loss_coef; RPO, Pang et al. 2024). It keeps the model producing what the chosen "
        "responses say, so DPO cannot lower hallucination only by saying less. With sft_data both terms are "
        "added. 0 = plain DPO.", default=0.0)
    sft_data: str = _help(
        "Supervised examples JSONL ({images, prompt, response}, training/sft_mix.py) mixed into DPO: each DPO "
        "micro-batch adds the policy's mean NLL per answer token on as many SFT examples, weighted by sft_coef. It "
        "keeps what the model answers about objects the pairs never contrast (recall, yes/no) while DPO removes "
        "hallucinations. Empty = off.", default="")
    sft_coef: float = _help("Weight of the SFT NLL when sft_data is set (added to nll_loss_coef x chosen NLL).",
                            default=1.0)
    zero_stage: int = _help("DeepSpeed ZeRO stage: 3 partitions parameters, 2 only optimizer state and "
                            "gradients.", default=3)
    zero3_init: Literal["auto", "on", "off"] = _help(
        "With zero_stage 3, load the policy and reference straight into their ZeRO-3 partitions (transformers' "
        "HfDeepSpeedConfig / DeepSpeed zero.Init), so no rank builds the whole model in memory. off = every "
        "rank loads the whole model and DeepSpeed partitions it when training starts (full fine-tuning ends with "
        "the same weights). auto = on whenever zero_stage is 3, on CPU (gloo) and GPU alike; on = the same, "
        "refused for zero_stage < 3.",
        default="auto")
    nproc: int = _help("Processes `csr train-dpo` starts on this machine (GPUs, or CPU ranks with gloo).",
                       default=2)
    hostfile: Optional[str] = _help("DeepSpeed hostfile for multi-node runs (see docs/distributed.md).",
                                    default=None)
    master_port: Optional[int] = _help(
        "Rendezvous port. null = a free port found at launch, so two runs on one machine never collide; set it "
        "when a firewall allows only known ports.", default=None)
    lr: float = _help("Peak learning rate.", default=5.0e-7)
    lr_scheduler: str = _help("transformers scheduler name.", default="cosine_with_min_lr")
    warmup_ratio: float = _help("Fraction of steps for LR warm-up.", default=0.03)
    weight_decay: float = _help("AdamW weight decay.", default=0.0)
    max_norm: float = _help("Gradient clipping norm.", default=1.0)
    epochs: int = _help("Passes over the pairs.", default=1)
    micro_batch: int = _help("Pairs per process per forward.", default=1)
    batch: int = _help("Pairs per optimizer step, all processes together.", default=8)
    max_len: int = _help("Longest prompt + response in tokens; longer responses are cut.", default=2048)
    lora_rank: int = _help("LoRA rank (0 = full fine-tuning; official CSR: 128).", default=0)
    lora_alpha: int = _help("LoRA alpha (official CSR: 256).", default=16)
    lora_dropout: float = _help("LoRA dropout.", default=0.0)
    lora_targets: list = _help("Modules LoRA adapts; all-linear = every linear layer of the language model.",
                               default_factory=lambda: ["all-linear"])
    freeze_vision: bool = _help("Keep the vision tower frozen (the projector and LM train).", default=True)
    gradient_checkpointing: bool = _help("Recompute activations in backward to save memory.", default=False)
    dtype: Literal["auto", "bf16", "fp32"] = _help("auto = bf16 on GPU, fp32 on CPU.", default="auto")
    attn_implementation: str = _help("transformers attention: sdpa, eager, flash_attention_2.", default="sdpa")
    ckpt_steps: int = _help("Save a resumable DeepSpeed checkpoint (ds_ckpt/) every N optimizer steps, "
                            "OpenRLHF's --ckpt.save_steps (0 = none while training).", default=20)
    keep_ds_ckpt: bool = _help("Keep ds_ckpt/ (weights, optimizer and scheduler state) when the run finishes, "
                               "with the last step saved; false removes it, as it only serves to resume the run.",
                               default=False)
    hf_ckpt_steps: int = _help(
        "Also save an HF checkpoint every N optimizer steps to hf_ckpt/global_step<N>/ (0 = off): like OpenRLHF's "
        "--ckpt.save_hf with --ckpt.save_steps, but its own interval and folder, saved as final/ is (lora_merge, "
        "hub key layout, .complete marker).", default=0)
    lora_merge: bool = _help("With lora_rank > 0: merge the adapter into the weights (in the model's own dtype), "
                             "so final/ is a plain HF checkpoint; false keeps the PEFT adapter in final/ "
                             "(load with peft on top of the base model; `csr run` needs true).", default=True)
    kl_chunk: int = _help("Positions per chunk when TDPO computes its per-position KL (bounds memory).",
                          default=256)
    seed: int = _help("Data order and initialisation seed.", default=42)
    openrlhf: dict = _help(
        "OpenRLHF train_dpo flags passed verbatim, dotted or nested ({ds.adam_offload: true}); refused when a key "
        "above sets the flag or csr's DPO worker does not act on it (docs/openrlhf.md).", default_factory=dict)

    def validate(self, where: str) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"`{where}.zero_stage` must be 0, 1, 2 or 3, got {self.zero_stage}.")
        if self.zero3_init == "on" and self.zero_stage != 3:
            raise ConfigError(f"`{where}.zero3_init: on` loads the model into ZeRO-3 partitions, but "
                              f"`{where}.zero_stage` is {self.zero_stage}: set zero_stage: 3, or zero3_init: auto.")
        _at_least(self, where, 1, ("nproc", "epochs", "micro_batch", "batch", "max_len", "kl_chunk"))
        _at_least(self, where, 0, ("lora_rank", "ckpt_steps", "hf_ckpt_steps", "weight_decay", "max_norm"))
        if not self.lora_merge and self.lora_rank == 0:
            raise ConfigError(f"`{where}.lora_merge: false` keeps a LoRA adapter, but `{where}.lora_rank` is 0 "
                              f"(full fine-tuning, no adapter): set `{where}.lora_rank` > 0 or remove lora_merge.")
        if self.beta <= 0 or self.lr <= 0:
            raise ConfigError(f"`{where}.beta` and `{where}.lr` must be > 0, got {self.beta} and {self.lr}.")
        if self.nll_loss_coef < 0:
            raise ConfigError(f"`{where}.nll_loss_coef` must be >= 0, got {self.nll_loss_coef}.")
        if self.sft_data and self.sft_coef <= 0:
            raise ConfigError(f"`{where}.sft_coef` must be > 0 with `{where}.sft_data` set, got {self.sft_coef}; "
                              f"remove sft_data to train without SFT examples.")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"`{where}.label_smoothing` must be in [0, 0.5), got {self.label_smoothing}.")
        if self.master_port is not None and not 1024 <= self.master_port <= 65535:
            raise ConfigError(f"`{where}.master_port` must be in [1024, 65535] or null (a free port), "
                              f"got {self.master_port}.")
        if self.batch % self.micro_batch:
            raise ConfigError(f"`{where}.batch` ({self.batch}) must be a multiple of micro_batch "
                              f"({self.micro_batch}) times the number of processes.")


@dataclass
class RewardModelConfig:
    """`csr train-rm`: a multimodal Bradley-Terry reward model (VLM backbone + scalar head), docs/reward-model.md."""
    pairs: str = _help("Preference pairs JSONL (the format of dpo.pairs) to train on; `csr train-rm --pairs` "
                       "overrides it (OpenRLHF's --data.dataset).", default="")
    head: Literal["linear", "mlp2"] = _help(
        "Head on the last non-padding token's final hidden state: linear = Linear(hidden, 1) (OpenRLHF's value "
        "head, --ds.value_head_prefix score); mlp2 = Linear(hidden, hidden) -> SiLU -> Linear(hidden, 1) "
        "(BaseReward).", default="linear")
    margin: float = _help("Bradley-Terry margin m in -log sigmoid(r_chosen - r_rejected - m), for every pair "
                          "(OpenRLHF's --model.margin_loss_enable takes it per pair from the data). 0 = plain BT.",
                          default=0.0)
    partial: bool = _help("PARGS: train on chosen and rejected cut at the same response token count, every cut "
                          "length of every pair once per epoch (docs/reward-model.md); false = full responses.",
                          default=False)
    eval_fraction: float = _help("Share of the pairs held out (chosen by a hash of the pair id, the same on every "
                                 "run) for the per-epoch held-out accuracy in rm_metrics.jsonl; 0 = none.",
                                 default=0.1)
    nproc: int = _help("Processes `csr train-rm` starts on this machine (GPUs, or CPU ranks with gloo).", default=2)
    hostfile: Optional[str] = _help("DeepSpeed hostfile: the deepspeed launcher starts the ranks on the listed "
                                    "nodes (docs/distributed.md); rm.nproc is then not used.", default=None)
    master_port: Optional[int] = _help(
        "Rendezvous port. null = a free port found at launch, so two runs on one machine never collide; set it "
        "when a firewall allows only known ports.", default=None)
    zero_stage: int = _help("DeepSpeed ZeRO stage (OpenRLHF's --ds.zero_stage).", default=3)
    lr: float = _help("Peak learning rate, cosine schedule with 3% warm-up (OpenRLHF's --adam.lr).", default=9.0e-6)
    epochs: int = _help("Passes over the training pairs (OpenRLHF's --train.max_epochs).", default=1)
    micro_batch: int = _help("Pairs per process per forward (OpenRLHF's --train.micro_batch_size).", default=1)
    batch: int = _help("Pairs (with rm.partial: cut pairs) per optimizer step, all processes together "
                       "(OpenRLHF's --train.batch_size).", default=8)
    max_len: int = _help("Longest prompt + response in tokens; longer responses are cut (OpenRLHF's "
                         "--data.max_len).", default=2048)
    lora_rank: int = _help("LoRA rank on the language model's linear layers (0 = full fine-tuning; OpenRLHF's "
                           "--ds.lora.rank). The head always trains; final/ holds the adapter merged.", default=0)
    lora_alpha: int = _help("LoRA alpha (OpenRLHF's --ds.lora.alpha).", default=16)
    freeze_vision: bool = _help("Keep the vision tower frozen (the projector, LM and head train).", default=True)
    gradient_checkpointing: bool = _help("Recompute the backbone's activations in backward to save memory "
                                         "(OpenRLHF's --model.gradient_checkpointing_enable).", default=False)
    dtype: Literal["auto", "bf16", "fp32"] = _help("auto = bf16 on GPU, fp32 on CPU (OpenRLHF's --ds.param_dtype).",
                                                   default="auto")
    seed: int = _help("Data order and head initialisation seed (OpenRLHF's --train.seed).", default=42)
    ckpt_steps: int = _help("Save a resumable DeepSpeed checkpoint (ds_ckpt/) every N optimizer steps, OpenRLHF's "
                            "--ckpt.save_steps (0 = none while training).", default=20)
    openrlhf: dict = _help(
        "OpenRLHF flags passed verbatim to the reward model's ranks, dotted or nested ({ds.adam_offload: true}); "
        "refused when a key above sets the flag or the reward model worker does not act on it (DPO-loss flags, "
        "ref.*, logger.*; docs/reward-model.md).", default_factory=dict)

    def validate(self, where: str) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"`{where}.zero_stage` must be 0, 1, 2 or 3, got {self.zero_stage}.")
        _at_least(self, where, 1, ("nproc", "epochs", "micro_batch", "batch", "max_len"))
        _at_least(self, where, 0, ("lora_rank", "ckpt_steps", "margin"))
        if self.lr <= 0:
            raise ConfigError(f"`{where}.lr` must be > 0, got {self.lr}.")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"`{where}.eval_fraction` must be in [0, 1), got {self.eval_fraction}.")
        if self.master_port is not None and not 1024 <= self.master_port <= 65535:
            raise ConfigError(f"`{where}.master_port` must be in [1024, 65535] or null (a free port), "
                              f"got {self.master_port}.")
        # with a hostfile (or an outside launcher) the world is not rm.nproc: each rank checks the real one
        if not self.hostfile and self.batch % (self.micro_batch * self.nproc):
            raise ConfigError(f"`{where}.batch` ({self.batch}) must be a multiple of micro_batch x nproc "
                              f"({self.micro_batch} x {self.nproc}).")


@dataclass
class PPOConfig:
    """`csr train-ppo`: OpenRLHF's PPO / REINFORCE family (openrlhf.cli.train_ppo_ray) with CSR rollouts."""
    estimator: Literal["gae", "reinforce", "rloo", "reinforce_baseline", "group_norm", "dr_grpo",
                       "flash_reinforce"] = _help(
        "OpenRLHF advantage estimator (gae needs a critic, which OpenRLHF 0.11 does not train for VLMs).",
        default="reinforce_baseline")
    dense_rewards: bool = _help("Step-wise rewards: each sentence's calibrated reward less the mean sentence "
                                "reward of its prompt's rollouts, at its last token (docs/ppo.md, \"The step "
                                "reward\"). false = one scalar per response, OpenRLHF unchanged.", default=True)
    n_samples_per_prompt: int = _help("Rollouts per prompt (group estimators need >= 2).", default=4)
    rollout_batch: int = _help("Prompts per rollout round.", default=32)
    micro_rollout_batch: int = _help("Samples per GPU per experience forward.", default=4)
    train_batch: int = _help("Samples per optimizer step (all GPUs).", default=64)
    micro_train_batch: int = _help("Samples per GPU per training forward.", default=2)
    episodes: int = _help("Passes over the prompts.", default=1)
    epochs: int = _help("PPO epochs per rollout batch.", default=1)
    actor_lr: float = _help("Actor learning rate.", default=1.0e-6)
    init_kl_coef: float = _help("KL penalty coefficient against the reference model.", default=0.01)
    kl_estimator: Literal["k1", "k2", "k3"] = _help("KL estimator.", default="k1")
    kl_in_loss: bool = _help("Put the KL in the loss instead of the reward (GRPO style).", default=False)
    gamma: float = _help("Discount.", default=1.0)
    lambd: float = _help("GAE lambda.", default=1.0)
    eps_clip: float = _help("PPO ratio clip.", default=0.2)
    reward_clip: list = _help("[low, high] clamp of rewards. OpenRLHF's default (-10, 10) would cut CSR "
                              "rewards (lambda * 100 cos reaches 30).", default_factory=lambda: [-100.0, 100.0])
    max_len: int = _help("Longest prompt + response in tokens (image tokens included).", default=2048)
    nodes: int = _help("Nodes for the actor (and reference / critic).", default=1)
    gpus_per_node: int = _help("GPUs per node for the actor (and reference / critic).", default=8)
    vllm_engines: int = _help("vLLM rollout engines (each runs our agent executor).", default=8)
    vllm_tp: int = _help("Tensor parallel size of each vLLM engine.", default=1)
    vllm_gpu_memory: float = _help("vLLM's GPU memory share; leave room for CLIP in the same process.",
                                   default=0.6)
    vllm_enforce_eager: bool = _help("vLLM without CUDA graphs (OpenRLHF's only other engine argument): "
                                     "slower decoding, faster start and less GPU memory.", default=False)
    colocate_all: bool = _help("Actor, reference and vLLM share GPUs (sleep mode between phases).", default=True)
    zero_stage: int = _help("DeepSpeed ZeRO stage for actor / critic.", default=3)
    lora_rank: int = _help("LoRA rank (0 = full fine-tuning).", default=0)
    lora_alpha: int = _help("LoRA alpha.", default=16)
    freeze_vision: bool = _help("Keep the vision encoder frozen.", default=True)
    gradient_checkpointing: bool = _help("Recompute activations in backward.", default=True)
    attn_implementation: str = _help("transformers attention implementation.", default="flash_attention_2")
    ckpt_steps: int = _help("Save a resumable checkpoint every N steps (-1 = only at the end).", default=20)
    ray_address: str = _help("Ray cluster for `csr train-ppo` (empty = start a local one; `auto` = the "
                             "running cluster).", default="")
    seed: int = _help("Seed.", default=42)
    openrlhf: dict = _help(
        "OpenRLHF train_ppo_ray flags passed verbatim, dotted or nested ({ref.offload: true}); refused when a "
        "recipe key sets the flag; checked by train_ppo_ray's own parser (docs/openrlhf.md).", default_factory=dict)

    def validate(self, where: str) -> None:
        _at_least(self, where, 1, ("n_samples_per_prompt", "rollout_batch", "micro_rollout_batch", "train_batch",
                                   "micro_train_batch", "episodes", "epochs", "max_len", "nodes", "gpus_per_node",
                                   "vllm_engines", "vllm_tp"))
        if self.estimator == "gae":
            raise ConfigError(f"`{where}.estimator: gae` needs a critic, and OpenRLHF 0.11 trains none for "
                              "vision-language models; use reinforce_baseline, rloo, group_norm or reinforce.")
        if self.estimator in ("rloo", "reinforce_baseline", "group_norm", "dr_grpo") and self.n_samples_per_prompt < 2:
            raise ConfigError(f"`{where}.estimator: {self.estimator}` compares the rollouts of a prompt: set "
                              f"`{where}.n_samples_per_prompt` >= 2 (got {self.n_samples_per_prompt}).")
        if len(self.reward_clip) != 2 or not all(isinstance(v, (int, float)) for v in self.reward_clip) \
                or self.reward_clip[0] >= self.reward_clip[1]:
            raise ConfigError(f"`{where}.reward_clip` must be [low, high] with low < high, got {self.reward_clip}.")
        if not 0.0 < self.vllm_gpu_memory <= 1.0:
            raise ConfigError(f"`{where}.vllm_gpu_memory` must be in (0, 1], got {self.vllm_gpu_memory}.")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"`{where}.zero_stage` must be 0, 1, 2 or 3, got {self.zero_stage}.")
        if self.train_batch % self.micro_train_batch:
            raise ConfigError(f"`{where}.train_batch` ({self.train_batch}) must be a multiple of "
                              f"`{where}.micro_train_batch` ({self.micro_train_batch}).")


@dataclass
class LoggingConfig:
    """Experiment tracking of `csr train-dpo`, `csr run` and `csr train-ppo`: OpenRLHF's --logger.* flags."""
    wandb: bool = _help("Log to Weights & Biases: sets OpenRLHF's --logger.wandb.key, which is what switches "
                        "wandb on (to a placeholder: the key itself comes from `wandb login` or WANDB_API_KEY).",
                        default=False)
    wandb_mode: Literal["offline", "online"] = _help(
        "offline: no network, run files under the run's folder (<output folder>/wandb/offline-run-*; `wandb sync` "
        "uploads them later); online: needs `wandb login` or WANDB_API_KEY. Sets WANDB_MODE for the trainer.",
        default="offline")
    wandb_project: str = _help("W&B project (--logger.wandb.project).", default="csr")
    wandb_org: Optional[str] = _help("W&B entity (--logger.wandb.org); null = your default entity.", default=None)
    wandb_group: Optional[str] = _help("W&B run group (--logger.wandb.group).", default=None)
    wandb_run_name: str = _help(
        "W&B run name (--logger.wandb.run_name), also TensorBoard's subfolder; empty = the output folder's name, "
        "and `csr run` adds -iter_<t> per iteration.", default="")
    tensorboard: bool = _help("Write TensorBoard event files to <output folder>/tensorboard/<run name>/ "
                              "(--logger.tensorboard_dir).", default=False)
    steps: int = _help("Log to wandb / TensorBoard every N optimizer steps (--logger.logging_steps); "
                       "dpo_metrics.jsonl keeps every step.", default=1)

    def validate(self, where: str) -> None:
        _at_least(self, where, 1, ("steps",))
        if not self.wandb_project:
            raise ConfigError(f"`{where}.wandb_project` must not be empty; name a W&B project, e.g. csr.")


@dataclass
class ServeConfig:
    """`csr serve-reward`: where the reward server listens and the URL OpenRLHF's engines are given."""
    host: str = _help("Bind address; 127.0.0.1 = this machine only, 0.0.0.0 = every interface (engines on other "
                      "nodes). --host overrides it.", default="127.0.0.1")
    port: int = _help("TCP port (--port overrides it).", default=5000)
    url_host: str = _help("Host name or address other nodes reach this server by, for the printed "
                          "--reward.remote_url; empty = the bind address, or this machine's name when it binds "
                          "every interface.", default="")

    def validate(self, where: str) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"`{where}.port` must be in [0, 65535], got {self.port}.")
        if not self.host.strip():
            raise ConfigError(f"`{where}.host` must not be empty; use 127.0.0.1 or 0.0.0.0.")


@dataclass
class LoopConfig:
    iterations: int = _help("CSR iterations T: sample -> curate -> DPO, each from the previous iterate.",
                            default=3)
    sample_on: Literal["local", "ray"] = _help(
        "Where `csr run` samples: local = this process, on model.device; ray = Ray sampling actors over "
        "the cluster (as `csr sample --ray`), resumable and exact alike. DPO and evaluation run as before.",
        default="local")
    ray_address: str = _help("With sample_on: ray, the cluster to join (auto, host:6379, ray://host:10001); "
                             "empty = a Ray instance on this machine for each sampling stage.", default="")
    ray_actors: int = _help("With sample_on: ray, sampling actors; 0 = one per GPU of the cluster on GPUs, "
                            "2 on CPUs.", default=0)
    holdout: str = _help("Held-out prompts JSONL ({id, image, question}, never sampled for pairs): each iterate's "
                         "greedy answers are scored by the calibrated reward (R_T from model.path), an iteration that "
                         "lowers it is reported and results.json names the best iterate (`selected`); empty = off. "
                         "docs/method.md, 'Keeping the gains'.", default="")
    on_decline: Literal["report", "stop"] = _help(
        "When an iteration lowers the held-out reward (loop.holdout): report it and go on, or stop the loop there "
        "(the next iteration would start from the worse iterate).", default="stop")
    holdout_z: float = _help("An iteration lowered the held-out reward when it fell by more than this many standard "
                             "errors of the paired per-prompt difference; 0 = any drop.", default=2.0)

    def validate(self, where: str) -> None:
        if self.iterations < 1:
            raise ConfigError(f"`{where}.iterations` must be >= 1, got {self.iterations}.")
        if self.holdout_z < 0:
            raise ConfigError(f"`{where}.holdout_z` must be >= 0 (0 = any drop counts), got {self.holdout_z}.")
        if self.ray_actors < 0:
            raise ConfigError(f"`{where}.ray_actors` must be >= 0 (0 = one per GPU), got {self.ray_actors}.")
        if self.sample_on == "local" and (self.ray_address or self.ray_actors):
            raise ConfigError(f"`{where}.ray_address` / `{where}.ray_actors` apply to `{where}.sample_on: ray`; "
                              "set it, or remove them.")


@dataclass
class PargsConfig:
    """PARGS reward-guided decoding (eval.decoding: pargs, search.decoding: pargs); docs/reward-model.md."""
    top_k: int = _help("Policy tokens scored by the reward model per step (paper: 10).", default=10)
    weight: float = _help("w in pi'(v) ~ pi(v) exp(w r(x, y v)) (paper: 2 sampling, 1 greedy).", default=2.0)
    greedy: bool = _help("Take the argmax of pi' instead of sampling from it.", default=False)

    def validate(self, where: str) -> None:
        _at_least(self, where, 1, ("top_k",))


@dataclass
class PopeFilesConfig:
    """POPE's own question files (JSONL of {question_id, image, text, label}), one per setting, in place of
    questions built from eval.truth; `csr prepare coco` writes them. All three or none."""
    random: str = _help("POPE random-setting questions, e.g. coco_pope_random.json.", default="")
    popular: str = _help("POPE popular-setting questions.", default="")
    adversarial: str = _help("POPE adversarial-setting questions.", default="")

    def files(self) -> dict[str, str]:
        return {s: getattr(self, s) for s in ("random", "popular", "adversarial") if getattr(self, s)}

    def validate(self, where: str) -> None:
        given = self.files()
        if given and len(given) < 3:
            missing = [s for s in ("random", "popular", "adversarial") if s not in given]
            raise ConfigError(f"`{where}` sets {', '.join(given)} but not {', '.join(missing)}: give all three "
                              "POPE files (`csr prepare coco` writes them) or none.")


@dataclass
class EvalConfig:
    prompts: str = _help("Evaluation prompts JSONL ({id, image, question}); empty = no evaluation.", default="")
    truth: str = _help("Ground truth JSONL: {id, objects: [canonical object names]}.", default="")
    vocabulary: str = _help("Object vocabulary with synonyms: JSON {\"objects\": {name: [forms]}}.", default="")
    pope_per_image: int = _help("POPE yes and no questions per image and setting.", default=1)
    max_new_tokens: int = _help("Longest description generated for CHAIR.", default=64)
    batch: int = _help("Images per generation batch.", default=32)
    limit: Optional[int] = _help("Evaluate only the first N prompts (null = all).", default=None)
    seed: int = _help("POPE sampling seed; PARGS sampling seeds derive from it and the prompt id.", default=0)
    decoding: Literal["greedy", "pargs"] = _help(
        "greedy: model.generate without sampling; pargs: reward-guided decoding with eval.rm (eval.pargs).",
        default="greedy")
    rm: str = _help("Reward model folder (`csr train-rm` final/, rm.partial: true) for decoding: pargs; "
                    "`csr eval --rm` overrides.", default="")
    pargs: PargsConfig = field(default_factory=PargsConfig)
    pope_questions: PopeFilesConfig = field(default_factory=PopeFilesConfig)
    pope_images: str = _help("Folder a relative `image` of the POPE files resolves against (e.g. COCO's "
                             "val2014/ for POPE's published files); empty = the POPE file's own folder.", default="")

    def validate(self, where: str) -> None:
        if self.decoding == "pargs" and not self.rm:
            raise ConfigError(f"`{where}.decoding` is pargs: set `{where}.rm` (or `csr eval --rm`) to a reward "
                              "model folder from `csr train-rm`, or use decoding: greedy.")
        if self.prompts and not (self.truth and self.vocabulary):
            raise ConfigError(f"`{where}.prompts` is set: `{where}.truth` and `{where}.vocabulary` are needed too.")
        _at_least(self, where, 1, ("pope_per_image", "max_new_tokens", "batch"))


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output_dir: str = _help("Where trees, pairs, checkpoints and metrics go.", default="runs/csr")
    reward: RewardConfig = field(default_factory=RewardConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    curation: CurationConfig = field(default_factory=CurationConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    rm: RewardModelConfig = field(default_factory=RewardModelConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


# YAML keys that are Python keywords are stored with a trailing underscore.
_KEY_TO_FIELD = {"lambda": "lambda_"}
_FIELD_TO_KEY = {v: k for k, v in _KEY_TO_FIELD.items()}


# One dtype vocabulary for every section: model.dtype is spelled as torch spells it, dpo.dtype / rm.dtype as
# OpenRLHF's --ds.param_dtype; each takes the other's spelling too.
DTYPE_SPELLINGS = {"bf16": "bfloat16", "bfloat16": "bf16", "fp16": "float16", "float16": "fp16",
                   "fp32": "float32", "float32": "fp32"}

EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def field_key(name: str) -> str:
    """The recipe key of a dataclass field (``lambda_`` -> ``lambda``)."""
    return _FIELD_TO_KEY.get(name, name)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed and DTYPE_SPELLINGS.get(value) in allowed:   # bf16 where bfloat16 is written
            value = DTYPE_SPELLINGS[value]
        if isinstance(value, bool):   # YAML 1.1 reads a bare off/on/no/yes as a bool: take the word back
            value = next((word for word in (("on", "yes", "true") if value else ("off", "no", "false"))
                          if word in allowed), value)
        if value not in allowed:
            raise ConfigError(f"`{where}` must be one of {', '.join(map(str, allowed))}; got {value!r}.")
        return value
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"`{where}` must be a mapping of keys, got {value!r}.")
        return _build(annotation, value, where)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"`{where}` must be true or false, got {value!r}.")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"`{where}` must be an integer, got {value!r}.")
        return value
    if annotation is float:
        # YAML 1.1 (PyYAML) reads 3e-4 or 1E5 without a dot as a string: take what people type
        if isinstance(value, str) and EXPONENT_NUMBER.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"`{where}` must be a number, got {value!r}.")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"`{where}` must be a string, got {value!r}.")
        return value
    if annotation is list:
        if not isinstance(value, list):
            raise ConfigError(f"`{where}` must be a list, got {value!r}.")
        return value
    if annotation is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"`{where}` must be a mapping with string keys, got {value!r}.")
        return value
    raise TypeError(f"unsupported config annotation {annotation!r} at {where}")


def _build(cls: type, data: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = _KEY_TO_FIELD.get(key, key)
        path = f"{where}.{key}" if where else str(key)
        if name not in fields:
            known = [_FIELD_TO_KEY.get(n, n) for n in fields]
            close = difflib.get_close_matches(str(key), known, n=3, cutoff=0.6)
            prefix = f"{where}." if where else ""
            hint = f" Did you mean {' or '.join(f'`{prefix}{k}`' for k in close)}?" if close else ""
            error = ConfigError(f"unknown key `{path}`.{hint} Known keys here: {', '.join(known)}.")
            error.unknown_key = path
            raise error
        kwargs[name] = _coerce(value, hints[name], path)
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(where)
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``search.beam_width=4`` -> (["search", "beam_width"], 4); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value.")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty key part.")
    return parts, yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: `{part}` is not a section.")
            node = child
        node[parts[-1]] = value
    return data


def recipe_from_dict(data: dict) -> Recipe:
    """Relative paths in a recipe resolve against the working directory, as on any command line."""
    return _build(Recipe, data or {}, "")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r} not found; pass --config with a YAML file from recipes/.")
    with path.open() as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {str(path)!r} must be a YAML mapping at the top level.")
    return recipe_from_dict(apply_overrides(data, overrides or []))


def recipe_to_dict(recipe: Recipe) -> dict:
    """The recipe as YAML-ready data, with YAML key names (``lambda``)."""
    def convert(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj):
            return {_FIELD_TO_KEY.get(f.name, f.name): convert(getattr(obj, f.name))
                    for f in dataclasses.fields(obj)}
        return obj
    return convert(recipe)
