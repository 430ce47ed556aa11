"""Pair diagnostics on a hand-made tree whose every figure is worked out below."""
import json

import pytest

from csr_plugin.diagnostics import describe, pair_diagnostics


def _node(id_, parent, text, ids, logprobs, r_t, r_i, final=True):
    return {"id": id_, "parent": parent, "text": text, "token_ids": ids, "logprobs": logprobs, "r_t": r_t,
            "r_i": r_i, "reward": 0.9 * r_i + 0.1 * r_t, "final": final, "finish": "eos" if final else "sentence"}


def _pair(id_, chosen, rejected):
    side = lambda n: [{"role": "assistant", "content": [{"type": "text", "text": n["text"].strip()}]}]  # noqa: E731
    return {"id": id_, "images": ["x.png"], "prompt": [], "chosen": side(chosen), "rejected": side(rejected),
            "chosen_reward": chosen["reward"], "rejected_reward": rejected["reward"],
            "chosen_token_ids": chosen["token_ids"], "rejected_token_ids": rejected["token_ids"]}


@pytest.fixture
def files(tmp_path):
    root = _node(0, None, "", [], [], 0.0, 0.0, final=False)
    grounded = _node(1, 0, " There is a red circle at the top left.", [1, 2], [-0.1, -0.3], -0.2, 30.0)
    hallucinated = _node(2, 0, " There is a blue square at the top left.", [1, 3], [-0.1, -0.1], -0.1, 5.0)
    empty = _node(3, 0, " There is a at the top.", [4], [-2.0], -2.0, 10.0)
    tree = {"id": "a", "image": "x.png", "prompt": "Describe.", "nodes": [root, grounded, hallucinated, empty]}
    (tmp_path / "trees.jsonl").write_text(json.dumps(tree) + "\n")
    (tmp_path / "pairs.jsonl").write_text(json.dumps(_pair("a", grounded, hallucinated)) + "\n")
    (tmp_path / "truth.jsonl").write_text(json.dumps({"id": "a", "objects": ["circle"]}) + "\n")
    (tmp_path / "vocab.json").write_text(json.dumps({"objects": {"circle": [], "square": ["box"]}}))
    return tmp_path


def test_search_and_pair_figures_without_truth(files):
    d = pair_diagnostics(files / "trees.jsonl", files / "pairs.jsonl")
    assert d["diag_r_i_spread"] == pytest.approx(30.0 - 5.0)
    assert d["diag_r_t_spread"] == pytest.approx(-0.1 - -2.0)
    assert d["diag_best_r_i_not_best_r_t"] == 1.0          # CLIP picks node 1, the model's own score node 2
    assert d["diag_chosen_fluency"] == pytest.approx(-0.2)  # mean of -0.1, -0.3
    assert d["diag_rejected_fluency"] == pytest.approx(-0.1)
    assert d["diag_chosen_sentences"] == 1 and d["diag_chosen_tokens"] == 2
    assert d["diag_margin_p50"] == pytest.approx((0.9 * 30 - 0.02) - (0.9 * 5 - 0.01))
    assert "diag_informative_pairs" not in d
    assert "CHAIR_i" not in describe(d)


def test_ground_truth_figures(files):
    d = pair_diagnostics(files / "trees.jsonl", files / "pairs.jsonl", str(files / "truth.jsonl"),
                         str(files / "vocab.json"))
    assert d["diag_chosen_chair_i"] == 0.0 and d["diag_rejected_chair_i"] == 1.0
    assert d["diag_chosen_clean"] == 1.0 and d["diag_rejected_clean"] == 0.0
    assert d["diag_informative_pairs"] == 1.0
    assert d["diag_clean_expansions"] == 1.0               # node 1 names only present objects
    assert (d["diag_r_i_grounded"], d["diag_r_i_hallucinated"], d["diag_r_i_no_object"]) == (30.0, 5.0, 10.0)
    assert "informative pairs 100%" in describe(d)


def test_a_pair_teaching_the_wrong_way_is_visible(files):
    trees = json.loads((files / "trees.jsonl").read_text())
    grounded, hallucinated = trees["nodes"][1], trees["nodes"][2]
    (files / "pairs.jsonl").write_text(json.dumps(_pair("a", hallucinated, grounded)) + "\n")
    d = pair_diagnostics(files / "trees.jsonl", files / "pairs.jsonl", str(files / "truth.jsonl"),
                         str(files / "vocab.json"))
    assert d["diag_chosen_chair_i"] == 1.0 and d["diag_informative_pairs"] == 0.0
    assert d["diag_clean_expansions"] == 1.0   # a clean candidate existed: the choice, not the search, failed


def test_a_missing_truth_file_is_said_not_skipped_silently(files, caplog):
    with caplog.at_level("WARNING", logger="csr_plugin.diagnostics"):
        d = pair_diagnostics(files / "trees.jsonl", files / "pairs.jsonl", str(files / "nope.jsonl"),
                             str(files / "vocab.json"))
    assert "diag_informative_pairs" not in d and d["diag_r_i_spread"] == pytest.approx(25.0)
    assert "data.truth" in caplog.text and "nope.jsonl" in caplog.text


def test_go_on_pairs_are_counted_apart_from_the_best_worst_ones(files):
    trees = json.loads((files / "trees.jsonl").read_text())
    grounded, hallucinated, empty = trees["nodes"][1:4]
    go_on = {**_pair("a", grounded, empty), "kind": "go_on"}   # shapes only: the figures, not a real cut
    with open(files / "pairs.jsonl", "a") as out:
        out.write(json.dumps(go_on) + "\n")
    d = pair_diagnostics(files / "trees.jsonl", files / "pairs.jsonl", str(files / "truth.jsonl"),
                         str(files / "vocab.json"))
    assert d["diag_informative_pairs"] == 1.0 and d["diag_rejected_chair_i"] == 1.0   # the go-on pair left out
    assert d["diag_go_on_pairs"] == 1.0 and d["diag_go_on_clean"] == 1.0   # one per best-worst pair, chosen clean


QUESTION = r"\bis there an? (?P<object>[a-z][a-z -]*?) in the (?:image|picture|photo)\?"


@pytest.fixture
def with_a_question(files):
    """Tree "a" as above, plus "q": "Is there a box in the image?" (a square, absent) answered yes or no."""
    root = _node(0, None, "", [], [], 0.0, 0.0, final=False)
    no = _node(1, 0, " No.", [7], [-0.5], -0.5, 12.0)
    yes = _node(2, 0, " Yes.", [8], [-0.2], -0.2, -12.0)
    tree = {"id": "q", "image": "x.png", "prompt": "Is there a box in the image?", "nodes": [root, no, yes]}
    with open(files / "trees.jsonl", "a") as f:
        f.write(json.dumps(tree) + "\n")
    with open(files / "truth.jsonl", "a") as f:
        f.write(json.dumps({"id": "q", "objects": ["circle"]}) + "\n")
    return files, no, yes


def _with_pair(files, chosen, rejected):
    with open(files / "pairs.jsonl", "a") as f:
        f.write(json.dumps(_pair("q", chosen, rejected)) + "\n")
    return pair_diagnostics(files / "trees.jsonl", files / "pairs.jsonl", str(files / "truth.jsonl"),
                            str(files / "vocab.json"), QUESTION)


def test_a_yes_no_pair_is_judged_on_its_answer(with_a_question):
    files, no, yes = with_a_question
    d = _with_pair(files, no, yes)   # "No." to an absent square ("box" is one of its forms) is right
    assert d["diag_yes_no_pairs"] == 0.5                  # of the two pairs, "a" and "q"
    assert d["diag_yes_no_chosen_right"] == 1.0 and d["diag_yes_no_rejected_right"] == 0.0
    assert d["diag_informative_pairs"] == 1.0             # both pairs: right over wrong
    assert d["diag_chosen_clean"] == 1.0 and d["diag_rejected_clean"] == 0.0
    assert d["diag_chosen_chair_i"] == 0.0 and d["diag_rejected_chair_i"] == 1.0   # "a"'s mentions only
    assert (d["diag_r_i_yes_no_right"], d["diag_r_i_yes_no_wrong"]) == (12.0, -12.0)
    assert d["diag_r_i_no_object"] == 10.0                # "Yes."/"No." are not counted as naming nothing
    assert d["diag_clean_expansions"] == 1.0              # "q"'s expansion had the right answer
    assert "yes/no pairs 50%, right chosen/rejected 100%/0%" in describe(d)


def test_a_wrong_yes_no_choice_is_visible(with_a_question):
    files, no, yes = with_a_question
    d = _with_pair(files, yes, no)
    assert d["diag_yes_no_chosen_right"] == 0.0 and d["diag_informative_pairs"] == 0.5


def test_without_the_question_a_yes_no_pair_reads_as_not_informative(with_a_question):
    files, no, yes = with_a_question
    _with_pair(files, no, yes)
    d = pair_diagnostics(files / "trees.jsonl", files / "pairs.jsonl", str(files / "truth.jsonl"),
                         str(files / "vocab.json"))
    assert "diag_yes_no_pairs" not in d and d["diag_informative_pairs"] == 0.5   # "No." vs "Yes.": both clean


def test_a_fragment_reply_is_counted_and_never_clean(with_a_question):
    """"right." answers "Is there a box?" with neither yes nor no: chosen over "Yes." it is a fragment (1 of the 1
    yes/no chosen replies), not clean, and the pair is not informative although the rejected answer is wrong."""
    files, no, yes = with_a_question
    fragment = _node(3, 0, " right.", [9], [-0.1], -0.1, -12.0)
    d = _with_pair(files, fragment, yes)
    assert d["diag_chosen_fragments"] == 1.0 and d["diag_rejected_fragments"] == 0.0
    assert d["diag_chosen_clean"] == 0.5                  # "a"'s grounded chosen, then the fragment
    assert d["diag_informative_pairs"] == 0.5             # "a" only
    assert "diag_yes_no_chosen_right" not in d            # no chosen yes/no answer to judge
    assert "fragments chosen/rejected 100%/0%" in describe(d)
