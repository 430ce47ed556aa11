"""The toy world: deterministic, with the priors that make a model hallucinate, and exactly measurable."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from csr_plugin.eval.chair import chair, object_recall
from csr_plugin.eval.objects import ObjectVocabulary
from csr_plugin.toy import world

REPO = Path(__file__).resolve().parent.parent


def _partner_rate(scenes):
    """P(partner present | trigger present), over every (scene, trigger) instance."""
    pairs = [(s, t) for s in scenes for t in world.PARTNER if t in s.objects]
    return sum(world.PARTNER[t] in s.objects for s, t in pairs) / len(pairs)


def test_generator_is_deterministic_per_seed():
    a, b = world.make_split("eval", 50, seed=3), world.make_split("eval", 50, seed=3)
    assert [s.shapes for s in a] == [s.shapes for s in b]
    assert a[7].draw().tobytes() == b[7].draw().tobytes()
    assert [s.shapes for s in world.make_split("eval", 50, seed=4)] != [s.shapes for s in a]
    with pytest.raises(ValueError, match="split must be one of sft, csr, eval"):
        world.make_split("train", 5, 0)


def test_sft_priors_hold_and_evaluation_breaks_them():
    # in SFT either member of a pair brings the other with p = 0.97 (up to 4 shapes: two whole pairs), so
    # a pair is apart in about 1% of its appearances (less than 3%: the other member is often drawn anyway):
    # rare enough to be a prior, not never, so the images can overrule it. In eval a trigger's partner is
    # added with p = 0.25 (plus the chance of drawing it anyway), then scenes are capped at 3 shapes
    sft = world.make_split("sft", 2000, 0)
    appearances = [(s, kind) for s in sft for kind in s.objects if kind in world.PAIRED]
    apart = sum(world.PAIRED[kind] not in s.objects for s, kind in appearances) / len(appearances)
    assert len(appearances) > 5000 and 0.005 < apart < 0.03
    assert max(len(s.shapes) for s in sft) == 4
    evaluation = _partner_rate(world.make_split("eval", 2000, 0))
    assert evaluation < 0.4 and max(len(s.shapes) for s in world.make_split("eval", 2000, 0)) == 3


def test_captions_are_exact_ground_truth(tmp_path):
    scenes = world.make_split("csr", 200, 1)
    vocab = ObjectVocabulary.from_json(world.vocabulary_json(tmp_path / "objects.json"))
    captions = [s.caption() for s in scenes]
    truths = [s.objects for s in scenes]
    assert chair(captions, truths, vocab)["chair_i"] == 0.0
    assert object_recall(captions, truths, vocab) == 1.0
    scene = scenes[0]
    assert len(scene.caption_sentences()) == len(scene.shapes)
    kinds = [vocab.mentions(sentence)[0] for sentence in scene.caption_sentences()]
    assert kinds == sorted(kinds, key=world.KINDS.index), "triggers are described before their partners"


def test_split_files_follow_the_prompt_contract(tmp_path):
    scenes = world.make_split("eval", 5, 0)
    prompts = world.write_split(scenes, tmp_path / "eval", seed=0)
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    assert [r["id"] for r in rows] == [s.id for s in scenes]
    assert all((tmp_path / "eval" / r["image"]).is_file() and r["question"] for r in rows)
    truth = [json.loads(line) for line in (tmp_path / "eval" / "truth.jsonl").read_text().splitlines()]
    assert truth[0]["objects"] == sorted(scenes[0].objects)


def test_a_cached_split_of_another_size_or_cut_short_is_written_anew(tmp_path):
    from csr_plugin.toy.demo import write_split_once

    folder = tmp_path / "eval"
    write_split_once(world.make_split("eval", 6, 0), folder, seed=0)
    write_split_once(world.make_split("eval", 9, 0), folder, seed=0)    # a larger eval size
    assert len((folder / "truth.jsonl").read_text().splitlines()) == 9
    assert len(list((folder / "images").iterdir())) == 9
    write_split_once(world.make_split("eval", 4, 0), folder, seed=0)    # a smaller one: no stale images left
    assert len(list((folder / "images").iterdir())) == 4
    lines = (folder / "truth.jsonl").read_text().splitlines()
    (folder / "truth.jsonl").write_text("\n".join(lines[:2]) + "\n")       # a write cut off after 2 scenes
    (folder / "images" / "marker.txt").write_text("from the cut-off write")
    write_split_once(world.make_split("eval", 4, 0), folder, seed=0)
    assert len((folder / "truth.jsonl").read_text().splitlines()) == 4
    assert not (folder / "images" / "marker.txt").exists()
    (folder / "images" / "marker.txt").write_text("kept: the split is whole")
    write_split_once(world.make_split("eval", 4, 0), folder, seed=0)    # whole and of the right size: reused
    assert (folder / "images" / "marker.txt").exists()


def test_csr_questions_ask_every_kind_of_every_scene_without_labels(tmp_path):
    from csr_plugin.toy.demo import write_yes_no_prompts

    scenes = world.make_split("csr", 5, 0)
    world.write_split(scenes, tmp_path, seed=0)
    write_yes_no_prompts(tmp_path)
    prompts = [json.loads(line) for line in (tmp_path / "questions.jsonl").read_text().splitlines()]
    truth = [json.loads(line) for line in (tmp_path / "questions_truth.jsonl").read_text().splitlines()]
    per_scene = 1 + len(world.KINDS)
    assert len(prompts) == len(truth) == 5 * per_scene
    assert [p["id"] for p in prompts] == [t["id"] for t in truth] and len({p["id"] for p in prompts}) == len(prompts)
    for i, scene in enumerate(scenes):
        block = prompts[i * per_scene:(i + 1) * per_scene]
        assert block[0]["question"] in world.DESCRIBE and {p["image"] for p in block} == {f"images/{scene.id}.png"}
        assert [p["question"] for p in block[1:]] == [f"Is there a {k} in the image?" for k in world.KINDS]
        assert all(t["objects"] == sorted(scene.objects) for t in truth[i * per_scene:(i + 1) * per_scene])


def test_the_toy_recipe_samples_the_questions_and_scores_claims_on_the_seeds_vocabulary(tmp_path):
    from csr_plugin.config import load_recipe
    from csr_plugin.toy.demo import toy_overrides

    recipe = REPO / "recipes" / "toy.yaml"
    prompts = Path(load_recipe(recipe).data.prompts).name
    loaded = load_recipe(recipe, toy_overrides(tmp_path / "seed3", "out", 3, 0.9, prompts))
    assert loaded.data.prompts == str(tmp_path / "seed3" / "csr" / "questions.jsonl")
    assert loaded.data.truth == str(tmp_path / "seed3" / "csr" / "questions_truth.jsonl")
    assert (loaded.reward.yes_no, loaded.reward.claim_vocabulary) == ("claim", str(tmp_path / "seed3" / "objects.json"))
    plain = load_recipe(REPO / "recipes" / "toy-describe.yaml", toy_overrides(tmp_path / "seed3", "out", 3, 0.9))
    assert plain.data.prompts.endswith("csr/prompts.jsonl") and plain.reward.yes_no == "off"
    with pytest.raises(ValueError, match="must end in one of prompts.jsonl, questions.jsonl"):
        toy_overrides(tmp_path, "out", 3, 0.9, "mine.jsonl")


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    result = subprocess.run([sys.executable, "-m", "csr_plugin.cli", "demo", "--quick", "--iterations", "1",
                             "--output", str(out)], cwd=REPO, capture_output=True,
                            text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


def test_quick_demo_runs_the_real_pipeline_and_reports_hallucination(quick_demo):
    out, stdout = quick_demo
    results = json.loads((out / "results.json").read_text())
    assert [r["iteration"] for r in results["iterations"]] == [0, 1]
    for row in results["iterations"]:
        assert all(0.0 <= row[k] <= 1.0 for k in ("chair_s", "chair_i", "pope_f1"))
    assert "CHAIR_i" in stdout and (out / "metrics.png").exists()
    assert (out / "iter_1" / "dpo" / "final" / ".complete").exists()
    # the toy recipe mixes the base model's SFT examples into DPO: their NLL is logged per step
    steps = [json.loads(line) for line in (out / "iter_1" / "dpo" / "dpo_metrics.jsonl").read_text().splitlines()]
    assert steps and all(0.0 < step["nll_loss"] < 5.0 for step in steps)
    # the pair diagnostics, with the ground truth the toy world knows for the sampled prompts
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert 0.0 <= row["diag_informative_pairs"] <= 1.0 and row["diag_truth_coverage"] == 1.0
    assert row["diag_chosen_chair_i"] <= row["diag_rejected_chair_i"]
    assert "informative" in stdout
    # the recipe asks yes/no questions too: their pairs are judged on the answer against the truth
    assert 0.0 < row["diag_yes_no_pairs"] < 1.0 and 0.0 <= row["diag_yes_no_chosen_right"] <= 1.0
    # the held-out split is scored for each iterate, and the best one is named (loop.holdout)
    assert [h["iteration"] for h in results["holdout"]] == [0, 1] and results["holdout"][0]["holdout_reward"] == 0.0
    assert results["selected"] in (0, 1) and row["holdout_reward"] == results["holdout"][1]["holdout_reward"]
    held = [json.loads(line) for line in (out / "iter_1" / "holdout.jsonl").read_text().splitlines()]
    assert len(held) == 8 * 7 and all("sentences" in r for r in held)   # 8 scenes: a description + 6 questions
    assert "held-out" in stdout and "selected by the held-out reward" in stdout
    # quiet by default: stage lines and the table on the terminal, the rest in <output>/logs/
    assert len(stdout.splitlines()) < 40, stdout
    assert (out / "logs" / "csr.log").exists() and (out / "logs" / "dpo_iter1.log").exists()


def test_pretrained_toy_vlm_sees_far_better_than_chance(quick_demo):
    """Naming k of the 6 kinds at random recovers k/6 of a scene's objects; the quick model, trained
    for 300 steps only, must recover well over half of them with most mentions right."""
    out, _ = quick_demo
    base = json.loads((out / "eval_base.json").read_text())
    assert base["object_recall"] > 0.55
    assert base["chair_i"] < 0.6


def test_toy_clip_targets_put_the_object_first():
    """Soft contrastive targets: the right kind with wrong attributes fits partly, an absent kind not at
    all, whatever its colour and place; the contrast texts cover both cases and object-less text."""
    import random

    from csr_plugin.toy.train_models import (FIT_EXACT, FIT_KIND_ONLY, FIT_ONE_ATTRIBUTE_WRONG, contrast_texts,
                                             sentence_fit)

    scene = world.Scene("s", [world.Shape("circle", "red", "top left"), world.Shape("ring", "blue", "bottom right")])
    assert sentence_fit("There is a red circle at the top left.", scene) == FIT_EXACT
    assert sentence_fit("There is a green circle at the top left.", scene) == FIT_ONE_ATTRIBUTE_WRONG
    assert sentence_fit("There is a red circle at the bottom right.", scene) == FIT_ONE_ATTRIBUTE_WRONG
    assert sentence_fit("There is a green circle at the top right.", scene) == FIT_KIND_ONLY
    assert sentence_fit("There is a red square at the top left.", scene) == 0.0     # absent kind, right place
    assert sentence_fit("There is a red at the top left.", scene) == 0.0
    rng = random.Random(0)
    for _ in range(20):
        hallucinated, other_attributes, empty = contrast_texts(scene, rng)
        assert sentence_fit(hallucinated, scene) == 0.0
        assert sentence_fit(other_attributes, scene) in (FIT_ONE_ATTRIBUTE_WRONG, FIT_KIND_ONLY)
        assert not any(kind in empty for kind in world.KINDS)


def test_toy_clip_learns_from_a_split_without_the_prior_and_meets_paired_negatives():
    """The CLIP's own split draws kinds independently (1-3 shapes), and the contrast sentence names the kind the
    world pairs with the shape (circle <-> square ...) half the time it is absent: a random absent kind alone left
    the seed-0 CLIP scoring "circle" as high as "square" on a square."""
    import random

    from csr_plugin.toy.train_models import contrast_texts

    clip_scenes = world.make_split("clip", 3000, 0)
    base_rate = sum(world.PARTNER[t] in s.objects for s in clip_scenes for t in world.PARTNER if t in s.objects)
    assert _partner_rate(clip_scenes) < 0.5 < _partner_rate(world.make_split("sft", 2000, 0))
    assert base_rate > 0 and {len(s.shapes) for s in clip_scenes} == {1, 2, 3}

    paired = {**world.PARTNER, **{p: t for t, p in world.PARTNER.items()}}
    scene = world.Scene("s", [world.Shape("circle", "red", "top left"), world.Shape("ring", "blue", "bottom right")])
    rng = random.Random(0)
    hits = 0
    for _ in range(400):
        hallucinated = contrast_texts(scene, rng)[0]
        shape = next(s for s in scene.shapes if s.colour in hallucinated and s.quadrant in hallucinated)
        hits += paired[shape.kind] in hallucinated
    # 1/2 + 1/2 * 1/4 = 0.625 expected; a uniform absent kind would give 0.25
    assert 0.55 < hits / 400 < 0.7


def test_toy_vlm_image_tower_is_the_clip_image_tower(tmp_path):
    """The toy LLaVA's image tower, converted from open_clip to transformers' CLIPVisionModel, gives
    the CLIP's own image embedding (its pooled output through the CLIP's projection) to float precision,
    with the processor's pixels equal to open_clip's preprocessing."""
    import open_clip
    import torch

    from csr_plugin.toy.train_models import CLIP_NAME, build_vlm, clip_config

    (tmp_path / f"{CLIP_NAME}.json").write_text(json.dumps(clip_config()))
    open_clip.add_model_config(tmp_path / f"{CLIP_NAME}.json")
    torch.manual_seed(0)
    clip, _, preprocess = open_clip.create_model_and_transforms(CLIP_NAME, pretrained=None)
    with torch.no_grad():   # random weights, but no two alike: a swapped tensor would show
        for p in clip.parameters():
            p.normal_(0, 0.2)
    torch.save(clip.state_dict(), tmp_path / f"{CLIP_NAME}.pt")
    clip.eval()
    scenes = world.make_split("eval", 3, 0)
    model, processor = build_vlm(tmp_path / "vlm", world.make_split("sft", 20, 0), 0, tmp_path)
    pixels = processor.image_processor([s.draw() for s in scenes], return_tensors="pt")["pixel_values"]
    reference = torch.stack([preprocess(s.draw()) for s in scenes])
    assert torch.allclose(pixels, reference, atol=1e-5)
    with torch.no_grad():
        ours = model.model.vision_tower(pixel_values=pixels).pooler_output @ clip.visual.proj
        theirs = clip.encode_image(reference)
    assert theirs.abs().max() > 1.0 and torch.allclose(ours, theirs, atol=1e-4)
    # every token the tower gives, the class token included, reaches the language model
    assert model.config.vision_feature_select_strategy == "full" and model.config.image_seq_length == 17
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                            "text": "Describe."}]}], add_generation_prompt=True, tokenize=False)
    ids = processor(images=scenes[0].draw(), text=prompt)["input_ids"][0]
    assert sum(int(i == model.config.image_token_index) for i in ids) == 17


def test_toy_vlm_on_its_clip_tower_runs_through_the_vllm_engine(quick_demo):
    """vLLM 0.29 serves the toy VLM (LLaVA with strategy "full": 17 image features, the class token
    included) as transformers does: the recipes that sample or roll out with vLLM (toy-ppo) use it.
    A feature dropped or shifted would change every log-prob after the image."""
    import torch
    from PIL import Image
    from transformers import LlavaForConditionalGeneration

    from conftest import make_engine, reference_logprobs
    from csr_plugin.config import ModelConfig, SearchConfig
    from csr_plugin.sampling.engine import Expansion
    from csr_plugin.sampling.vllm_engine import VllmEngine

    path = REPO / ".cache" / "toy" / "seed0-quick" / "vlm"
    row = json.loads((REPO / ".cache" / "toy" / "seed0-quick" / "eval" / "prompts.jsonl").read_text().splitlines()[0])
    image = Image.open(path.parent / "eval" / row["image"]).convert("RGB")
    search = SearchConfig(beam_width=3, candidates=4, keep_top=1, keep_bottom=2, max_new_tokens=12,
                          vllm={"max_model_len": 256})
    engine = VllmEngine.from_config(ModelConfig(path=str(path), dtype="float32"), search)
    try:
        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        hf_engine = make_engine((model, engine.processor))
        image_id = model.config.image_token_index
        assert hf_engine.encode_prompt(row["question"], image).token_ids.count(image_id) == 17
        [candidates] = engine.expand([Expansion(engine.encode_prompt(row["question"], image), [], 4, seed=3)])
        assert len(candidates) == 4
        for cont in candidates:
            expected = reference_logprobs(model, hf_engine, row["question"], image, [], cont.token_ids)
            assert cont.logprobs == pytest.approx(expected, abs=1e-4)
        # and the image matters: a blank one changes the log-probs (reference_logprobs runs without grad)
        blank = reference_logprobs(model, hf_engine, row["question"], Image.new("RGB", image.size, "white"), [],
                                   candidates[0].token_ids)
        assert max(abs(a - b) for a, b in zip(blank, candidates[0].logprobs)) > 0.1
    finally:
        engine.llm.llm_engine.engine_core.shutdown()


def test_the_paper_setting_recipe_mixes_no_sft_examples_and_keeps_the_last_iterate(tmp_path):
    from csr_plugin.config import load_recipe
    from csr_plugin.toy.demo import toy_overrides

    recipe = load_recipe(REPO / "recipes" / "toy-paper.yaml")
    assert (recipe.dpo.sft_data, recipe.dpo.beta, recipe.dpo.epochs, recipe.reward.yes_no) == ("", 0.1, 1, "off")
    assert recipe.loop.on_decline == "report"
    loaded = load_recipe(REPO / "recipes" / "toy-paper.yaml", toy_overrides(tmp_path, "out", 3, 0.9, sft=False))
    assert loaded.dpo.sft_data == "" and loaded.loop.holdout == str(tmp_path / "holdout" / "prompts.jsonl")
    assert load_recipe(REPO / "recipes" / "toy.yaml", toy_overrides(tmp_path, "out", 3, 0.9, "questions.jsonl")
                       ).loop.holdout == str(tmp_path / "holdout" / "questions.jsonl")


class _KindClip:
    """A stand-in CLIP that embeds an image by the kinds it shows and a sentence by the kind it names
    (``blind``: every image alike), so kind_sight's count can be worked out by hand."""

    def __init__(self, blind=False):
        self.blind = blind

    def eval(self):
        return self

    def encode_image(self, images, normalize=True):
        import torch

        return torch.ones(len(images), len(world.KINDS)) if self.blind else images

    def encode_text(self, texts, normalize=True):
        return texts


def _kind_preprocess(scene_image):
    import torch

    return torch.tensor([float(k in scene_image) for k in world.KINDS])


def _kind_tokenizer(texts):
    import torch

    return torch.stack([torch.tensor([float(f" {k} " in t) for k in world.KINDS]) for t in texts])


def test_kind_sight_counts_scenes_whose_true_sentence_beats_the_absent_kind(monkeypatch):
    from csr_plugin.toy.train_models import kind_sight

    scenes = world.make_split("clip", 20, 0)
    monkeypatch.setattr(world.Scene, "draw", lambda scene: scene.objects)   # the stand-in "image": its kinds
    assert kind_sight(_KindClip(), _kind_preprocess, _kind_tokenizer, scenes) == 1.0
    assert kind_sight(_KindClip(blind=True), _kind_preprocess, _kind_tokenizer, scenes) == 0.0   # ties are misses


def test_a_clip_that_does_not_see_is_trained_again_and_then_refused(monkeypatch, tmp_path, capsys):
    from csr_plugin.toy import train_models

    inits = []
    monkeypatch.setattr(train_models, "_train_clip_once", lambda scenes, steps, seed, batch: (
        inits.append(seed) or _Weights(), None, None))
    sights = iter([0.55, 0.97])
    monkeypatch.setattr(train_models, "kind_sight", lambda *a: next(sights))
    train_models.train_clip([], tmp_path / "a", 10, seed=3, probe=[object()] * 200)
    assert inits == [3, 1003]                                   # the second initialization is another seed
    assert json.loads((tmp_path / "a" / "sight.json").read_text()) == {"kind_sight": 0.97, "scenes": 200,
                                                                      "initializations": 2}
    assert "tells a present kind from an absent one in 55% of 200" in capsys.readouterr().out
    monkeypatch.setattr(train_models, "kind_sight", lambda *a: 0.5)
    with pytest.raises(RuntimeError, match=r"after 3 initializations .* 50%, 50%, 50% of 200 held-out scenes"):
        train_models.train_clip([], tmp_path / "b", 10, seed=3, probe=[object()] * 200)
    assert not (tmp_path / "b" / "toy-clip.pt").exists()     # no blind CLIP left for a build to pick up


class _Weights:
    def state_dict(self):
        return {}
