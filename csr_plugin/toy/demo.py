"""`csr demo`: the toy world end to end, proving on a laptop what the paper claims.

Builds (once per seed, cached) the world's splits and its tiny pretrained models, then
runs ``loop.iterations`` CSR iterations through the real pipeline - sampler, curation,
the ZeRO-3 multimodal DPO trainer, evaluation - and prints a row per iteration.
Everything lands in the output folder: results.json (CHAIR_s, CHAIR_i, POPE F1 per
iterate, 0 = the base model), metrics.jsonl and plots.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from csr_plugin.toy import world

# Split sizes and training steps: the full demo, and a quick one (CI, smoke tests) whose models
# are weaker but built in about a minute.
# 500 eval answers: CHAIR_i then has a binomial standard error near 0.01 (150 gave 0.02, as large as
# the differences between recipes); the models do not depend on it.
# SFT scenes whose examples DPO mixes in (dpo.sft_data): 1,536 examples, more than three iterations use.
SFT_MIX_SCENES = 512
# the CSR prompt files csr demo writes per seed, and their truth: descriptions only (recipes/toy-describe.yaml),
# or with a yes/no question about every kind (recipes/toy.yaml, write_yes_no_prompts)
CSR_TRUTH = {"prompts.jsonl": "truth.jsonl", "questions.jsonl": "questions_truth.jsonl"}
# holdout: CSR scenes after the csr split's (the same draw, so the csr split is unchanged), never sampled for
# pairs: their prompts score each iterate by the calibrated reward alone (loop.holdout, csr_plugin/holdout.py)
SIZES = {"full": {"sft": 4000, "csr": 256, "holdout": 64, "eval": 500, "clip": 4000, "clip_steps": 600,
                  "vlm_steps": 1500},
         "quick": {"sft": 1500, "csr": 32, "holdout": 8, "eval": 40, "clip": 1500, "clip_steps": 150,
                   "vlm_steps": 300}}


def prepare_toy(root: str | Path, seed: int, size: str = "full") -> Path:
    """World splits and trained tiny models under ``root/seed<N>[-quick]``; each piece built once."""
    from csr_plugin.toy.train_models import CLIP_RECIPE, VLM_RECIPE, train_clip, train_vlm

    sizes = SIZES[size]
    folder = Path(root) / (f"seed{seed}" if size == "full" else f"seed{seed}-{size}")
    folder.mkdir(parents=True, exist_ok=True)
    scenes = {split: world.make_split(split, sizes[split], seed) for split in ("sft", "csr", "eval", "clip")}
    scenes["holdout"] = world.make_split("csr", sizes["csr"] + sizes["holdout"], seed)[sizes["csr"]:]
    for split in ("csr", "holdout", "eval"):
        write_split_once(scenes[split], folder / split, seed)
    write_yes_no_prompts(folder / "csr")
    write_yes_no_prompts(folder / "holdout")
    write_sft_mix_once(scenes["sft"][:SFT_MIX_SCENES], folder / "sft", seed)
    world.vocabulary_json(folder / "objects.json")
    # a cache built by an older recipe of the toy CLIP is rebuilt, not silently reused
    clip_rebuilt = _stale(folder / "clip", "toy-clip.pt", CLIP_RECIPE)
    if clip_rebuilt:
        # the full build's CLIP must see (quick models are for smoke tests: their CLIP is not checked)
        probe = world.make_split("clip", sizes["clip"] + 200, seed)[sizes["clip"]:] if size == "full" else None
        train_clip(scenes["clip"], folder / "clip", sizes["clip_steps"], seed, probe=probe)
        (folder / "clip" / "recipe.txt").write_text(CLIP_RECIPE)
    vlm_recipe = f"{VLM_RECIPE}; {CLIP_RECIPE}"   # its image tower is the CLIP's: rebuilt with it
    if clip_rebuilt or _stale(folder / "vlm", "model.safetensors", vlm_recipe):
        train_vlm(scenes["sft"], folder / "vlm", sizes["vlm_steps"], seed, folder / "clip")
        (folder / "vlm" / "recipe.txt").write_text(vlm_recipe)
    return folder


def write_split_once(scenes: list[world.Scene], folder: Path, seed: int) -> None:
    """Written whole again when its size changed (another SIZES) or an earlier write was cut off."""
    if _lines(folder / "truth.jsonl") != len(scenes):
        shutil.rmtree(folder, ignore_errors=True)
        world.write_split(scenes, folder, seed)


def write_yes_no_prompts(folder: Path) -> Path:
    """``data.prompts`` of the toy recipe: each CSR scene's description prompt, then "Is there a K in the
    image?" for every kind K of the world, whatever the scene holds (no labels: the claim reward,
    reward.yes_no, decides). ``questions_truth.jsonl`` repeats the scene's truth under each id, for the
    pair diagnostics. Derived from prompts.jsonl, so rewritten every time (it is small)."""
    prompts = [json.loads(line) for line in (folder / "prompts.jsonl").read_text().splitlines()]
    truth = {t["id"]: t for t in map(json.loads, (folder / "truth.jsonl").read_text().splitlines())}
    rows = []
    for prompt in prompts:
        rows.append((prompt, truth[prompt["id"]]))
        for kind in world.KINDS:
            asked = {"id": f"{prompt['id']}-{kind}", "image": prompt["image"],
                     "question": f"Is there a {kind} in the image?"}
            rows.append((asked, {**truth[prompt["id"]], "id": asked["id"]}))
    for name, column in (("questions.jsonl", 0), ("questions_truth.jsonl", 1)):
        partial = folder / f"{name}.partial"
        partial.write_text("".join(json.dumps(row[column]) + "\n" for row in rows))
        partial.rename(folder / name)   # whole or absent
    return folder / "questions.jsonl"


def write_sft_mix_once(scenes: list[world.Scene], folder: Path, seed: int) -> Path:
    """``dpo.sft_data`` of the toy recipe: the base model's own SFT examples (a caption and two yes/no
    probes per scene) of the first SFT scenes, as training/sft_mix.py reads them."""
    from csr_plugin.toy.train_models import sft_examples

    path = folder / "sft.jsonl"
    examples = sft_examples(scenes, seed)   # its rng runs scene by scene: the base model's first examples
    if _lines(path) == len(examples):
        return path
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "images").mkdir(parents=True)
    for scene in scenes:
        scene.draw().save(folder / "images" / f"{scene.id}.png")
    partial = path.with_suffix(".jsonl.partial")
    with open(partial, "w") as f:
        for i, question, answer in examples:
            f.write(json.dumps({
                "images": [f"images/{scenes[i].id}.png"],
                "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                "response": [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]}) + "\n")
    partial.rename(path)   # whole or absent: a cut-off write is redone
    return path


def _lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path) as f:
        return sum(1 for _ in f)


def _stale(folder: Path, weights: str, recipe: str) -> bool:
    marker = folder / "recipe.txt"
    return not (folder / weights).exists() or not marker.exists() or marker.read_text() != recipe


def toy_overrides(folder: Path, output: str, iterations: int, lambda_: float,
                  prompts: str = "prompts.jsonl", sft: bool = True) -> list[str]:
    """The recipe's paths for this seed's folder; ``prompts``: which CSR prompt file (CSR_TRUTH); ``sft``: whether
    the recipe mixes SFT examples into DPO (recipes/toy-paper.yaml does not)."""
    if prompts not in CSR_TRUTH:
        raise ValueError(f"a toy recipe's data.prompts must end in one of {', '.join(CSR_TRUTH)}, got {prompts!r}: "
                         "csr demo writes those for each seed.")
    return [f"model.path={folder / 'vlm'}", f"clip.config={folder / 'clip' / 'toy-clip.json'}",
            f"clip.pretrained={folder / 'clip' / 'toy-clip.pt'}", f"data.prompts={folder / 'csr' / prompts}",
            f"data.truth={folder / 'csr' / CSR_TRUTH[prompts]}", f"loop.holdout={folder / 'holdout' / prompts}",
            f"reward.claim_vocabulary={folder / 'objects.json'}",
            f"eval.prompts={folder / 'eval' / 'prompts.jsonl'}", f"eval.truth={folder / 'eval' / 'truth.jsonl'}",
            f"eval.vocabulary={folder / 'objects.json'}",
            *([f"dpo.sft_data={folder / 'sft' / 'sft.jsonl'}"] if sft else []), f"output_dir={output}",
            f"loop.iterations={iterations}", f"reward.lambda={lambda_}"]


def _print_row(row: dict) -> None:
    """Hallucination of the iterate, then what its training pairs looked like (iteration >= 1)."""
    fmt = lambda key, spec: format(row[key], spec) if isinstance(row.get(key), (int, float)) else "-"  # noqa: E731
    if row["iteration"] == 0:
        print(f"\n{'':4} {'evaluation of the iterate':^47} | {'the pairs it was trained on':^40}\n"
              f"{'iter':>4} {'CHAIR_s':>8} {'CHAIR_i':>8} {'POPE F1':>8} {'recall':>7} {'held-out':>8} | "
              f"{'informative':>11} {'CHAIR_i +/-':>12} {'R_I +/-':>11} {'fluency +/-':>12}")
    pairs = ""
    if row["iteration"] > 0:
        pairs = (f"{fmt('diag_informative_pairs', '11.0%')} "
                 f"{fmt('diag_chosen_chair_i', '6.2f')}/{fmt('diag_rejected_chair_i', '<5.2f')} "
                 f"{fmt('chosen_r_i', '5.1f')}/{fmt('rejected_r_i', '<5.1f')} "
                 f"{fmt('diag_chosen_fluency', '6.2f')}/{fmt('diag_rejected_fluency', '<5.2f')}")
    print(f"{row['iteration']:>4} {fmt('chair_s', '8.3f')} {fmt('chair_i', '8.3f')} {fmt('pope_f1', '8.3f')} "
          f"{fmt('object_recall', '7.3f')} {fmt('holdout_reward', '8.2f')} | {pairs}", flush=True)


def run_demo(output: str, seed: int, iterations: int, lambda_: float, recipe: str = "recipes/toy.yaml",
             cache: str = ".cache/toy", extra: list[str] | None = None, size: str = "full") -> dict:
    from csr_plugin.config import load_recipe
    from csr_plugin.pipeline import run

    started = time.monotonic()
    print(f"toy world, seed {seed}: building or loading the world and its tiny models ...", flush=True)
    folder = prepare_toy(cache, seed, size)
    print(f"ready in {time.monotonic() - started:.0f}s; {iterations} CSR iterations with lambda={lambda_}",
          flush=True)
    loaded = load_recipe(recipe)
    prompts = Path(loaded.data.prompts).name   # which CSR prompt file this toy recipe samples
    overrides = toy_overrides(folder, output, iterations, lambda_, prompts, bool(loaded.dpo.sft_data))
    run(recipe, overrides + list(extra or []),
        on_iteration=_print_row)
    results = json.loads((Path(output) / "results.json").read_text())
    # the iterate the held-out reward selects (no ground truth), else the last one
    chosen = results.get("selected", results["iterations"][-1]["iteration"])
    base, last = results["iterations"][0], results["iterations"][chosen]
    change = (last["chair_i"] - base["chair_i"]) / base["chair_i"] if base["chair_i"] else float("nan")
    which = f"iterate {chosen}, selected by the held-out reward" if "selected" in results else f"iterate {chosen}"
    print(f"\nCHAIR_i {base['chair_i']:.3f} -> {last['chair_i']:.3f} ({change:+.0%}), POPE F1 "
          f"{base['pope_f1']:.3f} -> {last['pope_f1']:.3f} ({which}); {time.monotonic() - started:.0f}s in all")
    print(f"results: {Path(output) / 'results.json'}   plot: {Path(output) / 'metrics.png'}")
    return results
