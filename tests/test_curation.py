import json

import pytest

from csr_plugin.config import CurationConfig
from csr_plugin.curation import complete_responses, curate_file, curate_tree


def _node(i, parent, text, reward, final=False, r_i=10.0):
    return {"id": i, "parent": parent, "text": text, "token_ids": [i], "logprobs": [-1.0], "r_t": -1.0,
            "r_i": r_i, "reward": reward, "final": final, "finish": "eos" if final else "sentence"}


def _tree(nodes, tree_id="t"):
    return {"id": tree_id, "image": "/img.png", "prompt": "Describe.", "nodes": [_node(0, None, "", 0.0)] + nodes}


# root -> A (10) -> A1 (30, final)      mean 20, sum 40
#      -> A -> A2 (-5, final)           mean 2.5, sum 5
#      -> B (4, final)                  mean 4,  sum 4
TREE = _tree([_node(1, 0, "A.", 10.0), _node(2, 1, " A1.", 30.0, True, r_i=30.0),
              _node(3, 1, " A2.", -5.0, True, r_i=2.0), _node(4, 0, "B.", 4.0, True)])


def test_every_complete_response_with_its_cumulative_reward():
    responses = {r.text: r.reward for r in complete_responses(TREE, length_normalize=True)}
    assert responses == pytest.approx({"A. A1.": 20.0, "A. A2.": 2.5, "B.": 4.0})
    responses = {r.text: r.reward for r in complete_responses(TREE, length_normalize=False)}
    assert responses == pytest.approx({"A. A1.": 40.0, "A. A2.": 5.0, "B.": 4.0})


def test_chosen_is_the_highest_and_rejected_the_lowest():
    pair, _ = curate_tree(TREE, CurationConfig(length_normalize=True))
    assert (pair.chosen.text, pair.rejected.text) == ("A. A1.", "A. A2.")
    assert pair.chosen.r_i == pytest.approx(20.0) and pair.rejected.r_i == pytest.approx(6.0)
    pair, _ = curate_tree(TREE, CurationConfig(length_normalize=False))   # the sum favours the 2-sentence path
    assert (pair.chosen.text, pair.rejected.text) == ("A. A1.", "B.")


def test_degenerate_pairs_are_dropped_with_a_reason():
    same = _tree([_node(1, 0, "Same.", 3.0, True), _node(2, 0, "Same.", 1.0, True)])
    assert curate_tree(same, CurationConfig()) == (None, "chosen and rejected texts are identical")
    single = _tree([_node(1, 0, "Only.", 3.0, True), _node(2, 0, "Pruned.", 1.0)])
    assert curate_tree(single, CurationConfig())[1] == "fewer than 2 complete responses"
    pair, _ = curate_tree(TREE, CurationConfig(min_margin=17.5))      # margin 20 - 2.5 = 17.5 is kept
    assert pair is not None
    assert curate_tree(TREE, CurationConfig(min_margin=17.6))[1].startswith("reward margin below")


def test_pairs_file_is_the_conversational_preference_format(tmp_path):
    trees = tmp_path / "trees.jsonl"
    trees.write_text(json.dumps(TREE) + "\n" + json.dumps(_tree([_node(1, 0, "x.", 1.0, True)], "t2"))
                     + "\n" + '{"id": "torn", "ima')
    summary = curate_file(trees, tmp_path / "pairs.jsonl", CurationConfig())
    assert summary.pairs == 1 and sum(summary.skipped.values()) == 2
    pair = json.loads((tmp_path / "pairs.jsonl").read_text())
    assert pair["images"] == ["/img.png"]
    assert pair["prompt"] == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    assert pair["chosen"] == [{"role": "assistant", "content": [{"type": "text", "text": "A. A1."}]}]
    assert pair["rejected"][0]["content"][0]["text"] == "A. A2."
    assert pair["chosen_reward"] == pytest.approx(20.0) and pair["rejected_reward"] == pytest.approx(2.5)


def test_pairs_carry_the_path_token_ids_and_why_each_response_ended(tmp_path):
    """Token ids are the nodes' ids from the root, concatenated; ``finish`` is the final node's."""
    tree = _tree([_node(1, 0, "A.", 10.0), _node(2, 1, " A1.", 30.0, True), _node(3, 1, " A2.", -5.0, True)])
    tree["nodes"][3]["finish"] = "max_sentences"   # the search cut this beam at its last step
    trees = tmp_path / "trees.jsonl"
    trees.write_text(json.dumps(tree) + "\n")
    curate_file(trees, tmp_path / "pairs.jsonl", CurationConfig())
    pair = json.loads((tmp_path / "pairs.jsonl").read_text())
    assert (pair["chosen_token_ids"], pair["rejected_token_ids"]) == ([1, 2], [1, 3])
    assert (pair["chosen_finish"], pair["rejected_finish"]) == ("eos", "max_sentences")


# root -> G (30) -> H (5, final)        a grounded sentence, then a hallucinated one
#      -> G2 (25, final)                a grounded sentence alone
#      -> X (2) -> Y (3, final)         two weak sentences
# 5 candidate sentences, mean reward (30 + 5 + 25 + 2 + 3) / 5 = 13
CENTRED = _tree([_node(1, 0, "G.", 30.0), _node(2, 1, " H.", 5.0, True), _node(3, 0, "G2.", 25.0, True),
                 _node(4, 0, "X.", 2.0), _node(5, 4, " Y.", 3.0, True)])


def test_prompt_mean_baseline_stops_paying_for_below_average_sentences():
    raw = {r.text: r.reward for r in complete_responses(CENTRED, length_normalize=False)}
    assert raw == pytest.approx({"G. H.": 35.0, "G2.": 25.0, "X. Y.": 5.0})   # the sum pays for H
    centred = {r.text: r.reward for r in complete_responses(CENTRED, False, "prompt_mean")}
    assert centred == pytest.approx({"G. H.": 17 - 8, "G2.": 12.0, "X. Y.": -11 - 10})
    pair, _ = curate_tree(CENTRED, CurationConfig(length_normalize=False, reward_baseline="prompt_mean"))
    assert (pair.chosen.text, pair.rejected.text) == ("G2.", "X. Y.")


def test_stopping_after_any_sentence_is_a_scored_choice():
    cfg = CurationConfig(length_normalize=False, reward_baseline="prompt_mean", stop_at_any_sentence=True)
    responses = {r.text: (r.reward, r.finish, r.sentences) for r in complete_responses(
        CENTRED, False, "prompt_mean", stop_at_any_sentence=True)}
    assert responses["G."] == pytest.approx((17.0, "stop", 1)) and responses["G. H."][1:] == ("eos", 2)
    pair, _ = curate_tree(CENTRED, cfg)
    assert pair.chosen.text == "G." and pair.chosen.finish == "stop" and pair.chosen.token_ids == [1]
    assert pair.to_json()["chosen_finish"] == "stop"   # not a limit: DPO trains it with EOS


def test_rejected_of_the_same_length_as_chosen():
    cfg = dict(length_normalize=False, reward_baseline="prompt_mean", stop_at_any_sentence=True)
    pair, _ = curate_tree(CENTRED, CurationConfig(**cfg))
    assert (pair.chosen.text, pair.rejected.text) == ("G.", "X. Y.")    # -21: the lowest, one sentence longer
    pair, _ = curate_tree(CENTRED, CurationConfig(**cfg, rejected="lowest_same_length"))
    assert (pair.chosen.text, pair.rejected.text) == ("G.", "X.")       # -11: the lowest of one sentence
    no_match = _tree([_node(1, 0, "A.", 9.0, True), _node(2, 0, "B.", 1.0), _node(3, 2, " C.", 1.0, True)])
    pair, _ = curate_tree(no_match, CurationConfig(rejected="lowest_same_length"))
    assert pair.rejected.text == "B. C."                                # no other 1-sentence response: the nearest


def test_rejected_sharing_the_chosen_start_parts_from_it_later():
    cfg = dict(length_normalize=False, reward_baseline="prompt_mean", stop_at_any_sentence=True)
    pair, _ = curate_tree(CENTRED, CurationConfig(**cfg, rejected="lowest_same_start"))
    assert (pair.chosen.text, pair.rejected.text) == ("G.", "G. H.")    # 9 beats X. Y. (-21): it starts with G
    pair, _ = curate_tree(TREE, CurationConfig(length_normalize=False, rejected="lowest_same_start"))
    assert (pair.chosen.text, pair.rejected.text) == ("A. A1.", "A. A2.")   # "B." (4) is lower but starts apart
    alone = _tree([_node(1, 0, "A.", 9.0, True), _node(2, 0, "B.", 1.0), _node(3, 2, " C.", 1.0, True)])
    pair, _ = curate_tree(alone, CurationConfig(rejected="lowest_same_start"))
    assert pair.rejected.text == "B. C."                                # nothing else starts with A: the lowest


def test_a_baseline_under_the_mean_is_refused():
    from csr_plugin.config import ConfigError

    with pytest.raises(ConfigError, match="length_normalize: false"):
        CurationConfig(length_normalize=True, reward_baseline="prompt_mean").validate("curation")


# root -> G (30) -> K (28) -> Z (26, final)   three grounded sentences
#      -> G -> H (1, final)                   a hallucinated second sentence
#      -> X (2) -> Y (3, final)               two weak sentences
# 6 candidate sentences, mean (30 + 28 + 26 + 1 + 2 + 3) / 6 = 15: centred G 15, K 13, Z 11, H -14, X -13, Y -12
LONG = _tree([_node(1, 0, "G.", 30.0), _node(2, 1, " K.", 28.0), _node(3, 2, " Z.", 26.0, True),
              _node(4, 1, " H.", 1.0, True), _node(5, 0, "X.", 2.0), _node(6, 5, " Y.", 3.0, True)])
GO_ON = dict(length_normalize=False, reward_baseline="prompt_mean", stop_at_any_sentence=True, go_on_pairs=True)


def test_go_on_pair_sets_the_chosen_response_against_its_own_earliest_useful_stop(tmp_path):
    from csr_plugin.curation import curate_tree_pairs

    pairs, _ = curate_tree_pairs(LONG, CurationConfig(**GO_ON))
    assert [(p.kind, p.chosen.text, p.rejected.text) for p in pairs] == [
        ("best_worst", "G. K. Z.", "X. Y."), ("go_on", "G. K. Z.", "G.")]   # "G." 15 < "G. K." 28 < 39
    go_on = pairs[1]
    assert go_on.rejected.finish == "stop" and go_on.rejected.token_ids == [1]   # trained with EOS after G
    assert go_on.chosen.reward - go_on.rejected.reward == pytest.approx(13 + 11)
    assert [p.kind for p in curate_tree_pairs(CENTRED, CurationConfig(**GO_ON))[0]] == ["best_worst"]  # 1 sentence
    off = {**GO_ON, "go_on_pairs": False}
    assert [p.kind for p in curate_tree_pairs(LONG, CurationConfig(**off))[0]] == ["best_worst"]
    trees = tmp_path / "trees.jsonl"
    trees.write_text(json.dumps(LONG) + "\n" + json.dumps(CENTRED) + "\n")
    assert curate_file(trees, tmp_path / "pairs.jsonl", CurationConfig(**GO_ON)).pairs == 3
    written = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert [(p["id"], p["kind"]) for p in written] == [("t", "best_worst"), ("t", "go_on"), ("t", "best_worst")]


def test_go_on_pairs_need_cut_responses_and_a_baseline():
    from csr_plugin.config import ConfigError

    for missing in ({"stop_at_any_sentence": False}, {"reward_baseline": "none"}):
        with pytest.raises(ConfigError, match="go_on_pairs"):
            CurationConfig(**{**GO_ON, **missing}).validate("curation")
