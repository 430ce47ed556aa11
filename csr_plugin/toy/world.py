"""A toy vision world where hallucination is exactly measurable.

Scenes hold 1-3 shapes (distinct kinds; SFT scenes up to 4), each with a colour and a quadrant. A caption
describes them one sentence per object, in a fixed kind order. In the SFT split some
kinds nearly always come with a partner (circle -> square, triangle -> diamond,
cross -> ring), so a model trained on it learns to name the partner after the trigger
whether or not it is in the image: the language-prior hallucination of large VLMs.
The CSR split weakens that prior and the evaluation split breaks it; the CLIP's split has none.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle", "diamond", "cross", "ring")
PARTNER = {"circle": "square", "triangle": "diamond", "cross": "ring"}
PAIRED = {**PARTNER, **{partner: trigger for trigger, partner in PARTNER.items()}}  # both directions
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (235, 200, 30)}
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
SYNONYMS = {"circle": ["circles", "disc"], "square": ["squares", "box"], "triangle": ["triangles"],
            "diamond": ["diamonds"], "cross": ["crosses"], "ring": ["rings"]}
DESCRIBE = ("Describe the image.", "What is in the picture?", "Describe the shapes in the image.")
# how often a trigger's partner is added, per split. The toy VLM sees through the toy CLIP's image
# tower, as LLaVA sees through a web CLIP's: it can tell the shapes apart, and its hallucinations come
# from the language prior. At 0.9 the 10% of SFT scenes with a pair apart taught it to look (base
# CHAIR_i 0.03); at 1.0 it never learnt that a pair can be apart and the search found nothing clean to
# choose (docs/results.md); 0.97 leaves a prior that the images can still overrule. The toy CLIP learns
# from its own split without the prior: a web CLIP is trained on other data than the VLM's
# instructions, and a CLIP that saw a square only next to a circle cannot tell the search that the
# circle is missing.
PRIOR = {"sft": 0.97, "csr": 0.5, "eval": 0.25, "clip": 0.0}
IMAGE_SIZE = 32


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    quadrant: str

    def sentence(self) -> str:
        return f"There is a {self.colour} {self.kind} at the {self.quadrant}."


@dataclass
class Scene:
    id: str
    shapes: list[Shape]

    @property
    def objects(self) -> set[str]:
        return {s.kind for s in self.shapes}

    def caption_sentences(self) -> list[str]:
        return [s.sentence() for s in sorted(self.shapes, key=lambda s: KINDS.index(s.kind))]

    def caption(self) -> str:
        return " ".join(self.caption_sentences())

    def draw(self) -> Image.Image:
        image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), "white")
        pen = ImageDraw.Draw(image)
        half = IMAGE_SIZE // 2
        for shape in self.shapes:
            q = QUADRANTS.index(shape.quadrant)
            cx, cy, r = (q % 2) * half + half // 2, (q // 2) * half + half // 2, half // 2 - 2
            colour = COLOURS[shape.colour]
            box = (cx - r, cy - r, cx + r, cy + r)
            if shape.kind == "circle":
                pen.ellipse(box, fill=colour)
            elif shape.kind == "square":
                pen.rectangle(box, fill=colour)
            elif shape.kind == "triangle":
                pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
            elif shape.kind == "diamond":
                pen.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
            elif shape.kind == "cross":
                pen.rectangle((cx - r, cy - 1, cx + r, cy + 1), fill=colour)
                pen.rectangle((cx - 1, cy - r, cx + 1, cy + r), fill=colour)
            else:  # ring
                pen.ellipse(box, outline=colour, width=2)
        return image


def make_scene(rng: random.Random, scene_id: str, split: str) -> Scene:
    kinds = rng.sample(KINDS, rng.randint(1, 3 if split == "clip" else 2))
    for trigger, partner in PARTNER.items():
        if trigger in kinds and partner not in kinds and rng.random() < PRIOR[split]:
            kinds.append(partner)
        elif split == "sft" and partner in kinds and trigger not in kinds and rng.random() < PRIOR[split]:
            kinds.append(trigger)  # in SFT the pair also appears together when the partner came first
    kinds = kinds[:4 if split == "sft" else 3]   # SFT: two whole pairs fit, one in each quadrant
    quadrants = rng.sample(QUADRANTS, len(kinds))
    shapes = [Shape(k, rng.choice(list(COLOURS)), q) for k, q in zip(kinds, quadrants)]
    return Scene(scene_id, shapes)


def make_split(split: str, n: int, seed: int) -> list[Scene]:
    """Deterministic per (split, n, seed)."""
    if split not in PRIOR:
        raise ValueError(f"split must be one of {', '.join(PRIOR)}, got {split!r}")
    rng = random.Random(f"{seed}:{split}")
    return [make_scene(rng, f"{split}-{i:05d}", split) for i in range(n)]


def pope_sft_answers(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """(question, answer) yes/no pairs for SFT: one present kind and one absent kind per scene."""
    present = rng.choice(sorted(scene.objects))
    absent = rng.choice([k for k in KINDS if k not in scene.objects])
    return [(f"Is there a {present} in the image?", "Yes."), (f"Is there a {absent} in the image?", "No.")]


def write_split(scenes: list[Scene], folder: Path, seed: int) -> Path:
    """Images, prompts.jsonl ({id, image, question}) and truth.jsonl ({id, objects, caption})."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    rng = random.Random(seed)
    with open(folder / "prompts.jsonl", "w") as prompts, open(folder / "truth.jsonl", "w") as truth:
        for scene in scenes:
            scene.draw().save(folder / "images" / f"{scene.id}.png")
            prompts.write(json.dumps({"id": scene.id, "image": f"images/{scene.id}.png",
                                      "question": rng.choice(DESCRIBE)}) + "\n")
            truth.write(json.dumps({"id": scene.id, "objects": sorted(scene.objects), "caption": scene.caption(),
                                    "shapes": [asdict(s) for s in scene.shapes]}) + "\n")
    return folder / "prompts.jsonl"


def vocabulary_json(path: Path) -> Path:
    path.write_text(json.dumps({"objects": SYNONYMS}, indent=2))
    return path


def corpus(scenes: list[Scene]) -> list[str]:
    """Text a tokenizer for this world is trained on."""
    lines = [s.caption() for s in scenes] + list(DESCRIBE)
    lines += [f"Is there a {k} in the image? Yes. No." for k in KINDS]
    return lines
