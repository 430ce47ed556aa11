"""POPE (Li et al. 2023): yes/no object-probing questions and their metrics.

Each image gets questions about objects it contains (answer "yes") and as many
about objects it lacks (answer "no"), so a model that always says "yes" scores
50% accuracy. The negatives get harder by setting: random absent objects,
the most frequent ones ("popular"), or those that most often appear with the
image's objects ("adversarial").
"""
from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

SETTINGS = ("random", "popular", "adversarial")


@dataclass
class PopeQuestion:
    image_id: str
    object: str
    label: str      # "yes" | "no"
    setting: str

    def text(self) -> str:
        return f"Is there a {self.object} in the image?"


def cooccurrence_counts(truths: Iterable[set[str]]) -> dict[str, dict[str, int]]:
    """``counts[a][b]``: how many images contain both ``a`` and ``b`` (a != b)."""
    counts: dict[str, dict[str, int]] = {}
    for objects in truths:
        for a in objects:
            row = counts.setdefault(a, {})
            for b in objects:
                if b != a:
                    row[b] = row.get(b, 0) + 1
    return counts


def build_pope(truths: dict[str, set[str]], vocab_objects: Sequence[str], setting: str, per_image: int,
               seed: int, cooccurrence: dict[str, dict[str, int]] | None = None) -> list[PopeQuestion]:
    """Per image (sorted ids): up to ``per_image`` positives, then as many negatives.

    Negatives are drawn from ``vocab_objects`` absent from the image, chosen by
    ``setting``; with fewer absent objects than needed, all of them are used.
    """
    if setting not in SETTINGS:
        raise ValueError(f"unknown POPE setting {setting!r}: use one of {', '.join(SETTINGS)}.")
    if per_image < 1:
        raise ValueError(f"per_image must be at least 1, got {per_image}.")
    rng = random.Random(seed)
    frequency = Counter(obj for objects in truths.values() for obj in objects)
    if setting == "adversarial" and cooccurrence is None:
        cooccurrence = cooccurrence_counts(truths.values())

    questions: list[PopeQuestion] = []
    for image_id in sorted(truths):
        # Sorted before sampling: set order depends on string hashing, which changes per process.
        present = sorted(truths[image_id])
        absent = sorted(set(vocab_objects).difference(truths[image_id]))
        positives = rng.sample(present, min(per_image, len(present)))
        # As many negatives as positives keeps each image's yes/no balance at 50%.
        count = min(len(positives), len(absent))
        if setting == "random":
            negatives = rng.sample(absent, count)
        elif setting == "popular":
            negatives = _top(absent, frequency, count)
        else:
            related: Counter[str] = Counter()
            for obj in present:
                related.update(cooccurrence.get(obj, {}))
            negatives = _top(absent, related, count)
        questions += [PopeQuestion(image_id, obj, "yes", setting) for obj in positives]
        questions += [PopeQuestion(image_id, obj, "no", setting) for obj in negatives]
    return questions


def _top(candidates: list[str], weight: Counter[str], count: int) -> list[str]:
    """The ``count`` heaviest candidates; ties by name so the question set is reproducible."""
    return sorted(candidates, key=lambda obj: (-weight[obj], obj))[:count]


def parse_yes_no(answer: str) -> str | None:
    """"yes" / "no" from a free-text answer, or None when it cannot be decided.

    The first word decides ("Yes, but no cat" is yes); otherwise an answer with only
    one of the two words ("There is no dog") gives that word.
    """
    words = re.findall(r"[a-z]+", answer.lower())
    if words and words[0] in ("yes", "no"):
        return words[0]
    found = {"yes", "no"} & set(words)
    return found.pop() if len(found) == 1 else None


def pope_metrics(predictions: Sequence[str | None], labels: Sequence[str]) -> dict:
    """Accuracy, precision, recall, F1 ("yes" is positive) and the yes ratio.

    An unparsed prediction (None) counts as wrong: it is not a "yes", so it is a
    miss on a "yes" label, and it never matches a "no" label.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"got {len(predictions)} predictions but {len(labels)} labels: pass one per question.")
    if not labels:
        raise ValueError("labels is empty: POPE metrics need at least one question.")
    for i, (pred, label) in enumerate(zip(predictions, labels)):
        if label not in ("yes", "no"):
            raise ValueError(f"labels[{i}] is {label!r}: labels must be 'yes' or 'no'.")
        if pred not in ("yes", "no", None):
            raise ValueError(f"predictions[{i}] is {pred!r}: pass answers through parse_yes_no first.")
    pairs = list(zip(predictions, labels))
    tp = sum(pred == "yes" and label == "yes" for pred, label in pairs)
    fp = sum(pred == "yes" and label == "no" for pred, label in pairs)
    fn = sum(pred != "yes" and label == "yes" for pred, label in pairs)
    tn = sum(pred == "no" and label == "no" for pred, label in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    n = len(labels)
    return {
        "accuracy": (tp + tn) / n,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": (tp + fp) / n,
        "n": n,
        "unparsed": sum(pred is None for pred in predictions),
    }


# ----------------------------------------------------------------------------- POPE's own files

def pope_question_text(obj: str) -> str:
    """POPE's template, with "an" before a vowel as its builder writes (its files also carry the
    builder's typo "imange" there; we do not copy it)."""
    return f"Is there {'an' if obj[:1] in 'aeiou' else 'a'} {obj} in the image?"


def build_pope_files(images: Sequence[tuple[str, Sequence[str]]], per_image: int, seed: int) -> dict[str, list[dict]]:
    """POPE's question files ({question_id, image, text, label}) the way POPE's builder makes them.

    ``images``: (image, its annotated objects in annotation order), every one with at least
    ``per_image`` objects (POPE keeps only such images). Per image, the first ``per_image``
    objects are asked ("yes"), each followed by one negative ("no"): random picks among the
    objects of the whole set, popular takes the most frequent in the set, adversarial the one
    most often seen with that positive; when none is left, a random one. Counts and ties follow
    POPE's order (first seen first).
    """
    frequency: Counter[str] = Counter()
    cooccur: dict[str, Counter[str]] = {}
    for _, objects in images:
        if len(objects) < per_image:
            raise ValueError(f"POPE asks {per_image} present objects per image; an image with "
                             f"{len(objects)} was given.")
        frequency.update(objects)
        for a in objects:
            cooccur.setdefault(a, Counter()).update(b for b in objects if b != a)
    pool = list(frequency)
    popular = [obj for obj, _ in frequency.most_common()]
    files = {}
    for setting in SETTINGS:
        rng = random.Random(f"pope/{seed}/{setting}")
        records: list[dict] = []
        for image, objects in images:
            asked: list[str] = []
            for positive in objects[:per_image]:
                asked.append(positive)
                records.append({"question_id": len(records) + 1, "image": image,
                                "text": pope_question_text(positive), "label": "yes"})
                ranked = {"random": [], "popular": popular,
                          "adversarial": [obj for obj, _ in cooccur[positive].most_common()]}[setting]
                negative = next((obj for obj in ranked if obj not in asked and obj not in objects), None)
                free = [obj for obj in pool if obj not in asked and obj not in objects]
                if negative is None and free:
                    negative = rng.choice(free)
                if negative is None:
                    raise ValueError(f"no object left to ask as absent for {image}: the set has "
                                     f"{len(pool)} objects; POPE needs more images.")
                asked.append(negative)
                records.append({"question_id": len(records) + 1, "image": image,
                                "text": pope_question_text(negative), "label": "no"})
        files[setting] = records
    return files


def pope_answer(text: str) -> str:
    """POPE's own reading of an answer (its evaluate.py): the first sentence, commas removed,
    is "no" when it holds the word "No", "no" or "not", and "yes" otherwise, so an empty
    or off-topic answer counts as "yes"."""
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"
