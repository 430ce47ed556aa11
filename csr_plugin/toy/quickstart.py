"""Tiny random-weight assets for tests and benchmarks, built offline on the fly.

Everything lands under one folder (default ``.cache/tiny``), built once: a tiny
LLaVA-architecture VLM, a tiny open_clip model, and a few prompts about images
of coloured shapes. Random weights: they exercise every code path fast; the toy
world (csr_plugin/toy/world.py) is where CSR's effect is measured.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from csr_plugin.toy.tiny_models import build_tiny_clip, build_tiny_vlm

COLOURS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60), "yellow": (230, 200, 40)}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = ("Describe the image in detail.", "What objects are in the picture?", "What shapes do you see?")


def draw_shapes(path: Path, rng: random.Random, size: int = 64) -> None:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 3)):
        colour = COLOURS[rng.choice(list(COLOURS))]
        x, y, r = rng.randint(8, size - 8), rng.randint(8, size - 8), rng.randint(4, 10)
        shape = rng.choice(SHAPES)
        if shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        elif shape == "square":
            draw.rectangle((x - r, y - r, x + r, y + r), fill=colour)
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colour)
    image.save(path)


def write_prompts(folder: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    path = folder / "prompts.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            draw_shapes(folder / "images" / f"{i:04d}.png", rng)
            f.write(json.dumps({"id": f"toy-{i:04d}", "image": f"images/{i:04d}.png",
                                "question": QUESTIONS[i % len(QUESTIONS)]}) + "\n")
    return path


def prepare_tiny_assets(root: str | Path = ".cache/tiny", n_prompts: int = 16) -> Path:
    """Build (once) the tiny VLM, CLIP and prompts under ``root``; matches recipes/tiny.yaml."""
    root = Path(root)
    if not (root / "vlm" / "config.json").exists():
        build_tiny_vlm(root / "vlm")
    if not (root / "clip" / "tiny-clip.pt").exists():
        build_tiny_clip(root / "clip")
    if not (root / "prompts" / "prompts.jsonl").exists():
        write_prompts(root / "prompts", n_prompts)
    return root

