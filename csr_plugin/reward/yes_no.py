"""R_I of a yes/no answer to an object question, read from the claim it makes (``reward.yes_no: claim``).

The paper's R_I is CLIP's relevance of the sentence alone, and "Yes." or "No." names nothing: CLIP's
score of it does not depend on the question, so on such prompts the calibrated reward is the model's
own log-probability and the search can only confirm what the model already believes. POPE-style
hallucination ("Is there a square?" -> "Yes." when there is none) is then out of CSR's reach.

With ``claim``, an answer that starts with yes or no to a question matching ``reward.claim_question``
(the object in its ``object`` group) is scored on the claim that the object is in the image:

    R_I(yes) = c(object) - b,   R_I(no) = b - c(object),

c(o) the mean R_I of ``reward.claim_templates`` filled with o (an ensemble, as CLIP's zero-shot
classifiers use: a CLIP trained on full sentences can score a bare "There is a square." as
nothing at all), b the mean of c over the objects of ``reward.claim_vocabulary`` for the same
image: the image's own yardstick, so an object CLIP finds more relevant than the image's average
object is a yes. CLIP cannot read negation ("There is no square." scores like "There is a
square."), which is why "no" is scored as the claim's complement rather than by its own words.
A first sentence that answers such a question with neither yes nor no ("right.", "YesNo.", "There is a
red circle." to "Is there a square?") is a non-answer: it gets the worse of the two claims,
-|c(object) - b|, so it can never beat the answer the image supports, and can tie only with the wrong
one. Scored as a plain sentence it could be chosen (by iteration 3 of the toy recipe 3-27% of the chosen
yes/no answers were such fragments). Later sentences of an answer ("Yes. It is at the top left.") and
every other sentence are scored exactly as before.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import replace
from typing import Sequence

ANSWER = re.compile(r"^\s*(yes|no)\b", re.IGNORECASE)


class ClaimVisual:
    """Wraps a visual scorer with ``visual(items)``; yes/no answers get the claim's relative relevance."""

    def __init__(self, inner, vocabulary: Sequence[str], question: str, templates: Sequence[str],
                 cache_images: int = 4096):
        self.inner = inner
        self.vocabulary = list(vocabulary)
        self.question = re.compile(question, re.IGNORECASE)
        self.templates = list(templates)
        self.cache_images = cache_images
        self.claims: OrderedDict = OrderedDict()   # image key -> {object: c(object)}; an answer is a lookup

    @property
    def needs_ids(self) -> bool:
        return getattr(self.inner, "needs_ids", False)

    def claim_of(self, item) -> tuple[str, bool | None] | None:
        """(object asked about, answered yes) when ``item`` answers an object question with yes or no, (object,
        None) when it is the first sentence of a reply to one and says neither (a non-answer); else None."""
        asked = self.question.search(item.prompt or "")
        if asked is None:
            return None
        answer = ANSWER.match(item.text)
        if answer is None and not getattr(item, "first", True):
            return None
        return asked.group("object").strip().lower(), None if answer is None else answer.group(1).lower() == "yes"

    def visual(self, items: Sequence) -> list[float]:
        claims = [self.claim_of(item) for item in items]
        plain = [item for item, claim in zip(items, claims) if claim is None]
        plain_scores = iter(self.inner.visual(plain) if plain else [])
        out = []
        for item, claim in zip(items, claims):
            if claim is None:
                out.append(next(plain_scores))
                continue
            scores = self.claim_scores(item, claim[0])
            relative = scores[claim[0]] - sum(scores[o] for o in self.vocabulary) / len(self.vocabulary)
            out.append(-abs(relative) if claim[1] is None else relative if claim[1] else -relative)
        return out

    def claim_scores(self, item, asked: str) -> dict:
        """c(o) for the vocabulary and ``asked`` on ``item``'s image, each scored once per image."""
        scores = self.claims.setdefault(item.image_key, {})
        self.claims.move_to_end(item.image_key)
        missing = [o for o in dict.fromkeys(self.vocabulary + [asked]) if o not in scores]
        if missing:
            texts = [t.format(object=o) for o in missing for t in self.templates]
            flat = self.inner.visual([replace(item, text=text) for text in texts])
            n = len(self.templates)
            scores.update({o: sum(flat[i * n:(i + 1) * n]) / n for i, o in enumerate(missing)})
        while len(self.claims) > self.cache_images:
            self.claims.popitem(last=False)
        return scores
