"""An object vocabulary: canonical object names and the words that mention them.

CHAIR counts the objects a description mentions, so "two discs" must map to the
canonical "circle" the ground truth uses. The vocabulary is data, read from
``{"objects": {"circle": ["circles", "disc"], ...}}``, optionally with CHAIR's word
``rules`` (eval/chair_rules.py): COCO's file has them, the toy world's has none.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from csr_plugin.eval.chair_rules import ChairRules

COCO_OBJECTS = Path(__file__).parent / "data" / "coco_objects.json"

@dataclass
class ObjectVocabulary:
    """Canonical name -> surface forms; the canonical name is always a form too.

    Forms are matched case-insensitively, so a form may belong to one object only. With
    ``rules`` the text is read word by word as the CHAIR script reads it; without, every
    form is matched as a phrase, the longest first.
    """

    synonyms: dict[str, list[str]]
    rules: Optional[ChairRules] = None
    _form_to_object: dict[str, str] = field(init=False, repr=False, compare=False)
    _pattern: re.Pattern | None = field(init=False, repr=False, compare=False)
    _forms: frozenset[str] = field(init=False, repr=False, compare=False)

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
        self._forms = frozenset(self._form_to_object)

    @property
    def objects(self) -> list[str]:
        """Canonical object names, sorted."""
        return sorted(self.synonyms)

    def mentions(self, text: str) -> list[str]:
        """Canonical objects mentioned in ``text``, in order, one entry per mention."""
        return [obj for _, obj in self.mention_words(text)]

    def mention_words(self, text: str) -> list[tuple[str, str]]:
        """(word as read, canonical object) per mention, in order: what CHAIR reports per caption."""
        if self.rules is not None:
            return [(w, self._form_to_object[w]) for w in self.rules.words(text, self._forms)
                    if w in self._form_to_object]
        if self._pattern is None:
            return []
        return [(form, self._form_to_object[form])
                for form in (_normalize(m.group()) for m in self._pattern.finditer(text))]

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
            rules = ChairRules.from_dict(data["rules"]) if "rules" in data else None
            return cls(data["objects"], rules)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: {exc}") from None

    @classmethod
    def coco(cls) -> ObjectVocabulary:
        """COCO's 80 objects with CHAIR's synonyms and word rules."""
        return cls.from_json(COCO_OBJECTS)

    def to_json(self, path: str | Path) -> None:
        data = {"objects": self.synonyms, **({"rules": self.rules.to_dict()} if self.rules else {})}
        Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


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
