"""R_I of a yes/no answer to an object question, read from the claim it makes (``reward.yes_no: claim``).

The paper's R_I is CLIP's relevance of the sentence alone, and "Yes." or "No." names nothing: CLIP's
score of it does not depend on the question, so on such prompts the calibrated reward is the model's
own log-probability and the search can only confirm what the model already believes. POPE-style
hallucination ("Is there a square?" -> "Yes." when there is none) is then out of CSR's reach.

With ``claim``, an answer that starts with yes or no to a question matching ``reward.claim_question``
(the object in its ``object`` group) is scored on the claim ``reward.claim_template`` renders:

    R_I(yes) = R_I(claim) - b,   R_I(no) = b - R_I(claim),

b the mean R_I over the claims of every object in ``reward.claim_vocabulary`` for the same image:
the image's own yardstick, so a claim CLIP finds more relevant than the image's average object is
a yes. CLIP cannot read negation ("There is no square." scores like "There is a square."), which is
why "no" is scored as the claim's complement rather than by its own words. Every other sentence is
scored exactly as before.
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Sequence

ANSWER = re.compile(r"^\s*(yes|no)\b", re.IGNORECASE)


class ClaimVisual:
    """Wraps a visual scorer with ``visual(items)``; yes/no answers get the claim's relative relevance."""

    def __init__(self, inner, vocabulary: Sequence[str], question: str, template: str):
        self.inner = inner
        self.vocabulary = list(vocabulary)
        self.question = re.compile(question, re.IGNORECASE)
        self.template = template
        self.baselines: dict = {}   # image key -> b: the vocabulary's claims are scored once per image

    @property
    def needs_ids(self) -> bool:
        return getattr(self.inner, "needs_ids", False)

    def claim_of(self, item) -> tuple[str, bool] | None:
        """(claim text, answered yes) when ``item`` answers an object question with yes or no; else None."""
        answer = ANSWER.match(item.text)
        asked = self.question.search(item.prompt or "")
        if answer is None or asked is None:
            return None
        return self.template.format(object=asked.group("object").strip()), answer.group(1).lower() == "yes"

    def visual(self, items: Sequence) -> list[float]:
        claims = [self.claim_of(item) for item in items]
        plain = [item for item, claim in zip(items, claims) if claim is None]
        claimed = [replace(item, text=claim[0]) for item, claim in zip(items, claims) if claim is not None]
        plain_scores = iter(self.inner.visual(plain) if plain else [])
        claim_scores = iter(self.inner.visual(claimed) if claimed else [])
        out = []
        for item, claim in zip(items, claims):
            if claim is None:
                out.append(next(plain_scores))
                continue
            relative = next(claim_scores) - self.baseline(item)
            out.append(relative if claim[1] else -relative)
        return out

    def baseline(self, item) -> float:
        if item.image_key not in self.baselines:
            texts = [self.template.format(object=name) for name in self.vocabulary]
            scores = self.inner.visual([replace(item, text=text) for text in texts])
            if len(self.baselines) >= 8192:   # bounded like the CLIP's image cache
                self.baselines.pop(next(iter(self.baselines)))
            self.baselines[item.image_key] = sum(scores) / len(scores)
        return self.baselines[item.image_key]
