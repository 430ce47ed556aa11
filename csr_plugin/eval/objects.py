"""An object vocabulary: canonical object names and the words that mention them.

CHAIR counts the objects a description mentions, so "two discs" must map to the
canonical "circle" the ground truth uses. The vocabulary is data, read from
``{"objects": {"circle": ["circles", "disc"], ...}}``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ObjectVocabulary:
    """Canonical name -> surface forms; the canonical name is always a form too.

    Forms are matched case-insensitively, so a form may belong to one object only.
    """

    synonyms: dict[str, list[str]]
    _form_to_object: dict[str, str] = field(init=False, repr=False, compare=False)
    _pattern: re.Pattern | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_synonyms(self.synonyms)
        self._form_to_object = {}
        for obj, forms in self.synonyms.items():
            for form in [obj, *forms]:
                key = _normalize(form)
                other = self._form_to_object.setdefault(key, obj)
                if other != obj:
                    raise ValueError(f"form {form!r} belongs to both {other!r} and {obj!r}: "
                                     "keep it under one object only.")
        # COCO-style lists have multi-word names ("traffic light", "hot dog"): trying the longest
        # form first makes the whole name win over its parts, and finditer never reuses a span.
        forms = sorted(self._form_to_object, key=lambda f: (-len(f), f))
        alternatives = [r"\s+".join(re.escape(word) for word in form.split()) for form in forms]
        self._pattern = re.compile(r"\b(?:" + "|".join(alternatives) + r")\b", re.IGNORECASE) if forms else None

    @property
    def objects(self) -> list[str]:
        """Canonical object names, sorted."""
        return sorted(self.synonyms)

    def mentions(self, text: str) -> list[str]:
        """Canonical objects mentioned in ``text``, in order, one entry per mention."""
        if self._pattern is None:
            return []
        return [self._form_to_object[_normalize(m.group())] for m in self._pattern.finditer(text)]

    @classmethod
    def from_json(cls, path: str | Path) -> ObjectVocabulary:
        """Read ``{"objects": {name: [forms...]}}``; errors name the file."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}).") from None
        if not isinstance(data, dict) or "objects" not in data:
            raise ValueError(f'{path}: expected a JSON object with an "objects" key, '
                             'e.g. {"objects": {"circle": ["circles", "disc"]}}.')
        try:
            return cls(data["objects"])
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"objects": self.synonyms}, indent=2, ensure_ascii=False) + "\n",
                              encoding="utf-8")


def _normalize(form: str) -> str:
    # One spelling per form, so "Traffic\nLight" found in text looks up "traffic light".
    return " ".join(form.lower().split())


def _check_synonyms(synonyms: object) -> None:
    if not isinstance(synonyms, dict):
        raise ValueError(f'"objects" must map each object name to a list of forms, got {type(synonyms).__name__}.')
    for obj, forms in synonyms.items():
        if not isinstance(obj, str) or not obj.strip():
            raise ValueError(f"object names must be non-empty strings, got {obj!r}.")
        if not isinstance(forms, list) or not all(isinstance(f, str) and f.strip() for f in forms):
            raise ValueError(f"forms of {obj!r} must be a list of non-empty strings, got {forms!r}.")
