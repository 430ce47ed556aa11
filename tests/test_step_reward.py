"""The PPO step reward (step_reward.py, dense_rewards.py, plain_rollout.py): what a sentence earns.

Rollout groups are made by hand and go through OpenRLHF's REAL advantage code with the patch
installed (the fixtures and helpers of test_dense_rewards.py), so "return" below is OpenRLHF's.
"""
from __future__ import annotations

import pytest
import torch

from csr_plugin.config import ConfigError, load_recipe
from csr_plugin.openrlhf import dense_rewards as dr
from csr_plugin.openrlhf.plain_rollout import response_tree, sentence_token_ends
from csr_plugin.openrlhf.step_reward import check_step_reward, group_baselines
from csr_plugin.sampling.engine import EncodedPrompt
from csr_plugin.sampling.search import PromptJob
from test_dense_rewards import args_for, orl, response, returns_of, run, vllm_path  # noqa: F401 (fixtures)

RECIPE = "recipes/ppo-stepwise.yaml"


def rollout(sentence_rewards, tokens_per_sentence=3, prompt_len=2):
    """An agent response whose sentences are ``tokens_per_sentence`` tokens each; reward = their sum."""
    ends = [(prompt_len + tokens_per_sentence * (k + 1), r) for k, r in enumerate(sentence_rewards)]
    return response(prompt_len, tokens_per_sentence * len(sentence_rewards), sum(sentence_rewards), ends)


def first_token_returns(orl, estimator, groups, **args):
    """Per rollout: its return at the first action token (the whole response's credit, gamma = 1)."""
    n = len(groups[0])
    responses = [rollout(r) for group in groups for r in group]
    return [g[0].item() for g in returns_of(run(orl, args_for(estimator, n=n, micro=4, **args), responses))]


def test_group_baseline_is_the_mean_sentence_reward_of_the_prompt_group():
    # group 1: sentences 1, 2, 3 and 6 -> b = 3; group 2: no sentence at all -> b = 0
    sums, counts = torch.tensor([6.0, 6.0, 0.0, 0.0]), torch.tensor([3.0, 1.0, 0.0, 0.0])
    assert group_baselines(sums, counts, 2).tolist() == [3.0, 3.0, 0.0, 0.0]
    with pytest.raises(RuntimeError, match="prompt groups of 3"):
        group_baselines(sums, counts, 3)


def test_a_hallucinated_sentence_lowers_the_return(orl):
    # CLIP-sized rewards: grounded 25, hallucinated 8. B says what A says, then hallucinates.
    grounded, hallucinated = [25.0, 25.0, 25.0], [25.0, 25.0, 25.0, 8.0]
    assert sum(hallucinated) > sum(grounded)  # the raw sum (the issue): the hallucination paid 8
    a, b = first_token_returns(orl, "reinforce", [[grounded, hallucinated]])
    # b = 158 / 7; A: 75 - 3 x 158/7 = 51/7; B: 83 - 4 x 158/7 = -51/7
    assert a == pytest.approx(51 / 7, abs=1e-4) and b == pytest.approx(-51 / 7, abs=1e-4)


def test_length_alone_does_not_raise_the_return(orl):
    # B is A plus one sentence worth the group's mean (22, the mean of the others' 132 / 6)
    short, longer, other = [28.0, 12.0], [28.0, 12.0, 22.0], [26.0, 26.0]
    assert sum(longer) > sum(short)
    a, b, c = first_token_returns(orl, "reinforce", [[short, longer, other]])
    # b = 154 / 7 = 22: A 40 - 44 = -4, B 62 - 66 = -4, C 52 - 44 = 8 (the totals sum to 0)
    assert (a, b, c) == pytest.approx((-4.0, -4.0, 8.0), abs=1e-4)
    # ... and under a group baseline the extra average sentence earns nothing either
    a, b, c = first_token_returns(orl, "reinforce_baseline", [[short, longer, other]])
    assert (a, b, c) == pytest.approx((-4.0, -4.0, 8.0), abs=1e-4)  # the group mean of the totals is 0


def realistic_groups():
    """4 prompts x 4 rollouts of 2..8 sentences: r = 0.9 R_I + 0.1 R_T, R_I 25..30 grounded or 5..10
    hallucinated (the issue's magnitudes), R_T -0.5..-2.5 (mean token log-probs)."""
    groups = []
    for p in range(4):
        group = []
        for j in range(4):
            m = 2 + (3 * p + 5 * j) % 7
            group.append([0.9 * ((25 + (p + k) % 6) if (p + j + k) % 4 else (5 + (j + k) % 6))
                          + 0.1 * (-0.5 - 0.25 * ((j + k) % 9)) for k in range(m)])
        groups.append(group)
    # one prompt where every rollout is all grounded or all hallucinated: the largest spread
    groups.append([[0.9 * 30 - 0.05] * 8, [0.9 * 30 - 0.05] * 8, [0.9 * 5 - 0.25] * 8, [0.9 * 5 - 0.25] * 8])
    return groups


@pytest.mark.parametrize("estimator", ["reinforce_baseline", "rloo", "group_norm", "dr_grpo", "reinforce"])
def test_reward_clip_leaves_advantages_unchanged_for_realistic_magnitudes(orl, estimator):
    groups = realistic_groups()
    responses = [rollout(r) for group in groups for r in group]
    # the raw totals pass 100 (8 grounded sentences: 216): under the old uncentred reward the
    # last-token residual (about minus the group mean) was clamped at -100
    assert max(r["reward"] for r in responses) > 200

    def advantages(clip):
        batches = run(orl, args_for(estimator, n=4, micro=4, clip=clip), responses)
        return [b.advantages for b in batches], [b.returns for b in batches]

    clipped, unclipped, tight = advantages((-100.0, 100.0)), advantages(None), advantages((-0.1, 0.1))
    for got, want in zip(clipped[0] + clipped[1], unclipped[0] + unclipped[1], strict=True):
        assert torch.equal(got, want)
    # a clamp that binds does change them (so the equality above is not vacuous)
    assert not all(torch.equal(g, w) for g, w in zip(tight[1], unclipped[1]))


# ── check_step_reward: the settings under which the reward would not mean what it says ──

def test_the_shipped_ppo_recipe_passes():
    check_step_reward(load_recipe(RECIPE))


@pytest.mark.parametrize("overrides, match", [
    (["ppo.n_samples_per_prompt=1", "ppo.estimator=reinforce"], "every return is 0"),
    (["ppo.dense_rewards=false", "curation.length_normalize=false"], "grows with every sentence"),
    (["reward.fusion=rank"], "every sentence ranks first"),
    (["ppo.openrlhf={algo.advantage.is_correction_level: token}", "search.temperature=0.7"], "processed log-probs"),
    (["ppo.openrlhf={algo: {advantage: {is_correction_level: seq}}}", "search.top_p=0.9"], "top_p 0.9"),
])
def test_refused_settings_name_the_reason(overrides, match):
    with pytest.raises(ConfigError, match=match):
        check_step_reward(load_recipe(RECIPE, overrides))


def test_correction_at_temperature_one_without_top_p_is_allowed():
    # OpenRLHF's processed log-probs equal the raw ones there (docs/ppo.md, "The step reward")
    check_step_reward(load_recipe(RECIPE, ["ppo.openrlhf={algo.advantage.is_correction_level: token}"]))


# ── the plain rollout: split afterwards, token-exact, nothing dropped ──

class ByteTokenizer:
    """Each id is a piece of UTF-8 bytes; decode joins them (a split character decodes to U+FFFD)."""

    def __init__(self, pieces, eos_id):
        self.pieces, self.eos_id = pieces, eos_id

    def decode(self, ids, skip_special_tokens=True):
        return b"".join(self.pieces[i] for i in ids if i != self.eos_id).decode("utf-8", errors="replace")


PIECES = [b"A", b" cat", b" sits", b".", b" ...", b"\n", b" It", b" is", b" caf", b"\xc3", b"\xa9", b".\n", b"</s>",
          b"!!", b" 3", b".5", b" m"]
EOS = 12
ENCODE = {piece.decode("latin-1"): i for i, piece in enumerate(PIECES)}  # "\xc3" names the byte 0xC3


def ids_of(*pieces):
    return [ENCODE[p] for p in pieces]


@pytest.mark.parametrize("pieces, ends", [
    # "A cat sits. ... It is café.\n" + EOS: the "..." joins the first sentence, the EOS the last;
    # the split character é (two tokens) is not a boundary
    (("A", " cat", " sits", ".", " ...", " It", " is", " caf", "\xc3", "\xa9", ".\n", "</s>"), [5, 12]),
    # a merged ".\n" token ends its sentence; "3.5" does not end one
    ((" It", " is", " 3", ".5", " m", ".\n", " It", " sits", "."), [6, 9]),
    # punctuation before the first word joins the first sentence; a response without a word has none
    (("!!", " It", " sits", "."), [4]),
    (("!!", " ...", "</s>"), []),
])
def test_sentences_partition_the_generated_tokens(pieces, ends):
    tokenizer = ByteTokenizer(PIECES, EOS)
    assert sentence_token_ends(tokenizer, ids_of(*pieces), [".", "!", "?"], {EOS}) == ends


class CatScorer:
    """R_I = 30 for a sentence that names the cat, 5 otherwise (a stand-in for CLIP)."""

    def __init__(self):
        self.seen = []

    def visual(self, items):
        self.seen += [i.text for i in items]
        return [30.0 if "cat" in i.text else 5.0 for i in items]


def test_the_plain_tree_scores_every_sentence_from_its_own_tokens():
    recipe = load_recipe(RECIPE)
    tokenizer = ByteTokenizer(PIECES, EOS)
    ids = ids_of("A", " cat", " sits", ".", " ...", " It", " is", " caf", "\xc3", "\xa9", ".\n", "</s>")
    logprobs = [-0.1 * (i + 1) for i in range(len(ids))]
    job = PromptJob(id="p", image="img.png", question="Describe.", image_data=None,
                    encoded=EncodedPrompt([1, 2], {}), prompt_text="<image> Describe.")
    scorer = CatScorer()
    tree = response_tree(job, tokenizer, ids, logprobs, "eos", recipe, scorer, {EOS})
    first, second = tree.nodes[1:]
    assert first.token_ids + second.token_ids == ids and first.logprobs + second.logprobs == logprobs
    assert scorer.seen == ["A cat sits. ...", "It is café."]
    # R_T is the mean log-prob of the sentence's own tokens (EOS included in the last one)
    assert first.r_t == pytest.approx(-0.3) and second.r_t == pytest.approx(-0.9)  # -1.5 / 5, -6.3 / 7
    assert first.reward == pytest.approx(0.9 * 30 - 0.03) and second.reward == pytest.approx(0.9 * 5 - 0.09)
    assert (first.parent, second.parent, second.final, second.finish) == (0, 1, True, "eos")
    assert not first.final and first.finish == "sentence"
