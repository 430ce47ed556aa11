"""Sentence engine on transformers, for any VLM that AutoModelForImageTextToText loads.

One ``expand`` call continues every requested prefix of every prompt in a
single batch: each (prompt, prefix) is prefilled once (vision tower included),
its KV cache is then replicated for its K candidates, and all rows decode
together until each has ended its sentence. Log-probs come from the raw logits
of the same forward that chose the token, so R_T needs no extra pass.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from csr_plugin.config import ModelConfig, SearchConfig
from csr_plugin.multimodal import chat_prompt, concat_image_inputs
from csr_plugin.reward.clip_relevance import resolve_device
from csr_plugin.sampler.engine import Continuation, EncodedPrompt, Expansion, never_sampled_ids, stable_seed
from csr_plugin.sampler.sentence_end import sentence_end_token_ids



class PromptTooLongError(ValueError):
    pass


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on int64 tensors (wrapping multiply; masks make the shifts logical)."""
    x = x ^ ((x >> 30) & 0x3FFFFFFFF)
    x = x * -4658895280553007687   # 0xBF58476D1CE4E5B9
    x = x ^ ((x >> 27) & 0x1FFFFFFFFF)
    x = x * -7723592293110705685   # 0x94D049BB133111EB
    return x ^ ((x >> 31) & 0x1FFFFFFFF)


def counter_gumbel(row_seeds: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [rows, vocab] that depends only on (row seed, step, token).

    Counter-based, so a row draws the same noise whatever else shares its batch:
    argmax(logits + noise) is an exact sample of softmax(logits) and reproducible
    across resumes and batch compositions.
    """
    offset = (step * 0x9E3779B97F4A7C15) % (1 << 64)
    state = _splitmix64(row_seeds + (offset - (1 << 64) if offset >= 1 << 63 else offset))
    token = torch.arange(vocab, device=row_seeds.device, dtype=torch.long) * -4658895280553007687
    bits = (_splitmix64(state[:, None] ^ token[None, :]) >> 40) & 0xFFFFFF
    uniform = (bits.float() + 0.5) / float(1 << 24)
    return -torch.log(-torch.log(uniform))


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_vlm(cfg: ModelConfig):
    """(model, processor) through the same Auto classes for a tiny test model and LLaVA-1.5-7B."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    local = Path(cfg.path).expanduser()
    if not local.exists() and (cfg.path.startswith((".", "/", "~")) or cfg.path.count("/") > 1):
        raise FileNotFoundError(f"model.path {cfg.path!r} does not exist; give a local HF model folder or hub id.")
    device = resolve_device(cfg.device)
    processor = AutoProcessor.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
    model = AutoModelForImageTextToText.from_pretrained(
        cfg.path, dtype=resolve_dtype(cfg.dtype, device), trust_remote_code=cfg.trust_remote_code)
    return model.to(device).eval(), processor


def _max_context(model, tokenizer) -> int:
    text_config = getattr(model.config, "text_config", model.config)
    limits = [getattr(text_config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 10**8]
    return min(limits) if limits else 4096


class TransformersEngine:
    def __init__(self, model, processor, search: SearchConfig):
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.search = search
        self.device = next(model.parameters()).device
        self.max_context = _max_context(model, self.tokenizer)
        self.eos_ids = self._eos_ids()
        end_ids = sentence_end_token_ids(self.tokenizer, search.delimiters) - self.eos_ids
        vocab = model.get_output_embeddings().weight.shape[0]
        self.sentence_end_mask = torch.zeros(vocab, dtype=torch.bool, device=self.device)
        self.sentence_end_mask[[i for i in end_ids if i < vocab]] = True
        self.eos_mask = torch.zeros(vocab, dtype=torch.bool, device=self.device)
        self.eos_mask[[i for i in self.eos_ids if i < vocab]] = True
        banned = never_sampled_ids(self.tokenizer, self.eos_ids, getattr(model.config, "image_token_id", None), vocab)
        self.banned_mask = torch.zeros(vocab, dtype=torch.bool, device=self.device)
        self.banned_mask[list(banned)] = True
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)

    @classmethod
    def from_config(cls, model_cfg: ModelConfig, search: SearchConfig) -> "TransformersEngine":
        model, processor = load_vlm(model_cfg)
        return cls(model, processor, search)

    def _eos_ids(self) -> set[int]:
        ids = set()
        for source in (self.model.generation_config.eos_token_id if self.model.generation_config else None,
                       self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        if not ids:
            raise ValueError("the model's tokenizer defines no EOS token; set eos_token in its tokenizer config.")
        return ids

    # ----------------------------------------------------------------- prompts
    def prompt_text(self, question: str) -> str:
        return chat_prompt(self.processor, question)

    def encode_prompt(self, question: str, image) -> EncodedPrompt:
        inputs = self.processor(images=image, text=self.prompt_text(question), return_tensors="pt")
        token_ids = inputs.pop("input_ids")[0].tolist()
        inputs.pop("attention_mask", None)
        if len(token_ids) + self.search.max_new_tokens > self.max_context:
            raise PromptTooLongError(
                f"prompt is {len(token_ids)} tokens; with search.max_new_tokens={self.search.max_new_tokens} it "
                f"exceeds the model's context of {self.max_context}. Shorten the question.")
        return EncodedPrompt(token_ids=token_ids, image_inputs=dict(inputs))

    # --------------------------------------------------------------- decoding
    def _choose(self, logits: torch.Tensor, step: int, row_seeds: torch.Tensor, group_of_row: torch.Tensor,
                request_of_row: torch.Tensor, active: torch.Tensor, n_requests: int) -> torch.Tensor:
        if self.search.decoding == "sample":
            logits = logits / self.search.temperature
            if self.search.top_p < 1.0:
                sorted_logits, order = logits.sort(dim=-1, descending=True)
                cumulative = sorted_logits.softmax(-1).cumsum(-1)
                # drop a token when the mass before it already reaches top_p (the top token always stays)
                drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= self.search.top_p
                logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
            return (logits + counter_gumbel(row_seeds, step, logits.shape[-1])).argmax(-1)
        # Diverse group beam search with one beam per group (the official preset): group g takes
        # argmax of log p - penalty * (times earlier groups of the same request chose the token at
        # this step). Hamming diversity, as HF's former group beam search.
        logp = logits.log_softmax(-1)
        tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        counts = torch.zeros(n_requests, logits.shape[-1], device=logits.device)
        for g in range(int(group_of_row.max()) + 1):
            rows = (group_of_row == g).nonzero(as_tuple=True)[0]
            penalised = logp[rows] - self.search.diversity_penalty * counts[request_of_row[rows]]
            chosen = penalised.argmax(-1)
            tokens[rows] = chosen
            live = active[rows].float()
            counts.index_put_((request_of_row[rows], chosen), live, accumulate=True)
        return tokens

    def _decode_text(self, prefix_ids: list[int], new_ids: list[int]) -> str:
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        before = decode(prefix_ids)
        after = decode(prefix_ids + new_ids)
        return after[len(before):] if after.startswith(before) else decode(new_ids)

    @torch.inference_mode()
    def expand(self, requests: Sequence[Expansion]) -> list[list[Continuation]]:
        if not requests:
            return []
        seqs = [r.prompt.token_ids + r.prefix_ids for r in requests]
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, seq in enumerate(seqs):  # left padding: every row's next token sits at the same column
            input_ids[i, width - len(seq):] = torch.tensor(seq)
            attention[i, width - len(seq):] = 1
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        image_inputs = {k: v.to(self.device) for k, v in
                        concat_image_inputs([r.prompt.image_inputs for r in requests]).items()}
        if "pixel_values" in image_inputs:
            image_inputs["pixel_values"] = image_inputs["pixel_values"].to(self.model.dtype)
        from transformers import DynamicCache

        out = self.model(input_ids=input_ids, attention_mask=attention, past_key_values=DynamicCache(),
                         use_cache=True, **image_inputs)
        # One prefill per (prompt, prefix); the K candidates share it through a replicated cache.
        request_of_row = torch.repeat_interleave(
            torch.arange(len(requests), device=self.device),
            torch.tensor([r.n for r in requests], device=self.device))
        group_of_row = torch.cat([torch.arange(r.n, device=self.device) for r in requests])
        row_seeds = torch.tensor([stable_seed(r.seed, k) for r in requests for k in range(r.n)],
                                 dtype=torch.long, device=self.device)
        cache = out.past_key_values
        cache.batch_select_indices(request_of_row)
        logits = out.logits[:, -1].float()[request_of_row]
        attention = attention[request_of_row]
        del out

        rows, steps = request_of_row.shape[0], self.search.max_new_tokens
        live = torch.arange(rows, device=self.device)          # original row of each batch row
        active = torch.ones(rows, dtype=torch.bool, device=self.device)
        finish = torch.full((rows,), 2, dtype=torch.long, device=self.device)  # 0 sentence, 1 eos, 2 length
        lengths = torch.zeros(rows, dtype=torch.long, device=self.device)
        token_buf = torch.full((rows, steps), self.pad_id, dtype=torch.long, device=self.device)
        logprob_buf = torch.zeros((rows, steps), device=self.device)
        for step in range(steps):
            logp = logits.log_softmax(-1)  # reported under the model itself, before any masking
            logits = logits.masked_fill(self.banned_mask, float("-inf"))
            tokens = self._choose(logits, step, row_seeds[live], group_of_row[live], request_of_row[live], active,
                                  len(requests))
            tokens = torch.where(active, tokens, torch.full_like(tokens, self.pad_id))
            writing = live[active]
            token_buf[writing, step] = tokens[active]
            logprob_buf[writing, step] = logp.gather(-1, tokens[:, None]).squeeze(-1)[active]
            lengths[writing] += 1
            is_eos = self.eos_mask[tokens] & active
            is_end = self.sentence_end_mask[tokens] & active & ~is_eos
            finish[live[is_eos]] = 1
            finish[live[is_end]] = 0
            active = active & ~is_eos & ~is_end
            if not bool(active.any()) or step == steps - 1:
                break
            if int((~active).sum()) * 4 >= active.numel():
                # Drop finished rows once a quarter of the batch has ended: sentences differ in
                # length, and decoding dead rows to the longest one would waste most of the step.
                keep = active.nonzero(as_tuple=True)[0]
                cache.batch_select_indices(keep)
                attention, tokens, live, active = attention[keep], tokens[keep], live[keep], active[keep]
            attention = torch.cat([attention, active[:, None].long()], dim=1)
            out = self.model(input_ids=tokens[:, None], attention_mask=attention, past_key_values=cache,
                             use_cache=True)
            logits = out.logits[:, -1].float()
            cache = out.past_key_values

        token_rows, logprob_rows = token_buf.tolist(), logprob_buf.tolist()
        lengths_t, finish_t, request_t = lengths.tolist(), finish.tolist(), request_of_row.tolist()
        results: list[list[Continuation]] = [[] for _ in requests]
        names = ("sentence", "eos", "length")
        for row in range(rows):
            new_ids = token_rows[row][:lengths_t[row]]
            request = requests[request_t[row]]
            results[request_t[row]].append(Continuation(
                token_ids=new_ids, logprobs=logprob_rows[row][:lengths_t[row]],
                text=self._decode_text(request.prefix_ids, new_ids), finish=names[finish_t[row]]))
        return results
