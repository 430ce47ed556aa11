"""One table of several training methods on the same toy seeds (docs/results.md, "Methods side by side").

    .venv/bin/python scripts/toy_method_table.py --seeds 0 1 2 3 4 --base runs/s33/toy-seed{seed} \\
        "CSR-DPO, recipes/toy.yaml=runs/s33/toy-seed{seed}" "PPO, step-wise=runs/s34/ppo-step-seed{seed}"

Each method is LABEL=FOLDER, FOLDER holding ``{seed}``. A folder is either a `csr demo --output` folder
(results.json: the last iterate counts, iter_<t>/eval.json its mentions; iter_<t>/timing.jsonl: the wall time of sampling, curation and DPO;
iter_<t>/trees.jsonl: the tokens the search generated) or a `csr train-ppo` output folder with eval.json
(`csr eval --out`), wall.json ({"train_seconds": ...}) and ppo/tensorboard (the rollouts' tokens), or a decoding
folder: eval.json and wall.json ({"train_seconds": the reward model's, "decode_seconds": ...}), no tokens counted.
A demo folder's wall.json {"reward_model_seconds": ...} adds a reward model trained for the loop. Changes are
against the base model's evaluation in --base (a demo folder of the same seed: its iterate 0), so every method
of a seed is compared with one base measurement. The first method is the reference of the paired comparison:
for every other method, the per-seed difference of the CHAIR_i change, its mean and standard error (a ranking
"holds" when the mean is beyond 2 standard errors), and the same for the recall change.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from toy_seed_table import meets   # the per-seed targets, one definition (scripts/ is on sys.path when run)

from csr_plugin.jsonl import load_records

KEYS = ("chair_i", "chair_s", "object_recall", "pope_f1", "mentions", "hallucinated_mentions")


def base_of(folder: Path) -> dict:
    return {**json.loads((folder / "results.json").read_text())["iterations"][0],
            **_counts(folder / "eval_base.json")}


def _counts(path: Path) -> dict:
    """Object mentions and hallucinated ones in the evaluation captions (not in results.json's rows)."""
    result = json.loads(path.read_text())
    return {"mentions": result["mentions"], "hallucinated_mentions": result["hallucinated_mentions"]}


def demo_run(folder: Path) -> dict:
    last = json.loads((folder / "results.json").read_text())["iterations"][-1]
    last = {**last, **_counts(folder / f"iter_{last['iteration']}" / "eval.json")}
    seconds = sum(row["seconds"] for t in folder.glob("iter_*/timing.jsonl") for row in load_records(t))
    tokens = sum(len(node["token_ids"]) for t in folder.glob("iter_*/trees.jsonl") for tree in load_records(t)
                 for node in tree["nodes"])
    if (folder / "wall.json").exists():   # a reward model trained for the loop (reward.source: mrm)
        seconds += json.loads((folder / "wall.json").read_text()).get("reward_model_seconds", 0)
    return {**{k: last[k] for k in KEYS}, "seconds": seconds, "tokens": tokens}


def decode_run(folder: Path) -> dict:
    """A decoding method of the base model (PARGS): its reward model's training and the decoding count."""
    result = json.loads((folder / "eval.json").read_text())
    wall = json.loads((folder / "wall.json").read_text())
    return {**{k: result[k] for k in KEYS}, "seconds": wall["train_seconds"] + wall["decode_seconds"],
            "tokens": None}


def ppo_run(folder: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = json.loads((folder / "eval.json").read_text())
    logs = sorted((folder / "ppo" / "tensorboard").glob("*/events.out.tfevents.*"))   # <run name>/
    if not logs:
        raise FileNotFoundError(f"{folder}/ppo/tensorboard holds no events: run with logging.tensorboard: true")
    events = EventAccumulator(str(logs[-1]))
    events.Reload()
    lengths = events.Scalars("train/rollout/response_length_mean")
    counts = {e.step: e.value for e in events.Scalars("train/rollout/num_samples")}
    tokens = sum(e.value * counts[e.step] for e in lengths)
    seconds = json.loads((folder / "wall.json").read_text())["train_seconds"]
    return {**{k: result[k] for k in KEYS}, "seconds": seconds, "tokens": tokens}


def load(folder: Path) -> dict | None:
    if (folder / "results.json").exists() and len(json.loads((folder / "results.json").read_text())["iterations"]) > 1:
        return demo_run(folder)
    if (folder / "eval.json").exists() and (folder / "wall.json").exists():
        return ppo_run(folder) if (folder / "ppo").is_dir() else decode_run(folder)
    return None


def _mean_sd(values: list[float], spec: str) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{format(statistics.mean(values), spec)} ± {format(sd, spec.lstrip('+'))}"


def _tokens(runs: dict) -> str:
    counted = [r["tokens"] for r in runs.values() if r["tokens"] is not None]
    return f"{statistics.mean(counted) / 1000:.0f}k" if len(counted) == len(runs) else "not counted"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("methods", nargs="+", help="LABEL=FOLDER, FOLDER with {seed}")
    parser.add_argument("--seeds", nargs="+", type=int, required=True)
    parser.add_argument("--base", required=True, help="demo folder with {seed} whose iterate 0 is the base")
    args = parser.parse_args()
    bases = {s: base_of(Path(args.base.format(seed=s))) for s in args.seeds}
    print("| seeds | " + " | ".join(f"{s}" for s in args.seeds) + " |")
    print("|---|" + "---|" * len(args.seeds))
    print("| base CHAIR_i | " + " | ".join(f"{bases[s]['chair_i']:.3f}" for s in args.seeds) + " |")
    print("| base true / hallucinated mentions | " + " | ".join(
        f"{bases[s]['mentions'] - bases[s]['hallucinated_mentions']} / {bases[s]['hallucinated_mentions']}"
        for s in args.seeds) + " |\n")
    print("| method | seeds | CHAIR_i change (per seed) | CHAIR_s | recall | POPE F1 | true / hallucinated mentions "
          "| every target | minutes | generated tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    changes, recalls = {}, {}
    for spec in args.methods:
        label, pattern = spec.split("=", 1)
        runs = {s: load(Path(pattern.format(seed=s))) for s in args.seeds}
        runs = {s: r for s, r in runs.items() if r is not None}
        if not runs:
            print(f"| {label} | none finished | | | | | | | | |")
            continue
        delta = lambda key: [runs[s][key] - bases[s][key] for s in runs]  # noqa: E731
        change = {s: runs[s]["chair_i"] / bases[s]["chair_i"] - 1 for s in runs}
        changes[label] = change
        recalls[label] = {s: runs[s]["object_recall"] - bases[s]["object_recall"] for s in runs}
        per_seed = ", ".join(f"{c:+.0%}" for c in change.values())
        true = [(runs[s]["mentions"] - runs[s]["hallucinated_mentions"]) / (bases[s]["mentions"]
                - bases[s]["hallucinated_mentions"]) - 1 for s in runs]
        false = [runs[s]["hallucinated_mentions"] / bases[s]["hallucinated_mentions"] - 1 for s in runs]
        print(f"| {label} | {', '.join(map(str, runs))} | {_mean_sd(list(change.values()), '+.0%')} ({per_seed}) | "
              f"{_mean_sd(delta('chair_s'), '+.3f')} | {_mean_sd(delta('object_recall'), '+.3f')} | "
              f"{_mean_sd(delta('pope_f1'), '+.3f')} | {statistics.mean(true):+.0%} / {statistics.mean(false):+.0%} | "
              f"{sum(meets(change[s], *(runs[s][k] - bases[s][k] for k in ('object_recall', 'pope_f1'))) for s in runs)}"
              f" of {len(runs)} | "
              f"{statistics.mean(r['seconds'] for r in runs.values()) / 60:.0f} | "
              f"{_tokens(runs)} |")
    labels = list(changes)
    for other in labels[1:]:
        seeds = [s for s in changes[labels[0]] if s in changes[other]]
        if len(seeds) < 2:
            continue
        diff = [changes[other][s] - changes[labels[0]][s] for s in seeds]
        se = statistics.stdev(diff) / math.sqrt(len(diff))
        verdict = "holds" if abs(statistics.mean(diff)) > 2 * se else "does not hold"
        if len(diff) < 3:   # two differences give a standard error, not a believable one
            verdict = "is not judged on fewer than 3 seeds"
        print(f"\n{other} minus {labels[0]}, CHAIR_i change on seeds {seeds}: {statistics.mean(diff):+.1%} "
              f"(standard error {se:.1%}, per seed {', '.join(f'{d:+.0%}' for d in diff)}): the ranking {verdict}")
        recall = [recalls[other][s] - recalls[labels[0]][s] for s in seeds]
        print(f"  recall change, the same difference: {statistics.mean(recall):+.3f} (standard error "
              f"{statistics.stdev(recall) / math.sqrt(len(recall)):.3f})")


if __name__ == "__main__":
    main()
