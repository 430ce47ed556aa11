"""The held-out calibrated reward: did an iteration make the model better, by CSR's own reward, with no truth?

``loop.holdout`` is a prompts file (``{id, image, question}``, as ``data.prompts``) that is never sampled
for pairs. After each iterate t (0 = the starting model) `csr run` decodes it greedily with iterate t and
scores each answer sentence by sentence exactly as the search scores a candidate: R_I from the recipe's
visual term (CLIP, its yes/no answers read as claims), R_T from the *starting* model. R_T is read from
one fixed model because every iterate finds its own greedy answer likely: self-scored, a later iterate
would look better for being sharper, not for being grounded.

An answer's score is what curation maximizes: the sum (or with ``curation.length_normalize`` the mean)
of its sentences' calibrated rewards, each less the prompt's baseline when ``curation.reward_baseline``
is ``prompt_mean``. The baseline is the starting model's mean sentence reward on the same prompt, one
fixed yardstick for every iterate, so the starting model scores 0 and an iterate scores above 0 when
its answers say more that the image supports or less that it does not. The iterate's held-out reward
is the mean over the prompts.

An iteration counts as lowering it when the drop exceeds ``loop.holdout_z`` standard errors of the paired
per-prompt difference (noise is not a decline). It is reported; with ``loop.on_decline: stop`` the loop stops
there (the next iteration would start from the worse model). ``selected`` in results.json names the model
to use: the newest iterate, unless it is lower in that sense than the best one, then the best.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from pathlib import Path

from csr_plugin.config import Recipe
from csr_plugin.jsonl import load_records, write_jsonl_atomic
from csr_plugin.reward.yes_no import ANSWER

log = logging.getLogger(__name__)


def answer_holdout(recipe: Recipe, model_path: str, path: Path) -> list[dict]:
    """Greedy answers of ``model_path`` to the held-out prompts, written to ``path`` (reused when whole)."""
    from csr_plugin.accelerator import release_memory
    from csr_plugin.sampling.greedy import generate
    from csr_plugin.sampling.prompts import load_image, load_prompts
    from csr_plugin.sampling.transformers_engine import load_vlm

    prompts, _ = load_prompts(recipe.loop.holdout)
    stored = {r["id"]: r for r in load_records(path)} if path.exists() else {}
    if prompts and all(p.id in stored for p in prompts):
        return [stored[p.id] for p in prompts]
    model, processor = load_vlm(dataclasses.replace(recipe.model, path=model_path))
    try:
        images = {p.image: load_image(p.image) for p in prompts}
        answers = generate(model, processor, [(images[p.image], p.question) for p in prompts],
                           recipe.search.max_sentences * recipe.search.max_new_tokens, recipe.eval.batch, "held-out")
    finally:
        model = None
        release_memory()
    rows = [{"id": p.id, "image": p.image, "question": p.question, "answer": a} for p, a in zip(prompts, answers)]
    write_jsonl_atomic(path, rows)
    return rows


def score_answers(recipe: Recipe, rows: list[dict]) -> list[dict]:
    """Each row with ``sentences``: {text, r_i, r_t, reward} as the search scores them (R_T: ``recipe.model``)."""
    from csr_plugin.multimodal import chat_prompt
    from csr_plugin.openrlhf.response_reward import ResponseItem, ResponseRewardScorer

    scorer = ResponseRewardScorer.from_recipe(recipe)
    items = [ResponseItem(chat_prompt(scorer.processor, r["question"]), r["answer"], r["image"]) for r in rows]
    out = []
    for start in range(0, len(items), recipe.eval.batch):
        scored = scorer.score(items[start:start + recipe.eval.batch])
        out += [{**row, "sentences": s.sentences} for row, s in zip(rows[start:start + recipe.eval.batch], scored)]
    return out


def holdout_reward(recipe: Recipe, scored: list[dict], base: list[dict]) -> dict:
    """The iterate's held-out reward against the starting model's answers ``base`` (the same rows for t = 0)."""
    from csr_plugin.sampling.search import path_score

    baselines = {}
    for row in base:
        rewards = [s["reward"] for s in row["sentences"]]
        use = recipe.curation.reward_baseline == "prompt_mean" and rewards
        baselines[row["id"]] = sum(rewards) / len(rewards) if use else 0.0
    scores = [path_score([s["reward"] - baselines.get(r["id"], 0.0) for s in r["sentences"]],
                         recipe.curation.length_normalize) if r["sentences"] else 0.0 for r in scored]
    question = re.compile(recipe.reward.claim_question, re.IGNORECASE)
    asked = [r for r in scored if question.search(r["question"] or "")]
    r_i = [s["r_i"] for r in scored for s in r["sentences"]]
    # rounded: the starting model against itself is 0 up to float error, and prints as 0.00, not -0.00
    return {"holdout_reward": round(math.fsum(scores) / len(scores), 9) + 0.0 if scores else 0.0,
            "holdout_scores": {r["id"]: score for r, score in zip(scored, scores)},   # for the paired test
            "holdout_r_i": sum(r_i) / len(r_i) if r_i else 0.0,
            "holdout_sentences": sum(len(r["sentences"]) for r in scored) / max(len(scored), 1),
            "holdout_empty": sum(not r["sentences"] for r in scored) / max(len(scored), 1),
            **({"holdout_fragments": sum(ANSWER.match(r["answer"]) is None for r in asked) / len(asked)}
               if asked else {})}


def score_iterate(recipe: Recipe, model_path: str, path: Path, base_path: Path) -> dict:
    """Answer, score (``path``, resumable) and sum up one iterate against the starting model's ``base_path``."""
    from csr_plugin.accelerator import release_memory
    from csr_plugin.sampling.prompts import load_prompts

    wanted = [p.id for p in load_prompts(recipe.loop.holdout)[0]]
    stored = load_records(path) if path.exists() else []
    # reused only when whole and for the same prompts: another loop.holdout is answered anew
    if not (stored and all("sentences" in r for r in stored) and [r["id"] for r in stored] == wanted):
        rows = answer_holdout(recipe, model_path, path)
        stored = score_answers(recipe, rows)   # recipe.model: the starting model, R_T's one judge
        write_jsonl_atomic(path, stored)
        release_memory()
    base = load_records(base_path) if Path(base_path) != Path(path) else stored
    return holdout_reward(recipe, stored, base)


def check_disjoint(recipe: Recipe) -> None:
    """Held-out prompts that DPO also trains on would not be held out: refused before anything runs."""
    from csr_plugin.config import ConfigError
    from csr_plugin.sampling.prompts import load_prompts

    held = load_prompts(recipe.loop.holdout)[0]
    if not held:
        raise ConfigError(f"`loop.holdout` {recipe.loop.holdout!r} has no usable prompt; give {{id, image, question}} "
                          "lines, or set loop.holdout: ''.")
    trained = {(p.image, p.question) for p in load_prompts(recipe.data.prompts, recipe.data.limit)[0]}
    shared = [p.id for p in held if (p.image, p.question) in trained]
    if shared:
        raise ConfigError(f"`loop.holdout`: {len(shared)} of its prompts are in data.prompts too (same image and "
                          f"question, e.g. {shared[0]!r}); held-out prompts must be ones DPO never trains on.")


def learnt_judge_note(recipe: Recipe) -> str | None:
    """With reward.source: mrm the held-out reward is scored by the reward model DPO learns from: on the toy
    world it rose on every seed while CHAIR_i rose (docs/results.md), so the loop says so when it starts."""
    if not recipe.loop.holdout or recipe.reward.source != "mrm":
        return None
    return ("note: loop.holdout is scored with reward.mrm, the reward these iterations learn from, so it cannot see "
            "what that model gets wrong; judge the iterates by the eval: section on labelled images "
            "(docs/method.md, \"Which method to use when\").")


def lower(now: dict, before: dict, z: float) -> bool:
    """Whether iterate ``now``'s held-out reward is below ``before``'s by more than ``z`` standard errors of the
    paired per-prompt difference (both answered the same prompts). Without per-prompt scores: strictly below.

    Paired, because the prompts' own spread is shared by both iterates: on toy seed 1 iterate 2's reward was
    0.03 below iterate 1's with a standard error of 0.27 (z = -0.12) while CHAIR_i fell from 0.174 to 0.114;
    a plain "lower" stopped the loop there."""
    a, b = now.get("holdout_scores"), before.get("holdout_scores")
    drop = before["holdout_reward"] - now["holdout_reward"]
    diffs = [a[k] - b[k] for k in a if k in b] if a and b else []
    if len(diffs) < 2:
        return drop > 0
    mean = math.fsum(diffs) / len(diffs)
    sd = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
    return -mean > z * sd / math.sqrt(len(diffs))


def declined(history: list[dict], z: float = 2.0) -> bool:
    """Whether the newest iterate's held-out reward is lower than the one before it (``lower``)."""
    return len(history) >= 2 and lower(history[-1], history[-2], z)


def selected_iterate(history: list[dict], z: float = 2.0) -> int:
    """The newest iterate, unless its held-out reward is lower (``lower``) than the best one's: then the best.
    More training is the loop's own choice; the held-out reward overrules it only on evidence."""
    best = max(history, key=lambda row: (row["holdout_reward"], -row["iteration"]))
    return best["iteration"] if lower(history[-1], best, z) else history[-1]["iteration"]


def split_holdout(prompts_path: str, out: str, count: int, seed: int = 0) -> dict:
    """``prompts_path`` split by image into ``out``/train.jsonl and ``out``/holdout.jsonl (``count`` images held
    out, a seeded draw): every question about one image lands on one side. Image paths are written absolute,
    so the files work from any folder."""
    import random

    from csr_plugin.config import ConfigError
    from csr_plugin.sampling.prompts import load_prompts

    prompts, bad = load_prompts(prompts_path)
    images = sorted({p.image for p in prompts})
    if not 0 < count < len(images):
        raise ConfigError(f"--count {count}: {prompts_path!r} has {len(images)} distinct images; hold out at least 1 "
                          "and leave some to train on.")
    held = set(random.Random(seed).sample(images, count))
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    sides = {"train.jsonl": [p for p in prompts if p.image not in held],
             "holdout.jsonl": [p for p in prompts if p.image in held]}
    for name, rows in sides.items():
        write_jsonl_atomic(folder / name, [{"id": p.id, "image": p.image, "question": p.question} for p in rows])
    return {"train": len(sides["train.jsonl"]), "holdout": len(sides["holdout.jsonl"]), "images": count,
            "unusable": len(bad)}
