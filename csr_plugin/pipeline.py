"""`csr run`: the iterative CSR loop, resumable at every stage.

For t = 1..T: sample with iterate t-1 -> curate -> DPO with reference iterate t-1
-> iterate t. Layout under ``output_dir``::

    iter_<t>/trees.jsonl, errors.jsonl   sampling (resumable by itself)
    iter_<t>/pairs.jsonl                 curation (atomic; recomputed from the trees)
    iter_<t>/dpo/final/                  the new iterate (``.complete`` once whole)
    iter_<t>/timing.jsonl                wall time of every stage attempt
    metrics.jsonl, metrics.png           one row per finished iteration, pair diagnostics included
    holdout_base.jsonl, iter_<t>/holdout.jsonl
                                         with loop.holdout: each iterate's scored held-out answers (holdout.py)
    logs/                                warnings, library logs, the DPO ranks' output (quiet default)
    results.json                         hallucination per iterate, 0 = the starting model
                                         (with an ``eval`` section: CHAIR and POPE), the held-out
                                         reward per iterate and the ``selected`` one (loop.holdout)

Rerunning after a kill anywhere continues where it stopped: finished trees are
kept, a DPO run resumes from its last DeepSpeed checkpoint, finished stages are skipped.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from csr_plugin.accelerator import release_memory
from csr_plugin.config import Recipe, load_recipe
from csr_plugin.curation import curate_file
from csr_plugin.holdout import declined, selected_iterate
from csr_plugin.multimodal import model_control_token_ids
from csr_plugin.jsonl import JsonlAppender, load_records, write_jsonl_atomic

log = logging.getLogger(__name__)


def iterate_path(recipe: Recipe, t: int) -> str:
    """Model of iterate t (0 = the starting model)."""
    return recipe.model.path if t == 0 else str(Path(recipe.output_dir) / f"iter_{t}" / "dpo" / "final")


class _Timer:
    def __init__(self, folder: Path, stage: str):
        self.path, self.stage = folder / "timing.jsonl", stage

    def __enter__(self):
        self.start = time.monotonic()
        return self

    def __exit__(self, *exc):
        with JsonlAppender(self.path) as out:
            out.append({"stage": self.stage, "seconds": round(time.monotonic() - self.start, 3),
                        "finished": exc[0] is None})


def _sample_stage(recipe: Recipe, t: int, folder: Path):
    import dataclasses

    from csr_plugin.run_logs import say
    from csr_plugin.sampling.local import sample
    from csr_plugin.sampling.prompts import load_prompts

    model = dataclasses.replace(recipe.model, path=iterate_path(recipe, t - 1))
    # a fresh draw per iteration, reproducible per (seed, iteration)
    search = dataclasses.replace(recipe.search, seed=recipe.search.seed + 1000 * t)
    stage_recipe = dataclasses.replace(recipe, model=model, search=search, output_dir=str(folder))
    say(f"iteration {t}: sampling {len(load_prompts(recipe.data.prompts, recipe.data.limit)[0])} prompts ...")
    with _Timer(folder, "sample"):
        if recipe.loop.sample_on == "ray":
            from csr_plugin.sampling.ray_driver import sample_on_ray

            summary = sample_on_ray(stage_recipe, recipe.loop.ray_actors, recipe.loop.ray_address or None)
            _prompt_order(folder / "trees.jsonl", recipe)
        else:
            summary = sample(stage_recipe, leave=False)
    say(f"iteration {t}: {summary}")
    release_memory()  # the DPO ranks need the GPU the sampler's engine and CLIP (or reward.mrm) used
    return summary


def _prompt_order(trees_path: Path, recipe: Recipe) -> None:
    """Trees in the prompts file's order, as a local run writes them: Ray actors finish chunks in any
    order, and the pairs' order (so DPO's shuffled batches, so the next iterate) follows the trees'."""
    from csr_plugin.sampling.prompts import load_prompts

    order = {p.id: i for i, p in enumerate(load_prompts(recipe.data.prompts, recipe.data.limit)[0])}
    trees = load_records(trees_path)
    ordered = sorted(trees, key=lambda tree: order.get(tree["id"], len(order)))
    if ordered != trees:
        write_jsonl_atomic(trees_path, ordered)


def _iteration_metrics(t: int, folder: Path, curation, recipe: Recipe) -> dict:
    from csr_plugin.diagnostics import pair_diagnostics
    from csr_plugin.training.trainer import metrics_summary

    pairs = [p for p in load_records(folder / "pairs.jsonl") if p.get("kind") != "go_on"]  # best-worst ones
    mean = lambda key: sum(p[key] for p in pairs) / len(pairs) if pairs else None  # noqa: E731
    times: dict[str, float] = {}
    for row in load_records(folder / "timing.jsonl"):
        times[row["stage"]] = times.get(row["stage"], 0.0) + row["seconds"]
    errors = {r["id"] for r in load_records(folder / "errors.jsonl")}
    return {
        "iteration": t,
        "prompts_sampled": len(load_records(folder / "trees.jsonl")), "prompts_skipped": len(errors),
        "pairs": curation.pairs, "pairs_skipped": sum(curation.skipped.values()),
        "chosen_reward": mean("chosen_reward"), "rejected_reward": mean("rejected_reward"),
        "reward_margin": (mean("chosen_reward") - mean("rejected_reward")) if pairs else None,
        "chosen_r_i": mean("chosen_r_i"), "rejected_r_i": mean("rejected_r_i"),
        **pair_diagnostics(folder / "trees.jsonl", folder / "pairs.jsonl", recipe.data.truth, recipe.eval.vocabulary,
                           recipe.reward.claim_question),   # judged whatever reward.yes_no: a control run too
        **{f"dpo_{k}": v for k, v in metrics_summary(str(folder / "dpo" / "dpo_metrics.jsonl")).items()},
        **{f"seconds_{stage}": round(s, 2) for stage, s in times.items()},
    }


def _evaluate_iterate(recipe: Recipe, t: int, path: Path) -> dict:
    import dataclasses

    from csr_plugin.eval.evaluate import evaluate_cached
    from csr_plugin.run_logs import say

    say(f"iteration {t}: eval ..." if t else "iteration 0: eval of the starting model ...")
    result = evaluate_cached(dataclasses.replace(recipe.model, path=iterate_path(recipe, t)), recipe.eval, path)
    return {"iteration": t, "chair_s": result["chair_s"], "chair_i": result["chair_i"],
            "pope_f1": result["pope_f1"], "object_recall": result["object_recall"],
            "pope_adversarial_f1": result["pope_adversarial"]["f1"]}


def _holdout(recipe: Recipe, t: int, out: Path, history: list[dict]) -> dict:
    """Iterate t's held-out reward (loop.holdout), appended to ``history``; {} when off."""
    from csr_plugin.holdout import score_iterate
    from csr_plugin.run_logs import say

    if not recipe.loop.holdout:
        return {}
    base = out / "holdout_base.jsonl"
    say(f"iteration {t}: held-out reward ..." if t else "iteration 0: held-out reward of the starting model ...")
    result = score_iterate(recipe, iterate_path(recipe, t), out / f"iter_{t}" / "holdout.jsonl" if t else base, base)
    history.append({"iteration": t, **result})
    return {k: v for k, v in result.items() if k != "holdout_scores"}   # per prompt: for the paired test only


def run(config_path: str, overrides: list[str] | None = None, on_iteration=None) -> list[dict]:
    """All iterations; ``on_iteration(row)`` is called as each one finishes (the demo prints it)."""
    from csr_plugin.run_logs import say, subprocess_log
    from csr_plugin.training.dpo_main import is_complete
    from csr_plugin.training.launch import preflight, run_dpo

    overrides = list(overrides or [])
    recipe = load_recipe(config_path, overrides)
    preflight(recipe, loop=True)
    if recipe.loop.holdout:
        from csr_plugin.holdout import check_disjoint, learnt_judge_note

        check_disjoint(recipe)
        if note := learnt_judge_note(recipe):
            say(note)
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, hallucination, holdout = [], [], []
    if recipe.eval.prompts:
        hallucination.append(_evaluate_iterate(recipe, 0, out / "eval_base.json"))
    start = _holdout(recipe, 0, out, holdout)
    if on_iteration and (hallucination or holdout):
        on_iteration({"iteration": 0, **(hallucination[0] if hallucination else {}), **start})
    for t in range(1, recipe.loop.iterations + 1):
        folder = out / f"iter_{t}"
        folder.mkdir(parents=True, exist_ok=True)
        dpo_dir = folder / "dpo"
        if not is_complete(dpo_dir):
            _sample_stage(recipe, t, folder)
        else:
            say(f"iteration {t}: already trained ({dpo_dir / 'final'}); sampling and DPO skipped")
        with _Timer(folder, "curate"):
            curation = curate_file(folder / "trees.jsonl", folder / "pairs.jsonl", recipe.curation,
                                   model_control_token_ids(recipe.model))
        say(f"iteration {t}: {curation}")
        if not is_complete(dpo_dir):
            if curation.pairs < recipe.dpo.batch:
                raise RuntimeError(f"iteration {t}: {curation.pairs} pairs is fewer than dpo.batch="
                                   f"{recipe.dpo.batch}; sample more prompts or lower dpo.batch.")
            dpo_log = subprocess_log(out, f"dpo_iter{t}")   # None with --verbose: the ranks print here
            resuming = " resuming from its last checkpoint," if (dpo_dir / "ds_ckpt" / "latest").exists() else ""
            say(f"iteration {t}: DPO{resuming} on {curation.pairs} pairs (batch {recipe.dpo.batch}, {recipe.dpo.epochs} "
                f"epoch{'s' if recipe.dpo.epochs != 1 else ''}) ..." + (f"  ranks' log: {dpo_log}" if dpo_log else ""))
            with _Timer(folder, "dpo"):
                code = run_dpo(recipe, config_path, overrides, iterate_path(recipe, t - 1),
                               str(folder / "pairs.jsonl"), str(dpo_dir), log_file=dpo_log)
            if code != 0:
                raise RuntimeError(f"iteration {t}: DPO exited with code {code}"
                                   + (f" (ranks' log: {dpo_log})" if dpo_log else "") + "; rerun `csr run` to resume.")
        row = _iteration_metrics(t, folder, curation, recipe)
        if recipe.eval.prompts:
            hallucination.append(_evaluate_iterate(recipe, t, folder / "eval.json"))
            row.update({k: v for k, v in hallucination[-1].items() if k != "iteration"})
        row.update(_holdout(recipe, t, out, holdout))
        if hallucination or holdout:
            _write_results(out / "results.json", hallucination, holdout, recipe.loop.holdout_z)
        rows.append(row)
        write_jsonl_atomic(out / "metrics.jsonl", rows)
        plot_metrics(rows, out / "metrics.png", hallucination)
        if on_iteration:
            on_iteration(row)
        if _declined(recipe, holdout) and recipe.loop.on_decline == "stop":
            chosen = selected_iterate(holdout, recipe.loop.holdout_z)
            say(f"stopping after iteration {t} (loop.on_decline: stop); use iterate {chosen}: "
                f"{iterate_path(recipe, chosen)}")
            break
    return rows


def _declined(recipe: Recipe, holdout: list[dict]) -> bool:
    """Says so when the newest iteration lowered the held-out reward."""
    from csr_plugin.run_logs import say

    if not declined(holdout, recipe.loop.holdout_z):
        return False
    before, now, z = holdout[-2], holdout[-1], recipe.loop.holdout_z
    say(f"iteration {now['iteration']} LOWERED the held-out reward: {before['holdout_reward']:.3f} -> "
        f"{now['holdout_reward']:.3f} (iterate {before['iteration']} -> {now['iteration']}, beyond {z:g} standard "
        f"errors); best so far: iterate {selected_iterate(holdout, z)}")
    return True


def _write_results(path: Path, hallucination: list[dict], holdout: list[dict] | None = None,
                   z: float = 2.0) -> None:
    results: dict = {"iterations": hallucination}
    if holdout:   # the iterate to use, chosen without ground truth
        results.update(holdout=[{k: v for k, v in row.items() if k != "holdout_scores"} for row in holdout],
                       selected=selected_iterate(holdout, z))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)


def plot_metrics(rows: list[dict], path: Path, hallucination: list[dict] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("pairs", ["pairs", "pairs_skipped"]), ("calibrated reward", ["chosen_reward", "rejected_reward"]),
              ("image relevance R_I", ["chosen_r_i", "rejected_r_i"]),
              ("fluency (mean token log-prob)", ["diag_chosen_fluency", "diag_rejected_fluency"]),
              ("DPO (last step)", ["dpo_last_loss_mean", "dpo_last_acc_mean"])]
    if any("diag_informative_pairs" in r for r in rows):  # the prompts' ground truth is known
        panels.insert(4, ("pairs vs ground truth", ["diag_chosen_chair_i", "diag_rejected_chair_i",
                                                    "diag_informative_pairs", "diag_clean_expansions"]))
    series = [rows] * len(panels)
    if hallucination:  # iterate 0 (the starting model) included
        panels.append(("hallucination", ["chair_s", "chair_i", "pope_f1", "object_recall"]))
        series.append(hallucination)
    columns = 4
    grid_rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(grid_rows, columns, figsize=(4 * columns, 3.2 * grid_rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, keys), data in zip(axes.flat, panels, series):
        iterations = [r["iteration"] for r in data]
        for key in keys:
            values = [r.get(key) for r in data]
            if any(v is not None for v in values):
                ax.plot(iterations, [float("nan") if v is None else v for v in values], marker="o", label=key)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.set_xticks(iterations)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_table(rows: list[dict]) -> str:
    lines = [f"{'iter':>4} {'pairs':>6} {'margin':>8} {'R_I+':>7} {'R_I-':>7} {'dpo loss':>9} {'dpo acc':>8}"]
    fmt = lambda v, spec: format(v, spec) if isinstance(v, (int, float)) else "-"  # noqa: E731
    for r in rows:
        lines.append(f"{r['iteration']:>4} {r['pairs']:>6} {fmt(r['reward_margin'], '8.3f')} "
                     f"{fmt(r['chosen_r_i'], '7.2f')} {fmt(r['rejected_r_i'], '7.2f')} "
                     f"{fmt(r.get('dpo_last_loss_mean'), '9.4f')} {fmt(r.get('dpo_last_acc_mean'), '8.2f')}")
    return "\n".join(lines)

