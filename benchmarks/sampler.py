"""Batched sentence-level search vs the official CSR procedure, side by side in one run.

Official procedure (YiyangZhou/CSR inference_csr/sample.py + score.py), re-implemented
faithfully on the same engine: one tree node at a time, 5 candidates per node from
diverse group beam search (5 groups of 1 beam, penalty 3.0), LM-score pruning
(top 1 + bottom 2), then CLIP one sentence at a time afterwards, the image encoded
again with every sentence as its get_clip_score does. HF's group beam search was
removed from transformers 5, so the baseline uses our group-beam decoder for one
node per call: the same algorithm, with the prompt prefilled once instead of once
per beam, so if anything the baseline is flattered.

Ours: the same search settings (recipes/official.yaml semantics), every active
beam of every prompt of a batch in one engine call per sentence step, CLIP in one
text batch per step with one image embedding per image.

    python benchmarks/sampler.py [--prompts 16] [--max-sentences 4] [--max-new-tokens 24] [--threads 1]

torch runs one thread by default: on a shared 2-core machine two threads per process
made the official procedure's many tiny ops 10-100x slower whenever the other core
was busy, and with them the speed-up (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from csr_plugin.config import recipe_from_dict
from csr_plugin.sampling.engine import Expansion
from csr_plugin.sampling.search import PromptJob, SentenceBeamSearch
from csr_plugin.reward.clip_relevance import ClipRelevance
from csr_plugin.sampling.local import build_engine
from csr_plugin.sampling.prompts import load_image, load_prompts
from csr_plugin.toy.quickstart import prepare_tiny_assets, write_prompts


def official_search(engine, clip, job: PromptJob, candidates: int, max_sentences: int) -> int:
    """One prompt, node by node; returns the number of candidate sentences generated."""
    active, generated = [[]], []
    for _ in range(max_sentences):
        new_nodes = []
        for prefix in active:
            for cont in engine.expand([Expansion(job.encoded, prefix, candidates)])[0]:
                generated.append(cont)
                if cont.finish != "eos":
                    score = sum(cont.logprobs) / len(cont.logprobs)
                    new_nodes.append((score, prefix + cont.token_ids))
        new_nodes.sort(key=lambda node: -node[0])
        active = [p for _, p in (new_nodes[:1] + new_nodes[-2:] if len(new_nodes) > 3 else new_nodes)]
        if not active:
            break
    with torch.no_grad():  # score.py: CLIP on every sentence, image and text together, one at a time
        for cont in generated:
            pixels = clip.preprocess(job.image_data).unsqueeze(0).to(clip.device)
            image = clip.model.encode_image(pixels, normalize=True)
            text = clip.model.encode_text(clip.tokenizer([cont.text]).to(clip.device), normalize=True)
            float(100.0 * (image * text).sum())
    return len(generated)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-sentences", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3, help="each side runs this often; the best time counts")
    parser.add_argument("--assets", default=".cache/tiny")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine, 2 threads per process made tiny ops "
                             "10-100x slower whenever the other core was busy; docs/benchmarks.md)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    root = prepare_tiny_assets(args.assets)
    prompts_dir = Path(args.assets) / f"bench-prompts-{args.prompts}"
    if not (prompts_dir / "prompts.jsonl").exists():
        write_prompts(prompts_dir, args.prompts, seed=1)
    recipe = recipe_from_dict({
        "model": {"path": str(root / "vlm"), "dtype": "float32", "device": "cpu"},
        "clip": {"model": "tiny-clip", "config": str(root / "clip" / "tiny-clip.json"),
                 "pretrained": str(root / "clip" / "tiny-clip.pt"), "device": "cpu"},
        "data": {"prompts": str(prompts_dir / "prompts.jsonl")},
        "reward": {"fusion": "rank"},
        "search": {"beam_width": 3, "candidates": 5, "keep_top": 1, "keep_bottom": 2,
                   "max_sentences": args.max_sentences, "max_new_tokens": args.max_new_tokens,
                   "calibration": "posthoc", "decoding": "group_beam", "diversity_penalty": 3.0,
                   "batch_prompts": args.prompts},
    })
    engine, clip = build_engine(recipe), ClipRelevance(recipe.clip)
    records, _ = load_prompts(recipe.data.prompts)
    jobs = []
    for r in records:
        image = load_image(r.image)
        jobs.append(PromptJob(r.id, r.image, r.question, image, engine.encode_prompt(r.question, image)))
    search = SentenceBeamSearch(engine, clip, recipe.search, recipe.reward, recipe.curation)
    search.run(jobs[:2])  # warm-up

    ours_s, base_s = float("inf"), float("inf")
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both sides alike
        clip._cache.clear()
        start = time.perf_counter()
        trees = search.run(jobs)
        ours_s = min(ours_s, time.perf_counter() - start)
        start = time.perf_counter()
        base_nodes = sum(official_search(engine, clip, job, 5, args.max_sentences) for job in jobs)
        base_s = min(base_s, time.perf_counter() - start)
    ours_nodes = sum(len(t.nodes) - 1 for t in trees)

    n = len(jobs)
    print(f"tiny LLaVA ({sum(p.numel() for p in engine.model.parameters()) / 1e6:.2f}M params), "
          f"{n} prompts, K=5, keep 1+2, {args.max_sentences} sentences x {args.max_new_tokens} tokens, "
          f"{torch.get_num_threads()} CPU threads, best of {args.repeats}")
    print(f"official (node at a time): {n / base_s:8.2f} prompts/s  ({base_nodes} candidate sentences, {base_s:.1f}s)")
    print(f"csr-plugin (batched):      {n / ours_s:8.2f} prompts/s  ({ours_nodes} candidate sentences, {ours_s:.1f}s)")
    print(f"speed-up: {base_s / ours_s:.1f}x")


if __name__ == "__main__":
    main()
