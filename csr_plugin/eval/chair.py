"""CHAIR (Rohrbach et al. 2018): how often a description mentions objects not in the image.

CHAIR_s is the share of responses with at least one hallucinated object;
CHAIR_i is the share of object mentions that are hallucinated. Both are
fractions in [0, 1], lower is better; the CSR paper reports them on COCO.
"""
from __future__ import annotations

from typing import Iterable, Sequence

from csr_plugin.eval.objects import ObjectVocabulary


def per_response(response: str, truth: Iterable[str], vocab: ObjectVocabulary) -> dict:
    """One response's mentions (in order, repeats kept), the hallucinated ones (also as the
    [word read, object] pairs the CHAIR script reports), and the distinct truth objects it
    covered (in order of first mention)."""
    truth = _truth_set(truth)
    words = vocab.mention_words(response)
    mentioned = [obj for _, obj in words]
    return {
        "mentioned": mentioned,
        "hallucinated": [obj for obj in mentioned if obj not in truth],
        "hallucinated_words": [[word, obj] for word, obj in words if obj not in truth],
        "covered": [obj for obj in dict.fromkeys(mentioned) if obj in truth],
    }


def chair(responses: Sequence[str], truths: Sequence[Iterable[str]], vocab: ObjectVocabulary) -> dict:
    """CHAIR_s and CHAIR_i over paired responses and ground-truth object sets (canonical names)."""
    _check_pairs(responses, truths)
    mentions = hallucinated_mentions = hallucinated_responses = 0
    for response, truth in zip(responses, truths):
        result = per_response(response, truth, vocab)
        mentions += len(result["mentioned"])
        hallucinated_mentions += len(result["hallucinated"])
        hallucinated_responses += bool(result["hallucinated"])
    return {
        "chair_s": hallucinated_responses / len(responses),
        "chair_i": hallucinated_mentions / mentions if mentions else 0.0,
        "responses": len(responses),
        "mentions": mentions,
        "hallucinated_mentions": hallucinated_mentions,
        "hallucinated_responses": hallucinated_responses,
    }


def object_recall(responses: Sequence[str], truths: Sequence[Iterable[str]], vocab: ObjectVocabulary) -> float:
    """Distinct ground-truth objects mentioned / all ground-truth objects, over the whole set.

    The counterweight to CHAIR: a model that names nothing never hallucinates. 0.0 when
    there are no ground-truth objects at all.
    """
    _check_pairs(responses, truths)
    covered = total = 0
    for response, truth in zip(responses, truths):
        truth = _truth_set(truth)
        covered += len(per_response(response, truth, vocab)["covered"])
        total += len(truth)
    return covered / total if total else 0.0


def _truth_set(truth: Iterable[str]) -> set[str]:
    # A bare string would silently become a set of letters.
    if isinstance(truth, str):
        raise TypeError(f"ground truth must be a collection of object names, got the string {truth!r}: "
                        f"wrap it, e.g. {{{truth!r}}}.")
    return set(truth)


def _check_pairs(responses: Sequence[str], truths: Sequence[Iterable[str]]) -> None:
    if len(responses) != len(truths):
        raise ValueError(f"got {len(responses)} responses but {len(truths)} ground-truth sets: "
                         "pass one set of objects per response, in the same order.")
    if not responses:
        raise ValueError("responses is empty: CHAIR needs at least one response to score.")
