"""Chosen non-answers with and without their yes/no scoring, on the same trees.

(docs/results.md, "Today's recipe on this machine")

    .venv/bin/python scripts/toy_fragment_rescore.py --seed 5 runs/s33/toy-seed5/iter_*/trees.jsonl

Since reward.yes_no: claim scores a first sentence that answers an object question with neither yes nor no
("right.", "YesNo.") as the worse of the two claims. Before, it was a plain sentence: CLIP's relevance of the
fragment itself. This script re-scores those fragments the old way (the seed's toy CLIP, λ and R_T as
recorded), curates both versions of each tree with recipes/toy.yaml's curation, and counts the yes/no
pairs whose chosen reply is a fragment. The search itself is not replayed: its pruning saw the new scores,
so the old scoring's own search would differ further.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
from pathlib import Path


def main() -> None:
    from csr_plugin.config import load_recipe
    from csr_plugin.curation import curate_tree
    from csr_plugin.reward import calibrated_reward
    from csr_plugin.reward.source import SentenceInContext, build_visual_scorer
    from csr_plugin.reward.yes_no import ANSWER
    from csr_plugin.sampling.prompts import load_image
    from csr_plugin.toy.demo import toy_overrides

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("trees", nargs="+", type=Path)
    args = parser.parse_args()
    folder = Path(".cache/toy") / f"seed{args.seed}"
    recipe = load_recipe("recipes/toy.yaml", toy_overrides(folder, "unused", 3, 0.9, "questions.jsonl")
                         + ["reward.yes_no=off"])   # the plain CLIP scorer: the old score of a fragment
    plain = build_visual_scorer(recipe)
    question = re.compile(recipe.reward.claim_question, re.IGNORECASE)
    for path in args.trees:
        counts = {"new": [0, 0], "old": [0, 0]}   # [yes/no pairs, of them with a fragment chosen]
        for line in path.read_text().splitlines():
            tree = json.loads(line)
            if not question.search(tree["prompt"] or ""):
                continue
            old = copy.deepcopy(tree)
            fragments = [n for n in old["nodes"] if n["parent"] == 0 and not ANSWER.match(n["text"].strip())]
            if fragments:
                image = load_image(tree["image"])
                scores = plain.visual([SentenceInContext(tree["image"], image, n["text"].strip(), tree["prompt"])
                                       for n in fragments])
                for node, r_i in zip(fragments, scores):
                    node["r_i"], node["reward"] = r_i, calibrated_reward(r_i, node["r_t"], recipe.reward.lambda_)
            for name, version in (("new", tree), ("old", old)):
                pair, _ = curate_tree(version, recipe.curation)
                if pair is not None:
                    counts[name][0] += 1
                    counts[name][1] += ANSWER.match(pair.chosen.text) is None
        print(f"{path}: chosen fragments {counts['new'][1]} of {counts['new'][0]} yes/no pairs as scored now, "
              f"{counts['old'][1]} of {counts['old'][0]} with fragments scored as plain sentences")


if __name__ == "__main__":
    main()
