"""`csr eval --responses`: score answers that already exist, with no model loaded.

A file holds captions ({image_id or id, caption or response}, as OPERA/LURE-style and
LLaVA's scripts write them), POPE answers ({question_id, answer or text}), or both (the
``*.answers.jsonl`` that `csr eval --out` and `csr run` write). A POPE answer's setting
comes from ``SETTING=FILE`` on the command line or from the record's ``setting`` /
``category``. A line that is neither, or names an image the truth lacks, is skipped and
listed in the result with its file and line; a file with nothing usable is an error.
"""
from __future__ import annotations

from pathlib import Path

from csr_plugin.config import EvalConfig
from csr_plugin.eval.evaluate import (POPE_SETTINGS, eval_set_spec, load_truth, pope_questions, pope_rule,
                                      score_captions, score_pope)
from csr_plugin.eval.objects import ObjectVocabulary
from csr_plugin.jsonl import read_jsonl


def parse_response_arg(text: str) -> tuple[str | None, str]:
    """``random=answers.jsonl`` -> ("random", path); a plain path -> (None, path)."""
    setting, sep, path = text.partition("=")
    if sep and setting in POPE_SETTINGS:
        return setting, path
    return None, text


def score_responses(cfg: EvalConfig, files: list[tuple[str | None, str]]) -> dict:
    captions, answers, skipped = [], {}, []
    for setting, path in files:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--responses {path!r} not found.")
        used = 0
        for number, record, problem in read_jsonl(path):
            where = {"file": path, "line": number}
            if record is None:
                skipped.append({**where, "reason": problem})
                continue
            if "question_id" in record:
                answer = record.get("answer", record.get("text"))
                which = setting or record.get("setting") or record.get("category")
                if not isinstance(answer, str) or which not in POPE_SETTINGS:
                    skipped.append({**where, "reason": "a POPE answer needs answer (or text) and its setting: "
                                    "write --responses random=FILE, or a setting/category field"})
                    continue
                answers.setdefault(which, {})[str(record["question_id"])] = answer
            else:
                image_id = record.get("image_id", record.get("id"))
                caption = record.get("caption", record.get("response"))
                if image_id is None or not isinstance(caption, str):
                    skipped.append({**where, "reason": "neither a caption ({image_id or id, caption or response}) "
                                    "nor a POPE answer ({question_id, answer})"})
                    continue
                captions.append({"image_id": str(image_id), "caption": caption, **where})
            used += 1
        if not used:
            first = next((s["reason"] for s in skipped if s["file"] == path), "it is empty")
            raise ValueError(f"--responses {path}: no usable line; first problem: {first}.")

    result: dict = {"response_files": [path for _, path in files]}
    if captions:
        if not (cfg.truth and cfg.vocabulary):
            raise ValueError("captions need `eval.truth` and `eval.vocabulary` to score CHAIR "
                             "(`csr prepare coco` writes both).")
        truth, vocab = load_truth(cfg.truth), ObjectVocabulary.from_json(cfg.vocabulary)
        known = []
        for c in captions:
            if c["image_id"] in truth:
                known.append(c)
            else:
                skipped.append({"file": c["file"], "line": c["line"],
                                "reason": f"image {c['image_id']} is not in eval.truth {cfg.truth}"})
        if not known:
            raise ValueError(f"none of the {len(captions)} captions' images is in eval.truth {cfg.truth}: "
                             "is it the truth of the same images (same split, same ids)?")
        result.update(score_captions([{"image_id": c["image_id"], "caption": c["caption"]} for c in known],
                                     truth, vocab))
    if answers:
        questions = _questions_for(cfg, answers)
        for setting, by_id in answers.items():
            known_ids = {str(q["question_id"]) for q in questions[setting]}
            stray = [qid for qid in by_id if qid not in known_ids]
            if len(stray) == len(by_id):
                raise ValueError(f"no POPE {setting} answer matches a question_id of its question file: "
                                 "are they answers to these questions?")
            skipped += [{"setting": setting, "question_id": qid, "reason": "question_id not in the question file"}
                        for qid in stray]
        result.update(score_pope(questions, answers, pope_rule(cfg)))
    result["skipped"] = skipped
    result["eval_set"] = eval_set_spec(cfg)
    return result


def _questions_for(cfg: EvalConfig, answers: dict) -> dict[str, list[dict]]:
    if cfg.pope_questions.files():
        return pope_questions(cfg, [], {}, None)
    if not (cfg.prompts and cfg.truth and cfg.vocabulary):
        raise ValueError("POPE answers need their questions: set `eval.pope_questions` (POPE's files), or "
                         "`eval.prompts`, `eval.truth` and `eval.vocabulary` to rebuild the generated ones.")
    from csr_plugin.sampling.prompts import load_prompts

    truth = load_truth(cfg.truth)
    prompts, _ = load_prompts(cfg.prompts, cfg.limit)
    return pope_questions(cfg, [p for p in prompts if p.id in truth], truth,
                          ObjectVocabulary.from_json(cfg.vocabulary))
