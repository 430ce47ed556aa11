"""reward.yes_no: claim — a yes/no answer to an object question is scored on the claim it makes,
R_I(yes) = R_I(claim) - b and R_I(no) = b - R_I(claim), b the image's mean over the vocabulary's claims."""
from __future__ import annotations

import copy
import json

import pytest
from PIL import Image

from csr_plugin.config import ConfigError, RewardConfig, recipe_from_dict
from csr_plugin.reward.source import SentenceInContext, build_visual_scorer, visual_scorer
from csr_plugin.reward.yes_no import ClaimVisual
from fakes import ScriptedEngine

QUESTION = RewardConfig().claim_question
TEMPLATES = RewardConfig().claim_templates
# what the scripted CLIP reads in each claim on image "a": the circle is there, the square is not
CLAIMS = {"There is a circle.": 30.0, "There is a square.": 12.0, "There is a triangle.": 6.0}   # b = 16


class TextClip:
    """R_I by the text alone (CLAIMS, else 5), every text it was asked about recorded."""

    def __init__(self):
        self.texts = []

    def score(self, items):
        self.texts += [text for _, _, text in items]
        return [CLAIMS.get(text, 5.0) for _, _, text in items]


def _item(prompt, text, image="a", first=True):
    return SentenceInContext(image, None, text, prompt, first=first)


def test_claims_are_scored_against_the_images_mean_and_other_sentences_as_before():
    clip = TextClip()
    scorer = ClaimVisual(visual_scorer(clip), ["circle", "square", "triangle"], QUESTION, TEMPLATES)
    items = [_item("Is there a square in the image?", "Yes."),
             _item("Is there a square in the image?", "No."),
             _item("USER: <image>\nIs there a circle in the picture? ASSISTANT:", "yes, there is one."),
             _item("Is there a circle in the image?", "No, there is no circle."),
             _item("Describe the image.", "Yes."),                                 # no object question: plain
             _item("Is there a square in the image?", "There is a red circle.", first=False)]   # after the answer: plain
    assert scorer.visual(items) == [12.0 - 16.0, 16.0 - 12.0, 30.0 - 16.0, 16.0 - 30.0, 5.0, 5.0]
    assert clip.texts.count("There is a triangle.") == 1   # the yardstick b: once per image
    scorer.visual([_item("Is there a square in the image?", "Yes.", image="b")])
    assert clip.texts.count("There is a triangle.") == 2   # a new image gets its own


@pytest.mark.parametrize("reply", ["right.", "YesNo.", "Nobody knows.", "There is a red circle.", "Square."])
def test_a_reply_that_is_neither_yes_nor_no_gets_the_worse_claim(reply):
    """c(square) - b = 12 - 16 = -4: "Yes." scores -4, "No." +4, a non-answer -4 (it ties the wrong answer, never
    beats the right one); c(circle) - b = +14: "No." scores -14, a non-answer -14. "YesNo." and "Nobody" do not
    start with the whole word yes or no."""
    scorer = ClaimVisual(visual_scorer(TextClip()), ["circle", "square", "triangle"], QUESTION, TEMPLATES)
    got = scorer.visual([_item("Is there a square in the image?", reply), _item("Is there a circle in the image?", reply),
                         _item("Describe the image.", reply)])
    assert got == [-4.0, -14.0, CLAIMS.get(reply, 5.0)]   # the description prompt: a plain sentence, as before


def test_search_never_chooses_a_non_answer_over_the_right_answer():
    """The scripted model prefers the fragment "right." (log-prob -0.1 against -2.0 for "Yes."/"No."); the claim
    makes it the worst answer but one tie, so the chosen reply is the right one and the rejected is never "Yes."."""
    from csr_plugin.config import CurationConfig, SearchConfig
    from csr_plugin.sampling.search import PromptJob, SentenceBeamSearch

    engine = ScriptedEngine(eos_at={1: {0, 1, 2}}, texts={(1, 0): " Yes.", (1, 1): " No.", (1, 2): " right."},
                            logprobs={(1, 0): -2.0, (1, 1): -2.0, (1, 2): -0.1})
    scorer = ClaimVisual(visual_scorer(TextClip()), ["circle", "square", "triangle"], QUESTION, TEMPLATES)
    search = SentenceBeamSearch(engine, scorer,
                                SearchConfig(beam_width=1, candidates=3, keep_top=1, keep_bottom=0, max_sentences=1),
                                RewardConfig(lambda_=0.9), CurationConfig())
    job = PromptJob("psquare", "a", "Is there a square in the image?", None,
                    engine.encode_prompt("Is there a square in the image?", None))
    (tree,) = search.run([job])
    answers = {n.text.strip(): n for n in tree.nodes[1:]}
    assert answers["right."].r_i == answers["Yes."].r_i == -4.0 and answers["No."].r_i == 4.0
    assert max(answers, key=lambda a: answers[a].reward) == "No."


def test_an_objects_claim_is_the_mean_over_the_templates_and_an_object_outside_the_vocabulary_is_scored_too():
    clip = TextClip()
    templates = ["There is a {object}.", "Look, a {object}!"]   # the second scores 5 for every object
    scorer = ClaimVisual(visual_scorer(clip), ["circle", "square", "triangle"], QUESTION, templates)
    b = ((30 + 5) / 2 + (12 + 5) / 2 + (6 + 5) / 2) / 3
    got = scorer.visual([_item("Is there a square in the image?", "Yes."),
                         _item("Is there a cat in the image?", "No.")])
    assert got == pytest.approx([(12 + 5) / 2 - b, b - (5 + 5) / 2])
    assert clip.texts.count("Look, a cat!") == 1 and clip.texts.count("Look, a square!") == 1
    scorer.visual([_item("Is there a cat in the image?", "Yes.")] * 3)
    assert clip.texts.count("Look, a cat!") == 1   # an image's claims are scored once, answers are lookups


def test_search_on_a_yes_no_prompt_prefers_the_answer_the_image_supports():
    """The model's log-probs alone would pick either answer; with the claim the search keeps "No." on top for
    the absent square and "Yes." for the present circle, on the same scripted log-probs."""
    from csr_plugin.config import CurationConfig, SearchConfig
    from csr_plugin.sampling.search import PromptJob, SentenceBeamSearch

    engine = ScriptedEngine(eos_at={1: {0, 1}}, texts={(1, 0): " Yes.", (1, 1): " No."})
    scorer = ClaimVisual(visual_scorer(TextClip()), ["circle", "square", "triangle"], QUESTION, TEMPLATES)
    search = SentenceBeamSearch(engine, scorer,
                                SearchConfig(beam_width=1, candidates=2, keep_top=1, keep_bottom=0, max_sentences=1),
                                RewardConfig(lambda_=0.9), CurationConfig())
    jobs = [PromptJob(f"p{obj}", "a", f"Is there a {obj} in the image?", None,
                      engine.encode_prompt(f"Is there a {obj} in the image?", None)) for obj in ("square", "circle")]
    best = {}
    for tree in search.run(jobs):
        answers = {n.text.strip(): n for n in tree.nodes[1:]}
        assert set(answers) == {"Yes.", "No."}
        assert answers["Yes."].r_i == -answers["No."].r_i
        best[tree.id] = max(answers, key=lambda a: answers[a].reward)
    assert best == {"psquare": "No.", "pcircle": "Yes."}


def _write_vocabulary(tmp_path):
    path = tmp_path / "objects.json"
    path.write_text(json.dumps({"objects": {"circle": ["circles"], "square": [], "triangle": []}}))
    return path


def test_recipe_builds_the_claim_scorer_on_the_real_clip(tiny_recipe_dict, tiny_clip, tmp_path):
    recipe = copy.deepcopy(tiny_recipe_dict)
    recipe["reward"] = {"yes_no": "claim", "claim_vocabulary": str(_write_vocabulary(tmp_path))}
    scorer = build_visual_scorer(recipe_from_dict(recipe))
    image = Image.new("RGB", (32, 32), "white")
    claims = tiny_clip.score([("k", image, f"There is a {o}.") for o in ("circle", "square", "triangle")])
    b = sum(claims) / 3
    got = scorer.visual([SentenceInContext("k", image, "Yes.", "Is there a square in the image?"),
                         SentenceInContext("k", image, "No.", "Is there a square in the image?"),
                         SentenceInContext("k", image, "There is a square.", "Describe it.")])
    assert got == pytest.approx([claims[1] - b, b - claims[1], claims[1]], abs=1e-4)


@pytest.mark.parametrize("reward, message", [
    ({"yes_no": "claim"}, "claim_vocabulary` is required"),
    ({"yes_no": "claim", "claim_vocabulary": "v.json", "claim_question": "is there (a"}, "not a valid regex"),
    ({"yes_no": "claim", "claim_vocabulary": "v.json", "claim_question": "is there a (\\w+)"}, "group named 'object'"),
    ({"yes_no": "claim", "claim_vocabulary": "v.json", "claim_templates": ["There is one."]}, "each containing"),
    ({"yes_no": "claim", "claim_vocabulary": "v.json", "claim_templates": []}, "non-empty list"),
    ({"yes_no": "claim", "claim_vocabulary": "v.json", "source": "mrm", "mrm": "rm/final"}, "source: clip"),
])
def test_bad_claim_settings_name_the_key_and_the_fix(tiny_recipe_dict, reward, message):
    recipe = copy.deepcopy(tiny_recipe_dict)
    recipe["reward"] = reward
    with pytest.raises(ConfigError, match=message):
        recipe_from_dict(recipe)


def test_a_missing_vocabulary_file_names_the_key(tiny_recipe_dict, tmp_path):
    recipe = copy.deepcopy(tiny_recipe_dict)
    recipe["reward"] = {"yes_no": "claim", "claim_vocabulary": str(tmp_path / "absent.json")}
    with pytest.raises(ValueError, match="reward.claim_vocabulary: .*absent.json"):
        build_visual_scorer(recipe_from_dict(recipe))


def test_a_relative_vocabulary_reaches_the_ray_actors_absolute(tiny_recipe_dict, tmp_path, monkeypatch):
    """Ray actors (PPO's vLLM rollout workers, the sampler's) run in Ray's own folder: a vocabulary given
    relative to where `csr` was started must reach them as an absolute path, or every rollout fails."""
    from csr_plugin.sampling.ray_actors import actor_recipe

    vocabulary = _write_vocabulary(tmp_path)
    monkeypatch.chdir(vocabulary.parent)
    recipe = copy.deepcopy(tiny_recipe_dict)
    recipe["reward"] = {"yes_no": "claim", "claim_vocabulary": vocabulary.name}
    sent = actor_recipe(recipe_from_dict(recipe))
    assert sent["reward"]["claim_vocabulary"] == str(vocabulary.resolve())
    monkeypatch.chdir("/")
    assert build_visual_scorer(recipe_from_dict(sent))   # the actor's view: it loads from any folder
