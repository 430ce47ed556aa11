"""`csr prepare coco`: the paper's evaluation set from a COCO download.

Reads COCO's ``instances_<split>.json`` and ``captions_<split>.json`` and writes what
`csr eval` reads: description prompts for CHAIR (the paper's 500 random images), each
image's ground truth as CHAIR builds it (the instance categories united with the objects
the five reference captions name, read by CHAIR's own rules), CHAIR's object list, and
POPE's three question files built as POPE builds them (images with at least three
annotated objects). docs/evaluation.md walks through it.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from csr_plugin.eval.objects import ObjectVocabulary
from csr_plugin.eval.pope import SETTINGS, build_pope_files
from csr_plugin.jsonl import write_jsonl_atomic

DESCRIBE = "Please describe this image in detail."
POPE_PER_IMAGE = 3
SPLIT = re.compile(r"^(train|val|test)20\d\d$")


class CocoError(ValueError):
    """A COCO input that cannot be used; the message names the path and the fix."""


def prepare_coco(annotations: str | Path, images: str | Path, out: str | Path, split: str = "val2014",
                 count: int = 500, seed: int = 0) -> dict:
    """Write prompts.jsonl, truth.jsonl, objects.json and pope_<setting>.jsonl under ``out``;
    returns what was written (counts and paths)."""
    if not SPLIT.match(split):
        raise CocoError(f"--split {split!r} is not a COCO split name: use e.g. val2014 (the paper's) or val2017.")
    if count < 1:
        raise CocoError(f"--count must be at least 1, got {count}.")
    annotations, images, out = Path(annotations), Path(images), Path(out)
    if not images.is_dir():
        raise CocoError(f"--images {str(images)!r} is not a folder: give the folder of COCO's {split} images "
                        f"(e.g. coco/{split}/, unzipped from {split}.zip).")
    instances = _read_json(annotations, f"instances_{split}.json")
    captions = _read_json(annotations, f"captions_{split}.json")
    vocab = ObjectVocabulary.coco()

    files = {image["id"]: image["file_name"] for image in captions["images"]}
    names = {cat["id"]: cat["name"] for cat in instances["categories"]}
    unknown = sorted(set(names.values()) - set(vocab.synonyms))
    if unknown:
        raise CocoError(f"instances_{split}.json has categories CHAIR's COCO list lacks: {', '.join(unknown)}; "
                        "is this COCO's instances file?")
    annotated: dict[int, list[str]] = {}   # image -> distinct categories, in annotation order (POPE's order)
    for ann in instances["annotations"]:
        objects = annotated.setdefault(ann["image_id"], [])
        if names[ann["category_id"]] not in objects:
            objects.append(names[ann["category_id"]])
    captioned: dict[int, list[str]] = {}
    for ann in captions["annotations"]:
        captioned.setdefault(ann["image_id"], []).append(ann["caption"])

    chair_ids = sorted(random.Random(f"coco/{seed}/chair").sample(sorted(captioned), min(count, len(captioned))))
    pope_pool = sorted(i for i, objects in annotated.items() if len(objects) >= POPE_PER_IMAGE and i in files)
    pope_ids = random.Random(f"coco/{seed}/pope").sample(pope_pool, min(count, len(pope_pool)))
    _check_images(images, [files[i] for i in [*chair_ids, *pope_ids]])

    out.mkdir(parents=True, exist_ok=True)
    path = {name: out / name for name in ("prompts.jsonl", "truth.jsonl", "objects.json",
                                          *(f"pope_{s}.jsonl" for s in SETTINGS))}
    image_path = {i: str((images / files[i]).resolve()) for i in [*chair_ids, *pope_ids]}
    write_jsonl_atomic(path["prompts.jsonl"], [{"id": str(i), "image": image_path[i], "question": DESCRIBE}
                                               for i in chair_ids])
    truth_ids = sorted(set(chair_ids) | set(pope_ids))
    # read only the chosen images' captions: a split has 200k of them
    mentioned = {i: {obj for caption in captioned.get(i, []) for obj in vocab.mentions(caption)} for i in truth_ids}
    write_jsonl_atomic(path["truth.jsonl"], [
        {"id": str(i), "objects": sorted(set(annotated.get(i, [])) | mentioned.get(i, set())),
         "instances": annotated.get(i, []), "file_name": files[i]} for i in truth_ids])
    vocab.to_json(path["objects.json"])
    try:
        pope = build_pope_files([(image_path[i], annotated[i]) for i in pope_ids], POPE_PER_IMAGE, seed)
    except ValueError as exc:
        raise CocoError(f"{exc} Use a larger --count.") from None
    for setting in SETTINGS:
        write_jsonl_atomic(path[f"pope_{setting}.jsonl"], pope[setting])
    summary = {"split": split, "seed": seed, "chair_images": len(chair_ids), "pope_images": len(pope_ids),
               "pope_questions": {s: len(pope[s]) for s in SETTINGS},
               "files": {name: str(p) for name, p in path.items()}}
    (out / "prepare.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def eval_section(out: str | Path) -> str:
    """The recipe's `eval:` section for what prepare_coco wrote under ``out``."""
    out = Path(out)
    return "\n".join([
        "eval:",
        f"  prompts: {out / 'prompts.jsonl'}",
        f"  truth: {out / 'truth.jsonl'}",
        f"  vocabulary: {out / 'objects.json'}",
        "  pope_questions:",
        *(f"    {s}: {out / f'pope_{s}.jsonl'}" for s in SETTINGS),
    ])


def _read_json(folder: Path, name: str) -> dict:
    path = folder / name
    if not path.is_file():
        found = sorted(p.name for p in folder.glob("instances_*.json")) if folder.is_dir() else []
        hint = (f" That folder has {', '.join(found)}: pick the --split they name." if found else
                " Give --annotations the annotations/ folder unzipped from COCO's annotations_trainval2014.zip.")
        raise CocoError(f"{path} not found.{hint}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CocoError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); download it again.") from None
    keys = {"images", "annotations", "categories"} if name.startswith("instances") else {"images", "annotations"}
    if not isinstance(data, dict) or not keys <= set(data):
        raise CocoError(f"{path}: not a COCO annotation file (it needs the keys {', '.join(sorted(keys))}).")
    return data


def _check_images(folder: Path, names: list[str]) -> None:
    missing = [name for name in dict.fromkeys(names) if not (folder / name).is_file()]
    if missing:
        raise CocoError(f"{len(missing)} of the chosen images are not in --images {str(folder)!r}, e.g. "
                        f"{folder / missing[0]}: give the folder that holds COCO's image files.")
