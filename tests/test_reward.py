import pytest
import torch
from PIL import Image

from csr_plugin.reward import calibrated_reward, instruction_score, rank_fusion_reward


def test_instruction_score_mean_and_sum():
    assert instruction_score([-1.0, -2.0, -3.0], "mean") == pytest.approx(-2.0)
    assert instruction_score([-1.0, -2.0, -3.0], "sum") == pytest.approx(-6.0)
    with pytest.raises(ValueError, match="empty sentence"):
        instruction_score([], "mean")
    with pytest.raises(ValueError, match="'mean' or 'sum'"):
        instruction_score([-1.0], "prod")


def test_calibrated_reward_is_the_paper_mixture():
    # lambda 0.9: 0.9 * 25 + 0.1 * (-2) = 22.5 - 0.2 = 22.3
    assert calibrated_reward(25.0, -2.0, 0.9) == pytest.approx(22.3)
    assert calibrated_reward(25.0, -2.0, 0.0) == pytest.approx(-2.0)   # lambda 0: the model's own score only
    assert calibrated_reward(25.0, -2.0, 1.0) == pytest.approx(25.0)


def test_rank_fusion_matches_hand_worked_ranks():
    """Siblings r_i = [30, 10, 20], r_t = [-3, -1, -2], a = 0.9.

    rank_LM   = [3/3, 1/3, 2/3]  (-1 is the best LM score)
    rank_CLIP = [1/3, 3/3, 2/3]
    cost = 0.1 * rank_LM + 0.9 * rank_CLIP = [0.4, 0.9333, 0.6667]; reward = 1 - cost.
    """
    rewards = rank_fusion_reward([30.0, 10.0, 20.0], [-3.0, -1.0, -2.0], 0.9)
    assert rewards == pytest.approx([0.6, 1 - (0.1 / 3 + 0.9), 1 - 2 / 3])
    assert rank_fusion_reward([], [], 0.9) == []
    with pytest.raises(ValueError):
        rank_fusion_reward([1.0], [1.0, 2.0], 0.9)


def test_clip_relevance_is_clamped_scaled_cosine(tiny_clip):
    text = tiny_clip.text_embeddings(["a red circle", "a blue square"])
    # an image embedding equal to the text's gives cos 1 -> 100; its opposite gives cos -1 -> clamped to 0
    assert tiny_clip.relevance(text, ["a red circle", "a blue square"]) == pytest.approx([100.0, 100.0], abs=1e-3)
    assert tiny_clip.relevance(-text, ["a red circle", "a blue square"]) == [0.0, 0.0]
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    emb = tiny_clip.image_embedding("img", image)
    expected = max(100.0 * float(emb @ text[0]), 0.0)
    assert tiny_clip.score([("img", image, "a red circle")])[0] == pytest.approx(expected, abs=1e-4)


def test_image_embedding_is_computed_once_per_image(tiny_clip, monkeypatch):
    calls = []
    original = tiny_clip.model.encode_image
    monkeypatch.setattr(tiny_clip.model, "encode_image", lambda *a, **k: calls.append(1) or original(*a, **k))
    image = Image.new("RGB", (32, 32), (0, 0, 255))
    scores = tiny_clip.score([("once.png", image, f"sentence {i}") for i in range(7)])
    tiny_clip.score([("once.png", image, "one more")])
    assert len(scores) == 7 and len(calls) == 1


def test_long_text_is_truncated_to_clip_context_on_purpose(tiny_clip):
    long_text = "a red circle next to a blue square " * 60   # far beyond 77 tokens
    tokens = tiny_clip.tokenizer([long_text])
    assert tokens.shape[-1] == 77
    assert int(tokens[0, -1]) == tiny_clip.tokenizer.eot_token_id   # the end-of-text token is kept
    image = Image.new("RGB", (32, 32))
    assert tiny_clip.score([("long", image, long_text)])[0] >= 0.0


def test_trimmed_text_encoding_equals_open_clips_own(tiny_clip):
    texts = ["a red circle.", "two blue squares next to a small yellow star on the left side", "x"]
    assert tiny_clip._can_trim_padding()
    ours = tiny_clip.text_embeddings(texts)
    reference = tiny_clip.model.encode_text(tiny_clip.tokenizer(texts), normalize=True).float()
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
