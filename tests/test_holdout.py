"""loop.holdout: each iterate's held-out answers scored by the calibrated reward against the starting model's,
an iteration that lowers it reported, the loop stopped there (loop.on_decline: stop) and the best iterate named."""
from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest

from csr_plugin import pipeline
from csr_plugin.config import ConfigError, recipe_from_dict
from csr_plugin.holdout import check_disjoint, declined, holdout_reward, learnt_judge_note, selected_iterate

QUESTION_TEXT = "Is there a square in the image?"


def _row(id_, question, answer, rewards):
    return {"id": id_, "image": "x.png", "question": question, "answer": answer,
            "sentences": [{"text": f"s{k}", "r_i": 10.0 * r, "r_t": -1.0, "reward": r} for k, r in enumerate(rewards)]}


def _recipe(tiny_recipe_dict, **curation):
    recipe = copy.deepcopy(tiny_recipe_dict)
    recipe["curation"] = curation
    return recipe_from_dict(recipe)


BASE = [_row("d", "Describe the image.", "A. B.", [2.0, 4.0]),      # baseline 3
        _row("q", QUESTION_TEXT, "Yes.", [1.0])]                      # baseline 1


def test_the_starting_model_scores_zero_against_itself_and_an_iterate_is_scored_as_curation_would(tiny_recipe_dict):
    recipe = _recipe(tiny_recipe_dict, reward_baseline="prompt_mean", length_normalize=False)
    assert holdout_reward(recipe, BASE, BASE)["holdout_reward"] == 0.0
    # "d": one more sentence above the base's mean (5 - 3) and one below it (2 - 3): sum 0 + 2 - 1... per prompt:
    # d = (2-3) + (4-3) + (5-3) = 2, q = (3-1) = 2 -> mean 2; the fragment share of the yes/no replies: 0 of 1
    later = [_row("d", "Describe the image.", "A. B. C.", [2.0, 4.0, 5.0]), _row("q", QUESTION_TEXT, "No.", [3.0])]
    got = holdout_reward(recipe, later, BASE)
    assert got["holdout_reward"] == pytest.approx(2.0) and got["holdout_fragments"] == 0.0
    assert got["holdout_sentences"] == 2.0 and got["holdout_empty"] == 0.0
    # a non-answer and an empty description: the fragment counted, the empty answer scores 0
    worse = [_row("d", "Describe the image.", "", []), _row("q", QUESTION_TEXT, "right.", [-1.0])]
    got = holdout_reward(recipe, worse, BASE)
    assert got["holdout_reward"] == pytest.approx((0.0 + (-1.0 - 1.0)) / 2)
    assert got["holdout_fragments"] == 1.0 and got["holdout_empty"] == 0.5


def test_without_the_baseline_and_with_length_normalize_the_mean_of_raw_rewards(tiny_recipe_dict):
    recipe = _recipe(tiny_recipe_dict, reward_baseline="none", length_normalize=True)
    assert holdout_reward(recipe, BASE, BASE)["holdout_reward"] == pytest.approx((3.0 + 1.0) / 2)


def test_without_per_prompt_scores_any_drop_counts_and_the_newest_iterate_is_kept_unless_below_the_best():
    history = [{"iteration": 0, "holdout_reward": 0.0}, {"iteration": 1, "holdout_reward": 1.5},
               {"iteration": 2, "holdout_reward": 2.5}, {"iteration": 3, "holdout_reward": 2.5}]
    assert selected_iterate(history) == 3                   # a tie with the best: the loop's own choice stands
    assert not declined(history[:3]) and not declined(history) and not declined(history[:1])
    dipped = history[:3] + [{"iteration": 3, "holdout_reward": 2.4}]
    assert declined(dipped) and selected_iterate(dipped) == 2


def _scored(t, scores):
    return {"iteration": t, "holdout_reward": sum(scores) / len(scores),
            "holdout_scores": {f"p{i}": s for i, s in enumerate(scores)}}


def test_a_drop_within_the_paired_noise_is_not_a_decline():
    """Per-prompt differences iterate 2 - iterate 1: [-1, +1, -1, +1, -0.5] -> mean -0.1, sd 1.025, standard error
    0.458: a drop of 0.22 standard errors. Shifted to [-2, 0, -2, 0, -1.5]: mean -1.1, the same standard error, a
    drop of 2.40 of them."""
    one = _scored(1, [3.0, 1.0, 2.0, 0.0, 1.5])
    noisy = _scored(2, [2.0, 2.0, 1.0, 1.0, 1.0])
    worse = _scored(2, [1.0, 1.0, 0.0, 0.0, 0.0])
    assert noisy["holdout_reward"] < one["holdout_reward"]
    assert not declined([one, noisy]) and selected_iterate([one, noisy]) == 2
    assert declined([one, worse]) and selected_iterate([one, worse]) == 1
    assert not declined([one, worse], z=3.0)                # 2.40 standard errors is not 3
    assert declined([one, noisy], z=0.0)                    # holdout_z 0: any drop


def test_held_out_prompts_that_dpo_trains_on_are_refused(tiny_recipe_dict, tmp_path):
    from csr_plugin.sampling.prompts import load_prompts

    first = load_prompts(tiny_recipe_dict["data"]["prompts"])[0][0]   # its image as an absolute path
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"id": "other-id", "image": first.image, "question": first.question}) + "\n")
    recipe = copy.deepcopy(tiny_recipe_dict)
    recipe["loop"] = {"holdout": str(held)}
    with pytest.raises(ConfigError, match="loop.holdout.*in data.prompts too"):   # a new id, same image and question
        check_disjoint(recipe_from_dict(recipe))
    held.write_text(json.dumps({"id": "other-id", "image": first.image, "question": "Something else?"}) + "\n")
    check_disjoint(recipe_from_dict(recipe))
    held.write_text("")
    with pytest.raises(ConfigError, match="has no usable prompt"):
        check_disjoint(recipe_from_dict(recipe))


def test_a_held_out_reward_scored_by_the_learnt_reward_is_flagged(tiny_recipe_dict):
    """Only the pair loop.holdout + reward.source: mrm is flagged: CLIP judges what DPO learns from CLIP too,
    but CLIP is not trained on CSR's pairs; without loop.holdout there is nothing to flag."""
    recipe = copy.deepcopy(tiny_recipe_dict)
    recipe["loop"] = {"holdout": "held.jsonl"}
    assert learnt_judge_note(recipe_from_dict(recipe)) is None
    recipe["reward"] = {"source": "mrm", "mrm": "rm/final"}
    assert "loop.holdout is scored with reward.mrm" in learnt_judge_note(recipe_from_dict(recipe))
    recipe["loop"] = {"holdout": ""}
    assert learnt_judge_note(recipe_from_dict(recipe)) is None


def _scripted_loop(monkeypatch, tmp_path, tiny_recipe_dict, rewards, on_decline):
    """pipeline.run with every stage scripted: iterate t's held-out reward is rewards[t]."""
    recipe = copy.deepcopy(tiny_recipe_dict)
    recipe.update(output_dir=str(tmp_path / "run"), loop={"iterations": len(rewards) - 1, "holdout": "held.jsonl",
                                                         "on_decline": on_decline})
    recipe["eval"] = {}
    path = tmp_path / "recipe.yaml"
    import yaml

    path.write_text(yaml.safe_dump(recipe))
    trained = []
    monkeypatch.setattr(pipeline, "_sample_stage", lambda recipe, t, folder: None)
    monkeypatch.setattr(pipeline, "curate_file", lambda *a, **k: SimpleNamespace(pairs=100))
    monkeypatch.setattr("csr_plugin.training.dpo_main.is_complete", lambda d: False)
    monkeypatch.setattr("csr_plugin.training.launch.preflight", lambda recipe, loop: None)
    monkeypatch.setattr("csr_plugin.training.launch.run_dpo", lambda *a, **k: trained.append(a[3]) or 0)
    monkeypatch.setattr("csr_plugin.holdout.check_disjoint", lambda recipe: None)
    monkeypatch.setattr(pipeline, "_iteration_metrics", lambda t, *a: {"iteration": t, "pairs": 100})
    monkeypatch.setattr(pipeline, "plot_metrics", lambda *a, **k: None)
    scored = []

    def score_iterate(recipe, model, out, base):
        scored.append(model)
        return {"holdout_reward": rewards[len(scored) - 1]}   # no per-prompt scores: any drop counts

    monkeypatch.setattr("csr_plugin.holdout.score_iterate", score_iterate)
    rows = pipeline.run(str(path))
    return rows, json.loads((tmp_path / "run" / "results.json").read_text()), trained, scored


def test_the_loop_stops_after_the_iteration_that_lowered_the_held_out_reward(monkeypatch, tmp_path,
                                                                            tiny_recipe_dict, capsys):
    rows, results, trained, scored = _scripted_loop(monkeypatch, tmp_path, tiny_recipe_dict,
                                                    [0.0, 1.0, 2.0, 1.2, 3.0], "stop")
    assert [r["iteration"] for r in rows] == [1, 2, 3]            # iteration 4 never ran
    assert [r["holdout_reward"] for r in rows] == [1.0, 2.0, 1.2]
    assert results["selected"] == 2 and [h["iteration"] for h in results["holdout"]] == [0, 1, 2, 3]
    assert len(trained) == 3 and len(scored) == 4
    out = capsys.readouterr().out
    assert "iteration 3 LOWERED the held-out reward: 2.000 -> 1.200" in out and "use iterate 2" in out
    assert "holdout_scores" not in json.dumps(results)


def test_with_report_the_loop_goes_on_and_still_names_the_best_iterate(monkeypatch, tmp_path, tiny_recipe_dict,
                                                                      capsys):
    rows, results, trained, _ = _scripted_loop(monkeypatch, tmp_path, tiny_recipe_dict,
                                               [0.0, 1.0, 2.0, 1.2, 1.9], "report")
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4] and len(trained) == 4
    assert results["selected"] == 2
    out = capsys.readouterr().out
    assert "iteration 3 LOWERED" in out and "iteration 4 LOWERED" not in out   # 1.9 is above 1.2


def test_prepare_holdout_splits_by_image_and_the_recipe_takes_the_two_files(tmp_path, capsys):
    from csr_plugin.cli import main
    from csr_plugin.sampling.prompts import load_prompts

    (tmp_path / "p.jsonl").write_text("".join(
        json.dumps({"id": f"{i}-{q}", "image": f"img{i}.png", "question": question}) + "\n"
        for i in range(10) for q, question in enumerate(("Describe.", "Is there a cat in the image?"))))
    assert main(["prepare", "holdout", "--prompts", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "split"),
                 "--count", "3"]) == 0
    train, held = (load_prompts(tmp_path / "split" / name)[0] for name in ("train.jsonl", "holdout.jsonl"))
    assert (len(train), len(held)) == (14, 6)                       # 7 and 3 images, two questions each
    assert not {p.image for p in train} & {p.image for p in held}   # an image's questions stay on one side
    assert all(p.image.startswith(str(tmp_path)) for p in held)     # absolute: usable from any folder
    assert "loop.holdout: " + str(tmp_path / "split" / "holdout.jsonl") in capsys.readouterr().out
    again = tmp_path / "again"
    main(["prepare", "holdout", "--prompts", str(tmp_path / "p.jsonl"), "--out", str(again), "--count", "3"])
    assert (again / "holdout.jsonl").read_text() == (tmp_path / "split" / "holdout.jsonl").read_text()   # seeded
    capsys.readouterr()
    assert main(["prepare", "holdout", "--prompts", str(tmp_path / "p.jsonl"), "--out", str(again), "--count", "10"])
    assert "--count 10: " in (err := capsys.readouterr().err) and "has 10 distinct images; hold out at least 1" in err


def test_stored_answers_are_reused_only_for_the_same_held_out_prompts(tiny_recipe_dict, tmp_path, monkeypatch):
    from csr_plugin import holdout

    prompts = tmp_path / "held.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "image": "x.png", "question": "Describe."}) + "\n"
                               for i in ("a", "b")))
    recipe = copy.deepcopy(tiny_recipe_dict)
    recipe["loop"] = {"holdout": str(prompts)}
    recipe = recipe_from_dict(recipe)
    answered = []
    monkeypatch.setattr(holdout, "answer_holdout", lambda recipe, model, path: answered.append(model) or [
        {"id": p, "image": "x.png", "question": "Describe.", "answer": "A."} for p in ("a", "b")])
    monkeypatch.setattr(holdout, "score_answers", lambda recipe, rows: [
        {**r, "sentences": [{"text": "A.", "r_i": 1.0, "r_t": 0.0, "reward": 1.0}]} for r in rows])
    path = tmp_path / "holdout.jsonl"
    holdout.score_iterate(recipe, "m", path, path)
    holdout.score_iterate(recipe, "m", path, path)
    assert answered == ["m"]                                  # the second call read the file
    prompts.write_text(json.dumps({"id": "c", "image": "x.png", "question": "Describe."}) + "\n")
    holdout.score_iterate(recipe, "m", path, path)
    assert answered == ["m", "m"]                             # another held-out set: answered anew
