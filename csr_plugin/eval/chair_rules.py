"""CHAIR's word rules: how the reference CHAIR script turns a caption into object words.

The script (Rohrbach et al. 2018, used by every hallucination paper that reports CHAIR on
COCO) lowercases and tokenizes the caption, singularizes every token, reads listed pairs of
consecutive words as one word ("hot dog", "teddy bear"; "baby elephant" -> "elephant", so
the baby is no person; "bow tie" -> "tie"), then drops a word when another listed word is
in the same caption ("seat" beside "toilet" is no chair). The words themselves are data, in
the vocabulary file's ``rules`` (``csr_plugin/eval/data/coco_objects.json`` for COCO), so a
vocabulary without rules keeps its plain form matching (the toy world's).

Where we differ from the script, for reasons of installability and said in
docs/evaluation.md: tokens are runs of letters and digits (hyphenated words kept whole,
"dog's" -> "dog" "s"), as nltk's word tokenizer gives them for the words that can be
objects, without nltk's downloaded sentence model; and ``inflect`` singularizes in place of
the unmaintained ``pattern.en``, a token that already is a vocabulary form being kept as it
is ("bus", "scissors", "skis"), where inflect would break it.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

TOKEN = re.compile(r"[^\W_]+(?:-[^\W_]+)*")


@dataclass
class ChairRules:
    singularize: bool = True
    compounds: dict[str, str] = field(default_factory=dict)   # "w1 w2" -> the word it reads as
    drop_with: dict[str, list[str]] = field(default_factory=dict)   # word -> words that cancel it

    def __post_init__(self) -> None:
        if not isinstance(self.singularize, bool):
            raise ValueError(f'rules.singularize must be true or false, got {self.singularize!r}.')
        if not isinstance(self.compounds, dict) or not all(
                isinstance(k, str) and len(k.split()) == 2 and isinstance(v, str) and v.strip()
                for k, v in self.compounds.items()):
            raise ValueError('rules.compounds must map two-word strings to a word, e.g. {"bow tie": "tie"}.')
        if not isinstance(self.drop_with, dict) or not all(
                isinstance(k, str) and isinstance(v, list) and all(isinstance(w, str) for w in v)
                for k, v in self.drop_with.items()):
            raise ValueError('rules.drop_with must map a word to a list of words, e.g. {"seat": ["toilet"]}.')
        self.compounds = {" ".join(k.lower().split()): v.lower().strip() for k, v in self.compounds.items()}

    @classmethod
    def from_dict(cls, data: object) -> ChairRules:
        if not isinstance(data, dict):
            raise ValueError(f'"rules" must be a JSON object, got {type(data).__name__}.')
        unknown = set(data) - {"singularize", "compounds", "drop_with"}
        if unknown:
            raise ValueError(f'unknown key(s) in "rules": {", ".join(sorted(unknown))}; '
                             "known: singularize, compounds, drop_with.")
        return cls(**data)

    def to_dict(self) -> dict:
        return {"singularize": self.singularize, "compounds": self.compounds, "drop_with": self.drop_with}

    def words(self, text: str, forms: frozenset[str]) -> list[str]:
        """The caption's words after CHAIR's rules, in order; the caller keeps those in ``forms``."""
        tokens = TOKEN.findall(text.lower())
        if self.singularize:
            tokens = [token if token in forms else _singular(token) for token in tokens]
        words, i = [], 0
        while i < len(tokens):   # left to right, a pair once read is not reused: the script's loop
            pair = " ".join(tokens[i:i + 2])
            if pair in self.compounds:
                words.append(self.compounds[pair])
                i += 2
            else:
                words.append(tokens[i])
                i += 1
        present = set(words)
        return [w for w in words if not present.intersection(self.drop_with.get(w, ()))]


@functools.lru_cache(maxsize=65536)
def _singular(token: str) -> str:
    return _inflect().singular_noun(token) or token


@functools.lru_cache(maxsize=1)
def _inflect():
    try:
        import inflect
    except ImportError:
        raise ImportError("CHAIR's singularizing rule needs the inflect package: pip install inflect") from None
    return inflect.engine()
