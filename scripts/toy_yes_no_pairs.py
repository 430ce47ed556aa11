"""How often the chosen side of a run's yes/no pairs is the true answer (docs/results.md, "Yes/no questions").

    .venv/bin/python scripts/toy_yes_no_pairs.py --seed 3 runs/s3/YN/seed3/iter_1/pairs.jsonl

The pairs of `recipes/toy.yaml` whose prompt id is ``<scene>-<kind>`` ask "Is there a <kind> in
the image?". Counted per kind of question: a present kind, the absent world partner of a present
kind (the prior's hallucination), any other absent kind; the truth is the seed's CSR truth file.
The rewards that chose the pairs saw no truth.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter

from csr_plugin.toy.world import KINDS, PAIRED


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("pairs", help="a pairs.jsonl of a run of recipes/toy.yaml")
    args = parser.parse_args()
    with open(f".cache/toy/seed{args.seed}/csr/truth.jsonl") as f:
        truth = {t["id"]: set(t["objects"]) for t in map(json.loads, f)}
    counts = Counter()
    with open(args.pairs) as f:
        for pair in map(json.loads, f):
            scene, _, kind = pair["id"].rpartition("-")
            if kind not in KINDS:
                continue   # a description pair
            said_yes = pair["chosen"][-1]["content"][0]["text"].strip().lower().startswith("yes")
            present = kind in truth[scene]
            asked = "present" if present else ("absent partner" if PAIRED[kind] in truth[scene] else "other absent")
            counts[asked, said_yes == present] += 1
    for asked in ("present", "absent partner", "other absent"):
        right, total = counts[asked, True], counts[asked, True] + counts[asked, False]
        print(f"{asked:15} chosen answer true in {right} of {total} pairs")


if __name__ == "__main__":
    main()
