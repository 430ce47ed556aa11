"""Sentence-level beam search: pruning, completion, filters, calibration modes."""
import pytest

from csr_plugin.config import CurationConfig, RewardConfig, SearchConfig
from csr_plugin.reward import rank_fusion_reward
from csr_plugin.sampling.search import PromptJob, SentenceBeamSearch, is_degenerate, path_score
from fakes import ScriptedClip, ScriptedEngine


def _jobs(engine, n=2):
    return [PromptJob(f"p{i}", f"img{i}.png", f"question {i}", None, engine.encode_prompt(f"question {i}", None))
            for i in range(n)]


def _search(engine=None, clip=None, reward=None, curation=None, **search):
    cfg = {"beam_width": 3, "candidates": 4, "keep_top": 1, "keep_bottom": 2, "max_sentences": 4}
    cfg.update(search)
    return SentenceBeamSearch(engine or ScriptedEngine(), clip or ScriptedClip(), SearchConfig(**cfg),
                              reward or RewardConfig(), curation or CurationConfig())


def _path(nodes, node):
    path = []
    while node["parent"] is not None:
        path.append(node)
        node = nodes[node["parent"]]
    return path[::-1]


def _depth(nodes, node):
    return len(_path(nodes, node))


@pytest.mark.parametrize("calibration", ["online", "posthoc"])
@pytest.mark.parametrize("length_normalize", [True, False])
def test_kept_beams_are_exactly_top_k_and_bottom_k(calibration, length_normalize):
    engine = ScriptedEngine(eos_at={2: {1}, 3: {0}})
    search = _search(engine, calibration=calibration, curation=CurationConfig(length_normalize=length_normalize))
    for tree in search.run(_jobs(engine)):
        nodes = tree.to_json()["nodes"]
        by_id = {n["id"]: n for n in nodes}
        parents = {n["parent"] for n in nodes}
        key = "reward" if calibration == "online" else "r_t"
        for depth in range(1, 5):
            pool = [n for n in nodes if n["parent"] is not None and _depth(by_id, n) == depth
                    and n["finish"] != "eos"]
            if not pool:
                continue
            score = {n["id"]: path_score([p[key] for p in _path(by_id, n)], length_normalize) for n in pool}
            ranked = sorted(pool, key=lambda n: -score[n["id"]])
            expected = {n["id"] for n in ranked[:1] + ranked[-2:]} if len(pool) > 3 else {n["id"] for n in pool}
            kept = {n["id"] for n in pool if n["id"] in parents or n["final"]}
            assert kept == expected, f"depth {depth}"
        assert all(n["finish"] in ("eos", "max_sentences") for n in nodes if n["final"])
        assert all(_depth(by_id, n) == 4 for n in nodes if n["final"] and n["finish"] == "max_sentences")


def test_one_engine_call_and_one_clip_batch_per_step_for_all_prompts():
    engine, clip = ScriptedEngine(), ScriptedClip()
    _search(engine, clip, max_sentences=3).run(_jobs(engine, n=5))
    # step 1: the root of 5 prompts; then 3 beams each
    assert engine.calls == [5, 15, 15]
    assert clip.batches == [20, 60, 60]


def test_first_candidates_widens_only_the_first_step():
    engine, clip = ScriptedEngine(), ScriptedClip()
    tree = _search(engine, clip, max_sentences=3, first_candidates=12).run(_jobs(engine, n=1))[0]
    # the root alone is expanded with 12 candidates, the 3 beams after it with candidates=4 each
    assert clip.batches == [12, 12, 12]
    assert len([n for n in tree.nodes if n.parent == 0]) == 12
    assert all(len([c for c in tree.nodes if c.parent == n.id]) in (0, 4) for n in tree.nodes if n.parent == 0)
    with pytest.raises(Exception, match="first_candidates"):
        SearchConfig(first_candidates=-1).validate("search")


def test_eos_candidates_complete_without_taking_a_beam_slot():
    engine = ScriptedEngine(eos_at={1: {0, 1}})
    tree = _search(engine, max_sentences=2).run(_jobs(engine, n=1))[0]
    depth1 = [n for n in tree.nodes if n.parent == 0]
    assert [n.final for n in depth1[:2]] == [True, True] and all(n.finish == "eos" for n in depth1[:2])
    # the other two candidates are the whole pool (2 <= 3 slots): both continue
    assert {n.parent for n in tree.nodes if n.parent not in (None, 0)} == {depth1[2].id, depth1[3].id}


def test_eos_alone_marks_its_parent_as_a_complete_response():
    engine = ScriptedEngine(blank_eos_at={2: {0}})
    tree = _search(engine, max_sentences=3).run(_jobs(engine, n=1))[0]
    beams_at_1 = {n.parent for n in tree.nodes if n.parent not in (None, 0) and
                  tree.nodes[n.parent].parent == 0}
    assert beams_at_1 and all(tree.nodes[i].final and tree.nodes[i].finish == "eos" for i in beams_at_1)
    assert all(n.text for n in tree.nodes[1:]), "an EOS-only candidate must not become a node"


def test_rank_fusion_rewards_are_per_sibling_group():
    engine = ScriptedEngine()
    tree = _search(engine, reward=RewardConfig(fusion="rank"), max_sentences=2).run(_jobs(engine, n=1))[0]
    groups = {}
    for node in tree.nodes[1:]:
        groups.setdefault(node.parent, []).append(node)
    for siblings in groups.values():
        expected = rank_fusion_reward([n.r_i for n in siblings], [n.r_t for n in siblings], 0.9)
        assert [n.reward for n in siblings] == pytest.approx(expected)


def test_paper_fusion_reward_is_the_calibrated_mixture():
    engine = ScriptedEngine()
    tree = _search(engine, reward=RewardConfig(lambda_=0.7), max_sentences=1).run(_jobs(engine, n=1))[0]
    for node in tree.nodes[1:]:
        assert node.r_t == pytest.approx(node.logprobs[0])
        assert node.reward == pytest.approx(0.7 * node.r_i + 0.3 * node.r_t)


def test_online_and_posthoc_calibration_prune_differently():
    engine = ScriptedEngine()
    online = _search(engine, calibration="online").run(_jobs(engine, n=3))
    posthoc = _search(engine, calibration="posthoc").run(_jobs(engine, n=3))
    kept = lambda trees: [sorted({n.parent for n in t.nodes if n.parent}) for t in trees]  # noqa: E731
    assert kept(online) != kept(posthoc)


def test_filters_drop_short_and_degenerate_candidates():
    texts = {(1, 0): " ok.", (1, 1): " the the the the the the the.", (1, 2): " A fine sentence here."}
    engine = ScriptedEngine(texts=texts)
    search = _search(engine, min_sentence_chars=4, drop_degenerate=True, max_sentences=1)
    tree = search.run(_jobs(engine, n=1))[0]
    assert [n.text for n in tree.nodes if n.parent == 0][0] == " A fine sentence here."
    assert search.stats["filtered_short"] == 1 and search.stats["filtered_degenerate"] == 1
    assert is_degenerate("aaaaaaaaaaaaa", []) and is_degenerate("It is red.", ["it is  red."])
    assert not is_degenerate("A red circle.", ["A blue square."])
