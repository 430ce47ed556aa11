"""Prompt records: reading a prompts JSONL and the checks every sampler makes before a search.

A prompt is {id, image, question}; a relative image resolves against the prompts
file's folder. A prompt that fails a check raises `PromptError`, whose message goes
to errors.jsonl as the reason; `csr sample`, the Ray drivers and `csr eval` share
these checks, so a bad prompt is refused alike everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from csr_plugin.jsonl import read_jsonl


class PromptError(ValueError):
    """This prompt cannot be searched; the reason goes to errors.jsonl."""


@dataclass
class PromptRecord:
    id: str
    image: str
    question: str



def load_prompts(path: str | Path, limit: Optional[int] = None) -> tuple[list[PromptRecord], list[dict]]:
    """Valid prompt records and error records for the lines that are not."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.prompts {str(path)!r} not found; give a JSONL file of "
                                '{"id", "image", "question"} records.')
    prompts, errors, seen = [], [], set()
    for number, record, problem in read_jsonl(path):
        if record is None:
            errors.append({"id": f"line:{number}", "reason": f"invalid line: {problem}"})
            continue
        prompt_id = record.get("id")
        if prompt_id is None or str(prompt_id) == "":
            errors.append({"id": f"line:{number}", "reason": f"invalid line: line {number} has no id"})
            continue
        prompt_id = str(prompt_id)
        if prompt_id in seen:
            errors.append({"id": prompt_id, "reason": f"duplicate id: line {number} repeats it; ids must be unique"})
            continue
        seen.add(prompt_id)
        image = record.get("image")
        if not isinstance(image, str) or not image:
            errors.append({"id": prompt_id, "reason": "no image: the record has no image path"})
            continue
        image_path = Path(image).expanduser()
        if not image_path.is_absolute():
            image_path = path.parent / image_path
        # absolute, so trees and pairs stay valid from any working directory
        prompts.append(PromptRecord(prompt_id, str(image_path.resolve()), str(record.get("question") or "")))
        if limit is not None and len(prompts) >= limit:
            break
    return prompts, errors


def load_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not inside the search
            return image.convert("RGB")
    except FileNotFoundError:
        raise PromptError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise PromptError(f"image unreadable or corrupt: {path} ({type(exc).__name__}: {exc})") from None


def check_prompt(prompt: PromptRecord):
    """The decoded image of a prompt that can be searched; PromptError otherwise."""
    if not prompt.question.strip():
        raise PromptError("empty question: give the prompt a non-empty question")
    return load_image(prompt.image)
