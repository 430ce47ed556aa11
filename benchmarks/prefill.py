"""Prefill work of the sentence search: prompt cache vs re-prefilling every step, in one run.

A tiny random LLaVA-1.5 with the real image geometry (336 px, patch 14: 576 image
tokens per prompt; a small LM), 8 prompts, the sentence-level beam search with 3
beams x 3 candidates x 4 sentences. "full" is the old path (TransformersEngine(...,
prompt_cache=False)): every step re-encodes the image and re-prefills prompt + prefix
for every beam. "cached" (the default) prefills each prompt once, image included, and
each step prefills only the last prompt token and the beam's response prefix.
Both sides run the same search with the same seeds, interleaved, best of --repeats.

    python benchmarks/prefill.py [--prompts 8] [--max-new-tokens 16] [--repeats 2]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from csr_plugin.config import ModelConfig, recipe_from_dict
from csr_plugin.reward.clip_relevance import ClipRelevance
from csr_plugin.sampling.search import PromptJob, SentenceBeamSearch
from csr_plugin.sampling.transformers_engine import TransformersEngine, load_vlm
from csr_plugin.toy.tiny_families import build_tiny_llava_geometry
from csr_plugin.toy.tiny_models import build_tiny_clip

QUESTIONS = ["Describe the image in detail.", "What objects are in the picture?", "Is there a cat?",
             "What colour is the big shape?", "Describe the image.", "Where is the star?",
             "How many shapes are there?", "What is next to the circle?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="each side runs this often; the best time counts")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="csr-prefill-"))
    model, processor = load_vlm(ModelConfig(path=str(build_tiny_llava_geometry(root / "vlm")), dtype="float32",
                                            device="cpu"))
    clip_config, clip_weights = build_tiny_clip(root / "clip")
    recipe = recipe_from_dict({
        "model": {"path": str(root / "vlm"), "dtype": "float32", "device": "cpu"},
        "clip": {"model": "tiny-clip", "config": str(clip_config), "pretrained": str(clip_weights), "device": "cpu"},
        "data": {"prompts": "unused"}, "output_dir": "unused",
        "search": {"beam_width": 3, "candidates": 3, "keep_top": 1, "keep_bottom": 2, "max_sentences": 4,
                   "max_new_tokens": args.max_new_tokens, "batch_prompts": args.prompts},
    })
    clip = ClipRelevance(recipe.clip)
    engines = {name: TransformersEngine(model, processor, recipe.search, prompt_cache=name == "cached")
               for name in ("full", "cached")}
    images = [Image.new("RGB", (400 + 13 * i, 360), (40 * i % 256, 200 - 20 * i, 90)) for i in range(args.prompts)]
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.prompts)]
    jobs = [PromptJob(f"p{i}", f"img{i}", q, img, engines["full"].encode_prompt(q, img))
            for i, (q, img) in enumerate(zip(questions, images))]
    prompt_len = sum(len(j.encoded.token_ids) for j in jobs) / len(jobs)

    best = {name: float("inf") for name in engines}
    tokens, nodes = {}, {}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both sides alike
        for name, engine in engines.items():
            engine.stats = {k: 0 for k in engine.stats}
            engine._cached.clear()
            search = SentenceBeamSearch(engine, clip, recipe.search, recipe.reward, recipe.curation)
            start = time.perf_counter()
            trees = search.run(jobs)
            best[name] = min(best[name], time.perf_counter() - start)
            tokens[name] = engine.stats["prefill_tokens"] / len(jobs)
            nodes[name] = [[(n.parent, n.token_ids) for n in t.nodes] for t in trees]

    n = len(jobs)
    print(f"tiny LLaVA-1.5 geometry ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), {n} prompts "
          f"of {prompt_len:.0f} tokens (576 image), 3 beams x 3 candidates x 4 sentences x {args.max_new_tokens} "
          f"tokens, {torch.get_num_threads()} CPU threads, best of {args.repeats}")
    for name, label in (("full", "re-prefill every step"), ("cached", "prompt cache        ")):
        print(f"{label}: {tokens[name]:7.0f} prefill tokens/prompt ({tokens[name] / prompt_len:.2f}x the prompt), "
              f"{best[name] / n * 1000:7.1f} ms/prompt")
    print(f"prefill tokens: {tokens['full'] / tokens['cached']:.1f}x fewer; time: {best['full'] / best['cached']:.2f}x "
          f"faster; same trees: {nodes['full'] == nodes['cached']}")


if __name__ == "__main__":
    main()
