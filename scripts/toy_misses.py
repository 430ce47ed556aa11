"""What a toy model's remaining misses are made of (docs/results.md, "What the misses are made of").

    .venv/bin/python scripts/toy_misses.py --seed 3 .cache/toy/seed3/vlm runs/s3/A/seed3/iter_3/dpo/final

Per model, on the seed's evaluation scenes, greedy as `csr demo` evaluates:
- object recall split by whether the object's world partner (circle-square, triangle-diamond,
  cross-ring) is in the image too, and how many sentences the answers have;
- POPE "random" with 3 questions per image: how often the model says yes to present objects, to
  the absent partner of a present object, and to any other absent object.
"""
from __future__ import annotations

import argparse
from collections import Counter

from csr_plugin.config import ModelConfig
from csr_plugin.sampling.greedy import generate
from csr_plugin.eval.objects import ObjectVocabulary
from csr_plugin.eval.pope import build_pope, parse_yes_no
from csr_plugin.jsonl import load_records
from csr_plugin.sampling.prompts import load_image, load_prompts
from csr_plugin.sampling.transformers_engine import load_vlm
from csr_plugin.toy.world import PARTNER

PAIRED = {**PARTNER, **{b: a for a, b in PARTNER.items()}}


def misses(model_path: str, prompts, images, truth, vocab) -> str:
    model, processor = load_vlm(ModelConfig(path=model_path, dtype="float32", device="cpu"))
    answers = generate(model, processor, [(images[p.id], p.question) for p in prompts], 48, 50, "CHAIR")
    named, sentences = Counter(), Counter()
    for prompt, answer in zip(prompts, answers):
        objects, mentioned = truth[prompt.id], set(vocab.mentions(answer))
        sentences[answer.count(".")] += 1
        for obj in objects:
            kind = "with partner" if PAIRED.get(obj) in objects else "without"
            named[kind, True] += obj in mentioned
            named[kind, False] += 1
    questions = build_pope(truth, vocab.objects, "random", 3, seed=0)
    replies = generate(model, processor, [(images[q.image_id], q.text()) for q in questions], 8, 50, "POPE")
    said_yes = Counter()
    for question, reply in zip(questions, replies):
        kind = ("present" if question.label == "yes" else
                "absent partner" if any(PAIRED.get(o) == question.object for o in truth[question.image_id]) else
                "other absent")
        said_yes[kind, True] += parse_yes_no(reply) == "yes"
        said_yes[kind, False] += 1
    recall = ", ".join(f"{k} {named[k, True] / named[k, False]:.3f} of {named[k, False]}"
                       for k in ("with partner", "without"))
    yes = ", ".join(f"{k} {said_yes[k, True]}/{said_yes[k, False]}" for k in ("present", "absent partner", "other absent"))
    return (f"{model_path}\n  recall: {recall}; answers by sentence count {dict(sorted(sentences.items()))}\n"
            f"  POPE random, 'yes' to: {yes}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("models", nargs="+", help="model folders (the base VLM, iter_N/dpo/final)")
    args = parser.parse_args()
    folder = f".cache/toy/seed{args.seed}"
    prompts, _ = load_prompts(f"{folder}/eval/prompts.jsonl")
    truth = {str(r["id"]): set(r["objects"]) for r in load_records(f"{folder}/eval/truth.jsonl")}
    vocab = ObjectVocabulary.from_json(f"{folder}/objects.json")
    images = {p.id: load_image(p.image) for p in prompts}
    truth = {p.id: truth[p.id] for p in prompts}
    for path in args.models:
        print(misses(path, prompts, images, truth, vocab), flush=True)


if __name__ == "__main__":
    main()
