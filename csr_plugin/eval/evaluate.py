"""Hallucination of a checkpoint: CHAIR on free descriptions, POPE on yes/no probes.

Works on any checkpoint AutoModelForImageTextToText loads. The evaluation set is a
prompts JSONL ({id, image, question}) plus a truth JSONL ({id, objects: [canonical
names]}) and an object vocabulary with synonyms (JSON), so COCO (`csr prepare coco`)
and the toy world plug in the same way. POPE's questions come from its own files
(eval.pope_questions) or are built from the truth. Scoring is apart from generating:
`csr eval --responses` (eval/responses.py) scores answers written by anything.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Optional

from csr_plugin.accelerator import release_memory
from csr_plugin.config import EvalConfig, ModelConfig
from csr_plugin.eval.chair import chair, object_recall, per_response
from csr_plugin.eval.objects import ObjectVocabulary
from csr_plugin.eval.pope import build_pope, parse_yes_no, pope_answer, pope_metrics
from csr_plugin.jsonl import read_jsonl, write_jsonl_atomic
from csr_plugin.sampling.greedy import generate

log = logging.getLogger(__name__)
POPE_SETTINGS = ("random", "popular", "adversarial")


def make_generator(model, processor, cfg: EvalConfig, model_cfg: ModelConfig):
    """(items, max_new_tokens, desc, keys) -> answers under ``eval.decoding``; ``keys`` name the rows so
    that a PARGS row's sampling seed depends on (eval.seed, its key) alone, not on its batch."""
    if cfg.decoding == "greedy":
        return lambda items, max_new, desc, keys: generate(model, processor, items, max_new, cfg.batch, desc)
    from csr_plugin.sampling.pargs_decoding import PargsSettings, decode_prompts
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


def evaluate(model_cfg: ModelConfig, cfg: EvalConfig, answers_path: Path | None = None) -> dict:
    """Generate the answers of ``model_cfg`` and score them; with ``answers_path``, every answer is
    also written there (JSONL that `csr eval --responses` reads back)."""
    from csr_plugin.sampling.prompts import load_image, load_prompts
    from csr_plugin.sampling.transformers_engine import load_vlm

    prompts, bad = load_prompts(cfg.prompts, cfg.limit)
    if bad:
        log.warning("%d evaluation prompts unusable, first: %s", len(bad), bad[0])
    truth = load_truth(cfg.truth)
    missing = [p.id for p in prompts if p.id not in truth]
    if missing:
        raise ValueError(f"eval.truth {cfg.truth!r} has no objects for {len(missing)} prompts, e.g. {missing[0]!r}")
    vocab = ObjectVocabulary.from_json(cfg.vocabulary)
    questions = pope_questions(cfg, prompts, truth, vocab)
    model, processor = load_vlm(model_cfg)
    images: dict[str, object] = {}

    def image(path: str):
        if path not in images:
            images[path] = load_image(path)
        return images[path]

    try:
        generate_with = make_generator(model, processor, cfg, model_cfg)
        descriptions = generate_with([(image(p.image), p.question) for p in prompts], cfg.max_new_tokens, "CHAIR",
                                     [p.id for p in prompts])
        captions = [{"image_id": p.id, "caption": d} for p, d in zip(prompts, descriptions)]
        answers: dict[str, dict[str, str]] = {}
        for setting, asked in questions.items():
            texts = generate_with([(image(q["image"]), q["text"]) for q in asked], 8, f"POPE {setting}",
                                  [f"pope/{setting}/{q['question_id']}" for q in asked])
            answers[setting] = {str(q["question_id"]): a for q, a in zip(asked, texts)}
    finally:
        model = generate_with = None   # the generator's closure holds the model (and a PARGS reward model) too
        release_memory()
    if answers_path is not None:
        write_jsonl_atomic(answers_path, captions + [
            {"setting": s, "question_id": qid, "answer": a} for s, by_id in answers.items() for qid, a in by_id.items()])
    result = {**score_captions(captions, truth, vocab), **score_pope(questions, answers, pope_rule(cfg))}
    result["decoding"] = decoding_spec(cfg)
    result["eval_set"] = eval_set_spec(cfg)
    return result


def load_truth(path: str) -> dict[str, set[str]]:
    """eval.truth: image id -> its objects (canonical names); errors name the file and line."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"eval.truth {path!r} not found; give a JSONL file of {{id, objects}} records "
                                "(`csr prepare coco` writes one for COCO).")
    truth = {}
    for number, record, problem in read_jsonl(path):
        if record is None:
            raise ValueError(f"eval.truth {path}: {problem}.")
        if "id" not in record or not isinstance(record.get("objects"), list):
            raise ValueError(f"eval.truth {path}: line {number} needs an id and an objects list.")
        truth[str(record["id"])] = set(record["objects"])
    return truth


def pope_rule(cfg: EvalConfig) -> str:
    """POPE's own answer reading for its own files; our stricter one for questions built from eval.truth."""
    return "pope" if cfg.pope_questions.files() else "first_word"


def pope_questions(cfg: EvalConfig, prompts: list, truth: dict[str, set[str]],
                   vocab: Optional[ObjectVocabulary]) -> dict[str, list[dict]]:
    """Per setting, {question_id, image, text, label}: read from eval.pope_questions, or built from the
    truth of the ``prompts``' images (the toy world's way; every prompt's id must be in ``truth``)."""
    files = cfg.pope_questions.files()
    if files:
        questions = {s: load_pope_file(path, cfg.pope_images) for s, path in files.items()}
        if cfg.limit is not None:   # the first `limit` images of each file, as eval.limit cuts the prompts
            for s, asked in questions.items():
                keep = set(list(dict.fromkeys(q["image"] for q in asked))[:cfg.limit])
                questions[s] = [q for q in asked if q["image"] in keep]
        return questions
    image_of = {p.id: p.image for p in prompts}
    image_truth = {p.id: truth[p.id] for p in prompts}
    out = {}
    for setting in POPE_SETTINGS:
        built = build_pope(image_truth, vocab.objects, setting, cfg.pope_per_image, seed=cfg.seed)
        out[setting] = [{"question_id": i, "image": image_of[q.image_id], "text": q.text(), "label": q.label}
                        for i, q in enumerate(built)]
    return out


def load_pope_file(path: str, images: str = "") -> list[dict]:
    """A POPE question file (JSONL, or POPE's own one-object-per-line .json): every line needs
    question_id, image, text and a yes/no label; an error names the file and line."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"POPE question file {path!r} not found (eval.pope_questions); "
                                "`csr prepare coco` writes them.")
    root = Path(images).expanduser() if images else file.parent
    questions, seen = [], set()
    for number, record, problem in read_jsonl(file):
        if record is None:
            raise ValueError(f"{path}: {problem}.")
        lacking = [k for k in ("question_id", "image", "text", "label") if k not in record]
        if lacking:
            raise ValueError(f"{path}: line {number} lacks {', '.join(lacking)}; POPE's files have "
                             "question_id, image, text and label.")
        if record["label"] not in ("yes", "no"):
            raise ValueError(f"{path}: line {number} has label {record['label']!r}; it must be yes or no.")
        if str(record["question_id"]) in seen:
            raise ValueError(f"{path}: line {number} repeats question_id {record['question_id']!r}.")
        seen.add(str(record["question_id"]))
        image = Path(record["image"]).expanduser()
        questions.append({**record, "image": str(image if image.is_absolute() else root / image)})
    if not questions:
        raise ValueError(f"{path}: no questions in it.")
    return questions


def score_captions(captions: list[dict], truth: dict[str, set[str]], vocab: ObjectVocabulary) -> dict:
    """CHAIR and object recall of {image_id, caption} records, each caption's words listed."""
    if not captions:
        return {}
    texts = [c["caption"] for c in captions]
    truths = [truth[str(c["image_id"])] for c in captions]
    details = []
    for c, t in zip(captions, truths):
        found = per_response(c["caption"], t, vocab)
        details.append({"image_id": c["image_id"], "caption": c["caption"], "mentioned": found["mentioned"],
                        "hallucinated_words": found["hallucinated_words"]})
    return {**chair(texts, truths, vocab), "object_recall": object_recall(texts, truths, vocab),
            "samples": [{"id": c["image_id"], "response": c["caption"], "objects": sorted(t)}
                        for c, t in list(zip(captions, truths))[:5]],
            "captions": details}


def score_pope(questions: dict[str, list[dict]], answers: dict[str, dict[str, str]], rule: str) -> dict:
    """Per setting: accuracy, precision, recall, F1 and yes-ratio over the answered questions;
    ``pope_f1`` is their mean F1. An unanswered question is counted under ``unanswered``."""
    read = pope_answer if rule == "pope" else parse_yes_no
    result = {}
    for setting, asked in questions.items():
        given = answers.get(setting)
        if not given:
            continue
        answered = [q for q in asked if str(q["question_id"]) in given]
        metrics = pope_metrics([read(given[str(q["question_id"])]) for q in answered], [q["label"] for q in answered])
        result[f"pope_{setting}"] = {**metrics, "unanswered": len(asked) - len(answered), "answer_rule": rule}
    scored = [result[f"pope_{s}"]["f1"] for s in POPE_SETTINGS if f"pope_{s}" in result]
    if scored:
        result["pope_f1"] = sum(scored) / len(scored)
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
            "seed": cfg.seed,
            # only when set, so results stored before these keys existed stay valid
            **({"pope_questions": {s: _digest(f) for s, f in cfg.pope_questions.files().items()},
                "pope_images": cfg.pope_images} if cfg.pope_questions.files() else {})}


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
    result = evaluate(model_cfg, cfg, answers_path=path.with_suffix(".answers.jsonl"))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)
    return result


def result_lines(result: dict) -> list[str]:
    """The terminal summary: CHAIR when captions were scored, POPE's table per setting when answered."""
    lines = []
    if "chair_s" in result:
        lines.append(f"CHAIR_s {result['chair_s']:.3f}  CHAIR_i {result['chair_i']:.3f}  object recall "
                     f"{result['object_recall']:.3f}  ({result['responses']} captions, {result['mentions']} "
                     "object mentions)")
    settings = [s for s in POPE_SETTINGS if f"pope_{s}" in result]
    if settings:
        lines.append(f"{'POPE':<12}{'accuracy':>9}{'precision':>10}{'recall':>8}{'F1':>7}{'yes':>7}{'n':>6}")
        for s in settings:
            m = result[f"pope_{s}"]
            lines.append(f"{s:<12}{m['accuracy']:>9.3f}{m['precision']:>10.3f}{m['recall']:>8.3f}{m['f1']:>7.3f}"
                         f"{m['yes_ratio']:>7.3f}{m['n']:>6}")
        lines.append(f"POPE F1 (mean of {len(settings)}) {result['pope_f1']:.3f}")
    return lines
