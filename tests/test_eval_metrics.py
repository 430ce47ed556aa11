import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from csr_plugin.eval import (ObjectVocabulary, PopeQuestion, build_pope, chair, cooccurrence_counts,
                             object_recall, parse_yes_no, per_response, pope_metrics)

VOCAB = ObjectVocabulary({
    "circle": ["circles", "disc", "disk"],
    "square": ["squares"],
    "traffic light": ["traffic lights"],
    "light": ["lights", "lamp"],
    "light switch": [],
    "dog": ["dogs", "puppy"],
})


# ----------------------------------------------------------------------------- vocabulary

def test_synonyms_plurals_and_case_map_to_the_canonical_name_in_order():
    text = "A Circle, a DISK, two squares and circles; then a puppy."
    assert VOCAB.mentions(text) == ["circle", "circle", "square", "circle", "dog"]


def test_forms_match_whole_words_only():
    """"circles" is a listed form; "circlet", "semicircle" and "discs" (only "disc" is listed) are not."""
    assert VOCAB.mentions("circles") == ["circle"]
    assert VOCAB.mentions("a circlet, a semicircle and two discs") == []


def test_multi_word_forms_win_over_their_parts_and_count_once():
    """"traffic light" contains the form "light": it must give one mention, not two; "light switch"
    starts with "light", so it must be tried first."""
    assert VOCAB.mentions("a traffic light next to a lamp") == ["traffic light", "light"]
    assert VOCAB.mentions("a light switch under the lights") == ["light switch", "light"]
    assert VOCAB.mentions("Traffic lights, then a light") == ["traffic light", "light"]
    assert VOCAB.mentions("a traffic\n light") == ["traffic light"]


def test_objects_are_sorted_and_the_canonical_name_always_counts():
    assert VOCAB.objects == ["circle", "dog", "light", "light switch", "square", "traffic light"]
    assert ObjectVocabulary({"dog": []}).mentions("a dog") == ["dog"]
    assert ObjectVocabulary({}).mentions("a dog") == []


def test_a_form_shared_by_two_objects_is_refused():
    with pytest.raises(ValueError, match="form 'Disc' belongs to both 'circle' and 'record'"):
        ObjectVocabulary({"circle": ["disc"], "record": ["Disc"]})


def test_json_round_trip(tmp_path):
    path = tmp_path / "vocab.json"
    VOCAB.to_json(path)
    assert json.loads(path.read_text())["objects"]["circle"] == ["circles", "disc", "disk"]
    loaded = ObjectVocabulary.from_json(path)
    assert loaded == VOCAB
    assert loaded.mentions("two dogs and a lamp") == ["dog", "light"]


@pytest.mark.parametrize("content, problem", [
    ("{not json", "not valid JSON"),
    ('{"circle": ["disc"]}', 'an "objects" key'),
    ('{"objects": {"circle": "disc"}}', "forms of 'circle' must be a list"),
    ('{"objects": {"circle": ["disc"], "record": ["disc"]}}', "belongs to both"),
])
def test_json_errors_name_the_file_and_the_problem(tmp_path, content, problem):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError) as info:
        ObjectVocabulary.from_json(path)
    assert str(path) in str(info.value) and problem in str(info.value)


# ----------------------------------------------------------------------------- CHAIR

RESPONSES = [
    "A circle and a square.",
    "Two circles beside a dog.",
    "A traffic light, a lamp and a puppy.",
    "Nothing but a disc and another disc.",
]
TRUTHS = [{"circle", "square"}, {"circle"}, {"traffic light"}, {"square"}]


def test_chair_on_four_hand_worked_responses():
    """Mentions / hallucinated per response:
    1. [circle, square]             / 0
    2. [circle, dog]                / 1 (dog)
    3. [traffic light, light, dog]  / 2 (light, dog)   -- "traffic light" is not also a "light"
    4. [circle, circle]             / 2 (both mentions count)
    CHAIR_s = 3 responses with a hallucination / 4 = 0.75
    CHAIR_i = (0+1+2+2) / (2+2+3+2) = 5/9
    """
    result = chair(RESPONSES, TRUTHS, VOCAB)
    assert result == {"chair_s": pytest.approx(3 / 4), "chair_i": pytest.approx(5 / 9), "responses": 4,
                      "mentions": 9, "hallucinated_mentions": 5, "hallucinated_responses": 3}


def test_per_response_lists_mentions_hallucinations_and_coverage():
    assert per_response(RESPONSES[1], TRUTHS[1], VOCAB) == {
        "mentioned": ["circle", "dog"], "hallucinated": ["dog"], "hallucinated_words": [["dog", "dog"]],
        "covered": ["circle"]}
    assert per_response(RESPONSES[3], TRUTHS[3], VOCAB) == {
        "mentioned": ["circle", "circle"], "hallucinated": ["circle", "circle"],
        "hallucinated_words": [["disc", "circle"], ["disc", "circle"]], "covered": []}
    assert per_response("a square, a circle, a circle", ["circle", "square"], VOCAB)["covered"] == [
        "square", "circle"]


def test_object_recall_counts_distinct_truth_objects():
    """Truth objects 2+1+1+1 = 5; covered: {circle, square}, {circle}, {traffic light}, {} = 4 -> 4/5."""
    assert object_recall(RESPONSES, TRUTHS, VOCAB) == pytest.approx(4 / 5)
    # Repeating a covered object does not raise recall: 1 of 2 truth objects -> 1/2.
    assert object_recall(["a dog, a dog, a dog"], [{"dog", "square"}], VOCAB) == pytest.approx(1 / 2)


def test_no_mentions_gives_zero_rates():
    assert chair(["Nothing to see."], [{"circle"}], VOCAB) == {
        "chair_s": 0.0, "chair_i": 0.0, "responses": 1, "mentions": 0,
        "hallucinated_mentions": 0, "hallucinated_responses": 0}


def test_chair_input_errors():
    with pytest.raises(ValueError, match="2 responses but 1 ground-truth sets"):
        chair(["a", "b"], [{"circle"}], VOCAB)
    with pytest.raises(ValueError, match="responses is empty"):
        chair([], [], VOCAB)
    with pytest.raises(ValueError, match="2 responses but 1 ground-truth sets"):
        object_recall(["a", "b"], [{"circle"}], VOCAB)
    with pytest.raises(TypeError, match=r"got the string 'circle': wrap it"):
        chair(["a circle"], ["circle"], VOCAB)


# ----------------------------------------------------------------------------- POPE questions

OBJECTS = ["bench", "car", "dog", "person", "tree"]
# Frequencies: person 3, car 2, tree 2, dog 1, bench 1.
POPE_TRUTHS = {
    "a": {"person", "dog"},
    "b": {"person", "car"},
    "c": {"person", "car", "tree"},
    "d": {"tree", "bench"},
}


def _by_image(questions, label):
    out = {}
    for q in questions:
        if q.label == label:
            out.setdefault(q.image_id, []).append(q.object)
    return out


def test_question_text():
    assert PopeQuestion("a", "dog", "yes", "random").text() == "Is there a dog in the image?"


def test_cooccurrence_counts_pairs_within_images():
    """person appears with dog in a, with car in b and c, with tree in c; etc."""
    assert cooccurrence_counts(POPE_TRUTHS.values()) == {
        "person": {"dog": 1, "car": 2, "tree": 1},
        "dog": {"person": 1},
        "car": {"person": 2, "tree": 1},
        "tree": {"person": 1, "car": 1, "bench": 1},
        "bench": {"tree": 1},
    }


def test_positives_are_present_objects_and_images_come_in_sorted_order():
    """per_image=2: a, b, d have exactly 2 objects so all are asked; c gives 2 of its 3."""
    questions = build_pope(dict(reversed(POPE_TRUTHS.items())), OBJECTS, "random", per_image=2, seed=0)
    assert [q.image_id for q in questions] == ["a"] * 4 + ["b"] * 4 + ["c"] * 4 + ["d"] * 4
    positives = _by_image(questions, "yes")
    assert {k: set(v) for k, v in positives.items() if k != "c"} == {
        "a": {"person", "dog"}, "b": {"person", "car"}, "d": {"tree", "bench"}}
    assert len(set(positives["c"])) == 2 and set(positives["c"]) <= POPE_TRUTHS["c"]
    assert all(q.setting == "random" for q in questions)


def test_random_negatives_are_absent_objects():
    """Absent: a {bench, car, tree}, b {bench, dog, tree}, c {bench, dog}, d {car, dog, person}; 2 each."""
    negatives = _by_image(build_pope(POPE_TRUTHS, OBJECTS, "random", per_image=2, seed=3), "no")
    assert set(negatives["c"]) == {"bench", "dog"}    # only two absent: both are taken
    for image_id, objects in negatives.items():
        assert len(set(objects)) == 2 and not set(objects) & POPE_TRUTHS[image_id]


def test_popular_negatives_are_the_most_frequent_absent_objects():
    """Frequencies person 3, car 2, tree 2, dog 1, bench 1; ties by name.
    a absent {bench 1, car 2, tree 2}   -> [car, tree]
    b absent {bench 1, dog 1, tree 2}   -> [tree, bench]   (bench < dog)
    c absent {bench 1, dog 1}           -> [bench, dog]
    d absent {car 2, dog 1, person 3}   -> [person, car]
    """
    negatives = _by_image(build_pope(POPE_TRUTHS, OBJECTS, "popular", per_image=2, seed=0), "no")
    assert negatives == {"a": ["car", "tree"], "b": ["tree", "bench"], "c": ["bench", "dog"],
                         "d": ["person", "car"]}


def test_adversarial_negatives_follow_cooccurrence_with_present_objects():
    """Score of an absent object = sum of its co-occurrence counts with the image's objects:
    a {person, dog}:          car 2+0, tree 1+0, bench 0      -> [car, tree]
    b {person, car}:          tree 1+1, dog 1+0, bench 0      -> [tree, dog]    (popular gave bench)
    c {person, car, tree}:    bench 0+0+1, dog 1+0+0          -> [bench, dog]   (tie by name)
    d {tree, bench}:          car 1+0, person 1+0, dog 0      -> [car, person]  (popular: person first)
    """
    negatives = _by_image(build_pope(POPE_TRUTHS, OBJECTS, "adversarial", per_image=2, seed=0), "no")
    assert negatives == {"a": ["car", "tree"], "b": ["tree", "dog"], "c": ["bench", "dog"],
                         "d": ["car", "person"]}


def test_adversarial_uses_given_cooccurrence_counts():
    """Image a {person, dog}, absent {bench, car, tree}: with bench scored 5 by the caller, bench comes first."""
    counts = {"person": {"bench": 5}}
    questions = build_pope({"a": POPE_TRUTHS["a"]}, OBJECTS, "adversarial", 1, seed=0, cooccurrence=counts)
    assert [q.object for q in questions if q.label == "no"] == ["bench"]


def test_negatives_match_positives_and_are_capped_by_absent_objects():
    """per_image=3: d has 2 objects -> 2 positives, 2 negatives (kept balanced);
    e has 4 of 5 objects -> 3 positives, but only 1 absent object (bench) -> 1 negative."""
    truths = {"d": POPE_TRUTHS["d"], "e": {"car", "dog", "person", "tree"}}
    questions = build_pope(truths, OBJECTS, "popular", per_image=3, seed=0)
    counts = {(q.image_id, q.label): 0 for q in questions}
    for q in questions:
        counts[q.image_id, q.label] += 1
    assert counts == {("d", "yes"): 2, ("d", "no"): 2, ("e", "yes"): 3, ("e", "no"): 1}
    assert [q.object for q in questions if q.image_id == "e" and q.label == "no"] == ["bench"]


def test_same_seed_same_questions_different_seed_different_sample():
    def build(seed):
        return [(q.image_id, q.object, q.label) for q in build_pope(POPE_TRUTHS, OBJECTS, "random", 2, seed)]
    assert build(7) == build(7)
    assert len({tuple(build(seed)) for seed in range(10)}) > 1


def test_questions_do_not_depend_on_string_hashing():
    """Sets of strings iterate in a per-process order; two processes with different hash seeds agree."""
    code = ("from csr_plugin.eval import build_pope\n"
            f"qs = build_pope({POPE_TRUTHS!r}, {OBJECTS!r}, 'random', 2, seed=1)\n"
            "print([(q.image_id, q.object, q.label) for q in qs])")
    root = Path(__file__).resolve().parents[1]
    outputs = {subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": str(hash_seed)}).stdout
               for hash_seed in (1, 2, 3)}
    assert len(outputs) == 1


def test_unknown_setting_and_bad_per_image():
    with pytest.raises(ValueError, match="'rare'.*random, popular, adversarial"):
        build_pope(POPE_TRUTHS, OBJECTS, "rare", 2, seed=0)
    with pytest.raises(ValueError, match="per_image must be at least 1"):
        build_pope(POPE_TRUTHS, OBJECTS, "random", 0, seed=0)


# ----------------------------------------------------------------------------- POPE answers and metrics

@pytest.mark.parametrize("answer, expected", [
    ("Yes.", "yes"),
    ("no, there is not.", "no"),
    ("  **YES**, a dog is there", "yes"),
    ("Yes, but no cat.", "yes"),                    # the first word decides
    ("There is no dog in the image.", "no"),         # only "no" appears
    ("I think yes", "yes"),
    ("Maybe yes, maybe no.", None),                  # both, and the first word is neither
    ("I cannot tell.", None),
    ("Yesterday a note", None),                      # whole words only
    ("Nope", None),
    ("", None),
])
def test_parse_yes_no(answer, expected):
    assert parse_yes_no(answer) == expected


def test_pope_metrics_on_a_hand_worked_list():
    """labels: 5 yes, 5 no.
    yes labels -> yes yes yes no None : TP 3, FN 2
    no labels  -> yes no no no None   : FP 1, TN 3, one unparsed (wrong)
    accuracy  = (3+3)/10 = 0.6
    precision = 3/(3+1) = 0.75;  recall = 3/(3+2) = 0.6
    F1 = 2*0.75*0.6/(0.75+0.6) = 0.9/1.35 = 2/3
    yes_ratio = 4 "yes" / 10 = 0.4;  unparsed = 2
    """
    labels = ["yes"] * 5 + ["no"] * 5
    predictions = ["yes", "yes", "yes", "no", None, "yes", "no", "no", "no", None]
    assert pope_metrics(predictions, labels) == {
        "accuracy": pytest.approx(0.6), "precision": pytest.approx(0.75), "recall": pytest.approx(0.6),
        "f1": pytest.approx(2 / 3), "yes_ratio": pytest.approx(0.4), "n": 10, "unparsed": 2}


def test_pope_metrics_zero_denominators():
    """No "yes" predicted and no "yes" labels: precision, recall, F1 are 0.0; accuracy 2/2 = 1.0.
    All unparsed on "yes" labels: accuracy 0/2, recall 0/2, no "yes" predicted -> precision 0.0."""
    assert pope_metrics(["no", "no"], ["no", "no"]) == {
        "accuracy": 1.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0, "n": 2, "unparsed": 0}
    assert pope_metrics([None, None], ["yes", "yes"]) == {
        "accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0, "n": 2, "unparsed": 2}


def test_pope_metrics_input_errors():
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        pope_metrics(["yes", "no"], ["yes"])
    with pytest.raises(ValueError, match="labels is empty"):
        pope_metrics([], [])
    with pytest.raises(ValueError, match=r"labels\[1\] is 'maybe'"):
        pope_metrics(["yes", "no"], ["yes", "maybe"])
    with pytest.raises(ValueError, match=r"predictions\[0\] is 'Yes\.'.*parse_yes_no"):
        pope_metrics(["Yes."], ["yes"])


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "gemma3", "idefics3", "smolvlm"])
def test_batched_generation_equals_one_at_a_time_for_every_family(family, tmp_path):
    """Batch 2 (unequal prompts and image shapes, left padding) answers what batch 1 answers.

    Gemma3 and Idefics3/SmolVLM refuse a flat image list for several texts; a wrong
    split would also give another answer than the prompt alone.
    """
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from csr_plugin.sampling.greedy import generate
    from csr_plugin.toy.tiny_families import build_tiny_family

    path = build_tiny_family(family, tmp_path / family)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    items = [(Image.new("RGB", (48, 48), (200, 30, 30)), "Describe."),
             (Image.new("RGB", (96, 48), (30, 30, 200)), "What shapes and colours do you see here?"),
             (Image.new("RGB", (48, 96), (30, 200, 30)), "Describe the image in detail.")]
    one_by_one = generate(model, processor, items, 6, 1, "single")
    batched = generate(model, processor, items, 6, 2, "batched")
    assert batched == one_by_one
    assert any(answer for answer in batched), "random weights still write some text"
