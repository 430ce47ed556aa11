"""COCO evaluation as the paper's benchmarks run it: CHAIR by the reference script's rules,
`csr prepare coco` on a tiny COCO-format fixture, POPE's own files, and `csr eval --responses`."""
import json
from pathlib import Path

import pytest

from csr_plugin.cli import main
from csr_plugin.eval import ObjectVocabulary, chair, object_recall, per_response
from csr_plugin.eval.coco import CocoError, prepare_coco
from csr_plugin.eval.pope import build_pope_files, pope_answer

COCO = ObjectVocabulary.coco()


# ----------------------------------------------------------------------------- CHAIR's rules, one per case

@pytest.mark.parametrize("caption, words", [
    # synonyms map to the category; plurals are singularized ("men" -> man -> person)
    ("Two men walk three puppies.", [("man", "person"), ("puppy", "dog")]),
    ("Buses, skis and scissors.", [("bus", "bus"), ("skis", "skis"), ("scissors", "scissors")]),
    # two-word objects read as one word: a hot dog is no dog, a teddy bear no bear
    ("A hot dog and a teddy bear beside a cell phone.",
     [("hot dog", "hot dog"), ("teddy bear", "teddy bear"), ("cell phone", "cell phone")]),
    ("Hot dogs and wine glasses.", [("hot dog", "hot dog"), ("wine glass", "wine glass")]),
    # "bow tie" is a tie, not a bow
    ("A man in a bow tie.", [("man", "person"), ("tie", "tie")]),
    # qualifiers dropped: a baby elephant is an elephant and no person, a passenger train no passenger
    ("A baby elephant and an adult giraffe.", [("elephant", "elephant"), ("giraffe", "giraffe")]),
    ("A passenger train, then a baby.", [("train", "train"), ("baby", "person")]),
    # "toilet seat" is the toilet; "seat" anywhere beside "toilet" is no chair; alone it is one
    ("The toilet seat is up.", [("toilet", "toilet")]),
    ("A seat next to the toilet.", [("toilet", "toilet")]),
    ("A seat by the window.", [("seat", "chair")]),
    # a listed pair that is no object hides both words
    ("Train tracks by home plate.", []),
    # "dog's" is the dog; a hyphenated word stays one word, as the script's tokenizer keeps it
    ("The dog's bowl and a hot-dog stand.", [("dog", "dog"), ("bowl", "bowl")]),
])
def test_chair_reads_words_by_the_reference_rules(caption, words):
    assert COCO.mention_words(caption) == words


def test_chair_counts_every_mention_and_per_caption_words():
    """Truth {dog, person}. Caption 1: dog, dog, cat -> 3 mentions, 1 hallucinated (cat).
    Caption 2: man, hot dog -> 2 mentions, 1 hallucinated (hot dog).
    Caption 3: "a bench" -> 1 mention, 1 hallucinated. Caption 4 names nothing.
    CHAIR_s = 3 of 4 captions; CHAIR_i = 3 / 6 mentions; recall = {dog} + {person} + {} + {} of 2 * 4 = 2/8."""
    captions = ["A dog, a dog and a cat.", "A man eats a hot dog.", "A bench.", "Nothing here."]
    truths = [{"dog", "person"}] * 4
    assert chair(captions, truths, COCO) == {"chair_s": 0.75, "chair_i": 0.5, "responses": 4, "mentions": 6,
                                             "hallucinated_mentions": 3, "hallucinated_responses": 3}
    assert object_recall(captions, truths, COCO) == 2 / 8
    assert per_response(captions[1], truths[1], COCO)["hallucinated_words"] == [["hot dog", "hot dog"]]


def test_coco_objects_are_the_80_categories_with_chair_rules():
    assert len(COCO.objects) == 80 and COCO.rules is not None
    assert {"dining table", "potted plant", "tv", "hair drier", "sports ball"} <= set(COCO.objects)


def test_a_vocabulary_without_rules_keeps_phrase_matching():
    toy = ObjectVocabulary({"circle": ["circles"], "traffic light": []})
    assert toy.rules is None and toy.mentions("two circles and a traffic light") == ["circle", "traffic light"]


def test_rules_errors_name_the_file(tmp_path):
    path = tmp_path / "v.json"
    path.write_text(json.dumps({"objects": {"dog": []}, "rules": {"compounds": {"three word form": "x"}}}))
    with pytest.raises(ValueError, match=r"v\.json: rules\.compounds must map two-word strings"):
        ObjectVocabulary.from_json(path)
    path.write_text(json.dumps({"objects": {"dog": []}, "rules": {"singular": True}}))
    with pytest.raises(ValueError, match=r"unknown key\(s\) in \"rules\": singular"):
        ObjectVocabulary.from_json(path)


# ----------------------------------------------------------------------------- a tiny COCO

CATEGORIES = {1: "person", 2: "bicycle", 3: "car", 7: "train", 18: "dog", 22: "elephant", 32: "tie",
              44: "bottle", 47: "cup", 62: "chair", 67: "dining table", 70: "toilet"}
ID = {name: cid for cid, name in CATEGORIES.items()}
INSTANCES = {   # image -> categories in annotation order (repeats are further instances)
    101: ["person", "dog", "chair", "person"],
    102: ["toilet", "bottle", "cup"],
    103: ["elephant", "person", "train"],
    104: ["car", "person", "dog"],
    105: ["dining table", "cup", "bottle", "chair"],
    106: ["bicycle"],
    107: [],
    108: ["tie", "person", "car"],
}
CAPTIONS = {
    101: ["A man with his dog on a couch.", "A person and a puppy."],
    102: ["A toilet seat next to a bottle."],
    103: ["A baby elephant near a passenger train."],
    104: ["A car parked by a man walking his dog."],
    105: ["Cups and bottles on a dining table."],
    106: ["A bike leaning on a wall."],
    107: ["A cat sleeping on a bed."],
    108: ["A man in a bow tie next to a car."],
}


def file_name(image_id):
    return f"COCO_val2014_{image_id:012d}.jpg"


@pytest.fixture
def coco(tmp_path):
    from PIL import Image

    ann, images = tmp_path / "annotations", tmp_path / "val2014"
    ann.mkdir()
    images.mkdir()
    image_list = [{"id": i, "file_name": file_name(i)} for i in INSTANCES]
    for i in INSTANCES:
        Image.new("RGB", (8, 8), (i, 0, 0)).save(images / file_name(i))
    annotations = [{"id": n, "image_id": i, "category_id": ID[name]}
                   for n, (i, name) in enumerate((i, name) for i, names in INSTANCES.items() for name in names)]
    (ann / "instances_val2014.json").write_text(json.dumps({
        "images": image_list, "annotations": annotations,
        "categories": [{"id": cid, "name": name} for cid, name in CATEGORIES.items()]}))
    (ann / "captions_val2014.json").write_text(json.dumps({
        "images": image_list,
        "annotations": [{"id": n, "image_id": i, "caption": c}
                        for n, (i, c) in enumerate((i, c) for i, cs in CAPTIONS.items() for c in cs)]}))
    return ann, images


def read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_prepare_coco_writes_prompts_truth_objects_and_pope(coco, tmp_path):
    ann, images = coco
    out = tmp_path / "eval"
    summary = prepare_coco(ann, images, out, count=8, seed=0)
    assert summary["chair_images"] == 8 and summary["pope_images"] == 6   # 106 and 107 have < 3 objects
    prompts = read(out / "prompts.jsonl")
    assert [p["id"] for p in prompts] == [str(i) for i in sorted(INSTANCES)]
    assert prompts[0]["image"] == str((images / file_name(101)).resolve())
    assert prompts[0]["question"] == "Please describe this image in detail."
    truth = {r["id"]: r for r in read(out / "truth.jsonl")}
    # instances united with caption mentions: 101's couch comes from a caption only
    assert truth["101"]["objects"] == ["chair", "couch", "dog", "person"]
    assert truth["101"]["instances"] == ["person", "dog", "chair"]
    assert truth["107"]["objects"] == ["bed", "cat"]            # no instances: captions only
    assert truth["103"]["objects"] == ["elephant", "person", "train"]   # baby elephant, passenger train: no extras
    assert truth["102"]["objects"] == ["bottle", "cup", "toilet"]       # toilet seat: no chair
    assert ObjectVocabulary.from_json(out / "objects.json") == COCO
    for setting in ("random", "popular", "adversarial"):
        questions = read(out / f"pope_{setting}.jsonl")
        assert len(questions) == 6 * 6 and [q["question_id"] for q in questions] == list(range(1, 37))
        assert [q["label"] for q in questions[:6]] == ["yes", "no"] * 3


def test_count_takes_a_seeded_subset(coco, tmp_path):
    ann, images = coco
    a = prepare_coco(ann, images, tmp_path / "a", count=5, seed=1)
    b = prepare_coco(ann, images, tmp_path / "b", count=5, seed=1)
    assert a["chair_images"] == 5 and read(tmp_path / "a" / "prompts.jsonl") == read(tmp_path / "b" / "prompts.jsonl")
    assert read(tmp_path / "a" / "pope_random.jsonl") == read(tmp_path / "b" / "pope_random.jsonl")
    ids = {tuple(p["id"] for p in read(tmp_path / "a" / "prompts.jsonl"))}
    for seed in range(2, 8):
        prepare_coco(ann, images, tmp_path / f"s{seed}", count=5, seed=seed)
        ids.add(tuple(p["id"] for p in read(tmp_path / f"s{seed}" / "prompts.jsonl")))
    assert len(ids) > 1


def test_pope_files_are_built_as_pope_builds_them():
    """Three images, objects in annotation order. Frequency: person 3, dog 2, cup 1, car 1, chair 1, tie 1.
    Co-occurrence with person: dog 2, cup 1, car 1, chair 1, tie 1."""
    images = [("a.jpg", ["person", "dog", "cup"]), ("b.jpg", ["person", "dog", "car"]),
              ("c.jpg", ["chair", "tie", "person"])]
    files = build_pope_files(images, per_image=3, seed=0)
    for setting, questions in files.items():
        for image, objects in images:
            asked = [q for q in questions if q["image"] == image]
            assert [q["label"] for q in asked] == ["yes", "no"] * 3
            assert [q["text"] for q in asked[::2]] == [f"Is there a {o} in the image?" for o in objects]
            negatives = [q["text"][len("Is there a "):-len(" in the image?")] for q in asked[1::2]]
            assert len(set(negatives)) == 3 and not set(negatives) & set(objects), setting
    popular = [q["text"] for q in files["popular"] if q["image"] == "c.jpg" and q["label"] == "no"]
    assert popular == [f"Is there a {o} in the image?" for o in ("dog", "cup", "car")]   # most frequent first
    adversarial = [q["text"] for q in files["adversarial"] if q["image"] == "a.jpg" and q["label"] == "no"]
    # after person: its most frequent companion not in the image (dog 2 and cup 1 are in it; car 1 is first
    # of the rest); after dog: person and cup are present, car is asked -> a random free one (chair or tie)
    assert adversarial[0] == "Is there a car in the image?"
    assert set(adversarial[1:]) == {"Is there a chair in the image?", "Is there a tie in the image?"}
    assert build_pope_files([("e.jpg", ["elephant", "person", "dog"]), ("f.jpg", ["apple", "car", "cup"])],
                            3, 0)["random"][0]["text"] == "Is there an elephant in the image?"


def test_pope_reads_answers_as_pope_does():
    assert [pope_answer(a) for a in ["Yes, there is.", "No, there is not.", "There is not a dog.", "no", "",
                                     "The answer is yes. No doubt.", "Not sure"]] == \
        ["yes", "no", "no", "no", "yes", "yes", "yes"]


@pytest.mark.parametrize("problem, expected", [
    ("no annotations", r"instances_val2014\.json not found\. Give --annotations the annotations/ folder"),
    ("other split", r"instances_val2017\.json not found\. That folder has instances_val2014\.json"),
    ("bad split", r"--split 'validation' is not a COCO split name"),
    ("missing image", r"1 of the chosen images are not in --images .*COCO_val2014_000000000104\.jpg"),
])
def test_prepare_coco_errors_name_the_path_and_the_fix(coco, tmp_path, problem, expected, capsys):
    ann, images = coco
    split = {"other split": "val2017", "bad split": "validation"}.get(problem, "val2014")
    if problem == "no annotations":
        ann = tmp_path / "nowhere"
    if problem == "missing image":
        (images / file_name(104)).unlink()
    with pytest.raises(CocoError, match=expected):
        prepare_coco(ann, images, tmp_path / "out", split=split, count=8)
    code = main(["prepare", "coco", "--annotations", str(ann), "--images", str(images), "--out",
                 str(tmp_path / "out"), "--split", split, "--count", "8"])
    assert code == 2 and "csr prepare: error:" in capsys.readouterr().err


# ----------------------------------------------------------------------------- csr eval --responses

@pytest.fixture
def prepared(coco, tmp_path):
    ann, images = coco
    out = tmp_path / "eval"
    prepare_coco(ann, images, out, count=8)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("\n".join([
        "model: {path: /nonexistent/llava}",   # never loaded: --responses scores text
        f"output_dir: {tmp_path / 'runs'}",
        "eval:",
        f"  prompts: {out / 'prompts.jsonl'}",
        f"  truth: {out / 'truth.jsonl'}",
        f"  vocabulary: {out / 'objects.json'}",
        "  pope_questions:",
        *(f"    {s}: {out / f'pope_{s}.jsonl'}" for s in ("random", "popular", "adversarial")),
    ]) + "\n")
    return out, recipe


def test_responses_score_captions_with_no_model(prepared, tmp_path, capsys):
    """OPERA-style captions. 101 (truth chair, couch, dog, person): man, dog, cat -> 1 of 3 hallucinated.
    102 (bottle, cup, toilet): toilet, seat (dropped beside toilet), bottle -> 0 of 2.
    107 (bed, cat), given as {id, response}: cat, bed, dog -> 1 of 3.
    CHAIR_s = 2/3, CHAIR_i = 2/8; recall: 2 + 2 + 2 distinct truth objects covered of 4 + 3 + 2."""
    _, recipe = prepared
    answers = tmp_path / "captions.jsonl"
    answers.write_text("\n".join(json.dumps(r) for r in [
        {"image_id": 101, "caption": "A man and his dog; a cat."},
        {"image_id": 102, "caption": "A toilet with its seat up, and a bottle."},
        {"id": "107", "response": "A cat on a bed. A dog too."},
    ]) + "\n")
    out = tmp_path / "result.json"
    assert main(["eval", "--config", str(recipe), "--responses", str(answers), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["chair_s"] == pytest.approx(2 / 3) and result["chair_i"] == pytest.approx(2 / 8)
    # covered: 101 person, dog; 102 toilet, bottle; 107 cat, bed = 6 of 4 + 3 + 2
    assert result["object_recall"] == pytest.approx(6 / 9)
    assert [c["hallucinated_words"] for c in result["captions"]] == [[["cat", "cat"]], [], [["dog", "dog"]]]
    assert "CHAIR_s 0.667  CHAIR_i 0.250" in capsys.readouterr().out


def test_responses_score_official_pope_files(prepared, tmp_path, capsys):
    """Answers to random-setting questions 1-6, labelled yes, no, yes, no, yes, no:
    "Yes" TP / "No, there is not." TN / "No." FN / "Yes" FP / "Yes, there is one" TP / "" FP (POPE reads an
    empty answer as yes). TP 2, FP 2, TN 1, FN 1: accuracy 3/6, precision 2/4, recall 2/3, yes ratio 4/6."""
    out, recipe = prepared
    answers = tmp_path / "pope.jsonl"
    texts = ["Yes", "No, there is not.", "No.", "Yes", "Yes, there is one", ""]
    answers.write_text("\n".join(json.dumps({"question_id": i + 1, "answer": t}) for i, t in enumerate(texts)) + "\n")
    result_path = tmp_path / "pope_result.json"
    assert main(["eval", "--config", str(recipe), "--responses", f"random={answers}", "--out", str(result_path)]) == 0
    result = json.loads(result_path.read_text())
    m = result["pope_random"]
    assert (m["accuracy"], m["precision"], m["recall"], m["yes_ratio"], m["n"]) == pytest.approx(
        (3 / 6, 2 / 4, 2 / 3, 4 / 6, 6))
    assert m["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert m["unanswered"] == 30 and m["answer_rule"] == "pope"
    assert "pope_popular" not in result and result["pope_f1"] == pytest.approx(m["f1"])
    assert "random" in capsys.readouterr().out


def test_official_pope_files_with_names_resolve_in_pope_images(prepared, tmp_path):
    from csr_plugin.config import EvalConfig, PopeFilesConfig
    from csr_plugin.eval.evaluate import load_pope_file

    out, _ = prepared
    official = tmp_path / "coco_pope_random.json"   # POPE's own: one JSON object per line, image by name
    official.write_text(json.dumps({"question_id": 1, "image": file_name(101),
                                    "text": "Is there a dog in the imange?", "label": "yes"}) + "\n")
    questions = load_pope_file(str(official), str(tmp_path / "val2014"))
    assert questions[0]["image"] == str(tmp_path / "val2014" / file_name(101))
    assert Path(questions[0]["image"]).is_file()
    with pytest.raises(Exception, match="give all three"):
        from csr_plugin.config import recipe_from_dict
        recipe_from_dict({"eval": {"pope_questions": {"random": str(official)}}})
    assert EvalConfig(pope_questions=PopeFilesConfig(str(official), str(official), str(official))).pope_questions.files()


def test_bad_response_lines_are_skipped_and_listed(prepared, tmp_path, capsys):
    _, recipe = prepared
    answers = tmp_path / "mixed.jsonl"
    answers.write_text("\n".join([
        json.dumps({"image_id": 101, "caption": "A dog."}),
        "{not json",
        json.dumps({"image_id": 999, "caption": "A dog."}),     # not in the truth
        json.dumps({"foo": 1}),
    ]) + "\n")
    out = tmp_path / "r.json"
    assert main(["eval", "--config", str(recipe), "--responses", str(answers), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["responses"] == 1 and result["response_files"] == [str(answers)]
    assert result["chair_i"] == 0.0 and len(result["captions"]) == 1
    reasons = {s["line"]: s["reason"] for s in result["skipped"]}
    assert set(reasons) == {2, 3, 4}
    assert "not valid JSON" in reasons[2] and "image 999 is not in eval.truth" in reasons[3]
    assert "neither a caption" in reasons[4]
    assert "skipped 3 answers" in capsys.readouterr().out


def test_a_file_with_nothing_usable_is_an_error(prepared, tmp_path, capsys):
    _, recipe = prepared
    answers = tmp_path / "bad.jsonl"
    answers.write_text("{nope\n" + json.dumps({"question_id": 1, "answer": "yes"}) + "\n")   # no setting
    assert main(["eval", "--config", str(recipe), "--responses", str(answers)]) == 2
    err = capsys.readouterr().err
    assert f"--responses {answers}: no usable line" in err
    truthless = tmp_path / "truthless.jsonl"
    truthless.write_text(json.dumps({"image_id": 5, "caption": "A dog."}) + "\n")
    assert main(["eval", "--config", str(recipe), "--responses", str(truthless)]) == 2
    assert "none of the 1 captions' images is in eval.truth" in capsys.readouterr().err


def test_malformed_pope_question_file_names_file_and_line(prepared, tmp_path, capsys):
    out, recipe = prepared
    lines = (out / "pope_popular.jsonl").read_text().splitlines()
    lines[4] = json.dumps({"question_id": 5, "image": "x.jpg", "text": "Is there a dog?"})   # no label
    (out / "pope_popular.jsonl").write_text("\n".join(lines) + "\n")
    answers = tmp_path / "a.jsonl"
    answers.write_text(json.dumps({"question_id": 1, "answer": "yes", "setting": "popular"}) + "\n")
    assert main(["eval", "--config", str(recipe), "--responses", str(answers)]) == 2
    assert f"{out / 'pope_popular.jsonl'}: line 5 lacks label" in capsys.readouterr().err


def test_model_answers_file_scores_back_to_the_same_result(tiny_recipe_dict, tmp_path):
    """`csr eval` on the tiny model with POPE-format files writes every answer; scoring that file
    with --responses gives the same CHAIR and POPE figures without the model."""
    from csr_plugin.config import recipe_from_dict
    from csr_plugin.eval.evaluate import evaluate
    from csr_plugin.eval.responses import score_responses
    from csr_plugin.sampling.prompts import load_prompts

    prompts, _ = load_prompts(tiny_recipe_dict["data"]["prompts"])
    prompts = prompts[:3]
    truth = tmp_path / "truth.jsonl"
    truth.write_text("".join(json.dumps({"id": p.id, "objects": ["circle", "square", "triangle"][:i + 1]}) + "\n"
                             for i, p in enumerate(prompts)))
    vocab = tmp_path / "objects.json"
    ObjectVocabulary({"circle": ["circles"], "square": ["squares"], "triangle": [], "star": [], "heart": [],
                      "moon": []}).to_json(vocab)
    eval_prompts = tmp_path / "prompts.jsonl"
    eval_prompts.write_text("".join(json.dumps({"id": p.id, "image": p.image, "question": "Describe the image."})
                                    + "\n" for p in prompts))
    files = build_pope_files([(p.image, ["circle", "square", "triangle"]) for p in prompts] +
                             [(prompts[0].image, ["star", "heart", "moon"])], 3, seed=0)
    pope = {}
    for setting, questions in files.items():
        pope[setting] = str(tmp_path / f"pope_{setting}.jsonl")
        Path(pope[setting]).write_text("".join(json.dumps(q) + "\n" for q in questions))
    recipe = recipe_from_dict({**tiny_recipe_dict, "eval": {
        "prompts": str(eval_prompts), "truth": str(truth), "vocabulary": str(vocab), "max_new_tokens": 12,
        "batch": 4, "pope_questions": pope}})
    answers = tmp_path / "eval.answers.jsonl"
    result = evaluate(recipe.model, recipe.eval, answers_path=answers)
    written = read(answers)
    assert len([r for r in written if "caption" in r]) == 3
    assert {s: len([r for r in written if r.get("setting") == s]) for s in pope} == {s: 24 for s in pope}
    rescored = score_responses(recipe.eval, [(None, str(answers))])
    for key in ("chair_s", "chair_i", "object_recall", "pope_f1"):
        assert rescored[key] == pytest.approx(result[key]), key
    assert rescored["pope_adversarial"] == result["pope_adversarial"]
    assert rescored["skipped"] == []


def test_too_few_pope_images_for_three_absent_objects_is_a_clear_error(coco, tmp_path):
    ann, images = coco
    with pytest.raises(CocoError, match=r"no object left to ask as absent .* Use a larger --count"):
        prepare_coco(ann, images, tmp_path / "out", count=1)


@pytest.mark.parametrize("name", ["paper.yaml", "official.yaml", "qwen25vl-7b-dpo.yaml"])
def test_the_7b_recipes_score_answers_from_prepared_coco_without_their_model(name, coco, tmp_path, monkeypatch):
    """The recipes' eval sections point where `csr prepare coco --out data/coco-val2014` writes; the 7B
    model is not on this machine and is never loaded."""
    ann, images = coco
    monkeypatch.chdir(tmp_path)
    assert main(["prepare", "coco", "--annotations", str(ann), "--images", str(images),
                 "--out", "data/coco-val2014", "--count", "8"]) == 0
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"image_id": 108, "caption": "A man in a bow tie by a car and a dog."}) + "\n" +
                       json.dumps({"question_id": 1, "answer": "Yes.", "category": "adversarial"}) + "\n")
    recipe = Path(__file__).resolve().parents[1] / "recipes" / name
    assert main(["eval", "--config", str(recipe), "--responses", str(answers), "--out", "r.json"]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert (result["mentions"], result["hallucinated_mentions"]) == (4, 1)   # person, tie, car, dog: no dog
    assert result["pope_adversarial"]["n"] == 1


def test_an_original_llava_release_folder_is_refused_with_the_conversion(tmp_path):
    from csr_plugin.config import ConfigError
    from csr_plugin.model_source import check_model_path

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_llama",
                                                      "architectures": ["LlavaLlamaForCausalLM"]}))
    with pytest.raises(ConfigError, match=r"original LLaVA release's format .* llava-hf/llava-1\.5-7b-hf"):
        check_model_path(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    assert check_model_path(str(tmp_path)) == tmp_path
