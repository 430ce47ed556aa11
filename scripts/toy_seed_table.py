"""Per-seed and mean ± sd table of `csr demo` runs (docs/results.md, "Today's recipe on this machine").

    .venv/bin/python scripts/toy_seed_table.py runs/s33/toy-seed*        # one row per run folder

Each folder is a `csr demo --output` folder: results.json (CHAIR and POPE per iterate, the held-out
reward and the selected iterate), metrics.jsonl (pair diagnostics per iteration) and iter_<t>/timing.jsonl.
Columns: CHAIR_i per iterate, the change to the last iterate and to the selected one (loop.holdout), recall
and POPE F1 changes to the selected iterate, the share of fragments among the chosen yes/no replies per
iteration, the held-out reward per iterate and the wall time of the iterations (sampling, DPO, curation).
A seed meets the per-seed targets when CHAIR_i falls by at least 40%, recall by at most 0.05 and POPE F1 by at
most 0.01 (POPE F1 may rise).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def load(folder: Path) -> dict:
    results = json.loads((folder / "results.json").read_text())
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    seconds = 0.0
    for timing in folder.glob("iter_*/timing.jsonl"):
        seconds += sum(json.loads(line)["seconds"] for line in timing.read_text().splitlines())
    its = results["iterations"]
    chosen = results.get("selected", its[-1]["iteration"])
    base, last, sel = its[0], its[-1], its[chosen]
    change = lambda row: (row["chair_i"] - base["chair_i"]) / base["chair_i"]  # noqa: E731
    return {
        "run": folder.name, "chair_i": [r["chair_i"] for r in its], "last": change(last), "selected": chosen,
        "selected_change": change(sel), "recall": sel["object_recall"] - base["object_recall"],
        "pope_f1": sel["pope_f1"] - base["pope_f1"], "last_recall": last["object_recall"] - base["object_recall"],
        "last_pope_f1": last["pope_f1"] - base["pope_f1"],
        "fragments": [m.get("diag_chosen_fragments") for m in metrics],
        "holdout": [h["holdout_reward"] for h in results.get("holdout", [])],
        "pairs": [m["pairs"] for m in metrics], "minutes": seconds / 60,
    }


def meets(change: float, recall: float, pope: float) -> bool:
    return change <= -0.40 and recall >= -0.05 and pope >= -0.01


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    rows = [load(folder) for folder in parser.parse_args().runs if (folder / "results.json").exists()]
    fmt = lambda values, spec: " → ".join("-" if v is None else format(v, spec) for v in values)  # noqa: E731
    print("| run | CHAIR_i per iterate | last | selected | recall | POPE F1 | targets (selected / last) "
          "| chosen fragments | held-out reward | pairs | minutes |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ok = (meets(r["selected_change"], r["recall"], r["pope_f1"]), meets(r["last"], r["last_recall"],
                                                                           r["last_pope_f1"]))
        print(f"| {r['run']} | {fmt(r['chair_i'], '.3f')} | {r['last']:+.0%} | {r['selected_change']:+.0%} "
              f"(iterate {r['selected']}) | {r['recall']:+.3f} | {r['pope_f1']:+.3f} | "
              f"{'✓' if ok[0] else '✗'} / {'✓' if ok[1] else '✗'} | {fmt(r['fragments'], '.0%')} | "
              f"{fmt(r['holdout'], '.2f')} | {fmt(r['pairs'], 'd')} | {r['minutes']:.0f} |")
    if len(rows) > 1:
        def spread(key):
            values = [r[key] for r in rows]
            return f"{statistics.mean(values):+.0%} ± {statistics.stdev(values):.0%}" if key.endswith(
                ("last", "change")) else f"{statistics.mean(values):+.3f} ± {statistics.stdev(values):.3f}"
        print(f"\n{len(rows)} runs: CHAIR_i change last {spread('last')}, selected {spread('selected_change')}; "
              f"recall {spread('recall')}, POPE F1 {spread('pope_f1')} (selected); targets met: "
              f"{sum(meets(r['selected_change'], r['recall'], r['pope_f1']) for r in rows)} selected, "
              f"{sum(meets(r['last'], r['last_recall'], r['last_pope_f1']) for r in rows)} last")


if __name__ == "__main__":
    main()
