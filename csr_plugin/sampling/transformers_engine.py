"""Sentence engine on transformers, for every VLM family in ``csr_plugin.multimodal``.

One ``expand`` call continues every requested prefix of every prompt in a
single batch. With the prompt cache (the default) each prompt is prefilled
once, vision tower included, and kept as unpadded KV tensors that every row of
that prompt reads in place (``shared_prompt.py``): rows hold only their own
tokens, so memory grows with K by the prefixes, not by the 600-token image
prompt. Each (prompt, prefix) is prefilled once and its own KV replicated for
its K candidates, and all rows decode together until each has ended its
sentence. Every row's own KV is kept until the next call, so a beam the search
keeps continues from it: one token prefilled instead of its whole prefix. A call larger than ``search.max_batch_tokens`` of KV runs as several
batches, and an out-of-memory error halves that budget and goes on. Positions are explicit everywhere (Qwen-VL's
M-RoPE included), so padding between a cached prompt and its prefix changes
nothing. Log-probs come from the raw logits of the same forward that chose the
token, so R_T needs no extra pass.
"""
from __future__ import annotations

import logging
import threading
from typing import Optional, Sequence

import torch

from csr_plugin.config import ModelConfig, SearchConfig
from csr_plugin.accelerator import resolve_device, resolve_dtype
from csr_plugin.model_source import check_model_path, context_length
from csr_plugin.multimodal import batch_inputs, chat_prompt, control_token_ids, encode_prompt, family_of, mrope_positions
from csr_plugin.sampling.engine import (Continuation, EncodedPrompt, Expansion, added_text, never_sampled_ids,
                                       stable_seed)
from csr_plugin.sampling.sentence_end import sentence_end_token_ids
from csr_plugin.sampling.shared_prompt import SharedPrompts, attending

log = logging.getLogger(__name__)



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
    # float64: (bits + 0.5) / 2^24 is exact there. In float32 the top draw rounds to 1.0 and its Gumbel is +inf,
    # which wins the argmax whatever the token's probability, and a banned token's -inf + inf is NaN, which
    # argmax picks too: with a 32k vocabulary, one step in about 500 (a sampled <image> broke a reward model).
    uniform = (bits.double() + 0.5) / float(1 << 24)
    return (-torch.log(-torch.log(uniform))).float()


def load_vlm(cfg: ModelConfig):
    """(model, processor) through the same Auto classes for a tiny test model and LLaVA-1.5-7B."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    check_model_path(cfg.path)
    family_of(AutoConfig.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code))  # fail before weights
    device = resolve_device(cfg.device)
    try:
        processor = AutoProcessor.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForImageTextToText.from_pretrained(
            cfg.path, dtype=resolve_dtype(cfg.dtype, device), trust_remote_code=cfg.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - safetensors, OSError, ValueError...: all a broken folder
        if isinstance(exc, torch.OutOfMemoryError):
            raise
        from csr_plugin.recipe_paths import model_load_failure

        raise model_load_failure(cfg.path, exc) from exc   # short on the terminal; the traceback goes to the log
    return model.to(device).eval(), processor


def _sliding_window(config) -> Optional[int]:
    """The smallest attention window of the text model, None without sliding-window layers."""
    text = config.get_text_config()
    sliding = any(t == "sliding_attention" for t in (getattr(text, "layer_types", None) or ())) or bool(
        getattr(text, "use_sliding_window", False))
    return getattr(text, "sliding_window", None) if sliding else None


class _CachedPrompt:
    """One prompt's KV over all its tokens but the last, unpadded: [(keys, values)] per layer, each
    [1, heads, len - 1, head_dim]. Holding ``prompt`` keeps its id from being reused while cached."""

    def __init__(self, prompt: EncodedPrompt, layers: list[tuple[torch.Tensor, torch.Tensor]], last_pos: int):
        self.prompt, self.layers, self.last_pos = prompt, layers, last_pos


class TransformersEngine:
    def __init__(self, model, processor, search: SearchConfig, prompt_cache: bool = True):
        self.model = model
        self.spec = family_of(model.config)
        # False re-prefills prompt, image and prefix at every call (the old path, kept for benchmarks).
        self.prompt_cache = prompt_cache
        self.sliding_window = _sliding_window(model.config)
        self._cached: dict[int, _CachedPrompt] = {}
        self._lock = threading.Lock()  # one expand at a time: the prompt cache and the model are shared
        # prefill_tokens: real (unpadded) tokens prefilled; prompt_prefills: prompts run through
        # the vision tower and cached; rows_dropped: finished rows compacted out of a decode batch.
        self.stats = {"prefill_tokens": 0, "prompt_prefills": 0, "rows_dropped": 0, "batches": 0, "oom_halvings": 0,
                      "kept_prefixes": 0}
        # False: every row gets its own copy of its prompt's KV (the engine before sharing, for benchmarks).
        self.share_prompt = True
        # Each row's own KV after a call, keyed by (prompt, the tokens it covers): a kept beam continues
        # from it at the next sentence step, prefilling one token instead of its whole prefix. Only until
        # the next call; with the prompt shared, the rows' own tokens are all a step holds besides it.
        self._kept: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._reuse: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}   # the last call's, read by this one
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.search = search
        self.device = next(model.parameters()).device
        self.max_context = context_length(model.config, self.tokenizer)
        self.eos_ids = self._eos_ids()
        end_ids = sentence_end_token_ids(self.tokenizer, search.delimiters) - self.eos_ids
        vocab = model.get_output_embeddings().weight.shape[0]
        self.sentence_end_mask = torch.zeros(vocab, dtype=torch.bool, device=self.device)
        self.sentence_end_mask[[i for i in end_ids if i < vocab]] = True
        self.eos_mask = torch.zeros(vocab, dtype=torch.bool, device=self.device)
        self.eos_mask[[i for i in self.eos_ids if i < vocab]] = True
        banned = never_sampled_ids(self.tokenizer, self.eos_ids, control_token_ids(model.config, processor), vocab)
        self.banned_mask = torch.zeros(vocab, dtype=torch.bool, device=self.device)
        self.banned_mask[list(banned)] = True
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.kv_bytes_per_token = kv_bytes_per_token(model)
        self.max_batch_tokens = search.max_batch_tokens or default_max_batch_tokens(self.kv_bytes_per_token,
                                                                                    self.device)

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
        token_ids, inputs = encode_prompt(self.processor, self.prompt_text(question), image)
        if len(token_ids) + self.search.max_new_tokens > self.max_context:
            raise PromptTooLongError(
                f"prompt is {len(token_ids)} tokens; with search.max_new_tokens={self.search.max_new_tokens} it "
                f"exceeds the model's context of {self.max_context}. Shorten the question.")
        return EncodedPrompt(token_ids=token_ids, image_inputs=inputs)

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

    # ---------------------------------------------------------------- prefill
    def _forward(self, kwargs: dict, **extra):
        kwargs = {k: v.to(self.device) for k, v in kwargs.items()}
        if "pixel_values" in kwargs:
            kwargs["pixel_values"] = kwargs["pixel_values"].to(self.model.dtype)
        # logits_to_keep=1: only the next-token column, not [rows, T, vocab] (152k for Qwen).
        return self.model(**kwargs, **extra, use_cache=True, logits_to_keep=1)

    def _positions(self, kwargs: dict, rows: list[list[int]]) -> torch.Tensor:
        """Explicit positions for a left-padded full-sequence batch; returns each row's next position."""
        if self.spec.mrope:  # batch_inputs built them; the last column is a text token (equal axes)
            return kwargs["position_ids"][:, :, -1].max(0).values + 1
        mask = kwargs["attention_mask"]
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        return torch.tensor([len(r) for r in rows])

    def _prefill_full(self, requests: Sequence[Expansion]):
        """Prompt + image + prefix of every request, from scratch (also the fallback)."""
        rows = [r.prompt.token_ids + r.prefix_ids for r in requests]
        images = [r.prompt.image_inputs for r in requests]
        kwargs = batch_inputs(self.model.config, rows, images, self.pad_id, "left")
        next_pos = self._positions(kwargs, rows)
        out = self._forward(kwargs)
        self.stats["prefill_tokens"] += sum(map(len, rows))
        return out.past_key_values, out.logits[:, -1].float(), kwargs["attention_mask"].to(self.device), next_pos

    def _cache_prompts(self, prompts: list[EncodedPrompt]) -> None:
        """Prefill ``prompts`` but their last token (image encoded here, once) and keep their KV."""
        rows = [p.token_ids[:-1] for p in prompts]
        images = [p.image_inputs for p in prompts]
        kwargs = batch_inputs(self.model.config, rows, images, self.pad_id, "left")
        self._positions(kwargs, rows)
        out = self._forward(kwargs)
        self.stats["prefill_tokens"] += sum(map(len, rows))
        self.stats["prompt_prefills"] += len(prompts)
        width = kwargs["input_ids"].shape[1]
        for i, (prompt, row) in enumerate(zip(prompts, rows)):
            layers = [(layer.keys[i:i + 1, :, width - len(row):].clone(),
                       layer.values[i:i + 1, :, width - len(row):].clone())
                      for layer in out.past_key_values.layers]
            if self.spec.mrope:
                last = int(mrope_positions(self.model.config, prompt.token_ids,
                                           prompt.image_inputs.get("image_grid_thw"))[:, -1].max())
            else:
                last = len(prompt.token_ids) - 1
            self._cached[id(prompt)] = _CachedPrompt(prompt, layers, last)

    def _prefill_from_prompt_cache(self, requests: Sequence[Expansion]):
        """Each request's last prompt token and prefix on top of its prompt's cached KV.

        Shared (the default): the rows' cache holds only [pad | prompt[-1] + prefix]; the prompt's
        KV is read in place by the attention (``shared_prompt.py``), explicit positions continue the
        prompt's own. Copied (``share_prompt = False``): row layout [pad | prompt[:-1] | pad |
        prompt[-1] + prefix] in one cache. Either equals a full prefill.
        """
        from transformers import DynamicCache

        by_id = {id(r.prompt): r.prompt for r in requests}
        prompts = list(by_id.values())
        missing = [p for p in prompts if id(p) not in self._cached]
        if missing:
            self._cache_prompts(missing)
        entries = [self._cached[id(p)] for p in prompts]
        index = {id(p): i for i, p in enumerate(prompts)}
        of_request = torch.tensor([index[id(r.prompt)] for r in requests])

        # A beam kept from the last step continues from its own KV: only its last token is prefilled.
        kept = [self._reuse.get(self._kept_key(r.prompt, r.prefix_ids[:-1])) if self.share_prompt and r.prefix_ids
                else None for r in requests]
        chunks = [r.prefix_ids[-1:] if k is not None else r.prompt.token_ids[-1:] + r.prefix_ids
                  for r, k in zip(requests, kept)]
        chunk_width = max(map(len, chunks))
        chunk_ids = torch.full((len(requests), chunk_width), self.pad_id, dtype=torch.long)
        chunk_mask = torch.zeros((len(requests), chunk_width), dtype=torch.long)
        positions = torch.zeros((len(requests), chunk_width), dtype=torch.long)
        for i, (r, chunk) in enumerate(zip(requests, chunks)):
            start = chunk_width - len(chunk)
            chunk_ids[i, start:] = torch.tensor(chunk)
            chunk_mask[i, start:] = 1
            # the last prompt token sits at last_pos, prefix token j at last_pos + 1 + j
            first = entries[of_request[i]].last_pos + len(r.prefix_ids) + 1 - len(chunk)
            positions[i, start:] = torch.arange(first, first + len(chunk))
        position_ids = positions[None].expand(3, -1, -1) if self.spec.mrope else positions
        self.stats["prefill_tokens"] += sum(map(len, chunks))
        self.stats["kept_prefixes"] += sum(k is not None for k in kept)
        if self.share_prompt:
            shared = SharedPrompts([[(keys[0], values[0]) for keys, values in e.layers] for e in entries],
                                   of_request.to(self.device))
            cache, own_mask = self._kept_cache(kept)
            causal = torch.ones(chunk_width, chunk_width, dtype=torch.bool).tril()
            local = causal[None, None] & chunk_mask.bool()[:, None, None, :]   # [R, 1, q, S], True = attend
            local = torch.cat([own_mask.bool()[:, None, None, :].expand(-1, 1, chunk_width, -1), local], dim=-1)
            with attending(self.model, shared):
                out = self._forward({"input_ids": chunk_ids, "attention_mask": local, "position_ids": position_ids},
                                    past_key_values=cache)
            mask = torch.cat([own_mask, chunk_mask], dim=1)
            return out.past_key_values, out.logits[:, -1].float(), mask.to(self.device), positions[:, -1] + 1, shared

        width = max(len(p.token_ids) - 1 for p in prompts)
        cache = DynamicCache(config=self.model.config)
        for layer_idx in range(len(entries[0].layers)):
            keys, values = (torch.cat([torch.nn.functional.pad(e.layers[layer_idx][j],
                                                               (0, 0, width - e.layers[layer_idx][j].shape[2], 0))
                                       for e in entries]) for j in (0, 1))
            cache.update(keys, values, layer_idx)
        prompt_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            prompt_mask[i, width - len(p.token_ids) + 1:] = 1
        cache.batch_select_indices(of_request.to(self.device))
        attention = torch.cat([prompt_mask[of_request], chunk_mask], dim=1)
        out = self._forward({"input_ids": chunk_ids, "attention_mask": attention, "position_ids": position_ids},
                            past_key_values=cache)
        return out.past_key_values, out.logits[:, -1].float(), attention.to(self.device), positions[:, -1] + 1, None

    @staticmethod
    def _kept_key(prompt: EncodedPrompt, tokens: Sequence[int]) -> tuple:
        return (id(prompt), tuple(tokens))

    def _kept_cache(self, kept: list):
        """A rows' cache starting with each request's kept own KV, left-padded: (cache, [R, width] mask)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        width = max((k[0][0].shape[1] for k in kept if k is not None), default=0)
        mask = torch.zeros((len(kept), width), dtype=torch.long)
        if width == 0:
            return cache, mask
        reference = next(k for k in kept if k is not None)
        for layer_idx, (ref_keys, ref_values) in enumerate(reference):
            keys = ref_keys.new_zeros((len(kept), *ref_keys.shape[:1], width, ref_keys.shape[-1]))
            values = ref_values.new_zeros((len(kept), *ref_values.shape[:1], width, ref_values.shape[-1]))
            for i, k in enumerate(kept):
                if k is not None:
                    length = k[layer_idx][0].shape[1]
                    keys[i, :, width - length:] = k[layer_idx][0]
                    values[i, :, width - length:] = k[layer_idx][1]
            cache.update(keys, values, layer_idx)
        for i, k in enumerate(kept):
            if k is not None:
                mask[i, width - k[0][0].shape[1]:] = 1
        return cache, mask

    def _keep_rows(self, cache, attention: torch.Tensor, rows: torch.Tensor, live: torch.Tensor,
                   requests: Sequence[Expansion], request_of_row: torch.Tensor, token_buf: torch.Tensor,
                   lengths: torch.Tensor, finish: torch.Tensor) -> None:
        """Keep the own KV of batch rows ``rows`` (positions in the current batch), keyed by what it covers:
        the last prompt token, the prefix and every sampled token but the last (never fed back). A row that
        ended with EOS is a finished response, never continued: not kept."""
        for b in rows.tolist():
            row = int(live[b])
            if int(finish[row]) == 1:
                continue
            request = requests[int(request_of_row[row])]
            valid = attention[b].bool()
            new_ids = token_buf[row, :int(lengths[row])].tolist()
            self._kept[self._kept_key(request.prompt, request.prefix_ids + new_ids[:-1])] = [
                (layer.keys[b][:, valid].clone(), layer.values[b][:, valid].clone()) for layer in cache.layers]

    def _can_use_prompt_cache(self, requests: Sequence[Expansion]) -> bool:
        if not self.prompt_cache or min(len(r.prompt.token_ids) for r in requests) < 2:
            return False
        if self.sliding_window is None:
            return True
        # Sliding-window layers (Gemma3) mask by cache slot: the padding between a cached prompt and its
        # prefix counts against the window, so take the exact full prefill once it could matter.
        longest = max(len(r.prompt.token_ids) for r in requests) + max(len(r.prefix_ids) for r in requests)
        return longest + self.search.max_new_tokens + 1 < self.sliding_window

    def expand(self, requests: Sequence[Expansion]) -> list[list[Continuation]]:
        if not requests:
            return []
        with self._lock:
            if self.prompt_cache:
                # Bounded: keep only the prompts this call continues (the search drops finished ones).
                wanted = {id(r.prompt) for r in requests}
                self._cached = {k: v for k, v in self._cached.items() if k in wanted}
            # the rows of the last call, which this call's kept beams continue from; none of them after it
            self._reuse, self._kept = self._kept, {}
            results: list[list[Continuation]] = []
            pending = list(requests)
            while pending:
                batch = self._within_budget(pending)
                try:
                    results += self._expand(batch)
                except Exception as exc:  # noqa: BLE001 - only an out-of-memory error is handled here
                    if not _is_out_of_memory(exc) or len(batch) == 1:
                        raise
                    self._halve_budget(exc, batch)
                    continue
                pending = pending[len(batch):]
            self._reuse = {}
            return results

    def kv_tokens(self, requests: Sequence[Expansion]) -> int:
        """KV a decode of ``requests`` holds, in tokens: each prompt's once (shared) or per row (copied),
        plus every row's own last prompt token, prefix and new tokens."""
        own = sum(r.n * (1 + len(r.prefix_ids) + self.search.max_new_tokens) for r in requests)
        if self.prompt_cache and self.share_prompt:
            return own + sum(len(p.token_ids) for p in {id(r.prompt): r.prompt for r in requests}.values())
        return own + sum(r.n * len(r.prompt.token_ids) for r in requests)

    def _within_budget(self, pending: Sequence[Expansion]) -> list[Expansion]:
        """The longest head of ``pending`` whose decode fits in ``max_batch_tokens`` (at least one request)."""
        count = 1
        while count < len(pending) and self.kv_tokens(pending[:count + 1]) <= self.max_batch_tokens:
            count += 1
        return list(pending[:count])

    def _halve_budget(self, exc: Exception, batch: Sequence[Expansion]) -> None:
        needed = self.kv_tokens(batch)
        self.max_batch_tokens = max(1, min(self.max_batch_tokens, needed) // 2)
        self.stats["oom_halvings"] += 1
        # once at warning level: a budget too large for this device is one fact, not one per step
        level = logging.WARNING if self.stats["oom_halvings"] == 1 else logging.DEBUG
        log.log(level, "out of memory decoding %d requests (%d KV tokens): search.max_batch_tokens is now %d and "
                "larger steps run as several batches; set it lower to skip this (%s)", len(batch), needed,
                self.max_batch_tokens, str(exc).splitlines()[0][:200])
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def _expand(self, requests: Sequence[Expansion]) -> list[list[Continuation]]:
        self.stats["batches"] += 1
        if self._can_use_prompt_cache(requests):
            cache, logits, attention, next_pos, shared = self._prefill_from_prompt_cache(requests)
        else:
            (cache, logits, attention, next_pos), shared = self._prefill_full(requests), None
        # One prefill per (prompt, prefix); the K candidates share it through a replicated cache.
        request_of_row = torch.repeat_interleave(
            torch.arange(len(requests), device=self.device),
            torch.tensor([r.n for r in requests], device=self.device))
        group_of_row = torch.cat([torch.arange(r.n, device=self.device) for r in requests])
        row_seeds = torch.tensor([stable_seed(r.seed, k) for r in requests for k in range(r.n)],
                                 dtype=torch.long, device=self.device)
        cache.batch_select_indices(request_of_row)
        if shared is not None:
            shared.select(shared.prompt_of_row[request_of_row])
        logits = logits[request_of_row]
        attention = attention[request_of_row]
        next_pos = next_pos.to(self.device)[request_of_row]

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
                if shared is not None:
                    self._keep_rows(cache, attention, (~active).nonzero(as_tuple=True)[0], live, requests,
                                    request_of_row, token_buf, lengths, finish)
                self.stats["rows_dropped"] += int(active.numel() - keep.numel())
                cache.batch_select_indices(keep)
                if shared is not None:
                    shared.select(shared.prompt_of_row[keep])
                attention, tokens, live, active = attention[keep], tokens[keep], live[keep], active[keep]
                next_pos = next_pos[keep]
            attention = torch.cat([attention, active[:, None].long()], dim=1)
            # Explicit positions: M-RoPE cannot rebuild them from the mask once rows were dropped.
            positions = next_pos[:, None]
            inputs = dict(input_ids=tokens[:, None], past_key_values=cache, use_cache=True,
                          position_ids=positions[None].expand(3, -1, -1) if self.spec.mrope else positions)
            if shared is None:
                out = self.model(attention_mask=attention, **inputs)
            else:
                with attending(self.model, shared):
                    out = self.model(attention_mask=attention.bool()[:, None, None, :], **inputs)
            logits = out.logits[:, -1].float()
            cache = out.past_key_values
            next_pos = next_pos + 1
        if shared is not None:
            self._keep_rows(cache, attention, torch.arange(len(live), device=self.device), live, requests,
                            request_of_row, token_buf, lengths, finish)

        token_rows, logprob_rows = token_buf.tolist(), logprob_buf.tolist()
        lengths_t, finish_t, request_t = lengths.tolist(), finish.tolist(), request_of_row.tolist()
        results: list[list[Continuation]] = [[] for _ in requests]
        names = ("sentence", "eos", "length")
        for row in range(rows):
            new_ids = token_rows[row][:lengths_t[row]]
            request = requests[request_t[row]]
            results[request_t[row]].append(Continuation(
                token_ids=new_ids, logprobs=logprob_rows[row][:lengths_t[row]],
                text=added_text(self.tokenizer, request.prefix_ids, new_ids), finish=names[finish_t[row]]))
        return results


def kv_bytes_per_token(model) -> int:
    """Bytes of KV one token holds across the text model's layers (keys and values)."""
    text = model.config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * next(model.parameters()).element_size()


def default_max_batch_tokens(bytes_per_token: int, device: torch.device) -> int:
    """``search.max_batch_tokens: 0``: 60% of the GPU's free memory now (the rest for activations, logits
    and CLIP), or 4 GiB of KV on a CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(0.6 * free)
    else:
        budget = 4 << 30
    return max(1, budget // bytes_per_token)


def _is_out_of_memory(exc: Exception) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
