"""Hallucination of a checkpoint: CHAIR on free descriptions, POPE on yes/no probes.

Works on any checkpoint AutoModelForImageTextToText loads. The evaluation set is a
prompts JSONL ({id, image, question}) plus a truth JSONL ({id, objects: [canonical
names]}) and an object vocabulary with synonyms (JSON), so a COCO object list and
its annotations plug in the same way as the toy world's.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from csr_plugin.config import EvalConfig, ModelConfig
from csr_plugin.eval.chair import chair, object_recall
from csr_plugin.eval.objects import ObjectVocabulary
from csr_plugin.eval.pope import build_pope, parse_yes_no, pope_metrics
from csr_plugin.jsonl import load_records

log = logging.getLogger(__name__)
POPE_SETTINGS = ("random", "popular", "adversarial")


@torch.inference_mode()
def generate(model, processor, items: list[tuple], max_new_tokens: int, batch: int, desc: str) -> list[str]:
    """Greedy answers for (PIL image, question) items, batched with left padding.

    Images go to the processor as one list per text: Gemma3 and Idefics3/SmolVLM read a
    flat list as all images of the first text, and every family accepts the nested form.
    """
    from csr_plugin.multimodal import chat_prompt

    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    answers = []
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(items), batch), desc=desc, unit="batch", leave=False):
        chunk = items[start:start + batch]
        inputs = processor(images=[[image] for image, _ in chunk], text=[chat_prompt(processor, q) for _, q in chunk],
                           padding=True, return_tensors="pt").to(device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        answers += tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [a.strip() for a in answers]


def make_generator(model, processor, cfg: EvalConfig, model_cfg: ModelConfig):
    """(items, max_new_tokens, desc, keys) -> answers under ``eval.decoding``; ``keys`` name the rows so
    that a PARGS row's sampling seed depends on (eval.seed, its key) alone, not on its batch."""
    if cfg.decoding == "greedy":
        return lambda items, max_new, desc, keys: generate(model, processor, items, max_new, cfg.batch, desc)
    from csr_plugin.reward_model.guided import PargsSettings, decode_prompts
    from csr_plugin.reward_model.model import load_reward_model
    from csr_plugin.sampling.engine import stable_seed

    device = next(model.parameters()).device
    reward_model = load_reward_model(cfg.rm, dtype=model.dtype,
                                     trust_remote_code=model_cfg.trust_remote_code).to(device)

    def pargs(items, max_new, desc, keys):
        settings = PargsSettings(cfg.pargs.top_k, cfg.pargs.weight, cfg.pargs.greedy, max_new)
        seeds = [stable_seed(cfg.seed, "pargs", key) for key in keys]
        log.info("%s: PARGS decoding of %d items (k=%d, w=%g)", desc, len(items), settings.top_k, settings.weight)
        return decode_prompts(model, reward_model, processor, items, seeds, settings, cfg.batch)
    return pargs


def evaluate(model_cfg: ModelConfig, cfg: EvalConfig) -> dict:
    from csr_plugin.sampling.transformers_engine import load_vlm
    from csr_plugin.sampling.prompts import load_image, load_prompts

    prompts, bad = load_prompts(cfg.prompts, cfg.limit)
    if bad:
        log.warning("%d evaluation prompts unusable, first: %s", len(bad), bad[0])
    truth = {str(r["id"]): set(r["objects"]) for r in load_records(cfg.truth)}
    missing = [p.id for p in prompts if p.id not in truth]
    if missing:
        raise ValueError(f"eval.truth {cfg.truth!r} has no objects for {len(missing)} prompts, e.g. {missing[0]!r}")
    vocab = ObjectVocabulary.from_json(cfg.vocabulary)
    model, processor = load_vlm(model_cfg)
    images = {p.id: load_image(p.image) for p in prompts}

    generate_with = make_generator(model, processor, cfg, model_cfg)
    descriptions = generate_with([(images[p.id], p.question) for p in prompts], cfg.max_new_tokens, "CHAIR",
                                 [p.id for p in prompts])
    truths = [truth[p.id] for p in prompts]
    result = {**chair(descriptions, truths, vocab), "object_recall": object_recall(descriptions, truths, vocab)}

    image_truth = {p.id: truth[p.id] for p in prompts}
    for setting in POPE_SETTINGS:
        questions = build_pope(image_truth, vocab.objects, setting, cfg.pope_per_image, seed=cfg.seed)
        answers = generate_with([(images[q.image_id], q.text()) for q in questions], 8, f"POPE {setting}",
                                [f"pope/{setting}/{i}" for i in range(len(questions))])
        result[f"pope_{setting}"] = pope_metrics([parse_yes_no(a) for a in answers], [q.label for q in questions])
    result["pope_f1"] = sum(result[f"pope_{s}"]["f1"] for s in POPE_SETTINGS) / len(POPE_SETTINGS)
    result["samples"] = [{"id": p.id, "response": d, "objects": sorted(truth[p.id])}
                         for p, d in list(zip(prompts, descriptions))[:5]]
    result["decoding"] = decoding_spec(cfg)
    result["eval_set"] = eval_set_spec(cfg)
    del model
    return result


def decoding_spec(cfg: EvalConfig) -> dict:
    """How the answers were generated: a stored result is reused only for the same decoding."""
    if cfg.decoding == "pargs":
        return {"mode": "pargs", "rm": str(Path(cfg.rm).resolve()), **dataclasses.asdict(cfg.pargs)}
    return {"mode": cfg.decoding}


def eval_set_spec(cfg: EvalConfig) -> dict:
    """What was asked: a stored result is reused only for the same prompts, truth and settings.
    Files are identified by content, so a split rewritten in place (a larger eval set) is noticed."""
    return {"prompts": _digest(cfg.prompts), "truth": _digest(cfg.truth), "vocabulary": _digest(cfg.vocabulary),
            "limit": cfg.limit, "pope_per_image": cfg.pope_per_image, "max_new_tokens": cfg.max_new_tokens,
            "seed": cfg.seed}


def _digest(path: str) -> str | None:
    file = Path(path)
    return hashlib.sha256(file.read_bytes()).hexdigest()[:16] if file.is_file() else None


def evaluate_cached(model_cfg: ModelConfig, cfg: EvalConfig, path: Path) -> dict:
    """Evaluate once per checkpoint and evaluation set: the result file makes a rerun free."""
    if path.exists():
        stored = json.loads(path.read_text())
        # results written before decoding was recorded were greedy, the only mode then
        same_decoding = stored.get("decoding", {"mode": "greedy"}) == decoding_spec(cfg)
        if same_decoding and stored.get("eval_set") == eval_set_spec(cfg):
            return stored
        log.info("%s was computed for another evaluation set or decoding: evaluating again", path)
    result = evaluate(model_cfg, cfg)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)
    return result
